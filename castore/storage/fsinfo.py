"""Refuse to put a store on a network filesystem, where LMDB is not safe.

LMDB relies on three things a network filesystem does not give across machines, and often
not even to two processes of one machine going through the network client:

* a shared writable memory map that every process sees coherently with the file (the
  readers' table lives in ``lock.mdb`` mapped shared; writers use ``writemap``);
* POSIX ``fcntl`` locks on ``lock.mdb`` (and castore's ``flock`` on ``writer.lock``) that
  are honoured by every opener;
* ``fsync``/``msync`` ordering, so a commit's meta page reaches the disk after its data.

On NFS, SMB/CIFS and the like a store can then lose commits, let two writers in, or hand
readers pages a writer is reusing.  The LMDB documentation says so ("do not use LMDB
databases on remote filesystems"); so do SQLite's and diskcache's.

:data:`NETWORK_FS_TYPES` lists the filesystem types refused, as the kernel names them in
``/proc/self/mountinfo`` (FUSE filesystems as ``fuse.<subtype>``):

* NFS and SMB: ``nfs``, ``nfs4``, ``cifs``, ``smb3``, ``smbfs``;
* other network and distributed filesystems: ``9p`` (also WSL2's Windows drives, where
  shared writable maps are not coherent), ``afs``, ``coda``, ``ncpfs``, ``ceph``,
  ``lustre``, ``gpfs``, ``beegfs``, ``pvfs2``/``orangefs``, ``davfs``;
* FUSE clients of remote storage: ``sshfs``, ``s3fs``, ``gcsfuse``, ``rclone``,
  ``glusterfs``, ``ceph-fuse``, ``juicefs``, ``davfs``, ``goofys``, ``blobfuse``,
  ``blobfuse2``, ``mountpoint-s3``, ``mfs`` (MooseFS), ``lizardfs``.

Not refused: local block filesystems (ext4, xfs, btrfs, zfs, ...), ``tmpfs``, ``overlay``
(a container's root: its upper layer is local), ``virtiofs`` (a VM's view of its host's
disk: safe while no process outside the VM opens the store) and the shared-disk cluster
filesystems ``gfs2`` and ``ocfs2`` (their maps and locks are cluster-coherent; a store
there is safe on one node at a time).  An unknown type, or no
``/proc/self/mountinfo`` (not Linux), is allowed: this check catches the common mistake,
it is not a proof of safety.

:func:`network_mount` is the pure decision (a path and the text of a mountinfo table);
:func:`check_local_filesystem` applies it to the running system.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from ..errors import UnsafeFilesystemError

log = logging.getLogger(__name__)

MOUNTINFO = "/proc/self/mountinfo"

_NETWORK_KERNEL_TYPES = frozenset(
    "nfs nfs4 cifs smb3 smbfs 9p afs coda ncpfs ceph lustre gpfs beegfs pvfs2 orangefs davfs".split()
)
_NETWORK_FUSE_SUBTYPES = frozenset(
    "sshfs s3fs gcsfuse rclone glusterfs ceph-fuse juicefs davfs goofys blobfuse blobfuse2 "
    "mountpoint-s3 mfs lizardfs".split()
)
#: filesystem types (as in mountinfo) on which a store is refused
NETWORK_FS_TYPES = _NETWORK_KERNEL_TYPES | frozenset(f"fuse.{s}" for s in _NETWORK_FUSE_SUBTYPES)

_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of a mountinfo table."""

    mount_point: str  #: absolute, unescaped
    fs_type: str  #: as the kernel names it: ``ext4``, ``nfs4``, ``fuse.sshfs``
    source: str  #: what is mounted: a device, ``server:/export``, ``//server/share``


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as 3-digit octal.
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a ``/proc/<pid>/mountinfo`` table, in its order; bad lines are skipped.

    A line is ``id parent major:minor root mount-point options [optional...] - type
    source super-options`` (proc(5)).
    """
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            dash = fields.index("-", 6)
            mount_point, fs_type = fields[4], fields[dash + 1]
        except (ValueError, IndexError):
            continue
        source = fields[dash + 2] if len(fields) > dash + 2 else ""
        if mount_point.startswith("/"):
            mounts.append(Mount(_unescape(mount_point), _unescape(fs_type), _unescape(source)))
    return mounts


def is_network_fs(fs_type: str) -> bool:
    """True for a filesystem type on which LMDB is not safe (see :data:`NETWORK_FS_TYPES`)."""
    return fs_type.lower() in NETWORK_FS_TYPES


def mount_of(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount holding the absolute, symlink-free ``path``: the longest mount point that
    is ``path`` or one of its ancestors; of mounts stacked on one point, the last (on top)."""
    best = None
    for mount in mounts:
        point = mount.mount_point.rstrip("/") or "/"
        inside = point == "/" or path == point or path.startswith(point + "/")
        if inside and (best is None or len(point) >= len(best.mount_point.rstrip("/") or "/")):
            best = mount
    return best


def network_mount(path: str, mountinfo: str) -> Mount | None:
    """The network mount that holds ``path`` according to the ``mountinfo`` text, or None.

    Pure: ``path`` must already be absolute and free of symlinks (``os.path.realpath``).
    A local filesystem mounted inside a network one holds its own paths: allowed.
    """
    mount = mount_of(path, parse_mountinfo(mountinfo))
    return mount if mount is not None and is_network_fs(mount.fs_type) else None


def read_mountinfo() -> str | None:
    """This process's mount table, or None where there is none (not Linux, no /proc)."""
    try:
        with open(MOUNTINFO, "rb") as file:
            return os.fsdecode(file.read())
    except OSError:
        return None


def check_local_filesystem(path: str | os.PathLike, *, force: bool = False, mountinfo: str | None = None) -> None:
    """Raise :class:`UnsafeFilesystemError` if the store directory ``path`` (which need not
    exist yet) is on a network filesystem.

    ``force`` (the caller's ``allow_network_fs``) lets it through with a logged warning.
    ``mountinfo`` defaults to this process's table; without one nothing is refused.
    """
    real = os.path.realpath(os.fspath(path))
    if mountinfo is None:
        mountinfo = read_mountinfo()
        if mountinfo is None:
            log.debug("no %s: cannot tell the filesystem of %s", MOUNTINFO, real)
            return
    mount = network_mount(real, mountinfo)
    if mount is None:
        return
    if force:
        log.warning(
            "store %s is on a %s filesystem (%s at %s); opening it anyway (allow_network_fs=True): "
            "only one process on one machine may use it",
            real,
            mount.fs_type,
            mount.source,
            mount.mount_point,
        )
        return
    raise UnsafeFilesystemError(real, mount.fs_type, mount.mount_point, mount.source)

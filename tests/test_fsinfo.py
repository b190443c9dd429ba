"""Network filesystem refusal: the pure decision on synthetic mountinfo tables, and this system."""

from __future__ import annotations

import logging
import os

import pytest

import castore
from castore.storage import fsinfo

# A container's table: overlay root, tmpfs /tmp, an ext4 data disk, an NFS home with a
# local scratch disk mounted inside it, SMB and sshfs shares, a mount point with a space.
MOUNTINFO = "\n".join(
    [
        "22 1 0:21 / / rw,relatime master:1 - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w",
        "23 22 0:22 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw",
        "24 22 0:23 / /tmp rw,nosuid,nodev shared:13 - tmpfs tmpfs rw,size=1024k",
        "25 22 8:1 / /data rw,noatime shared:14 - ext4 /dev/sda1 rw,errors=remount-ro",
        "26 22 0:50 / /home rw,relatime shared:15 - nfs4 fileserver:/export/home rw,vers=4.2,hard",
        "27 26 8:17 / /home/scratch rw,relatime shared:16 - xfs /dev/sdb1 rw,attr2",
        "28 22 0:51 / /mnt/win rw,relatime - cifs //nas/share rw,vers=3.1.1",
        "29 22 0:52 / /mnt/remote rw,nosuid,nodev,relatime - fuse.sshfs user@host:/srv rw,user_id=0",
        r"30 22 0:53 / /mnt/my\040share rw,relatime - nfs nas:/vol/my\040share rw,vers=3",
        "31 22 0:54 / /mnt/stack rw,relatime - ext4 /dev/sdc1 rw",
        "32 31 0:55 / /mnt/stack rw,relatime - nfs nas:/stack rw",
        "33 22 0:56 / /mnt/unstack rw,relatime - nfs nas:/unstack rw",
        "34 33 0:57 / /mnt/unstack rw,relatime - tmpfs tmpfs rw",
        "a line that is not a mountinfo line",
        "",
    ]
)


@pytest.mark.parametrize(
    "path, fs_type",
    [
        ("/home", "nfs4"),
        ("/home/alice/run/store", "nfs4"),
        ("/home/scratchy/store", "nfs4"),  # a mount point is a whole path segment, not a prefix
        ("/mnt/win/ckpt", "cifs"),
        ("/mnt/remote/ckpt", "fuse.sshfs"),
        ("/mnt/my share/ckpt", "nfs"),  # \040 in the table is a space
        ("/mnt/stack/ckpt", "nfs"),  # of two mounts on one point, the later one is on top
    ],
)
def test_a_path_on_a_network_mount_is_found(path, fs_type):
    mount = fsinfo.network_mount(path, MOUNTINFO)
    assert mount is not None and mount.fs_type == fs_type


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/var/lib/ckpt",  # overlay root
        "/tmp/ckpt",  # tmpfs
        "/data/runs/ckpt",  # ext4
        "/home/scratch/ckpt",  # a local disk mounted inside the NFS home
        "/home/scratch",
        "/mnt/my",  # not under "/mnt/my share"
        "/mnt/myXshare/ckpt",
        "/mnt/unstack/ckpt",  # tmpfs mounted over an NFS mount
    ],
)
def test_a_path_on_a_local_mount_is_allowed(path):
    assert fsinfo.network_mount(path, MOUNTINFO) is None


def test_the_parser_reads_fields_and_unescapes_them():
    mounts = {m.mount_point: m for m in fsinfo.parse_mountinfo(MOUNTINFO)}
    assert mounts["/mnt/my share"] == fsinfo.Mount("/mnt/my share", "nfs", "nas:/vol/my share")
    assert mounts["/home"].source == "fileserver:/export/home"
    assert len(fsinfo.parse_mountinfo(MOUNTINFO)) == 13  # the malformed lines are skipped
    tab = fsinfo.parse_mountinfo(r"1 0 0:1 / /a\011b\134c rw - nfs s rw")
    assert tab[0].mount_point == "/a\tb\\c"
    no_optional = fsinfo.parse_mountinfo("1 0 0:1 / /x rw - smb3 //h/s rw")  # no optional fields
    assert no_optional == [fsinfo.Mount("/x", "smb3", "//h/s")]


@pytest.mark.parametrize(
    "fs_type",
    ["nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "fuse.sshfs", "fuse.s3fs", "fuse.glusterfs", "lustre"],
)
def test_network_types(fs_type):
    assert fsinfo.is_network_fs(fs_type)


@pytest.mark.parametrize(
    "fs_type", ["ext4", "xfs", "btrfs", "zfs", "tmpfs", "overlay", "virtiofs", "fuse", "fuse.fuse-overlayfs", "fuseblk"]
)
def test_local_types(fs_type):
    assert not fsinfo.is_network_fs(fs_type)


def test_a_store_on_nfs_is_refused_with_what_to_do():
    with pytest.raises(castore.UnsafeFilesystemError) as raised:
        fsinfo.check_local_filesystem("/home/alice/store", mountinfo=MOUNTINFO)
    error = raised.value
    assert isinstance(error, castore.CastoreError)
    assert (error.path, error.fs_type, error.mount_point) == ("/home/alice/store", "nfs4", "/home")
    message = str(error)
    assert "nfs4" in message and "/home/alice/store" in message
    assert "local filesystem" in message and "allow_network_fs=True" in message


def test_force_allows_a_network_mount_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="castore.fsinfo"):
        fsinfo.check_local_filesystem("/mnt/win/store", force=True, mountinfo=MOUNTINFO)
    assert "cifs" in caplog.text and "allow_network_fs" in caplog.text


def test_local_paths_pass_the_check():
    fsinfo.check_local_filesystem("/home/scratch/store", mountinfo=MOUNTINFO)
    fsinfo.check_local_filesystem("/data/store", mountinfo=MOUNTINFO)


def test_symlinks_are_resolved_before_the_lookup(tmp_path):
    # the link's own path is local in this table; the directory it points to is on NFS
    table = f"1 0 0:1 / / rw - ext4 /dev/sda1 rw\n2 1 0:2 / {tmp_path}/nfs rw - nfs4 nas:/x rw\n"
    (tmp_path / "nfs").mkdir()
    os.symlink(tmp_path / "nfs", tmp_path / "link")
    real = os.path.realpath(tmp_path)
    if real != str(tmp_path):  # tmp_path itself is behind a symlink: the table must name real paths
        table = table.replace(str(tmp_path), real)
    with pytest.raises(castore.UnsafeFilesystemError):
        fsinfo.check_local_filesystem(tmp_path / "link" / "store", mountinfo=table)


def test_this_systems_tmp_path_is_allowed(tmp_path):
    fsinfo.check_local_filesystem(tmp_path / "not-yet-created", force=False)
    table = fsinfo.read_mountinfo()
    if table is None:
        pytest.skip("no /proc/self/mountinfo here")
    mount = fsinfo.mount_of(os.path.realpath(tmp_path), fsinfo.parse_mountinfo(table))
    assert mount is not None and not fsinfo.is_network_fs(mount.fs_type)


def test_store_and_checkpoint_refuse_a_network_directory_before_touching_it(tmp_path, monkeypatch):
    """The wiring: a Store on a directory the mount table puts on NFS is refused, unforced."""
    real = os.path.realpath(tmp_path)
    table = tmp_path / "mountinfo"
    table.write_text(f"22 1 0:21 / / rw - ext4 /dev/sda1 rw\n26 22 0:50 / {real} rw - nfs4 srv:/x rw\n")
    monkeypatch.setattr(fsinfo, "MOUNTINFO", str(table))
    with pytest.raises(castore.UnsafeFilesystemError, match="allow_network_fs=True"):
        castore.Store(tmp_path / "store")
    with pytest.raises(castore.UnsafeFilesystemError):
        castore.Checkpoint(tmp_path / "store")
    assert not (tmp_path / "store").exists()
    with castore.Store(tmp_path / "store", allow_network_fs=True) as store:
        store.save(1, {"x": 1})
    with castore.Checkpoint(tmp_path / "store", allow_network_fs=True) as cp:
        assert cp.latest() == 1


def test_the_cli_refuses_a_network_store_unless_told(tmp_path, monkeypatch, capsys):
    from castore.tools import cli

    with castore.Store(tmp_path / "store") as store:
        store.save(3, {"x": 1})
    real = os.path.realpath(tmp_path)
    table = tmp_path / "mountinfo"
    table.write_text(f"22 1 0:21 / / rw - ext4 /dev/sda1 rw\n26 22 0:50 / {real} rw - nfs4 srv:/x rw\n")
    monkeypatch.setattr(fsinfo, "MOUNTINFO", str(table))
    assert cli.main(["steps", str(tmp_path / "store")]) == 1
    assert "allow_network_fs" in capsys.readouterr().err
    assert cli.main(["--allow-network-fs", "steps", str(tmp_path / "store")]) == 0
    assert capsys.readouterr().out.split() == ["3"]

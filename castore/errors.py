"""The castore error hierarchy.

Every error castore raises on purpose derives from :class:`CastoreError`; where a builtin
fits, the error derives from it too, so ``except KeyError`` keeps working for callers that
do not know castore.  Errors carry the ids and paths a user needs to act on them.
"""

from __future__ import annotations

__all__ = [
    "BucketBusyError",
    "CastoreError",
    "ChunkCorruptError",
    "ChunkMissingError",
    "CommitTimeoutError",
    "ComponentCollisionError",
    "CorruptDataError",
    "FormatError",
    "IntegrityError",
    "LockLostError",
    "MigrationError",
    "MirrorError",
    "RemoteBucketNotFoundError",
    "RemoteError",
    "RemoteNotFoundError",
    "RemotePermissionError",
    "RemoteUnavailableError",
    "SaveError",
    "SelectionError",
    "StepConflictError",
    "StepExistsError",
    "StepNotFoundError",
    "StoreBusyError",
    "StoreLockedError",
    "StoreNotFoundError",
    "StorePermissionError",
    "TrackingError",
    "UnsafeFilesystemError",
    "UnsupportedLocationError",
    "UnsupportedValueError",
    "UsageError",
]


class CastoreError(Exception):
    """Base of every error castore raises on purpose."""


class UsageError(CastoreError, ValueError):
    """The caller asked for something castore cannot do (bad argument, bad state)."""


class UnsupportedValueError(CastoreError, TypeError):
    """A state tree holds a value castore does not store without explicit opt-in."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"at {path or '<root>'!r}: {message}")


class StepNotFoundError(CastoreError, KeyError):
    """The requested step (or component of a step) does not exist in the store."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class StoreNotFoundError(CastoreError, FileNotFoundError):
    """No store at the path, and it was not to be created (``create=False``, ``readonly=True``)
    or cannot be (a file is in the way).  Nothing was written there."""


class StorePermissionError(CastoreError, PermissionError):
    """This process may not read (or, for a writable open or a save, write) the store's
    directory or files.  The message names the path and what to do (``readonly=True`` when
    reading would work)."""


class UnsupportedLocationError(UsageError):
    """The store's location is a URL castore cannot store to (``gs://``, ``s3://``, ...).

    Attributes: ``location`` (as given) and ``scheme``.  Only local directories and
    ``memory://name`` are supported; nothing was created.
    """

    def __init__(self, location: str, scheme: str, advice: str):
        self.location, self.scheme = location, scheme
        super().__init__(f"cannot open store {location!r}: {advice}")


class StepExistsError(CastoreError, FileExistsError):
    """A save would replace a committed step without ``overwrite=True``."""


class StoreLockedError(CastoreError, BlockingIOError):
    """Another process holds the single-writer lock of the store."""

    def __init__(self, path: str, pid: int | None):
        self.path = path
        self.pid = pid
        who = f"PID {pid}" if pid else "another process"
        super().__init__(f"store {path} is locked by {who} (one writer per store); readers may still open it and load")


class StoreBusyError(CastoreError, BlockingIOError):
    """An operation needs the store to itself (compaction) but other processes have it open."""


class FormatError(CastoreError):
    """The store's on-disk format is unknown, newer than this castore, or inconsistent."""


class CorruptDataError(CastoreError):
    """Bytes read from the store do not decode as the format says (damaged or hostile)."""


class IntegrityError(CastoreError):
    """A chunk is missing or its bytes do not match its BLAKE3 id.

    Attributes name where it was needed: ``step``, ``component``, ``path`` (leaf path
    inside the component) and ``chunk_id`` (hex).
    """

    def __init__(self, what: str, *, step=None, component=None, path=None, chunk_id=None):
        self.step = step
        self.component = component
        self.path = path
        self.chunk_id = chunk_id
        where = f"step {step}, component {component!r}, leaf {path!r}, chunk {chunk_id}"
        super().__init__(f"{what} ({where}); other steps may still load")


class ChunkMissingError(IntegrityError, KeyError):
    """A manifest names a chunk (or chunk-list page) that the store does not hold."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ChunkCorruptError(IntegrityError):
    """A chunk's bytes do not hash to its id."""


class SelectionError(CastoreError, KeyError):
    """A ``keys``/``regex`` selection matched nothing or does not fit the current state."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MigrationError(CastoreError, ValueError):
    """A file or folder being imported (an elements checkpoint, an embodied replay chunk)
    cannot be read as its format says: truncated, damaged, or laid out otherwise.

    ``path`` names it.  Steps committed before the error stay; nothing of the step being
    imported is committed.
    """

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}")


class SaveError(CastoreError):
    """A save failed; the store still holds exactly the steps committed before it."""


class TrackingError(SaveError):
    """Check mode found a chunk whose bytes changed although tracking said it had not.

    Raised only with ``check_tracking``; the save commits nothing.  ``path`` is the leaf,
    ``rows`` the ``(start, stop)`` rows (first axis) of the chunk that changed unseen.
    """

    def __init__(self, path: str, chunk: int, rows: tuple[int, int], how: str):
        self.path, self.chunk, self.rows = path, chunk, rows
        super().__init__(
            f"at {path!r}: chunk {chunk} (rows {rows[0]}..{rows[1] - 1}) changed since the last save, "
            f"but {how} said it had not. Mark changed rows (TrackedArray.mark) or write through "
            "tracked[index] = value; nothing was committed"
        )


class UnsafeFilesystemError(CastoreError):
    """The store's directory is on a network filesystem (NFS, SMB, ...), where LMDB is unsafe.

    Attributes: ``path`` (the store's real path), ``fs_type`` (as the kernel names it),
    ``mount_point`` and ``source`` of the mount holding it.
    """

    def __init__(self, path: str, fs_type: str, mount_point: str, source: str = ""):
        self.path, self.fs_type, self.mount_point, self.source = path, fs_type, mount_point, source
        super().__init__(
            f"store {path} is on a {fs_type} filesystem ({source or 'mounted'} at {mount_point}): "
            "LMDB needs a local filesystem (its memory map and locks are not coherent over a "
            "network, so commits can be lost and two writers let in); put the store on a local "
            "disk, or pass allow_network_fs=True to force it if only one process on one "
            "machine will ever open it"
        )


class RemoteError(CastoreError):
    """An object-storage request failed (``castore.storage.objects``).

    Attributes: ``url`` (``s3://bucket/prefix/key``, or the store's URL when no one key is
    concerned), ``status`` (the HTTP status, when there was a reply) and ``code`` (the
    server's error code, ``SignatureDoesNotMatch``, ``NoSuchBucket``, ...).  The message
    never contains credentials.
    """

    def __init__(self, message: str, *, url: str, status: int | None = None, code: str | None = None):
        self.url, self.status, self.code = url, status, code
        super().__init__(message)


class RemoteNotFoundError(RemoteError, KeyError):
    """The object does not exist (in a bucket that does)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RemoteBucketNotFoundError(RemoteError, FileNotFoundError):
    """The bucket of an object-store URL does not exist (or this user may not see it)."""

    def __str__(self) -> str:  # FileNotFoundError would show "[Errno None]" otherwise
        return str(self.args[0]) if self.args else ""


class RemotePermissionError(RemoteError, PermissionError):
    """The server refused the credentials (unknown key, bad signature) or the request (403)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RemoteUnavailableError(RemoteError, ConnectionError):
    """The server could not be reached, or kept answering 5xx (throttling included), after
    the retries the store's :class:`~castore.storage.s3.RetryPolicy` allows."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class BucketBusyError(RemoteError, BlockingIOError):
    """A bucket lock is held by another party: an upload while bucket GC runs, or GC while
    an upload (or another GC) does.  ``holder`` names it (host, pid, a random tag)."""

    def __init__(self, message: str, *, url: str, holder: str):
        self.holder = holder
        super().__init__(message, url=url)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class LockLostError(RemoteError):
    """A bucket lock this process held expired or was removed as stale (a bucket GC ran):
    the work done under it is not made visible, and is redone under a new lock."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MirrorError(CastoreError):
    """Uploading a step to a store's mirror failed (raised once, by the next save, ``wait`` or
    ``close``); the step stays committed locally and is uploaded again by the next one."""


class ComponentCollisionError(MirrorError, ValueError):
    """Two ranks of a multi-host step saved a component under one name (``castore.mirror.multihost``).

    ``step`` is the step, ``collisions`` maps each name to the ranks that saved it.  Ranks
    must name their components disjointly (``agent/shard0``, ``replay/rank1``).
    """

    def __init__(self, message: str, *, step: int, collisions: dict[str, list[int]]):
        self.step, self.collisions = step, collisions
        super().__init__(message)


class StepConflictError(MirrorError, FileExistsError):
    """A multi-host step is committed in the bucket with other content than the parts merge to
    (a step saved again after it committed, or ranks of one attempt disagreeing).  ``step``."""

    def __init__(self, message: str, *, step: int):
        self.step = step
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CommitTimeoutError(MirrorError, TimeoutError):
    """A multi-host step did not commit in time: ``missing`` are the ranks whose part (of this
    attempt) was not in the bucket when the wait gave up."""

    def __init__(self, message: str, *, step: int, missing: list[int]):
        self.step, self.missing = step, missing
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

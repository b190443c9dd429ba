"""Key -> bytes on LMDB: environments, named databases, map growth, the writer lock.

Knows nothing of manifests or arrays.  Guarantees:

* one LMDB environment per store path per process, shared by every opener (LMDB refuses
  a second one), and never reused in a forked child;
* the LMDB map grows by itself: writes are run through :meth:`BlobStore.write`, which
  retries its function after growing the map when LMDB reports it full;
* a single writer process per store: :meth:`BlobStore.acquire_writer` takes an exclusive
  ``flock`` at once or raises :class:`StoreLockedError` naming the holder's PID.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import threading
import weakref

import lmdb

from . import fsinfo
from .errors import (
    CorruptDataError,
    FormatError,
    SaveError,
    StoreBusyError,
    StoreLockedError,
    StoreNotFoundError,
    UsageError,
)

log = logging.getLogger(__name__)

DATABASES = (b"meta", b"chunks", b"pages", b"steps", b"trash", b"journal", b"stepinfo", b"tags")
#: databases a format-1 store does not have (a read-only open sees them as empty)
LATER_DATABASES = (b"trash", b"journal", b"stepinfo", b"tags")
INITIAL_MAP_BYTES = 1 << 30
LOCK_FILE = "writer.lock"
RESERVE_SLACK = 8 << 20  # disk blocks kept allocated past the data for B-tree pages and small writes


class _SharedLock:
    """Many holders of ``shared()`` or one of ``exclusive()``: txns vs. map resizes.

    Exclusive requests take precedence: once one waits, new shared holders wait too, so a
    map resize cannot be starved by threads that keep loading.  ``shared()`` must not be
    nested in one thread.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class BlobStore:
    """An LMDB environment with the named databases of a castore store."""

    _open: dict[str, "BlobStore"] = {}
    _registry_lock = threading.Lock()

    @classmethod
    def open(cls, path: str, *, create: bool = True, readonly: bool = False,
             allow_network_fs: bool = False) -> "BlobStore":
        """The process's shared environment for ``path``; each call must be paired with close().

        Raises :class:`UnsafeFilesystemError` for a directory on a network filesystem
        (where LMDB can lose commits) unless ``allow_network_fs``.
        """
        real = os.path.realpath(path)
        with cls._registry_lock:
            existing = cls._open.get(real)
            if existing is not None and existing.pid == os.getpid():
                if existing.readonly and not readonly:
                    raise UsageError(f"store {path} is already open read-only in this process")
                existing.refs += 1
                return existing
            fsinfo.check_local_filesystem(real, force=allow_network_fs)
            store = cls(real, create=create, readonly=readonly)
            cls._open[real] = store
            return store

    def __init__(self, path: str, *, create: bool, readonly: bool):
        if not os.path.isdir(path):
            if not create or readonly:
                raise StoreNotFoundError(f"no castore store at {path}")
            os.makedirs(path, exist_ok=True)
        self.path = path
        self.readonly = readonly
        self.pid = os.getpid()
        self.refs = 1
        self._lock = _SharedLock()
        self._write_mutex = threading.RLock()
        self._writer_fd: int | None = None
        self.writer_session: object | None = None
        #: objects holding remembered chunk ids (``pinned_ids(session)``): GC must not free them
        self.pin_holders: "weakref.WeakSet" = weakref.WeakSet()
        self._open_env(INITIAL_MAP_BYTES)

    def _open_env(self, map_size: int) -> None:
        try:
            self.env = lmdb.open(
                self.path, map_size=map_size, max_dbs=len(DATABASES), subdir=True,
                readonly=self.readonly, create=not self.readonly, max_readers=256, writemap=not self.readonly,
            )
            self.dbs = {name.decode(): self._open_db(name) for name in DATABASES}
        except lmdb.Error as exc:
            raise FormatError(f"cannot open LMDB store at {self.path}: {exc}") from None
        self._data_fd = None if self.readonly else os.open(os.path.join(self.path, "data.mdb"), os.O_RDWR)

    def _open_db(self, name: bytes):
        try:
            return self.env.open_db(name, create=not self.readonly)
        except lmdb.NotFoundError:
            if self.readonly and name in LATER_DATABASES:
                return None  # a read-only open of a format-1 store: the database is empty
            raise

    def close(self) -> None:
        with self._registry_lock:
            self.refs -= 1
            if self.refs > 0:
                return
            if self._open.get(self.path) is self:
                del self._open[self.path]
        self._release_writer()
        self._close_env()

    # -- transactions ---------------------------------------------------------------------

    @contextlib.contextmanager
    def read(self):
        """A read transaction whose ``get`` returns memoryviews valid until it ends."""
        while True:
            with self._lock.shared():
                txn = self._begin(write=False)
                if txn is not None:
                    try:
                        yield txn
                    except lmdb.Error as exc:  # a damaged file: never a raw lmdb error
                        raise CorruptDataError(f"LMDB could not read {self.path}: {exc}") from exc
                    finally:
                        txn.abort()
                    return
            self._adopt_map_size()

    def write(self, fn, *args):
        """Run ``fn(txn, *args)`` in a write transaction and commit; returns its result.

        ``fn`` may be run more than once: when the map is full the transaction is aborted,
        the map grown and ``fn`` run again, so ``fn`` must only put and delete.
        """
        if self.readonly:
            raise UsageError(f"store {self.path} is open read-only")
        with self._write_mutex:
            self.reserve(0)
            resized = False
            while True:
                if resized:
                    self._adopt_map_size()
                    resized = False
                with self._lock.shared():
                    txn = self._begin(write=True)
                    if txn is None:
                        resized = True
                        continue
                    try:
                        result = fn(txn, *args)
                        txn.commit()
                        return result
                    except lmdb.MapFullError:
                        txn.abort()
                    except lmdb.Error as exc:  # e.g. no space left on the device
                        txn.abort()
                        raise SaveError(f"LMDB write to {self.path} failed, nothing committed: {exc}") from exc
                    except BaseException:
                        txn.abort()
                        raise
                self._grow_map()

    def reserve(self, nbytes: int) -> None:
        """Make room for a write transaction of about ``nbytes``: map space and disk blocks.

        The map grows ahead so a write rarely hits its limit.  The environment uses LMDB's
        writable map (one copy less per byte written), where writing to a file page the
        disk has no room for kills the process with SIGBUS; so the pages past the last
        used one are allocated on disk first (``posix_fallocate``), and a full disk
        raises :class:`SaveError` here, before anything is written.
        """
        need = 2 * nbytes + RESERVE_SLACK
        info = self.env.info()
        used = (info["last_pgno"] + 1) * self.env.stat()["psize"]
        if info["map_size"] - used < need:
            self._grow_map(used + need)
        if self._data_fd is not None:
            try:
                os.posix_fallocate(self._data_fd, used, need)
            except OSError as exc:
                raise SaveError(
                    f"no room on disk for a write of about {nbytes} bytes to {self.path}, nothing "
                    f"committed: {exc.strerror}; free space and save again"
                ) from None

    def _begin(self, *, write: bool):
        """A transaction, or None when another process grew the map (adopt, then retry)."""
        try:
            return self.env.begin(write=write, buffers=True)
        except lmdb.MapResizedError:
            return None

    def _adopt_map_size(self) -> None:
        with self._lock.exclusive():
            self.env.set_mapsize(0)

    def _grow_map(self, at_least: int = 0) -> None:
        with self._lock.exclusive():
            current = self.env.info()["map_size"]
            new = max(current * 2, at_least)
            log.info("growing LMDB map of %s from %d to %d bytes", self.path, current, new)
            try:
                self.env.set_mapsize(new)
            except lmdb.Error as exc:  # e.g. the file cannot grow (file-size limit)
                raise SaveError(f"cannot grow the map of {self.path} to {new} bytes: {exc}") from exc

    # -- the single-writer lock -----------------------------------------------------------

    def acquire_writer(self) -> None:
        """Take the store's writer lock for this process, or raise at once if held elsewhere."""
        with self._registry_lock:
            if self._writer_fd is not None:
                return
            if self.readonly:
                raise UsageError(f"store {self.path} is open read-only")
            fd = os.open(os.path.join(self.path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise StoreLockedError(self.path, int(holder) if holder.isdigit() else None) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            self._writer_fd = fd
            self.new_writer_session()
        # A writer killed inside its commit may have written the new meta page without
        # publishing it to readers; taking LMDB's write mutex recovers it, so this writer
        # starts from the true latest step.
        self.write(lambda txn: None)

    def pinned_ids(self) -> set[bytes]:
        """Chunk ids remembered by baselines of this writer session (see capture)."""
        pinned: set[bytes] = set()
        for holder in list(self.pin_holders):
            pinned.update(holder.pinned_ids(self.writer_session))
        return pinned

    def new_writer_session(self) -> None:
        """Start a new session token: chunk ids remembered under the old one may be gone.

        Ids remembered from committed saves (baselines) are trusted to name chunks still in
        the store only while the session they were recorded in lasts: from taking the
        writer lock until it is released or something frees chunks.
        """
        self.writer_session = object()

    def _release_writer(self) -> None:
        if self._writer_fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._writer_fd, 0)
            os.close(self._writer_fd)  # closing the descriptor drops the flock
            self._writer_fd = None
            self.writer_session = None

    # -- compaction -----------------------------------------------------------------------

    def compact(self) -> None:
        """Replace the data file by a copy without free pages, giving space back.

        The caller holds the writer lock.  Raises :class:`StoreBusyError` if another process
        has the store open (its map would point at the replaced file): LMDB's own lock on
        ``lock.mdb`` tells.  Crash-safe: the copy is complete and synced before an atomic
        rename replaces the old file; a kill before leaves the old file and a stale
        ``compact.tmp`` that the next compaction removes.
        """
        scratch = os.path.join(self.path, "compact.tmp")
        shutil.rmtree(scratch, ignore_errors=True)
        os.makedirs(scratch)
        self.env.copy(scratch, compact=True)
        _fsync_path(os.path.join(scratch, "data.mdb"))
        with self._write_mutex, self._lock.exclusive():  # no transaction of this process is open
            map_size = self.env.info()["map_size"]
            self._close_env()
            try:
                self._replace_data_file(scratch)
            finally:
                self._open_env(map_size)
        shutil.rmtree(scratch, ignore_errors=True)

    def _replace_data_file(self, scratch: str) -> None:
        fd = os.open(os.path.join(self.path, "lock.mdb"), os.O_RDWR)
        try:
            try:  # every process with the environment open holds a read lock on byte 0
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
            except OSError:
                raise StoreBusyError(
                    f"store {self.path} is open in another process; close its readers to compact"
                ) from None
            os.replace(os.path.join(scratch, "data.mdb"), os.path.join(self.path, "data.mdb"))
            _fsync_path(self.path)
        finally:
            os.close(fd)  # drops our fcntl lock: only after, LMDB reopens (and resets lock.mdb)

    def _close_env(self) -> None:
        if self._data_fd is not None:
            os.close(self._data_fd)
            self._data_fd = None
        self.env.close()

    def file_bytes(self) -> int:
        """Disk space the data file occupies (its size is the map size: the file is sparse)."""
        return os.stat(os.path.join(self.path, "data.mdb")).st_blocks * 512


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

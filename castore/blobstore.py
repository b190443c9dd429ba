"""Key -> bytes on LMDB: environments, named databases, map growth, the writer lock.

Knows nothing of manifests or arrays.  Guarantees:

* one LMDB environment per store path per process, shared by every opener (LMDB refuses
  a second one); a forked child never uses its parent's (:class:`UsageError`), it opens
  the store again;
* opening checks that the data file holds every page LMDB's meta page claims before any
  other page is touched (a truncated file raises :class:`CorruptDataError`, where LMDB
  would die by SIGBUS or pad it with zeros), and writes only to a new store: its named
  databases are created in one transaction; those a format-1 store lacks are created by
  the writer alone (:meth:`BlobStore.ensure_databases`) (see ``datafile.py``);
* the LMDB map grows by itself: writes are run through :meth:`BlobStore.write`, which
  retries its function after growing the map when LMDB reports it full;
* a single writer process per store: :meth:`BlobStore.acquire_writer` takes an exclusive
  ``flock`` at once or within ``lock_timeout`` seconds, or raises :class:`StoreLockedError`
  naming the holder's PID; taking it frees the reader slots of killed readers.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
import weakref

import lmdb

from . import fsinfo
from .datafile import DATABASES, LATER_DATABASES, DataFile  # noqa: F401 (re-exported)
from .errors import (
    CorruptDataError,
    SaveError,
    StoreLockedError,
    StoreNotFoundError,
    UsageError,
)

log = logging.getLogger(__name__)

INITIAL_MAP_BYTES = 1 << 30
LOCK_FILE = "writer.lock"
RESERVE_SLACK = 8 << 20  # disk blocks kept allocated past the data for B-tree pages and small writes
LOCK_POLL_SECONDS = 0.05  # how often a writer waiting for the lock tries again


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

    def is_idle(self) -> bool:
        """No holder: a snapshot, exact only where no other thread runs (a forked child)."""
        return self._shared == 0 and not self._exclusive


class BlobStore(DataFile):
    """An LMDB environment with the named databases of a castore store."""

    _open: dict[str, "BlobStore"] = {}
    _registry_lock = threading.Lock()

    @classmethod
    def open(cls, path: str, *, create: bool = True, readonly: bool = False,
             allow_network_fs: bool = False, lock_timeout: float | None = None) -> "BlobStore":
        """The process's shared environment for ``path``; each call must be paired with close().

        ``lock_timeout`` is how long :meth:`acquire_writer` waits for another writer process
        (None or 0: not at all); openers in one process share it, the last one given wins.
        A read-only open of a store this process may not write (``lock.mdb`` or the directory
        not writable, a read-only filesystem) reads without LMDB's lock file and logs a
        warning: such a reader holds no reader slot, so a writer could reuse pages under it;
        it is only safe while nothing writes the store.

        Raises :class:`UnsafeFilesystemError` for a directory on a network filesystem
        (where LMDB can lose commits) unless ``allow_network_fs``; :class:`StoreNotFoundError`;
        :class:`CorruptDataError` for a truncated or damaged data file; :class:`FormatError`
        for one that is no castore store; :class:`UsageError` for missing permissions and in
        a forked child whose parent was using the store in another thread.
        """
        lock_timeout = _check_timeout(lock_timeout)
        real = os.path.realpath(path)
        with cls._registry_lock:
            existing = cls._open.get(real)
            if existing is not None and existing.pid != os.getpid():
                existing._let_go_inherited()  # a forked child: the parent's environment is not ours
                del cls._open[real]
                existing = None
            if existing is not None:
                if existing.readonly and not readonly:
                    raise UsageError(f"store {path} is already open read-only in this process")
                existing.refs += 1
                if lock_timeout is not None:
                    existing.lock_timeout = lock_timeout
                return existing
            fsinfo.check_local_filesystem(real, force=allow_network_fs)
            store = cls(real, create=create, readonly=readonly, lock_timeout=lock_timeout)
            cls._open[real] = store
            return store

    def __init__(self, path: str, *, create: bool, readonly: bool, lock_timeout: float | None = None):
        if not os.path.isdir(path):
            if not create or readonly:
                raise StoreNotFoundError(f"no castore store at {path}")
            os.makedirs(path, exist_ok=True)
        self.path = path
        self.readonly = readonly
        self.lock_timeout = _check_timeout(lock_timeout)
        #: False for a read-only open without permission to write LMDB's lock file (see open())
        self.has_reader_lock = True
        self.pid = os.getpid()
        self.refs = 1
        self._lock = _SharedLock()
        self._write_mutex = threading.RLock()
        self._writer_mutex = threading.Lock()  # one thread of this process takes the writer lock
        self._writer_fd: int | None = None
        self._data_fd: int | None = None
        self.env = None
        self.writer_session: object | None = None
        #: objects holding remembered chunk ids (``pinned_ids(session)``): GC must not free them
        self.pin_holders: "weakref.WeakSet" = weakref.WeakSet()
        self._open_env(INITIAL_MAP_BYTES)

    def close(self) -> None:
        if self.pid != os.getpid():  # a forked child closing what its parent opened
            with self._registry_lock:
                if self._open.get(self.path) is self:
                    del self._open[self.path]
            with contextlib.suppress(UsageError):
                self._let_go_inherited()
            return
        with self._registry_lock:
            self.refs -= 1
            if self.refs > 0:
                return
            if self._open.get(self.path) is self:
                del self._open[self.path]
        self._release_writer()
        self._close_env()

    # -- fork() ---------------------------------------------------------------------------

    def _check_process(self) -> None:
        if self.pid != os.getpid():
            raise UsageError(f"store {self.path} was opened in another process (before fork()); "
                             "open it again in the child")

    def _drop_inherited_fds(self) -> None:
        """In a forked child: close our copies of the parent's descriptors.  The parent keeps
        its writer lock (a flock belongs to the open file, which the parent still has), but a
        child living on after the parent must not hold it."""
        for fd in (self._writer_fd, self._data_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._writer_fd = self._data_fd = None
        self.writer_session = None

    def _let_go_inherited(self) -> None:
        """In a forked child: close the parent's environment as far as this process goes.

        Safe only if no transaction of the parent was open at the fork: closing one marks
        its reader slot, shared with the parent, as free, and writers would then reuse
        pages under the parent's reader.  Raises :class:`UsageError` otherwise.
        """
        self._drop_inherited_fds()
        if self.env is None:
            return
        if not self._lock.is_idle():
            raise UsageError(
                f"store {self.path} was in use by another thread when this process forked, so the "
                "child cannot let go of the parent's LMDB environment safely; fork while no thread "
                "uses the store, or start the child with the 'spawn' method")
        self.env.close()  # aborts nothing (no transaction); LMDB frees only this process's slots
        self.env = None

    # -- transactions ---------------------------------------------------------------------

    @contextlib.contextmanager
    def read(self):
        """A read transaction whose ``get`` returns memoryviews valid until it ends."""
        self._check_process()
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
        self._check_process()
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

    def reserve(self, nbytes: int, *, grow: bool = True) -> None:
        """Make room for a write transaction of about ``nbytes``: map space and disk blocks.

        The map grows ahead so a write rarely hits its limit (not with ``grow=False``: then
        only the part of ``nbytes`` the map holds is allocated).  The environment uses LMDB's
        writable map (one copy less per byte written), where writing to a file page the
        disk has no room for kills the process with SIGBUS; so the pages past the last
        used one are allocated on disk first (``posix_fallocate``), and a full disk
        raises :class:`SaveError` here, before anything is written.
        """
        self._check_process()
        need = 2 * nbytes + RESERVE_SLACK
        info = self.env.info()
        used = (info["last_pgno"] + 1) * self.env.stat()["psize"]
        if info["map_size"] - used < need:
            if grow:
                self._grow_map(used + need)
            else:
                need = info["map_size"] - used
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

    def acquire_writer(self, timeout: float | None = None) -> None:
        """Take the store's writer lock for this process (a no-op if it has it).

        Waits up to ``timeout`` seconds for another writer process to let go (None: the
        ``lock_timeout`` given to :meth:`open`, by default not at all; 0: not at all), then
        raises :class:`StoreLockedError` naming the holder's PID.  Taking the lock also
        frees the reader slots of killed readers and creates the databases an older store
        lacks (:meth:`ensure_databases`).
        """
        self._check_process()
        if self.readonly:
            raise UsageError(f"store {self.path} is open read-only")
        timeout = self.lock_timeout if timeout is None else _check_timeout(timeout)
        with self._writer_mutex:  # held until the writer is ready: another thread must not write first
            if self._writer_fd is not None:
                return
            fd = self._lock_writer_file(timeout or 0.0)
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            self._writer_fd = fd
            self.new_writer_session()
            self.clear_stale_readers()
            # A writer killed inside its commit may have written the new meta page without
            # publishing it to readers; taking LMDB's write mutex recovers it, so this writer
            # starts from the true latest step.
            self.write(lambda txn: None)
            self.ensure_databases()

    def _lock_writer_file(self, timeout: float) -> int:
        """An open ``writer.lock`` holding our exclusive flock, polled for up to ``timeout``."""
        fd = os.open(os.path.join(self.path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    time.sleep(min(LOCK_POLL_SECONDS, left))
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        error = StoreLockedError(self.path, int(holder) if holder.isdigit() else None)
        if timeout:
            error.args = (f"{error.args[0]}; gave up after waiting {timeout:g} s",)
        raise error

    def clear_stale_readers(self) -> int:
        """Free the reader slots of processes that died inside a read transaction; how many.

        A stale slot pins the pages of the snapshot it read, so LMDB cannot reuse them and
        the file grows.  :meth:`acquire_writer` calls it; calling it again before big writes
        (GC, compaction) catches readers killed since.
        """
        self._check_process()
        if not self.has_reader_lock:
            return 0
        cleared = self.env.reader_check()
        if cleared:
            log.info("store %s: freed %d reader slots of killed processes", self.path, cleared)
        return cleared

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

def _check_timeout(timeout):
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout < float("inf"):
        raise UsageError(f"lock_timeout must be None or seconds >= 0, got {timeout!r}")
    return float(timeout)


def _after_fork_in_child() -> None:
    # A thread of the parent may have held the registry lock; it does not exist here.
    BlobStore._registry_lock = threading.Lock()
    for store in BlobStore._open.values():
        store._drop_inherited_fds()


os.register_at_fork(after_in_child=_after_fork_in_child)

"""The LMDB engine (the default): one environment per store directory per process.

Guarantees, beyond those of :class:`~castore.storage.base.Backend`:

* one LMDB environment per store path per process, shared by every opener (LMDB refuses
  a second one), in any order: a read-only open gets a :class:`ReadOnlyBackend` view, a
  writable open after read-only ones reopens the environment writable (the views read on
  through it), and the writer lock goes with the last writable opener's close; a forked
  child never uses its parent's (:class:`UsageError`), it opens the store again;
* the map grows by itself: :meth:`LmdbBackend.write` retries ``fn`` after growing the map
  when LMDB reports it full, and another process's growth is adopted;
* the environment uses LMDB's writable map (one copy less per byte written), where
  writing to a file page the disk has no room for kills the process with SIGBUS; so
  :meth:`LmdbBackend.reserve` allocates the pages past the last used one on disk first
  (``posix_fallocate``), and a full disk raises :class:`SaveError` before anything is written;
* taking the writer lock frees the reader slots of killed readers and recovers a commit a
  killed writer wrote but did not publish.

Past ~400 lines on purpose: the locking that keeps map resizes, snapshots, writes and
fork() apart is one argument, and reads best in one file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading

import lmdb

from ..errors import CorruptDataError, SaveError, UsageError
from ..format.schema import Table
from . import fsinfo
from .base import ReadOnlyBackend
from .lmdb_file import LmdbFile, prepare_directory
from .lmdb_txn import LmdbTxn, SharedLock
from .lock import WriterLock, check_timeout

log = logging.getLogger("castore.storage")

INITIAL_MAP_BYTES = 1 << 30
RESERVE_SLACK = 8 << 20  # disk blocks kept allocated past the data for B-tree pages and small writes


class LmdbBackend:
    """An LMDB environment holding the tables of one store (see the module docstring)."""

    _open: dict[str, LmdbBackend] = {}
    _registry_lock = threading.Lock()

    @classmethod
    def open(
        cls,
        path: str,
        *,
        create: bool = True,
        readonly: bool = False,
        allow_network_fs: bool = False,
        lock_timeout: float | None = None,
    ) -> LmdbBackend | ReadOnlyBackend:
        """The process's shared environment for ``path``; each call must be paired with close().

        ``lock_timeout`` is how long :meth:`acquire_writer` waits for another writer process
        (None or 0: not at all); openers in one process share it, the last one given wins.
        A read-only open returns a :class:`ReadOnlyBackend` view of the shared environment
        (so the views stay read-only when a writable open, in any order, makes it writable).
        A read-only open of a store this process may not write (``lock.mdb`` or the directory
        not writable, a read-only filesystem) reads without LMDB's lock file and logs a
        warning: such a reader holds no reader slot, so a writer could reuse pages under it;
        it is only safe while nothing writes the store.

        Raises :class:`UnsafeFilesystemError` for a directory on a network filesystem
        (where LMDB can lose commits) unless ``allow_network_fs``; :class:`StoreNotFoundError`;
        :class:`CorruptDataError` for a truncated or damaged data file; :class:`FormatError`
        for one that is no castore store; :class:`StorePermissionError` for missing
        permissions; :class:`UsageError` in a forked child whose parent was using the store
        in another thread, and for a writable open by a thread holding a snapshot of a
        store this process has open read-only only.
        """
        lock_timeout = check_timeout(lock_timeout)
        real = os.path.realpath(path)
        with cls._registry_lock:
            existing = cls._open.get(real)
            if existing is not None and existing.pid != os.getpid():
                existing._let_go_inherited()  # a forked child: the parent's environment is not ours
                del cls._open[real]
                existing = None
            if existing is not None:
                backend = existing
            else:
                fsinfo.check_local_filesystem(real, force=allow_network_fs)
                backend = cls(real, create=create, readonly=readonly, lock_timeout=lock_timeout)
                cls._open[real] = backend
            backend.refs += 1  # held: no close of another opener ends the environment now
            if lock_timeout is not None:
                backend.lock_timeout = lock_timeout
        if readonly:
            return ReadOnlyBackend(backend)
        if backend.readonly:
            # outside the registry lock: the reopen waits for this store's snapshots in
            # other threads, and opens of other stores must not wait with it
            try:
                backend._become_writable()
            except BaseException:
                backend.close(view=True)  # the ref taken above, as a read-only one
                raise
        with cls._registry_lock:
            backend.writable_refs += 1
        return backend

    def __init__(self, path: str, *, create: bool, readonly: bool, lock_timeout: float | None = None):
        create = create and not readonly
        prepare_directory(path, create=create, readonly=readonly)  # a path without a store is left alone unless create
        self.path = path
        self.readonly = readonly
        self.lock_timeout = check_timeout(lock_timeout)
        self.pid = os.getpid()
        self.refs = 0  #: opens not yet closed (read-only views among them)
        self.writable_refs = 0  #: writable opens not yet closed: the writer lock goes with the last
        self._lock = SharedLock()
        self._write_mutex = threading.RLock()
        self._writer_mutex = threading.Lock()  # one thread of this process takes the writer lock
        self._writer = WriterLock(path)
        self._reading = threading.local()  # .depth: read() snapshots this thread holds
        self._writing = threading.local()  # .active: this thread is inside write(fn)
        self._file = LmdbFile(path, readonly=readonly, create=create)
        self._allocated_to: tuple = (None, 0, 0)  # (data file inode, map size, end) of the last posix_fallocate
        self._file.open(INITIAL_MAP_BYTES, writer=False, reserve=self._reserve)

    def close(self, *, view: bool = False) -> None:
        """Pair of an open (``view``: of a read-only one, which :class:`ReadOnlyBackend` says).

        The last writable opener's close releases the writer lock, even while read-only
        views stay open (they read on); the last close of all closes the environment.
        """
        if self.pid != os.getpid():  # a forked child closing what its parent opened
            with self._registry_lock:
                if self._open.get(self.path) is self:
                    del self._open[self.path]
            with contextlib.suppress(UsageError):
                self._let_go_inherited()
            return
        with self._registry_lock:
            self.refs -= 1
            if not view:
                self.writable_refs -= 1
            if self.refs > 0:
                if not self.writable_refs:  # only read-only views are left: no thread may be
                    self._writer.release()  # taking the lock (a Store's close ends its saves first)
                return
            if self._open.get(self.path) is self:
                del self._open[self.path]
        self._writer.release()
        self._file.close()

    def _become_writable(self) -> None:
        """Reopen an environment opened read-only as a writable one (a writable open came).

        Waits until no transaction of this process is open (LMDB keeps one environment per
        path per process, so the read-only one is closed first); on failure (no permission
        to write) the read-only one is opened again and the error raised.
        """
        self._check_process()
        if self._snapshots():
            raise UsageError(
                f"store {self.path} is open read-only in this process and this thread holds a read "
                "snapshot of it; end the snapshot before opening the store writable"
            )
        with self._write_mutex, self._lock.exclusive():
            if not self.readonly:  # another thread's writable open reopened it meanwhile
                return
            map_size = self._file.map_size()
            old, self._file = self._file, LmdbFile(self.path, readonly=False, create=False)
            old.close()
            try:
                self._file.open(map_size, writer=False, reserve=self._reserve)
            except BaseException:
                self._file = old
                old.open(map_size, writer=False, reserve=self._reserve)
                raise
            self.readonly = False

    @property
    def has_reader_lock(self) -> bool:
        """False for a read-only open without permission to write LMDB's lock file."""
        return self._file.has_reader_lock

    # -- fork() ---------------------------------------------------------------------------

    def _check_process(self) -> None:
        if self.pid != os.getpid():
            raise UsageError(
                f"store {self.path} was opened in another process (before fork()); open it again in the child"
            )

    def drop_inherited_fds(self) -> None:
        """In a forked child: close our copies of the parent's descriptors.  The parent keeps
        its writer lock (a flock belongs to the open file, which the parent still has), but a
        child living on after the parent must not hold it."""
        self._writer.drop_inherited()
        self._file.drop_inherited_fd()

    def _let_go_inherited(self) -> None:
        """In a forked child: close the parent's environment as far as this process goes.

        Safe only if no transaction of the parent was open at the fork: closing one marks
        its reader slot, shared with the parent, as free, and writers would then reuse
        pages under the parent's reader.  Raises :class:`UsageError` otherwise.
        """
        self.drop_inherited_fds()
        if not self._file.is_open:
            return
        if not self._lock.is_idle():
            raise UsageError(
                f"store {self.path} was in use by another thread when this process forked, so the "
                "child cannot let go of the parent's LMDB environment safely; fork while no thread "
                "uses the store, or start the child with the 'spawn' method"
            )
        self._file.close_env()  # aborts nothing (no transaction); LMDB frees only this process's slots

    # -- transactions ---------------------------------------------------------------------

    @contextlib.contextmanager
    def read(self):
        """A snapshot whose ``get`` returns memoryviews valid until it ends.

        A thread's snapshots may nest and end in any order: the first takes the shared
        lock that keeps map resizes away, the last one to end releases it.
        """
        self._check_process()
        txn = self._begin_snapshot()
        try:
            yield LmdbTxn(txn, self._file.dbs, txn.id())
        except lmdb.Error as exc:  # a damaged file: never a raw lmdb error
            raise CorruptDataError(f"LMDB could not read {self.path}: {exc}") from exc
        finally:
            txn.abort()
            self._end_snapshot()

    def _snapshots(self) -> int:
        return getattr(self._reading, "depth", 0)

    def _begin_snapshot(self):
        """A read transaction, this thread's share of the resize lock held (see read())."""
        if self._snapshots():  # the map cannot be adopted while another snapshot is open
            txn = self._begin(write=False)
            if txn is None:
                raise UsageError(
                    f"another process grew {self.path} while this thread held a snapshot; end it and read again"
                )
            self._reading.depth += 1
            return txn
        while True:
            self._lock.acquire_shared()
            txn = self._begin(write=False)
            if txn is not None:
                self._reading.depth = 1
                return txn
            self._lock.release_shared()
            self._adopt_map_size()

    def _end_snapshot(self) -> None:
        self._reading.depth -= 1
        if not self._reading.depth:
            self._lock.release_shared()

    def write(self, fn, *args):
        """Run ``fn(txn, *args)`` in a write transaction and commit; returns its result.

        ``fn`` may be run more than once: when the map is full the transaction is aborted,
        the map grown and ``fn`` run again.
        """
        self._check_process()
        if self.readonly:
            raise UsageError(f"store {self.path} is open read-only")
        if getattr(self._writing, "active", False):
            raise UsageError("write() inside write(): use the transaction fn was given")
        with self._write_mutex:
            self._writing.active = True
            try:
                return self._write(fn, args)
            finally:
                self._writing.active = False

    def _write(self, fn, args):
        self._reserve(0)
        resized = False
        while True:
            if resized:
                self._adopt_map_size()
                resized = False
            # a thread holding a snapshot holds the shared lock already (it must not nest)
            held = self._snapshots()
            with contextlib.nullcontext() if held else self._lock.shared():
                txn = self._begin(write=True)
                if txn is None:
                    resized = True
                    continue
                try:
                    result = fn(LmdbTxn(txn, self._file.dbs, txn.id()), *args)
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

    def generation(self) -> int:
        self._check_process()
        return self._file.env.info()["last_txnid"]

    @contextlib.contextmanager
    def exclusive_writes(self):
        with self._write_mutex:
            yield

    def has_table(self, table: Table) -> bool:
        return self._file.dbs.get(table) is not None

    def reserve(self, nbytes: int) -> None:
        self._reserve(nbytes)

    def _reserve(self, nbytes: int, *, grow: bool = True) -> None:
        """Map space and disk blocks for a write of about ``nbytes`` (see the module docstring).

        The map grows ahead so a write rarely hits its limit (not with ``grow=False``: then
        only the part of ``nbytes`` the map holds is allocated).
        """
        self._check_process()
        need = 2 * nbytes + RESERVE_SLACK
        used, map_size = self._file.used_bytes(), self._file.map_size()
        if map_size - used < need:
            if grow:
                self._grow_map(used + need)
            else:
                need = map_size - used
        fd = self._file.data_fd
        if fd is not None and not self._allocated(fd, used + need):
            try:
                os.posix_fallocate(fd, used, need)
            except OSError as exc:
                raise SaveError(
                    f"no room on disk for a write of about {nbytes} bytes to {self.path}, nothing "
                    f"committed: {exc.strerror}; free space and save again"
                ) from None
            self._allocated_to = (os.fstat(fd).st_ino, self._file.map_size(), used + need)

    def _allocated(self, fd: int, stop: int) -> bool:
        """True if this process allocated the file's blocks up to ``stop`` since the map
        last changed size, and the file still reaches there.

        posix_fallocate walks the file's extents even where every block is allocated
        (~0.2 ms on a store that grew for a while: the largest cost of a small save that
        grew with it), so a range allocated before is not allocated again; a map resize
        (LMDB may truncate a writable map's file to the map) or a shorter file forgets it.
        """
        stat = os.fstat(fd)  # a compaction replaces the file: a new inode (the fd number may repeat)
        inode, map_size, allocated = self._allocated_to
        return (inode, map_size) == (stat.st_ino, self._file.map_size()) and stop <= allocated <= stat.st_size

    def _begin(self, *, write: bool):
        """A transaction, or None when another process grew the map (adopt, then retry)."""
        try:
            return self._file.env.begin(write=write, buffers=True)
        except lmdb.MapResizedError:
            return None

    def _refuse_resize_inside_a_snapshot(self) -> None:
        """A resize waits for every snapshot of this process: this thread's own would never end."""
        if self._snapshots():
            raise UsageError(
                f"the LMDB map of {self.path} must grow for this write, which cannot happen while this "
                "thread holds a read() snapshot; end the snapshot, then write"
            )

    def _adopt_map_size(self) -> None:
        self._refuse_resize_inside_a_snapshot()
        with self._lock.exclusive():
            self._file.env.set_mapsize(0)

    def _grow_map(self, at_least: int = 0) -> None:
        self._refuse_resize_inside_a_snapshot()
        with self._lock.exclusive():
            current = self._file.map_size()
            new = max(current * 2, at_least)
            log.info("growing LMDB map of %s from %d to %d bytes", self.path, current, new)
            try:
                self._file.env.set_mapsize(new)
            except lmdb.Error as exc:  # e.g. the file cannot grow (file-size limit)
                raise SaveError(f"cannot grow the map of {self.path} to {new} bytes: {exc}") from exc

    # -- the single-writer lock -----------------------------------------------------------

    def acquire_writer(self, timeout: float | None = None) -> bool:
        self._check_process()
        if self.readonly:
            raise UsageError(f"store {self.path} is open read-only")
        timeout = self.lock_timeout if timeout is None else check_timeout(timeout)
        with self._writer_mutex:  # held until the writer is ready: another thread must not write first
            if self._writer.held:
                return False
            self._writer.acquire(timeout or 0.0)
            self.clear_stale_readers()
            # A writer killed inside its commit may have written the new meta page without
            # publishing it to readers; taking LMDB's write mutex recovers it, so this writer
            # starts from the true latest step.
            self.write(lambda txn: None)
            self._create_missing_tables()
            return True

    def is_writer(self) -> bool:
        return self._writer.held

    def _create_missing_tables(self) -> None:
        """Create the tables an older store lacks (until then they read as empty).

        Waits until no transaction of this process is open, since one begun before a
        table exists cannot use it.
        """
        if self._file.has_every_table():
            return
        self._refuse_resize_inside_a_snapshot()  # reopening the tables waits for every snapshot
        self._reserve(0)
        with self._write_mutex, self._lock.exclusive():
            self._file.create_missing_tables(reserve=self._reserve)

    def clear_stale_readers(self) -> int:
        """Free the reader slots of processes that died inside a read transaction; how many.

        A stale slot pins the pages of the snapshot it read, so LMDB cannot reuse them and
        the file grows.  :meth:`acquire_writer` calls it; calling it again before big writes
        (GC, compaction) catches readers killed since.
        """
        self._check_process()
        if not self._file.has_reader_lock:
            return 0
        cleared = self._file.env.reader_check()
        if cleared:
            log.info("store %s: freed %d reader slots of killed processes", self.path, cleared)
        return cleared

    # -- compaction and sizes ------------------------------------------------------------

    def compact(self) -> None:
        """Replace the data file by a copy without free pages, giving space back.

        Crash-safe: the copy is complete and synced before an atomic rename replaces the
        old file; a kill before leaves the old file and a stale ``compact.tmp`` that the
        next compaction removes.
        """
        self._check_process()
        scratch = os.path.join(self.path, "compact.tmp")
        self._file.copy_compacted(scratch)
        with self._write_mutex, self._lock.exclusive():  # no transaction of this process is open
            map_size = self._file.map_size()
            self._file.close()
            try:
                self._file.replace_data_file(scratch)
            finally:
                self._file.open(map_size, writer=self._writer.held, reserve=self._reserve)
        shutil.rmtree(scratch, ignore_errors=True)

    def file_bytes(self) -> int:
        return self._file.file_bytes()

    def map_size(self) -> int:
        """The LMDB map size (for inspection: it grows by itself)."""
        return self._file.map_size()

    def reader_pids(self) -> set[int]:
        """PIDs holding LMDB reader slots (for inspection; ``mdb_reader_list``)."""
        self._check_process()
        lines = self._file.env.readers().splitlines()[1:]  # a header, then "pid thread txnid"
        return {int(line.split()[0]) for line in lines if line.split()}

    def last_page(self) -> int:
        """The last page LMDB uses (for inspection: the file's high-water mark)."""
        return self._file.env.info()["last_pgno"]


def _after_fork_in_child() -> None:
    # A thread of the parent may have held the registry lock; it does not exist here.
    LmdbBackend._registry_lock = threading.Lock()
    for backend in LmdbBackend._open.values():
        backend.drop_inherited_fds()


os.register_at_fork(after_in_child=_after_fork_in_child)

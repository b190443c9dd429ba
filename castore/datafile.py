"""The LMDB data file of a store: opening it safely, its databases, compaction.

A mixin of :class:`~castore.blobstore.BlobStore` (split out to keep each module readable;
it uses the blob store's locks and adds no state).  Guarantees: a truncated data file is
refused before LMDB touches a missing page; an open writes only to a new store (its named
databases are created in one transaction) and the writer adds those an older format
lacks; compaction replaces the file atomically and only when no other process has it open.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil

import lmdb

from .errors import CorruptDataError, FormatError, StoreBusyError, UsageError

log = logging.getLogger("castore.blobstore")

DATABASES = (b"meta", b"chunks", b"pages", b"steps", b"trash", b"journal", b"stepinfo", b"tags")
#: databases a format-1 store does not have (a read-only open sees them as empty)
LATER_DATABASES = (b"trash", b"journal", b"stepinfo", b"tags")


class DataFile:
    """Opening, checking and compacting the data file (mixed into BlobStore)."""

    # -- opening --------------------------------------------------------------------------

    def _open_env(self, map_size: int) -> None:
        """Open LMDB and the named databases; no transaction of this process may be open."""
        self.env = self._open_lmdb(map_size)
        try:
            if not self.readonly:
                self._data_fd = os.open(os.path.join(self.path, "data.mdb"), os.O_RDWR)
            self.dbs = self._open_dbs()
        except (lmdb.CorruptedError, lmdb.PageNotFoundError) as exc:
            self._close_env()
            raise CorruptDataError(f"LMDB found {self.path} damaged: {exc}; restore it from a backup") from None
        except lmdb.Error as exc:
            self._close_env()
            raise FormatError(f"cannot open LMDB store at {self.path}: {exc}") from None
        except BaseException:
            self._close_env()
            raise

    def _open_lmdb(self, map_size: int):
        """The environment, opened after checking the data file's size (see _check_data_size)."""
        data = os.path.join(self.path, "data.mdb")
        if not self.readonly and os.path.exists(data) and os.path.getsize(data):
            # A writable map first grows the file to the map size, padding a truncated one with
            # zeros: look at it through a read-only environment first.
            probe = self._lmdb_open(map_size, readonly=True)
            try:
                _check_data_size(probe, data)
            finally:
                probe.close()
        env = self._lmdb_open(map_size, readonly=self.readonly)
        if self.readonly:
            try:
                _check_data_size(env, data)
            except BaseException:
                env.close()
                raise
        return env

    def _lmdb_open(self, map_size: int, *, readonly: bool):
        try:
            return lmdb.open(
                self.path, map_size=map_size, max_dbs=len(DATABASES), subdir=True, readonly=readonly,
                create=not readonly, max_readers=256, writemap=not readonly, lock=self.has_reader_lock,
            )
        except lmdb.Error as exc:
            if not _is_permission_error(exc):
                raise FormatError(f"cannot open LMDB store at {self.path}: {exc}") from None
            if not self.readonly:
                raise UsageError(f"no permission to write store {self.path} ({exc}); "
                                 "open it with readonly=True to load from it") from None
            if not self.has_reader_lock:
                raise UsageError(f"no permission to read store {self.path} ({exc})") from None
        self.has_reader_lock = False
        env = self._lmdb_open(map_size, readonly=readonly)
        log.warning(
            "store %s: no permission to write its LMDB lock file, reading without one: this reader "
            "takes no reader slot, so a writer could reuse pages under it; only safe while nothing "
            "writes the store", self.path)
        return env

    def _open_dbs(self) -> dict:
        """The named databases, None for a later one an older store lacks.

        A writable open creates them all in a new store (one transaction: all or none); the
        writer also creates the later ones (see ensure_databases); nobody else creates any,
        so an open never writes to an existing store.  No transaction of this process may
        be open (LMDB's rule for opening databases).
        """
        if self.readonly:  # without txn=: py-lmdb keeps no handle opened in a read txn of ours
            found = {name: _existing_db(self.env, name) for name in DATABASES}
            return self._checked(found)
        if self.env.stat()["entries"] == 0:  # a new store: put disk blocks under its first pages
            self.reserve(0, grow=False)
        txn = self._begin_alone(write=True)
        try:
            found = {name: _existing_db(self.env, name, txn=txn) for name in DATABASES}
            if found[b"meta"] is None:
                entries = self.env.stat()["entries"]
                if entries:
                    raise FormatError(f"{self.path} is not a castore store, or a damaged one: LMDB's "
                                      f"main database holds {entries} records but no meta database")
                fresh = True
            else:  # created by an older castore killed before the config was written
                fresh = txn.stat(found[b"meta"])["entries"] == 0
            writer = self._writer_fd is not None
            for name, db in found.items():
                if db is None and (fresh or (writer and name in LATER_DATABASES)):
                    found[name] = self.env.open_db(name, txn=txn, create=True)
            txn.commit()  # writes nothing when nothing was created
        except BaseException:
            txn.abort()
            raise
        return self._checked(found)

    def _checked(self, found: dict) -> dict:
        for name, db in found.items():
            if db is None and name not in LATER_DATABASES:
                if name == b"meta":
                    raise FormatError(f"{self.path} is not a castore store (no meta database)")
                raise FormatError(f"store {self.path} lacks its {name.decode()!r} database")
        return {name.decode(): db for name, db in found.items()}

    def ensure_databases(self) -> None:
        """Create the databases a format-1 store lacks (until then they read as empty).

        Only the writer may: :meth:`acquire_writer` calls it.  Waits until no transaction of
        this process is open, since one begun before a database exists cannot use it.
        """
        self._check_process()
        if self.readonly or all(db is not None for db in self.dbs.values()):
            return
        self.reserve(0)
        with self._write_mutex, self._lock.exclusive():
            self.dbs = self._open_dbs()

    def _begin_alone(self, *, write: bool):
        """A transaction while no other of this process is open (so the map may be adopted)."""
        while True:
            try:
                return self.env.begin(write=write, buffers=True)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)

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
        if self.env is not None:
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


def _check_data_size(env, data: str) -> None:
    """Refuse a data file shorter than the pages LMDB's meta page says are in use.

    Reads only the meta pages, before any other page is touched: reading past the end of
    the file through LMDB's map kills the process (SIGBUS).  A longer file is fine (with a
    writable map the file is sparse and as large as the map).
    """
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    have = os.path.getsize(data)
    if have < need:
        raise CorruptDataError(f"data file {data} truncated: {have} bytes, LMDB needs {need}; "
                               "restore it from a backup")


def _existing_db(env, name: bytes, txn=None):
    """The handle of database ``name``, or None if it does not exist."""
    try:
        return env.open_db(name, txn=txn, create=False)
    except lmdb.NotFoundError:
        return None


def _is_permission_error(exc: lmdb.Error) -> bool:
    # py-lmdb reports EACCES as ReadonlyError and other errno values only in the message
    return isinstance(exc, lmdb.ReadonlyError) or os.strerror(errno.EROFS) in str(exc)

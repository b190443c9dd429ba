"""The LMDB data file of one store directory: opening it safely, its tables, compaction.

Guarantees: a truncated data file is refused before LMDB touches a missing page (LMDB
would die by SIGBUS, or pad it with zeros through a writable map); an open writes only to
a new store (its tables are created in one transaction) and the writer adds the tables an
older format lacks; compaction replaces the file atomically, only when no other process
has it open.  Used by :class:`~castore.storage.lmdb_engine.LmdbBackend`, which holds the
locks; nothing here is thread-safe by itself.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
from typing import Any

import lmdb

from ..errors import CorruptDataError, FormatError, StoreBusyError, UsageError
from ..format.schema import ALL_TABLES, REQUIRED_TABLES, Table

log = logging.getLogger("castore.storage")
MAX_READERS = 256


class LmdbFile:
    """The environment of ``path`` and the handles of its tables (None: a table it lacks)."""

    def __init__(self, path: str, *, readonly: bool):
        self.path = path
        self.readonly = readonly
        #: False for a read-only open without permission to write LMDB's lock file
        self.has_reader_lock = True
        self.env: Any = None  # an lmdb.Environment while open
        self.data_fd: int | None = None  # for posix_fallocate (writable opens)
        self.allocated_to = 0  # bytes of the data file known allocated on disk, since data_fd was opened
        self.dbs: dict[Table, object | None] = {}

    # -- opening --------------------------------------------------------------------------

    def open(self, map_size: int, *, writer: bool, reserve) -> None:
        """Open LMDB and the tables; no transaction of this process may be open.

        ``reserve(0, grow=False)`` puts disk blocks under a new store's first pages;
        ``writer`` (this process holds the writer lock) lets the tables an older store
        lacks be created.
        """
        self.env = self._open_lmdb(map_size)
        try:
            if not self.readonly:
                self.data_fd = os.open(os.path.join(self.path, "data.mdb"), os.O_RDWR)
                self.allocated_to = 0
            self.dbs = self.open_tables(writer=writer, reserve=reserve)
        except (lmdb.CorruptedError, lmdb.PageNotFoundError) as exc:
            self.close()
            raise CorruptDataError(f"LMDB found {self.path} damaged: {exc}; restore it from a backup") from None
        except lmdb.Error as exc:
            self.close()
            raise FormatError(f"cannot open LMDB store at {self.path}: {exc}") from None
        except BaseException:
            self.close()
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
                self.path,
                map_size=map_size,
                max_dbs=len(ALL_TABLES),
                subdir=True,
                readonly=readonly,
                create=not readonly,
                max_readers=MAX_READERS,
                writemap=not readonly,
                lock=self.has_reader_lock,
            )
        except lmdb.Error as exc:
            if not _is_permission_error(exc):
                raise FormatError(f"cannot open LMDB store at {self.path}: {exc}") from None
            if not self.readonly:
                raise UsageError(
                    f"no permission to write store {self.path} ({exc}); open it with readonly=True to load from it"
                ) from None
            if not self.has_reader_lock:
                raise UsageError(f"no permission to read store {self.path} ({exc})") from None
        self.has_reader_lock = False
        env = self._lmdb_open(map_size, readonly=readonly)
        log.warning(
            "store %s: no permission to write its LMDB lock file, reading without one: this reader "
            "takes no reader slot, so a writer could reuse pages under it; only safe while nothing "
            "writes the store",
            self.path,
        )
        return env

    def open_tables(self, *, writer: bool, reserve) -> dict:
        """The table handles, None for a table an older store lacks.

        A writable open creates them all in a new store (one transaction: all or none); the
        writer also creates the ones an older format lacks; nobody else creates any, so an
        open never writes to an existing store.  No transaction of this process may be open
        (LMDB's rule for opening databases).
        """
        if self.readonly:  # without txn=: py-lmdb keeps no handle opened in a read txn of ours
            return self._checked({t: _existing_db(self.env, t) for t in ALL_TABLES})
        if self.env.stat()["entries"] == 0:  # a new store: put disk blocks under its first pages
            reserve(0, grow=False)
        txn = self.begin_alone(write=True)
        try:
            found = {t: _existing_db(self.env, t, txn=txn) for t in ALL_TABLES}
            if found[Table.META] is None:
                entries = self.env.stat()["entries"]
                if entries:
                    raise FormatError(
                        f"{self.path} is not a castore store, or a damaged one: LMDB's "
                        f"main database holds {entries} records but no meta database"
                    )
                fresh = True
            else:  # created by an older castore killed before the config was written
                fresh = txn.stat(found[Table.META])["entries"] == 0
            for table, db in found.items():
                if db is None and (fresh or (writer and table not in REQUIRED_TABLES)):
                    found[table] = self.env.open_db(table.value.encode(), txn=txn, create=True)
            txn.commit()  # writes nothing when nothing was created
        except BaseException:
            txn.abort()
            raise
        return self._checked(found)

    def _checked(self, found: dict) -> dict:
        for table, db in found.items():
            if db is None and table in REQUIRED_TABLES:
                if table is Table.META:
                    raise FormatError(f"{self.path} is not a castore store (no meta database)")
                raise FormatError(f"store {self.path} lacks its {table.value!r} database")
        return found

    def begin_alone(self, *, write: bool):
        """A transaction while no other of this process is open (so the map may be adopted)."""
        while True:
            try:
                return self.env.begin(write=write, buffers=True)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)

    def create_missing_tables(self, *, reserve) -> None:
        """Create the tables an older format lacks (the writer's job; see open_tables)."""
        self.dbs = self.open_tables(writer=True, reserve=reserve)

    def has_every_table(self) -> bool:
        return all(db is not None for db in self.dbs.values())

    @property
    def is_open(self) -> bool:
        return self.env is not None

    def drop_inherited_fd(self) -> None:
        """In a forked child: close our copy of the data file's descriptor."""
        if self.data_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.data_fd)
            self.data_fd = None

    def close_env(self) -> None:
        """Close the environment alone (a forked child letting go of its parent's)."""
        if self.env is not None:
            self.env.close()
            self.env = None

    def close(self) -> None:
        if self.data_fd is not None:
            os.close(self.data_fd)
            self.data_fd = None
        if self.env is not None:
            self.env.close()
            self.env = None

    # -- sizes ----------------------------------------------------------------------------

    def used_bytes(self) -> int:
        return (self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"]

    def map_size(self) -> int:
        return self.env.info()["map_size"]

    def file_bytes(self) -> int:
        """Disk space the data file occupies (its size is the map size: the file is sparse)."""
        return os.stat(os.path.join(self.path, "data.mdb")).st_blocks * 512

    # -- compaction -----------------------------------------------------------------------

    def copy_compacted(self, scratch: str) -> None:
        """Write a compacted, synced copy of the data file into directory ``scratch``."""
        shutil.rmtree(scratch, ignore_errors=True)
        os.makedirs(scratch)
        self.env.copy(scratch, compact=True)
        _fsync_path(os.path.join(scratch, "data.mdb"))

    def replace_data_file(self, scratch: str) -> None:
        """Move the copy in ``scratch`` over the data file; the environment must be closed.

        Raises :class:`StoreBusyError` if another process has the store open: every process
        with the environment open holds LMDB's read lock on byte 0 of ``lock.mdb``.
        """
        fd = os.open(os.path.join(self.path, "lock.mdb"), os.O_RDWR)
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
            except OSError:
                raise StoreBusyError(
                    f"store {self.path} is open in another process; close its readers to compact"
                ) from None
            os.replace(os.path.join(scratch, "data.mdb"), os.path.join(self.path, "data.mdb"))
            _fsync_path(self.path)
        finally:
            os.close(fd)  # drops our fcntl lock: only after, LMDB reopens (and resets lock.mdb)


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
        raise CorruptDataError(f"data file {data} truncated: {have} bytes, LMDB needs {need}; restore it from a backup")


def _existing_db(env, table: Table, txn=None):
    """The handle of ``table``'s database, or None if it does not exist."""
    try:
        return env.open_db(table.value.encode(), txn=txn, create=False)
    except lmdb.NotFoundError:
        return None


def _is_permission_error(exc: lmdb.Error) -> bool:
    # py-lmdb reports EACCES as ReadonlyError and other errno values only in the message
    return isinstance(exc, lmdb.ReadonlyError) or os.strerror(errno.EROFS) in str(exc)

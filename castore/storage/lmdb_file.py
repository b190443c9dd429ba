"""The LMDB data file of one store directory: opening it safely, its tables, compaction.

Guarantees: a path that holds no store is never written to unless the caller creates one
(:func:`prepare_directory` decides before LMDB opens anything, and someone else's LMDB
file is recognised through a read-only look first); a truncated data file is refused
before LMDB touches a missing page (LMDB would die by SIGBUS, or pad it with zeros through
a writable map); an open writes only to a new store (its tables are created in one
transaction) and the writer adds the tables an older format lacks; a missing permission
is a :class:`StorePermissionError` saying what would work; compaction replaces the file
atomically, only when no other process has it open.  Used by
:class:`~castore.storage.lmdb_engine.LmdbBackend`, which holds the locks; nothing here is
thread-safe by itself.

Just past ~400 lines: the opening checks are one sequence (directory, size, a look,
then the real open), best read top to bottom.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
from typing import Any

import lmdb

from ..errors import CorruptDataError, FormatError, StoreBusyError, StoreNotFoundError, StorePermissionError
from ..format.schema import ALL_TABLES, REQUIRED_TABLES, Table

log = logging.getLogger("castore.storage")
MAX_READERS = 256
DATA_FILE = "data.mdb"
#: errno values that mean "not allowed here" rather than "broken"
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)
#: what a user who may not read a store can do about it
READ_ADVICE = "this user needs read and execute permission on the directory and read permission on its data.mdb"


def prepare_directory(path: str, *, create: bool, readonly: bool = False) -> None:
    """Check that ``path`` can be a store's directory, making it (and its parents, as
    ``mkdir -p``) if ``create`` and it is missing; ``readonly`` only words the advice.

    Writes nothing unless ``create`` and the directory is missing.  Raises
    :class:`StoreNotFoundError` (a missing directory or data file without ``create``, a
    file in the way) and :class:`StorePermissionError`, each naming the path and what to do.
    """
    if readonly:
        again = "check the path (a read-only open creates nothing)"
    else:
        again = "check the path" + ("" if create else " (create=True makes a new store there)")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if not create:
            raise StoreNotFoundError(f"no castore store at {path}: no such directory; {again}") from None
        _make_directory(path)
        return
    except OSError as exc:
        raise _path_error(path, exc, "open") from None
    if not stat.S_ISDIR(info.st_mode):
        raise StoreNotFoundError(f"no castore store at {path}: it is a file, not a directory; pass a store's directory")
    data = os.path.join(path, DATA_FILE)
    try:
        data_info = os.stat(data)
    except FileNotFoundError:
        if not create:
            raise StoreNotFoundError(
                f"no castore store at {path}: the directory holds no {DATA_FILE}; {again}"
            ) from None
        return
    except OSError as exc:
        raise _path_error(path, exc, "open") from None
    if not stat.S_ISREG(data_info.st_mode):
        raise FormatError(f"{path} is not a castore store: its {DATA_FILE} is not a file")
    if not data_info.st_size and not create:  # a creation killed before LMDB wrote its first pages
        raise StoreNotFoundError(f"no castore store at {path}: its {DATA_FILE} is empty; {again}")


def _make_directory(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise _path_error(path, exc, "create") from None


def _path_error(path: str, exc: OSError, doing: str) -> Exception:
    """The castore error for ``exc``, raised while trying to ``doing`` the store at ``path``."""
    blocker = _first_file_on(path)
    if blocker is not None:
        return StoreNotFoundError(
            f"cannot {doing} store {path}: {blocker} is a file, not a directory; pass a directory's path"
        )
    where = exc.filename or path
    if exc.errno in _DENIED:
        if doing == "create":
            return StorePermissionError(
                f"cannot create store {path}: {exc.strerror} ({where}); choose a directory this user may write"
            )
        return StorePermissionError(f"no permission to read store {path} ({exc.strerror}); {READ_ADVICE}")
    return StoreNotFoundError(f"cannot {doing} store {path}: {exc.strerror} ({where})")


def _first_file_on(path: str) -> str | None:
    """The first ancestor of ``path`` (or ``path``) that exists and is not a directory."""
    parts = os.path.abspath(path).split(os.sep)
    for end in range(2, len(parts) + 1):
        prefix = os.sep.join(parts[:end])
        try:
            if not stat.S_ISDIR(os.stat(prefix).st_mode):
                return prefix
        except OSError:
            return None
    return None


class LmdbFile:
    """The environment of ``path`` and the handles of its tables (None: a table it lacks)."""

    def __init__(self, path: str, *, readonly: bool, create: bool = True):
        self.path = path
        self.readonly = readonly
        #: whether a missing store may be made (else an LMDB file without castore's tables
        #: is refused before anything is written)
        self.create = create
        #: False for a read-only open without permission to write LMDB's lock file
        self.has_reader_lock = True
        self.env: Any = None  # an lmdb.Environment while open
        self.data_fd: int | None = None  # for posix_fallocate (writable opens)
        self.dbs: dict[Table, object | None] = {}

    # -- opening --------------------------------------------------------------------------

    def open(self, map_size: int, *, writer: bool, reserve) -> None:
        """Open LMDB and the tables; no transaction of this process may be open.

        ``reserve(0, grow=False)`` puts disk blocks under a new store's first pages;
        ``writer`` (this process holds the writer lock) lets the tables an older store
        lacks be created.
        """
        try:  # the read-only look of _open_lmdb reads the main database too: damage there is mapped
            self.env = self._open_lmdb(map_size)
            if not self.readonly:
                self.data_fd = os.open(os.path.join(self.path, "data.mdb"), os.O_RDWR)
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
        data = os.path.join(self.path, DATA_FILE)
        unlocked = not os.path.exists(os.path.join(self.path, "lock.mdb"))
        if os.path.exists(data) and os.path.getsize(data) and (not self.readonly or unlocked):
            # A writable map first grows the file to the map size, padding a truncated one with
            # zeros: look at it through a read-only environment first, and leave a file that
            # holds no castore store as it was.  Without a lock.mdb (castore always leaves
            # one: this is someone else's LMDB file, or a copy), the look takes no lock
            # either, so it does not create one; nothing writes such a file meanwhile.
            probe = self._lmdb_open(map_size, readonly=True, lock=False if unlocked else None)
            try:
                _check_data_size(probe, data)
                self._check_is_store(probe)
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

    def _lmdb_open(self, map_size: int, *, readonly: bool, lock: bool | None = None):
        if lock is False:  # a look without a reader slot (see _open_lmdb)
            try:
                return lmdb.open(
                    self.path, map_size=map_size, max_dbs=len(ALL_TABLES), subdir=True, readonly=True, lock=False
                )
            except lmdb.Error as exc:
                if _is_permission_error(exc):
                    raise StorePermissionError(f"no permission to read {self.path} ({exc}); {READ_ADVICE}") from None
                raise FormatError(f"cannot open LMDB store at {self.path}: {exc}") from None
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
                raise self._write_denied(exc) from None
            if not self.has_reader_lock:
                raise StorePermissionError(f"no permission to read store {self.path} ({exc}); {READ_ADVICE}") from None
        self.has_reader_lock = False
        env = self._lmdb_open(map_size, readonly=readonly)
        log.warning(
            "store %s: no permission to write its LMDB lock file, reading without one: this reader "
            "takes no reader slot, so a writer could reuse pages under it; only safe while nothing "
            "writes the store",
            self.path,
        )
        return env

    def _write_denied(self, exc: lmdb.Error) -> StorePermissionError:
        """The error of a writable open LMDB was refused: read-only works if reading does."""
        data = os.path.join(self.path, DATA_FILE)
        if not os.path.exists(data):
            return StorePermissionError(
                f"cannot create store {self.path} ({exc}); choose a directory this user may write"
            )
        try:
            os.close(os.open(data, os.O_RDONLY))
        except OSError:
            return StorePermissionError(f"no permission to read store {self.path} ({exc}); {READ_ADVICE}")
        return StorePermissionError(
            f"no permission to write store {self.path} ({exc}); open it with readonly=True to load from it"
        )

    def _check_is_store(self, env) -> None:
        """Refuse an LMDB file castore did not make, or (without ``create``) one it did not
        finish making, before a writable open touches it; ``env`` is a read-only look."""
        if _existing_db(env, Table.META) is not None:
            return
        entries = env.stat()["entries"]
        if entries:
            raise FormatError(
                f"{self.path} is not a castore store, or a damaged one: LMDB's "
                f"main database holds {entries} records but no meta database"
            )
        if not self.create:
            raise StoreNotFoundError(
                f"no castore store at {self.path}: its LMDB file holds no castore tables (a creation "
                "that did not finish?); open it with create=True to make a store there"
            )

    def open_tables(self, *, writer: bool, reserve) -> dict:
        """The table handles, None for a table an older store lacks.

        A writable open creates them all in a new store (one transaction: all or none); the
        writer also creates the ones an older format lacks; nobody else creates any, so an
        open never writes to an existing store.  No transaction of this process may be open
        (LMDB's rule for opening databases).
        """
        if self.readonly:  # without txn=: py-lmdb keeps no handle opened in a read txn of ours
            found = {t: _existing_db(self.env, t) for t in ALL_TABLES}
            if found[Table.META] is None:
                self._check_is_store(self.env)  # someone else's file, or a creation cut short
            return self._checked(found)
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

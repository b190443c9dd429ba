"""The in-memory engine: the :class:`~castore.storage.base.Backend` contract in a process's
memory, for fast model-based tests and for trying castore without a disk.

``Store("memory://name")`` opens it; every opener of one name in a process shares one
store, which lives until the process ends or :func:`discard` is called.  Snapshots are
immutable: a write transaction copies each table it changes on its first write, and the
commit swaps the new tables in under a lock, so readers keep the state they began with.
Nothing is durable, and the writer lock is the process's own (one writer per name).
"""

from __future__ import annotations

import bisect
import contextlib
import threading

from ..errors import StoreNotFoundError, UsageError
from ..format.schema import ALL_TABLES, Table
from .base import ReadOnlyBackend, check_key
from .lock import check_timeout

SCHEME = "memory://"


class _Table:
    """An immutable table: a dict and its keys in order (computed when first scanned)."""

    __slots__ = ("data", "_keys")

    def __init__(self, data: dict):
        self.data = data
        self._keys: list | None = None

    def keys(self) -> list:
        if self._keys is None:
            self._keys = sorted(self.data)
        return self._keys


class MemoryTxn:
    """A snapshot, or (``write=True``) a transaction over copy-on-write tables."""

    def __init__(self, tables: dict, generation: int, *, write: bool):
        self._tables = tables
        self._changed: dict[Table, dict] = {}
        self._write = write
        self.generation = generation

    def _data(self, table: Table) -> dict:
        changed = self._changed.get(table)
        return changed if changed is not None else self._tables[table].data

    def get(self, table: Table, key: bytes):
        return self._data(table).get(bytes(check_key(key)))

    def scan(self, table: Table, start: bytes = b"", stop: bytes | None = None, *, reverse: bool = False):
        if table in self._changed:
            data = self._changed[table]
            keys = sorted(data)
        else:
            data = self._tables[table].data
            keys = self._tables[table].keys()
        lo = bisect.bisect_left(keys, start)
        hi = len(keys) if stop is None else bisect.bisect_left(keys, stop)
        span = keys[lo:hi]
        for key in reversed(span) if reverse else span:
            if key in data:
                yield key, data[key]

    def release(self, value) -> None:
        """Nothing to drop: values are this process's own bytes."""

    def count(self, table: Table) -> int:
        return len(self._data(table))

    def _mutable(self, table: Table) -> dict:
        if not self._write:
            raise UsageError("a read transaction cannot write")
        if table not in self._changed:
            self._changed[table] = dict(self._tables[table].data)
        return self._changed[table]

    def put(self, table: Table, key: bytes, value) -> None:
        self._mutable(table)[bytes(check_key(key))] = _value(value)

    def put_new(self, table: Table, key: bytes, value) -> bool:
        key = bytes(check_key(key))
        if key in self._data(table):
            return False
        self._mutable(table)[key] = _value(value)
        return True

    def delete(self, table: Table, key: bytes) -> bool:
        key = bytes(check_key(key))
        if key not in self._data(table):
            return False
        del self._mutable(table)[key]
        return True

    @property
    def changed(self) -> bool:
        return bool(self._changed)

    def committed_tables(self) -> dict:
        tables = dict(self._tables)
        for table, data in self._changed.items():
            tables[table] = _Table(data)
        return tables


_OPEN: dict[str, MemoryBackend] = {}
_OPEN_LOCK = threading.Lock()


def discard(name: str) -> None:
    """Forget the memory store ``name`` once its openers have closed it."""
    with _OPEN_LOCK:
        _OPEN.pop(name, None)


class MemoryBackend:
    """A store in this process's memory (see the module docstring)."""

    @classmethod
    def open(
        cls, name: str, *, create: bool = True, readonly: bool = False, lock_timeout: float | None = None
    ) -> MemoryBackend | ReadOnlyBackend:
        """The process's shared store ``name``; pair each call with close()."""
        check_timeout(lock_timeout)
        with _OPEN_LOCK:
            backend = _OPEN.get(name)
            if backend is None:
                if not create or readonly:
                    raise StoreNotFoundError(f"no castore store at {SCHEME}{name}")
                backend = _OPEN[name] = cls(name)
            backend.refs += 1
            if readonly:
                return ReadOnlyBackend(backend)
            backend.writable_refs += 1
            return backend

    def __init__(self, name: str):
        self.path = SCHEME + name
        self.readonly = False  # a read-only open gets a ReadOnlyBackend view
        self.refs = 0  #: opens not yet closed (read-only views among them)
        self.writable_refs = 0  #: writable opens not yet closed: the writer lock goes with the last
        self._tables = {table: _Table({}) for table in ALL_TABLES}
        self._generation = 0
        self._write_mutex = threading.RLock()
        self._lock = threading.Lock()  # guards the swap of tables and generation
        self._writer = False
        self._writing = threading.local()  # .active: this thread is inside write(fn)

    @contextlib.contextmanager
    def read(self):
        with self._lock:
            txn = MemoryTxn(self._tables, self._generation, write=False)
        yield txn

    def write(self, fn, *args):
        if getattr(self._writing, "active", False):  # its commit would be lost under the outer one
            raise UsageError("write() inside write(): use the transaction fn was given")
        with self._write_mutex:
            with self._lock:
                txn = MemoryTxn(self._tables, self._generation + 1, write=True)
            self._writing.active = True
            try:
                result = fn(txn, *args)  # raising leaves the committed tables untouched
            finally:
                self._writing.active = False
            if txn.changed:
                with self._lock:
                    self._tables = txn.committed_tables()
                    self._generation += 1
            return result

    def generation(self) -> int:
        with self._lock:
            return self._generation

    def reserve(self, nbytes: int) -> None:
        return None  # memory is reserved by the allocation itself

    def acquire_writer(self, timeout: float | None = None) -> bool:
        check_timeout(timeout)
        with self._lock:
            taken, self._writer = not self._writer, True
        return taken

    def is_writer(self) -> bool:
        return self._writer

    def has_table(self, table: Table) -> bool:
        return True

    @contextlib.contextmanager
    def exclusive_writes(self):
        with self._write_mutex:
            yield

    def clear_stale_readers(self) -> int:
        return 0

    def compact(self) -> None:
        return None  # nothing to give back: deleted values are freed by the allocator

    def file_bytes(self) -> int:
        with self.read() as txn:
            return sum(len(k) + len(v) for table in ALL_TABLES for k, v in txn.scan(table))

    def close(self, *, view: bool = False) -> None:
        """Pair of an open (``view``: a read-only one); the last writable opener's close
        releases the writer lock, as the LMDB engine's does."""
        with _OPEN_LOCK:
            self.refs -= 1
            if not view:
                self.writable_refs -= 1
            if self.writable_refs <= 0 or self.refs <= 0:
                self._writer = False
        self._writing = threading.local()  # .active: this thread is inside write(fn)


def _value(value) -> bytes:
    try:
        view = memoryview(value)
    except TypeError:
        raise UsageError(
            f"a storage value must be a C-contiguous bytes-like object, not {type(value).__name__}"
        ) from None
    if not view.c_contiguous:  # refused as the LMDB engine refuses it
        raise UsageError("a storage value must be a C-contiguous bytes-like object")
    return view.tobytes()

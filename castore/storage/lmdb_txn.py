"""Pieces of the LMDB engine: a py-lmdb transaction seen through the storage contract, and
the lock that keeps map resizes away from open transactions."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import sys
import threading

import numpy as np

from ..errors import UsageError
from ..format.schema import Table
from .base import MAX_KEY_BYTES, check_key

RELEASE_MIN_BYTES = 64 << 10  #: smaller values are not worth a system call
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4  # Linux


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _load_madvise()


def _release_pages(value) -> None:
    """``madvise(MADV_DONTNEED)`` the whole pages inside ``value``'s memory."""
    try:
        address = np.frombuffer(value, np.uint8).ctypes.data
    except (TypeError, ValueError):
        return
    start = -(-address // _PAGE) * _PAGE
    stop = (address + len(value)) // _PAGE * _PAGE
    if stop > start and _madvise is not None:
        _madvise(start, stop - start, _MADV_DONTNEED)  # a failure only leaves the pages mapped


class SharedLock:
    """Many holders of ``shared()`` or one of ``exclusive()``: txns vs. map resizes.

    Exclusive requests take precedence: once one waits, new shared holders wait too, so a
    map resize cannot be starved by threads that keep loading.  A thread must not take
    ``shared`` twice (a resize waiting in between would wait for it forever): the engine
    counts each thread's snapshots and takes it once per thread.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    def acquire_shared(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1

    def release_shared(self) -> None:
        with self._cond:
            self._shared -= 1
            self._cond.notify_all()

    @contextlib.contextmanager
    def shared(self):
        self.acquire_shared()
        try:
            yield
        finally:
            self.release_shared()

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


class LmdbTxn:
    """A py-lmdb transaction seen through :class:`~castore.storage.base.WriteTxn`."""

    __slots__ = ("_txn", "_dbs", "generation")

    def __init__(self, txn, dbs: dict, generation: int):
        self._txn = txn
        self._dbs = dbs
        self.generation = generation

    def get(self, table: Table, key: bytes):
        db = self._dbs[table]
        if not 0 < len(key) <= MAX_KEY_BYTES:
            raise UsageError(f"a storage key is 1 to {MAX_KEY_BYTES} bytes, got {len(key)}")
        return None if db is None else self._txn.get(key, db=db)

    def scan(self, table: Table, start: bytes = b"", stop: bytes | None = None, *, reverse: bool = False):
        db = self._dbs[table]
        if db is None:
            return
        cursor = self._txn.cursor(db=db)
        if not reverse:
            if not cursor.set_range(start):
                return
            for key, value in cursor.iternext():
                if stop is not None and bytes(key) >= stop:
                    return
                yield key, value
            return
        found = cursor.prev() if stop is not None and cursor.set_range(stop) else cursor.last()
        while found:
            key = cursor.key()
            if bytes(key) < start:
                return
            yield key, cursor.value()
            found = cursor.prev()

    def count(self, table: Table) -> int:
        db = self._dbs[table]
        return 0 if db is None else self._txn.stat(db)["entries"]

    def release(self, value) -> None:
        """Unmap the whole pages of a large value read from the map (``madvise``).

        A value read through the map is file pages in this process's RSS: a restore that
        decodes 10 GB of chunks into arrays would otherwise also hold 10 GB of map pages.
        The map is shared, so the pages stay in the page cache (a later read refaults them)
        and a writable map's dirty pages are kept, not lost.
        """
        if _madvise is not None and len(value) >= RELEASE_MIN_BYTES:
            _release_pages(value)

    def put(self, table: Table, key: bytes, value) -> None:
        self._put(table, key, value, overwrite=True)

    def put_new(self, table: Table, key: bytes, value) -> bool:
        return self._put(table, key, value, overwrite=False)

    def _put(self, table: Table, key: bytes, value, *, overwrite: bool) -> bool:
        db = self._writable(table)
        if value is None:  # py-lmdb would store it as an empty value
            raise UsageError("a storage value must be a C-contiguous bytes-like object, not None")
        try:
            return self._txn.put(check_key(key), value, db=db, overwrite=overwrite)
        except (BufferError, ValueError, TypeError) as exc:  # py-lmdb takes C-contiguous buffers only
            raise UsageError(f"a storage value must be a C-contiguous bytes-like object: {exc}") from None

    def delete(self, table: Table, key: bytes) -> bool:
        db = self._dbs[table]
        return False if db is None else self._txn.delete(check_key(key), db=db)

    def _writable(self, table: Table):
        db = self._dbs[table]
        if db is None:
            raise UsageError(f"the store has no {table.value!r} table yet; only its writer creates it")
        return db

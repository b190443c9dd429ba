"""The storage seam: what every engine promises (restic's Backend, kopia's blob.Storage).

A store is a set of tables (:class:`~castore.format.schema.Table`), each an ordered map of
byte keys to byte values.  An engine gives snapshots to read (:meth:`Backend.read`) and
atomic multi-table writes (:meth:`Backend.write`), plus the few things a single-writer,
many-reader store needs: a writer lock, a generation number, room for a write.  Engines
know nothing of manifests, chunks or formats; ``castore.storage.lmdb_engine`` (the default) and
``castore.storage.memory`` implement this, and ``tests/storage/`` holds the contract
suite both pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from typing import Protocol, TypeVar

from ..errors import UsageError
from ..format.schema import Table

T = TypeVar("T")
#: keys are 1 to 511 bytes (LMDB's limit, kept by every engine so no engine accepts more)
MAX_KEY_BYTES = 511
#: a value read from a transaction: bytes, or a memoryview valid until the transaction ends
Buffer = bytes | memoryview


class ReadTxn(Protocol):
    """A consistent snapshot of every table, as of one committed generation.

    Values returned are valid until the transaction ends (an engine may hand out views of
    its map); copy them with ``bytes()`` to keep them.  A table the store lacks (an older
    format) reads as empty.  Keys are 1 to :data:`MAX_KEY_BYTES` bytes and values
    C-contiguous bytes-like objects; anything else is a :class:`UsageError`.
    """

    @property
    def generation(self) -> int:
        """The generation this snapshot shows (see :meth:`Backend.generation`).  In a write
        transaction, the generation its commit makes: it started from ``generation - 1``."""

    def get(self, table: Table, key: bytes) -> Buffer | None:
        """The value of ``key``, or None."""

    def scan(
        self, table: Table, start: bytes = b"", stop: bytes | None = None, *, reverse: bool = False
    ) -> Iterator[tuple[Buffer, Buffer]]:
        """``(key, value)`` with ``start <= key < stop`` (``stop`` None: to the end), in
        bytewise key order, descending if ``reverse``.  The snapshot does not change while
        iterating; in a write transaction, writes made during the iteration may or may not
        be seen: collect keys first, then write."""

    def count(self, table: Table) -> int:
        """How many keys the table holds."""

    def release(self, value: Buffer) -> None:
        """A hint: the caller has copied ``value`` (returned by this transaction) and will
        not read it again; an engine may drop it from the process's memory.  The value
        stays valid (reading it again costs a page fault)."""


class WriteTxn(ReadTxn, Protocol):
    """A transaction that sees its own writes; they become visible all at once on commit."""

    def put(self, table: Table, key: bytes, value: Buffer) -> None:
        """Set ``key`` to ``value``, replacing any value it had."""

    def put_new(self, table: Table, key: bytes, value: Buffer) -> bool:
        """Put if absent: True if stored, False (value unchanged) if ``key`` was present."""

    def delete(self, table: Table, key: bytes) -> bool:
        """Remove ``key``; True if it was present."""


class Backend(Protocol):
    """One open store.  Shared by every opener of the same path in one process.

    Guarantees every engine gives:

    * **snapshot isolation**: a :meth:`read` transaction sees one committed generation,
      whatever commits meanwhile; any number of readers (threads or processes) run beside
      the writer;
    * **atomic writes**: :meth:`write` commits every put and delete of ``fn`` at once, or
      none if ``fn`` raises (the error propagates) or the process dies;
    * **durability**: a write that returned survives a crash of the process (the LMDB
      engine: and of the machine, LMDB syncs on commit);
    * **single writer**: :meth:`acquire_writer` admits one process at a time.
    """

    path: str
    readonly: bool

    def read(self) -> ContextManager[ReadTxn]:
        """A snapshot; its values are valid until the ``with`` block ends.  Snapshots may
        be nested in one thread."""

    def write(self, fn: Callable[..., T], *args) -> T:
        """Run ``fn(txn, *args)`` in a write transaction, commit, return its result.

        ``fn`` may be re-run (the LMDB engine aborts and retries after growing its map), so
        it must only read and write through ``txn`` and must give the same writes for the
        same state.  Raises :class:`UsageError` on a read-only store, :class:`SaveError` if
        the engine cannot commit (full disk); nothing is committed then.  A thread may
        write while it holds a :meth:`read` snapshot, but the LMDB engine cannot grow its
        map then (a resize waits for every snapshot of the process) and raises
        :class:`UsageError` instead of waiting forever.  A write from *another* thread
        (a save's writer thread) that must grow the map waits until every snapshot of this
        process has ended: do not hold a snapshot while waiting for a save.
        """

    def generation(self) -> int:
        """A number that grows by one with every commit that changes a table (a write that
        changes nothing may leave it as it was): a plan made at one generation is stale at
        another, and the delta across an operation counts the commits it made."""

    def reserve(self, nbytes: int) -> None:
        """Make room for a write of about ``nbytes``, or raise :class:`SaveError` (full disk)
        before anything is written."""

    def acquire_writer(self, timeout: float | None = None) -> bool:
        """Take the single-writer lock for this process; True if this call took it, False
        if this process held it already.  Waits up to ``timeout`` seconds (None: the
        ``lock_timeout`` the store was opened with), then raises :class:`StoreLockedError`
        naming the holder.  Taking it creates the tables the store lacks (see
        :func:`~castore.format.schema.missing_tables`) and frees killed readers' slots."""

    def is_writer(self) -> bool:
        """Whether this process holds the writer lock."""

    def has_table(self, table: Table) -> bool:
        """Whether the store has ``table`` (an older format may lack some)."""

    def exclusive_writes(self) -> ContextManager[None]:
        """Hold off every other write of this process while the block runs (a write already
        running finishes first).  For maintenance and for tests that stall a save."""

    def clear_stale_readers(self) -> int:
        """Free the reader slots of processes that died reading; how many."""

    def compact(self) -> None:
        """Rewrite the store without free space.  The caller holds the writer lock; raises
        :class:`StoreBusyError` if another process has the store open."""

    def file_bytes(self) -> int:
        """Disk bytes the store occupies."""

    def close(self) -> None:
        """Pair of every open.  The last writable opener's close releases the writer lock
        (read-only views left open read on); the last close of all releases the engine."""


def check_key(key) -> bytes:
    """A key as bytes, 1 to :data:`MAX_KEY_BYTES` long; else :class:`UsageError`."""
    if not 0 < len(key) <= MAX_KEY_BYTES:
        raise UsageError(f"a storage key is 1 to {MAX_KEY_BYTES} bytes, got {len(key)}")
    return key


class ReadOnlyBackend:
    """A read-only view of a shared backend: what every ``readonly`` open gets (one engine
    per store per process, which a writable open of the same store may share at any time)."""

    readonly = True

    def __init__(self, backend):
        self._backend = backend
        self.path = backend.path

    @property
    def shared(self):
        """The writable backend this view reads through."""
        return self._backend

    @property
    def refs(self) -> int:
        """Opens of the shared backend not yet closed."""
        return self._backend.refs

    def read(self):
        return self._backend.read()

    def write(self, fn, *args):
        raise UsageError(f"store {self.path} is open read-only")

    def acquire_writer(self, timeout: float | None = None) -> bool:
        raise UsageError(f"store {self.path} is open read-only")

    def is_writer(self) -> bool:
        return False

    def generation(self) -> int:
        return self._backend.generation()

    def reserve(self, nbytes: int) -> None:
        raise UsageError(f"store {self.path} is open read-only")

    def has_table(self, table: Table) -> bool:
        return self._backend.has_table(table)

    def exclusive_writes(self):
        return self._backend.exclusive_writes()

    def clear_stale_readers(self) -> int:
        return 0

    def compact(self) -> None:
        raise UsageError(f"store {self.path} is open read-only")

    def file_bytes(self) -> int:
        return self._backend.file_bytes()

    def close(self) -> None:
        self._backend.close(view=True)

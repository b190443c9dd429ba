"""A small read-only view of a store's tables and writer state, for tests and tools.

``store.inspect()`` returns one.  It reads through the storage seam (so it works on every
engine) and copies what it returns; nothing here writes.
"""

from __future__ import annotations

from .errors import FormatError, UsageError
from .format.config import CONFIG_KEY
from .format.schema import Table
from .format.sealing import unpack_untrusted
from .storage.base import Backend, ReadOnlyBackend
from .storage.lmdb_engine import LmdbBackend


class StoreInspector:
    """Tables as ``{key: value}`` bytes, the config record, engine figures, GC pins."""

    def __init__(self, backend: Backend, writer):
        self._backend = backend
        self._writer = writer

    def keys(self, table: Table) -> list[bytes]:
        with self._backend.read() as txn:
            return [bytes(k) for k, _ in txn.scan(table)]

    def items(self, table: Table) -> dict[bytes, bytes]:
        with self._backend.read() as txn:
            return {bytes(k): bytes(v) for k, v in txn.scan(table)}

    def get(self, table: Table, key: bytes) -> bytes | None:
        with self._backend.read() as txn:
            value = txn.get(table, key)
            return None if value is None else bytes(value)

    def count(self, table: Table) -> int:
        with self._backend.read() as txn:
            return txn.count(table)

    def has_table(self, table: Table) -> bool:
        return self._backend.has_table(table)

    def config(self) -> dict:
        """The config record, decoded."""
        raw = self.get(Table.META, CONFIG_KEY)
        if raw is None:
            raise FormatError(f"{self._backend.path} has no config record")
        return unpack_untrusted(raw)

    def generation(self) -> int:
        return self._backend.generation()

    def pinned_ids(self) -> set[bytes]:
        """Chunk ids GC keeps because a save of this process may reuse them."""
        return self._writer.pinned_ids()

    def map_size(self) -> int:
        """The LMDB map size (LMDB engine only)."""
        return self._lmdb().map_size()

    def last_page(self) -> int:
        """The last page LMDB uses: the data file's high-water mark (LMDB engine only)."""
        return self._lmdb().last_page()

    def _lmdb(self) -> LmdbBackend:
        backend = self._backend.shared if isinstance(self._backend, ReadOnlyBackend) else self._backend
        if not isinstance(backend, LmdbBackend):
            raise UsageError(f"{self._backend.path} is not an LMDB store")
        return backend

    def holding_writes(self):
        """A context manager that stalls every write of this process (to test waits)."""
        return self._backend.exclusive_writes()

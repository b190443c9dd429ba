"""Journal entries and the store's counters (pure: no I/O).

A save lists every chunk and page it adds in ``journal`` entries, keyed by the save's
token and a batch number, in the transaction that adds them; the transaction that commits
its manifest deletes them.  Entries left behind name what a failed or killed save wrote,
which GC collects.  An entry is a concatenation of ``tag + id``: ``c`` for a chunk, ``p``
for a chunk-list page.  GC also writes entries under ``gc-defer`` for garbage it may not
free yet (ids a save in this process may still reuse).

``meta/counters`` is 16 bytes: chunks and pages held, then their stored bytes, each an
unsigned 64-bit big-endian integer, kept in the same transaction as the puts and deletes.
"""

from __future__ import annotations

from ..errors import CorruptDataError
from .ids import ID_BYTES
from .schema import Table

TOKEN_BYTES = 8  #: random bytes naming one save's entries
COUNTERS_KEY = b"counters"  #: key of the counters in the ``meta`` table
DELETIONS_KEY = b"deletions"  #: key of the count of chunk and page deletions ever (format 4)
DEFERRED_PREFIX = b"gc-defer"  #: key prefix of garbage a later GC must reconsider
TAGS = {Table.CHUNKS: b"c", Table.PAGES: b"p"}
_TABLE_OF_TAG = {tag: table for table, tag in TAGS.items()}
_ENTRY_ITEM = 1 + ID_BYTES


def entry_key(token: bytes, batch: int) -> bytes:
    return token + batch.to_bytes(4, "big")


def deferred_key(generation: int) -> bytes:
    return DEFERRED_PREFIX + generation.to_bytes(8, "big")


def encode_entry(items) -> bytes:
    """An entry listing ``(table, id)`` items."""
    return b"".join(TAGS[table] + bytes(cid) for table, cid in items)


def decode_entry(raw: bytes | memoryview) -> list[tuple[Table, bytes]]:
    """``(table, id)`` items of an entry; raises :class:`CorruptDataError` if malformed."""
    raw = bytes(raw)
    if len(raw) % _ENTRY_ITEM:
        raise CorruptDataError(f"journal entry of {len(raw)} bytes is malformed")
    items = []
    for start in range(0, len(raw), _ENTRY_ITEM):
        table = _TABLE_OF_TAG.get(raw[start : start + 1])
        if table is None:
            raise CorruptDataError("journal entry names an unknown table")
        items.append((table, raw[start + 1 : start + _ENTRY_ITEM]))
    return items


def decode_counters(raw) -> tuple[int, int]:
    """``(chunks and pages held, their bytes)``; a store without the record has none."""
    if raw is None:
        return 0, 0
    raw = bytes(raw)
    if len(raw) != 16:
        raise CorruptDataError(f"meta/counters record of {len(raw)} bytes is malformed")
    return int.from_bytes(raw[:8], "big"), int.from_bytes(raw[8:16], "big")


def encode_counters(chunks: int, nbytes: int) -> bytes:
    """The counters record; both counts must be in [0, 2**64)."""
    return chunks.to_bytes(8, "big") + nbytes.to_bytes(8, "big")


def decode_deletions(raw) -> int:
    """The ``meta/deletions`` count (u64 BE; absent: 0); raises CorruptDataError."""
    if raw is None:
        return 0
    if len(raw) != 8:
        raise CorruptDataError(f"meta/deletions is {len(raw)} bytes, not 8")
    count = int.from_bytes(bytes(raw), "big")
    if count >= 1 << 63:  # no store deletes that much: damage
        raise CorruptDataError("meta/deletions holds an impossible count")
    return count


def encode_deletions(count: int) -> bytes:
    return count.to_bytes(8, "big")

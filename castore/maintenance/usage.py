"""Where a store's bytes go: per step, per component, and what GC would free (reads no chunk).

:func:`usage` is the one pass behind ``castore ls``, ``du`` and ``report``.  It reads every
kept step's manifest and chunk-list pages (each unique page once) and looks up the stored
size of every unique chunk once; ``Store.accounting()`` is its per-step part.  Memory
follows the store's unique chunks, and time what changed between neighbouring steps, not
steps x chunks (see :func:`usage`).

Attribution follows the store's key order: main's steps ascending, then each other branch
by name, ascending.  A chunk (or chunk-list page) is *new* at the first step, and in the
first component of that step, that references it: the bytes that step added, as far as the
steps kept now tell (a deleted earlier step's chunks count as new at the next step that
still uses them).  The raw length of a chunk is known from its blob (its slot in the
array), so the compression ratio needs no decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import catalog
from ..format.chunker import chunk_count
from ..format.codec import node_nbytes
from ..format.ids import ID_BYTES, split_ids
from ..format.keys import branch_of, step_key, step_of
from ..format.manifest import ChunkedBlob, PagedBlob, decode_manifest, iter_blobs
from ..format.schema import Table
from ..format.stepinfo import SaveTimes
from ..storage.base import ReadTxn
from ..storage.chunks import PAGE_MISSING, ChunkStore, PageWalker


@dataclass(frozen=True, slots=True)
class ComponentUsage:
    """One component of one step."""

    name: str
    logical_bytes: int  #: bytes of its leaves before deduplication
    new_bytes: int  #: stored bytes of the chunks and pages first referenced here


@dataclass(frozen=True, slots=True)
class StepUsage:
    """One kept step."""

    step: int
    branch: str
    created: float  #: UNIX time of the save
    logical_bytes: int
    referenced_bytes: int  #: stored bytes of the chunks and pages it references
    unique_bytes: int  #: of those, referenced by no other kept step: what deleting it frees
    new_bytes: int  #: of those, first referenced by this step (see the module docstring)
    components: tuple[ComponentUsage, ...]
    tags: tuple[str, ...] = ()  #: tags naming it
    metrics: dict = field(default_factory=dict)  #: what its save recorded with ``metrics=``
    save: SaveTimes | None = None  #: its save's duration and written bytes, where recorded


@dataclass(frozen=True, slots=True)
class ComponentTotal:
    """One component name over every kept step."""

    name: str
    steps: int  #: kept steps that hold it
    logical_bytes: int  #: summed over those steps
    raw_bytes: int  #: bytes of its unique chunks before compression (and pages)
    stored_bytes: int  #: stored bytes of the unique chunks and pages first referenced by it


@dataclass(frozen=True, slots=True)
class StoreUsage:
    """Every kept step and component, and the store's totals."""

    steps: tuple[StepUsage, ...]
    components: tuple[ComponentTotal, ...]
    logical_bytes: int  #: summed over kept steps
    raw_bytes: int  #: bytes of the live chunks before compression, and of live pages
    live_bytes: int  #: stored bytes of the chunks and pages some kept step references
    missing: int  #: referenced chunks or pages not found (``castore verify`` names them)

    @property
    def dedup_ratio(self) -> float:
        """Logical bytes per raw byte of live chunks: what deduplication saved."""
        return self.logical_bytes / self.raw_bytes if self.raw_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        """Raw bytes per stored byte of live chunks: what compression saved."""
        return self.raw_bytes / self.live_bytes if self.live_bytes else 1.0


_PAGE = b"p"  # an item key: a chunk is its 32-byte id, a chunk-list page b"p" + its id


def _units(walker: PageWalker, blob) -> list[bytes]:
    """The units of a blob: its chunk-list pages (b"p" + id), or for a blob that lists its
    ids inline, b"c" + those ids.  A unit's items never change, so a step that shares a
    unit with the step before it costs nothing for that unit's chunks."""
    if isinstance(blob, PagedBlob):
        return [_PAGE + pid for pid in split_ids(blob.page_ids)]
    if isinstance(blob, ChunkedBlob) and blob.ids:
        return [b"c" + blob.ids]
    return []


def _items(walker: PageWalker, unit: bytes) -> list[bytes]:
    """The item keys of a unit: a page and the chunks it lists (only the page if it is
    missing or damaged), or the inline ids."""
    if unit[:1] == b"c":
        return split_ids(unit[1:])
    page = walker.page(unit[1:])
    return [unit] if isinstance(page, str) else [unit, *split_ids(page)]


def _last_chunk(walker: PageWalker, blob) -> tuple[bytes, int] | None:
    """``(id, raw length)`` of a blob's last chunk if it is shorter than the others."""
    count = chunk_count(blob.nbytes, blob.chunk_nbytes)
    tail = blob.nbytes - (count - 1) * blob.chunk_nbytes if count else 0
    if not count or tail == blob.chunk_nbytes:
        return None
    if isinstance(blob, ChunkedBlob):
        ids = blob.ids
    else:
        page = walker.page(split_ids(blob.page_ids)[-1]) if blob.page_ids else PAGE_MISSING
        if isinstance(page, str):
            return None
        ids = page
    return (ids[-ID_BYTES:], tail) if len(ids) >= ID_BYTES else None


# per item: [units present now holding it, start of its current run of steps, steps holding
# it, stored size, raw size, first step index, first component index]
_MULT, _START, _COUNT, _SIZE, _RAW, _FIRST_STEP, _FIRST_COMPONENT = range(7)


def _look_up_sizes(chunks: ChunkStore, txn: ReadTxn, state: dict, fresh: list[bytes]) -> None:
    """Set the stored size of items first seen (None stays for one that is not stored)."""
    for table, keys in (
        (Table.CHUNKS, [k for k in fresh if len(k) == ID_BYTES]),
        (Table.PAGES, [k for k in fresh if len(k) != ID_BYTES]),
    ):
        ids = keys if table is Table.CHUNKS else [k[1:] for k in keys]
        found = chunks.sizes(txn, table, ids)
        for item, cid in zip(keys, ids):
            state[item][_SIZE] = found.get(cid)


def usage(chunks: ChunkStore, txn: ReadTxn) -> StoreUsage:
    """The usage of every kept step of every branch, from the snapshot ``txn``.

    Steps are visited in key order and each is compared with the one before by its units
    (pages and inline id lists): only units that appear or disappear are expanded to their
    chunks, so the cost follows what changed between neighbouring steps, not steps x
    chunks.  An item's *run* is a stretch of consecutive steps that hold it; the steps
    holding it are the sum of its runs, and an item held by one step only is that step's
    unique bytes.
    """
    walker = PageWalker(txn, check_pages=False)
    state: dict[bytes, list] = {}
    previous: set[bytes] = set()
    referenced_now = 0
    manifests = []
    referenced: list[int] = []
    index = -1
    for index, (key, raw) in enumerate(txn.scan(Table.STEPS)):
        manifest = decode_manifest(raw)
        components: list[tuple[str, int]] = []
        now: dict[bytes, int] = {}  # unit -> the first component holding it
        partial: dict[bytes, tuple[int, int]] = {}  # unit -> chunk_nbytes of its blob, component
        tails: list[tuple[bytes, int]] = []
        for c_index, (name, node) in enumerate(manifest.components):
            components.append((name, node_nbytes(node)))
            for blob in iter_blobs(node):
                if not isinstance(blob, (ChunkedBlob, PagedBlob)):
                    continue
                for unit in _units(walker, blob):
                    if unit not in now:
                        now[unit] = c_index
                        partial[unit] = (blob.chunk_nbytes, c_index)
                last = _last_chunk(walker, blob)
                if last is not None:
                    tails.append(last)
        manifests.append((branch_of(key), step_of(key), manifest.created, manifest.logical_bytes, components))
        for unit in previous - now.keys():
            for item in _items(walker, unit):
                entry = state[item]
                entry[_MULT] -= 1
                if entry[_MULT] == 0:
                    entry[_COUNT] += index - entry[_START]
                    referenced_now -= entry[_SIZE] or 0
        started: list[list] = []
        fresh: list[bytes] = []
        for unit in sorted(now.keys() - previous, key=now.__getitem__):  # component order: who is first
            chunk_nbytes, c_index = partial[unit]
            for item in _items(walker, unit):
                if item not in state:
                    raw_len = None if len(item) != ID_BYTES else chunk_nbytes  # a page: raw is stored
                    state[item] = [0, index, 0, None, raw_len, index, c_index]
                    fresh.append(item)
                entry = state[item]
                entry[_MULT] += 1
                if entry[_MULT] == 1:
                    entry[_START] = index
                    started.append(entry)
        for item, tail in tails:
            if item in state and state[item][_FIRST_STEP] == index:
                state[item][_RAW] = tail
        _look_up_sizes(chunks, txn, state, fresh)
        referenced_now += sum(entry[_SIZE] or 0 for entry in started)
        referenced.append(referenced_now)
        previous = set(now)
    steps_seen = index + 1

    new_step = [0] * len(manifests)
    unique = [0] * len(manifests)
    new_component: dict[tuple[int, int], int] = {}
    raw_component: dict[tuple[int, int], int] = {}
    raw_total = live = missing = 0
    for entry in state.values():
        if entry[_MULT] > 0:
            entry[_COUNT] += steps_seen - entry[_START]
        if entry[_SIZE] is None:  # referenced but not stored: castore verify names it
            missing += 1
            continue
        size = entry[_SIZE]
        where = (entry[_FIRST_STEP], entry[_FIRST_COMPONENT])
        new_step[where[0]] += size
        new_component[where] = new_component.get(where, 0) + size
        if entry[_COUNT] == 1:
            unique[entry[_START]] += size
        raw_len = size if entry[_RAW] is None else entry[_RAW]
        raw_component[where] = raw_component.get(where, 0) + raw_len
        raw_total += raw_len
        live += size

    tagged: dict[bytes, list[str]] = {}
    for name, key in catalog.tags(txn).items():
        tagged.setdefault(bytes(key), []).append(name)
    totals: dict[str, list[int]] = {}  # name -> [steps, logical, raw, stored]
    steps = []
    for index, (branch, step, created, logical, components) in enumerate(manifests):
        parts = []
        for c_index, (name, c_logical) in enumerate(components):
            new = new_component.get((index, c_index), 0)
            parts.append(ComponentUsage(name, c_logical, new))
            total = totals.setdefault(name, [0, 0, 0, 0])
            total[0] += 1
            total[1] += c_logical
            total[3] += new
        key = step_key(step, branch)
        record = catalog.read_stepinfo(txn, key)
        steps.append(
            StepUsage(
                step,
                branch,
                created,
                logical,
                referenced[index],
                unique[index],
                new_step[index],
                tuple(parts),
                tuple(sorted(tagged.get(key, ()))),
                record.metrics,
                record.save,
            )
        )
    for (s_index, c_index), raw_len in raw_component.items():
        totals[manifests[s_index][4][c_index][0]][2] += raw_len
    return StoreUsage(
        steps=tuple(steps),
        components=tuple(ComponentTotal(name, *t) for name, t in totals.items()),
        logical_bytes=sum(m[3] for m in manifests),
        raw_bytes=raw_total,
        live_bytes=live,
        missing=missing,
    )

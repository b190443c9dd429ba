"""Where a store's bytes go: per step, per component, and what GC would free (reads no chunk).

:func:`usage` is the one pass behind ``castore ls``, ``du`` and ``report``.  It reads every
kept step's manifest and chunk-list pages (each unique page once) and looks up the stored
size of every unique chunk: the cost of :func:`castore.maintenance.gc.account`, without
holding a set of ids per step (memory follows the store's unique chunks, not steps x
chunks).

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
from ..format.ids import split_ids
from ..format.keys import branch_of, step_key, step_of
from ..format.manifest import ChunkedBlob, PagedBlob, decode_manifest, iter_blobs
from ..format.schema import Table
from ..format.stepinfo import SaveTimes
from ..storage.base import ReadTxn
from ..storage.chunks import ChunkStore, PageWalker


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


def _blob_items(walker: PageWalker, blob):
    """``((table, id), raw length)`` of every chunk and page of ``blob`` that can be found."""
    if not isinstance(blob, (ChunkedBlob, PagedBlob)):
        return
    walk = walker.walk(blob)
    for pid in walk.pages:
        yield (Table.PAGES, pid), None  # a page's raw length is its stored length
    ids = split_ids(walk.chunk_ids)
    count = chunk_count(blob.nbytes, blob.chunk_nbytes)
    for index, cid in enumerate(ids):
        if index < count - 1:
            raw = blob.chunk_nbytes
        else:
            raw = blob.nbytes - (count - 1) * blob.chunk_nbytes if index == count - 1 else 0
        yield (Table.CHUNKS, cid), raw


def usage(chunks: ChunkStore, txn: ReadTxn) -> StoreUsage:
    """The usage of every kept step of every branch, from the snapshot ``txn``."""
    walker = PageWalker(txn, check_pages=False)
    first: dict[tuple[Table, bytes], tuple[int, int]] = {}  # item -> (step index, component index)
    counts: dict[tuple[Table, bytes], int] = {}
    raws: dict[tuple[Table, bytes], int | None] = {}
    manifests = []
    for index, (key, raw) in enumerate(txn.scan(Table.STEPS)):
        manifest = decode_manifest(raw)
        seen_here: set = set()
        components: list[tuple[str, int]] = []
        for c_index, (name, node) in enumerate(manifest.components):
            components.append((name, node_nbytes(node)))
            for blob in iter_blobs(node):
                for item, raw_len in _blob_items(walker, blob):
                    if item in seen_here:
                        continue
                    seen_here.add(item)
                    counts[item] = counts.get(item, 0) + 1
                    if item not in first:
                        first[item] = (index, c_index)
                        raws[item] = raw_len
        manifests.append((branch_of(key), step_of(key), manifest.created, manifest.logical_bytes, components))
    sizes: dict[tuple[Table, bytes], int] = {}
    for table in (Table.CHUNKS, Table.PAGES):
        found = chunks.sizes(txn, table, [cid for t, cid in first if t is table])
        sizes.update({(table, cid): n for cid, n in found.items()})
    missing = len(first) - len(sizes)

    new_step = [0] * len(manifests)
    new_component: dict[tuple[int, int], int] = {}
    for item, (s_index, c_index) in first.items():
        size = sizes.get(item, 0)
        new_step[s_index] += size
        new_component[s_index, c_index] = new_component.get((s_index, c_index), 0) + size

    # referenced and unique bytes: a second walk, one step's items at a time
    referenced = [0] * len(manifests)
    unique = [0] * len(manifests)
    for index, (_, raw) in enumerate(txn.scan(Table.STEPS)):
        seen_here = set()
        for _, node in decode_manifest(raw).components:
            for blob in iter_blobs(node):
                for item, _ in _blob_items(walker, blob):
                    if item in seen_here:
                        continue
                    seen_here.add(item)
                    size = sizes.get(item, 0)
                    referenced[index] += size
                    if counts[item] == 1:
                        unique[index] += size

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
    raw_total = 0
    for item, (s_index, c_index) in first.items():
        if item not in sizes:
            continue
        raw_len = raws[item]
        raw_len = sizes[item] if raw_len is None else raw_len
        raw_total += raw_len
        totals[manifests[s_index][4][c_index][0]][2] += raw_len
    return StoreUsage(
        steps=tuple(steps),
        components=tuple(ComponentTotal(name, *t) for name, t in totals.items()),
        logical_bytes=sum(m[3] for m in manifests),
        raw_bytes=raw_total,
        live_bytes=sum(sizes.values()),
        missing=missing,
    )

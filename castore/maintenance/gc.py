"""Garbage collection: free the chunks and pages no kept step references.  Plan, then execute.

Where garbage comes from, and how GC finds it without scanning every chunk:

* a deleted (or overwritten) step's manifest moves to the ``trash`` table in the
  transaction that removes it from ``steps``;
* every batch of chunks a save commits is listed in the ``journal`` table, and the
  transaction that commits the save's manifest deletes those entries; entries left behind
  name the chunks of saves that failed or were killed.

The *candidates* are the ids named by trashed manifests and journal entries; the *live*
ids are those named by every kept step of every branch (their manifests and chunk-list
pages, each unique page read once).  Garbage = candidates - live - pinned, where the
*pinned* ids are those a save in this process may reuse without looking (its baselines,
see :mod:`castore.save.session`): pinned garbage is *deferred*, listed in a journal entry
for a later GC.  So a plan costs what it frees plus the live manifest pages, never a
pass over the chunks.

Crash safety: execution deletes chunks first, then pages, then the trash and journal
entries, in batches of committed transactions.  A kill between batches leaves the trash
and journal entries in place, so the next GC finds what is left; no batch ever deletes a
live id.  A plan of at most ``DELETE_BATCH`` ids is executed in one transaction instead
(atomic: all of it or none).  Callers hold the writer lock with no save being captured
or in flight.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from ..errors import CorruptDataError, UsageError
from ..format import journal
from ..format.ids import split_ids
from ..format.keys import MAIN
from ..format.manifest import Manifest, decode_manifest, iter_blobs
from ..format.schema import Table
from ..storage.base import Backend, ReadTxn, WriteTxn
from ..storage.chunks import PAGE_MALFORMED, ChunkStore, PageWalker

DELETE_BATCH = 4096  # ids deleted per transaction


@dataclass(frozen=True, slots=True)
class GcPlan:
    """What a garbage collection would free (a dry run), and what it needs to do so."""

    steps: tuple[int, ...]  #: deleted or overwritten steps whose chunks are collected
    chunks: tuple[bytes, ...]  #: chunk ids to free
    pages: tuple[bytes, ...]  #: chunk-list page ids to free
    deferred: tuple[bytes, ...]  #: garbage chunk ids a save may still reuse: re-listed for a later GC
    freed_bytes: int  #: bytes of those chunks and pages
    trash_keys: tuple[bytes, ...]  #: trash entries done with once the ids are freed
    journal_keys: tuple[bytes, ...]  #: journal entries of saves that never committed
    live_pages: int  #: unique live chunk-list pages read to build the plan
    generation: int  #: the store's generation when planned (a later commit makes it stale)
    #: a dry run's steps taken as deleted though they are not (a retention preview): such a
    #: plan is never executed, only re-planned
    assumed_deleted: tuple[bytes, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (self.chunks or self.pages or self.trash_keys or self.journal_keys or self.deferred)


def plan(
    chunks: ChunkStore,
    txn: ReadTxn,
    pinned: AbstractSet[bytes] = frozenset(),
    assume_deleted: AbstractSet[bytes] = frozenset(),
) -> GcPlan:
    """Plan a collection from the snapshot ``txn``; ``pinned`` ids are deferred, not freed.

    ``assume_deleted`` (step keys) plans as if those steps were in the trash: a preview of
    what deleting them would free, which :func:`execute` must never be given.
    """
    walker = PageWalker(txn, check_pages=False)
    live_chunks: set = set()
    live_pages: set = set()
    doomed = []
    for key, raw in txn.scan(Table.STEPS):
        if bytes(key) in assume_deleted:
            doomed.append(decode_manifest(raw))
            continue
        _collect(walker, decode_manifest(raw), live_chunks, live_pages)
    cand_chunks: set = set()
    cand_pages: set = set()
    steps, trash_keys = [], []
    for manifest in doomed:
        steps.append(manifest.step)
        _collect(walker, manifest, cand_chunks, cand_pages, live_pages=live_pages)
    for key, raw in txn.scan(Table.TRASH):
        manifest = decode_manifest(raw)
        steps.append(manifest.step)
        trash_keys.append(bytes(key))
        _collect(walker, manifest, cand_chunks, cand_pages, live_pages=live_pages)
    journal_keys = []
    for key, raw in txn.scan(Table.JOURNAL):
        journal_keys.append(bytes(key))
        for table, cid in journal.decode_entry(raw):
            (cand_chunks if table is Table.CHUNKS else cand_pages).add(cid)
    garbage = chunks.sizes(txn, Table.CHUNKS, cand_chunks - live_chunks)
    freed = sorted(garbage.keys() - pinned)
    deferred = tuple(sorted(garbage.keys() & pinned))
    page_sizes = chunks.sizes(txn, Table.PAGES, cand_pages - live_pages)
    freed_bytes = sum(garbage[c] for c in freed) + sum(page_sizes.values())
    return GcPlan(
        tuple(sorted(set(steps))),
        tuple(freed),
        tuple(sorted(page_sizes)),
        deferred,
        freed_bytes,
        tuple(trash_keys),
        tuple(journal_keys),
        len(live_pages),
        txn.generation,
        tuple(sorted(assume_deleted)),
    )


def execute(backend: Backend, chunks: ChunkStore, gc_plan: GcPlan, progress=None) -> None:
    """Free what ``gc_plan`` lists, in batches; crash-safe (see the module docstring).

    ``progress(done, total)`` is called with ids freed so far after each batch."""
    if gc_plan.assumed_deleted:
        raise UsageError("a preview plan (plan_gc(keep=...)) is never executed: plan again")
    total = len(gc_plan.chunks) + len(gc_plan.pages)
    if total <= DELETE_BATCH:  # the common, small collection
        backend.write(_delete_all, chunks, gc_plan)
        if progress is not None:
            progress(total, total)
        return
    done = 0
    for table, ids in ((Table.CHUNKS, gc_plan.chunks), (Table.PAGES, gc_plan.pages)):
        for start in range(0, len(ids), DELETE_BATCH):
            batch = ids[start : start + DELETE_BATCH]
            backend.write(_delete_ids, chunks, table, batch)
            done += len(batch)
            if progress is not None:
                progress(done, total)
    backend.write(_delete_entries, gc_plan)


def _delete_all(txn: WriteTxn, chunks: ChunkStore, gc_plan: GcPlan) -> None:
    chunks.delete_many(txn, Table.CHUNKS, gc_plan.chunks)
    chunks.delete_many(txn, Table.PAGES, gc_plan.pages)
    _delete_entries(txn, gc_plan)


def _delete_ids(txn: WriteTxn, chunks: ChunkStore, table: Table, ids) -> None:
    chunks.delete_many(txn, table, ids)


def _delete_entries(txn: WriteTxn, gc_plan: GcPlan) -> None:
    for key in gc_plan.trash_keys:
        txn.delete(Table.TRASH, key)
    for key in gc_plan.journal_keys:
        txn.delete(Table.JOURNAL, key)
    if gc_plan.deferred:  # same transaction: the ids stay findable
        entry = journal.encode_entry((Table.CHUNKS, cid) for cid in gc_plan.deferred)
        txn.put(Table.JOURNAL, journal.deferred_key(gc_plan.generation), entry)


def _collect(
    walker: PageWalker, manifest: Manifest, chunk_ids: set, pages: set, live_pages: AbstractSet[bytes] = frozenset()
) -> None:
    """Add the chunk and page ids of a manifest to ``chunk_ids`` and ``pages``.

    A page already in ``pages`` is not read again, nor is one in ``live_pages`` (the
    chunks of a live page are live, so never candidates).  A missing page is skipped: a
    killed GC frees a page's chunks before the page.
    """
    seen: AbstractSet[bytes] | _Union = pages if not live_pages else _Union(pages, live_pages)
    for _, node in manifest.components:
        for blob in iter_blobs(node):
            walk = walker.walk(blob, skip=seen)
            for kind, pid in walk.damaged:
                if kind == PAGE_MALFORMED:
                    raise CorruptDataError(f"chunk-list page {pid.hex()} of step {manifest.step} is malformed")
            pages.update(walk.pages)
            chunk_ids.update(split_ids(walk.chunk_ids))


class _Union:
    """``x in _Union(a, b)``: in either set, without building their union."""

    __slots__ = ("a", "b")

    def __init__(self, a: AbstractSet[bytes], b: AbstractSet[bytes]):
        self.a, self.b = a, b

    def __contains__(self, item) -> bool:
        return item in self.a or item in self.b


@dataclass(frozen=True, slots=True)
class StepAccount:
    """What one step costs in the store."""

    step: int
    logical_bytes: int  #: bytes of its state before deduplication
    referenced_bytes: int  #: stored bytes of the chunks and pages it references
    unique_bytes: int  #: of those, referenced by no other kept step: what deleting it frees
    shared_bytes: int  #: referenced_bytes - unique_bytes
    branch: str = MAIN


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Totals of a store."""

    steps: int
    chunks: int  #: chunks and chunk-list pages held (including garbage not yet collected)
    stored_bytes: int  #: bytes of those chunks and pages
    logical_bytes: int  #: sum over steps of each step's logical bytes
    file_bytes: int  #: disk bytes of the store

    @property
    def dedup_ratio(self) -> float:
        """Logical bytes of all steps per stored chunk byte (higher is better)."""
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else 1.0


def stats(chunks: ChunkStore, txn: ReadTxn, file_bytes: int) -> StoreStats:
    """Store totals from the counters and every manifest (small), reading no chunk."""
    count, stored = chunks.counters(txn)
    logical = steps = 0
    for _, value in txn.scan(Table.STEPS):
        logical += decode_manifest(value).logical_bytes
        steps += 1
    return StoreStats(steps=steps, chunks=count, stored_bytes=stored, logical_bytes=logical, file_bytes=file_bytes)

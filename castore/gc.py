"""Garbage collection: free the chunks and pages no kept step references.  Plan, then execute.

Where garbage comes from, and how GC finds it without scanning every chunk:

* a deleted (or overwritten) step's manifest moves to the ``trash`` database in the
  transaction that removes it from ``steps``;
* every batch of chunks a save commits is listed in the ``journal`` database, and the
  transaction that commits the save's manifest deletes those entries; entries left behind
  name the chunks of saves that failed or were killed.

The *candidates* are the ids named by trashed manifests and journal entries; the *live*
ids are those named by every kept step of every branch (their manifests and chunk-list pages, each unique
page read once).  Garbage = candidates - live.  So a plan costs what it frees plus the
live manifest pages, never a pass over the chunks.

Crash safety: execution deletes chunks first, then pages, then the trash and journal
entries, in batches of committed transactions.  A kill between batches leaves the trash
and journal entries in place, so the next GC finds what is left; no batch ever deletes a
live id.  Callers must hold the writer lock with no save in flight, and start a new
writer session afterwards (remembered chunk ids may now be gone).
"""

from __future__ import annotations

from dataclasses import dataclass

from .blobstore import BlobStore
from .catalog import MAIN, branch_of
from .errors import CorruptDataError
from .ids import ID_BYTES, split_ids
from .manifest import ChunkedBlob, Manifest, PagedBlob, decode_manifest, iter_blobs, page_ids_in
from .pipeline import JOURNAL_TAGS, add_counters

DELETE_BATCH = 4096  # ids deleted per transaction
DEFERRED_KEY = b"gc-defer"  # journal key prefix of garbage a later GC must reconsider
_DB_OF_TAG = {tag: db for db, tag in JOURNAL_TAGS.items()}


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
    generation: int  #: the store's last transaction id when planned

    @property
    def is_empty(self) -> bool:
        return not (self.chunks or self.pages or self.trash_keys or self.journal_keys or self.deferred)


def plan(blobs: BlobStore, txn, pinned: set = frozenset()) -> GcPlan:
    """Plan a collection from the state seen by read transaction ``txn``.

    ``pinned`` ids (remembered by baselines a next save may reuse) are not freed but
    listed in a journal entry, so a later GC reconsiders them.
    """
    live_chunks, live_pages = set(), set()
    for raw in txn.cursor(db=blobs.dbs["steps"]).iternext(keys=False):
        _collect(txn, blobs, decode_manifest(raw), live_chunks, live_pages)
    cand_chunks, cand_pages, steps, trash_keys = set(), set(), [], []
    if blobs.dbs["trash"] is not None:
        for key, raw in txn.cursor(db=blobs.dbs["trash"]).iternext():
            manifest = decode_manifest(raw)
            steps.append(manifest.step)
            trash_keys.append(bytes(key))
            _collect(txn, blobs, manifest, cand_chunks, cand_pages, live_pages=live_pages)
    journal_keys = []
    if blobs.dbs["journal"] is not None:
        for key, raw in txn.cursor(db=blobs.dbs["journal"]).iternext():
            journal_keys.append(bytes(key))
            _collect_journal(bytes(raw), cand_chunks, cand_pages)
    garbage = _sizes_present(txn, blobs, "chunks", cand_chunks - live_chunks)
    chunks = sorted(garbage.keys() - pinned)
    deferred = tuple(sorted(garbage.keys() & pinned))
    page_sizes = _sizes_present(txn, blobs, "pages", cand_pages - live_pages)
    pages = sorted(page_sizes)
    freed = sum(garbage[c] for c in chunks) + sum(page_sizes.values())
    return GcPlan(tuple(sorted(set(steps))), tuple(chunks), tuple(pages), deferred, freed, tuple(trash_keys),
                  tuple(journal_keys), len(live_pages), blobs.env.info()["last_txnid"])


def execute(blobs: BlobStore, gc_plan: GcPlan) -> None:
    """Free what ``gc_plan`` lists, in batches; crash-safe (see the module docstring)."""
    for db, ids in (("chunks", gc_plan.chunks), ("pages", gc_plan.pages)):
        for start in range(0, len(ids), DELETE_BATCH):
            blobs.write(_delete_ids, blobs, db, ids[start : start + DELETE_BATCH])
    blobs.write(_delete_entries, blobs, gc_plan)


def _delete_ids(txn, blobs: BlobStore, db: str, ids) -> None:
    count = nbytes = 0
    for cid in ids:
        value = txn.get(cid, db=blobs.dbs[db])
        if value is not None:  # gone already if an earlier execution was killed midway
            nbytes += len(value)
            count += 1
            txn.delete(cid, db=blobs.dbs[db])
    add_counters(txn, blobs, -count, -nbytes)


def _delete_entries(txn, blobs: BlobStore, gc_plan: GcPlan) -> None:
    for key in gc_plan.trash_keys:
        txn.delete(key, db=blobs.dbs["trash"])
    for key in gc_plan.journal_keys:
        txn.delete(key, db=blobs.dbs["journal"])
    if gc_plan.deferred:  # same transaction: the ids stay findable
        entry = b"".join(JOURNAL_TAGS["chunks"] + cid for cid in gc_plan.deferred)
        txn.put(DEFERRED_KEY + gc_plan.generation.to_bytes(8, "big"), entry, db=blobs.dbs["journal"])


def _collect(txn, blobs: BlobStore, manifest: Manifest, chunks: set, pages: set,
             live_pages: set = frozenset()) -> None:
    """Add the chunk and page ids of a manifest to ``chunks`` and ``pages``.

    A page already in ``pages`` is not read again, nor is one in ``live_pages`` (the
    chunks of a live page are live, so never candidates).
    """
    for _, node in manifest.components:
        for blob in iter_blobs(node):
            if isinstance(blob, ChunkedBlob):
                chunks.update(split_ids(blob.ids))
            elif isinstance(blob, PagedBlob):
                for pid in split_ids(blob.page_ids):
                    if pid in pages or pid in live_pages:
                        continue
                    pages.add(pid)
                    page = txn.get(pid, db=blobs.dbs["pages"])
                    if page is not None:  # a page freed by a killed GC: its chunks went first
                        chunks.update(split_ids(page_ids_in(bytes(page))))


def _collect_journal(raw: bytes, chunks: set, pages: set) -> None:
    step = 1 + ID_BYTES
    if len(raw) % step:
        raise CorruptDataError(f"journal entry of {len(raw)} bytes is malformed")
    for start in range(0, len(raw), step):
        db = _DB_OF_TAG.get(raw[start : start + 1])
        if db is None:
            raise CorruptDataError("journal entry names an unknown database")
        (chunks if db == "chunks" else pages).add(raw[start + 1 : start + step])


def _sizes_present(txn, blobs: BlobStore, db: str, ids: set) -> dict[bytes, int]:
    """``{id: value bytes}`` of the ids the database holds (one lookup each)."""
    sizes = {}
    for cid in ids:
        value = txn.get(cid, db=blobs.dbs[db])
        if value is not None:
            sizes[cid] = len(value)
    return sizes


@dataclass(frozen=True, slots=True)
class StepAccount:
    """What one step costs in the store."""

    step: int
    logical_bytes: int  #: bytes of its state before deduplication
    referenced_bytes: int  #: stored bytes of the chunks and pages it references
    unique_bytes: int  #: of those, referenced by no other kept step: what deleting it frees
    shared_bytes: int  #: referenced_bytes - unique_bytes
    branch: str = MAIN


def account(blobs: BlobStore, txn) -> list[StepAccount]:
    """Per-step accounting over every kept step of every branch (reads manifests and pages,
    not chunks).  A step forked to another branch shares all its bytes with its source."""
    per_step, counts = [], {}
    for key, raw in txn.cursor(db=blobs.dbs["steps"]).iternext():
        manifest = decode_manifest(raw)
        chunks, pages = set(), set()
        _collect(txn, blobs, manifest, chunks, pages)
        ids = {("chunks", c) for c in chunks} | {("pages", p) for p in pages}
        per_step.append((manifest, branch_of(key), ids))
        for key in ids:
            counts[key] = counts.get(key, 0) + 1
    sizes = {}
    for db, cid in counts:
        value = txn.get(cid, db=blobs.dbs[db])
        sizes[(db, cid)] = 0 if value is None else len(value)
    accounts = []
    for manifest, branch, ids in per_step:
        referenced = sum(sizes[k] for k in ids)
        unique = sum(sizes[k] for k in ids if counts[k] == 1)
        accounts.append(StepAccount(manifest.step, manifest.logical_bytes, referenced, unique, referenced - unique, branch))
    return accounts

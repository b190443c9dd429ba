"""The one chunk store: every chunk and chunk-list page is read, written, sized and deleted
here, and the one walk from a blob to its chunk ids (used by load, GC and verify).

Chunks live in the ``chunks`` table keyed by their id, pages (each a run of up to
``PAGE_IDS`` chunk ids) in ``pages``; ``meta/counters`` counts both and is kept in the
transaction that changes them.  This is where per-chunk codecs and a remote tier plug in:
nothing else reads or writes those tables.  Every method works inside a transaction the
caller holds, so a caller can make a chunk write atomic with other records.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
from dataclasses import dataclass, field

import numpy as np

from ..errors import CastoreError, ChunkCorruptError, ChunkMissingError, CorruptDataError
from ..format import journal
from ..format.chunker import chunk_count
from ..format.compression import decode_into, is_encoded
from ..format.config import CONFIG_KEY, parse_config
from ..format.ids import ID_BYTES, chunk_id, fingerprint, short, split_ids
from ..format.manifest import Blob, ChunkedBlob, PagedBlob, page_ids_in
from ..format.schema import Table
from .base import Backend, Buffer, ReadTxn, WriteTxn

log = logging.getLogger("castore.storage")

#: why a page could not be used: absent, bytes not matching its id, or not a page at all
PAGE_MISSING, PAGE_CORRUPT, PAGE_MALFORMED = "page-missing", "page-corrupt", "page-malformed"


def run_tasks(pool, tasks: list) -> None:
    """Run zero-argument ``tasks`` on ``pool`` (one alone in the caller) and wait for every
    one to end before raising the first error: a task still running after its read
    transaction closed would read (and release) memory of a map that may have moved."""
    if len(tasks) <= 1:
        for task in tasks:
            task()
        return
    futures = [pool.submit(task) for task in tasks]
    concurrent.futures.wait(futures)
    for future in futures:
        future.result()


@dataclass(frozen=True, slots=True)
class BlobRead:
    """The reads of one blob (:meth:`ChunkStore.blob_read`): run every task, then ask
    :meth:`result`."""

    ids: bytes  #: the blob's chunk ids, concatenated
    tasks: list  #: one zero-argument callable per chunk
    prints: list | None  #: filled by the tasks with each chunk's fingerprint, if asked

    def result(self) -> tuple[bytes, bytes | None]:
        """``(chunk ids, fingerprints or None)``, both concatenated, once the tasks ran."""
        return self.ids, None if self.prints is None else b"".join(self.prints)


@dataclass(frozen=True, slots=True)
class PutCount:
    """What :meth:`ChunkStore.put_many` did."""

    new: list  #: ``(table, id)`` of the items that were not stored before
    reused: int  #: items already stored (left as they were)
    new_bytes: int  #: stored bytes of the new items


class ChunkStore:
    """Chunks and pages of one store (see the module docstring)."""

    def __init__(self, backend: Backend):
        self.backend = backend

    # -- reading -----------------------------------------------------------------------------

    def get(self, txn: ReadTxn, cid: bytes, table: Table = Table.CHUNKS) -> Buffer | None:
        """The stored bytes of a chunk (or page), valid until ``txn`` ends; None if absent."""
        return txn.get(table, cid)

    def get_many(self, txn: ReadTxn, ids, table: Table = Table.CHUNKS) -> list:
        """The stored bytes of each id (None where absent), valid until ``txn`` ends (a
        bucket's snapshot fetches them together: coalesced ranged reads, many at once)."""
        many = getattr(txn, "get_many", None)
        if many is not None:
            return many(table, ids)
        return [txn.get(table, cid) for cid in ids]

    def has_all(self, txn: ReadTxn, ids: bytes) -> bool:
        """True if every chunk of the concatenated ``ids`` is stored (a lookup each; LMDB
        faults a value's pages in to return it, so each is released at once)."""
        for cid in split_ids(ids):
            value = txn.get(Table.CHUNKS, cid)
            if value is None:
                return False
            txn.release(value)
        return True

    def sizes(self, txn: ReadTxn, table: Table, ids) -> dict[bytes, int]:
        """``{id: stored bytes}`` of the ids present (one lookup each)."""
        out = {}
        for cid in ids:
            value = txn.get(table, cid)
            if value is not None:
                out[cid] = len(value)
        return out

    def counters(self, txn: ReadTxn) -> tuple[int, int]:
        """``(chunks and pages held, their stored bytes)``, from ``meta/counters``."""
        return journal.decode_counters(txn.get(Table.META, journal.COUNTERS_KEY))

    def blob_read(
        self,
        txn: ReadTxn,
        walker: PageWalker,
        blob: Blob,
        out: np.ndarray,
        *,
        verify: bool,
        context: dict,
        fingerprints: bool = False,
    ) -> BlobRead:
        """The reads that fill the flat uint8 array ``out`` with a chunked blob's bytes:
        one task per chunk, to run on any thread while ``txn`` is open.

        Each task decodes its chunk straight into ``out``, to exactly its length, releases
        its stored bytes from memory at once (:meth:`ReadTxn.release`) and, with
        ``verify``, checks the decoded bytes' BLAKE3.  Pages are walked and chunks looked
        up here, so a missing one raises before any task runs.  Raises
        :class:`ChunkMissingError` / :class:`ChunkCorruptError` with ``context`` (step,
        component, path) and the chunk id.
        """
        if not isinstance(blob, (ChunkedBlob, PagedBlob)):
            raise CorruptDataError(f"unexpected blob {type(blob).__name__} at {context}")
        ids = walker.ids(blob, context)
        stride = blob.chunk_nbytes
        wanted = split_ids(ids)
        views: list = []
        if getattr(txn, "deferred_reads", False):
            # a bucket: a look-up is a request, so each task fetches its own chunk (``workers``
            # at once) and only the index is asked here; memory holds the chunks in flight
            has = txn.has  # type: ignore[attr-defined]  # the capability deferred_reads announces
            for index, cid in enumerate(wanted):
                if not has(Table.CHUNKS, cid):
                    raise ChunkMissingError("chunk is missing", chunk_id=short(cid), **context)
                views.append((index, cid, None))
        else:
            for index, (cid, view) in enumerate(zip(wanted, self.get_many(txn, wanted))):
                if view is None:
                    raise ChunkMissingError("chunk is missing", chunk_id=short(cid), **context)
                # the look-up maps the value's pages (whole large folios on ext4): unmap them until
                # the task decodes it, or a restore holds every chunk of the blob in RSS at once
                txn.release(view)
                views.append((index, cid, view))

        dest = memoryview(out)  # type: ignore[arg-type]  # numpy arrays are buffers
        prints: list = [b""] * len(views) if fingerprints else []

        def fill(item) -> None:
            index, cid, view = item
            if view is None:  # deferred: fetched here, on the task's thread
                view = txn.get(Table.CHUNKS, cid)
                if view is None:
                    raise ChunkMissingError("chunk is missing", chunk_id=short(cid), **context)
            start = index * stride
            target = dest[start : min(start + stride, blob.nbytes)]
            if not _decode(view, target, cid, verify, context):
                raise ChunkCorruptError("chunk bytes do not match its id", chunk_id=short(cid), **context)
            txn.release(view)
            if fingerprints:
                prints[index] = fingerprint(target)

        return BlobRead(ids, [functools.partial(fill, item) for item in views], prints if fingerprints else None)

    def intact(self, value, cid: bytes, nbytes: int, scratch: bytearray | None = None) -> bool:
        """True if the stored ``value`` decodes to ``nbytes`` bytes whose BLAKE3 is ``cid``.

        An encoded value is decoded into ``scratch`` (grown as needed; one per thread).
        """
        if not is_encoded(value):
            return len(value) == nbytes and chunk_id(value) == cid
        buffer = scratch if scratch is not None else bytearray(nbytes)
        if len(buffer) < nbytes:
            buffer.extend(bytes(nbytes - len(buffer)))
        try:
            return _decode(value, memoryview(buffer)[:nbytes], cid, True, {})
        except ChunkCorruptError:
            return False

    # -- writing -----------------------------------------------------------------------------

    def put_many(self, txn: WriteTxn, items) -> PutCount:
        """Put ``(table, id, bytes)`` items absent so far (put-if-absent: content-addressed
        values are never rewritten); counts them into ``meta/counters``."""
        new, reused, new_bytes = [], 0, 0
        for table, cid, view in items:
            if txn.put_new(table, cid, view):
                new.append((table, cid))
                new_bytes += len(view)
            else:
                reused += 1
        self._add_counters(txn, len(new), new_bytes)
        return PutCount(new, reused, new_bytes)

    def delete_many(self, txn: WriteTxn, table: Table, ids) -> tuple[int, int]:
        """Delete the ids present; returns ``(count, bytes)`` freed (also off the counters)."""
        count = nbytes = 0
        for cid in ids:
            value = txn.get(table, cid)
            if value is not None:  # gone already if an earlier deletion was killed midway
                nbytes += len(value)
                count += 1
                txn.delete(table, cid)
        self._add_counters(txn, -count, -nbytes)
        if count:
            try:
                before = self.deletions(txn)
            except CorruptDataError:  # damaged: a mark nobody recorded, so every mark is stale
                before = 1 << 62
            txn.put(Table.META, journal.DELETIONS_KEY, journal.encode_deletions(before + count))
        return count, nbytes

    def deletions(self, txn: ReadTxn) -> int:
        """How many chunks and pages were ever deleted (``meta/deletions``): unchanged
        between two snapshots means every chunk stored in the first is still stored."""
        return journal.decode_deletions(txn.get(Table.META, journal.DELETIONS_KEY))

    def deletion_mark(self, txn: ReadTxn) -> int | None:
        """:meth:`deletions` if every writer of this store keeps it (format 4), else None."""
        raw = txn.get(Table.META, CONFIG_KEY)
        try:
            if raw is None or parse_config(bytes(raw), self.backend.path).format < 4:
                return None
            return self.deletions(txn)
        except CastoreError:
            return None

    def _add_counters(self, txn: WriteTxn, chunks: int, nbytes: int) -> None:
        if not chunks and not nbytes:
            return
        try:
            have_chunks, have_bytes = self.counters(txn)
        except CorruptDataError as exc:  # a damaged record must not stop every save: count anew
            log.warning("%s: %s; recounting the chunks and pages", self.backend.path, exc)
            have_chunks, have_bytes = self.recount(txn)
            chunks = nbytes = 0  # the recount sees this transaction's own puts and deletes
        total_chunks, total_bytes = have_chunks + chunks, have_bytes + nbytes
        if total_chunks < 0 or total_bytes < 0:  # counters that drifted (a bug): count anew
            log.warning("%s: meta/counters went negative; recounting the chunks and pages", self.backend.path)
            total_chunks, total_bytes = self.recount(txn)
        txn.put(Table.META, journal.COUNTERS_KEY, journal.encode_counters(total_chunks, total_bytes))

    def recount(self, txn: ReadTxn) -> tuple[int, int]:
        """``(chunks and pages held, their bytes)`` counted from the tables (a full scan)."""
        count = nbytes = 0
        for table in (Table.CHUNKS, Table.PAGES):
            for _, value in txn.scan(table):
                count += 1
                nbytes += len(value)
        return count, nbytes


def _decode(value, target: memoryview, cid: bytes, verify: bool, context: dict) -> bool:
    """Decode ``value`` into ``target``; False if ``verify`` finds the wrong bytes there.

    A store of format 1-3 holds raw chunks only, and one may begin with the encoded-value
    header by chance: a value of exactly the raw length that does not decode to the chunk
    is read as raw bytes before it is judged damaged.
    """
    try:
        decode_into(value, target, context, short(cid))
        if not verify or chunk_id(target) == cid:
            return True
    except ChunkCorruptError:
        if len(value) != len(target) or not is_encoded(value):
            raise
    if len(value) != len(target) or not is_encoded(value):
        return False
    target[:] = value
    return not verify or chunk_id(target) == cid


@dataclass(slots=True)
class Walk:
    """What a tolerant walk of one blob found (see :meth:`PageWalker.walk`)."""

    chunk_ids: bytes = b""  #: concatenated ids of the chunks the readable, unskipped pages list
    pages: list = field(default_factory=list)  #: page ids this walk read (not skipped)
    damaged: list = field(default_factory=list)  #: ``(PAGE_*, page id)`` of unusable pages
    listed: int | None = None  #: chunks the pages list, when that is not what the blob needs

    @property
    def complete(self) -> bool:
        """True if ``chunk_ids`` is every chunk of the blob."""
        return not self.damaged and self.listed is None


class PageWalker:
    """The walk from a blob to its chunk ids, through its chunk-list pages, in one snapshot.

    Each page is read once per walker however many blobs share it; with ``check_pages``
    its bytes are also hashed against its id (a load with verification, verify), else only
    its shape is checked (a load without verification, GC).
    """

    def __init__(self, txn: ReadTxn, *, check_pages: bool):
        self.txn = txn
        self.check_pages = check_pages
        self._pages: dict[bytes, bytes | str] = {}  # page id -> its ids, or a PAGE_* problem

    def page(self, pid: bytes) -> bytes | str:
        """The ids page ``pid`` lists, or why it cannot be used (a ``PAGE_*`` string)."""
        found = self._pages.get(pid)
        if found is None:
            raw = self.txn.get(Table.PAGES, pid)
            if raw is None:
                found = PAGE_MISSING
            elif self.check_pages and chunk_id(raw) != pid:
                found = PAGE_CORRUPT
            else:
                try:
                    found = page_ids_in(bytes(raw))
                except CorruptDataError:
                    found = PAGE_MALFORMED
            self._pages[pid] = found
        return found

    def ids(self, blob: Blob, context: dict) -> bytes:
        """Every chunk id of ``blob``, concatenated; raises for an unusable page.

        :class:`ChunkMissingError` for a missing page, :class:`ChunkCorruptError` for one
        whose bytes do not match its id, :class:`CorruptDataError` for a malformed one or
        pages that list a wrong number of chunks.
        """
        if isinstance(blob, ChunkedBlob):
            return blob.ids
        if not isinstance(blob, PagedBlob):
            raise CorruptDataError(f"unexpected blob {type(blob).__name__}")
        ids = bytearray()
        for pid in split_ids(blob.page_ids):
            page = self.page(pid)
            if page == PAGE_MISSING:
                raise ChunkMissingError("chunk-list page is missing", chunk_id=short(pid), **context)
            if page == PAGE_CORRUPT:
                raise ChunkCorruptError("chunk-list page does not match its id", chunk_id=short(pid), **context)
            if isinstance(page, str):
                raise CorruptDataError(f"chunk-list page {short(pid)} of {context} is malformed")
            ids += page
        if len(ids) != chunk_count(blob.nbytes, blob.chunk_nbytes) * ID_BYTES:
            raise CorruptDataError(f"chunk-list pages of {context} list a wrong number of chunks")
        return bytes(ids)

    def walk(self, blob: Blob, skip=frozenset()) -> Walk:
        """The chunk ids of ``blob`` that can be found, and what stood in the way; never raises.

        Pages in ``skip`` are neither read nor listed (GC passes the pages it has seen, so
        the chunks of a page shared by many steps are collected once).
        """
        if isinstance(blob, ChunkedBlob):
            return Walk(chunk_ids=blob.ids)
        walk = Walk()
        if not isinstance(blob, PagedBlob):
            return walk
        ids = bytearray()
        skipped = False
        for pid in split_ids(blob.page_ids):
            if pid in skip:
                skipped = True
                continue
            page = self.page(pid)
            walk.pages.append(pid)
            if isinstance(page, str):
                walk.damaged.append((page, pid))
            else:
                ids += page
        walk.chunk_ids = bytes(ids)
        if not walk.damaged and not skipped:
            listed = len(ids) // ID_BYTES
            if listed != chunk_count(blob.nbytes, blob.chunk_nbytes):
                walk.listed = listed
        return walk

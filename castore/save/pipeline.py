"""The write phase of a save: hash changed chunks in parallel, put them in batched transactions.

Hash threads (BLAKE3 releases the GIL) run ahead of one writer thread that puts chunks
with put-if-absent and commits every ``BATCH_BYTES``, so hashing overlaps writing.  The
last batch is not committed by the writer thread: it is handed to the transaction that
commits the manifest (:meth:`SaveJob.put_last_batch`), so a save that fits one batch is
one commit.  Either way chunks are committed no later than the manifest that names them,
so a crash leaves at most unreferenced chunks of the batches committed before it (listed
in the journal for GC), never a step naming a missing chunk.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

from ..errors import SaveError
from ..format import journal
from ..format.chunker import chunk_slices
from ..format.compression import LeafChoices, stored_value
from ..format.ids import ID_BYTES, chunk_id
from ..format.keys import prefix_stop
from ..format.manifest import INLINE_IDS, PAGE_IDS, ChunkedBlob, PagedBlob
from ..format.schema import Table
from ..storage.base import WriteTxn
from ..storage.chunks import ChunkStore, PutCount
from .capture import Capture, PendingBlob, Staging

BATCH_BYTES = 128 << 20
HASH_GROUP = 8  # chunks hashed per thread-pool task
_FLUSH, _END = object(), object()


class ChunkSink:
    """Writer thread: puts ``(table, id, view)`` items, commits per batch; counts what was new.

    Every batch but the last is committed on the writer thread with a journal entry; the
    last (what :meth:`finish` leaves) goes into the manifest's transaction, which needs no
    journal entry for it: those chunks become visible with the manifest or not at all.
    """

    def __init__(self, chunks: ChunkStore):
        self.chunks = chunks
        self.token = os.urandom(journal.TOKEN_BYTES)  # names this save's journal entries
        self._batches = 0
        self.new_chunks = self.reused_chunks = self.new_bytes = 0
        self._queue: queue.Queue = queue.Queue(maxsize=4096)
        self._error: BaseException | None = None
        self._aborted = False
        self._last: list = []  # the batch finish() left for the manifest's transaction
        self._last_count: PutCount | None = None  # what its latest put did (a re-run overwrites it)
        self._thread = threading.Thread(target=self._run, name="castore-writer", daemon=True)
        self._thread.start()

    def put(self, table: Table, cid: bytes, view) -> None:
        self._raise_if_failed()
        self._queue.put((table, cid, view))

    def flush(self) -> None:
        """Return once every queued item is in a committed transaction (buffers reusable)."""
        self._queue.put(_FLUSH)
        self._queue.join()
        self._raise_if_failed()

    def finish(self) -> None:
        """Stop the writer; the items not committed yet are left as :attr:`last_batch`.

        The caller puts them with :meth:`put_last_batch` in the transaction that commits
        the manifest, or commits them alone with :meth:`commit_last_batch`; their buffers
        must stay unchanged until then.
        """
        self._queue.put(_END)
        self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop without committing the pending batch (earlier batches stay as garbage)."""
        self._aborted = True
        self._queue.put(_END)
        self._thread.join()
        self._last = []

    @property
    def last_batch(self) -> list:
        return self._last

    @property
    def last_batch_bytes(self) -> int:
        return sum(len(view) for _, _, view in self._last)

    def put_last_batch(self, txn: WriteTxn, attempts: list) -> None:
        """Put the last batch in ``txn``, the manifest's transaction (no journal entry).

        ``attempts`` is the caller's list, appended to on every run of the transaction's
        ``fn``: on a re-run the buffers are checked again.  Counted once it committed
        (:meth:`last_batch_committed`).
        """
        if not self._last:
            return
        if len(attempts) > 1:
            _check_unchanged(self._last)
        self._last_count = self.chunks.put_many(txn, self._last)

    def written_bytes(self) -> int:
        """Bytes of new chunks committed so far, and of the last batch as put (in the
        manifest's transaction, which is running)."""
        return self.new_bytes + (self._last_count.new_bytes if self._last_count is not None else 0)

    def last_batch_committed(self) -> None:
        """The transaction holding :meth:`put_last_batch` committed: count it."""
        if self._last_count is not None:
            self._count(self._last_count)
        self._last, self._last_count = [], None

    def commit_last_batch(self) -> None:
        """Commit the last batch alone, with its journal entry (no manifest is committed)."""
        batch, self._last = self._last, []
        self._commit(batch)
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if isinstance(self._error, SaveError):
            raise self._error
        if self._error is not None:
            raise SaveError(f"writing chunks failed: {self._error}") from self._error

    def _run(self) -> None:
        batch: list = []
        size = 0
        while True:
            item = self._queue.get()
            try:
                if item is _END:
                    if not self._aborted and self._error is None:
                        self._last = batch
                    return
                if item is _FLUSH:
                    self._commit(batch)
                    batch, size = [], 0
                else:
                    batch.append(item)
                    size += len(item[2])
                    if size >= BATCH_BYTES:
                        self._commit(batch)
                        batch, size = [], 0
            finally:
                self._queue.task_done()

    def _commit(self, batch: list) -> None:
        if not batch or self._aborted or self._error is not None:
            return
        try:
            backend = self.chunks.backend
            backend.reserve(sum(len(view) for _, _, view in batch))
            count = backend.write(self._put_batch, batch, [])
        except BaseException as exc:  # reported to the saving thread by put/flush/finish
            self._error = exc
            return
        self._batches += 1
        self._count(count)

    def _count(self, count: PutCount) -> None:
        self.new_chunks += len(count.new)
        self.reused_chunks += count.reused
        self.new_bytes += count.new_bytes

    def _put_batch(self, txn: WriteTxn, batch: list, attempts: list):
        attempts.append(1)
        if len(attempts) > 1:  # a retry after map growth: the buffers must still match
            _check_unchanged(batch)
        count = self.chunks.put_many(txn, batch)
        if count.new:  # until the manifest commits, GC may free these if the save never does
            txn.put(Table.JOURNAL, journal.entry_key(self.token, self._batches), journal.encode_entry(count.new))
        return count


def _check_unchanged(batch: list) -> None:
    """Before a retried put: a live buffer must still hold the bytes its id was hashed from
    (encoded values and pages are bytes of ours and cannot change)."""
    for table, cid, view in batch:
        if isinstance(view, bytes) or (isinstance(view, memoryview) and isinstance(view.obj, bytes)):
            continue  # immutable: a pull's stored values, views of the bytes it fetched
        if table is Table.CHUNKS and chunk_id(view) != cid:
            raise SaveError("a buffer changed while it was being saved; save again")


def drop_journal(txn: WriteTxn, token: bytes) -> None:
    """Delete a save's journal entries (in the transaction that commits its manifest)."""
    for key in [bytes(k) for k, _ in txn.scan(Table.JOURNAL, token, prefix_stop(token))]:
        txn.delete(Table.JOURNAL, key)


def write_blob(
    blob: PendingBlob, sink: ChunkSink, pool: ThreadPoolExecutor, workers: int, choices: LeafChoices | None = None
) -> None:
    """Hash (and encode, as ``choices`` says) the captured chunks of ``blob`` on the pool
    and queue them for writing.

    Sets ``blob.resolved`` to its ChunkedBlob (or PagedBlob, whose chunk-list pages are
    queued too) and ``blob.new_ids`` to every chunk id in order.
    """
    todo = sorted(blob.buffers)
    buffers = [blob.buffers[i] for i in todo]
    level = choices.level_for(blob.path, buffers[0]) if choices is not None and buffers else None
    done = _hash_in_order(buffers, pool, workers, level)
    for index, (cid, value) in zip(todo, done):  # ids arrive in order as hashing proceeds
        sink.put(Table.CHUNKS, cid, value)
        blob.ids[index] = cid
    packed = b"".join(blob.ids)
    blob.new_ids = packed
    if len(blob.ids) <= INLINE_IDS:
        blob.resolved = ChunkedBlob(blob.nbytes, blob.chunk_nbytes, packed)
    else:
        blob.resolved = PagedBlob(blob.nbytes, blob.chunk_nbytes, _write_pages(packed, sink))


def hash_chunks(buffer, chunk_nbytes: int, pool: ThreadPoolExecutor, workers: int) -> list[bytes]:
    """Chunk ids of a flat buffer as a save computes them (for benchmarks and tools)."""
    views = [buffer[a:b] for a, b in chunk_slices(len(buffer), chunk_nbytes)]
    return [cid for cid, _ in _hash_in_order(views, pool, workers, None)]


def _hash_in_order(buffers: list, pool: ThreadPoolExecutor, workers: int, level: int | None):
    """Yield ``(id, value to store)`` of ``buffers`` in order, hashed and encoded (at zstd
    ``level``; None: stored raw) on the pool, up to ``HASH_GROUP`` per task.

    Groups keep the pool's per-task cost (~20 us) small against hashing a 1 MiB chunk
    (~130 us), while ids still arrive early enough for the writer to overlap; a leaf of few
    chunks is still spread over every thread.
    """

    def one(buffer) -> tuple[bytes, object]:
        return chunk_id(buffer), stored_value(buffer, level)

    if len(buffers) <= 1:
        yield from map(one, buffers)
        return
    group = max(1, min(HASH_GROUP, len(buffers) // max(workers, 1)))
    groups = [buffers[i : i + group] for i in range(0, len(buffers), group)]
    for done in pool.map(lambda group: [one(b) for b in group], groups):
        yield from done


def _write_pages(packed: bytes, sink: ChunkSink) -> bytes:
    page_ids = bytearray()
    step = PAGE_IDS * ID_BYTES
    for start in range(0, len(packed), step):
        page = packed[start : start + step]
        pid = chunk_id(page)
        sink.put(Table.PAGES, pid, page)
        page_ids += pid
    return bytes(page_ids)


class SaveJob:
    """The write phase of one save: hash what capture found changed, queue it, commit."""

    def __init__(
        self,
        chunks: ChunkStore,
        pool: ThreadPoolExecutor,
        capture: Capture,
        staging: Staging,
        choices: LeafChoices | None = None,
    ):
        self.chunks = chunks
        self.choices = choices
        self.pool = pool
        self.capture = capture
        self.staging = staging
        self._sink: ChunkSink | None = None
        self._written = 0

    @property
    def sink(self) -> ChunkSink:
        if self._sink is None:
            self._sink = ChunkSink(self.chunks)
        return self._sink

    def flush(self) -> None:
        """Write and commit every chunk captured so far (a sharded save, between shards)."""
        self._write_captured()
        self.sink.flush()

    def finish(self) -> None:
        """Write every captured chunk, committing all but the last batch; the blobs are
        then resolved.  The last batch waits for :meth:`put_last_batch` (or :meth:`done`)."""
        self._write_captured()
        self.sink.finish()

    @property
    def last_batch_bytes(self) -> int:
        return 0 if self._sink is None else self._sink.last_batch_bytes

    def put_last_batch(self, txn: WriteTxn, attempts: list) -> None:
        """Put the chunks :meth:`finish` left in ``txn``, which commits the manifest."""
        if self._sink is not None:
            self._sink.put_last_batch(txn, attempts)

    def written_bytes(self) -> int:
        """Stored bytes this save added, its last batch included once put (see ChunkSink)."""
        return self._sink.written_bytes() if self._sink is not None else 0

    def commit_last_batch(self) -> None:
        """Commit the chunks :meth:`finish` left on their own (no manifest needs committing:
        the same state was committed already).  Raises :class:`SaveError`."""
        if self._sink is not None:
            self._sink.commit_last_batch()

    def done(self, *, manifest_committed: bool) -> None:
        """After the manifest's transaction: count the last batch if it committed with it
        (else it is dropped: nothing of it was committed); release the buffers."""
        if self._sink is not None and manifest_committed:
            self._sink.last_batch_committed()
        self._release()

    def abort(self) -> None:
        if self._sink is not None:
            self._sink.abort()
        self._release()

    def _write_captured(self) -> None:
        pending = self.capture.pending
        for blob in pending[self._written :]:
            write_blob(blob, self.sink, self.pool, self.capture.workers, self.choices)
        self._written = len(pending)

    def _release(self) -> None:
        for blob in self.capture.pending:
            self.staging.release(blob.buffers.values())
            blob.buffers = {}

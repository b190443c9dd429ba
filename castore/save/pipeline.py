"""The write phase of a save: hash changed chunks in parallel, put them in batched transactions.

Hash threads (BLAKE3 releases the GIL) run ahead of one writer thread that puts chunks
with put-if-absent and commits every ``BATCH_BYTES``, so hashing overlaps writing.
Chunks are committed before the manifest that names them, so a crash leaves at most
unreferenced chunks (listed in the journal for GC), never a step naming a missing chunk.
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
from ..storage.chunks import ChunkStore
from .capture import Capture, PendingBlob, Staging

BATCH_BYTES = 128 << 20
HASH_GROUP = 8  # chunks hashed per thread-pool task
_FLUSH, _END = object(), object()


class ChunkSink:
    """Writer thread: puts ``(table, id, view)`` items, commits per batch; counts what was new."""

    def __init__(self, chunks: ChunkStore):
        self.chunks = chunks
        self.token = os.urandom(journal.TOKEN_BYTES)  # names this save's journal entries
        self._batches = 0
        self.new_chunks = self.reused_chunks = self.new_bytes = 0
        self._queue: queue.Queue = queue.Queue(maxsize=4096)
        self._error: BaseException | None = None
        self._aborted = False
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
        self._queue.put(_END)
        self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop without committing the pending batch (earlier batches stay as garbage)."""
        self._aborted = True
        self._queue.put(_END)
        self._thread.join()

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
                if item is _FLUSH or item is _END:
                    self._commit(batch)
                    batch, size = [], 0
                    if item is _END:
                        return
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
        self.new_chunks += len(count.new)
        self.reused_chunks += count.reused
        self.new_bytes += count.new_bytes

    def _put_batch(self, txn: WriteTxn, batch: list, attempts: list):
        attempts.append(1)
        if len(attempts) > 1:  # a retry after map growth: the buffers must still match
            for table, cid, view in batch:  # encoded values are bytes of ours: cannot change
                if table is Table.CHUNKS and not isinstance(view, bytes) and chunk_id(view) != cid:
                    raise SaveError("a buffer changed while it was being saved; save again")
        count = self.chunks.put_many(txn, batch)
        if count.new:  # until the manifest commits, GC may free these if the save never does
            txn.put(Table.JOURNAL, journal.entry_key(self.token, self._batches), journal.encode_entry(count.new))
        return count


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
        """Commit every captured chunk; the blobs are then resolved."""
        self._write_captured()
        self.sink.finish()
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

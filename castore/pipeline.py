"""The write side of a save: chunk a buffer, hash in parallel, put in batched transactions.

Hash threads (BLAKE3 releases the GIL) run ahead of one writer thread that puts chunks
with put-if-absent and commits every ``BATCH_BYTES``.  Chunks are committed before the
manifest that names them, so a crash leaves at most unreferenced chunks, never a step
that names a missing chunk.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor

from .blobstore import BlobStore
from .chunker import chunk_nbytes_for, chunk_slices
from .errors import SaveError
from .ids import ID_BYTES, chunk_id
from .manifest import INLINE_IDS, PAGE_IDS, ChunkedBlob, PagedBlob

BATCH_BYTES = 256 << 20
_FLUSH, _END = object(), object()


class ChunkSink:
    """Writer thread: puts ``(db, id, view)`` items, commits per batch; counts what was new."""

    def __init__(self, blobs: BlobStore):
        self.blobs = blobs
        self.new_chunks = self.reused_chunks = self.new_bytes = 0
        self._queue: queue.Queue = queue.Queue(maxsize=4096)
        self._error: BaseException | None = None
        self._aborted = False
        self._thread = threading.Thread(target=self._run, name="castore-writer", daemon=True)
        self._thread.start()

    def put(self, db: str, cid: bytes, view) -> None:
        self._raise_if_failed()
        self._queue.put((db, cid, view))

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
        batch, size = [], 0
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
            self.blobs.reserve(sum(len(view) for _, _, view in batch))
            new_chunks, reused, new_bytes = self.blobs.write(self._put_batch, batch, [])
        except BaseException as exc:  # reported to the saving thread by put/flush/finish
            self._error = exc
            return
        self.new_chunks += new_chunks
        self.reused_chunks += reused
        self.new_bytes += new_bytes

    def _put_batch(self, txn, batch: list, attempts: list) -> tuple[int, int, int]:
        attempts.append(1)
        if len(attempts) > 1:  # a retry after map growth: the buffers must still match
            for _, cid, view in batch:
                if chunk_id(view) != cid:
                    raise SaveError("a buffer changed while it was being saved; save again")
        new_chunks = reused = new_bytes = 0
        for db_name, cid, view in batch:
            if txn.put(cid, view, db=self.blobs.dbs[db_name], overwrite=False):
                new_chunks += 1
                new_bytes += len(view)
            else:
                reused += 1
        add_counters(txn, self.blobs, new_chunks, new_bytes)
        return new_chunks, reused, new_bytes


def read_counters(txn, blobs: BlobStore) -> tuple[int, int]:
    """The store's ``(chunks and pages held, their bytes)`` from ``meta/counters``."""
    raw = txn.get(b"counters", db=blobs.dbs["meta"])
    if raw is None:
        return 0, 0
    return int.from_bytes(raw[:8], "big"), int.from_bytes(raw[8:16], "big")


def add_counters(txn, blobs: BlobStore, chunks: int, nbytes: int) -> None:
    """Keep the store's chunk count and stored bytes in the same transaction as the chunks."""
    have_chunks, have_bytes = read_counters(txn, blobs)
    value = (have_chunks + chunks).to_bytes(8, "big") + (have_bytes + nbytes).to_bytes(8, "big")
    txn.put(b"counters", value, db=blobs.dbs["meta"])


class BlobWriter:
    """``make_blob`` for the codec: chunk, hash on the pool, hand chunks to the sink."""

    def __init__(self, sink: ChunkSink, pool: ThreadPoolExecutor, chunk_bytes: int):
        self.sink = sink
        self.pool = pool
        self.chunk_bytes = chunk_bytes

    def __call__(self, buffer: memoryview, row_nbytes: int, itemsize: int, path: str):
        nbytes = buffer.nbytes
        stride = chunk_nbytes_for(nbytes, row_nbytes, itemsize, self.chunk_bytes)
        views = [buffer[a:b] for a, b in chunk_slices(nbytes, stride)]
        ids = self.pool.map(chunk_id, views) if len(views) > 1 else [chunk_id(views[0])]
        packed = bytearray()
        for cid, view in zip(ids, views):  # ids arrive in order as hashing proceeds
            self.sink.put("chunks", cid, view)
            packed += cid
        if len(views) <= INLINE_IDS:
            return ChunkedBlob(nbytes, stride, bytes(packed))
        return PagedBlob(nbytes, stride, self._write_pages(bytes(packed)))

    def _write_pages(self, packed: bytes) -> bytes:
        page_ids = bytearray()
        step = PAGE_IDS * ID_BYTES
        for start in range(0, len(packed), step):
            page = packed[start : start + step]
            pid = chunk_id(page)
            self.sink.put("pages", pid, page)
            page_ids += pid
        return bytes(page_ids)

"""The read path of a load: chunks into a preallocated array, each checked against its id."""

from __future__ import annotations

import numpy as np

from .blobstore import BlobStore
from .chunker import chunk_count
from .errors import ChunkCorruptError, ChunkMissingError, CorruptDataError
from .ids import ID_BYTES, chunk_id, short
from .manifest import Blob, ChunkedBlob, PagedBlob, page_ids_in


def blob_reader(blobs: BlobStore, pool, txn, step: int, component: str, verify: bool):
    """``read_blob`` for the codec: fill ``out`` with a blob's chunks, checked against their ids.

    Every chunk's length is checked; with ``verify`` its BLAKE3 too (on ``pool``).  Raises
    ChunkMissingError / ChunkCorruptError naming step, component, leaf path and chunk.
    """
    chunks_db = blobs.dbs["chunks"]

    def read_blob(blob: Blob, out: np.ndarray, path: str) -> None:
        context = {"step": step, "component": component, "path": path}
        ids = chunk_ids(blobs, txn, blob, verify, context)
        stride = blob.chunk_nbytes
        views = []
        for index in range(chunk_count(blob.nbytes, stride)):
            cid = ids[index * ID_BYTES : (index + 1) * ID_BYTES]
            view = txn.get(cid, db=chunks_db)
            if view is None:
                raise ChunkMissingError("chunk is missing", chunk_id=short(cid), **context)
            views.append((index, cid, view))

        def fill(item) -> None:
            index, cid, view = item
            start = index * stride
            stop = min(start + stride, blob.nbytes)
            if len(view) != stop - start or (verify and chunk_id(view) != cid):
                raise ChunkCorruptError("chunk bytes do not match its id", chunk_id=short(cid), **context)
            out[start:stop] = np.frombuffer(view, np.uint8)

        if len(views) == 1:
            fill(views[0])
        else:
            for _ in pool.map(fill, views):
                pass

    return read_blob

def chunk_ids(blobs: BlobStore, txn, blob: Blob, verify: bool, context: dict) -> bytes:
    """The concatenated chunk ids of a blob, reading (and checking) its pages if paged."""
    if isinstance(blob, ChunkedBlob):
        return blob.ids
    if not isinstance(blob, PagedBlob):
        raise CorruptDataError(f"unexpected blob {type(blob).__name__}")
    pages = bytearray()
    for start in range(0, len(blob.page_ids), ID_BYTES):
        pid = blob.page_ids[start : start + ID_BYTES]
        page = txn.get(pid, db=blobs.dbs["pages"])
        if page is None:
            raise ChunkMissingError("chunk-list page is missing", chunk_id=short(pid), **context)
        if verify and chunk_id(page) != pid:
            raise ChunkCorruptError("chunk-list page does not match its id", chunk_id=short(pid), **context)
        pages += page_ids_in(bytes(page))
    if len(pages) != chunk_count(blob.nbytes, blob.chunk_nbytes) * ID_BYTES:
        raise CorruptDataError(f"chunk-list pages of {context} list a wrong number of chunks")
    return bytes(pages)

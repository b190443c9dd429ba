"""The capture phase of a save: which chunks of each leaf must be hashed and written.

Runs in the saving thread, before anything is written.  For each large leaf it decides per
chunk whether the id is already known from the leaf's *baseline* (the ids the last
committed save of it stored, or a load read: those are confirmed still stored first, see
``Saver._confirm_loaded``):

* a :class:`~castore.tracking.TrackedArray` says which rows changed: chunks without a
  changed row are neither read nor hashed;
* any other array is fingerprinted per chunk with xxh3-128 (several times faster than
  BLAKE3); chunks whose fingerprint matches the baseline's reuse its id.

Chunk ids stay BLAKE3: only chunks found changed are hashed, in the write phase.  With
``copy=True`` (async saves) the changed chunks are copied into staging buffers, so the
caller may mutate its arrays as soon as capture returns.  With ``check=True`` every reused
id is re-derived from the live bytes, raising :class:`TrackingError` on a miss.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from ..errors import TrackingError
from ..format.chunker import chunk_nbytes_for, chunk_slices
from ..format.ids import FP_BYTES, ID_BYTES, chunk_id, fingerprint
from ..tracking import Baseline, TrackedArray

PARALLEL_FINGERPRINT_CHUNKS = 64  # below this, one thread fingerprints a leaf faster


@dataclass(eq=False, slots=True)
class PendingBlob:
    """A large leaf between capture and write; not a format record.

    ``ids[i]`` is the known id of chunk ``i`` or None; ``buffers[i]`` holds the bytes of
    each chunk whose id is None (a view of the live array, or a staging copy).
    """

    path: str
    nbytes: int
    chunk_nbytes: int
    ids: list
    buffers: dict
    fingerprints: bytes | None
    tracked: TrackedArray | None = None
    epoch: int = 0
    resolved: object = None  #: the ChunkedBlob/PagedBlob once written
    new_ids: bytes = field(default=b"")  #: all ids, concatenated, once written

    def baseline(self, session) -> Baseline:
        return Baseline(session, self.nbytes, self.chunk_nbytes, self.new_ids, self.fingerprints, self.epoch)


class Staging:
    """Reusable 1-chunk buffers for async saves: copies into warm pages are ~5x faster.

    Holds at most ``keep_bytes`` of idle buffers between saves.
    """

    def __init__(self, keep_bytes: int = 256 << 20):
        self.keep_bytes = keep_bytes
        self._idle: dict[int, list[np.ndarray]] = {}
        self._idle_bytes = 0
        self._lock = threading.Lock()

    def copy(self, view) -> np.ndarray:
        nbytes = len(view)
        with self._lock:
            free = self._idle.get(nbytes)
            buffer = free.pop() if free else None
            if buffer is not None:
                self._idle_bytes -= nbytes
        if buffer is None:
            buffer = np.empty(nbytes, np.uint8)
        buffer[:] = np.frombuffer(view, np.uint8)
        return buffer

    def release(self, buffers) -> None:
        with self._lock:
            for buffer in buffers:
                if isinstance(buffer, np.ndarray) and self._idle_bytes + buffer.nbytes <= self.keep_bytes:
                    self._idle.setdefault(buffer.nbytes, []).append(buffer)
                    self._idle_bytes += buffer.nbytes


class Capture:
    """``make_blob`` for :class:`codec.Encoder`: returns :class:`PendingBlob` records."""

    def __init__(
        self,
        *,
        session,
        baselines: dict,
        chunk_bytes: int,
        copy: bool,
        check: bool,
        staging: Staging,
        pool,
        workers: int = 1,
        confirm=None,
    ):
        self.session = session  # baselines are valid only for the same store writer session
        self.baselines = baselines
        self.chunk_bytes = chunk_bytes
        self.copy = copy
        self.check = check
        self.staging = staging
        self.pool = pool
        self.workers = workers  # threads in ``pool``
        # confirm(path, baseline) -> the baseline in this session, or None: for baselines a
        # load left, which name chunks that must be checked present before reuse
        self.confirm = confirm
        self.pending: list[PendingBlob] = []
        self.changed_bytes = 0
        self.reused_chunks = 0  #: chunks whose id came from a baseline (not hashed, not written)

    def __call__(self, buffer: memoryview, row_nbytes: int, itemsize: int, path: str, tracked=None) -> PendingBlob:
        nbytes = buffer.nbytes
        chunk_nbytes = chunk_nbytes_for(nbytes, row_nbytes, itemsize, self.chunk_bytes)
        views = [buffer[a:b] for a, b in chunk_slices(nbytes, chunk_nbytes)]
        if tracked is not None:
            blob = self._tracked(views, nbytes, chunk_nbytes, row_nbytes, path, tracked)
        else:
            blob = self._fingerprinted(views, nbytes, chunk_nbytes, path)
        if self.check:
            self._check_reused(blob, views, row_nbytes, "tracking" if tracked is not None else "fingerprinting")
        changed = [i for i, cid in enumerate(blob.ids) if cid is None]
        self.reused_chunks += len(blob.ids) - len(changed)
        for index in changed:
            view = views[index]
            blob.buffers[index] = self.staging.copy(view) if self.copy else view
            self.changed_bytes += len(view)
        self.pending.append(blob)
        return blob

    def _usable(self, baseline: Baseline, nbytes: int, chunk_nbytes: int) -> bool:
        """Whether ``baseline`` names this leaf's chunks, as cut now, in this session."""
        return baseline.session is self.session and baseline.nbytes == nbytes and baseline.chunk_nbytes == chunk_nbytes

    def _tracked(self, views, nbytes, chunk_nbytes, row_nbytes, path, tracked: TrackedArray) -> PendingBlob:
        epoch, baseline, changed_rows = tracked.capture()
        if baseline is not None and baseline.session is not self.session and self.confirm is not None:
            baseline = self.confirm(path, baseline)
        count = len(views)
        if baseline is not None and self._usable(baseline, nbytes, chunk_nbytes):
            dirty = np.zeros(count, bool)
            dirty[_chunks_of_rows(changed_rows, row_nbytes or nbytes, chunk_nbytes)] = True
            ids = [None if dirty[i] else baseline.ids[i * ID_BYTES : (i + 1) * ID_BYTES] for i in range(count)]
            return PendingBlob(path, nbytes, chunk_nbytes, ids, {}, None, tracked, epoch)
        # no baseline of its own yet (a new array, or one a load filled): the leaf's path
        # baseline, if a load or an untracked save left one, still names unchanged chunks
        blob = self._fingerprinted(views, nbytes, chunk_nbytes, path)
        blob.tracked, blob.epoch = tracked, epoch
        return blob

    def _fingerprinted(self, views, nbytes, chunk_nbytes, path) -> PendingBlob:
        prints = self._fingerprints(views)
        baseline = self.baselines.get(path)
        if baseline is not None and baseline.session is not self.session and self.confirm is not None:
            baseline = self.confirm(path, baseline)
        count = len(views)
        if baseline is not None and self._usable(baseline, nbytes, chunk_nbytes) and baseline.fingerprints is not None:
            now = np.frombuffer(prints, np.uint8).reshape(count, FP_BYTES)
            before = np.frombuffer(baseline.fingerprints, np.uint8).reshape(count, FP_BYTES)
            same = (now == before).all(axis=1)
            ids = [baseline.ids[i * ID_BYTES : (i + 1) * ID_BYTES] if same[i] else None for i in range(count)]
        else:
            ids = [None] * count
        return PendingBlob(path, nbytes, chunk_nbytes, ids, {}, prints)

    def _fingerprints(self, views) -> bytes:
        """Concatenated fingerprints; large leaves split in one contiguous run per thread.

        xxhash releases the GIL, and runs of many chunks per task keep the pool's
        per-task overhead out of a ~30 GB/s loop (both cores: ~1.5-2x one).
        """
        if len(views) < PARALLEL_FINGERPRINT_CHUNKS:
            return b"".join(map(fingerprint, views))
        runs = self.workers
        size = -(-len(views) // runs)
        parts = [views[i : i + size] for i in range(0, len(views), size)]
        return b"".join(self.pool.map(lambda part: b"".join(map(fingerprint, part)), parts))

    def _check_reused(self, blob: PendingBlob, views, row_nbytes: int, how: str) -> None:
        reused = [i for i, cid in enumerate(blob.ids) if cid is not None]
        actual = self.pool.map(lambda i: chunk_id(views[i]), reused)
        for index, cid in zip(reused, actual):
            if cid != blob.ids[index]:
                rows = row_nbytes or blob.nbytes
                start = index * blob.chunk_nbytes
                stop = min(start + blob.chunk_nbytes, blob.nbytes)
                raise TrackingError(blob.path, index, (start // rows, -(-stop // rows)), how)


def _chunks_of_rows(rows: np.ndarray, row_nbytes: int, chunk_nbytes: int) -> np.ndarray:
    """Indices of the chunks holding any byte of the given rows."""
    if rows.size == 0:
        return np.empty(0, np.int64)
    first = (rows * row_nbytes) // chunk_nbytes
    last = ((rows + 1) * row_nbytes - 1) // chunk_nbytes
    if row_nbytes <= chunk_nbytes:  # a row lies in one or two chunks
        return np.unique(np.concatenate([first, last]))
    spans = [np.arange(a, b + 1) for a, b in zip(first, last)]
    return np.unique(np.concatenate(spans))

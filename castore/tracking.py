"""Change tracking: arrays that know which of their rows changed since the last save.

A :class:`TrackedArray` wraps a numpy array.  Writes through ``tracked[index] = value``
mark the rows (indices of the first axis) they touch; writes made some other way are
declared with :meth:`TrackedArray.mark`.  Put the ``TrackedArray`` itself in a
component's state: a save then reads and hashes only the chunks that hold marked rows
and reuses the ids of the others from the last save of the same array into the same
store.  Everything else about the array (dtype, shape, loaded value) is unchanged: it is
stored and loaded as a plain ``np.ndarray``.

Guarantee: a row marked before a save's capture is in that save.  A change that was
*not* marked (a write through ``.raw`` without ``mark``) is missed: run with
``Store(check_tracking=True)`` or ``CASTORE_CHECK_TRACKING=1`` to re-hash every chunk
and raise :class:`TrackingError` at the first such miss.

Pure bookkeeping, no I/O.  Rows are tracked as "the save epoch in which each row was last
written" (an int64 per row), so concurrent async saves and failed saves need no special
cases: rows written after a save's capture stay dirty for the next one, and a save that
fails to commit clears nothing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from .errors import UsageError

__all__ = ["Baseline", "TrackedArray"]


@dataclass(frozen=True, slots=True)
class Baseline:
    """Chunk ids (and fingerprints) of one leaf as committed by an earlier save."""

    session: object  #: the writer session the ids were committed in (see ``castore.save.session``)
    nbytes: int  #: byte size of the leaf
    chunk_nbytes: int  #: bytes per chunk (the last one of a leaf may be shorter)
    ids: bytes  #: concatenated 32-byte chunk ids
    fingerprints: bytes | None  #: concatenated 16-byte xxh3-128 of each chunk, if known
    epoch: int  #: for tracked arrays: the capture epoch the ids reflect


class TrackedArray:
    """A numpy array plus the save epoch in which each row was last written.

    ``TrackedArray(array)`` adopts ``array`` without copying it.  ``tracked[i] = v``
    writes and marks; ``tracked[i]`` and ``np.asarray(tracked)`` read (the array they
    return is read-only, so a stray in-place write fails loudly instead of going unsaved).
    ``tracked.raw`` is the writable array: mark what you change through it.
    """

    __slots__ = ("_array", "_readonly", "_row_epoch", "_epoch", "_lock", "_baseline", "__weakref__")

    def __init__(self, array: np.ndarray):
        if type(array) is not np.ndarray:
            raise UsageError(f"TrackedArray wraps a numpy ndarray, got {type(array).__name__}")
        if not array.flags.c_contiguous or not array.flags.writeable:
            raise UsageError("TrackedArray needs a C-contiguous, writable array (np.ascontiguousarray)")
        self._array = array
        self._readonly = array.view()
        self._readonly.flags.writeable = False
        self._epoch = 1
        self._row_epoch = np.ones(array.shape[0] if array.ndim else 1, np.int64)
        self._lock = threading.Lock()
        self._baseline: Baseline | None = None

    # -- the array -------------------------------------------------------------------------------

    @property
    def raw(self) -> np.ndarray:
        """The writable array itself; call :meth:`mark` for the rows you change through it."""
        return self._array

    @property
    def shape(self) -> tuple:
        return self._array.shape

    @property
    def dtype(self) -> np.dtype:
        return self._array.dtype

    def __len__(self) -> int:
        return len(self._array)

    def __array__(self, dtype=None, copy=None):
        if copy:
            return np.array(self._array, dtype=dtype, copy=True)
        return self._readonly if dtype is None else self._readonly.astype(dtype)

    def __getitem__(self, index):
        return self._readonly[index]

    def __setitem__(self, index, value) -> None:
        self._array[index] = value
        self._mark_index(index)

    def __repr__(self) -> str:
        return f"TrackedArray(shape={self.shape}, dtype={self.dtype})"

    # -- marking -----------------------------------------------------------------------------------

    def mark(self, start: int | None = None, stop: int | None = None) -> None:
        """Mark rows ``[start, stop)`` as changed (one row if ``stop`` is None; all if no args)."""
        rows = len(self._row_epoch)
        if start is None:
            self._set_rows(slice(None))
            return
        start = int(start) + rows if int(start) < 0 else int(start)
        if stop is None:
            stop = start + 1
        else:
            stop = int(stop) + rows if int(stop) < 0 else int(stop)
        if not 0 <= start <= stop <= rows:
            raise UsageError(f"rows [{start}, {stop}) are outside the {rows} rows of this array")
        self._set_rows(slice(start, stop))

    def _mark_index(self, index) -> None:
        if self._array.ndim == 0:
            self._set_rows(slice(None))
            return
        first = index[0] if isinstance(index, tuple) and index else index
        if isinstance(first, (bool, np.bool_)):  # numpy reads a bool as a mask, not as row 1
            self._set_rows(slice(None))
        elif isinstance(first, (int, np.integer)):
            self._set_rows(int(first))
        elif isinstance(first, slice):
            self._set_rows(first)
        elif isinstance(first, (list, np.ndarray)) and np.asarray(first).dtype.kind in "iu":
            self._set_rows(np.asarray(first))
        else:  # boolean masks, Ellipsis, newaxis, empty tuple: mark everything, never miss
            self._set_rows(slice(None))

    def _set_rows(self, rows) -> None:
        with self._lock:
            self._row_epoch[rows] = self._epoch

    # -- what the store uses ------------------------------------------------------------------------

    def capture(self) -> tuple[int, Baseline | None, np.ndarray]:
        """Close the current epoch: ``(epoch, baseline, rows changed since the baseline)``."""
        with self._lock:
            epoch = self._epoch
            self._epoch += 1
            baseline = self._baseline
            since = baseline.epoch if baseline is not None else 0
            changed = np.flatnonzero(self._row_epoch > since)
        return epoch, baseline, changed

    def committed(self, baseline: Baseline) -> None:
        """Record the ids a committed save stored; later epochs' marks stay dirty."""
        with self._lock:
            if self._baseline is None or baseline.epoch >= self._baseline.epoch:
                self._baseline = baseline

    def restored(self, make_baseline) -> None:
        """A load filled this array: its rows as they are now are ``make_baseline(epoch)``'s
        chunks (rows written from now on are dirty for the next save)."""
        with self._lock:
            epoch = self._epoch
            self._epoch += 1
            self._baseline = make_baseline(epoch)

    def pinned_ids(self, session) -> bytes:
        """The concatenated ids of the baseline if it belongs to ``session`` (GC keeps them)."""
        baseline = self._baseline
        if baseline is None or baseline.session is not session:
            return b""
        return baseline.ids

    def forget(self) -> None:
        """Drop the baseline: the next save hashes every chunk."""
        with self._lock:
            self._baseline = None

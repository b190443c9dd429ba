"""A fixed-capacity ring-buffer replay with change tracking built in.

``RingBuffer(capacity)`` stores named fields (``image``, ``action``, ``reward``, ...) in
arrays of ``capacity`` rows, allocated at the first :meth:`RingBuffer.add` from the
shapes and dtypes it sees.  ``add`` writes a batch of rows at the write head and wraps
around, marking exactly the rows it wrote, so a save reads and hashes only the chunks
that hold new rows.  It is a checkpoint component (``save()`` / ``load(state)``).
"""

from __future__ import annotations

import numpy as np

from .errors import UsageError
from .tracking import TrackedArray

__all__ = ["RingBuffer"]


class RingBuffer:
    """Fields of ``capacity`` rows each, filled in insertion order and overwritten oldest first.

    ``add({"image": imgs, "reward": rs})`` appends a batch (the same number of rows per
    field); ``append({...})`` one row.  ``len(rb)`` counts stored rows (at most
    ``capacity``); ``rb.added`` counts every row ever added.  ``rb[name]`` is the
    read-only array of a field in storage order; :meth:`recent`, :meth:`sample` and
    :meth:`sample_sequences` return copies in insertion order.
    """

    def __init__(self, capacity: int, fields: dict | None = None):
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity <= 0:
            raise UsageError(f"RingBuffer capacity must be a positive int, got {capacity!r}")
        self.capacity = int(capacity)
        self._fields: dict[str, TrackedArray] = {}
        self._head = 0  # next row to write
        self._size = 0
        self.added = 0
        if fields:
            for name, (shape, dtype) in fields.items():
                self._allocate(name, tuple(shape), np.dtype(dtype))

    # -- reading ---------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._size

    @property
    def fields(self) -> list[str]:
        return list(self._fields)

    def __getitem__(self, name: str) -> np.ndarray:
        """The field's whole array in storage order (read-only); rows past ``len`` are zeros."""
        try:
            return np.asarray(self._fields[name])
        except KeyError:
            raise KeyError(f"no field {name!r}; fields are {self.fields}") from None

    def _order(self) -> np.ndarray:
        """Storage rows from oldest to newest."""
        start = (self._head - self._size) % self.capacity
        return (start + np.arange(self._size)) % self.capacity

    def recent(self, count: int) -> dict[str, np.ndarray]:
        """Copies of the newest ``count`` rows, oldest first."""
        count = min(int(count), self._size)
        rows = self._order()[self._size - count :]
        return {name: field.raw[rows] for name, field in self._fields.items()}

    def sample(self, batch_size: int, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        """``batch_size`` rows drawn uniformly (with replacement) from the stored rows."""
        self._require_rows(1)
        rng = rng or np.random.default_rng()
        rows = self._order()[rng.integers(0, self._size, int(batch_size))]
        return {name: field.raw[rows] for name, field in self._fields.items()}

    def sample_sequences(self, batch_size: int, length: int, rng: np.random.Generator | None = None) -> dict:
        """``batch_size`` runs of ``length`` consecutive rows, shape ``(batch, length, ...)``.

        A run never crosses the write head, so it is always rows added one after another.
        """
        length = int(length)
        self._require_rows(length)
        rng = rng or np.random.default_rng()
        starts = rng.integers(0, self._size - length + 1, int(batch_size))
        order = self._order()
        rows = order[starts[:, None] + np.arange(length)[None, :]]
        return {name: field.raw[rows] for name, field in self._fields.items()}

    def _require_rows(self, count: int) -> None:
        if count <= 0 or self._size < count:
            raise UsageError(f"need at least {max(count, 1)} stored rows, the buffer holds {self._size}")

    # -- writing ---------------------------------------------------------------------------------------

    def append(self, row: dict) -> None:
        """Add one row: ``{field: value}``."""
        self.add({name: np.asarray(value)[None] for name, value in row.items()})

    def add(self, batch: dict) -> None:
        """Add rows: ``{field: array with the rows on the first axis}``, same count per field.

        The first ``add`` fixes the fields, their row shapes and dtypes; later batches must
        match them (values are cast to the field's dtype as numpy assignment does).
        """
        if not isinstance(batch, dict) or not batch:
            raise UsageError("add() takes a non-empty dict of field name -> array of rows")
        arrays = {name: np.asarray(value) for name, value in batch.items()}
        counts = {a.shape[0] if a.ndim else -1 for a in arrays.values()}
        if len(counts) != 1 or -1 in counts:
            raise UsageError(f"every field needs the same number of rows on its first axis, got {counts}")
        if not self._fields:
            for name, array in arrays.items():
                self._allocate(name, array.shape[1:], array.dtype)
        self._check_fields(arrays)
        count = counts.pop()
        if count > self.capacity:  # only the last `capacity` rows survive anyway
            arrays = {name: array[-self.capacity :] for name, array in arrays.items()}
            self.added += count - self.capacity
            count = self.capacity
        for start, stop, offset in self._spans(count):
            for name, array in arrays.items():
                self._fields[name][start:stop] = array[offset : offset + stop - start]
        self._head = (self._head + count) % self.capacity
        self._size = min(self._size + count, self.capacity)
        self.added += count

    def _spans(self, count: int):
        """``(start, stop, offset in batch)`` storage ranges for ``count`` rows at the head."""
        first = min(count, self.capacity - self._head)
        yield self._head, self._head + first, 0
        if count > first:
            yield 0, count - first, first

    def _allocate(self, name: str, shape: tuple, dtype: np.dtype) -> None:
        if not isinstance(name, str) or not name:
            raise UsageError(f"field names must be non-empty str, got {name!r}")
        self._fields[name] = TrackedArray(np.zeros((self.capacity, *shape), dtype))

    def _check_fields(self, arrays: dict) -> None:
        if set(arrays) != set(self._fields):
            raise UsageError(f"batch has fields {sorted(arrays)}, the buffer has {sorted(self._fields)}")
        for name, array in arrays.items():
            want = self._fields[name].shape[1:]
            if array.shape[1:] != want:
                raise UsageError(f"field {name!r} rows have shape {want}, got {array.shape[1:]}")

    # -- checkpoint component --------------------------------------------------------------------------

    def save(self) -> dict:
        """State for a checkpoint: the tracked field arrays and the write position."""
        return {
            "capacity": self.capacity,
            "head": self._head,
            "size": self._size,
            "added": self.added,
            "fields": dict(self._fields),
        }

    def load_targets(self) -> dict | None:
        """Restore targets (see :meth:`castore.Store.load`): this buffer's own field arrays,
        so a load fills them in place instead of holding a second copy of the buffer."""
        if not self._fields:
            return None
        return {"fields": dict(self._fields)}

    def load(self, state: dict) -> None:
        """Adopt a saved state: arrays of this buffer's fields that a load filled in place
        are kept, other loaded arrays are used as they are (not copied)."""
        try:
            capacity, fields = int(state["capacity"]), state["fields"]
            head, size, added = int(state["head"]), int(state["size"]), int(state["added"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"not a RingBuffer state: {exc!r}") from None
        if capacity != self.capacity:
            raise UsageError(
                f"the saved buffer has capacity {capacity}, this one {self.capacity}: "
                f"construct RingBuffer({capacity}) to load it"
            )
        tracked = {}
        for name, array in fields.items():
            if type(array) is TrackedArray and array is self._fields.get(name):
                if array.shape[:1] != (capacity,):
                    raise UsageError(f"saved field {name!r} has shape {array.shape}, not {capacity} rows")
                tracked[name] = array  # filled in place by the load
                continue
            array = np.asarray(array)
            if array.shape[:1] != (capacity,):
                raise UsageError(f"saved field {name!r} has shape {array.shape}, not {capacity} rows")
            tracked[name] = TrackedArray(np.require(array, requirements=["C", "W"]))
        if not 0 <= head < capacity or not 0 <= size <= capacity:
            raise UsageError(f"saved head {head} / size {size} do not fit capacity {capacity}")
        self._fields, self._head, self._size, self.added = tracked, head, size, added

"""Cutting a flat byte buffer into chunks aligned to whole rows (pure, no I/O).

An array's C-order bytes are cut into chunks of ``chunk_nbytes`` (the last one shorter).
When a row (one index of the first axis) fits the target size, ``chunk_nbytes`` is a whole
number of rows, so a change to rows ``[a, b)`` touches only the chunks covering them.
A row larger than the target is cut into target-sized pieces aligned to the item size.
"""

from __future__ import annotations

import numpy as np

DEFAULT_CHUNK_BYTES = 1 << 20  # chosen by bench/bench_chunk_size.py; see docs/benchmarks.md
MIN_CHUNK_BYTES = 4 << 10
MAX_CHUNK_BYTES = 256 << 20


def chunk_nbytes_for(nbytes: int, row_nbytes: int, itemsize: int, target: int) -> int:
    """Chunk stride in bytes for a buffer of ``nbytes`` whose rows are ``row_nbytes``."""
    if nbytes <= target or row_nbytes <= 0:
        return max(nbytes, 1)
    if row_nbytes <= target:
        return (target // row_nbytes) * row_nbytes
    itemsize = max(itemsize, 1)
    return max(itemsize, (target // itemsize) * itemsize)


def row_nbytes_of(array: np.ndarray) -> int:
    """Bytes per index of the first axis (the whole array for 0-d arrays)."""
    if array.ndim == 0 or array.shape[0] == 0:
        return array.nbytes
    return array.nbytes // array.shape[0]


def chunk_count(nbytes: int, chunk_nbytes: int) -> int:
    return -(-nbytes // chunk_nbytes) if nbytes else 0


def chunk_slices(nbytes: int, chunk_nbytes: int):
    """Yield ``(start, stop)`` byte offsets of each chunk."""
    for start in range(0, nbytes, chunk_nbytes):
        yield start, min(start + chunk_nbytes, nbytes)


def chunks_covering(byte_start: int, byte_stop: int, chunk_nbytes: int) -> range:
    """Indices of the chunks that hold any byte of ``[byte_start, byte_stop)``."""
    if byte_stop <= byte_start:
        return range(0)
    return range(byte_start // chunk_nbytes, (byte_stop - 1) // chunk_nbytes + 1)

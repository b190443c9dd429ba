"""Change tracking and hashing: what a save costs as a function of what changed.

The replay of the shared benchmark state is held in a ``castore.RingBuffer``; each round
adds ``fraction`` of its capacity as new rows (wrapping around) and saves.  The agent
(params, optimizer) does not change, so these cases isolate what tracking saves.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor

import blake3
import numpy as np
import pytest
from workloads import REPLAY_ROWS, SEED, record_saves, replay_row_bytes, total_bytes

import castore
from castore.format.chunker import DEFAULT_CHUNK_BYTES
from castore.save.pipeline import hash_chunks

ROUNDS = 11


def ring_buffer_of(replay: dict) -> castore.RingBuffer:
    buffer = castore.RingBuffer(REPLAY_ROWS)
    buffer.add({name: array for name, array in replay.items()})
    return buffer


@pytest.mark.benchmark(group="tracked save")
@pytest.mark.parametrize("percent", [0, 1, 10, 100])
def test_castore_tracked_save(benchmark, dirs, state, percent):
    buffer = ring_buffer_of(state["replay"])
    count = REPLAY_ROWS * percent // 100
    rng = np.random.default_rng(SEED + percent)
    store = castore.Store(dirs.fresh())
    components = {"replay": buffer, "params": state["params"], "optimizer": state["optimizer"]}
    store.save(0, {k: v.save() if k == "replay" else v for k, v in components.items()})
    steps = itertools.count(1)

    def setup():
        if count:  # new content every round, so nothing deduplicates by accident
            buffer.add(
                {
                    name: rng.integers(0, 256, (count, *a.shape[1:]), dtype=np.uint8).astype(a.dtype)
                    for name, a in state["replay"].items()
                }
            )
        os.sync()
        return (next(steps),), {}

    results = []
    try:
        benchmark.pedantic(
            lambda step: results.append(store.save(step, {**components, "replay": buffer.save()})),
            setup=setup,
            rounds=ROUNDS,
            warmup_rounds=1,
        )
    finally:
        store.close()
        dirs.remove(store.path)
    record_saves(benchmark, results[1:], DEFAULT_CHUNK_BYTES, changed_bytes=count * replay_row_bytes(state["replay"]))
    benchmark.extra_info.update(
        case=f"castore_tracked_save_{percent}pct",
        percent=percent,
        hashed_bytes=float(np.mean([r.changed_bytes for r in results[1:]])),
    )


# --- hashing ---------------------------------------------------------------------------------


@pytest.mark.benchmark(group="hash")
def test_castore_hash(benchmark, arrays):
    """castore's chunk hashing (1 MiB chunks over its thread pool) of every array."""
    views = [memoryview(a).cast("B") for a in arrays.values()]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # the pool a Store uses
        workers = os.cpu_count() or 1
        benchmark.pedantic(
            lambda: [hash_chunks(v, DEFAULT_CHUNK_BYTES, pool, workers) for v in views], rounds=31, warmup_rounds=1
        )
    benchmark.extra_info.update(case="castore_hash", bytes=total_bytes(arrays))


@pytest.mark.benchmark(group="hash")
def test_blake3_auto(benchmark, arrays):
    """Bare BLAKE3 of each array, multi-threaded by the library itself (no chunking)."""
    views = [memoryview(a).cast("B") for a in arrays.values()]
    benchmark.pedantic(
        lambda: [blake3.blake3(v, max_threads=blake3.blake3.AUTO).digest() for v in views], rounds=31, warmup_rounds=1
    )
    benchmark.extra_info.update(case="blake3_auto", bytes=total_bytes(arrays))

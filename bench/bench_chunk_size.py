"""The chunk-size sweep that picks castore's DEFAULT_CHUNK_BYTES (see docs/benchmarks.md).

For each chunk size: a full save into an empty store, incremental saves where 1% of the
replay rows changed (a contiguous ring-buffer block, and rows scattered at random), and a
load of one step.  Small chunks keep a small change small (low write amplification,
``new_bytes / changed_bytes``); large chunks cost less per byte in hashing, LMDB puts and
thread hand-offs.
"""

from __future__ import annotations

import pytest
from workloads import bench_full_save, bench_incremental_save, bench_load

import castore

KIB, MIB = 1 << 10, 1 << 20
CHUNK_SIZES = [64 * KIB, 256 * KIB, 1 * MIB, 4 * MIB, 16 * MIB]
SIZE_IDS = ["64KiB", "256KiB", "1MiB", "4MiB", "16MiB"]

SAVE_ROUNDS = 11
FAST_ROUNDS = 21

sweep = pytest.mark.parametrize("chunk_bytes", CHUNK_SIZES, ids=SIZE_IDS)


def label(benchmark, case: str) -> None:
    benchmark.extra_info["case"] = case


@sweep
@pytest.mark.benchmark(group="sweep-full-save")
def test_sweep_full_save(benchmark, dirs, state, chunk_bytes):
    bench_full_save(benchmark, dirs, state, chunk_bytes, SAVE_ROUNDS)
    label(benchmark, "sweep_full_save")


@sweep
@pytest.mark.parametrize("pattern", ["contiguous", "scattered"])
@pytest.mark.benchmark(group="sweep-incremental-save")
def test_sweep_incremental_save(benchmark, dirs, mutable_state, chunk_bytes, pattern):
    bench_incremental_save(benchmark, dirs, mutable_state, chunk_bytes, FAST_ROUNDS, pattern)
    label(benchmark, f"sweep_incremental_{pattern}")


@sweep
@pytest.mark.benchmark(group="sweep-load")
def test_sweep_load(benchmark, dirs, state, chunk_bytes):
    with castore.Store(dirs.fresh(), chunk_bytes=chunk_bytes) as store:
        store.save(0, state)
        bench_load(benchmark, store, state, FAST_ROUNDS)
    dirs.remove(store.path)
    label(benchmark, "sweep_load")

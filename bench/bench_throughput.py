"""castore save/load against same-process baselines on the same bytes.

Each benchmark's ``extra_info["case"]`` names it for ``compare.py``, which prints every
castore time as a ratio to a baseline measured in the same run (absolute times on a shared
machine vary; ratios much less).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import blake3
import numpy as np
import pytest
from workloads import bench_full_save, bench_incremental_save, bench_load, total_bytes

from castore.format.chunker import DEFAULT_CHUNK_BYTES

SAVE_ROUNDS = 15
FAST_ROUNDS = 31  # cases that take tens of milliseconds


def label(benchmark, case: str, nbytes: int | None = None) -> None:
    benchmark.extra_info["case"] = case
    if nbytes is not None:
        benchmark.extra_info["bytes"] = nbytes


# --- saving ----------------------------------------------------------------------------------


@pytest.mark.benchmark(group="save")
def test_castore_full_save(benchmark, dirs, state):
    bench_full_save(benchmark, dirs, state, DEFAULT_CHUNK_BYTES, SAVE_ROUNDS)
    label(benchmark, "castore_full_save")


@pytest.mark.benchmark(group="save")
def test_castore_incremental_save(benchmark, dirs, mutable_state):
    bench_incremental_save(benchmark, dirs, mutable_state, DEFAULT_CHUNK_BYTES, FAST_ROUNDS)
    label(benchmark, "castore_incremental_save")


def write_and_fsync(path: str, arrays: dict) -> None:
    with open(path, "wb") as f:
        for array in arrays.values():
            f.write(memoryview(array).cast("B"))
        f.flush()
        os.fsync(f.fileno())


def savez_and_fsync(path: str, arrays: dict) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())


@pytest.mark.benchmark(group="save")
@pytest.mark.parametrize("writer", [write_and_fsync, savez_and_fsync], ids=["raw_write_fsync", "npz_save_fsync"])
def test_file_save_baseline(benchmark, dirs, arrays, writer):
    """One new file per round, like a fresh castore store per round."""

    def setup():
        os.sync()
        return (f"{dirs.fresh('file')}/state.bin", arrays), {}

    def teardown(path, _arrays):
        dirs.remove(os.path.dirname(path))

    benchmark.pedantic(writer, setup=setup, teardown=teardown, rounds=SAVE_ROUNDS, warmup_rounds=1)
    label(benchmark, writer.__name__, total_bytes(arrays))


# --- loading ---------------------------------------------------------------------------------


@pytest.mark.benchmark(group="load")
@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
def test_castore_load_step(benchmark, saved_store, state, verify):
    bench_load(benchmark, saved_store, state, FAST_ROUNDS, verify=verify)
    label(benchmark, "castore_load_step" if verify else "castore_load_step_unverified")


@pytest.mark.benchmark(group="load")
def test_castore_load_component(benchmark, saved_store, state):
    bench_load(benchmark, saved_store, state, FAST_ROUNDS, keys=["params"])
    label(benchmark, "castore_load_component")


def npz_load(path: str, prefix: str = "") -> dict:
    with np.load(path) as npz:
        return {name: npz[name] for name in npz.files if name.startswith(prefix)}


@pytest.mark.benchmark(group="load")
@pytest.mark.parametrize("prefix", ["", "params."], ids=["all", "params"])
def test_npz_load_baseline(benchmark, npz_path, prefix):
    loaded = benchmark.pedantic(npz_load, args=(npz_path, prefix), rounds=FAST_ROUNDS, warmup_rounds=1)
    label(benchmark, "npz_load_component" if prefix else "npz_load_all", total_bytes(loaded))


# --- hashing ---------------------------------------------------------------------------------


def pieces(arrays: dict, piece_bytes: int) -> list[memoryview]:
    views = [memoryview(a).cast("B") for a in arrays.values()]
    return [v[i : i + piece_bytes] for v in views for i in range(0, len(v), piece_bytes)]


def hash_serially(views: list) -> None:
    for view in views:
        blake3.blake3(view).digest()


@pytest.mark.benchmark(group="hash")
def test_blake3_one_thread(benchmark, arrays):
    views = pieces(arrays, DEFAULT_CHUNK_BYTES)
    benchmark.pedantic(hash_serially, args=(views,), rounds=FAST_ROUNDS, warmup_rounds=1)
    label(benchmark, "blake3_one_thread", total_bytes(arrays))


@pytest.mark.benchmark(group="hash")
def test_blake3_thread_pool(benchmark, arrays):
    """The hashing castore does: chunk-sized pieces mapped over ``os.cpu_count()`` threads."""
    views = pieces(arrays, DEFAULT_CHUNK_BYTES)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        benchmark.pedantic(
            lambda: list(pool.map(lambda v: blake3.blake3(v).digest(), views)), rounds=FAST_ROUNDS, warmup_rounds=1
        )
    label(benchmark, "blake3_thread_pool", total_bytes(arrays))
    benchmark.extra_info["threads"] = os.cpu_count()


# --- verifying -------------------------------------------------------------------------------


@pytest.mark.benchmark(group="verify")
@pytest.mark.parametrize("sample", [1.0, 0.05], ids=["all", "sample5pct"])
def test_castore_verify(benchmark, saved_store, sample):
    """Store.verify: every manifest and page, every chunk present, all (or 5%) hashed."""
    reports = []
    benchmark.pedantic(
        lambda: reports.append(saved_store.verify(sample, seed=len(reports))), rounds=FAST_ROUNDS, warmup_rounds=1
    )
    assert all(report.ok for report in reports)
    label(benchmark, "castore_verify" if sample == 1.0 else "castore_verify_5pct", reports[-1].hashed_bytes)

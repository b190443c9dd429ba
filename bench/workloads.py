"""Deterministic training-like state and the castore workloads the benchmarks time.

The state is three components:

* ``replay``: a ring buffer of ``REPLAY_ROWS`` transitions (64x64x3 uint8 observation,
  int32 action, float32 reward, bool done): the large, mostly-unchanged part;
* ``params``: ``LAYERS`` float32 matrices of 1024x1024 with biases;
* ``optimizer``: Adam moments, the same shapes as ``params``.

Random bytes on purpose: castore does not compress, and repeated content (zeros, copies)
would deduplicate within one save and flatter castore against the baselines.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile

import numpy as np

import castore

REPLAY_ROWS = int(os.environ.get("CASTORE_BENCH_ROWS", 16384))  # 192 MiB of observations
IMAGE_SHAPE = (64, 64, 3)
LAYERS = int(os.environ.get("CASTORE_BENCH_LAYERS", 8))  # 4 MiB per matrix
CHANGED_FRACTION = 0.01  # an incremental save rewrites 1% of the replay rows
SEED = 20240601


def make_state(seed: int = SEED) -> dict:
    """The full state as {component: tree of numpy arrays}."""
    rng = np.random.default_rng(seed)
    n = REPLAY_ROWS
    replay = {
        "obs": np.frombuffer(rng.bytes(n * int(np.prod(IMAGE_SHAPE))), np.uint8).reshape(n, *IMAGE_SHAPE).copy(),
        "action": rng.integers(0, 18, n, dtype=np.int32),
        "reward": rng.standard_normal(n, dtype=np.float32),
        "done": rng.random(n) < 0.01,
    }
    params, optimizer = {}, {}
    for i in range(LAYERS):
        shapes = {"w": (1024, 1024), "b": (1024,)}
        params[f"layer{i}"] = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
        optimizer[f"layer{i}"] = {
            f"{m}_{k}": rng.standard_normal(s, dtype=np.float32) for m in ("m", "v") for k, s in shapes.items()
        }
    return {"replay": replay, "params": params, "optimizer": optimizer}


def copy_state(state: dict) -> dict:
    """A deep copy whose arrays a benchmark may change in place."""
    if isinstance(state, dict):
        return {k: copy_state(v) for k, v in state.items()}
    return state.copy()


def flat_arrays(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """{"replay.obs": array, ...}: leaf paths joined with dots (valid npz names)."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(flat_arrays(value, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: tree}


def total_bytes(tree) -> int:
    return sum(a.nbytes for a in flat_arrays(tree).values())


def replay_row_bytes(replay: dict) -> int:
    return sum(a.nbytes // a.shape[0] for a in replay.values())


def changed_rows_count() -> int:
    return max(1, int(REPLAY_ROWS * CHANGED_FRACTION))


def overwrite_rows(replay: dict, rows: np.ndarray, rng: np.random.Generator) -> int:
    """Give ``rows`` of every replay array new random content; returns bytes changed."""
    for array in replay.values():
        fresh = rng.integers(0, 256, (len(rows), *array.shape[1:]), dtype=np.uint8)
        array[rows] = fresh.astype(array.dtype) if array.dtype != np.uint8 else fresh
    return len(rows) * replay_row_bytes(replay)


def ring_buffer_rows(round_index: int) -> np.ndarray:
    """The contiguous block of rows a ring buffer overwrites between two checkpoints."""
    count = changed_rows_count()
    start = (round_index * count) % REPLAY_ROWS
    return (start + np.arange(count)) % REPLAY_ROWS


def scattered_rows(rng: np.random.Generator) -> np.ndarray:
    """1% of the rows at random positions (e.g. in-place updates across the buffer)."""
    return np.sort(rng.choice(REPLAY_ROWS, changed_rows_count(), replace=False))


class ScratchDirs:
    """Fresh directories under one root; each can be removed as soon as a round is done."""

    def __init__(self, root):
        self.root = os.fspath(root)
        self._count = itertools.count()

    def fresh(self, name: str = "store") -> str:
        return tempfile.mkdtemp(prefix=f"{name}-{next(self._count)}-", dir=self.root)

    @staticmethod
    def remove(path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)


# --- the timed castore workloads ---------------------------------------------------------


def bench_full_save(benchmark, dirs: ScratchDirs, state: dict, chunk_bytes: int, rounds: int):
    """Time saving ``state`` as the first step of a new, empty store."""

    def setup():
        os.sync()  # start each round without other rounds' dirty pages in flight
        return (castore.Store(dirs.fresh(), chunk_bytes=chunk_bytes),), {}

    def teardown(store):
        store.close()
        dirs.remove(store.path)

    results = []
    benchmark.pedantic(
        lambda store: results.append(store.save(0, state)),
        setup=setup,
        teardown=teardown,
        rounds=rounds,
        warmup_rounds=1,
    )
    record_saves(benchmark, results[1:], chunk_bytes, changed_bytes=total_bytes(state))


def bench_incremental_save(
    benchmark, dirs: ScratchDirs, state: dict, chunk_bytes: int, rounds: int, pattern: str = "contiguous"
):
    """Time saving successive steps that each differ from the last in 1% of replay rows.

    ``state`` is changed in place: pass a copy.  Only replay rows change, so
    ``new_bytes`` measures how well chunking isolates a small change.
    """
    rng = np.random.default_rng(SEED + 1)
    store = castore.Store(dirs.fresh(), chunk_bytes=chunk_bytes)
    store.save(0, state)
    steps = itertools.count(1)
    changed = []

    def setup():
        step = next(steps)
        rows = ring_buffer_rows(step) if pattern == "contiguous" else scattered_rows(rng)
        changed.append(overwrite_rows(state["replay"], rows, rng))
        os.sync()
        return (step,), {}

    results = []
    try:
        benchmark.pedantic(
            lambda step: results.append(store.save(step, state)), setup=setup, rounds=rounds, warmup_rounds=1
        )
    finally:
        store.close()
        dirs.remove(store.path)
    record_saves(benchmark, results[1:], chunk_bytes, changed_bytes=int(np.mean(changed[1:])))
    benchmark.extra_info["pattern"] = pattern


def bench_load(benchmark, store: castore.Store, state: dict, rounds: int, keys=None, verify: bool = True):
    """Time restoring step 0 (or only the components ``keys``) of ``state`` from ``store``."""
    loaded = benchmark.pedantic(
        store.load, args=(0,), kwargs={"keys": keys, "verify": verify}, rounds=rounds, warmup_rounds=1
    )
    expected = flat_arrays({k: state[k] for k in loaded})
    got = flat_arrays(loaded)
    assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in got)
    benchmark.extra_info.update(bytes=total_bytes(loaded), chunk_bytes=store.chunk_bytes, verify=verify)


def record_saves(benchmark, results: list, chunk_bytes: int, changed_bytes: int) -> None:
    """Put the dedup numbers of the timed saves (means over rounds) in ``extra_info``."""
    new_bytes = float(np.mean([r.new_bytes for r in results]))
    benchmark.extra_info.update(
        bytes=results[0].logical_bytes,
        chunk_bytes=chunk_bytes,
        changed_bytes=changed_bytes,
        new_bytes=new_bytes,
        new_chunks=float(np.mean([r.new_chunks for r in results])),
        reused_chunks=float(np.mean([r.reused_chunks for r in results])),
        manifest_bytes=results[0].manifest_bytes,
        write_amplification=new_bytes / changed_bytes if changed_bytes else None,
    )

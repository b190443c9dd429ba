"""Garbage collection cost: it must grow with what it frees, not with the store's bytes.

Two stores hold the same kind of steps, one 4x the bytes of the other (a 4x larger
replay-like array).  In each, one step's unique chunks (the same amount, ~8 MiB) are made
garbage and collected.  ``compare.py`` prints the time ratio big/small: near 1 means GC
cost does not follow total bytes; the live manifest pages it reads grow ~4x.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import castore

ROWS = 2048  # of 64 KiB: 128 MiB at scale 1
ROW_BYTES = 64 << 10
CHANGED_ROWS = 128  # 8 MiB unique per step


def build(path: str, scale: int) -> castore.Store:
    store = castore.Store(path)
    rng = np.random.default_rng(scale)
    replay = np.frombuffer(rng.bytes(ROWS * scale * ROW_BYTES), np.uint8).reshape(ROWS * scale, ROW_BYTES).copy()
    for step in range(4):
        replay[step * CHANGED_ROWS : (step + 1) * CHANGED_ROWS] = rng.integers(
            0, 256, (CHANGED_ROWS, ROW_BYTES), np.uint8
        )
        store.save(step, {"replay": replay})
    return store


@pytest.mark.benchmark(group="gc")
@pytest.mark.parametrize("scale", [1, 4], ids=["128MiB", "512MiB"])
def test_castore_gc(benchmark, dirs, scale):
    store = build(dirs.fresh(), scale)
    steps = itertools.count(4)
    rng = np.random.default_rng(99)
    replay = store.load(3)["replay"]

    def setup():
        # one new step, then delete the oldest: its unique 8 MiB becomes garbage
        step = next(steps)
        replay[:CHANGED_ROWS] = rng.integers(0, 256, (CHANGED_ROWS, ROW_BYTES), np.uint8)
        store.save(step, {"replay": replay})
        store.delete(store.steps()[0])
        return (), {}

    plans = []
    benchmark.pedantic(lambda: plans.append(store.gc()), setup=setup, rounds=9, warmup_rounds=1)
    freed = float(np.mean([p.freed_bytes for p in plans[1:]]))
    stats = store.stats()
    store.close()
    benchmark.extra_info.update(
        case=f"castore_gc_{scale}x",
        bytes=stats.stored_bytes,
        freed_bytes=freed,
        live_pages=float(np.mean([p.live_pages for p in plans[1:]])),
    )
    dirs.remove(store.path)

"""`castore ls` / `du` / `report` cost: Store.usage() against the per-step id sets of
castore 0.6's accounting (tests/test_usage.py keeps that reference), in one process.

A 100 MiB array in 4 KiB chunks (25,600 chunks, 100 chunk-list pages a step), one chunk
changed per save, N steps: the reference expands every step's chunks (steps x chunks);
usage() expands only the pages that differ from the step before.

    python bench/usage.py [--steps 100]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from test_usage import naive_accounts

import castore


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, castore.Store(tmp + "/s", chunk_bytes=4096, compression="none") as s:
        data = np.random.default_rng(0).integers(0, 255, 100 * 2**20, dtype=np.uint8)
        for step in range(args.steps):
            data[step * 4096 * 7] ^= 1
            s.save(step, {"a": data})
        started = time.perf_counter()
        reference = naive_accounts(s)
        naive = time.perf_counter() - started
        started = time.perf_counter()
        usage = s.usage()
        fast = time.perf_counter() - started
        same = all(
            (u.referenced_bytes, u.unique_bytes)
            == (reference[(u.branch, u.step)].referenced_bytes, reference[(u.branch, u.step)].unique_bytes)
            for u in usage.steps
        )
    print(f"{args.steps} steps x 25,600 chunks: usage() {fast:.3f} s, reference {naive:.2f} s")
    print(f"ratio usage / reference: {fast / naive:.4f}  (same numbers: {same})")


if __name__ == "__main__":
    main()

"""Loads of framework values against their numpy baselines, in one process (issue 12).

* jax: a 128 MiB tree of 512 ``jax.Array`` leaves of 256 KiB, loaded as jax arrays,
  against the same tree stored and loaded as numpy (and numpy then put on the device);
* torch: a module's state loaded into the module in place (``cp.model = model``), against
  ``torch.load`` of the same ``state_dict`` saved by ``torch.save`` (mmap off, the default).

Rounds alternate so drift hits both sides alike; medians are reported as ratios.

    python bench/frameworks.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

import castore


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(a) / statistics.median(b)


def bench_jax(work: str, rounds: int) -> dict:
    rng = np.random.default_rng(0)
    plain = {f"p{i}": rng.standard_normal(64 * 1024, dtype=np.float32) for i in range(512)}
    arrays = {k: jnp.asarray(v) for k, v in plain.items()}
    with castore.Store(os.path.join(work, "numpy")) as store:
        store.save(0, {"p": plain})
    with castore.Store(os.path.join(work, "jax")) as store:
        store.save(0, {"p": arrays})
    times: dict[str, list[float]] = {"numpy": [], "jax": [], "numpy+device_put": []}
    for _ in range(rounds):
        for kind in ("numpy", "jax"):
            with castore.Store(os.path.join(work, kind), readonly=True) as store:
                start = time.perf_counter()
                out = store.load(0)
                jax.block_until_ready(out) if kind == "jax" else None
                times[kind].append(time.perf_counter() - start)
        with castore.Store(os.path.join(work, "numpy"), readonly=True) as store:
            start = time.perf_counter()
            out = {k: jnp.asarray(v) for k, v in store.load(0)["p"].items()}
            jax.block_until_ready(out)
            times["numpy+device_put"].append(time.perf_counter() - start)
    return {
        "jax / numpy load": median_ratio(times["jax"], times["numpy"]),
        "jax / (numpy load + device_put)": median_ratio(times["jax"], times["numpy+device_put"]),
    }


def bench_torch(work: str, rounds: int) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(12)])  # 201 MB
    path = os.path.join(work, "ck")
    with castore.Checkpoint(path) as cp:
        cp.model = model
        cp.save()
    pt = os.path.join(work, "model.pt")
    torch.save(model.state_dict(), pt)
    times: dict[str, list[float]] = {"castore": [], "torch": []}
    for _ in range(rounds):
        with castore.Checkpoint(path) as cp:
            cp.model = model
            start = time.perf_counter()
            cp.load()
            times["castore"].append(time.perf_counter() - start)
        start = time.perf_counter()
        model.load_state_dict(torch.load(pt, weights_only=True))
        times["torch"].append(time.perf_counter() - start)
    return {
        "castore in place (verified) / torch.load + load_state_dict": median_ratio(times["castore"], times["torch"])
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        results = {**bench_jax(work, args.rounds), **bench_torch(work, args.rounds)}
    for name, ratio in results.items():
        print(f"{name}: {ratio:.2f}x")


if __name__ == "__main__":
    main()

"""A save must cost the same on step 10 and on step 100,000: small saves under a keep policy.

    python bench/steady_saves.py [--saves 10000] [--window 100] [--base REV] [--engine lmdb]

A training-like loop saves a ~4 KB state (a 1,000-float32 array that changes every save,
plus the step) ``--saves`` times into a fresh store with ``Keep(last=5, every=10)``, so
the kept steps grow by one every ten saves (1,005 kept after 10,000 saves).  Measured per
save: its wall time, its CPU time (every thread of the process: what castore computes,
not what the disk's fsync waits for), and the commits it made, counted as the store's
``generation()`` delta (it grows by one per committed write, see
``castore/storage/base.py``).  Printed:

* the median save time of the first and of the last ``--window`` saves, and their ratio
  (target: <= 1.2x: a save does not get slower as steps accumulate);
* the same ratio against a *fresh* store whose first ``--window`` saves are interleaved
  with the long store's last ones: the baseline measured in the same minute, so the drift
  of a shared machine (its fsync times vary several-fold within minutes) cancels out;
* the median CPU time per save, first, last and fresh;
* the mean and the slowest save of the last window (amortized GC shows there, not in the
  median);
* commits per save: the median, and how many saves made one, two, more (target: the
  median small save is one commit; a save that also collects garbage makes two);
* the steps kept at the end, and the garbage left for a later collection.

``--base REV`` runs the same loop against a revision checked out into a temporary git
worktree, in a child process before the working tree's, and prints both (the old code may
take many minutes for 10,000 saves: its saves grow with the steps kept).  Results go to
stdout only.  Each loop runs in a child process with ``PYTHONPATH`` set to its tree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

CHILD = r"""
import json, statistics, sys, tempfile, time
import numpy as np
import castore

saves, window, engine, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]


def open_store(name):
    path = f"memory://{name}" if engine == "memory" else tempfile.mkdtemp(dir=root)
    return castore.Store(path, keep=castore.Keep(last=5, every=10))


class Loop:
    # one store saving a changing ~4 KB state, each save's wall and CPU time and commits recorded
    def __init__(self, name):
        self.store = open_store(name)
        self.weights = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
        self.step = 0
        self.wall, self.cpu, self.commits = [], [], []

    def save(self):
        self.weights[self.step % 1000] += 1.0  # every save's state differs: one new 4 KB chunk
        backend = self.store.backend
        before, cpu, wall = backend.generation(), time.process_time(), time.perf_counter()
        self.store.save(self.step, {"agent": {"w": self.weights}, "step": self.step})
        self.wall.append(time.perf_counter() - wall)
        self.cpu.append(time.process_time() - cpu)
        self.commits.append(backend.generation() - before)
        self.step += 1


long, fresh = Loop("long"), None
for i in range(saves):
    if i == saves - window:
        fresh = Loop("fresh")  # its first saves, interleaved with the long store's last ones
    if fresh is None:
        long.save()
    else:  # alternating which goes first, so neither always follows the other's fsync
        for loop in (long, fresh) if i % 2 else (fresh, long):
            loop.save()
plan = long.store.plan_gc()
med = statistics.median
out = {
    "castore": castore.__file__,
    "window": window,
    "first_median": med(long.wall[:window]),
    "last_median": med(long.wall[-window:]),
    "fresh_median": med(fresh.wall),
    "first_cpu": med(long.cpu[:window]),
    "last_cpu": med(long.cpu[-window:]),
    "fresh_cpu": med(fresh.cpu),
    "last_mean": statistics.fmean(long.wall[-window:]),
    "last_max": max(long.wall[-window:]),
    "total": sum(long.wall),
    "tenths": [med(long.wall[t * saves // 10 : (t + 1) * saves // 10]) for t in range(10)],
    "commits_median": med(long.commits),
    "commits": {str(n): long.commits.count(n) for n in sorted(set(long.commits))},
    "kept": len(long.store.steps()),
    "garbage_steps": len(plan.steps),
    "garbage_bytes": plan.freed_bytes,
}
long.store.close()
fresh.store.close()
print(json.dumps(out))
"""


def run(tree: str, args, root: str) -> dict:
    env = dict(os.environ, PYTHONPATH=tree)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(args.saves), str(args.window), args.engine, root],
        env=env,
        cwd=root,  # not the repository: ``python -c`` puts the working directory first on the path
        capture_output=True,
        text=True,
    )
    if child.returncode:
        sys.exit(f"the loop against {tree} failed:\n{child.stderr[-4000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def report(name: str, r: dict) -> None:
    ms = 1e3
    print(f"{name}: {r['castore']}")
    print(
        f"  median save: first {r['window']} {r['first_median'] * ms:.2f} ms, last {r['window']} "
        f"{r['last_median'] * ms:.2f} ms: last/first {r['last_median'] / r['first_median']:.2f}x (target <= 1.2x)"
    )
    print(
        f"  same window, a fresh store's first saves interleaved: {r['fresh_median'] * ms:.2f} ms: "
        f"last/fresh {r['last_median'] / r['fresh_median']:.2f}x (drift of the machine cancels out)"
    )
    print(
        f"  median CPU per save: first {r['first_cpu'] * ms:.2f} ms, last {r['last_cpu'] * ms:.2f} ms, "
        f"fresh {r['fresh_cpu'] * ms:.2f} ms: last/first {r['last_cpu'] / r['first_cpu']:.2f}x, "
        f"last/fresh {r['last_cpu'] / r['fresh_cpu']:.2f}x"
    )
    print(
        f"  last {r['window']}: mean {r['last_mean'] * ms:.2f} ms, slowest {r['last_max'] * ms:.1f} ms; "
        f"all saves of the long store {r['total']:.1f} s"
    )
    tenths = " ".join(f"{t * 1e3:.2f}" for t in r["tenths"])
    print(f"  median save of each tenth of the run, ms: {tenths}")
    spread = ", ".join(f"{n} commit(s): {count}" for n, count in r["commits"].items())
    print(f"  commits per save: median {r['commits_median']:g} (target 1); {spread}")
    print(
        f"  kept at the end {r['kept']} steps; garbage left for a later GC: "
        f"{r['garbage_steps']} trashed steps, {r['garbage_bytes']} bytes"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--saves", type=int, default=10_000)
    parser.add_argument("--window", type=int, default=100, help="saves in the first and the last window")
    parser.add_argument("--engine", choices=("lmdb", "memory"), default="lmdb")
    parser.add_argument("--base", help="a git revision to run the same loop against first")
    args = parser.parse_args()
    if args.saves < 2 * args.window:
        parser.error("--saves must be at least twice --window")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    scratch = tempfile.mkdtemp(prefix="castore-steady-")
    base_tree = os.path.join(scratch, "base")
    try:
        print(f"{args.saves} saves of a ~4 KB state, Keep(last=5, every=10), {args.engine} engine")
        if args.base:
            subprocess.run(
                ["git", "-C", here, "worktree", "add", "--detach", base_tree, args.base],
                check=True,
                capture_output=True,
            )
            report(f"base {args.base}", run(base_tree, args, scratch))
        report("working tree", run(here, args, scratch))
    finally:
        if args.base:
            subprocess.run(
                ["git", "-C", here, "worktree", "remove", "--force", base_tree], check=False, capture_output=True
            )
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Save and load timings of two castore revisions, measured in the same run, as ratios.

    python bench/compare_revisions.py BASE_REV [--rounds 5] [--mb 512]

Checks ``BASE_REV`` out into a temporary git worktree and times, in alternating child
processes (so drift of this shared machine hits both alike), one workload through the
public API against that revision and against the working tree:

* ``full save``: a fresh store, one save of the whole state (replay + agent);
* ``incremental save``: 1% of the replay's rows and one agent leaf changed, saved again;
* ``unchanged save``: the same state saved as the next step (fingerprints only);
* ``verified load`` / ``unverified load``: the latest step read back.

Prints the median seconds of each and ``new / base`` (below 1.0: the working tree is
faster).  Results go to stdout only; nothing is written into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, sys, tempfile, time
import numpy as np
import castore

mb, root = int(sys.argv[1]), sys.argv[2]
rows = (mb << 20) // 12288 // 2
rng = np.random.default_rng(0)
replay = {"obs": rng.integers(0, 256, (rows, 64, 64, 3), dtype=np.uint8),
          "reward": rng.standard_normal(rows).astype(np.float32)}
agent = {f"layer{i}": rng.standard_normal((1024, 256)).astype(np.float32) for i in range((mb << 20) // 2 // (1 << 20))}
out = {}
path = tempfile.mkdtemp(dir=root)
with castore.Store(path) as store:
    t = time.perf_counter(); store.save(0, {"replay": replay, "agent": agent}); out["full save"] = time.perf_counter() - t
    changed = rng.integers(0, rows, max(1, rows // 100))
    replay["obs"][changed] += 1
    agent["layer0"] += 1
    t = time.perf_counter(); store.save(1, {"replay": replay, "agent": agent}); out["incremental save"] = time.perf_counter() - t
    t = time.perf_counter(); store.save(2, {"replay": replay, "agent": agent}); out["unchanged save"] = time.perf_counter() - t
    t = time.perf_counter(); store.load(2, verify=True); out["verified load"] = time.perf_counter() - t
    t = time.perf_counter(); store.load(2, verify=False); out["unverified load"] = time.perf_counter() - t
print(json.dumps(out))
"""


def run(tree: str, mb: int, root: str) -> dict:
    env = dict(os.environ, PYTHONPATH=tree)
    child = subprocess.run(  # cwd: ``python -c`` puts it first on sys.path, before PYTHONPATH
        [sys.executable, "-c", CHILD, str(mb), root], env=env, cwd=root, capture_output=True, text=True, check=True
    )
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mb", type=int, default=512, help="state size in MiB (half replay, half agent)")
    args = parser.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    scratch = tempfile.mkdtemp(prefix="castore-revs-")
    base_tree = os.path.join(scratch, "base")
    subprocess.run(
        ["git", "-C", here, "worktree", "add", "--detach", base_tree, args.base], check=True, capture_output=True
    )
    try:
        times: dict[str, dict[str, list]] = {"base": {}, "new": {}}
        for _ in range(args.rounds):
            for name, tree in (("base", base_tree), ("new", here)):
                for key, seconds in run(tree, args.mb, scratch).items():
                    times[name].setdefault(key, []).append(seconds)
        print(f"{args.mb} MiB state, {args.rounds} rounds alternating; median seconds; base = {args.base}")
        print(f"{'':18} {'base':>8} {'new':>8} {'new/base':>9}")
        for key in times["base"]:
            base, new = statistics.median(times["base"][key]), statistics.median(times["new"][key])
            print(f"{key:18} {base:8.3f} {new:8.3f} {new / base:9.2f}")
    finally:
        subprocess.run(
            ["git", "-C", here, "worktree", "remove", "--force", base_tree], check=False, capture_output=True
        )
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

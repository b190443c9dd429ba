"""Kill a writer 1,000 times at random instants and check the store after every kill.

The harness is the one ``tests/test_crash.py`` runs a few dozen times (``tests/kill_harness.py``):
a writer process saves (blocking and async, with a ``keep=`` policy), collects garbage,
retains, compacts, rolls back and deletes abandoned branches; each kill is followed by
``verify()``, a check that the steps of every branch are exactly what the interrupted
operation may have left, a bit-exact load of every step and a save.  ``make stress`` runs::

    python stress/kill.py [--kills 1000] [--seed S] [--sizes small|full] [--dir DIR]

It prints progress, then a summary: kills by phase (the operation a kill interrupted) and
outcome, steps and bytes checked, failures, and the wall time.  A failed check is printed
with its seed and cycle, the store is kept beside the others for a post-mortem (under
``--dir``, default a temporary directory), and the run goes on with a fresh store; the exit
status is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from kill_harness import Harness, Stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument(
        "--sizes", choices=["small", "full"], default="small", help="state per step: small (6 MB) or full (23 MB)"
    )
    parser.add_argument("--dir", help="where the stores go (kept); default: a temporary directory, removed")
    parser.add_argument("--every", type=int, default=100, help="print progress every N kills")
    parser.add_argument("--max-failures", type=int, default=5, help="stop after this many failed checks")
    args = parser.parse_args(argv)

    root = args.dir or tempfile.mkdtemp(prefix="castore-stress-")
    os.makedirs(root, exist_ok=True)
    total, failures = Stats(), []
    started = time.monotonic()
    print(f"stress: {args.kills} kills, seed {args.seed}, {args.sizes} state, stores in {root}", flush=True)
    run = 0
    harness = _fresh(root, run, args)
    try:
        while total.kills + harness.stats.kills < args.kills and len(failures) < args.max_failures:
            try:
                harness.cycle()
            except Exception:  # a failed check: report, keep the store, go on with a fresh one
                failures.append(
                    f"run {run} (seed {harness.seed}), cycle {harness.cycles - 1}:\n{traceback.format_exc()[-4000:]}"
                )
                print(f"FAILED {failures[-1]}", flush=True)
                total.add(harness.stats)
                run += 1
                harness = _fresh(root, run, args)
                continue
            done = total.kills + harness.stats.kills
            if done % args.every == 0:
                print(f"{done} kills, {time.monotonic() - started:.0f} s", flush=True)
        if len(failures) < args.max_failures:
            try:
                harness.finish()  # a writer that is not killed: every operation, a clean exit
            except Exception:
                failures.append(f"run {run} (seed {harness.seed}), clean run:\n{traceback.format_exc()[-4000:]}")
    finally:
        total.add(harness.stats)
        if not args.dir and not failures:
            shutil.rmtree(root, ignore_errors=True)
    seconds = time.monotonic() - started
    print(f"\nseed {args.seed}, {args.sizes} state: {total.report()}")
    print(f"{len(failures)} failures; wall time {seconds:.0f} s ({seconds / max(total.kills, 1):.2f} s per kill)")
    for failure in failures:
        print(f"\n{failure}")
    return 1 if failures else 0


def _fresh(root: str, run: int, args) -> Harness:
    harness = Harness(os.path.join(root, f"store-{run}"), args.seed + run, args.sizes)
    harness.start()
    return harness


if __name__ == "__main__":
    sys.exit(main())

"""The main job, small enough to watch: a DreamerV3-like run checkpointed with castore.

``castore demo`` (what ``make demo`` runs; also ``python -m castore.tools.demo``):

1. starts a training process (a ``castore.RingBuffer`` replay of 64x64x3 images, actions
   and rewards; an agent with parameters and Adam moments; a step counter) that saves
   every ``--every`` env steps with ``save(block=False)`` and prints a row per committed
   save (seconds the training loop was blocked, seconds to commit, MB written);
2. SIGKILLs it mid-run, at a random instant after a few saves;
3. starts it again: ``load_or_save()`` resumes from the last committed step;
4. replays the same run uninterrupted in this process and checks every kept step of the
   store bit-exact against it, then rolls back to an earlier step and checks that too;
5. prints the store's totals and dedup ratio.

Training is deterministic (seeded per env step, elementwise math only), so an
interrupted and resumed run must produce exactly the bytes of an uninterrupted one.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

import castore

IMAGE = (64, 64, 3)
ACTIONS = 6
BATCH_ENV_STEPS = 64  # env steps collected per training iteration


class Agent:
    """Parameters and Adam moments updated by deterministic elementwise math."""

    def __init__(self, width: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        shapes = {
            "enc/conv0/w": (4, 4, 3, 32),
            "enc/conv1/w": (4, 4, 32, 64),
            "enc/out/w": (width, 512),
            "dyn/gru/w": (512 + ACTIONS, 3 * 512),
            "dec/w": (512, width),
            "rew/w": (512, 1),
        }
        self.params: dict[str, dict[str, np.ndarray]] = {}
        for name, shape in shapes.items():
            group, leaf = name.rsplit("/", 1)
            self.params.setdefault(group, {})[leaf] = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        zeros = lambda: {g: {k: np.zeros_like(v) for k, v in leaves.items()} for g, leaves in self.params.items()}
        self.opt: dict = {"mu": zeros(), "nu": zeros(), "count": np.int64(0)}

    def train(self, batch, lr: float = 1e-4) -> float:
        obs, action, reward = batch
        signal_ = np.float32(obs.mean() / 255.0 + reward.mean() + action.mean())
        self.opt["count"] += 1
        for group, leaves in self.params.items():
            for name, w in leaves.items():
                grad = np.sin(w * np.float32(50.0) + signal_, dtype=np.float32)
                mu, nu = self.opt["mu"][group][name], self.opt["nu"][group][name]
                mu *= np.float32(0.9)
                mu += np.float32(0.1) * grad
                nu *= np.float32(0.999)
                nu += np.float32(0.001) * grad * grad
                w -= np.float32(lr) * mu / (np.sqrt(nu) + np.float32(1e-8))
        return float(signal_)

    def save(self):
        return {"params": self.params, "opt": self.opt}

    def load(self, state) -> None:
        self.params, self.opt = state["params"], state["opt"]


def collect(step: int):
    """The environment: observations of ``BATCH_ENV_STEPS`` steps from ``step`` on."""
    rng = np.random.default_rng(step)
    obs = rng.integers(0, 255, (BATCH_ENV_STEPS, *IMAGE), dtype=np.uint8)
    return (
        obs,
        rng.standard_normal((BATCH_ENV_STEPS, ACTIONS)).astype(np.float32),
        rng.random(BATCH_ENV_STEPS, np.float32),
    )


class Run:
    """Everything a training script registers on its Checkpoint."""

    def __init__(self, capacity: int):
        self.step = castore.Counter()
        self.agent = Agent(width=IMAGE[0] * 8)
        self.replay = castore.RingBuffer(capacity)  # tracks its changed rows

    def advance(self) -> None:
        step = int(self.step)
        obs, action, reward = collect(step)
        self.replay.add({"obs": obs, "action": action, "reward": reward})
        self.step.increment(BATCH_ENV_STEPS)
        batch = self.replay.sample(16, np.random.default_rng(10**9 + step))
        self.agent.train((batch["obs"], batch["action"], batch["reward"]))

    def register(self, cp: castore.Checkpoint) -> None:
        cp.step, cp.agent, cp.replay = self.step, self.agent, self.replay


# --- the training process -----------------------------------------------------------------


def train(logdir: str, capacity: int, every: int, total: int, pace: float) -> None:
    run = Run(capacity)
    with castore.Checkpoint(logdir) as cp:
        run.register(cp)
        resumed = cp.exists()
        start = cp.load_or_save()
        print(f"resumed from step {start}" if resumed else f"saved the initial state as step {start}", flush=True)
        should_save = castore.Every(steps=every, initial=False)
        should_save(int(run.step))
        pending: castore.SaveHandle | None = None
        while int(run.step) < total:
            run.advance()
            time.sleep(pace)  # an env that takes time, so the kill lands mid-run
            if pending is not None and pending.done():
                report(pending.result())
                pending = None
            if should_save(int(run.step)):
                if pending is not None:
                    report(pending.result())
                handle = cp.save(block=False)  # training goes on while it commits
                assert isinstance(handle, castore.SaveHandle)
                pending = handle
        if pending is not None:
            report(pending.result())


def report(r: castore.SaveResult) -> None:
    """One line per committed save: step, seconds blocked, seconds to commit, MB written."""
    print(
        f"SAVE {r.step:>7} {r.capture_seconds:8.3f} {r.seconds:8.3f} {r.new_bytes / 1e6:10.1f} "
        f"{r.logical_bytes / 1e6:10.1f}",
        flush=True,
    )


# --- the orchestrating demo -----------------------------------------------------------------


def launch(args) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "castore.tools.demo",
        "--train",
        "--logdir",
        args.logdir,
        "--capacity",
        str(args.capacity),
        "--every",
        str(args.every),
        "--total",
        str(args.total),
        "--pace",
        str(args.pace),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1)


def show(line: str, pid: int) -> int | None:
    """Print one trainer line; returns the step when it reports a committed save."""
    if line.startswith("SAVE"):
        _, step, blocked, seconds, written, logical = line.split()
        print(f"  [pid {pid}] {step:>7} {blocked:>8} {seconds:>8} {written:>10} {logical:>10}")
        return int(step)
    print(f"  [pid {pid}] {line.rstrip()}")
    return None


def run_killed(args, rng: random.Random) -> int:
    proc = launch(args)
    kill_after = rng.randint(3, 5)
    committed = -1
    try:
        saves = 0
        for line in proc.stdout or ():
            step = show(line, proc.pid)
            if step is not None:
                committed, saves = step, saves + 1
                if saves == kill_after:
                    time.sleep(rng.uniform(0, args.pace * args.every / BATCH_ENV_STEPS))
                    os.kill(proc.pid, signal.SIGKILL)
                    print(f"  !! SIGKILL pid {proc.pid} after its save of step {committed}")
                    break
    finally:
        proc.kill()
        proc.wait()
    return committed


def run_to_end(args) -> int | None:
    proc = launch(args)
    resumed: int | None = None
    for line in proc.stdout or ():
        show(line, proc.pid)
        if line.startswith("resumed from step"):
            resumed = int(line.split()[-1])
    if proc.wait() != 0:
        raise SystemExit(f"training process failed with exit code {proc.returncode}")
    return resumed


def equal(a, b) -> bool:
    a, b = (np.asarray(x) if isinstance(x, castore.TrackedArray) else x for x in (a, b))
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (np.ndarray, np.generic)):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return a == b


def check_against_reference(args) -> list[int]:
    """Re-run training uninterrupted here; every kept step must match it bit-exact."""
    with castore.Store(args.logdir) as store:
        kept = set(store.steps())
        reference = Run(args.capacity)
        checked = []
        while True:
            step = int(reference.step)
            if step in kept:
                stored = store.load(step)
                expected = {"step": step, "agent": reference.agent.save(), "replay": reference.replay.save()}
                if not equal(stored, expected):
                    raise SystemExit(f"step {step} differs from the uninterrupted run")
                checked.append(step)
            if step >= args.total:
                return checked
            reference.advance()


def continue_new_lineage(cp: castore.Checkpoint, run: Run, every: int) -> None:
    """Train on from the rolled-back step (say, with another learning rate): the steps after
    it move to an automatic branch when the first save commits, so nothing is mixed or lost."""
    for _ in range(2):
        run.advance()
        while int(run.step) % every:
            run.advance()
        result = cp.save()
        assert isinstance(result, castore.SaveResult)
        moved = f"; later steps moved to branch {result.abandoned_to!r}" if result.abandoned_to else ""
        print(f"new lineage: saved step {result.step}{moved}")
    for name in cp.branches():
        steps = cp.store.steps(branch=name)
        print(f"  branch {name}: {len(steps)} steps ({steps[0]} .. {steps[-1]})")


def report_verify(store: castore.Store) -> None:
    """Check every step of every branch down to its chunks (``castore verify`` does the same)."""
    started = time.perf_counter()
    report = store.verify()
    print(
        f"verify: {report.steps} steps, {report.hashed_chunks} chunks ({report.hashed_bytes / 1e6:.0f} MB) "
        f"hashed in {time.perf_counter() - started:.2f}s: "
        + ("no problems" if report.ok else f"{len(report.problems)} PROBLEMS")
    )
    if not report.ok:
        raise SystemExit(1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="castore demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--logdir", default="demo-logdir/ckpt")
    parser.add_argument("--capacity", type=int, default=4096, help="replay capacity (env steps)")
    parser.add_argument("--every", type=int, default=512, help="env steps between saves")
    parser.add_argument("--total", type=int, default=8192, help="env steps of the whole run")
    parser.add_argument("--pace", type=float, default=0.02, help="seconds of 'env time' per iteration")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--train", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.train:
        return train(args.logdir, args.capacity, args.every, args.total, args.pace)

    rng = random.Random(args.seed)
    shutil.rmtree(args.logdir, ignore_errors=True)
    started = time.perf_counter()
    print(
        f"castore demo: DreamerV3-like run in {args.logdir}, replay of {args.capacity} x {IMAGE} images, "
        f"save every {args.every} env steps, {args.total} env steps in all\n"
    )
    print(f"  {'':11}{'step':>7} {'blocked':>8} {'seconds':>8} {'MB written':>10} {'MB logical':>10}")
    committed = run_killed(args, rng)
    resumed = run_to_end(args)
    if resumed is None or resumed < committed:
        raise SystemExit(f"resumed from {resumed}, but step {committed} had been committed")
    print(f"\nresumed from step {resumed} (last save reported before the kill: {committed})")

    checked = check_against_reference(args)
    print(f"bit-exact against an uninterrupted run: {len(checked)} kept steps ({checked[0]} .. {checked[-1]})")

    rollback = checked[len(checked) // 3]
    run = Run(args.capacity)
    with castore.Checkpoint(args.logdir) as cp:
        run.register(cp)
        cp.load(step=rollback)
        reference = Run(args.capacity)
        while int(reference.step) < rollback:
            reference.advance()
        same = equal(run.agent.save(), reference.agent.save()) and equal(run.replay.save(), reference.replay.save())
        print(f"rolled back to step {rollback}: {'bit-exact' if same else 'MISMATCH'}")
        if not same:
            raise SystemExit(1)
        continue_new_lineage(cp, run, args.every)
        report_verify(cp.store)
        stats = cp.store.stats()
    print(
        f"\nstore: {stats.steps} steps, {stats.logical_bytes / 1e6:.1f} MB logical, "
        f"{stats.stored_bytes / 1e6:.1f} MB stored, file {stats.file_bytes / 1e6:.1f} MB, "
        f"dedup ratio {stats.dedup_ratio:.2f}x"
    )
    print(f"demo finished in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()

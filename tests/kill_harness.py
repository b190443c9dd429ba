"""The kill harness: a writer process doing what a training run does to its store, killed
with SIGKILL at random instants, and what must hold after every kill.

The writer (:func:`run_child`, a subprocess) opens a ``Checkpoint(keep=KEEP)`` and runs a
script of operations its parent chose:

* ``save``: a blocking save of the next step (retention in its commit, then GC when due);
* ``async``: ``save(block=False)``, the saved arrays scribbled over at once (the save must
  hold them as they were), the next state computed meanwhile, then the handle's result;
* ``rollback``: ``load(step=k)`` of an earlier step, then a save (blocking or not) of step
  k+1 in a new *epoch*: the steps after k move to branch ``main-abandoned-k`` when it commits;
* ``gc``; ``retain`` (``Keep(last=RETAIN_LAST)``: deletes, then collects); ``compact``
  (refused with StoreBusyError while another process has the store open: allowed only
  with ``--held``); ``delete_branch`` of an abandoned branch.

Every line it prints is one flushed write (a kill cannot tear it): ``open <pid> <layout>``
once it resumed from the latest step, then per operation ``op <i> <kind> <json args>`` before and
``done <i> <kind> <seconds> <layout>`` after, ``busy <i>`` for a refused compaction, and
``idle`` once the script is through (it then waits for stdin to close).  A layout is JSON
``{"main": [steps], "branches": [names]}``.  The state of step s in epoch e is
``state_for(s, epoch=e, sizes=...)``: the parent knows every byte to expect.

The parent (:class:`Harness`) keeps a model of the store, ``{branch: {step: epoch}}``.  For
the operation a kill interrupted it computes every outcome the store may show
(:func:`outcomes`: nothing committed, committed, committed and retained, ...).  After each
kill the store must open, ``verify()`` must report no problem, its steps on every branch
must be exactly one of those outcomes (so no half step and no lost step), every step of
every branch must load bit-exact, and a save must work.  ``tests/test_crash.py`` runs a few
dozen kills; ``stress/kill.py`` (``make stress``) a thousand.
"""

from __future__ import annotations

import collections
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

if __name__ == "__main__":  # run as a file: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workload import (
    SIZES,
    Child,
    _options,
    _scribble,
    _wait_for_line,
    assert_state_equal,
    fingerprint,
    say,
    state_for,
    state_nbytes,
)

import castore
import castore.maintenance.gc
import castore.save.pipeline

HARNESS_DIR = os.path.dirname(os.path.abspath(__file__))
KEEP = 3  #: the writer's retention policy: Checkpoint(keep=KEEP)
RETAIN_LAST = 2  #: the explicit ``retain`` operation keeps this many
START_EPOCH = 1
SMALL_BATCH = 256 << 10  #: chunk transaction bytes when a run picks small batches: several per save
CHUNK_BYTES = 64 << 10  #: the store's chunk size: a save writes tens of chunks, a GC frees tens
SMALL_DELETE_BATCH = 2  #: ids GC deletes per transaction when a run picks small ones (always when aiming at GC)
OPS_PER_RUN = 4
#: how often each operation is drawn for a writer's script (delete_branch: see _choose_ops)
OP_WEIGHTS = {"save": 30, "async": 22, "rollback": 16, "gc": 10, "retain": 6, "compact": 8}
#: how often each operation is the one a kill is aimed at
TARGETS = {"save": 22, "async": 18, "rollback": 18, "gc": 14, "retain": 10, "compact": 10, "delete_branch": 8}
HELD_SHARE = 0.3  #: runs during which the parent holds the store open (compaction is refused)
STARTUP_SHARE = 0.08  #: kills aimed at the writer's start rather than at an operation
CHILD_SCRIPT = "import sys; sys.path.insert(0, {dir!r}); import kill_harness; sys.exit(kill_harness.main(sys.argv[1:]))"

Layout = dict  # branch -> {step: epoch}; "main" always present


# --- the model -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """An operation the writer announced: its kind and arguments (``step``, ``epoch``, ...)."""

    kind: str
    args: dict


def shape(layout: Layout) -> dict[str, list[int]]:
    """``{branch: sorted steps}`` of the branches holding steps (``main`` always)."""
    return {b: sorted(steps) for b, steps in layout.items() if steps or b == "main"}


def committed(layout: Layout, step: int, epoch: int, continue_from: int | None = None) -> Layout:
    """``layout`` once a save of ``step`` committed (continuing from ``continue_from``)."""
    new = {b: dict(steps) for b, steps in layout.items()}
    main = new["main"]
    if continue_from is not None:
        later = {s: e for s, e in main.items() if s > continue_from}
        if later:
            new[abandoned_name(layout, continue_from)] = later
            for s in later:
                del main[s]
    main[step] = epoch
    return new


def abandoned_name(layout: Layout, step: int) -> str:
    """The branch a rollback to ``step`` moves the later steps to (as ``Store.continue_from``)."""
    taken = set(shape(layout))
    base = target = f"main-abandoned-{step}"
    n = 2
    while target in taken:
        target, n = f"{base}-{n}", n + 1
    return target


def retained(layout: Layout, last: int) -> Layout:
    """``layout`` once ``Keep(last=last)`` was applied to ``main``."""
    new = {b: dict(steps) for b, steps in layout.items()}
    new["main"] = {s: new["main"][s] for s in sorted(new["main"])[-last:]}
    return new


def outcomes(layout: Layout, op: Op | None) -> dict[str, Layout]:
    """Every layout the store may hold when ``op`` (None: no operation) was cut short."""
    if op is None:
        return {"unchanged": layout}
    if op.kind in ("save", "async", "rollback"):
        done = committed(layout, op.args["step"], op.args["epoch"], op.args.get("from"))
        return {"nothing committed": layout, "committed": done, "committed and retained": retained(done, KEEP)}
    if op.kind == "retain":
        return {"nothing deleted": layout, "retained": retained(layout, RETAIN_LAST)}
    if op.kind == "delete_branch" and op.args["branch"]:
        return {
            "nothing deleted": layout,
            "branch deleted": {b: s for b, s in layout.items() if b != op.args["branch"]},
        }
    return {"unchanged": layout}  # gc, compact, delete_branch with no branch to delete


def match(options: dict[str, Layout], found: dict, context: str, partial: bool = False) -> tuple[str, Layout]:
    """The first outcome whose shape is ``found`` (``partial``: a writer's layout line)."""
    for name, layout in options.items():
        if (summary(layout) if partial else shape(layout)) == found:
            return name, layout
    wanted = {name: summary(layout) if partial else shape(layout) for name, layout in options.items()}
    raise AssertionError(f"{context}: the store holds {found}; it may only hold one of {wanted}")


def summary(layout: Layout) -> dict:
    """What a writer's layout line says: main's steps and the branch names."""
    return {"main": sorted(layout["main"]), "branches": sorted(shape(layout))}


# --- the writer (subprocess side) ----------------------------------------------------------------


def run_child(path: str, options: dict) -> int:
    """The writer: see the module docstring.  Options: ``--ops a,b,..`` ``--seed N``
    ``--sizes small|full`` ``[--batch-bytes B]`` ``[--delete-batch N]`` ``[--held]`` ``[--pause S]`` ``[--max-seconds T]``."""
    if "batch_bytes" in options:
        castore.save.pipeline.BATCH_BYTES = int(options["batch_bytes"])
    if "delete_batch" in options:
        castore.maintenance.gc.DELETE_BATCH = int(options["delete_batch"])
    sizes = SIZES[options.get("sizes", "small")]
    rng = random.Random(int(options.get("seed", 0)))
    deadline = time.monotonic() + float(options.get("max_seconds", 120))
    pause = float(options.get("pause", 0))
    ops = [kind for kind in str(options.get("ops", "")).split(",") if kind]
    cp = castore.Checkpoint(path, keep=KEEP)
    try:
        cp.replay = cp.agent = cp.step = cp.epoch = None  # register the components, then resume
        step = cp.load()
        assert_state_equal(_tree(cp), state_for(step, epoch=int(cp.epoch), sizes=sizes), "<resumed>")
        say("open", os.getpid(), _layout_line(cp))
        for index, kind in enumerate(ops):
            _run_op(cp, index, kind, rng, sizes, bool(options.get("held")))
            time.sleep(pause)
        say("idle")
        _wait_for_line("exit", deadline)  # until stdin closes: the parent kills or releases it
    finally:
        cp.close()
    return 0


def _tree(cp) -> dict:
    return {"replay": cp.replay, "agent": cp.agent, "step": cp.step, "epoch": cp.epoch}


def _put(cp, state: dict) -> None:
    cp.replay, cp.agent, cp.step, cp.epoch = state["replay"], state["agent"], state["step"], state["epoch"]


def _layout_line(cp) -> str:
    return json.dumps({"main": cp.steps(), "branches": sorted(cp.branches())}, separators=(",", ":"))


def _run_op(cp, index: int, kind: str, rng: random.Random, sizes, held: bool) -> None:
    epoch = int(cp.epoch)
    steps = cp.steps()
    args: dict = {}
    if kind == "rollback" and len(steps) < 2:
        kind = "save"  # nothing earlier to go back to
    if kind == "delete_branch":
        abandoned = [b for b in cp.branches() if b != "main"]
        args["branch"] = rng.choice(abandoned) if abandoned else None
    if kind in ("save", "async"):
        args = {"step": steps[-1] + 1, "epoch": epoch}
    elif kind == "rollback":
        back = rng.choice(steps[:-1])
        new_epoch = rng.randrange(START_EPOCH + 1, 1 << 31)
        args = {"from": back, "step": back + 1, "epoch": new_epoch, "block": rng.random() < 0.5}
    say("op", index, kind, json.dumps(args, separators=(",", ":")))
    started = time.perf_counter()
    if kind == "rollback":
        cp.load(step=args["from"])
        assert_state_equal(_tree(cp), state_for(args["from"], epoch=int(cp.epoch), sizes=sizes), "<rolled back>")
    if kind in ("save", "async", "rollback"):
        state = state_for(args["step"], epoch=args["epoch"], sizes=sizes)
        _put(cp, state)
        if kind == "save" or (kind == "rollback" and args["block"]):
            cp.save()
        else:
            handle = cp.save(block=False)
            _scribble(state)  # the save must hold the state as it was at the call
            state_for(args["step"] + 1, epoch=args["epoch"], sizes=sizes)  # the run goes on meanwhile
            handle.result()
    elif kind == "gc":
        cp.gc()
    elif kind == "retain":
        cp.retain(castore.Keep(last=RETAIN_LAST))
    elif kind == "compact":
        try:
            cp.store.compact()
        except castore.StoreBusyError:
            if not held:
                raise
            say("busy", index)
    elif kind == "delete_branch":
        if args["branch"]:
            cp.delete_branch(args["branch"])
    else:
        raise SystemExit(f"unknown operation {kind!r}")
    say("done", index, kind, f"{time.perf_counter() - started:.6f}", _layout_line(cp))


def writer(store, *args, stdin: bool = True) -> Child:
    """:func:`run_child` in a subprocess, as a :class:`workload.Child`."""
    return Child("writer", store, *args, stdin=stdin, script=CHILD_SCRIPT.format(dir=HARNESS_DIR))


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "writer":
        print(__doc__, file=sys.stderr)
        return 2
    return run_child(argv[1], _options(argv[2:]))


# --- the parent: kill, then check --------------------------------------------------------------------


@dataclass
class Stats:
    """What a harness run did and checked."""

    kills: int = 0
    phases: collections.Counter = field(default_factory=collections.Counter)  #: phase -> kills
    outcomes: collections.Counter = field(default_factory=collections.Counter)  #: "phase: outcome" -> kills
    steps_checked: int = 0  #: step loads compared bit-exact (with verification)
    bytes_checked: int = 0  #: array bytes of those loads
    bytes_hashed: int = 0  #: chunk bytes ``verify()`` hashed
    late_commits: int = 0  #: commits a held store showed only once the parent took the writer lock
    refused_compactions: int = 0

    def add(self, other: Stats) -> None:
        for name in ("kills", "steps_checked", "bytes_checked", "bytes_hashed", "late_commits", "refused_compactions"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.phases.update(other.phases)
        self.outcomes.update(other.outcomes)

    def inside(self) -> int:
        """Kills that landed inside an operation (not at start-up, between or after them)."""
        return sum(n for phase, n in self.phases.items() if phase not in ("startup", "between ops", "idle"))

    def report(self) -> str:
        lines = [
            f"{self.kills} kills ({self.inside()} inside an operation), {self.steps_checked} step loads "
            f"checked bit-exact ({self.bytes_checked / 1e9:.2f} GB), verify hashed "
            f"{self.bytes_hashed / 1e9:.2f} GB, {self.late_commits} late commits, "
            f"{self.refused_compactions} compactions refused while held"
        ]
        lines += [f"  {phase:13} {n:5}" for phase, n in sorted(self.phases.items(), key=lambda kv: -kv[1])]
        lines += ["  outcomes:"] + [f"    {name:45} {n:5}" for name, n in sorted(self.outcomes.items())]
        return "\n".join(lines)


class Harness:
    """Kill cycles against one store at ``path``; the schedule comes from ``seed``."""

    def __init__(self, path, seed: int, sizes: str = "small", *, rotate: bool = False):
        """``rotate``: aim the kills at each kind of operation in turn (TARGETS' order), so a
        short run covers them all; otherwise draw each target by TARGETS' weights."""
        self.path = os.fspath(path)
        self.rotate = rotate
        self.seed = seed
        self.rng = random.Random(seed)
        self.sizes = sizes
        self.stats = Stats()
        self.cycles = 0
        self.layout: Layout = {}
        self._digests: dict[tuple[int, int], str] = {}  # (step, epoch) -> fingerprint of its state
        self._seconds: dict[str, list[float]] = collections.defaultdict(list)  # op kind -> durations
        self._startup: list[float] = [0.3]

    def state(self, step: int, epoch: int) -> dict:
        return state_for(step, epoch=epoch, sizes=SIZES[self.sizes])

    def start(self) -> None:
        """Create the store with step 0 (a writer resumes from the latest step)."""
        with castore.Store(self.path, keep=KEEP, chunk_bytes=CHUNK_BYTES) as store:
            store.save(0, self.state(0, START_EPOCH))
        self.layout = {"main": {0: START_EPOCH}}

    def cycle(self) -> str:
        """Run a writer, kill it at a random instant, check the store; returns the kill's phase."""
        rng = self.rng
        ops, target = self._choose_ops()
        held = rng.random() < HELD_SHARE
        batch = rng.choice([None, SMALL_BATCH])
        delete_batch = SMALL_DELETE_BATCH if ops[target] == "gc" else rng.choice([None, SMALL_DELETE_BATCH])
        args = ["--ops", ",".join(ops), "--seed", rng.getrandbits(32), "--sizes", self.sizes, "--max-seconds", 120]
        args += ["--held"] if held else []
        args += ["--batch-bytes", batch] if batch else []
        args += ["--delete-batch", delete_batch] if delete_batch else []
        context = (
            f"seed {self.seed}, cycle {self.cycles} (ops {ops}, {'held' if held else 'not held'}, "
            f"batch {batch or 'default'}, GC delete batch {delete_batch or 'default'})"
        )
        self.cycles += 1
        observer = castore.Store(self.path, keep=KEEP) if held else None  # open across the kill
        try:
            with writer(self.path, *args) as child:
                if rng.random() < STARTUP_SHARE:
                    time.sleep(rng.uniform(0.0, 1.2 * statistics.median(self._startup[-20:])))
                else:
                    kind = child.expect("op", 60, nth=target + 1)[2]
                    # Half the kills anywhere in the operation, half near its end: a save's
                    # manifest commit, then retention and its collection.
                    late = rng.random() < 0.5
                    time.sleep(self._median(kind) * (rng.uniform(0.7, 1.5) if late else rng.uniform(0.0, 1.0)))
                code = child.kill()
                lines = [line for _, line in child.lines]
                context += f", writer lines {lines}"
                assert code == -9, f"{context}: the writer was not killed but exited:\n{child.describe()}"
                opened = [at for at, line in child.lines if line.startswith("open ")]
                if opened:
                    self._startup.append(opened[0] - child.started)
            phase, allowed = self.follow(lines, held, context)
            outcome = self.check(allowed, context, observer)
        finally:
            if observer is not None:
                observer.close()
        self.stats.kills += 1
        self.stats.phases[phase] += 1
        self.stats.outcomes[f"{phase}: {outcome}"] += 1
        return phase

    def finish(self) -> None:
        """A writer runs every kind of operation and exits cleanly; then the store is checked."""
        ops = ["save", "async", "rollback", "gc", "retain", "compact", "delete_branch", "save"]
        context = f"seed {self.seed}, clean run"
        with writer(self.path, "--ops", ",".join(ops), "--seed", self.seed, "--sizes", self.sizes) as child:
            child.expect("idle", 120)
            child.send_eof()
            assert child.finish(60) == 0, child.describe()
            phase, allowed = self.follow([line for _, line in child.lines], False, context)
        assert phase == "idle", context
        self.check(allowed, context)

    # -- steps of a cycle ----------------------------------------------------------------------------

    def _choose_ops(self) -> tuple[list[str], int]:
        """A script of OPS_PER_RUN operations and the index of the one to kill inside.

        The target's kind is drawn from TARGETS, so rare operations get their share of
        kills; the others come from OP_WEIGHTS.
        """
        rng = self.rng
        abandoned = len(shape(self.layout)) - 1
        weights = dict(OP_WEIGHTS, delete_branch=0 if not abandoned else 8 if abandoned <= 2 else 40)
        ops = rng.choices(list(weights), list(weights.values()), k=OPS_PER_RUN)
        targets = dict(TARGETS, delete_branch=TARGETS["delete_branch"] if abandoned else 0)
        index = rng.randrange(OPS_PER_RUN - 1)  # an operation follows: a late kill lands in it
        ops[index] = rng.choices(list(targets), list(targets.values()))[0]
        if self.rotate:
            ops[index] = list(TARGETS)[self.cycles % len(TARGETS)]
            if ops[index] == "delete_branch" and not abandoned:
                ops[index] = "rollback"  # makes a branch to delete next time
        if ops[index] == "gc" and abandoned and index and rng.random() < 0.5:
            ops[index - 1] = "delete_branch"  # so the collection has a branch's chunks to free
        return ops, index

    def _median(self, kind: str) -> float:
        seconds = self._seconds[kind][-20:]
        return statistics.median(seconds) if seconds else 0.05

    def follow(self, lines: list[str], held: bool, context: str) -> tuple[str, dict[str, Layout]]:
        """Replay the writer's report against the model; returns the kill's phase and the
        layouts the store may hold."""
        layout, op, phase, busy = self.layout, None, "startup", set()
        for line in lines:
            word, _, rest = line.partition(" ")
            if word == "open":
                found = json.loads(rest.split(" ", 1)[1])
                assert found == summary(layout), f"{context}: the writer resumed from {found}, not {summary(layout)}"
            elif word == "op":
                _, kind, args = rest.split(" ", 2)
                op, phase = Op(kind, json.loads(args)), kind
            elif word == "busy":
                assert held, f"{context}: compaction refused, yet no other process had the store open"
                busy.add(rest)
                self.stats.refused_compactions += 1
            elif word == "done":
                index, kind, seconds, found = rest.split(" ", 3)
                assert op is not None and op.kind == kind, f"{context}: {line!r} ends no operation"
                assert kind != "compact" or held == (index in busy), f"{context}: compaction while held: {held}"
                name, layout = match(outcomes(layout, op), json.loads(found), f"{context}, after {line!r}", True)
                assert name != "nothing committed", f"{context}: {line!r}: a save returned, nothing committed"
                self._seconds[kind].append(float(seconds))
                op, phase = None, "between ops"
            elif word == "idle":
                phase = "idle"
        self.layout = layout
        return phase, outcomes(layout, op)

    def check(self, allowed: dict[str, Layout], context: str, observer=None) -> str:
        """The checks after a kill (see the module docstring); returns the outcome's name."""
        store = observer if observer is not None else castore.Store(self.path, keep=KEEP)
        try:
            report = store.verify()
            assert report.ok, f"{context}: verify found:\n" + "\n".join(map(str, report.problems))
            self.stats.bytes_hashed += report.hashed_bytes
            found = self._read_shape(store)
            name, layout = match(allowed, found, context)
            self._check_steps(store, layout, context)
            # Taking the writer lock publishes a commit the killed writer may have left
            # unpublished; a process that held the store open across the kill sees it only now.
            garbage = store.plan_gc()
            again = self._read_shape(store)
            if again != found:
                name, layout = match(allowed, again, f"{context}, after taking the writer lock")
                self.stats.late_commits += 1
                self._check_steps(store, layout, context)
            # The next save works.
            main = layout["main"]
            step = max(main) + 1
            save = Op("save", {"step": step, "epoch": main[max(main)]})
            store.save(step, self.state(step, main[max(main)]))
            after, self.layout = match(outcomes(layout, save), self._read_shape(store), f"{context}, saved {step}")
            assert after != "nothing committed", context
            self._check_steps(store, {"main": {step: main[max(main)]}}, context)
            return name + (", garbage left" if garbage.chunks or garbage.pages else "")
        finally:
            if observer is None:
                store.close()

    def _read_shape(self, store) -> dict[str, list[int]]:
        found = {}
        for branch in store.branches():
            if branch == store.branch:
                found[branch] = store.steps()
            else:
                with castore.Store(self.path, branch=branch) as other:
                    found[branch] = other.steps()
        return {b: steps for b, steps in found.items() if steps or b == "main"}

    def _check_steps(self, store, layout: Layout, context: str) -> None:
        """Every step of ``layout`` loads (verified) bit-exact as its epoch's state."""
        for branch, steps in layout.items():
            for step, epoch in steps.items():
                where = f"<{context}: step {step} of {branch}, epoch {epoch}>"
                loaded = store.load(step, branch=branch, verify=True)
                key = (step, epoch)
                if key not in self._digests:
                    expected = self.state(step, epoch)
                    assert_state_equal(loaded, expected, where)  # in full the first time
                    self._digests[key] = fingerprint(expected)
                elif fingerprint(loaded) != self._digests[key]:
                    assert_state_equal(loaded, self.state(step, epoch), where)
                    raise AssertionError(f"{where}: fingerprint differs")
                self.stats.steps_checked += 1
                self.stats.bytes_checked += state_nbytes(loaded)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

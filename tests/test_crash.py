"""Crash safety: SIGKILL a writer process at random instants, and saves that fail midway.

After every kill the store must hold exactly the steps the writer committed (at least
every step it reported, at most the one it was saving), each loading bit-exact with
verification, and the next writer must carry on from there.

The kill instants come from ``random.Random`` seeded by ``CASTORE_CRASH_SEED`` (printed
with every failure), so a failing schedule can be replayed::

    CASTORE_CRASH_SEED=1234 pytest tests/test_crash.py
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time

import numpy as np
import pytest

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # workload.py beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload  # noqa: E402
from workload import Child, assert_state_equal, fingerprint, state_for  # noqa: E402

import castore  # noqa: E402

SEED = int(os.environ.get("CASTORE_CRASH_SEED", "20240611"))
KILLS_PER_CASE = 8
SMALL_BATCH = 1 << 20  # several chunk transactions per save: kills land between them

#: case -> (writer batch bytes: None = castore's default, "mixed" = chosen per run;
#:          the test process keeps one Store open across kills, or reopens it per check)
CASES = {
    "default-batches-observer-held": (None, True),
    "small-batches-observer-reopened": (SMALL_BATCH, False),
    "mixed-batches-observer-held": ("mixed", True),
    "async-small-batches-observer-held": (SMALL_BATCH, True),  # save_async, state scribbled after
}


pytestmark = pytest.mark.usefixtures("drop_big_stores_of_passing_tests")


class Expected:
    """Digests of ``state_for(step)``, computed once per step."""

    def __init__(self):
        self._digests: dict[int, str] = {}

    def check(self, store: castore.Store, step: int, context: str) -> None:
        loaded = store.load(step, verify=True)
        if step not in self._digests:
            expected = state_for(step)
            assert_state_equal(loaded, expected, f"<{context}: step {step}>")  # in full the first time
            self._digests[step] = fingerprint(expected)
        elif fingerprint(loaded) != self._digests[step]:
            assert_state_equal(loaded, state_for(step), f"<{context}: step {step}>")
            raise AssertionError(f"{context}: step {step} fingerprint differs")


def check_store(store: castore.Store, expected: Expected, lo: int, hi: int, context: str) -> int:
    """Committed steps are exactly 0..latest with lo <= latest <= hi, all bit-exact."""
    latest = store.latest()
    latest = -1 if latest is None else latest
    assert lo <= latest <= hi, f"{context}: latest step {latest}, expected in [{lo}, {hi}]"
    assert store.steps() == list(range(latest + 1)), f"{context}: steps {store.steps()}"
    for step in range(latest + 1):
        expected.check(store, step, context)
    return latest


def unreferenced_chunks(store: castore.Store) -> int | None:
    """Chunks no step names (left by a killed save), or None if that cannot be told.

    Informational only (it reads manifests through castore internals): it shows whether
    a kill landed between a chunk transaction and the manifest's.
    """
    try:
        from castore.codec import leaf_nodes
        from castore.manifest import ChunkedBlob, InlineBlob

        ids = set()
        for step in store.steps():
            for name in store.manifest(step).names:
                for _, node in leaf_nodes(store.manifest(step).component(name)):
                    blob = getattr(node, "blob", None)
                    if blob is None or isinstance(blob, InlineBlob):
                        continue
                    if not isinstance(blob, ChunkedBlob):
                        return None
                    ids.update(blob.ids[i : i + 32] for i in range(0, len(blob.ids), 32))
        return store.stats().chunks - len(ids)
    except Exception:
        return None


def check_run(writer: Child, known: int, maybe: int | None, context: str) -> tuple[int, int, int]:
    """Check a writer's report against the store state before it ran; returns (opened, lo, hi).

    ``known`` is the latest step verified before the run and ``maybe`` a step whose save
    was cut short in a way that may still surface (see LATE_COMMIT); the run reports
    ``open <pid> <latest>`` and then ``saving``/``committed`` lines of consecutive steps.
    """
    opened = writer.words("open")
    start = int(opened[0][2]) if opened else known
    assert start in (known, maybe), f"{context}: the writer opened the store at step {start}"
    saving = [int(w[1]) for w in writer.words("saving")]
    committed = [int(w[1]) for w in writer.words("committed")]
    assert saving == list(range(start + 1, start + 1 + len(saving))), f"{context}: saves out of order"
    assert committed in (saving, saving[:-1]), f"{context}: commits out of order"
    lo = committed[-1] if committed else start
    hi = saving[-1] if saving else max(start, -1 if maybe is None else maybe)
    return start, lo, hi


#: A kill while LMDB writes the meta page of the manifest's transaction (an O_DSYNC
#: pwrite) leaves the step on disk, but LMDB's shared "latest transaction" record still
#: names the previous one until the next write transaction recovers the dead writer's
#: mutex.  Processes sharing the lock file (the held observer) see the step only then;
#: opening the store for writing recovers it.  Counted as "commit surfaced later".
LATE_COMMIT = "commit surfaced later"


@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_writer_at_random_instants_keeps_committed_steps(tmp_path, case):
    batch, hold_observer = CASES[case]
    seed = SEED + list(CASES).index(case)
    rng = random.Random(seed)
    path = tmp_path / "store"
    expected = Expected()
    save_seconds = [0.03]  # what a save took, as the writers report it
    outcomes: dict[str, int] = {}
    observer = None
    known, maybe = -1, None  # latest verified step (-1: none); a step that may still surface
    try:
        for kill in range(KILLS_PER_CASE):
            mode = "first-save" if kill == 0 else rng.choice(["startup", "first-save", "mid-save", "mid-loop"])
            run_batch = rng.choice([None, SMALL_BATCH]) if batch == "mixed" else batch
            args = ["--max-seconds", "60"] + (["--batch-bytes", run_batch] if run_batch else [])
            args += ["--async"] if case.startswith("async") else []
            save = statistics.median(save_seconds[-20:])
            context = f"seed {seed}, case {case}, kill {kill} ({mode}, batch {run_batch})"
            with Child("writer", path, *args) as writer:
                if mode == "startup":  # anywhere from interpreter start to a few saves in
                    time.sleep(rng.uniform(0.0, 0.5))
                elif mode == "first-save":  # inside the run's first save
                    writer.expect("saving", 30)
                    time.sleep(rng.uniform(0.0, save))
                elif mode == "mid-save":  # inside a later save
                    writer.expect("saving", 30, nth=rng.randint(2, 4))
                    time.sleep(rng.uniform(0.0, save))
                else:  # anywhere in the loop after a few commits
                    writer.expect("committed", 30, nth=rng.randint(1, 3))
                    time.sleep(rng.uniform(0.0, 0.1))
                code = writer.kill()
                context += f", writer lines {[line for _, line in writer.lines]}"
                assert code == -9, f"{context}: the writer was not killed but exited:\n{writer.describe()}"
                save_seconds += [float(w[2]) for w in writer.words("committed")]
                start, lo, hi = check_run(writer, known, maybe, context)
                saving = [int(w[1]) for w in writer.words("saving")]
                committed = [int(w[1]) for w in writer.words("committed")]
            if start != known:
                outcomes[LATE_COMMIT] = outcomes.get(LATE_COMMIT, 0) + 1
            if observer is None or not hold_observer:
                observer = castore.Store(path)
            previous = known
            known = check_store(observer, expected, lo, hi, context)
            maybe = hi if known < hi else None
            garbage = unreferenced_chunks(observer)
            if not hold_observer:
                observer.close()
            if not saving:
                outcome = "before any save"
            elif committed and committed[-1] == saving[-1]:
                outcome = "between saves"
            elif known == saving[-1]:
                outcome = "after a commit, before its report"
            else:
                outcome = "mid-save, not visible"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            print(f"kill {kill}: {mode:10} steps {previous:3} -> {known:3}: {outcome} "
                  f"(unreferenced chunks in the store: {garbage})")

        # The next writer carries on and exits cleanly; so does a save from this process.
        with Child("writer", path, "--count", 3, "--max-seconds", 60) as writer:
            code = writer.finish(60)
            context = f"seed {seed}, clean run, writer lines {[line for _, line in writer.lines]}"
            assert code == 0, writer.describe()
            start, lo, hi = check_run(writer, known, maybe, context)
            assert lo == hi == start + 3, context
        if observer is None or not hold_observer:
            observer = castore.Store(path)
        known = check_store(observer, expected, hi, hi, context)
        observer.save(known + 1, state_for(known + 1))
        check_store(observer, expected, known + 1, known + 1, f"seed {seed}, after an in-process save")
    finally:
        if observer is not None:
            observer.close()
    print(f"{case} (seed {seed}): {outcomes}")
    # Most kills are aimed inside a save; make sure the schedule really exercises that.
    inside = outcomes.get("mid-save, not visible", 0) + outcomes.get("after a commit, before its report", 0)
    assert inside >= 2, f"seed {seed}: only {inside} of {KILLS_PER_CASE} kills landed inside a save: {outcomes}"


# --- saves that fail midway -------------------------------------------------------------------


def big(seed: int, mb: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (mb << 10, 1024), dtype=np.uint8)


@pytest.mark.parametrize(
    "bad",
    [object(), {1: "int key"}, {"a", "set"}, np.array([object()], dtype=object), lambda: None],
    ids=["object", "int-key", "set", "object-array", "function"],
)
def test_save_failing_on_an_unsupported_leaf_after_large_arrays_leaves_no_step(tmp_path, bad):
    with castore.Store(tmp_path / "store") as store:
        store.save(0, state_for(0))
        tree = {"agent": {"a": big(1), "b": big(2), "c": {"d": big(3), "bad": bad}}, "step": 1}
        with pytest.raises(castore.UnsupportedValueError) as info:
            store.save(1, tree)
        assert "bad" in str(info.value)
        assert store.steps() == [0] and store.latest() == 0 and not store.has_step(1)
        with pytest.raises(castore.StepNotFoundError):
            store.load(1)
        assert_state_equal(store.load(0), state_for(0))
        # The store keeps working: the same step with good state, then state reusing the
        # arrays whose chunks the failed save may have left behind.
        store.save(1, state_for(1))
        good = {"agent": {"a": big(1), "b": big(2), "c": {"d": big(3), "ok": None}}, "step": 2}
        store.save(2, good)
        assert store.steps() == [0, 1, 2]
        assert_state_equal(store.load(1), state_for(1))
        assert_state_equal(store.load(2), good)
    with castore.Store(tmp_path / "store") as store:  # and after reopening
        assert store.steps() == [0, 1, 2]
        assert_state_equal(store.load(2), good)


def shards(fail):
    """Sharded component whose third shard fails after two whose chunks got committed."""
    yield {"rows": big(10)}
    yield {"rows": big(11)}
    if fail == "raise":
        raise RuntimeError("data loader broke")
    yield {"rows": big(12), "bad": object()}


@pytest.mark.parametrize("fail", ["unsupported", "raise"])
def test_sharded_save_failing_after_committed_shards_leaves_no_step(tmp_path, fail):
    with castore.Store(tmp_path / "store") as store:
        store.save(0, state_for(0))
        chunks_before = store.stats().chunks
        with pytest.raises(castore.UnsupportedValueError if fail == "unsupported" else RuntimeError):
            store.save(1, {"replay": shards(fail), "step": 1})
        # Earlier shards were flushed to the store (garbage now), yet no step names them.
        assert store.stats().chunks > chunks_before
        assert store.steps() == [0] and store.latest() == 0
        store.save(1, {"replay": iter([{"rows": big(10)}, {"rows": big(11)}]), "step": 1})
        loaded = store.load(1)
        assert_state_equal(list(loaded["replay"]), [{"rows": big(10)}, {"rows": big(11)}])
        assert loaded["step"] == 1
    # Another process can take over writing: the failed save left no lock behind.
    with Child("writer", tmp_path / "store", "--count", 1, "--max-seconds", 60) as writer:
        assert writer.finish(60) == 0, writer.describe()
        assert [w[1] for w in writer.words("committed")] == ["2"]
    with castore.Store(tmp_path / "store") as store:
        assert store.steps() == [0, 1, 2]
        assert_state_equal(store.load(2), state_for(2))


def test_save_over_an_existing_step_with_other_content_fails_and_changes_nothing(tmp_path):
    with castore.Store(tmp_path / "store") as store:
        store.save(0, state_for(0))
        with pytest.raises(castore.StepExistsError):
            store.save(0, state_for(1))
        assert store.steps() == [0]
        assert_state_equal(store.load(0), state_for(0))
        store.save(0, state_for(0))  # the same state again: a no-op
        store.save(1, state_for(1))
        assert_state_equal(store.load(1), state_for(1))


def test_workload_is_deterministic_and_steps_differ():
    a, b = state_for(5), state_for(5)
    assert_state_equal(a, b)
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(state_for(6))
    with pytest.raises(AssertionError):
        assert_state_equal(a, state_for(6))
    with pytest.raises(AssertionError):  # exact types: a tuple is not a list
        assert_state_equal({"x": (1,)}, {"x": [1]})
    assert 4 << 20 <= workload.state_nbytes(a) <= 40 << 20

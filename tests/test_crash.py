"""Crash safety: SIGKILL a writer process at random instants, and saves that fail midway.

The writer (``kill_harness.run_child``) does what a training run does to its store: blocking
and async saves with a ``keep=`` policy (retention in each commit, amortized GC), explicit
``gc()``, ``retain()`` and ``compact()``, rollbacks (``load(step=k)`` then a save: the later
steps move to ``main-abandoned-k``) and deleting abandoned branches.  After every kill the
store must open, ``verify()`` must report nothing, the steps of every branch must be exactly
what the operation cut short may have left (nothing lost, no half step), each loading
bit-exact, and the next save must work.  ``make stress`` runs the same harness for 1,000
kills.  One kill is aimed at a single instant: between LMDB writing a commit's meta page
and publishing it to the processes that hold the store open; a restarted writer must
resume from that commit.  A loop of small saves, each one transaction (chunks, manifest,
retention), is killed at random instants too: its steps must be exactly what the policy
keeps of the steps committed.

The kill instants come from ``random.Random`` seeded by ``CASTORE_CRASH_SEED`` (printed
with every failure), so a failing schedule can be replayed::

    CASTORE_CRASH_SEED=1234 pytest tests/test_crash.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # workload.py beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload
from kill_harness import KEEP, Harness, Op, committed, outcomes, retained, shape
from workload import SMALL, Child, assert_state_equal, fingerprint, state_for

import castore
from castore.maintenance.retention import StepInfo

SEED = int(os.environ.get("CASTORE_CRASH_SEED", "20240611"))
#: sizes -> kills: many cheap kills with the small state, a few with the 23 MB one
KILLS = {"small": 40, "full": 8}
#: writers started to kill one inside a commit's window (a miss is retried with the next step)
KILL_ATTEMPTS = 10


pytestmark = pytest.mark.usefixtures("drop_big_stores_of_passing_tests")


@pytest.mark.parametrize("sizes", list(KILLS))
def test_sigkill_writer_at_random_instants_keeps_committed_steps(tmp_path, sizes):
    seed = SEED + list(KILLS).index(sizes)
    harness = Harness(tmp_path / "store", seed, sizes, rotate=True)
    harness.start()
    for _ in range(KILLS[sizes]):
        harness.cycle()
    harness.finish()  # a writer that is not killed runs every operation and exits cleanly
    stats = harness.stats
    print(f"{sizes} state (seed {seed}): {stats.report()}")
    assert stats.kills == KILLS[sizes]
    # Most kills are aimed inside an operation; make sure the schedule really does that.
    assert stats.inside() >= KILLS[sizes] // 2, f"seed {seed}: {stats.report()}"


def test_kill_harness_model_of_what_a_cut_short_operation_may_leave(tmp_path):
    layout = {"main": {3: 1, 4: 1, 5: 1}, "main-abandoned-3": {4: 7}}
    save = Op("save", {"step": 6, "epoch": 1})
    assert [shape(o) for o in outcomes(layout, save).values()] == [
        {"main": [3, 4, 5], "main-abandoned-3": [4]},
        {"main": [3, 4, 5, 6], "main-abandoned-3": [4]},
        {"main": [4, 5, 6], "main-abandoned-3": [4]},
    ]
    assert shape(retained(layout, 1)) == {"main": [5], "main-abandoned-3": [4]}
    assert outcomes(layout, Op("gc", {})) == {"unchanged": layout}
    gone = outcomes(layout, Op("delete_branch", {"branch": "main-abandoned-3"}))["branch deleted"]
    assert shape(gone) == {"main": [3, 4, 5]}
    # Rollbacks: the model moves and names the later steps as castore does.
    model = {"main": {3: 1, 4: 1, 5: 1}}
    with castore.Checkpoint(tmp_path / "store") as cp:
        for step in (3, 4, 5):
            cp.step = step
            cp.save()
        for epoch in (2, 3):
            cp.load(step=3)
            cp.step = 4
            moved_to = cp.save().abandoned_to
            model = committed(model, 4, epoch, continue_from=3)
            assert moved_to in model and moved_to == f"main-abandoned-3{'' if epoch == 2 else '-2'}"
        found = {}
        for branch in cp.branches():
            with castore.Store(tmp_path / "store", branch=branch) as store:
                found[branch] = store.steps()
    assert found == shape(model) == {"main": [3, 4], "main-abandoned-3": [4, 5], "main-abandoned-3-2": [4]}
    assert retained(model, KEEP) == model


# --- a commit on disk but not yet published ------------------------------------------------------

#: A writer killed inside the commit of its manifest: after LMDB wrote the new meta page
#: into the map and before it published the transaction in ``lock.mdb``.  The window is the
#: msync() of the meta page; SIGKILL sent while the writer is inside that system call kills
#: it before it returns to publish.  The killer is a process of its own (forked before the
#: writer imports anything), so no GIL and, where it may run as a real-time process, no busy
#: process of the machine keeps it off a CPU: the writer arms it through a pipe just before
#: the manifest's transaction, and it then polls both transaction ids and sends SIGKILL the
#: moment they differ.  It can still miss the window (an instant msync, as on tmpfs, or no
#: CPU for it without real-time priority); the writer then reports ``missed`` and the test
#: tries again with the next step.  The offsets of the two transaction ids come from the
#: test (it finds them in the files; they are LMDB's layout).
KILLED_IN_COMMIT = r"""
import mmap, os, signal, struct, sys
path, step, meta_offset, lock_offset = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
writer = os.getpid()
arm, armed = os.pipe()
killer = os.fork()  # while the writer has one thread and has not opened the store
if killer == 0:
    os.close(armed)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(os.sched_get_priority_min(os.SCHED_FIFO)))
    except OSError:  # not permitted: an ordinary process, which a busy machine may leave off a CPU
        pass
    with open(os.path.join(path, "data.mdb"), "rb") as data, open(os.path.join(path, "lock.mdb"), "rb") as lock:
        metas = mmap.mmap(data.fileno(), 8192, access=mmap.ACCESS_READ)
        published = mmap.mmap(lock.fileno(), lock_offset + 8, access=mmap.ACCESS_READ)
    if os.read(arm, 1):  # else EOF: the writer ended before its commit
        while os.getppid() == writer:  # never outlive the writer
            written = max(struct.unpack_from("<Q", metas, meta_offset + page)[0] for page in (0, 4096))
            if written > struct.unpack_from("<Q", published, lock_offset)[0]:
                os.kill(writer, signal.SIGKILL)
                break
    os._exit(0)
os.close(arm)
try:
    import numpy as np, castore, castore.save.saver
    commit_manifest = castore.save.saver.Saver._commit_manifest

    def armed_commit(self, txn, *args):
        os.write(armed, b"1")  # the next meta page written is this transaction's
        return commit_manifest(self, txn, *args)

    castore.save.saver.Saver._commit_manifest = armed_commit
    with castore.Store(path) as store:
        store.save(step, {"w": np.full(1000, step), "step": step})
finally:  # the killer missed the window (or the save failed): stop it
    os.kill(killer, signal.SIGKILL)
    killer_exit = os.waitstatus_to_exitcode(os.waitpid(killer, 0)[1])
if killer_exit != -signal.SIGKILL:  # it ended before it was stopped: it failed
    sys.exit(f"the killer failed: exit {killer_exit}")
print("missed", flush=True)
"""

#: A training run restarting: resume from the latest step, save the next one.
RESUMES = r"""
import sys, numpy as np, castore
with castore.Checkpoint(sys.argv[1]) as cp:
    cp.w = cp.step = None
    step = cp.load()
    cp.w, cp.step = np.full(1000, step + 1) * 10, step + 1
    print("resumed", step, cp.save().abandoned_to, flush=True)
"""


def lmdb_txnid_offsets(path) -> tuple[int, int]:
    """Where LMDB keeps the transaction id in a meta page and in ``lock.mdb``."""
    with castore.Store(path) as store:
        last = store.inspect().generation()
    data = (path / "data.mdb").read_bytes()[:8192]
    lock = (path / "lock.mdb").read_bytes()[:256]
    at = lambda raw, offset: int.from_bytes(raw[offset : offset + 8], "little")
    page = 4096 * (last & 1)  # LMDB alternates its two meta pages
    meta = [o for o in range(16, 512, 8) if at(data, page + o) == last and at(data, 4096 - page + o) == last - 1]
    published = [o for o in range(0, 128, 8) if at(lock, o) == last]
    assert meta and published, (last, meta, published)
    return meta[0], published[0]


def test_a_restarted_writer_resumes_from_a_commit_its_killed_predecessor_did_not_publish(tmp_path):
    """LMDB publishes a commit to readers after writing its meta page; a writer killed in
    between leaves the commit on disk, but processes holding the store open still read the
    previous one until a writer takes LMDB's write mutex.  A training run restarting then
    must resume from the newest step: opening the store for writing recovers it (else the
    run would redo the step and push the committed one to an ``-abandoned-`` branch)."""
    path = tmp_path / "store"
    with castore.Store(path) as store:
        store.save(0, {"w": np.full(1000, 0), "step": 0})
        store.save(1, {"w": np.full(1000, 1), "step": 1})
    offsets = lmdb_txnid_offsets(path)
    with castore.Store(path, readonly=True) as observer:  # holds lock.mdb open, as readers do
        missed = []
        for step in range(2, 2 + KILL_ATTEMPTS):
            killed = subprocess.run(
                [sys.executable, "-c", KILLED_IN_COMMIT, str(path), str(step), *map(str, offsets)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            latest = observer.latest()
            if killed.returncode == -signal.SIGKILL and latest == step - 1:
                print(
                    f"killed between writing and publishing the commit of step {step} "
                    f"(after {len(missed)} missed attempts)"
                )
                break  # killed in the window: committed on disk, not yet published
            # A miss: the commit was published, before the kill or without one.  Nothing else may happen.
            assert (killed.returncode, killed.stdout) in ((0, "missed\n"), (-signal.SIGKILL, "")), (
                f"step {step}: exit {killed.returncode}, stdout {killed.stdout!r}, stderr {killed.stderr[-3000:]}"
            )
            assert latest == step, (step, latest, killed.returncode)
            missed.append(killed.returncode)
        else:
            pytest.skip(
                f"no kill landed between a commit's meta page and its publication in {KILL_ATTEMPTS} "
                f"attempts (exit codes {missed}): this machine gave the killer no CPU inside LMDB's "
                "msync of the meta page, or the msync took no time (e.g. a store on tmpfs)"
            )
        assert observer.steps() == list(range(step))
        resumed = subprocess.run([sys.executable, "-c", RESUMES, str(path)], capture_output=True, text=True, timeout=60)
        assert resumed.stdout.split() == ["resumed", str(step), "None"], resumed.stdout + resumed.stderr
        assert observer.steps() == list(range(step + 2))
        assert observer.branches() == ["main"]
        assert_state_equal(observer.load(step, verify=True), {"w": np.full(1000, step), "step": step})
        assert observer.verify().ok


# --- saves that fail midway -------------------------------------------------------------------


def big(seed: int, mb: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (mb << 10, 1024), dtype=np.uint8)


@pytest.mark.parametrize(
    "bad",
    [object(), {(1,): "tuple key"}, {"a", "set"}, np.array([object()], dtype=object), lambda: None],
    ids=["object", "tuple-key", "set", "object-array", "function"],
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
    # Lineages: the same step in another epoch holds other values (same shapes).
    small = state_for(5, epoch=3, sizes=SMALL)
    assert small["epoch"] == 3 and list(small) == ["replay", "agent", "step", "epoch"]
    assert fingerprint(small) == fingerprint(state_for(5, epoch=3, sizes=SMALL))
    assert fingerprint(small) != fingerprint(state_for(5, epoch=4, sizes=SMALL))
    assert 2 << 20 <= workload.state_nbytes(small) <= 10 << 20


# --- small saves: chunks, manifest and retention in one transaction -------------------------------

#: A training loop of small saves: each is one transaction (its chunks, manifest, stepinfo
#: record and retention's deletes), with a collection every few saves.  ``--batch-bytes``
#: makes every chunk its own journaled batch instead.
ONE_TRANSACTION_SAVES = r"""
import sys
import numpy as np
import castore, castore.maintenance.maintainer, castore.save.pipeline
path, seed, batch_bytes = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
castore.maintenance.maintainer.GC_MIN_ENTRIES = 3
if batch_bytes:
    castore.save.pipeline.BATCH_BYTES = batch_bytes
with castore.Store(path, keep=castore.Keep(last=3, every=4)) as store:
    latest = store.latest()
    step = 0 if latest is None else latest + 1
    print("open", step, flush=True)
    while True:
        store.save(step, {"w": np.full(1024, step, np.float32), "fixed": np.arange(2048, dtype=np.float32)},
                   metrics={"loss": 1.0 / (step + 1)})
        print("committed", step, flush=True)
        step += 1
"""

ONE_TRANSACTION_KILLS = 16


def small_state(step: int) -> dict:
    return {"w": np.full(1024, step, np.float32), "fixed": np.arange(2048, dtype=np.float32)}


def test_sigkill_during_one_transaction_saves_leaves_each_step_retained_and_no_lost_garbage(tmp_path):
    """After a kill anywhere in a loop of small saves: the steps are exactly what the policy
    keeps of steps 0..latest (retention commits with each step, never apart from it), each
    loads bit-exact, ``verify()`` is clean, and every chunk no step names is garbage a
    collection finds (after ``gc()`` the store holds one chunk per step plus the shared one)."""
    rng = np.random.default_rng(SEED)
    path = tmp_path / "store"
    policy = castore.Keep(last=3, every=4)
    last_committed = -1
    for kill in range(ONE_TRANSACTION_KILLS):
        batch_bytes = 4096 if kill % 4 == 3 else 0
        with Child("saves", path, SEED + kill, batch_bytes, script=ONE_TRANSACTION_SAVES) as child:
            child.expect("open", 60)
            child.expect("committed", 60)
            time.sleep(rng.uniform(0.0, 0.25))  # a small save is mostly its commit: most kills land in one
            assert child.kill() == -signal.SIGKILL, child.describe()
            printed = [int(w[1]) for w in child.words("committed")]
        last_committed = max([last_committed, *printed])
        with castore.Store(path) as store:
            report = store.verify()
            assert report.ok, f"kill {kill}: {report.problems}"
            latest = store.latest()
            assert latest in (last_committed, last_committed + 1), (kill, latest, last_committed)  # killed printing
            infos = [StepInfo(s, 0.0, {}, False) for s in range(latest + 1)]
            assert store.steps() == sorted(policy.select(infos)), f"kill {kill}: not retained with its commit"
            for step in store.steps():
                assert_state_equal(store.load(step, verify=True), small_state(step), f"<step {step}>")
            store.gc()
            assert store.stats().chunks == len(store.steps()) + 1, f"kill {kill}: garbage no collection finds"
            last_committed = latest

"""Saves that commit in the background: capture isolation, order, step numbers, errors, exit."""

import contextlib
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from conftest import assert_tree_equal
from hypothesis import given, settings
from hypothesis import strategies as st

import castore

C = 4096
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def writes_held(store, seconds=30.0):
    """Hold the store's write mutex in another thread until the block ends (or ``seconds``).

    Background saves then cannot commit: they are certainly still in flight while the block
    runs.  (The store must already hold its writer lock, i.e. have saved once, or the next
    capture would wait for the mutex too.)
    """
    held, release = threading.Event(), threading.Event()

    def hold():
        with store.inspect().holding_writes():
            held.set()
            release.wait(seconds)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert held.wait(10)
    try:
        yield
    finally:
        release.set()
        thread.join()


def rows(start, count):
    t = np.arange(start, start + count, dtype=np.int64)
    return {"t": t, "obs": (t[:, None] * 7 + np.arange(40)).astype(np.uint8)}


def plain(rb):
    state = rb.save()
    state["fields"] = {name: np.array(field) for name, field in state["fields"].items()}
    return state


def snapshot(cp_components):
    return {name: plain(v) if isinstance(v, castore.RingBuffer) else np.array(v) for name, v in cp_components.items()}


# --- capture isolation -------------------------------------------------------------------------


def test_a_nonblocking_first_save_is_isolated_from_later_mutation(tmp_path):
    rng = np.random.default_rng(0)
    weights = rng.random((300, 100), np.float32)
    rb = castore.RingBuffer(1000)
    rb.add(rows(0, 700))
    with castore.Checkpoint(tmp_path / "ck", chunk_bytes=C) as cp:
        cp.replay, cp.weights = rb, weights
        expected = snapshot({"replay": rb, "weights": weights})
        handle = cp.save(block=False)
        weights[:] = -1.0  # in place, at once
        weights[17, 3] = 5.0
        rb.add(rows(700, 500))  # wraps, overwriting rows the save holds
        assert isinstance(handle, castore.SaveHandle) and handle.step == 0
        result = handle.result()
        assert isinstance(result, castore.SaveResult) and result.step == 0
        assert handle.done()
        assert_tree_equal(cp.store.load(0), expected)


@pytest.mark.parametrize("max_pending", [1, 2])
def test_nonblocking_saves_in_flight_are_isolated_from_mutation(tmp_path, max_pending):
    rng = np.random.default_rng(1)
    weights = rng.random((300, 100), np.float32)  # 400 B rows: 10 rows per chunk
    rb = castore.RingBuffer(2000)
    rb.add(rows(0, 1500))
    with castore.Checkpoint(tmp_path / "ck", chunk_bytes=C, max_pending=max_pending) as cp:
        cp.replay, cp.weights = rb, weights
        expected = {0: snapshot({"replay": rb, "weights": weights})}
        cp.save()  # blocking: the writer lock is taken, baselines exist
        handles = []
        with writes_held(cp.store):  # nothing commits until every mutation below is done
            for step in range(1, 1 + max_pending):
                weights[step * 10 : step * 10 + 5] += 1.0  # a few chunks change
                rb.add(rows(1500 + 100 * step, 100))
                expected[step] = snapshot({"replay": rb, "weights": weights})
                handles.append(cp.save(block=False))
                weights[:] = step * 1000.0  # then everything changes, immediately
                rb.add(rows(50_000 * step, 2000))  # the whole buffer is overwritten
                assert not handles[-1].done()
            assert [h.step for h in handles] == list(range(1, 1 + max_pending))
        results = [h.result() for h in handles]
        assert [r.step for r in results] == [h.step for h in handles]
        assert results[0].changed_bytes < weights.nbytes  # only changed chunks were captured
        for step, state in expected.items():
            assert_tree_equal(cp.store.load(step), state)


def test_store_save_async_returns_a_handle_with_a_save_result(tmp_path):
    data = np.random.default_rng(2).integers(0, 1 << 30, (500, 100), dtype=np.int32)
    expected = data.copy()
    with castore.Store(tmp_path / "s", chunk_bytes=C) as store:
        handle = store.save_async(3, {"a": {"w": data}, "meta": "x"})
        data += 1
        assert isinstance(handle, castore.SaveHandle) and handle.step == 3
        result = handle.result()
        assert isinstance(result, castore.SaveResult)
        assert result.step == 3 and result.changed_bytes == data.nbytes
        assert 0 < result.capture_seconds <= result.seconds
        assert result.new_bytes >= data.nbytes
        assert handle.result() is result  # a second result() gives the same
        store.wait()
        assert store.steps() == [3]
        assert_tree_equal(store.load(3), {"a": {"w": expected}, "meta": "x"})
        # blocking saves report no capture time of their own beyond their total
        blocking = store.save(4, {"a": {"w": data}, "meta": "x"})
        assert 0 <= blocking.capture_seconds <= blocking.seconds
        # what a save would refuse before writing, save_async refuses at once
        with pytest.raises(castore.UsageError):
            store.save_async(-1, {"a": data})
        with pytest.raises(castore.UsageError):
            store.save_async(5, {"": data})
        with pytest.raises(castore.UnsupportedValueError):
            store.save_async(5, {"a": object()})
        store.wait()
        assert store.steps() == [3, 4]


def test_max_pending_must_be_positive(tmp_path):
    with pytest.raises(castore.UsageError, match="max_pending"):
        castore.Store(tmp_path / "s", max_pending=0)


# --- order and step numbers ----------------------------------------------------------------------


@pytest.mark.parametrize("max_pending", [1, 3])
def test_saves_commit_in_submission_order(tmp_path, max_pending):
    with castore.Checkpoint(tmp_path / "ck", chunk_bytes=C, max_pending=max_pending) as cp:
        cp.x = np.zeros((200, 50), np.float64)
        submitted, expected = [10, 3, 7, 1, 5, 2], {}
        handles = []
        for index, step in enumerate(submitted):
            cp.x[index * 30 : index * 30 + 10] = step
            expected[step] = cp.x.copy()
            handles.append(cp.save(step=step, block=False))
        cp.wait()
        assert all(h.done() for h in handles)
        assert cp.steps() == sorted(submitted)
        created = [cp.store.manifest(step).created for step in submitted]
        assert created == sorted(created)  # committed in the order they were submitted
        for step, x in expected.items():
            assert_tree_equal(cp.store.load(step)["x"], x)


@pytest.mark.parametrize("max_pending", [1, 3])
def test_default_step_numbers_count_saves_in_flight(tmp_path, max_pending):
    with castore.Checkpoint(tmp_path / "ck", chunk_bytes=C, max_pending=max_pending) as cp:
        cp.x = np.arange(5000, dtype=np.int64)
        cp.save(step=0)  # writer lock taken: held writes keep the saves below in flight
        cp.x[0] = -1
        with writes_held(cp.store, seconds=0.3):
            handles = [cp.save(block=False) for _ in range(3)]  # max_pending=1: 2 wait their turn
        assert [h.step for h in handles] == [1, 2, 3]
        assert cp.save().step == 4  # a blocking save counts them too
        assert cp.steps() == [0, 1, 2, 3, 4]
    with castore.Checkpoint(tmp_path / "fresh", chunk_bytes=C, max_pending=max_pending) as cp:
        cp.x = np.arange(10)
        handles = [cp.save(block=False) for _ in range(3)]
        assert [h.step for h in handles] == [0, 1, 2]
        cp.wait()
        assert cp.steps() == [0, 1, 2]


@settings(max_examples=25, deadline=None)
@given(
    plan=st.lists(st.tuples(st.integers(0, 400), st.booleans()), min_size=1, max_size=8),
    max_pending=st.sampled_from([1, 2]),
)
def test_mixed_blocking_and_background_saves_load_as_saved(tmp_path_factory, plan, max_pending):
    directory = tmp_path_factory.mktemp("mixed")
    rb = castore.RingBuffer(300)
    weights = np.zeros((64, 64), np.float32)
    expected, added = {}, 0
    with castore.Checkpoint(directory, chunk_bytes=C, max_pending=max_pending, check_tracking=True) as cp:
        cp.replay, cp.weights = rb, weights
        for count, block in plan:
            rb.add(rows(added, count))
            added += count
            weights[count % 64] += 1
            state = snapshot({"replay": rb, "weights": weights})
            step = cp.save(block=block).step
            expected[step] = state
        cp.wait()
        assert cp.steps() == list(range(len(plan)))
        for step, state in expected.items():
            assert_tree_equal(cp.store.load(step), state)


# --- errors are never lost -----------------------------------------------------------------------


def failing_save(cp):
    """Submit a background save that fails at commit: other content under an existing step."""
    cp.x[0] += 1
    return cp.save(step=5, block=False)


def make(tmp_path, **options):
    cp = castore.Checkpoint(tmp_path / "ck", chunk_bytes=C, **options)
    cp.x = np.arange(20_000, dtype=np.int64)
    cp.save(step=5)
    return cp


@pytest.mark.parametrize("block", [True, False])
def test_a_failed_background_save_raises_from_the_next_save(tmp_path, block):
    with make(tmp_path) as cp:
        handle = failing_save(cp)
        handle.wait()  # ended, error not seen by anyone
        assert handle.done()
        with pytest.raises(castore.StepExistsError, match="step 5 exists"):
            cp.save(step=6, block=block)
        assert cp.steps() == [5]  # the save that raised did not run
        cp.save(step=6, block=block)  # raised once only
        cp.wait()
        assert cp.steps() == [5, 6]
        assert_tree_equal(cp.store.load(6)["x"], cp.x.copy())


def test_a_failed_background_save_raises_from_wait_once(tmp_path):
    with make(tmp_path) as cp:
        failing_save(cp)
        with pytest.raises(castore.StepExistsError):
            cp.wait()
        cp.wait()
        assert cp.steps() == [5]


def test_a_failed_background_save_raises_from_close(tmp_path):
    cp = make(tmp_path)
    handle = failing_save(cp)
    with pytest.raises(castore.StepExistsError):
        cp.close()
    assert handle.done()
    with pytest.raises(castore.UsageError, match="closed"):
        cp.steps()  # closed all the same
    cp.close()  # idempotent, and the error is not raised twice
    with castore.Store(tmp_path / "ck") as store:
        assert store.steps() == [5]


def test_an_error_result_raised_is_not_raised_again(tmp_path):
    cp = make(tmp_path)
    handle = failing_save(cp)
    with pytest.raises(castore.StepExistsError):
        handle.result()
    with pytest.raises(castore.StepExistsError):
        handle.result()  # the handle keeps its error
    cp.wait()
    cp.save(step=6, block=False).result()
    cp.close()
    with castore.Store(tmp_path / "ck") as store:
        assert store.steps() == [5, 6]


# A save still in flight when the next block=False save is called may fail while that
# save waits for its slot: the waiting save must raise it, not submit after it.
def test_an_error_of_a_save_in_flight_is_raised_by_the_next_nonblocking_save(tmp_path):
    cp = make(tmp_path)
    try:
        with writes_held(cp.store, seconds=0.5):  # step 5 is surely still in flight below
            handle = failing_save(cp)
            assert not handle.done()
            with pytest.raises(castore.StepExistsError):
                cp.save(step=6, block=False)  # waits for the slot, i.e. for step 5 to fail
        cp.wait()
        assert cp.steps() == [5]
    finally:
        with contextlib.suppress(castore.CastoreError):
            cp.close()


# Each unseen error is raised once, oldest first; none is dropped.
def test_two_failed_background_saves_are_both_reported(tmp_path):
    cp = make(tmp_path, max_pending=2)
    try:
        with writes_held(cp.store):  # both saves are submitted before either can fail
            first = failing_save(cp)
            second = failing_save(cp)
            assert not first.done() and not second.done()
        with pytest.raises(castore.StepExistsError):
            cp.wait()
        with pytest.raises(castore.StepExistsError):
            cp.wait()  # the second failure has not been raised by anything yet
    finally:
        with contextlib.suppress(castore.CastoreError):
            cp.close()


# --- a process that exits without waiting -------------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import sys, threading
    import numpy as np
    import castore

    cp = castore.Checkpoint(sys.argv[1], chunk_bytes=4096)
    cp.replay = castore.RingBuffer(500)
    cp.weights = np.zeros((300, 64), np.float32)
    handles = []
    for i in range(3):
        t = np.arange(i * 200, (i + 1) * 200, dtype=np.int64)
        cp.replay.add({"t": t, "obs": (t[:, None] * 7 + np.arange(40)).astype(np.uint8)})
        cp.weights[i::3] += i + 1
        if i == 2:  # keep the last save in flight until after the script's last line
            handles[-1].wait()
            held, release = threading.Event(), threading.Event()
            def hold():
                with cp.store.inspect().holding_writes():
                    held.set()
                    release.wait()
            threading.Thread(target=hold).start()
            held.wait()
        handles.append(cp.save(block=False))
    cp.weights[:] = -1  # after the last submit: not saved
    cp.replay.add({"t": np.zeros(400, np.int64), "obs": np.zeros((400, 40), np.uint8)})
    print("pending", not handles[-1].done(), [h.step for h in handles], flush=True)
    release.set()  # the last save may commit now: while the interpreter exits
    """
)


def test_a_process_exiting_normally_commits_its_background_saves(tmp_path):
    path = str(tmp_path / "ck")
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, path], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "pending True [0, 1, 2]"  # the last one was in flight
    assert "failed" not in done.stderr

    rb = castore.RingBuffer(500)
    weights = np.zeros((300, 64), np.float32)
    with castore.Store(path, readonly=True) as store:
        assert store.steps() == [0, 1, 2]
        for i in range(3):
            rb.add(rows(i * 200, 200))
            weights[i::3] += i + 1
            assert_tree_equal(store.load(i), {"replay": plain(rb), "weights": weights.copy()})

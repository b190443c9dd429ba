"""Concurrency: readers beside a writer, the single-writer lock, one store opened twice in a
process, readers in other processes while the writer grows the LMDB map, and many reader
processes following the latest step while the writer saves, retains and collects.

Every test runs real processes on a real store (``workload.py`` scripts) and bounds every
wait in time; leaving a ``Child`` block kills and reaps its process.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import threading
import time

import pytest

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # workload.py beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kill_harness import START_EPOCH, Harness, writer
from workload import Child, assert_state_equal, state_for

import castore

#: seconds: "at once" and "not stuck" as a loaded 2-core machine keeps them.  What a bound
#: tells apart takes far longer or forever: a save waiting for a holder that holds the lock
#: until the test lets it go, a save stuck behind a thread that never stops loading.
PATIENCE = 30


pytestmark = pytest.mark.usefixtures("drop_big_stores_of_passing_tests")


def reader_result(reader: Child, timeout: float = 60) -> dict:
    words = reader.expect("result", timeout)
    assert reader.finish(10) == 0, reader.describe()
    return json.loads(" ".join(words[1:]))


def assert_clean_reads(result: dict, reader: Child, first: int, last: int) -> None:
    """The reader loaded, never failed, saw the latest step only grow, and reached ``last``."""
    assert not result["errors"], f"reader PID {reader.pid} failed:\n" + "\n".join(result["errors"])
    assert result["loads"] > 0
    seen = result["seen"]
    assert seen == sorted(set(seen)) and first <= seen[0] and seen[-1] == last, seen


# --- (a) readers never see half a step ---------------------------------------------------------


def test_reader_process_loads_only_whole_steps_while_writer_process_saves(tmp_path):
    path = tmp_path / "store"
    count = 30
    with Child(
        "writer", path, "--count", count, "--pause", 0.03, "--wait-go", "--max-seconds", 60, stdin=True
    ) as writer:
        writer.expect("committed", 30)  # the store and step 0 exist; the writer waits for the reader
        with Child("reader", path, "--until-step", count - 1, "--max-seconds", 60) as reader:
            reader.expect("reading", 30)
            writer.send("go")  # only now: a reader slow to start on a loaded machine still sees the saves
            assert writer.finish(60) == 0, writer.describe()
            result = reader_result(reader)
        writer_lines = [line for _, line in writer.lines]
    assert_clean_reads(result, reader, 0, count - 1)
    # The reader was at work while steps were being committed, not only afterwards.
    assert len(result["seen"]) >= 3, (result, writer_lines)
    print(f"reader: {result['loads']} loads of {len(result['seen'])} steps")


def test_reader_process_loads_only_whole_steps_while_this_process_saves(tmp_path):
    path = tmp_path / "store"
    with castore.Store(path) as store:
        store.save(0, state_for(0))
        with Child("reader", path, "--max-seconds", 60, stdin=True) as reader:
            reader.expect("reading", 30)
            deadline = time.monotonic() + 20
            step = 0
            while step < 25 and time.monotonic() < deadline:
                step += 1
                store.save(step, state_for(step))
                time.sleep(0.02)
            reader.send(f"until {step}")
            result = reader_result(reader)
        assert store.steps() == list(range(step + 1))
    assert_clean_reads(result, reader, 0, step)
    assert len(result["seen"]) >= 3, result
    print(f"reader: {result['loads']} loads of {len(result['seen'])} steps")


def test_save_that_grows_the_map_finishes_while_a_thread_of_this_process_keeps_loading(tmp_path, monkeypatch):
    import castore.storage.lmdb_engine

    monkeypatch.setattr(
        castore.storage.lmdb_engine, "INITIAL_MAP_BYTES", 1 << 20
    )  # read at open: every save grows the map
    path = tmp_path / "store"
    with castore.Store(path) as store:
        store.save(0, state_for(0))
        stop, loads, errors = threading.Event(), [], []

        def poll() -> None:  # e.g. a thread serving the latest weights
            while not stop.is_set():
                try:
                    loads.append(store.load()["step"])
                except Exception as exc:
                    errors.append(exc)
                    return

        def save(step: int, outcome: list) -> None:
            try:
                store.save(step, state_for(step))
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            for step in range(1, 4):
                outcome: list = []
                saver = threading.Thread(target=save, args=(step, outcome), daemon=True)
                started = time.monotonic()
                saver.start()
                saver.join(PATIENCE)
                stuck = saver.is_alive()
                if stuck:  # unblock it so the test ends: stop loading, then it goes through
                    stop.set()
                    stopped = time.monotonic()
                    saver.join(60)
                assert not stuck, (
                    f"saving step {step} was stuck for {stopped - started:.1f} s while another thread "
                    f"kept loading; it finished {time.monotonic() - stopped:.2f} s after the loads stopped"
                )
                assert outcome == [None], outcome
        finally:
            stop.set()
            poller.join(60)
        assert not errors, errors
        assert loads and loads == sorted(loads)
        assert store.steps() == [0, 1, 2, 3]
        assert_state_equal(store.load(3), state_for(3))


# --- (b) one writer process per store ----------------------------------------------------------


def test_second_writer_process_gets_store_locked_error_at_once(tmp_path):
    path = tmp_path / "store"
    with Child("holder", path, "--max-seconds", 60, stdin=True) as holder:
        holder_pid = int(holder.expect("holding", 30)[1])
        assert holder_pid == holder.pid
        with castore.Store(path) as store:
            # Reading a locked store works ...
            assert store.steps() == [0]
            assert_state_equal(store.load(0), state_for(0))
            # ... writing fails at once, naming the holder.
            state = state_for(1)
            for attempt in (lambda: store.save(1, state), lambda: store.delete(0)):
                started = time.monotonic()
                with pytest.raises(castore.StoreLockedError) as info:
                    attempt()
                assert time.monotonic() - started < PATIENCE
                assert "gave up" not in str(info.value)  # it did not wait
                assert info.value.pid == holder_pid
                assert f"PID {holder_pid}" in str(info.value)
                assert isinstance(info.value, BlockingIOError)
            assert store.steps() == [0]
        # A Checkpoint asked to wait waits that long, then names the holder too.
        with castore.Checkpoint(path, lock_timeout=0.5) as cp:
            cp.x = 1
            started = time.monotonic()
            with pytest.raises(castore.StoreLockedError, match=f"PID {holder_pid}.*waiting"):
                cp.save(5)
            assert 0.5 <= time.monotonic() - started < 0.5 + PATIENCE
        with castore.Store(path) as store:
            # So does a writer in yet another process.
            with Child("writer", path, "--count", 1, "--max-seconds", 60) as second:
                assert second.finish(60) == 3, second.describe()
                words = second.words("locked")[0]
            assert float(words[1]) < PATIENCE
            assert f"PID {holder_pid}" in " ".join(words[2:]) and "gave up" not in " ".join(words[2:])

            # Once the holder exits, this process takes the lock, and holds it against others.
            holder.send_eof()
            assert holder.finish(30) == 0, holder.describe()
            store.save(1, state_for(1))
            with Child("writer", path, "--count", 1, "--max-seconds", 60) as third:
                assert third.finish(60) == 3, third.describe()
                assert f"PID {os.getpid()}" in " ".join(third.words("locked")[0][2:])
            assert store.steps() == [0, 1]
        # Closing the store released the lock.
        with Child("writer", path, "--count", 1, "--max-seconds", 60) as fourth:
            assert fourth.finish(60) == 0, fourth.describe()
    with castore.Store(path) as store:
        assert store.steps() == [0, 1, 2]
        assert_state_equal(store.load(2), state_for(2))


def test_lock_of_a_killed_writer_is_free_at_once(tmp_path):
    path = tmp_path / "store"
    with Child("holder", path, "--max-seconds", 60, stdin=True) as holder:
        holder.expect("holding", 30)
        holder.kill()
    with castore.Store(path) as store:
        state = state_for(1)
        started = time.monotonic()
        store.save(1, state)  # raises StoreLockedError if the lock were still held: no waiting
        assert time.monotonic() - started < PATIENCE
        assert store.steps() == [0, 1]


# --- (c) one store opened twice in one process ---------------------------------------------------


def test_two_stores_on_one_path_in_one_process_share_steps_and_close_independently(tmp_path):
    path = tmp_path / "store"
    a = castore.Store(path)
    b = castore.Store(path)
    try:
        assert a.latest() is None and b.latest() is None
        a.save(0, state_for(0))
        assert b.latest() == 0
        assert_state_equal(b.load(0), state_for(0))
        b.save(1, state_for(1))  # the process holds the lock once, for both
        assert a.steps() == [0, 1]
        assert_state_equal(a.load(), state_for(1))
        a.close()
        with pytest.raises(castore.UsageError):
            a.load(0)
        # b keeps working after a closed: reads, saves, and still holds the writer lock.
        assert_state_equal(b.load(0), state_for(0))
        b.save(2, state_for(2))
        assert_state_equal(b.load(2), state_for(2))
        with Child("writer", path, "--count", 1, "--max-seconds", 60) as other:
            assert other.finish(60) == 3, other.describe()  # locked by this process
        # Other spellings of the path are the same store too.
        link = tmp_path / "link"
        link.symlink_to(path, target_is_directory=True)
        for alias in (str(path) + os.sep, link, os.path.relpath(path)):
            with castore.Store(alias) as c:
                assert c.steps() == [0, 1, 2]
                assert_state_equal(c.load(1), state_for(1))
        assert_state_equal(b.load(1), state_for(1))
    finally:
        a.close()
        b.close()
    # With every opener closed the lock is free for another process.
    with Child("writer", path, "--count", 1, "--max-seconds", 60) as other:
        assert other.finish(60) == 0, other.describe()
    with castore.Store(path) as store:
        assert store.steps() == [0, 1, 2, 3]
        assert_state_equal(store.load(3), state_for(3))


def test_checkpoint_beside_a_store_on_one_path(tmp_path):
    path = tmp_path / "store"
    store = castore.Store(path)
    cp = castore.Checkpoint(path)
    try:
        store.save(0, state_for(0))
        assert cp.latest() == 0
        state = state_for(1)
        cp.replay, cp.agent, cp.step = state["replay"], state["agent"], state["step"]
        assert cp.save().step == 1  # the step number comes from the "step" component
        assert store.latest() == 1
        assert_state_equal(store.load(1), state_for(1))
        assert cp.load(step=0) == 0
        assert_state_equal({"replay": cp.replay, "agent": cp.agent, "step": cp.step}, state_for(0))
        store.close()
        # The Checkpoint keeps working after the Store beside it closed.
        state = state_for(2)
        cp.replay, cp.agent, cp.step = state["replay"], state["agent"], state["step"]
        assert cp.save().abandoned_to == "main-abandoned-0"  # saving after a rollback to step 0
        assert cp.steps() == [0, 2]
        assert cp.load() == 2
        assert_state_equal({"replay": cp.replay, "agent": cp.agent, "step": cp.step}, state_for(2))
    finally:
        store.close()
        cp.close()
    with castore.Store(path) as again, castore.Store(path, branch="main-abandoned-0") as old:
        assert again.steps() == [0, 2] and old.steps() == [1]
        assert_state_equal(again.load(2), state_for(2))
        assert_state_equal(old.load(1), state_for(1))


def test_read_only_store_beside_a_writable_one_refuses_to_write(tmp_path):
    path = tmp_path / "store"
    with castore.Store(path) as writable:
        writable.save(0, state_for(0))
        with castore.Store(path, readonly=True) as read_only:
            assert_state_equal(read_only.load(0), state_for(0))
            try:
                with pytest.raises(castore.UsageError):
                    read_only.save(1, state_for(1))
                with pytest.raises(castore.UsageError):
                    read_only.delete(0)
            finally:
                steps = writable.steps()
        assert steps == [0], f"the read-only Store changed the steps to {steps}"


# --- (d) readers survive map growth --------------------------------------------------------------


def test_reader_processes_keep_working_while_the_writer_grows_the_map(tmp_path):
    path = tmp_path / "store"
    # 1 MiB initial map in the writer (and in one reader): LMDB must grow it several times.
    with Child(
        "writer",
        path,
        "--tiny-map",
        "--report-map",
        "--until-map-sizes",
        4,
        "--count",
        200,
        "--wait-go",
        "--pause",
        0.01,
        "--max-seconds",
        60,
        stdin=True,
    ) as writer:
        writer.expect("committed", 30)  # step 0 exists; the writer waits for the readers
        with (
            Child("reader", path, "--tiny-map", "--max-seconds", 90, stdin=True) as tiny,
            Child("reader", path, "--max-seconds", 90, stdin=True) as default,
        ):
            tiny.expect("reading", 30)
            default.expect("reading", 30)
            writer.send("go")
            assert writer.finish(90) == 0, writer.describe()
            last = int(writer.words("committed")[-1][1])
            for reader in (tiny, default):
                reader.send(f"until {last}")
            results = {"tiny": reader_result(tiny), "default": reader_result(default)}
        maps = [(at, int(line.split()[1])) for at, line in writer.lines if line.startswith("map ")]
        readers_started = max(at for r in (tiny, default) for at, line in r.lines if line.startswith("reading"))
    sizes = sorted({size for _, size in maps})
    assert sizes[0] <= 16 << 20 and len(sizes) >= 4, f"the map grew only through {sizes}"
    grown_while_reading = {size for at, size in maps if at > readers_started} - {
        size for at, size in maps if at <= readers_started
    }
    assert len(grown_while_reading) >= 2, f"map sizes {maps}, readers started at {readers_started}"
    for name, reader in (("tiny", tiny), ("default", default)):
        assert_clean_reads(results[name], reader, 0, last)
        assert len(results[name]["seen"]) >= 3, (name, results[name])
    # The reader that opened with a tiny map had to follow the writer's growth.
    assert len(results["tiny"]["map_sizes"]) >= 2, results["tiny"]
    with castore.Store(path) as store:
        assert store.steps() == list(range(last + 1))
        for step in (0, last // 2, last):
            assert_state_equal(store.load(step), state_for(step))
    print(
        f"map sizes {sizes}; reader loads: tiny {results['tiny']['loads']} "
        f"(maps {results['tiny']['map_sizes']}), default {results['default']['loads']}"
    )


# --- (e) many readers follow the latest step while the writer saves, retains and collects -----

READERS = 4
#: the writer's script (``kill_harness.run_child``): saves with retention and GC after each
#: commit, explicit gc() and retain(), and a compact() that readers make it refuse
WRITER_OPS = ["save", "async", "save", "gc", "save", "retain", "async", "save", "compact"]
SAVES = ("save", "async")
ROUNDS = 4  #: the script runs this many times beside the readers (a few seconds)


def save_seconds(child: Child) -> list[float]:
    """What each save of a ``kill_harness`` writer took (``done <i> <kind> <seconds> ...``)."""
    return [float(w[3]) for w in child.words("done") if w[2] in SAVES]


def test_reader_processes_following_latest_see_only_whole_steps_and_never_block_the_writer(tmp_path):
    path = tmp_path / "store"
    harness = Harness(path, seed=7, sizes="small")  # its model checks every layout the writer reports
    harness.start()
    common = ["--sizes", "small", "--pause", 0.02, "--max-seconds", 120]
    # The writer alone first: its save times without readers, and compaction works.
    with writer(path, "--ops", ",".join(WRITER_OPS * 2), "--seed", 1, *common) as alone:
        alone.expect("idle", 60)
        alone.send_eof()
        assert alone.finish(60) == 0, alone.describe()
        harness.follow([line for _, line in alone.lines], False, "writer alone")
        alone_seconds = save_seconds(alone)
    with contextlib.ExitStack() as stack:
        readers = [
            stack.enter_context(
                Child("reader", path, "--epoch", START_EPOCH, "--sizes", "small", "--max-seconds", 120, stdin=True)
            )
            for _ in range(READERS)
        ]
        victim = stack.enter_context(
            Child(
                "reader",
                path,
                "--epoch",
                START_EPOCH,
                "--sizes",
                "small",
                "--announce",
                "--max-seconds",
                120,
                stdin=True,
            )
        )
        for reader in [*readers, victim]:
            reader.expect("reading", 30)
        with writer(path, "--ops", ",".join(WRITER_OPS * ROUNDS), "--seed", 2, "--held", *common) as busy:
            busy.expect("done", 60, nth=4)
            victim.expect("loading", 30)  # SIGKILLed inside a load, while the writer saves
            assert victim.kill() == -9
            killed_at = time.monotonic()
            busy.expect("idle", 120)
            busy.send_eof()
            assert busy.finish(60) == 0, busy.describe()
            lines = [line for _, line in busy.lines]
            harness.follow(lines, True, "writer beside readers")  # compact() refused: StoreBusyError
            busy_seconds = save_seconds(busy)
            after_kill = sum(at > killed_at for at, line in busy.lines if line.startswith("done "))
        last = max(harness.layout["main"])
        for reader in readers:
            reader.send(f"until {last}")
        results = [reader_result(reader) for reader in readers]
    refused = sum(line.startswith("busy ") for line in lines)
    assert refused == WRITER_OPS.count("compact") * ROUNDS, lines
    assert after_kill >= 5, f"the writer did {after_kill} operations after a reader was killed"
    for reader, result in zip(readers, results):
        assert_clean_reads(result, reader, 0, last)
        assert len(result["seen"]) >= 3, result  # it followed the writer, not only its end
    # Readers never block the writer: no save waits on them (a lock held by a reader would
    # stall a save for the reader's whole loop, seconds), and the typical save is not far off
    # the writer's alone.  Both bounds are generous: 6 busy processes share 2 cores on a
    # noisy VM, which slows every save alike and makes single saves of ~1 s happen (and more
    # with a busy loop on every core: the floor is a single save a loaded machine keeps).
    typical = max(statistics.median(busy_seconds), statistics.median(alone_seconds))
    slowest = max(busy_seconds)
    assert slowest <= max(20 * typical, 10.0), (slowest, typical, busy_seconds)
    assert statistics.median(busy_seconds) <= 25 * statistics.median(alone_seconds) + 0.1, (busy_seconds, alone_seconds)
    # No reader is left, not even the killed one: compaction works, the store is sound.
    with castore.Store(path) as store:
        store.compact()
    harness.check({"unchanged": harness.layout}, "after the readers")
    loads = sum(r["loads"] for r in results)
    print(
        f"{READERS} readers: {loads} loads of {[len(r['seen']) for r in results]} steps; writer saves: "
        f"median {statistics.median(alone_seconds) * 1000:.0f} ms alone, "
        f"{statistics.median(busy_seconds) * 1000:.0f} ms beside readers (slowest {slowest * 1000:.0f} ms); "
        f"{refused} compactions refused"
    )

"""castore in place of ``elements.Checkpoint``: DreamerV3's checkpoint code runs unchanged.

The code under test is what DreamerV3's ``embodied/run/train.py``, ``eval_only.py`` and
``parallel.py`` do with checkpoints, with the real ``elements`` package for paths,
counters and ``when.Every``.
"""

from __future__ import annotations

import re
from functools import partial as bind

import elements
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import castore


class Agent:
    """DreamerV3's agent protocol: ``save()`` and ``load(data, regex=None)``."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        self.params = {f"enc/w{i}": rng.standard_normal((32, 16)).astype(np.float32) for i in range(3)}
        self.params["dec/w"] = rng.standard_normal((16, 8)).astype(np.float32)
        self.updates = 0

    def save(self):
        return {"params": dict(self.params), "counters": {"updates": self.updates}}

    def load(self, data, regex=None):
        params = data["params"]
        if regex:
            params = {k: v for k, v in params.items() if re.match(regex, k)}
        else:
            self.updates = int(data["counters"]["updates"])
        self.params.update({k: np.array(v) for k, v in params.items()})


def trained(w: np.ndarray, updates: int) -> np.ndarray:
    for _ in range(updates):
        w = w + 1  # as the loop does it, rounding included
    return w


def train_run(logdir, steps: int, save_every: int, from_checkpoint=None, regex=None):
    """The checkpoint lines of DreamerV3's train.py, castore for elements."""
    logdir = elements.Path(logdir)
    step = elements.Counter()
    agent = Agent(seed=1)
    replay = castore.RingBuffer(64)
    cp = castore.Checkpoint(logdir / "ckpt")
    cp.step = step
    cp.agent = agent
    cp.replay = replay
    if from_checkpoint:
        castore.load(from_checkpoint, dict(agent=bind(agent.load, regex=regex)))
    cp.load_or_save()
    should_save = castore.Every(save_every)
    while int(step) < steps:
        replay.add({"obs": np.full((1, 4), int(step), np.uint8)})
        agent.params["dec/w"] += 1
        agent.updates += 1
        step.increment()
        if should_save(step):
            cp.save()
    steps_saved = cp.steps()
    cp.close()
    return agent, replay, steps_saved


def test_dreamerv3_train_loop_runs_and_resumes(tmp_path):
    agent, replay, saved = train_run(tmp_path / "run", steps=25, save_every=10)
    assert saved == [0, 10, 20]  # the fresh run's step 0, then multiples of 10
    resumed, replay2, saved2 = train_run(tmp_path / "run", steps=45, save_every=10)
    # resumed at 20, no save right after the load, then 30 and 40
    assert saved2 == [0, 10, 20, 30, 40]
    with castore.Store(tmp_path / "run" / "ckpt", readonly=True) as store:
        state = store.load(40)
    assert int(state["step"]) == 40
    assert state["agent"]["counters"]["updates"] == 40
    assert np.array_equal(state["agent"]["params"]["dec/w"], trained(Agent(1).params["dec/w"], 40))
    assert replay2.added == 45 and np.array_equal(replay2.recent(1)["obs"], np.full((1, 4), 44, np.uint8))


def test_from_checkpoint_loads_the_agent_by_regex(tmp_path):
    train_run(tmp_path / "pretrained", steps=10, save_every=5)
    agent, replay, saved = train_run(
        tmp_path / "finetune", steps=3, save_every=100, from_checkpoint=tmp_path / "pretrained" / "ckpt", regex="enc/"
    )
    pretrained = castore.Store(tmp_path / "pretrained" / "ckpt", readonly=True)
    with pretrained:
        params = pretrained.load()["agent"]["params"]
    for name in ("enc/w0", "enc/w1", "enc/w2"):
        assert np.array_equal(agent.params[name], params[name])
    assert np.array_equal(agent.params["dec/w"], trained(Agent(1).params["dec/w"], 3))  # not taken, then trained
    assert saved == [0]


def test_eval_only_loads_with_a_checkpoint_without_directory(tmp_path):
    trained, _, _ = train_run(tmp_path / "run", steps=5, save_every=5)
    agent = Agent(seed=7)
    cp = castore.Checkpoint()  # eval_only.py: no directory of its own
    cp.agent = agent
    cp.load(tmp_path / "run" / "ckpt", keys=["agent"])
    assert all(np.array_equal(agent.params[k], trained.params[k]) for k in agent.params)
    with pytest.raises(castore.UsageError, match="no directory"):
        cp.save()
    assert not cp.exists() and cp.exists(tmp_path / "run" / "ckpt")
    assert not cp.exists(tmp_path / "nowhere") and not (tmp_path / "nowhere").exists()


def test_parallel_style_checkpoints_in_subfolders_with_positional_keep(tmp_path):
    logdir = elements.Path(tmp_path)
    cp = castore.Checkpoint(logdir / "ckpt/agent", 2)  # elements' positional keep
    cp.agent = Agent(3)
    for _ in range(4):
        cp.agent.params["dec/w"] += 1
        cp.save()
    assert cp.steps() == [2, 3]
    cp.close()


def test_step_counter_argument_names_the_steps(tmp_path):
    counter = elements.Counter(100)
    with castore.Checkpoint(tmp_path / "ck", step=counter) as cp:
        cp.agent = Agent(0)
        assert cp.save().step == 100
        counter.increment(5)
        assert cp.save().step == 105
        assert cp.save(step=7).step == 7  # an explicit step still wins


def test_write_false_iterates_saves_and_writes_nothing(tmp_path):
    shards = []

    class Sharded:
        def save(self):
            for i in range(3):
                shards.append(i)
                yield {"i": i}

        def load(self, data):
            list(data)

    cp = castore.Checkpoint(tmp_path / "ck", write=False)
    cp.replay = Sharded()
    assert cp.save() is None and shards == [0, 1, 2]  # iterated, as elements does
    assert not (tmp_path / "ck").exists()
    assert cp.load_or_save() is None and not cp.exists()


def test_partial_saves_carry_the_rest_so_resume_is_whole(tmp_path):
    with castore.Checkpoint(tmp_path / "ck") as cp:
        cp.step = castore.Counter(0)
        cp.agent = Agent(0)
        cp.replay = castore.RingBuffer(16)
        cp.replay.add({"x": np.arange(4, dtype=np.int64)[:, None]})
        with pytest.raises(castore.UsageError, match="save the whole state once first"):
            cp.save(keys=["agent"])  # nothing to carry the replay from
        assert cp.steps() == []
        cp.save()
        cp.step.increment()
        cp.agent.params["dec/w"] += 1
        cp.replay.add({"x": np.full((4, 1), 9, np.int64)})  # not saved by the partial save
        result = cp.save(keys=["agent"])
        assert result.step == 1 and result.new_bytes < 4 * 1024  # the replay is carried, not written
    with castore.Checkpoint(tmp_path / "ck") as cp:
        cp.step = castore.Counter()
        cp.agent = Agent(5)
        cp.replay = castore.RingBuffer(16)
        assert cp.load_or_save() == 1
        assert int(cp.step) == 1  # the counter is saved with every partial save
        assert np.array_equal(cp.agent.params["dec/w"], trained(Agent(0).params["dec/w"], 1))
        assert len(cp.replay) == 4  # as of step 0, where it was carried from
        assert cp.store.verify().ok


def test_loading_an_unregistered_name_raises_and_registers_nothing(tmp_path):
    with castore.Checkpoint(tmp_path / "ck") as cp:
        cp.agent = Agent(0)
        cp.save()
        with pytest.raises(castore.UsageError, match="not registered"):
            cp.load(keys=["replay"])
        assert "replay" not in cp
        with pytest.raises(castore.UsageError, match="not registered"):
            cp.load(tmp_path / "ck", keys=["agent", "ghost"])
        assert "ghost" not in cp


def test_a_bad_regex_is_a_one_line_selection_error(tmp_path):
    with castore.Checkpoint(tmp_path / "ck") as cp:
        cp.agent = {"w": np.ones(3)}
        cp.save()
        with pytest.raises(castore.SelectionError, match="not a valid regular expression"):
            cp.load(regex="enc/(")


def test_remote_urls_are_not_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(castore.CastoreError):
        castore.Checkpoint("gs://bucket/run")
    assert list(tmp_path.iterdir()) == []  # no folder "gs:"


@settings(max_examples=200, deadline=None)
@given(
    every=st.integers(-2, 50),
    start=st.integers(0, 300),
    deltas=st.lists(st.integers(0, 40), max_size=40),
)
def test_every_fires_as_elements_when_every_except_right_after_a_resume(every, start, deltas):
    ours, theirs = castore.Every(every), elements.when.Every(every)
    step = start
    for i, delta in enumerate([0, *deltas]):
        step += delta
        mine, reference = ours(step), theirs(step)
        if i == 0 and every > 0 and start > 0:
            assert mine is False  # resumed: the step was just loaded (or saved)
        else:
            assert mine == reference, (every, start, step)


def test_a_partial_save_whose_source_step_goes_away_commits_nothing(tmp_path):
    """keep=1: the commit of the save in flight deletes the step a later partial save
    carries from; that save must not commit a step naming chunks GC may free."""
    rng = np.random.default_rng(0)
    with castore.Store(tmp_path / "s", keep=1, max_pending=2) as store:
        store.save(0, {"agent": {"w": np.ones(8)}, "replay": rng.integers(0, 255, 1 << 20, dtype=np.uint8)})
        big = {"agent": {"w": np.zeros(8)}, "replay": rng.integers(0, 255, 64 << 20, dtype=np.uint8)}
        first = store.save_async(1, big)  # its commit retains step 1 only: step 0 goes
        try:
            second = store.save_async(2, {"agent": {"w": np.full(8, 2.0)}}, carry=(0, ["replay"]))
        except castore.UsageError:  # step 0 was gone already when this save was captured
            outcome = "refused at capture"
        else:
            with pytest.raises(castore.SaveError, match="deleted or replaced"):
                second.result()
            outcome = "refused at commit"
        assert first.result().step == 1
        assert store.steps() == [1], outcome
        store.gc()
        assert store.verify().ok


@pytest.mark.parametrize("order", ["reader-first", "writer-first"])
@pytest.mark.parametrize("close_writer_first", [True, False])
def test_trainer_and_evaluator_checkpoints_on_one_store_in_one_process(tmp_path, order, close_writer_first):
    path = tmp_path / "ck"
    with castore.Checkpoint(path) as seed:  # the store exists: write=False opens only what exists
        seed.agent = Agent(0)
        seed.save()

    def trainer():
        cp = castore.Checkpoint(path)
        cp.agent = Agent(1)
        return cp

    def evaluator():
        cp = castore.Checkpoint(path, write=False)
        cp.agent = Agent(2)
        return cp

    first, second = (evaluator, trainer) if order == "reader-first" else (trainer, evaluator)
    a, b = first(), second()
    train, evaluate = (a, b) if first is trainer else (b, a)
    assert evaluate.load() == 0 and train.load() == 0
    train.agent.params["dec/w"] += 1
    assert train.save().step == 1
    assert evaluate.load() == 1 and np.array_equal(evaluate.agent.params["dec/w"], train.agent.params["dec/w"])
    assert evaluate.save() is None and evaluate.steps() == [0, 1]  # write=False wrote nothing
    for cp in (train, evaluate) if close_writer_first else (evaluate, train):
        cp.close()
    with castore.Store(path, readonly=True) as store:
        assert store.steps() == [0, 1] and store.verify().ok


def test_a_partial_save_after_a_rollback_carries_from_the_loaded_step(tmp_path):
    with castore.Checkpoint(tmp_path / "ck") as cp:
        cp.a, cp.b = {"v": np.zeros(1)}, {"v": np.zeros(1)}
        for step in range(6):
            cp.a, cp.b = {"v": np.full(1, step)}, {"v": np.full(1, step)}
            cp.save(step=step)
        cp.load(step=3)
        cp.a = {"v": np.full(1, 100)}
        assert cp.save(keys=["a"]).step == 4  # steps 4 and 5 move to main-abandoned-3
        state = cp.store.load(4)
        assert state["a"]["v"][0] == 100 and state["b"]["v"][0] == 3  # b of the loaded lineage
        assert cp.steps() == [0, 1, 2, 3, 4] and "main-abandoned-3" in cp.branches()


def test_saving_to_this_store_spelled_otherwise_is_a_save_of_this_checkpoint(tmp_path):
    with castore.Checkpoint(tmp_path / "ck") as cp:
        cp.a, cp.b = {"v": np.zeros(1)}, {"v": np.zeros(1)}
        cp.save()
        (tmp_path / "link").symlink_to(tmp_path / "ck")
        for spelling in (f"{tmp_path}/ck/", tmp_path / "link", f"{tmp_path}/./ck"):
            cp.save(spelling, keys=["a"])  # a partial save here: b is carried
        assert cp.steps() == [0, 1, 2, 3]
        assert set(cp.store.manifest(3).names) == {"a", "b"}
        assert cp.load_or_save() == 3


def test_saving_to_another_store_leaves_its_steps_to_its_own_policy(tmp_path):
    with castore.Store(tmp_path / "other") as other:
        for step in range(5):
            other.save(step, {"x": np.full(2, step)})
    with castore.Checkpoint(tmp_path / "ck", keep=1, branch="main") as cp:
        cp.x = np.ones(2)
        assert cp.save(tmp_path / "other").step == 5
    with castore.Store(tmp_path / "other", readonly=True) as other:
        assert other.steps() == [0, 1, 2, 3, 4, 5]  # this checkpoint's keep=1 is not applied there


def test_bad_carry_arguments_are_usage_errors_and_commit_nothing(tmp_path):
    with castore.Store(tmp_path / "s") as store:
        store.save(0, {"a": np.zeros(2), "b": np.ones(2)})
        for carry in ((0, "b"), (0, ["b", "b"]), (0, [1]), 0, (0, ["ghost"]), (7, ["b"]), (0, ["a"])):
            with pytest.raises(castore.UsageError):
                store.save(1, {"a": np.full(2, 5.0)}, carry=carry)
        assert store.steps() == [0]
        store.save(1, {"a": np.full(2, 5.0)}, carry=(0, ["b"]))
        assert np.array_equal(store.load(1)["b"], np.ones(2)) and store.verify().ok


def test_async_partial_save_after_a_rollback_numbers_the_next_save_after_it(tmp_path):
    with castore.Checkpoint(tmp_path / "ck") as cp:
        cp.a, cp.b = {"v": np.zeros(1)}, {"v": np.zeros(1)}
        for step in range(10):
            cp.save(step=step)
        cp.load(step=5)
        first = cp.save(keys=["a"], block=False)  # continues from 5: steps 6..9 move away
        second = cp.save(block=False)
        assert (first.result().step, second.result().step) == (6, 7)
        assert cp.steps() == [0, 1, 2, 3, 4, 5, 6, 7]

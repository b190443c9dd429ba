"""The elements-style Checkpoint API."""

import numpy as np
import pytest
from conftest import assert_tree_equal

import castore


class Agent:
    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.params = {
            "enc": {"conv0": {"w": rng.random((8, 8), np.float32), "b": rng.random(8, np.float32)}},
            "dyn": {"gru": {"w": rng.random((16, 16), np.float32)}},
            "dec": {"w": rng.random((8, 4), np.float32)},
        }
        self.opt = {"count": np.int64(0), "mu": {"dec": np.zeros((8, 4), np.float32)}}

    def save(self):
        return {"params": self.params, "opt": self.opt}

    def load(self, state):
        self.params, self.opt = state["params"], state["opt"]


class Replay:
    """save() yields shards; load() gets an iterator of them."""

    def __init__(self, n=10):
        self.rows = [np.full((3, 4), i, np.uint8) for i in range(n)]
        self.loaded_lazily = None

    def save(self):
        for start in range(0, len(self.rows), 4):
            yield {"rows": np.stack(self.rows[start : start + 4])}

    def load(self, shards):
        self.loaded_lazily = not isinstance(shards, (list, tuple))
        self.rows = [row for shard in shards for row in shard["rows"]]


def make(path, seed=0):
    cp = castore.Checkpoint(path)
    cp.step = castore.Counter()
    cp.agent = Agent(seed)
    cp.replay = Replay()
    cp.config = {"lr": 3e-4}
    return cp


def test_load_or_save_saves_first_then_loads(tmp_path):
    with make(tmp_path / "ck") as cp:
        assert not cp.exists()
        assert cp.load_or_save() == 0
        assert cp.steps() == [0]
    with make(tmp_path / "ck", seed=1) as cp2:
        cp2.config = {"lr": 1.0}
        assert cp2.load_or_save() == 0
        assert_tree_equal(cp2.agent.params, Agent(0).params)
        assert cp2.config == {"lr": 3e-4}  # plain values: the attribute holds the loaded value
        assert cp2.replay.loaded_lazily
        assert [r[0, 0] for r in cp2.replay.rows] == list(range(10))


def test_step_number_from_step_component_explicit_or_next(tmp_path):
    with make(tmp_path / "ck") as cp:
        cp.step.increment(120)
        assert cp.save().step == 120
        assert cp.save(step=500).step == 500
        del cp.step
        assert cp.save().step == 501  # no 'step' component: one past the latest
        cp.step = "not a number"
        with pytest.raises(castore.UsageError, match="save\\(step="):
            cp.save()


def test_saving_same_state_at_same_step_is_a_noop_and_different_state_an_error(tmp_path):
    with make(tmp_path / "ck") as cp:
        cp.load_or_save()
        should_save = castore.Every(steps=10)
        assert should_save(int(cp.step))  # the habit: fires at once after load_or_save
        cp.save()  # same state, same step: fine
        cp.agent.params["dec"]["w"][0, 0] += 1
        with pytest.raises(castore.StepExistsError):
            cp.save()
        cp.save(overwrite=True)


def test_rollback_to_any_kept_step(tmp_path):
    with make(tmp_path / "ck") as cp:
        history = {}
        for step in range(0, 50, 10):
            cp.step.load(step)
            cp.agent.params["dec"]["w"][:] = step
            cp.save()
            history[step] = cp.agent.params["dec"]["w"].copy()
        assert cp.load(step=20) == 20
        assert int(cp.step) == 20 and np.array_equal(cp.agent.params["dec"]["w"], history[20])
        assert cp.load() == 40 and np.array_equal(cp.agent.params["dec"]["w"], history[40])


def test_load_some_components_only(tmp_path):
    with make(tmp_path / "ck") as cp:
        cp.save()
        cp.config = {"lr": 9.0}
        cp.agent.params["dec"]["w"][:] = 5
        cp.load(keys=["agent"])
        assert cp.config == {"lr": 9.0}
        assert not (cp.agent.params["dec"]["w"] == 5).any()


def test_regex_from_another_store_merges_selected_leaves(tmp_path):
    with make(tmp_path / "pretrained", seed=7) as src:
        src.save(step=100)
    with make(tmp_path / "run", seed=1) as cp:
        before = Agent(1).params
        assert cp.load(tmp_path / "pretrained", keys=["agent"], regex=r"^params/(enc|dyn)/") == 100
        pre = Agent(7).params
        assert_tree_equal(cp.agent.params["enc"], pre["enc"])
        assert_tree_equal(cp.agent.params["dyn"], pre["dyn"])
        assert_tree_equal(cp.agent.params["dec"], before["dec"])  # unselected: kept
        assert cp.steps() == []  # the other store was only read


def test_regex_errors_list_the_paths(tmp_path):
    with make(tmp_path / "src") as src:
        src.agent.params["enc"]["conv0"]["w"] = np.zeros((2, 2), np.float32)
        src.agent.params["dec"]["w"] = np.zeros((8, 4), np.float64)
        src.save(step=1)
    with make(tmp_path / "dst") as cp:
        with pytest.raises(castore.SelectionError, match="selects no leaf"):
            cp.load(tmp_path / "src", keys=["agent"], regex="^nope")
        with pytest.raises(castore.SelectionError) as info:
            cp.load(tmp_path / "src", keys=["agent"], regex="^params/(enc|dec)/")
        message = str(info.value)
        assert "agent/params/enc/conv0/w" in message and "agent/params/dec/w" in message
        assert "float64" in message
        assert np.array_equal(cp.agent.params["dec"]["w"], Agent(0).params["dec"]["w"])  # nothing applied


def test_regex_on_sharded_component_is_refused_clearly(tmp_path):
    with make(tmp_path / "ck") as cp:
        cp.save()
        with pytest.raises(castore.UsageError, match="replay"):
            cp.load(keys=["replay"], regex="0/")


def test_registration_rules(tmp_path):
    with castore.Checkpoint(tmp_path / "ck") as cp:
        with pytest.raises(castore.UsageError, match="no components"):
            cp.save()
        with pytest.raises(castore.UsageError, match="method"):
            cp.save = 1
        cp.x = np.arange(3)
        assert "x" in cp and cp.x.tolist() == [0, 1, 2]
        with pytest.raises(AttributeError):
            cp.missing
        with pytest.raises(castore.UsageError, match="not registered"):
            cp.save(keys=["y"])


def test_missing_component_in_step_is_named(tmp_path):
    with make(tmp_path / "ck") as cp:
        cp.store.save(1, {"agent": cp.agent.save()})  # written by another program
        with pytest.raises(castore.StepNotFoundError, match="'replay'"):
            cp.load(step=1)


def test_two_checkpoints_on_one_store_in_one_process(tmp_path):
    with make(tmp_path / "ck") as trainer, castore.Checkpoint(tmp_path / "ck") as evaluator:
        evaluator.agent = Agent(3)
        trainer.save(step=7)
        assert evaluator.load(keys=["agent"]) == 7
        assert_tree_equal(evaluator.agent.params, trainer.agent.params)


def test_every_steps_and_seconds():
    every = castore.Every(steps=100)
    fired = [s for s in range(0, 1000, 30) if every(s)]
    assert fired == [0, 120, 210, 300, 420, 510, 600, 720, 810, 900]
    assert not castore.Every(steps=5, initial=False)(0)
    clock = castore.Every(seconds=3600)
    assert clock() and not clock()
    assert castore.Every(seconds=0)() and castore.Every(seconds=0.0, initial=False)() is False
    with pytest.raises(castore.UsageError):
        castore.Every()
    with pytest.raises(castore.UsageError):
        castore.Every(steps=10)()


def test_loading_from_a_missing_store_is_a_typed_error(tmp_path):
    with make(tmp_path / "ck") as cp:
        with pytest.raises(castore.StoreNotFoundError, match="no castore store"):
            cp.load(tmp_path / "nowhere", keys=["agent"])
        assert not (tmp_path / "nowhere").exists()

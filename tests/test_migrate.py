"""castore.tools.migrate: elements checkpoints and embodied replay chunks into a store.

Checkpoints are written by the real ``elements.Checkpoint``; replay chunks as embodied's
``Chunk.save`` writes them (np.savez_compressed into ``{time}-{uuid}-{succ}-{length}.npz``).
"""

import copy
import os
import pickle

import elements
import numpy as np
import pytest
from conftest import assert_tree_equal

import castore
from castore.tools.migrate import import_elements

# -- elements checkpoints ----------------------------------------------------------------------


class Agent:
    """What DreamerV3's agent saves: ``{'params': {name: array}, 'counters': {...}}``."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.params = {
            "enc/conv0/kernel": rng.standard_normal((3, 3, 3, 16)).astype(np.float32),
            "dyn/gru/bias": rng.standard_normal(64).astype(np.float32),
            "opt/step": np.int32(0),
        }
        self.updates = 0

    def train(self):
        self.params["dyn/gru/bias"] = self.params["dyn/gru/bias"] + 1
        self.params["opt/step"] = np.int32(self.params["opt/step"] + 1)
        self.updates += 1

    def save(self):
        return {"params": dict(self.params), "counters": {"updates": self.updates, "batches": 2 * self.updates}}

    def load(self, data):
        self.params = dict(data["params"])


class Sharded:
    """A component whose save() yields shards, as a big replay or optimizer state might."""

    def __init__(self):
        self.arrays = [np.arange(5 * i, dtype=np.int64) for i in range(3)]

    def save(self):
        for i, array in enumerate(self.arrays):
            yield {"index": i, "array": array}

    def load(self, shards):
        self.arrays = [shard["array"] for shard in shards]


class Opaque:
    """No save()/load(): elements pickles the object itself; castore does not store it."""

    def __init__(self):
        self.value = 3

    def save(self):
        return {"weights": np.ones(3), "thing": self}

    def load(self, data):
        pass


def _write_checkpoints(directory, saves=3, *, step=True, incomplete=True):
    """A run of ``saves`` checkpoints (keep=None) and, optionally, one more whose ``done`` is
    gone; returns ``{step or index: expected state}`` of the complete ones."""
    counter = elements.Counter(100)
    cp = elements.Checkpoint(directory, step=counter if step else None, keep=None)
    cp.step = counter
    cp.agent = agent = Agent()
    cp.shards = sharded = Sharded()
    expected = {}
    for i in range(saves + incomplete):
        cp.save()
        if i < saves:
            expected[int(counter) if step else i] = {
                "agent": copy.deepcopy(agent.save()),
                "shards": list(copy.deepcopy(list(sharded.save()))),
                "step": int(counter),
            }
        agent.train()
        sharded.arrays[1] = sharded.arrays[1] + 1
        counter.increment(50)
    if incomplete:
        newest = directory / (directory / "latest").read_text()
        os.remove(newest / "done")
    return expected


def _assert_store_holds(store_path, expected):
    with castore.Store(store_path, readonly=True) as store:
        assert store.steps() == sorted(expected)
        for step, want in expected.items():
            got = store.load(step)
            got["shards"] = list(got["shards"])
            assert_tree_equal(got, want)


def test_every_complete_step_round_trips_bit_exact(tmp_path):
    expected = _write_checkpoints(tmp_path / "ckpt")
    result = import_elements(tmp_path / "ckpt", tmp_path / "store", allow_pickle=True)
    assert [s.step for s in result.imported] == [100, 150, 200]
    assert all(s.components == ("agent", "shards", "step") and not s.unchanged for s in result.imported)
    assert [(s.folder.endswith("-000000000250"), s.reason) for s in result.skipped] == [
        (True, "incomplete: no 'done' file (the save did not finish)")
    ]
    _assert_store_holds(tmp_path / "store", expected)


def test_pickles_are_not_read_without_allow_pickle(tmp_path):
    _write_checkpoints(tmp_path / "ckpt", saves=1, incomplete=False)
    with pytest.raises(castore.UsageError, match="allow_pickle=True.*if you trust them"):
        import_elements(tmp_path / "ckpt", tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_rerun_is_a_no_op_and_other_content_needs_overwrite(tmp_path):
    expected = _write_checkpoints(tmp_path / "ckpt")
    import_elements(tmp_path / "ckpt", tmp_path / "store", allow_pickle=True)
    again = import_elements(tmp_path / "ckpt", tmp_path / "store", allow_pickle=True)
    assert [s.unchanged for s in again.imported] == [True, True, True]
    folder = tmp_path / "ckpt" / again.imported[1].folder
    changed = pickle.loads((folder / "step.pkl").read_bytes()) + 1
    (folder / "step.pkl").write_bytes(pickle.dumps(changed))
    with pytest.raises(castore.StepExistsError, match="overwrite"):
        import_elements(tmp_path / "ckpt", tmp_path / "store", allow_pickle=True)
    import_elements(tmp_path / "ckpt", tmp_path / "store", allow_pickle=True, overwrite=True)
    expected[150]["step"] = changed
    _assert_store_holds(tmp_path / "store", expected)


def test_folders_without_a_step_are_numbered_in_time_order(tmp_path):
    expected = _write_checkpoints(tmp_path / "ckpt", step=False)  # DreamerV3's Checkpoint(logdir / 'ckpt')
    result = import_elements(tmp_path / "ckpt", tmp_path / "store", allow_pickle=True)
    assert [s.step for s in result.imported] == [0, 1, 2]
    _assert_store_holds(tmp_path / "store", expected)
    by_counter = import_elements(tmp_path / "ckpt", tmp_path / "other", allow_pickle=True, step_key="step")
    assert [s.step for s in by_counter.imported] == [100, 150, 200]
    _assert_store_holds(tmp_path / "other", {want["step"]: want for want in expected.values()})


def test_mixed_numbering_is_refused_and_a_repeated_step_keeps_the_newest(tmp_path):
    _write_checkpoints(tmp_path / "ckpt", saves=2, incomplete=False)
    first, second = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.is_dir())
    (tmp_path / "ckpt" / first).rename(tmp_path / "ckpt" / first.split("-")[0])
    with pytest.raises(castore.UsageError, match="mixes folders"):
        import_elements(tmp_path / "ckpt", tmp_path / "store", allow_pickle=True)
    (tmp_path / "ckpt" / first.split("-")[0]).rename(tmp_path / "ckpt" / (first.split("-")[0] + "-000000000150"))
    result = import_elements(tmp_path / "ckpt", tmp_path / "store", allow_pickle=True)
    assert [(s.step, s.folder) for s in result.imported] == [(150, second)]
    assert [s.reason for s in result.skipped] == [f"step 150 is saved again by {second}"]
    with castore.Store(tmp_path / "store", readonly=True) as store:
        assert store.load(150)["step"] == 150  # the newer folder's state (the older one held 100)


def test_bad_files_raise_typed_errors_naming_them(tmp_path):
    _write_checkpoints(tmp_path / "ckpt", saves=1, incomplete=False)
    folder = next(p for p in (tmp_path / "ckpt").iterdir() if p.is_dir())
    (folder / "agent.pkl").write_bytes((folder / "agent.pkl").read_bytes()[:50])
    with pytest.raises(castore.MigrationError, match="cannot unpickle") as caught:
        import_elements(tmp_path / "ckpt", tmp_path / "store", allow_pickle=True)
    assert caught.value.path == str(folder / "agent.pkl")
    (folder / "agent.pkl").unlink()
    (folder / "shards-0001.pkl").unlink()
    with pytest.raises(castore.MigrationError, match="without a gap") as caught:
        import_elements(tmp_path / "ckpt", tmp_path / "store", allow_pickle=True)
    assert caught.value.path == str(folder / "shards-0001.pkl")
    with pytest.raises(castore.UsageError, match="does not exist"):
        import_elements(tmp_path / "nothing", tmp_path / "store", allow_pickle=True)


def test_values_castore_does_not_store_name_their_path_and_folder(tmp_path):
    cp = elements.Checkpoint(tmp_path / "ckpt", step=elements.Counter(7), keep=None)
    cp.agent = Opaque()
    cp.save()
    with pytest.raises(
        castore.UnsupportedValueError, match=r"Opaque is not a storable type, read from .*-000000000007"
    ):
        import_elements(tmp_path / "ckpt", tmp_path / "store", allow_pickle=True)
    with castore.Store(tmp_path / "store", allow_pickle=True) as pickling:  # the way to keep it
        import_elements(tmp_path / "ckpt", pickling, allow_pickle=True)
        assert pickling.load(7)["agent"]["thing"].value == 3

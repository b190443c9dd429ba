"""Rollback, lineage and branches: the step keys of catalog.py and the Store/Checkpoint API."""

from __future__ import annotations

import numpy as np
import pytest

import castore
from castore import Checkpoint, Store
from castore.format.keys import branch_of, step_key, step_of


def weights(step: int) -> np.ndarray:
    return np.random.default_rng(step).standard_normal(50_000).astype(np.float32)  # 200 KB: chunked


def run(path, steps, **options) -> Checkpoint:
    """A checkpoint that saved ``steps``, the state at step s being ``weights(s)``."""
    cp = Checkpoint(path, chunk_bytes=64 << 10, **options)
    for s in steps:
        cp.w = weights(s)
        cp.save(s)
    return cp


def test_step_keys_keep_main_as_before_and_order_branches_after_it():
    assert step_key(7) == (7).to_bytes(8, "big")
    keys = sorted([step_key(9), step_key(1, "b"), step_key(5, "a"), step_key(2, "a"), step_key(3, "a/x")])
    assert [(branch_of(k), step_of(k)) for k in keys] == [("main", 9), ("a", 2), ("a", 5), ("a/x", 3), ("b", 1)]


@pytest.mark.parametrize("bad", ["", "-x", "a b", "a\x00b", "é", "x" * 201, 3, None])
def test_bad_branch_names_are_refused(tmp_path, bad):
    with pytest.raises(castore.UsageError, match="branch name"):
        Store(tmp_path / "s", branch=bad)


def test_rollback_continues_a_new_lineage_and_keeps_the_old_future_on_a_branch(tmp_path):
    cp = run(tmp_path / "s", range(1, 6))
    assert cp.load(step=2) == 2
    assert np.array_equal(cp.w, weights(2))
    assert cp.steps() == [1, 2, 3, 4, 5] and cp.branches() == ["main"]  # nothing moves before a save
    cp.w = weights(103)
    result = cp.save()  # numbered after the loaded step
    assert result.step == 3 and result.abandoned_to == "main-abandoned-2"
    assert cp.steps() == [1, 2, 3] and cp.latest() == 3
    assert cp.branches() == ["main", "main-abandoned-2"]
    assert np.array_equal(cp.store.load(3)["w"], weights(103))
    with Store(cp.path, branch="main-abandoned-2") as old:
        assert old.steps() == [3, 4, 5] and old.latest() == 5
        for s in (3, 4, 5):
            assert np.array_equal(old.load(s)["w"], weights(s))
    cp.w = weights(104)
    assert cp.save().abandoned_to is None  # only the first save after the load moves steps
    assert cp.steps() == [1, 2, 3, 4]
    cp.close()


def test_tags_and_metrics_follow_the_steps_they_name(tmp_path):
    cp = Checkpoint(tmp_path / "s", chunk_bytes=64 << 10)
    for s in range(1, 5):
        cp.w = weights(s)
        cp.save(s, metrics={"return": float(s)})
    cp.tag("before-lr-change", 3)
    cp.tag("start", 1)
    cp.load(step=2)
    cp.w = weights(100)
    cp.save()
    assert cp.tags() == {"start": 1}
    assert cp.store.locate("before-lr-change") == ("main-abandoned-2", 3)
    assert cp.store.metrics("before-lr-change") == {"return": 3.0}
    assert cp.store.metrics(3) == {}
    assert np.array_equal(cp.store.load("before-lr-change")["w"], weights(3))
    with Store(cp.path, branch="main-abandoned-2") as old:
        assert old.tags() == {"before-lr-change": 3}
        assert old.metrics(4) == {"return": 4.0}
    assert cp.load(step="before-lr-change") == 3  # a tag on another branch loads...
    cp.w = weights(101)
    assert cp.save().step == 4  # ...but does not make this branch roll back
    assert cp.branches() == ["main", "main-abandoned-2"]
    cp.close()


def test_loading_the_latest_or_some_components_does_not_roll_back(tmp_path):
    cp = run(tmp_path / "s", range(1, 4))
    cp.extra = np.arange(3)
    cp.save(4)
    cp.load(step=2, keys=["w"])  # a partial load: taking parameters, not rolling back
    cp.save(5)
    assert cp.steps() == [1, 2, 3, 4, 5] and cp.branches() == ["main"]
    cp.load()
    cp.save(6)
    assert cp.steps() == [1, 2, 3, 4, 5, 6] and cp.branches() == ["main"]
    cp.close()


def test_rolling_back_twice_to_one_step_makes_two_branches(tmp_path):
    cp = run(tmp_path / "s", range(1, 4))
    for n in range(2):
        cp.load(step=1)
        cp.w = weights(200 + n)
        cp.save()
        cp.w = weights(300 + n)
        cp.save()
    assert cp.branches() == ["main", "main-abandoned-1", "main-abandoned-1-2"]
    with Store(cp.path, branch="main-abandoned-1-2") as second:
        assert second.steps() == [2, 3]
        assert np.array_equal(second.load(3)["w"], weights(300))
    cp.close()


def test_a_rollback_save_of_an_existing_step_number_replaces_the_old_future(tmp_path):
    cp = run(tmp_path / "s", range(1, 6))
    cp.load(step=2)
    cp.w = weights(999)
    cp.save(4)  # step 4 existed on the old future: no StepExistsError, it moved away
    assert cp.steps() == [1, 2, 4]
    with Store(cp.path, branch="main-abandoned-2") as old:
        assert np.array_equal(old.load(4)["w"], weights(4))
    cp.close()


def test_a_save_that_commits_nothing_keeps_the_rollback_pending(tmp_path):
    cp = run(tmp_path / "s", range(1, 4))
    cp.load(step=1)
    cp.save(1)  # the same state under the loaded step: a no-op
    assert cp.steps() == [1, 2, 3]
    cp.w = weights(50)
    assert cp.save().step == 2
    assert cp.steps() == [1, 2] and cp.branches() == ["main", "main-abandoned-1"]
    cp.close()


def test_a_failed_save_keeps_the_rollback_pending(tmp_path):
    cp = run(tmp_path / "s", range(1, 4))
    cp.load(step=1)
    cp.w = object()  # not storable
    with pytest.raises(castore.UnsupportedValueError):
        cp.save()
    assert cp.store.continuing_from == 1 and cp.steps() == [1, 2, 3]
    cp.w = weights(60)
    assert cp.save().step == 2
    assert cp.steps() == [1, 2]
    cp.close()


def test_async_saves_after_a_rollback_number_and_move_like_blocking_ones(tmp_path):
    cp = run(tmp_path / "s", range(1, 6))
    cp.load(step=2)
    handles = []
    for n in range(3):
        cp.w = weights(400 + n)
        handles.append(cp.save(block=False))
    assert [h.result().step for h in handles] == [3, 4, 5]
    assert cp.steps() == [1, 2, 3, 4, 5]
    assert np.array_equal(cp.store.load(5)["w"], weights(402))
    with Store(cp.path, branch="main-abandoned-2") as old:
        assert old.steps() == [3, 4, 5]
        assert np.array_equal(old.load(5)["w"], weights(5))
    cp.close()


def test_fork_writes_no_chunks_and_branches_grow_apart(tmp_path):
    cp = run(tmp_path / "s", range(1, 4))
    before = cp.store.stats()
    assert cp.fork("experiment", 2) == 2
    after = cp.store.stats()
    assert (after.chunks, after.stored_bytes) == (before.chunks, before.stored_bytes)
    assert after.steps == before.steps + 1
    exp = Checkpoint(cp.path, branch="experiment")
    assert exp.branch == "experiment" and exp.steps() == [2]
    exp.w = None
    assert exp.load_or_save() == 2 and np.array_equal(exp.w, weights(2))
    exp.w = weights(77)
    assert exp.save().step == 3
    assert exp.steps() == [2, 3] and cp.steps() == [1, 2, 3]
    assert np.array_equal(cp.store.load(3)["w"], weights(3))
    assert np.array_equal(exp.store.load(3)["w"], weights(77))
    forked = {(a.branch, a.step): a for a in cp.store.accounting()}[("experiment", 2)]
    assert forked.unique_bytes == 0 and forked.shared_bytes == forked.referenced_bytes > 0
    with pytest.raises(castore.UsageError, match="exists"):
        cp.fork("experiment")
    with pytest.raises(castore.StepNotFoundError):
        cp.fork("other", 42)
    exp.close()
    cp.close()


def test_gc_keeps_chunks_of_every_branch_and_delete_branch_frees_them(tmp_path):
    cp = run(tmp_path / "s", range(1, 5))
    cp.load(step=1)
    cp.w = weights(10)
    cp.save()  # main: 1, 2(new); main-abandoned-1: 2, 3, 4
    for s in cp.steps()[:-1]:
        cp.store.delete(s)
    freed = cp.gc()
    assert freed.steps == (1,)
    with Store(cp.path, branch="main-abandoned-1") as old:
        for s in (2, 3, 4):
            assert np.array_equal(old.load(s, verify=True)["w"], weights(s))
    held = cp.store.stats().stored_bytes
    with pytest.raises(castore.UsageError, match="this store is on it"):
        cp.delete_branch("main")
    assert cp.delete_branch("main-abandoned-1") == [2, 3, 4]
    assert cp.branches() == ["main"]
    plan = cp.gc()
    assert sorted(plan.steps) == [2, 3, 4] and plan.freed_bytes > 0
    assert cp.store.stats().stored_bytes == held - plan.freed_bytes
    assert np.array_equal(cp.store.load()["w"], weights(10))
    with pytest.raises(castore.StepNotFoundError, match="no branch"):
        cp.delete_branch("main-abandoned-1")
    cp.close()


def test_delete_branch_refuses_a_branch_with_tagged_steps(tmp_path):
    cp = run(tmp_path / "s", range(1, 3))
    cp.fork("pretrained")
    with Store(cp.path, branch="pretrained") as other:
        other.tag("best")
    with pytest.raises(castore.UsageError, match="tagged 'best'"):
        cp.delete_branch("pretrained")
    cp.untag("best")
    assert cp.delete_branch("pretrained") == [2]
    cp.close()


def test_retention_acts_on_the_current_branch_only(tmp_path):
    cp = run(tmp_path / "s", range(1, 6), keep=2)
    assert cp.steps() == [4, 5]
    cp.load(step=4)
    cp.w = weights(500)
    cp.save()
    assert cp.steps() == [4, 5] and cp.branches() == ["main", "main-abandoned-4"]
    for s in range(6, 10):
        cp.w = weights(s)
        cp.save(s)
    assert cp.steps() == [8, 9]
    with Store(cp.path, branch="main-abandoned-4") as old:
        assert old.steps() == [5]
        assert np.array_equal(old.load(5, verify=True)["w"], weights(5))
    cp.close()


def test_each_branch_numbers_and_lists_its_own_steps(tmp_path):
    with Store(tmp_path / "s") as main, Store(tmp_path / "s", branch="b") as b:
        assert b.latest() is None and b.steps() == []
        with pytest.raises(castore.StepNotFoundError, match="branch 'b'"):
            b.load()
        main.save(5, {"x": 1})
        b.save(5, {"x": 2})  # the same number on another branch is another step
        b.save(1, {"x": 3})
        assert main.steps() == [5] and b.steps() == [1, 5] and b.latest() == 5
        assert main.load(5) == {"x": 1} and b.load(5) == {"x": 2}
        assert main.load(5, branch="b") == {"x": 2}
        assert main.branches() == ["main", "b"]
        assert main.stats().steps == 3
        b.delete(1)
        assert b.steps() == [5] and main.steps() == [5]
        with pytest.raises(castore.StepNotFoundError, match="step 1 of branch 'b'"):
            b.delete(1)

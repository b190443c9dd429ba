"""Retention policies (pure selection) and their use through Store/Checkpoint, with tags."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import castore
from castore.maintenance.retention import Keep, KeptIndex, StepInfo, policy_of


def infos(steps, created=None, metrics=None, tagged=()):
    created = created or {s: float(i) for i, s in enumerate(steps)}
    metrics = metrics or {}
    return [StepInfo(s, created[s], metrics.get(s, {}), s in tagged) for s in steps]


def test_last_keeps_the_highest_step_numbers_whatever_the_save_order():
    assert Keep(last=2).select(infos([5, 1, 9, 3])) == {5, 9}


def test_every_keeps_the_first_step_of_each_block_of_k():
    assert Keep(every=10).select(infos([0, 3, 10, 12, 25, 27, 31])) == {0, 10, 25, 31}  # 31: latest


def test_interval_keeps_the_first_save_of_each_time_bucket():
    # buckets are fixed clock intervals [60k, 60k+60): they do not shift as steps are deleted
    steps = [1, 2, 3, 4, 5]
    created = {1: 100.0, 2: 130.0, 3: 161.0, 4: 170.0, 5: 250.0}
    assert Keep(interval=60).select(infos(steps, created)) == {1, 2, 5}


def test_best_keeps_the_top_n_by_metric_and_ignores_steps_without_it():
    metrics = {1: {"ret": 5.0}, 2: {"ret": 9.0}, 3: {}, 4: {"ret": 7.0}, 5: {"loss": 0.1}}
    assert Keep(best=2, metric="ret").select(infos([1, 2, 3, 4, 5], metrics=metrics)) == {2, 4, 5}
    assert Keep(best=1, metric="ret", mode="min").select(infos([1, 2, 3, 4, 5], metrics=metrics)) == {1, 5}


def test_tagged_and_latest_steps_are_always_kept_and_rules_unite():
    policy = Keep(last=1, every=100)
    assert policy.select(infos([0, 50, 100, 150, 160], tagged={50})) == {0, 50, 100, 160}


@pytest.mark.parametrize(
    "bad",
    [
        dict(last=0),
        dict(every=-1),
        dict(best=2),
        dict(metric="r"),
        dict(best=1, metric="r", mode="median"),
        dict(interval=0),
        dict(last=True),
    ],
)
def test_bad_policies_are_refused(bad):
    with pytest.raises(castore.UsageError):
        Keep(**bad)


def test_keep_int_means_last_n():
    assert policy_of(3) == Keep(last=3) and policy_of(None) is None
    with pytest.raises(castore.UsageError):
        policy_of(0)


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(st.integers(0, 500), min_size=1, max_size=30, unique=True),
    last=st.none() | st.integers(1, 5),
    every=st.none() | st.integers(1, 200),
    tagged=st.sets(st.integers(0, 500), max_size=3),
)
def test_the_selection_is_the_union_of_the_rules(steps, last, every, tagged):
    given_infos = infos(steps, tagged=tagged)
    kept = Keep(last=last, every=every).select(given_infos)
    assert kept <= set(steps) and max(steps) in kept
    assert {s for s in steps if s in tagged} <= kept
    if last:
        assert set(sorted(steps)[-last:]) <= kept
    expected = {max(steps)} | (set(steps) & tagged) | (set(sorted(steps)[-last:]) if last else set())
    if every:
        firsts = {}
        for s in sorted(steps):
            firsts.setdefault(s // every, s)
        expected |= set(firsts.values())
    assert kept == expected


# --- through the store -------------------------------------------------------------------------


def state(i):
    return {"w": np.full(3000, i, np.float32), "i": i}


def test_checkpoint_keep_n_deletes_older_steps_after_each_save(tmp_path):
    with castore.Checkpoint(tmp_path / "ck", keep=2, chunk_bytes=4096) as cp:
        for i in range(5):
            cp.x = state(i)
            cp.save(step=i * 10)
        assert cp.steps() == [30, 40]
        assert cp.store.plan_gc().is_empty  # the deleted steps' chunks were freed already
        cp.load(step=30)
        assert cp.x["i"] == 3


def test_best_by_metric_and_tags_survive_retention_and_load_by_name(tmp_path):
    with castore.Checkpoint(tmp_path / "ck", keep=Keep(last=1, best=1, metric="return")) as cp:
        for i, ret in enumerate([1.0, 9.0, 3.0, 2.0]):
            cp.x = state(i)
            cp.save(step=i, metrics={"return": ret})
            if i == 2:
                cp.tag("before-lr-change")
        assert cp.steps() == [1, 2, 3]  # best, tagged, latest
        assert cp.tags() == {"before-lr-change": 2}
        assert cp.store.metrics(1) == {"return": 9.0}
        assert cp.load(step="before-lr-change") == 2 and cp.x["i"] == 2
        with pytest.raises(castore.UsageError, match="tagged"):
            cp.store.delete(2)
        cp.untag("before-lr-change")
        assert cp.retain() == [2]
        assert cp.steps() == [1, 3]
        with pytest.raises(castore.StepNotFoundError):
            cp.load(step="before-lr-change")


def test_explicit_retain_with_a_policy_and_bad_metrics(tmp_path):
    with castore.Store(tmp_path / "s") as store:
        for i in range(6):
            store.save(i, state(i))
        assert store.retain(Keep(every=3)) == [1, 2, 4]
        assert store.steps() == [0, 3, 5]
        with pytest.raises(castore.UsageError):
            store.save(9, state(9), metrics={"r": "high"})
        with pytest.raises(castore.UsageError):
            store.retain()  # no policy on this store
        with pytest.raises(castore.UsageError):
            store.tag("12")  # a tag cannot look like a step number


# --- the incremental pass (KeptIndex) agrees with a full selection ---------------------------------

policies = st.builds(
    lambda last, every, interval, best, mode: Keep(
        last=last, every=every, interval=interval, best=best, metric="r" if best else None, mode=mode
    ),
    last=st.none() | st.integers(1, 6),
    every=st.none() | st.integers(1, 12),
    interval=st.none() | st.sampled_from([1.0, 2.5, 7.0]),
    best=st.none() | st.integers(1, 4),
    mode=st.sampled_from(["max", "min"]),
)
appends = st.lists(
    st.tuples(
        st.integers(1, 4),  # step gap
        st.one_of(st.floats(0.0, 3.0), st.just(-1.0)),  # time gap; -1: the clock went back
        st.none() | st.sampled_from([0.0, 1.0, 2.0, -3.5, 7.25, float("nan")]),  # metric "r"
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(policy=policies, initial=st.integers(0, 12), tagged=st.sets(st.integers(0, 30), max_size=3), saves=appends)
def test_the_incremental_pass_deletes_exactly_what_a_full_selection_deletes(policy, initial, tagged, saves):
    steps = [StepInfo(s, float(s // 2), {"r": float(s % 5)}, s in tagged) for s in range(0, 2 * initial, 2)]
    index, doomed = KeptIndex.select(policy, steps)
    kept = {s.step: s for s in steps if s.step not in doomed}
    step, created = (steps[-1].step if steps else 0), (steps[-1].created if steps else 0.0)
    fast = 0
    for gap, dt, metric in saves:
        step, created = step + gap, created + dt
        new = StepInfo(step, created, {} if metric is None else {"r": metric}, False)
        expected = set(kept) | {step}
        expected -= policy.select([*kept.values(), new])
        planned = index.plan_append(new)
        if planned is None:  # not an append it can decide (a clock that went back): a full pass
            index, full = KeptIndex.select(policy, [*kept.values(), new])
            assert set(full) == expected
        else:
            fast += 1
            assert set(planned) == expected and planned == sorted(planned)
            index.append(new, planned)
        kept[step] = new
        for gone in expected:
            del kept[gone]
        assert index.infos == dict(sorted(kept.items()))
    if policy.interval is None:
        assert fast == len(saves)  # without times to follow, every save is an append

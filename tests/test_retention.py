"""Retention policies (pure selection), the incremental pass, the stepinfo records it reads,
and their use through Store/Checkpoint, with tags."""

import dataclasses
import os
import time

import msgpack
import numpy as np
import pytest
import test_versions
from conftest import assert_tree_equal
from hypothesis import given, settings
from hypothesis import strategies as st
from test_versions import golden

import castore
import castore.save.saver as saver_module
from castore import catalog
from castore.format.keys import step_key
from castore.format.schema import Table
from castore.format.sealing import seal
from castore.maintenance import retainer
from castore.maintenance.retention import Keep, KeptIndex, StepInfo, policy_of
from castore.storage import memory


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
        # GC is amortized: the deleted steps' chunks wait in the trash for a later save or gc()
        assert cp.store.plan_gc().steps == (0, 10, 20)
        cp.load(step=30)
        assert cp.x["i"] == 3
    with castore.Store(tmp_path / "ck") as store:  # closing the checkpoint collected them
        assert store.plan_gc().is_empty and store.steps() == [30, 40]


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


# --- stepinfo records: what retention reads instead of manifests -----------------------------------


def decode_forbidden(*args, **kwargs):
    raise AssertionError("retention decoded a manifest")


def test_every_step_has_a_stepinfo_record_with_its_time_and_metrics(tmp_path):
    with castore.Store(tmp_path / "s") as store:
        store.save(1, state(1))
        store.save(2, state(2), metrics={"return": 2.5})
        with store.backend.read() as txn:
            for step, metrics in ((1, {}), (2, {"return": 2.5})):
                record = catalog.read_stepinfo(txn, step_key(step))
                assert record.created == store.manifest(step).created and record.metrics == metrics
        store.fork("side", 2)  # the record moves and copies with its step
        with store.backend.read() as txn:
            assert catalog.read_stepinfo(txn, step_key(2, "side")).created == store.manifest(2).created


def test_retention_reads_records_not_manifests_and_costs_what_it_deletes(tmp_path, monkeypatch):
    rebuilds = []
    full_pass = retainer.step_infos
    monkeypatch.setattr(
        retainer, "step_infos", lambda txn, branch, *more: rebuilds.append(branch) or full_pass(txn, branch, *more)
    )
    monkeypatch.setattr(retainer, "decode_manifest", decode_forbidden)  # every step has its record
    with castore.Store(tmp_path / "s", keep=Keep(last=2, every=5)) as store:
        for step in range(12):
            store.save(step, state(step))
        assert store.steps() == [0, 5, 10, 11]
        assert rebuilds == ["main"]  # the first save read the records once; then the index sufficed
        store.tag("kept", 10)  # a write the index does not follow: the next pass reads the records again
        store.save(12, state(12))
        assert rebuilds == ["main", "main"] and store.steps() == [0, 5, 10, 11, 12]
        store.gc()  # a collection changes no step: no rebuild after it
        store.save(13, state(13))
        assert rebuilds == ["main", "main"] and store.steps() == [0, 5, 10, 12, 13]
        store.keep = Keep(last=1)  # another policy: one full pass
        store.save(14, state(14))
        assert rebuilds == ["main"] * 3 and store.steps() == [10, 14]
    with castore.Store(tmp_path / "s", keep=Keep(last=1)) as store:  # a new process reads the records
        store.save(15, state(15))
        assert store.steps() == [10, 15] and rebuilds == ["main"] * 4


@pytest.mark.parametrize("engine", ["lmdb", "memory"])
def test_interval_and_best_rules_use_the_records_time_and_metrics(tmp_path, monkeypatch, engine):
    clock = iter([1000.0, 1010.0, 1070.0, 1075.0, 1130.0, 1200.0])

    class Clock:  # the saver's time module: manifests and records get these times
        perf_counter = staticmethod(time.perf_counter)
        time = staticmethod(lambda: next(clock))

    monkeypatch.setattr(saver_module, "time", Clock)
    path = f"memory://interval-{os.getpid()}" if engine == "memory" else tmp_path / "s"
    policy = Keep(interval=60, best=1, metric="loss", mode="min")
    with castore.Store(path, keep=policy) as store:
        for step, loss in enumerate([5.0, 1.0, 4.0, 3.0, 6.0, 7.0]):
            store.save(step, state(step), metrics={"loss": loss})
        # interval buckets [960, 1020), [1020, 1080), [1080, 1140), [1140, 1200), [1200, ...): firsts 0, 2, 4, 5
        assert store.steps() == [0, 1, 2, 4, 5]  # 1: lowest loss
        assert [store.manifest(s).created for s in store.steps()] == [1000.0, 1010.0, 1070.0, 1130.0, 1200.0]
    if engine == "memory":
        memory.discard(f"interval-{os.getpid()}")


@pytest.mark.parametrize("version", [1, 2])
def test_retention_on_a_golden_store_takes_created_from_manifests_where_records_lack_it(tmp_path, version):
    """Format 1 has no stepinfo table, format 2 records hold only metrics: retention still
    works, with each step's time taken from its manifest."""
    path = test_versions.copy_golden(version, tmp_path / "store")
    with castore.Store(path) as store:
        with store.backend.read() as txn:
            infos = retainer.step_infos(txn, "main")
            assert all(catalog.read_stepinfo(txn, step_key(s)).created is None for s in golden.STEPS)
        assert sorted(infos) == list(golden.STEPS)
        for step, info in infos.items():
            assert info.created == store.manifest(step).created > 0
            assert info.metrics == (golden.metrics(step) if version == 2 else {})
        assert [s for s, i in infos.items() if i.tagged] == ([golden.TAG[1]] if version == 2 else [])
        # one interval bucket of ~30 years holds every golden step: the first saved is kept
        store.keep = Keep(interval=1e9, last=1)
        new = golden.STEPS[-1] + 1
        store.save(new, {"x": np.arange(10)})
        kept = {golden.STEPS[0], new} | ({golden.TAG[1]} if version == 2 else set())
        assert set(store.steps()) == kept
        assert_tree_equal(test_versions.loaded(store, golden.STEPS[0]), golden.state(version, golden.STEPS[0]))
        with store.backend.read() as txn:  # that pass completed the records of the steps it kept
            for step in kept:
                assert catalog.read_stepinfo(txn, step_key(step)).created == store.manifest(step).created
        if version == 2:
            assert store.metrics(golden.TAG[1]) == golden.metrics(golden.TAG[1])
        store.gc()
        assert store.verify().ok


def test_a_sealed_record_without_created_falls_back_to_the_manifest(tmp_path):
    """As format 3 wrote them: sealed, metrics only, and none for a step without metrics."""
    with castore.Store(tmp_path / "s") as store:
        for step in range(4):
            store.save(step, state(step), metrics={"r": float(step)} if step % 2 else None)

        def as_format3(txn):
            for step in range(4):
                if step % 2:
                    txn.put(Table.STEPINFO, step_key(step), seal(msgpack.packb({"metrics": {"r": float(step)}})))
                else:
                    txn.delete(Table.STEPINFO, step_key(step))

        store.backend.write(as_format3)
        assert store.metrics(1) == {"r": 1.0} and store.metrics(2) == {}
        assert store.retain(Keep(best=1, metric="r")) == [0, 1, 2]  # 3: best and latest
        assert store.steps() == [3]


@settings(max_examples=25, deadline=None)
@given(
    ops=st.lists(st.sampled_from(["save", "save", "save", "tag", "untag", "delete", "gc", "policy"]), max_size=30),
    policy_choices=st.lists(
        st.sampled_from([Keep(last=2), Keep(last=1, every=4), Keep(best=2, metric="r")]), min_size=1
    ),
)
def test_retention_after_each_save_equals_a_full_selection_whatever_came_between(ops, policy_choices):
    """On the memory engine: the kept steps after every save are what Keep.select keeps of
    the steps before plus the new one, through tags, deletes, GCs and policy changes."""
    name = f"retention-model-{os.getpid()}"
    memory.discard(name)
    policies = iter(policy_choices * 30)
    store = castore.Store(f"memory://{name}", keep=next(policies))
    try:
        model: dict[int, StepInfo] = {}
        step = 0
        for op in ops:
            if op == "save":
                metric = float((step * 7) % 5)
                store.save(step, {"i": step}, metrics={"r": metric})
                before = list(model.values()) + [StepInfo(step, store.manifest(step).created, {"r": metric}, False)]
                kept = store.keep.select(before)
                model = {s.step: s for s in before if s.step in kept}
                step += 1
            elif op in ("tag", "untag", "delete") and model:
                target = sorted(model)[len(model) // 2]
                tagged = model[target].tagged
                if op == "tag" and not tagged:
                    store.tag(f"t{target}", target)
                    model[target] = dataclasses.replace(model[target], tagged=True)
                elif op == "untag" and tagged:
                    store.untag(f"t{target}")
                    model[target] = dataclasses.replace(model[target], tagged=False)
                elif op == "delete" and not tagged:
                    store.delete(target)
                    del model[target]
            elif op == "gc":
                store.gc()
            elif op == "policy":
                store.keep = next(policies)
            assert store.steps() == sorted(model)
    finally:
        store.close()
        memory.discard(name)

"""Mirrors to S3 against the real Ceph RADOS Gateway of ``s3_server``: a store saved with
``mirror=`` reads back bit-exact from the bucket, uploads only what the bucket lacks, and
the bucket follows the store (retention, rollback); pulls resume a run anywhere; bucket GC
frees and repacks under its lock; upload errors surface once, after the local commit.

Every wait is on the mirror (``store.wait()``, which returns once the queue is uploaded or
an attempt failed) or bounded by a short :class:`RetryPolicy`; nothing here asserts on
wall-clock time.
"""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from workload import assert_state_equal

import castore
from castore.errors import BucketBusyError, MirrorError, RemoteUnavailableError, StepNotFoundError
from castore.format.keys import step_key
from castore.mirror import MirrorOptions
from castore.storage.bucket import Bucket
from castore.storage.objects import open_object_store
from castore.storage.s3 import RetryPolicy
from castore.tools import cli

CHUNK = 64 << 10
#: small packs, and no bucket GC unless a test asks for one
OPTIONS = MirrorOptions(pack_bytes=1 << 20, gc_after=0)
#: gives up on a stopped gateway in about a second
FAST = RetryPolicy(max_retries=2, initial_backoff=0.05, max_backoff=0.2, deadline=5.0, connect_timeout=1.0)
PREFIX = "run"


@pytest.fixture
def url(s3_server, bucket, monkeypatch):
    """``s3://<fresh bucket>/run``, with the AWS_* variables pointing at the test gateway."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return f"s3://{bucket}/{PREFIX}"


def mirrored(path, url, *, options=OPTIONS, **kw) -> castore.Store:
    return castore.Store(path, chunk_bytes=CHUNK, mirror=url, mirror_options=options, **kw)


def bucket_objects(s3_admin, bucket) -> dict[str, int]:
    """``{key under the prefix: size}`` as the server lists them (not through castore)."""
    pages = s3_admin.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=PREFIX + "/")
    return {o["Key"][len(PREFIX) + 1 :]: o["Size"] for page in pages for o in page.get("Contents", [])}


def total_bytes(s3_admin, bucket, folder: str = "") -> int:
    return sum(size for key, size in bucket_objects(s3_admin, bucket).items() if key.startswith(folder))


def random_bytes(rng, nbytes: int) -> np.ndarray:
    return rng.integers(0, 256, nbytes, dtype=np.uint8)


def assert_same_listing(local: castore.Store, remote: castore.Store) -> None:
    assert remote.steps() == local.steps()
    assert remote.latest() == local.latest()
    assert remote.tags() == local.tags()
    for step in local.steps():
        assert remote.metrics(step) == local.metrics(step)


def show(store_url: str, step: int, capsys) -> dict:
    capsys.readouterr()
    assert cli.main(["show", store_url, str(step), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    shown.pop("store")
    return shown


# -- 1. round trips --------------------------------------------------------------------------------


def test_saved_steps_load_bit_exact_from_the_bucket(tmp_path, url, capsys):
    rng = np.random.default_rng(1)
    replay = castore.RingBuffer(300)
    tracked = castore.TrackedArray(random_bytes(rng, 3 * CHUNK).reshape(-1, 256))
    frames = np.tile(np.arange(256, dtype=np.uint8), 4 * CHUNK // 256).reshape(-1, 64)  # compresses well
    with mirrored(tmp_path / "local", url, compression="auto") as store:
        for step in range(1, 4):
            replay.add({"obs": random_bytes(rng, 80 * 512).reshape(80, 512), "reward": rng.random(80, np.float32)})
            tracked[step * 100] = step
            state = {
                "weights": rng.standard_normal((200, 300), dtype=np.float32),  # 240 KB: 4 chunks
                "replay": replay.save(),
                "tracked": tracked,
                "frames": frames + step,
                "plain": {"lr": 0.1 * step, "name": f"run-{step}", "sizes": (1, 2, step), "none": None},
            }
            store.save(step, state, metrics={"loss": 1.0 / step, "score": float(step)})
            if step == 2:
                store.tag("best")  # mirrored with the next upload
        store.wait()
        results = store.mirror.results
        assert [r.key for r in results] == [step_key(s, "main") for s in (1, 2, 3)]
        uploaded = sum(r.value_bytes for r in results)
        assert uploaded < 0.8 * sum(store.manifest(s).logical_bytes for s in (1, 2, 3))  # compressed, deduplicated
        with castore.Store(url, readonly=True) as remote:
            assert_same_listing(store, remote)
            assert remote.tags() == {"best": 2}
            for step in (1, 2, 3):
                assert_state_equal(remote.load(step), store.load(step))
                assert show(url, step, capsys) == show(store.path, step, capsys)
            latest = remote.load()
            np.testing.assert_array_equal(latest["tracked"], np.asarray(tracked))
            np.testing.assert_array_equal(latest["replay"]["fields"]["obs"], np.asarray(replay["obs"]))
            assert_state_equal(latest["frames"], frames + 3)
            assert remote.verify().ok


def test_tags_made_after_the_last_save_reach_the_bucket(tmp_path, url):
    with mirrored(tmp_path / "local", url) as store:
        for step in range(3):
            store.save(step, {"step": step})
        store.wait()
        store.tag("final", 2)
        store.tag("first", 0)
        store.wait()  # no commit since: the tags go up by themselves
        with castore.Store(url, readonly=True) as remote:
            assert remote.tags() == {"final": 2, "first": 0}
        store.untag("first")
        store.tag("final", 1)  # moved
    with castore.Store(url, readonly=True) as remote:  # close mirrored them
        assert remote.tags() == {"final": 1}


def tree_leaves():
    arrays = st.sampled_from([np.uint8, np.int64, np.float32, ">f8"]).flatmap(
        lambda dt: hnp.arrays(
            np.dtype(dt),
            hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=300),
            elements=hnp.from_dtype(np.dtype(dt), allow_nan=False),
        )
    )
    plain = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=20))
    return st.one_of(arrays, plain, st.binary(min_size=0, max_size=2 * CHUNK))


trees = st.dictionaries(st.text(min_size=1, max_size=6), tree_leaves(), min_size=1, max_size=5)
prefixes = itertools.count()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(states=st.lists(trees, min_size=1, max_size=3))
def test_random_trees_round_trip_local_to_bucket_to_a_fresh_store(tmp_path, url, states):
    where = f"{url}/{next(prefixes)}"  # a fresh prefix per example
    base = tmp_path / where.rpartition("/")[2]
    with mirrored(base / "local", where) as store:
        for step, tree in enumerate(states):
            store.save(step, {"c": tree})
        store.wait()
    with castore.Store(base / "fresh", chunk_bytes=CHUNK) as fresh:
        for step, tree in enumerate(states):
            assert fresh.pull(step, url=where) == step
            assert_state_equal(fresh.load(step)["c"], tree)
        assert fresh.steps() == list(range(len(states)))
        assert fresh.verify().ok


# -- 2. deduplication ------------------------------------------------------------------------------


def test_a_second_save_uploads_only_the_changed_chunk(tmp_path, url, s3_admin, bucket):
    rng = np.random.default_rng(2)
    weights = random_bytes(rng, 40 * CHUNK)  # 2.5 MiB: three packs of 1 MiB
    with mirrored(tmp_path / "local", url, compression="none") as store:
        store.save(1, {"w": weights})
        store.wait()
        first = store.mirror.results[-1]
        assert first.packs >= 3 and first.value_bytes >= weights.nbytes
        before = total_bytes(s3_admin, bucket)
        weights[17 * CHUNK + 5] ^= 0xFF
        saved = store.save(2, {"w": weights})
        store.wait()
        second = store.mirror.results[-1]
        grown = total_bytes(s3_admin, bucket) - before
    assert CHUNK <= saved.new_bytes < 2 * CHUNK  # the changed chunk (and its page, if any)
    assert second.key == step_key(2, "main") and second.packs == 1
    assert saved.new_bytes * 0.9 <= second.value_bytes <= saved.new_bytes * 1.1
    assert CHUNK <= grown <= 1.1 * saved.new_bytes + 8192, (grown, saved.new_bytes)  # + index, record
    with castore.Store(url, readonly=True) as remote:
        assert_state_equal(remote.load(2)["w"], weights)


# -- 3. resuming anywhere --------------------------------------------------------------------------


def test_load_or_save_on_a_fresh_machine_resumes_from_the_mirror(tmp_path, url):
    rng = np.random.default_rng(3)
    first = castore.Checkpoint(tmp_path / "a", mirror=url, mirror_options=OPTIONS, chunk_bytes=CHUNK)
    first.weights = random_bytes(rng, 5 * CHUNK)
    first.meta = {"epoch": 0}
    assert first.load_or_save() == 0  # an empty bucket: a first save, mirrored
    for epoch in (1, 2, 3):
        first.weights = random_bytes(rng, 5 * CHUNK)
        first.meta = {"epoch": epoch}
        first.save()
    expected = first.weights.copy()
    first.close()  # uploads what is queued

    second = castore.Checkpoint(tmp_path / "b", mirror=url, mirror_options=OPTIONS, chunk_bytes=CHUNK)
    second.weights = np.zeros(5 * CHUNK, np.uint8)
    second.meta = {}
    assert second.load_or_save() == 3
    assert_state_equal(second.weights, expected)
    assert second.meta == {"epoch": 3}
    assert second.steps() == [3]  # only the latest was pulled
    second.weights[0] ^= 1
    assert second.save().step == 4
    second.close()
    with castore.Store(url, readonly=True) as remote:
        assert remote.steps() == [0, 1, 2, 3, 4]
        assert remote.load(4)["weights"][0] == expected[0] ^ 1


def test_a_host_that_does_not_write_ignores_the_mirror(tmp_path, url, s3_admin, bucket):
    """``write=False`` (a non-zero host of a multi-host run) reads its store read-only and
    uploads nothing: the same options as the writer's work there."""
    with mirrored(tmp_path / "a", url) as store:
        store.save(0, {"w": np.arange(10)})
        store.wait()
    before = bucket_objects(s3_admin, bucket)
    reader = castore.Checkpoint(tmp_path / "a", write=False, mirror=url, mirror_options=OPTIONS)
    reader.w = np.zeros(10, np.int64)
    assert reader.load() == 0 and reader.store.readonly and reader.store.mirror is None
    assert_state_equal(reader.w, np.arange(10))
    assert reader.save() is None  # write=False: nothing is written, here or in the bucket
    reader.close()
    assert bucket_objects(s3_admin, bucket) == before


def test_pull_a_step_or_a_tag_fetching_only_what_is_missing(tmp_path, url):
    rng = np.random.default_rng(4)
    shared = random_bytes(rng, 4 * CHUNK)
    states = {s: {"shared": shared, "own": random_bytes(rng, 2 * CHUNK)} for s in range(3)}
    with mirrored(tmp_path / "a", url) as store:
        for step, state in states.items():
            store.save(step, state)
        store.tag("golden", 0)
        store.save(3, states[2])  # the tag goes up with this upload
        store.wait()
    with mirrored(tmp_path / "b", url) as fresh:
        assert fresh.pull(1) == 1
        assert fresh.steps() == [1]
        assert_state_equal(fresh.load(1), states[1])
        assert fresh.pull("golden") == 0
        assert_state_equal(fresh.load(0), states[0])
        assert fresh.pull(1) == 1  # already here: nothing changes
        assert fresh.pull() == 3  # the latest
        assert fresh.steps() == [0, 1, 3]
        with pytest.raises(StepNotFoundError):
            fresh.pull(9)
        with pytest.raises(StepNotFoundError):
            fresh.pull("no-such-tag")
        assert fresh.verify().ok


# -- 4. retention and bucket GC --------------------------------------------------------------------


def test_the_bucket_keeps_what_the_store_keeps_and_gc_frees_the_rest(tmp_path, url, s3_admin, bucket):
    rng = np.random.default_rng(5)
    states = {s: {"w": random_bytes(rng, 20 * CHUNK), "step": s} for s in range(5)}
    with mirrored(tmp_path / "local", url, keep=2, compression="none") as store:
        for step, state in states.items():
            store.save(step, state)
            if step == 1:
                store.tag("keep-me")
            store.wait()  # each step goes up before local retention could delete it
        assert store.steps() == [1, 3, 4]
        with castore.Store(url, readonly=True) as remote:
            assert remote.steps() == [1, 3, 4]
            assert remote.tags() == {"keep-me": 1}
        before = total_bytes(s3_admin, bucket)
        plan = store.mirror_gc()
        after = total_bytes(s3_admin, bucket)
    assert plan.steps == 3 and plan.delete and not plan.repack
    assert before - after >= 2 * 20 * CHUNK  # the packs of steps 0 and 2
    assert after >= 3 * 20 * CHUNK  # what is kept stays
    with castore.Store(url, readonly=True) as remote:  # a fresh index
        for step in (1, 3, 4):
            assert_state_equal(remote.load(step), states[step])
        assert remote.verify().ok


def test_gc_repacks_a_mostly_garbage_pack_and_its_live_values_stay_loadable(tmp_path, url, s3_admin, bucket):
    rng = np.random.default_rng(6)
    kept = random_bytes(rng, CHUNK)
    old = {"big": random_bytes(rng, 12 * CHUNK), "kept": kept}  # one pack: 12 garbage chunks + 1 live
    new = {"big": random_bytes(rng, 12 * CHUNK), "kept": kept}
    with mirrored(tmp_path / "local", url, keep=1, compression="none") as store:
        store.save(0, old)
        store.wait()
        (old_pack,) = {k.rpartition("/")[2] for k in bucket_objects(s3_admin, bucket) if k.startswith("packs/")}
        store.save(1, new)
        store.wait()
        assert store.mirror.results[-1].value_bytes == 12 * CHUNK  # 'kept' was in the bucket already
        plan = store.mirror_gc()
    assert plan.repack == [old_pack] and plan.moved_bytes == CHUNK
    packs = {k.rpartition("/")[2] for k in bucket_objects(s3_admin, bucket) if k.startswith("packs/")}
    assert old_pack not in packs and len(packs) == 2  # step 1's pack and the repacked one
    with castore.Store(url, readonly=True) as remote:
        assert remote.steps() == [1]
        assert_state_equal(remote.load(1), new)
        assert remote.verify().ok


# -- 5. rollback -----------------------------------------------------------------------------------


def test_a_rollback_makes_the_bucket_show_the_local_lineage(tmp_path, url):
    rng = np.random.default_rng(7)
    cp = castore.Checkpoint(tmp_path / "local", mirror=url, mirror_options=OPTIONS, chunk_bytes=CHUNK)
    old = {}
    for step in range(5):
        cp.w = random_bytes(rng, 3 * CHUNK)
        old[step] = cp.w.copy()
        cp.save()
    cp.store.wait()
    assert cp.load(step=2) == 2
    cp.w = random_bytes(rng, 3 * CHUNK)
    assert cp.save().step == 3  # the new future of step 2
    expected = cp.w.copy()
    cp.store.wait()
    assert cp.steps() == [0, 1, 2, 3]
    with castore.Store(url, readonly=True) as remote:
        assert remote.steps() == [0, 1, 2, 3]  # the old 3 and 4 left the bucket's main
        assert_state_equal(remote.load(3)["w"], expected)
        # ... for the branch the local store moved them to: nothing is deleted
        assert remote.steps(branch="main-abandoned-2") == [3, 4] == cp.store.steps(branch="main-abandoned-2")
        for step in (3, 4):
            assert_state_equal(remote.load(step, branch="main-abandoned-2")["w"], old[step])
        assert remote.verify().ok
    cp.close()


def test_after_a_rollback_the_bucket_keeps_by_the_new_steps_metrics(tmp_path, url):
    keep = castore.Keep(best=1, metric="score")
    with mirrored(tmp_path / "local", url, keep=keep) as store:
        for step, score in enumerate([1.0, 2.0, 100.0, 5.0]):
            store.save(step, {"step": step}, metrics={"score": score})
            if step == 1:
                store.tag("base")
            store.wait()
        assert store.steps() == [1, 2, 3]  # tagged, best, latest
        store.rollback(1)
        for step, score in [(2, 0.0), (3, 1.0)]:  # a new step 2, worse than the old one
            store.save(step, {"step": step, "again": True}, metrics={"score": score})
            store.wait()
        assert store.steps() == [1, 3]
        with castore.Store(url, readonly=True) as remote:
            assert remote.steps() == [1, 3]
            assert remote.metrics(3) == {"score": 1.0}


# -- 6. locks --------------------------------------------------------------------------------------


def other_party(url) -> Bucket:
    """The bucket as another process sees it."""
    return Bucket(open_object_store(url), create=False)


def test_an_upload_lock_keeps_bucket_gc_out_and_then_lets_it_in(tmp_path, url, s3_admin, bucket):
    rng = np.random.default_rng(8)
    with mirrored(tmp_path / "local", url, keep=1) as store:
        for step in range(3):
            store.save(step, {"w": random_bytes(rng, 4 * CHUNK)})
            store.wait()  # uploaded before retention deletes it: steps 0 and 1 become garbage
        other = other_party(url)
        held = other.take_lock("upload", 60.0)
        before = bucket_objects(s3_admin, bucket)
        with pytest.raises(BucketBusyError) as info:
            store.mirror_gc()
        assert info.value.holder == held.lock.owner
        assert bucket_objects(s3_admin, bucket) == before  # nothing deleted (its own lock withdrawn)
        held.release()
        other.close()
        plan = store.mirror_gc()  # our own uploader is idle: it holds no lock now
        assert len(plan.delete) == 2
    assert not any(k.startswith("locks/") for k in bucket_objects(s3_admin, bucket))


def test_a_gc_lock_makes_uploads_wait_then_fail_once_and_retry(tmp_path, url):
    options = MirrorOptions(pack_bytes=1 << 20, gc_after=0, lock_wait=0.3)
    state = {"w": random_bytes(np.random.default_rng(9), 3 * CHUNK)}
    with mirrored(tmp_path / "local", url, options=options) as store:
        other = other_party(url)
        held = other.take_lock("gc", 60.0)
        store.save(0, state)  # commits locally; the upload waits for the lock
        with pytest.raises(MirrorError) as info:
            store.wait()
        assert isinstance(info.value.__cause__, BucketBusyError)
        assert store.steps() == [0] and store.mirror.pending() == 1
        store.mirror.raise_failed()  # raised once: nothing more to raise
        with castore.Store(url, readonly=True) as remote:
            assert remote.steps() == []
        held.release()
        other.close()
        store.wait()  # retries the queued step
        assert store.mirror.pending() == 0
    with castore.Store(url, readonly=True) as remote:
        assert_state_equal(remote.load(0), state)


def test_a_stale_lock_blocks_nobody_and_gc_removes_it(tmp_path, url, s3_admin, bucket):
    state = {"w": random_bytes(np.random.default_rng(10), 2 * CHUNK)}
    options = MirrorOptions(pack_bytes=1 << 20, gc_after=0, lock_wait=0.0)
    with mirrored(tmp_path / "local", url, options=options) as store:
        other = other_party(url)
        stale_gc = other.take_lock("gc", 0.001)
        stale_upload = other.take_lock("upload", 0.001)
        while time.time() <= max(stale_gc.lock.expires, stale_upload.lock.expires):
            time.sleep(0.01)
        store.save(0, state)
        store.wait()  # a stale gc lock does not hold the upload (lock_wait=0 would fail at once)
        locks = {k for k in bucket_objects(s3_admin, bucket) if k.startswith("locks/")}
        assert locks == {stale_gc.key, stale_upload.key}  # the uploader's own lock is released when idle
        store.mirror_gc()  # a stale upload lock does not hold GC
        other.close()
    assert not any(k.startswith("locks/") for k in bucket_objects(s3_admin, bucket))
    with castore.Store(url, readonly=True) as remote:
        assert_state_equal(remote.load(0), state)


# -- 7. errors are raised once, after the local commit ----------------------------------------------


def test_an_outage_fails_the_upload_once_and_the_step_goes_up_after(tmp_path, url, s3_server):
    rng = np.random.default_rng(11)
    options = MirrorOptions(pack_bytes=1 << 20, gc_after=0, retry=FAST)
    states = [{"w": random_bytes(rng, 3 * CHUNK)} for _ in range(3)]
    with mirrored(tmp_path / "local", url, options=options) as store:
        store.save(0, states[0])
        store.wait()
        s3_server.stop_gateway()
        try:
            store.save(1, states[1])  # commits locally, returns
            assert store.steps() == [0, 1]
            with pytest.raises(MirrorError) as info:
                store.wait()
            assert isinstance(info.value.__cause__, RemoteUnavailableError)
            assert s3_server.secret_key not in str(info.value)
            store.mirror.raise_failed()  # once: it was seen
            assert store.mirror.pending() == 1
            with pytest.raises(MirrorError):
                store.wait()  # a retry, failed again
        finally:
            s3_server.start_gateway()
        store.save(2, states[2])  # nothing unseen to raise; uploads 1, then 2
        store.wait()
        assert store.mirror.pending() == 0
        assert [r.key for r in store.mirror.results] == [step_key(s, "main") for s in (0, 1, 2)]
    with castore.Store(url, readonly=True) as remote:
        assert remote.steps() == [0, 1, 2]
        assert_state_equal(remote.load(1), states[1])
        assert_state_equal(remote.load(2), states[2])

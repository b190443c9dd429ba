"""The mirror's protocol under races, against the real RADOS Gateway: bucket GC and uploads
(locks, the GC epoch, roots re-read before deleting), overwrites while an upload runs, a
stale host, and a resume that finds the bucket's record of a step differing from the store's.

Each race is staged, not hoped for: a put is held at a chosen point (an event), or a lock is
given a lifetime short enough to go stale; the only sleeps wait out such a lifetime.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from workload import assert_state_equal

import castore
from castore.errors import BucketBusyError, LockLostError, MirrorError
from castore.format import bucket as layout
from castore.format.keys import step_key
from castore.mirror import MirrorOptions, bucket_gc
from castore.storage.bucket import Bucket
from castore.storage.objects import open_object_store

CHUNK = 64 << 10
OPTIONS = MirrorOptions(pack_bytes=1 << 20, gc_after=0)


@pytest.fixture
def url(s3_server, bucket, monkeypatch):
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return f"s3://{bucket}/run"


@pytest.fixture
def objects(url):
    bucket = Bucket(open_object_store(url), create=True)
    yield bucket
    bucket.close()


def data(seed: int, nbytes: int = 4 * CHUNK) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def wait_past(ttl: float) -> None:
    time.sleep(ttl + 0.2)  # a lock's lifetime, the one thing these tests wait out


def test_a_lock_removed_as_stale_is_never_written_again(objects):
    upload = objects.take_lock("upload", 0.5)
    wait_past(0.5)
    gc = objects.take_lock("gc", 60)
    assert objects.delete_stale_locks(keep=gc.key) == [upload.key]
    with pytest.raises(LockLostError):
        upload.refresh()  # an uploader waking up: it must not bring its lock back
    assert [name for name, _ in objects.locks()] == [gc.key]
    gc.release()


def test_a_gc_whose_lock_went_stale_while_planning_deletes_nothing(tmp_path, url, objects):
    with castore.Store(tmp_path / "s", chunk_bytes=CHUNK, mirror=url, mirror_options=OPTIONS) as store:
        store.save(1, {"x": data(1)})
        store.wait()
    objects.delete_steps([step_key(1)])  # its packs are garbage now
    before = dict(objects.objects.list(""))
    lock = objects.take_lock("gc", 0.5)
    plan = bucket_gc.plan(objects, lock=lock)
    assert plan.delete
    wait_past(0.5)  # an uploader would take this lock for stale now
    with pytest.raises(LockLostError):
        bucket_gc.execute(objects, plan, lock=lock)
    after = {k: v for k, v in objects.objects.list("") if not k.startswith(layout.LOCKS + "/")}
    assert after == before  # nothing deleted, no epoch written


def test_a_step_saved_while_gc_planned_stops_the_gc(tmp_path, url, objects):
    """The plan saw step 1 garbage; step 2 (the same bytes: deduplicated against its pack)
    became visible before the GC's first delete: the GC re-reads its roots and stops."""
    with castore.Store(tmp_path / "s", chunk_bytes=CHUNK, mirror=url, mirror_options=OPTIONS) as store:
        store.save(1, {"x": data(1)})
        store.wait()
        objects.delete_steps([step_key(1)])
        lock = objects.take_lock("gc", 60)
        plan = bucket_gc.plan(objects, lock=lock)
        assert plan.delete
        lock.release()  # (a GC whose lock went stale) the upload goes ahead
        store.save(2, {"x": data(1)})
        store.wait()
        assert store.mirror.results[-1].values == 0  # every value was in the bucket: the doomed pack
        lock = objects.take_lock("gc", 60)
        with pytest.raises(BucketBusyError, match="saved or changed while this GC planned"):
            bucket_gc.execute(objects, plan, lock=lock)
        lock.release()
    with castore.Store(url, readonly=True) as remote:
        assert_state_equal(remote.load(2)["x"], data(1))
        assert remote.verify().ok


def test_an_upload_that_a_gc_overtook_uploads_again_and_the_step_loads(tmp_path, url, objects):
    """The uploader counted on a pack (deduplication), then stalled past its lock's lifetime;
    a GC took the lock for stale, and deleted the pack.  Before its step record the uploader
    finds the GC epoch changed: nothing is made visible, it takes a new lock, uploads what is
    missing, and the step loads."""
    options = MirrorOptions(pack_bytes=1 << 20, gc_after=0, lock_ttl=1.0)
    with castore.Store(tmp_path / "s", chunk_bytes=CHUNK, mirror=url, mirror_options=options) as store:
        store.save(1, {"x": data(1)})
        store.wait()
        objects.delete_steps([step_key(1)])  # garbage, and what step 2 will deduplicate against
        held, go = threading.Event(), threading.Event()
        mine = store.mirror.bucket.objects
        put, puts = mine.put, []

        def gated(key, value):
            if key.startswith(layout.LOCKS + "/upload"):
                puts.append(key)
                if len(puts) == 2:  # the refresh before the step record
                    held.set()
                    assert go.wait(60)
            return put(key, value)

        mine.put = gated
        store.save(2, {"x": data(1)})
        assert held.wait(60)
        wait_past(1.0)
        gc_plan = bucket_gc.collect(objects)  # takes the uploader's lock for stale, deletes the pack
        assert gc_plan.delete
        go.set()
        store.wait()  # no error: the upload was redone under a new lock
        assert store.mirror.results[-1].values > 0  # the values went up again
    with castore.Store(url, readonly=True) as remote:
        assert remote.steps() == [2]
        assert_state_equal(remote.load(2)["x"], data(1))
        assert remote.verify().ok


def test_an_overwrite_while_its_step_uploads_reaches_the_bucket(tmp_path, url):
    options = MirrorOptions(pack_bytes=1 << 20, gc_after=0, max_rate=2 << 20)  # slow: the overwrite lands mid-upload
    with castore.Store(tmp_path / "s", chunk_bytes=CHUNK, mirror=url, mirror_options=options) as store:
        store.save(1, {"x": data(1, 3 << 20)})
        store.save(1, {"x": data(2, 3 << 20)}, overwrite=True)
        store.wait()
        want = store.load(1)["x"]
    with castore.Store(url, readonly=True) as remote:
        assert_state_equal(remote.load(1)["x"], want)
        assert_state_equal(want, data(2, 3 << 20))


def test_a_stale_host_does_not_touch_steps_another_saved(tmp_path, url, objects):
    with castore.Store(tmp_path / "b", chunk_bytes=CHUNK, mirror=url, mirror_options=OPTIONS) as b:
        for step in (1, 2):
            b.save(step, {"x": data(step)})
    with castore.Store(tmp_path / "a", chunk_bytes=CHUNK, mirror=url, mirror_options=OPTIONS) as a:
        a.pull(2)
        for step in (3, 4, 5):
            a.save(step, {"x": data(step)})
    before = {k: objects.get_step(k).manifest for k in objects.step_keys()}
    with castore.Store(tmp_path / "b", chunk_bytes=CHUNK, mirror=url, mirror_options=OPTIONS) as b:
        b.save(3, {"x": data(30)})  # host B, behind: the bucket's 3-5 are A's
        with pytest.raises(MirrorError, match="does not have"):
            b.wait()
        assert b.mirror.pending() == 1
        b.mirror.close(upload=False)  # it would only fail again
    after = {k: objects.get_step(k).manifest for k in objects.step_keys()}
    assert after == before  # nothing changed in the bucket


def test_a_step_rewritten_while_no_mirror_ran_goes_up_at_the_next_open(tmp_path, url):
    path = tmp_path / "s"
    with castore.Store(path, chunk_bytes=CHUNK, mirror=url, mirror_options=OPTIONS) as store:
        for step in (1, 2, 3):
            store.save(step, {"x": data(step)})
    with castore.Store(path, chunk_bytes=CHUNK) as store:  # no mirror: a rollback to 1, a new 2
        store.continue_from(1)
        store.save(2, {"x": data(20)})
    with castore.Store(path, chunk_bytes=CHUNK, mirror=url, mirror_options=OPTIONS) as store:
        assert store.mirror.pending() == 1  # the bucket's step 2 is not the store's any more
        store.wait()
    with castore.Store(url, readonly=True) as remote:
        assert remote.steps() == [1, 2]
        assert_state_equal(remote.load(2)["x"], data(20))
        assert remote.steps(branch="main-abandoned-1") == [3]  # moved, as in the store
        assert_state_equal(remote.load(3, branch="main-abandoned-1")["x"], data(3))

"""Many hosts, one step (castore/mirror/multihost.py): ranks in real processes against the real
gateway of ``s3_server`` commit steps together through put_if_absent.

Every wait is bounded and event-driven (a rank says what it did on its stdout; the test waits
for that line), so a loaded machine makes the tests slower, not flaky.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgpack
import numpy as np
import pytest

import castore
from castore.errors import CorruptDataError
from castore.format import bucket as layout
from castore.format.bucket import PartObject
from castore.format.keys import step_key
from castore.format.manifest import decode_manifest
from castore.format.schema import Table
from castore.format.sealing import seal
from castore.format.stepinfo import decode_stepinfo
from castore.mirror import MirrorOptions, bucket_gc
from castore.mirror.multihost import COMMITTED, JOINED, PRESENT, WAITING, merge_parts
from castore.storage.bucket import Bucket
from castore.storage.objects import open_object_store

sys.path.insert(0, str(Path(__file__).parent))
from multihost_worker import digest, expected, tree

WORKER = Path(__file__).parent / "multihost_worker.py"
ROOT = Path(__file__).resolve().parent.parent
WORLD = 3
#: seconds any one rank may take; far above what a loaded 2-core machine needs
DEADLINE = 120.0


@pytest.fixture
def env(s3_server, monkeypatch):
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return {**os.environ, **s3_server.env, "PYTHONPATH": str(ROOT)}


@pytest.fixture
def url(env, bucket):
    """``s3://<fresh bucket>/run``, with the AWS_* variables pointing at the test gateway."""
    return f"s3://{bucket}/run"


def rank_stores(tmp_path: Path, url: str) -> list[castore.Store]:
    """The local stores of WORLD ranks of one attempt in this process, mirroring to ``url``."""
    options = [MirrorOptions(rank=r, world=WORLD, attempt="a", gc_after=0) for r in range(WORLD)]
    return [castore.Store(tmp_path / f"r{r}", mirror=url, mirror_options=options[r]) for r in range(WORLD)]


class Rank:
    """One worker process and the events it printed."""

    def __init__(self, env, tmp_path: Path, url: str, rank: int, **config):
        config = {"rank": rank, "world": WORLD, "url": url, "dir": str(tmp_path / f"rank{rank}"), **config}
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), json.dumps(config)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events: list[dict] = []

    def until(self, event: str) -> dict:
        """Read events up to the first ``event`` (the process must print it)."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.append(json.loads(line))
            if self.events[-1]["event"] == event:
                return self.events[-1]
        raise AssertionError(f"the rank exited without {event!r}: {self.finish(check=False)}")

    def finish(self, check: bool = True) -> list[dict]:
        out, err = self.proc.communicate(timeout=DEADLINE)
        self.events += [json.loads(line) for line in out.splitlines() if line.strip()]
        if check:
            assert self.proc.returncode == 0, err
        return self.events

    def of(self, event: str) -> dict[int, dict]:
        return {e["step"]: e for e in self.events if e["event"] == event}


def run_all(ranks: list[Rank]) -> list[list[dict]]:
    return [r.finish() for r in ranks]


def part_names(bucket: Bucket) -> list[str]:
    return [name for name, _ in bucket.objects.list(layout.PARTS)]


def test_ranks_commit_together_a_dead_rank_leaves_no_step_and_a_restart_mixes_no_stale_part(env, tmp_path, bucket):
    url = f"s3://{bucket}/run"
    # -- attempt a: steps 1..3 by every rank, then rank 1 dies before its part of step 4
    ranks = [
        Rank(
            env,
            tmp_path,
            url,
            r,
            attempt="a",
            steps=[1, 2, 3, 4],
            salt=0,
            timeout_at=4,
            timeout=3,
            hang_at=4 if r == 1 else None,
        )
        for r in range(WORLD)
    ]
    ranks[1].until("hanging")
    run_all([ranks[0], ranks[2]])
    ranks[1].proc.send_signal(signal.SIGKILL)
    ranks[1].finish(check=False)
    for rank in (ranks[0], ranks[2]):
        loaded = rank.of("loaded")
        assert sorted(loaded) == [1, 2, 3]  # step 4 is invisible
        for step in (1, 2, 3):  # every rank sees the same merged step, each rank's shard in it
            assert loaded[step]["digest"] == expected(WORLD, step, 0)
            assert loaded[step]["metrics"] == {"loss": 1.0 / step, "rank0": 0.0, "rank1": 1.0, "rank2": 2.0}
        assert rank.of("timeout")[4]["missing"] == [1]
        assert "ranks [1]" in rank.of("timeout")[4]["message"]
    outcomes = [r.of("uploaded")[s]["outcome"] for r in ranks for s in (1, 2, 3)]
    assert outcomes.count(COMMITTED) == 3 and set(outcomes) <= {COMMITTED, JOINED, WAITING, "present"}
    with castore.Store(url, readonly=True) as reader:
        assert reader.steps() == [1, 2, 3]
        assert digest(reader.load(3)) == expected(WORLD, 3, 0)
    objects = Bucket(open_object_store(url), create=False)
    try:
        key4 = step_key(4, "main").hex()
        assert part_names(objects) == [f"parts/{key4}/000000", f"parts/{key4}/000002"]  # committed parts went

        # -- attempt b: rank 1 comes back first; the stale parts of ranks 0 and 2 must not join its own
        first = Rank(env, tmp_path, url, 1, attempt="b", steps=[4], salt=1, resume=True)
        assert first.until("resume")["step"] == 3
        assert first.until("uploaded")["outcome"] == WAITING
        assert objects.get_step(step_key(4, "main")) is None
        late = [Rank(env, tmp_path, url, r, attempt="b", steps=[4], salt=1, resume=True) for r in (0, 2)]
        for rank in [first, *late]:
            rank.finish()
            assert rank.of("loaded")[4]["digest"] == expected(WORLD, 4, 1)  # all of attempt b
        assert part_names(objects) == []
        # the killed rank's lock would keep GC out until its ttl: an operator removes it
        dead = [name for name, _ in objects.locks() if f"-{ranks[1].proc.pid}-" in name]
        assert len(dead) == 1
        objects.objects.delete(dead)
        # GC keeps every committed step whole, and the killed rank's packs go
        gc = bucket_gc.collect(objects)
        assert gc.steps == 4 and gc.parts == 0
    finally:
        objects.close()
    with castore.Store(url, readonly=True) as reader:
        assert reader.steps() == [1, 2, 3, 4] and reader.verify().ok
        assert digest(reader.load(4)) == expected(WORLD, 4, 1)


def test_ranks_finishing_at_once_write_one_step_record(env, tmp_path, bucket):
    url = f"s3://{bucket}/run"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    ranks = [Rank(env, tmp_path, url, r, attempt="a", steps=[1], salt=0, barrier=str(barrier)) for r in range(WORLD)]
    deadline = time.monotonic() + DEADLINE
    while len(list(barrier.glob("arrived-*"))) < WORLD:  # every part written, none listed yet
        assert time.monotonic() < deadline and all(r.proc.poll() is None for r in ranks)
        time.sleep(0.02)
    (barrier / "go").touch()
    for rank in ranks:
        rank.finish()
    outcomes = sorted(r.of("uploaded")[1]["outcome"] for r in ranks)
    # one put_if_absent won; each other rank found the same record (JOINED), or listed the parts
    # only after the winner had deleted them and found the record there (PRESENT)
    assert outcomes.count(COMMITTED) == 1 and set(outcomes) <= {COMMITTED, JOINED, PRESENT}, outcomes
    objects = open_object_store(url)
    assert [name for name, _ in objects.list(layout.STEPS)] == [layout.step_object(step_key(1, "main"))]
    assert {r.of("loaded")[1]["digest"] for r in ranks} == {expected(WORLD, 1, 0)}


def test_a_component_name_collision_names_the_ranks_and_the_names(url, tmp_path):
    stores = [
        castore.Store(tmp_path / f"r{r}", mirror=url, mirror_options=MirrorOptions(rank=r, world=WORLD, attempt="a"))
        for r in range(WORLD)
    ]
    try:
        for r, store in enumerate(stores):
            store.save(1, {"agent": np.full(10, r), f"replay/rank{r}": np.arange(r + 1)})
            if r < WORLD - 1:
                store.wait()  # in rank order: rank 2's part is the last (uploads run in background)
        with pytest.raises(castore.ComponentCollisionError) as caught:
            stores[2].wait()  # the last part: the rank that would commit
        assert caught.value.collisions == {"agent": [0, 1, 2]} and caught.value.step == 1
        assert "'agent' by ranks 0, 1, 2" in str(caught.value) and "agent/shard0" in str(caught.value)
        with pytest.raises(castore.ComponentCollisionError):  # an earlier rank learns it while waiting
            stores[0].mirror.wait_committed(1, timeout=30)
        with castore.Store(url, readonly=True) as reader:
            assert reader.steps() == []
        with pytest.raises(castore.ComponentCollisionError):  # close uploads what is queued: again
            stores[2].close()
    finally:
        for store in stores:
            with contextlib.suppress(castore.ComponentCollisionError):
                store.close()


def test_a_waiting_rank_commits_a_step_whose_last_rank_died_after_its_part(url, tmp_path, monkeypatch):
    """The last rank writes its part and dies before the step record (one request): a rank
    waiting for the step finds every part and commits it itself."""
    stores = rank_stores(tmp_path, url)
    try:
        for r in (0, 1):
            stores[r].save(1, tree(r, 1, 0))
            stores[r].wait()
        last = stores[2].mirror.parts
        monkeypatch.setattr(last, "try_commit", lambda key: "waiting")  # dies right after its part
        stores[2].save(1, tree(2, 1, 0))
        stores[2].wait()
        assert len(part_names(stores[0].mirror.bucket)) == WORLD
        with castore.Store(url, readonly=True) as reader:
            assert reader.steps() == []  # every part, no record: not visible
        stores[0].mirror.wait_committed(1, timeout=60)
        with castore.Store(url, readonly=True) as reader:
            assert reader.steps() == [1] and digest(reader.load(1)) == expected(WORLD, 1, 0)
        assert part_names(stores[0].mirror.bucket) == []  # the committer removed them
    finally:
        for store in stores:
            store.close()


def test_a_checkpoint_rank_resumes_from_the_latest_committed_step(url, tmp_path):
    """load_or_save on a rank resumes where every rank committed: not at its own later step
    (which never committed), and on a fresh machine by pulling that step."""

    def rank_checkpoint(path, rank: int, attempt: str) -> castore.Checkpoint:
        options = MirrorOptions(rank=rank, world=2, attempt=attempt, gc_after=0)
        return castore.Checkpoint(path, mirror=url, mirror_options=options)

    ranks = [rank_checkpoint(tmp_path / f"r{r}", r, "a") for r in range(2)]
    for step in (1, 2):
        for r, cp in enumerate(ranks):
            for name, value in tree(r, step, 0).items():
                setattr(cp, name.replace("/", "_"), value)
            cp.save(step=step)
        for cp in ranks:
            cp.store.mirror.wait_committed(step, timeout=60)
    ranks[0].shard = np.full(3, 99)
    ranks[0].save(step=3)  # rank 1 never saves 3: it does not commit
    ranks[0].wait()
    for cp in ranks:
        cp.close()
    with castore.Store(url, readonly=True) as reader:
        assert reader.steps() == [1, 2]

    again = rank_checkpoint(tmp_path / "r0", 0, "b")
    for name, value in tree(0, 0, 1).items():
        setattr(again, name.replace("/", "_"), value)
    assert again.load_or_save() == 2  # not its own step 3
    np.testing.assert_array_equal(again.agent_shard0["w"], tree(0, 2, 0)["agent/shard0"]["w"])
    again.close()

    fresh = rank_checkpoint(tmp_path / "fresh1", 1, "b")
    for name, value in tree(1, 0, 1).items():
        setattr(fresh, name.replace("/", "_"), value)
    assert fresh.load_or_save() == 2  # pulled from the bucket
    np.testing.assert_array_equal(fresh.replay_rank1, tree(1, 2, 0)["replay/rank1"])
    fresh.close()


def test_bucket_gc_keeps_what_pending_parts_name_and_drops_old_ones(url, tmp_path):
    stores = rank_stores(tmp_path, url)
    try:
        for r in (0, 1):
            stores[r].save(1, tree(r, 1, 0))
            stores[r].wait()
        plan = stores[0].mirror_gc()
        assert plan.parts == 2 and plan.delete == [] and plan.doomed_parts == []
        stores[2].save(1, tree(2, 1, 0))
        stores[2].mirror.wait_committed(1, timeout=30)
        with castore.Store(url, readonly=True) as reader:
            assert digest(reader.load(1)) == expected(WORLD, 1, 0)
        # rank 2's part of step 2 waits for ranks that never come: collected after the grace period
        stores[2].save(2, tree(2, 2, 0))
        stores[2].wait()
        objects = Bucket(open_object_store(url), create=False)
        try:
            assert bucket_gc.plan(objects).parts == 1
            plan = bucket_gc.collect(objects, part_grace=0.0)
            assert plan.doomed_parts == [layout.part_object(step_key(2, "main"), 2)] and plan.delete
            assert part_names(objects) == []
        finally:
            objects.close()
        with castore.Store(url, readonly=True) as reader:
            assert reader.steps() == [1] and reader.verify().ok
    finally:
        for store in stores:
            store.close()


# -- pure: part records and the merge -------------------------------------------------------------


def part(rank: int, components: dict, *, step: int = 7, metrics=None, attempt: str = "a") -> PartObject:
    store = castore.Store(f"memory://part-{uuid.uuid4().hex}")
    try:
        store.save(step, components, metrics=metrics)
        with store.backend.read() as txn:
            key = step_key(step, "main")
            return PartObject(
                key, rank, WORLD, attempt, 1.0, bytes(txn.get(Table.STEPS, key)), bytes(txn.get(Table.STEPINFO, key))
            )
    finally:
        store.close()


def test_a_part_record_round_trips_and_damage_is_corrupt_data():
    p = part(1, {"x": np.arange(3)})
    raw = layout.encode_part(p)
    assert layout.decode_part(raw, p.key, 1, "p") == p
    with pytest.raises(CorruptDataError):
        layout.decode_part(raw, p.key, 2, "p")  # another rank's name
    with pytest.raises(CorruptDataError):
        layout.decode_part(raw[:-1] + bytes([raw[-1] ^ 1]), p.key, 1, "p")
    for field, value in [("world", 1), ("world", True), ("attempt", ""), ("written", float("nan")), ("manifest", "x")]:
        record = {
            "format": layout.BUCKET_FORMAT,
            "key": p.key,
            "rank": 1,
            "world": WORLD,
            "attempt": "a",
            "written": 1.0,
            "manifest": p.manifest,
            "stepinfo": p.stepinfo,
            field: value,
        }
        with pytest.raises(CorruptDataError):
            layout.decode_part(seal(msgpack.packb(record, use_bin_type=True)), p.key, 1, "p")
    assert layout.part_of(layout.part_object(p.key, 12)) == (p.key, 12)
    for bad in ("parts/zz/000001", f"parts/{p.key.hex()}/1", f"parts/{p.key.hex()}/00000x"):
        with pytest.raises(CorruptDataError):
            layout.part_of(bad)


def test_the_merge_is_deterministic_in_rank_order():
    parts = [part(r, {f"shard{r}": np.full(5, r)}, metrics={"loss": float(r), f"r{r}": 1.0}) for r in range(WORLD)]
    manifest, stepinfo = merge_parts(parts[0].key, parts)
    assert merge_parts(parts[0].key, parts[::-1]) == (manifest, stepinfo)
    merged = decode_manifest(manifest)
    assert merged.names == ["shard0", "shard1", "shard2"] and merged.step == 7
    assert merged.logical_bytes == sum(decode_manifest(p.manifest).logical_bytes for p in parts)
    assert decode_stepinfo(stepinfo, "s").metrics == {"loss": 0.0, "r0": 1.0, "r1": 1.0, "r2": 1.0}
    with pytest.raises(castore.UsageError, match="attempt="):
        MirrorOptions(rank=0, world=2)
    with pytest.raises(castore.UsageError, match="rank"):
        MirrorOptions(rank=2, world=2, attempt="a")

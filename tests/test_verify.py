"""verify(): real damage to real store files (flipped bytes, deleted chunks, truncation).

Each test builds a store, closes it, damages ``data.mdb`` the way a disk or a careless
tool would, and checks that ``Store.verify()`` and ``castore verify`` report exactly the
affected steps, components, leaves and chunks, that loading an affected step raises a
typed integrity error naming them, and that the unaffected steps still load bit-exact.
"""

from __future__ import annotations

import os
import subprocess
import sys

import lmdb
import numpy as np
import pytest

import castore
from castore import Store
from castore.format.ids import chunk_id
from castore.format.manifest import PAGE_IDS
from castore.format.schema import Table
from castore.tools import cli

CHUNK = 4096
STEPS = (1, 2, 3, 4)


def agent(step: int) -> np.ndarray:
    return np.random.default_rng(step).integers(0, 256, 3 * CHUNK, dtype=np.uint8)  # 3 chunks, own per step


SHARED = np.random.default_rng(99).integers(0, 256, 75 * CHUNK, dtype=np.uint8)  # 75 chunks: a paged blob


def state(step: int) -> dict:
    return {"agent": {"w": agent(step)}, "replay": {"obs": SHARED}, "meta": {"step": step}}


@pytest.fixture()
def store_path(tmp_path):
    path = tmp_path / "store"
    with Store(path, chunk_bytes=CHUNK) as store:
        for step in STEPS:
            store.save(step, state(step), metrics={"return": float(step)})
        store.tag("best", 2)
    return path


def flip_all(path, needle: bytes, offset: int = 10) -> int:
    """Flip one byte of every copy of ``needle`` in the used part of data.mdb; returns copies."""
    data_file = os.path.join(path, "data.mdb")
    with open(data_file, "rb") as f:
        data = f.read(used_bytes(path))
    found, start = 0, data.find(needle)
    while start >= 0:
        at = start + offset
        os.pwrite(os.open(data_file, os.O_RDWR), bytes([data[at] ^ 0x40]), at)
        found += 1
        start = data.find(needle, start + 1)
    assert found, "the bytes to damage are not in the file"
    return found


def used_bytes(path) -> int:
    env = lmdb.open(str(path), readonly=True, lock=False, subdir=True, max_dbs=16)
    try:
        return (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    finally:
        env.close()


def verify_cli(path, *args, capfd) -> tuple[int, str]:
    """``castore verify`` as the shell runs it (the scan runs in a child process)."""
    code = cli.main(["verify", str(path), *args])
    return code, capfd.readouterr().out


def assert_loads(store: Store, steps) -> None:
    for step in steps:
        loaded = store.load(step, verify=True)
        assert np.array_equal(loaded["agent"]["w"], agent(step))
        assert np.array_equal(loaded["replay"]["obs"], SHARED)


def test_a_sound_store_verifies_clean(store_path, capfd):
    with Store(store_path) as store:
        report = store.verify()
    assert report.ok and report.problems == ()
    assert report.steps == 4
    assert report.chunks == 4 * 3 + 75 + 0  # each agent's 3 chunks, the shared 75
    assert report.hashed_chunks == report.chunks and report.hashed_bytes == 4 * 3 * CHUNK + 75 * CHUNK
    code, out = verify_cli(store_path, capfd=capfd)
    assert code == 0 and "no problems found" in out


def test_a_flipped_chunk_is_reported_for_its_step_only(store_path, capfd):
    flip_all(store_path, agent(3)[CHUNK : CHUNK + 64].tobytes())
    with Store(store_path) as store:
        report = store.verify()
        assert report.affected_steps == [("main", 3)]
        (problem,) = report.problems
        assert (problem.kind, problem.step, problem.component, problem.path) == ("chunk-corrupt", 3, "agent", "w")
        assert problem.chunk == chunk_id(agent(3)[CHUNK : 2 * CHUNK]).hex()
        with pytest.raises(castore.ChunkCorruptError) as caught:
            store.load(3)
        assert caught.value.step == 3 and caught.value.component == "agent" and caught.value.path == "w"
        assert problem.chunk in str(caught.value)
        assert_loads(store, [1, 2, 4])
    code, out = verify_cli(store_path, capfd=capfd)
    assert code == 1 and "step 3" in out and problem.chunk in out and "1 steps affected" in out


def test_a_flipped_shared_chunk_is_reported_for_every_step(store_path):
    flip_all(store_path, SHARED[40 * CHUNK : 40 * CHUNK + 64].tobytes())
    with Store(store_path) as store:
        report = store.verify()
        assert report.affected_steps == [("main", s) for s in STEPS]
        assert {(p.kind, p.component, p.path) for p in report.problems} == {("chunk-corrupt", "replay", "obs")}
        assert len(report.problems) == 4  # one per step: the chunk is checked once, reported per owner
        for step in STEPS:
            with pytest.raises(castore.ChunkCorruptError):
                store.load(step, keys="replay")
            assert np.array_equal(store.load(step, keys="agent")["agent"]["w"], agent(step))


def test_a_flipped_chunk_list_page_is_reported(store_path):
    ids = b"".join(chunk_id(SHARED[i * CHUNK : (i + 1) * CHUNK]) for i in range(75))
    assert 75 <= PAGE_IDS  # one page lists them all
    flip_all(store_path, ids[:64], offset=5)
    with Store(store_path) as store:
        report = store.verify()
        assert {p.kind for p in report.problems} == {"page-corrupt"}
        assert report.affected_steps == [("main", s) for s in STEPS]
        with pytest.raises(castore.IntegrityError, match="chunk-list page"):
            store.load(1)


def test_a_flipped_manifest_is_caught_by_its_checksum(store_path):
    with Store(store_path) as store:
        manifest = store.inspect().get(Table.STEPS, (4).to_bytes(8, "big"))
    flip_all(store_path, manifest[-60:], offset=30)  # a byte inside the msgpack body
    with Store(store_path) as store:
        report = store.verify()
        assert [(p.kind, p.step) for p in report.problems] == [("manifest", 4)]
        assert "checksum" in report.problems[0].detail
        with pytest.raises(castore.CorruptDataError, match="step 4.*checksum"):
            store.load(4)
        assert_loads(store, [1, 2, 3])


def test_deleted_chunks_are_reported_missing(store_path):
    env = lmdb.open(str(store_path), subdir=True, max_dbs=16)
    chunks = env.open_db(b"chunks", create=False)
    with env.begin(write=True) as txn:
        assert txn.delete(chunk_id(agent(2)[:CHUNK]), db=chunks)
        assert txn.delete(chunk_id(SHARED[:CHUNK]), db=chunks)
    env.close()
    with Store(store_path) as store:
        report = store.verify(sample=0.01)  # presence is checked whatever the sample
        kinds = {(p.kind, p.step, p.component) for p in report.problems}
        assert kinds == {("chunk-missing", 2, "agent")} | {("chunk-missing", s, "replay") for s in STEPS}
        with pytest.raises(castore.ChunkMissingError) as caught:
            store.load(2, keys="agent")
        assert caught.value.step == 2
        assert np.array_equal(store.load(3, keys="agent")["agent"]["w"], agent(3))


def test_a_flipped_metrics_record_and_a_dangling_tag_are_reported(store_path):
    env = lmdb.open(str(store_path), subdir=True, max_dbs=16)
    steps = env.open_db(b"steps", create=False)
    stepinfo = env.open_db(b"stepinfo", create=False)
    with env.begin(write=True) as txn:
        info = bytearray(txn.get((3).to_bytes(8, "big"), db=stepinfo))
        info[-2] ^= 1
        txn.put((3).to_bytes(8, "big"), bytes(info), db=stepinfo)
        txn.delete((2).to_bytes(8, "big"), db=steps)  # the tagged step vanishes
    env.close()
    with Store(store_path) as store:
        problems = {(p.kind, p.step) for p in store.verify().problems}
        assert problems == {("metrics", 3), ("tag", 2)}
        with pytest.raises(castore.CorruptDataError, match="checksum"):
            store.metrics(3)


def test_a_sample_hashes_about_that_part_and_different_seeds_cover_different_chunks(store_path):
    with Store(store_path) as store:
        full = store.verify().hashed_chunks
        parts = [store.verify(sample=0.25, seed=seed) for seed in range(8)]
    assert all(r.ok and r.sample == 0.25 and r.chunks == full for r in parts)
    counts = [r.hashed_chunks for r in parts]
    assert 0.1 * full < sum(counts) / len(counts) < 0.4 * full
    assert len(set(counts)) > 1
    with pytest.raises(castore.UsageError):
        Store(store_path).verify(sample=0)


def test_a_sampled_verify_finds_damage_when_it_hashes_it(store_path, capfd):
    flip_all(store_path, agent(1)[:64].tobytes())
    with Store(store_path) as store:
        found = [not store.verify(sample=0.05, seed=seed).ok for seed in range(60)]
    assert 0 < sum(found) < 60  # a 5% sample sees the one bad chunk only sometimes
    seed = found.index(True)
    code, out = verify_cli(store_path, "--sample", "5%", "--seed", str(seed), capfd=capfd)
    assert code == 1 and "5.0% sample" in out and "step 1" in out


def test_the_cli_reports_a_verify_killed_by_a_damaged_b_tree(store_path, capfd):
    """LMDB trusts node sizes: an inflated one kills the reader; the CLI's child takes the hit."""
    from test_fuzz import _leaf_nodes  # the fuzz tests' reader of LMDB's page layout

    page = lmdb.open(str(store_path), readonly=True, lock=False, max_dbs=16).stat()["psize"]
    with open(os.path.join(store_path, "data.mdb"), "rb") as f:
        image = f.read(used_bytes(store_path))
    # Every big chunk node the file holds, not the first: which copy of a leaf page is live
    # (LMDB copies a page on write and leaves the old one free) depends on the commit order.
    nodes = [n for n, flags, key, _ in _leaf_nodes(image, page) if flags & 0x01 and len(key) == 32]
    assert nodes
    os.truncate(os.path.join(store_path, "data.mdb"), len(image))  # as a compacted copy holds it
    fd = os.open(os.path.join(store_path, "data.mdb"), os.O_RDWR)
    for node in nodes:
        os.pwrite(fd, b"\x60", node + 3)
    os.close(fd)
    code = cli.main(["verify", str(store_path)])
    err = capfd.readouterr().err
    assert code == 1 and "killed the verifying process (SIG" in err, err


def test_a_truncated_store_is_refused_with_an_error_not_a_crash(store_path):
    os.truncate(os.path.join(store_path, "data.mdb"), used_bytes(store_path) // 2)
    for args in (["verify", str(store_path)], ["steps", str(store_path)]):
        child = subprocess.run([sys.executable, "-m", "castore", *args], capture_output=True, text=True, timeout=60)
        assert child.returncode == 1, f"{args[0]}: exit {child.returncode}: {child.stderr[-2000:]}"
        assert "truncated" in child.stderr


def test_damage_on_one_branch_names_that_branch(store_path):
    with Store(store_path, chunk_bytes=CHUNK) as store:
        store.fork("exp", 1)
    with Store(store_path, branch="exp") as exp:
        exp.save(2, {"agent": {"w": agent(50)}})
    flip_all(store_path, agent(50)[:64].tobytes())
    with Store(store_path) as store:
        report = store.verify()
    assert report.affected_steps == [("exp", 2)]
    assert "branch exp" in str(report.problems[0])


def test_a_damaged_counters_record_is_reported_and_the_next_save_recounts(tmp_path):
    with Store(tmp_path / "store") as store:
        store.save(0, {"w": np.arange(300_000)})
        store.backend.write(lambda txn: txn.put(Table.META, b"counters", b"\x01\x02\x03"))  # 3 bytes, not 16
        report = store.verify()
        assert [p.kind for p in report.problems] == ["store"] and "counters" in str(report.problems[0])
        with pytest.raises(castore.CorruptDataError, match="counters"):
            store.stats()
        store.save(1, {"w": np.arange(300_001)})  # a damaged aggregate does not stop saves
        held = store.inspect().items(Table.CHUNKS) | store.inspect().items(Table.PAGES)
        stats = store.stats()
        assert stats.chunks == len(held) and stats.stored_bytes == sum(map(len, held.values()))
        assert store.verify().ok

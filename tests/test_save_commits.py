"""How many commits a save makes, and what each holds (castore/save/pipeline.py, saver.py).

A small save is one transaction: its chunks (the sink's last batch), its manifest and
stepinfo record, and retention's deletes.  Only batches committed before the manifest's
transaction are journaled.  Counted as the backend's generation delta, which grows by one
per committed write (``castore/storage/base.py``): deterministic, not timing.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import assert_tree_equal

import castore
import castore.maintenance.maintainer as maintainer
import castore.save.pipeline as pipeline
from castore import Keep
from castore.format.schema import Table
from castore.save.saver import Saver
from castore.storage import lmdb_engine, memory

CHUNK = 4096


@pytest.fixture(params=["lmdb", "memory"])
def path(request, tmp_path):
    if request.param == "lmdb":
        yield tmp_path / "store"
    else:
        name = f"commits-{os.getpid()}-{request.node.name}"
        yield f"memory://{name}"
        memory.discard(name)


def small(step: int) -> dict:
    """A ~4 KB state whose array differs every step, and a leaf that never changes."""
    return {"agent": {"w": np.full(1000, step, np.float32), "fixed": np.arange(256, dtype=np.int64)}, "step": step}


def generation(store) -> int:
    return store.backend.generation()


def test_a_small_save_commits_exactly_one_write(path, monkeypatch):
    monkeypatch.setattr(maintainer, "GC_MIN_ENTRIES", 10**6)  # no collection comes due here
    with castore.Store(path, keep=Keep(last=3, every=10)) as store:
        store.save(0, small(0))  # the first save also takes the writer lock (and may upgrade)
        for step in range(1, 40):
            before = generation(store)
            store.save(step, small(step), metrics={"loss": 1.0 / step})
            assert generation(store) - before == 1, f"step {step}"
        # retention ran in those commits: the steps it dropped are in the trash already
        assert store.steps() == [0, 10, 20, 30, 37, 38, 39]
        assert store.inspect().count(Table.TRASH) == 40 - 7 and store.inspect().count(Table.JOURNAL) == 0
        # an async save, an overwrite and a rollback's move are one commit each too
        before = generation(store)
        store.save_async(40, small(40)).result()
        store.save(40, small(41), overwrite=True)
        store.continue_from(38)
        store.save(39, small(42))
        assert generation(store) - before == 3
        assert store.branches() == ["main", "main-abandoned-38"]
        assert store.steps() == [0, 10, 20, 30, 38, 39]  # 37 went when 40 came; 39 and 40 moved, 39 anew
        assert_tree_equal(store.load(39), small(42))
        assert store.verify().ok


def test_a_save_that_collects_makes_one_more_commit(path, monkeypatch):
    monkeypatch.setattr(maintainer, "GC_MIN_ENTRIES", 4)
    with castore.Store(path, keep=Keep(last=2)) as store:
        store.save(0, small(0))
        deltas, trash = [], []
        for step in range(1, 25):
            before = generation(store)
            store.save(step, small(step))
            deltas.append(generation(store) - before)
            trash.append(store.inspect().count(Table.TRASH))
        # every save trashes one step; once four wait, that save also collects (one transaction)
        assert set(deltas) == {1, 2} and max(trash) == 3
        assert [t for d, t in zip(deltas, trash) if d == 2] == [0] * deltas.count(2)
        assert deltas.count(2) == 5  # saves 2..24 trash 23 steps: collected at saves 5, 9, 13, 17, 21


def test_a_save_of_several_batches_journals_each_but_the_last(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "BATCH_BYTES", 4 * CHUNK)  # a batch per four chunks
    rows = np.random.default_rng(1).integers(0, 256, (10, CHUNK), dtype=np.uint8)  # ten chunks
    with castore.Store(tmp_path / "store", chunk_bytes=CHUNK) as store:
        store.save(0, {"x": 0})
        before = generation(store)
        result = store.save(1, {"rows": rows})
        assert generation(store) - before == 3  # two batches of four, then two with the manifest
        assert result.new_chunks == 10 and store.inspect().count(Table.JOURNAL) == 0
        assert_tree_equal(store.load(1), {"rows": rows})


def test_a_manifest_transaction_cut_short_leaves_only_journaled_chunks(tmp_path, monkeypatch):
    """An exception inside the manifest's transaction aborts it as a kill would: the last
    batch's chunks are gone with it, the earlier batches' stay listed in the journal."""
    monkeypatch.setattr(pipeline, "BATCH_BYTES", 4 * CHUNK)
    rows = np.random.default_rng(2).integers(0, 256, (10, CHUNK), dtype=np.uint8)
    original = Saver._commit_manifest

    def cut_short(self, txn, *args):
        original(self, txn, *args)  # everything put: chunks, manifest, stepinfo, retention
        raise OSError("the process died here")

    with castore.Store(tmp_path / "store", chunk_bytes=CHUNK, keep=2) as store:
        store.save(0, {"x": 0})
        store.save(1, {"x": 1})
        monkeypatch.setattr(Saver, "_commit_manifest", cut_short)
        with pytest.raises(OSError):
            store.save(2, {"rows": rows})
        monkeypatch.setattr(Saver, "_commit_manifest", original)
        chunks = set(store.inspect().keys(Table.CHUNKS))
        journaled = {bytes(i) for entry in store.inspect().items(Table.JOURNAL).values() for i in split(entry)}
        assert len(chunks) == 8 and chunks == journaled  # two batches of four committed, journaled
        assert store.steps() == [0, 1] and store.inspect().count(Table.TRASH) == 0  # nor was retention
        assert set(store.gc().chunks) == chunks
        assert store.inspect().count(Table.CHUNKS) == 0 and store.verify().ok
        store.save(2, {"rows": rows})
        assert store.steps() == [1, 2]
        assert_tree_equal(store.load(2), {"rows": rows})


def split(entry: bytes) -> list[bytes]:
    return [entry[i + 1 : i + 33] for i in range(0, len(entry), 33)]


def test_a_rerun_manifest_transaction_puts_the_last_batch_again_and_counts_it_once(tmp_path, monkeypatch):
    monkeypatch.setattr(lmdb_engine, "INITIAL_MAP_BYTES", 1 << 20)
    monkeypatch.setattr(lmdb_engine, "RESERVE_SLACK", 64 << 10)
    rows = np.random.default_rng(3).integers(0, 256, (1024, CHUNK), dtype=np.uint8)  # 4 MiB: fills the map
    runs = []
    original = Saver._commit_manifest

    def counted(self, txn, *args):
        runs.append(1)
        return original(self, txn, *args)

    with castore.Store(tmp_path / "store", chunk_bytes=CHUNK) as store:
        store.save(0, {"x": 0})
        monkeypatch.setattr(store.backend, "reserve", lambda nbytes: None)  # no growth ahead: the write grows it
        monkeypatch.setattr(Saver, "_commit_manifest", counted)
        before = generation(store)
        result = store.save(1, {"rows": rows})
        assert len(runs) >= 2 and generation(store) - before == 1
        assert result.new_chunks == 1024 + 4 and result.new_bytes == rows.nbytes + 4 * 256 * 32  # and the pages
        assert_tree_equal(store.load(1), {"rows": rows})
        assert store.stats().chunks == 1024 + 4 and store.verify().ok  # step 0 is inline


def test_small_saves_allocate_disk_blocks_only_when_the_data_outgrows_the_allocated_range(tmp_path, monkeypatch):
    """posix_fallocate walks the file's extents even over allocated blocks; once a range is
    allocated (it stays so while the map keeps its size and the file its length), a write
    inside it makes no call.  In a steady state, LMDB reuses freed pages and the data's end
    stops moving: saves make no call at all.  (Forgetting a resize here made a writer
    growing its map die of SIGBUS: test_concurrency's map-growth test.)"""
    calls = []
    fallocate = os.posix_fallocate
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, at, n: calls.append((at, n)) or fallocate(fd, at, n))
    with castore.Store(tmp_path / "store", keep=Keep(last=3)) as store:
        for step in range(200):
            store.save(step, small(step))
        growing = len(calls)
        calls.clear()
        for step in range(200, 300):
            store.save(step, small(step))
        assert growing <= 200 and len(calls) <= 2, (growing, calls)
        assert store.verify().ok


def test_a_compacted_store_allocates_disk_blocks_again(tmp_path, monkeypatch):
    """Compaction writes a new file whose blocks are not allocated: the remembered range
    must not outlive it (a full disk would be a SIGBUS instead of a SaveError)."""
    calls = []
    fallocate = os.posix_fallocate
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, at, n: calls.append((at, n)) or fallocate(fd, at, n))
    with castore.Store(tmp_path / "store", keep=Keep(last=3)) as store:
        for step in range(50):
            store.save(step, small(step))
        store.compact()
        calls.clear()
        store.save(50, small(50))
        assert calls, "no posix_fallocate after compaction"
        assert store.verify().ok

"""Store.usage(), Store.diff(), plan_gc(keep=), rollback(), verify(steps=, progress=) and the
save times stepinfo records: what the command line reports, checked against the store."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import castore
from castore.errors import CorruptDataError
from castore.format.keys import branch_of
from castore.format.manifest import decode_manifest
from castore.format.schema import Table
from castore.format.sealing import seal
from castore.format.stepinfo import SaveTimes, decode_stepinfo, encode_stepinfo
from castore.maintenance.gc import StepAccount, _collect
from castore.storage import ChunkStore
from castore.storage.chunks import PageWalker

CHUNK = 64 * 1024


def naive_accounts(store) -> dict:
    """The plain reference (castore 0.6's accounting): every step's set of chunk and page
    ids, counted across steps; what the incremental Store.usage() must agree with."""
    chunks = ChunkStore(store.backend)
    with store.backend.read() as txn:
        return {(a.branch, a.step): a for a in _naive(chunks, txn)}


def _naive(chunks, txn) -> list:
    """Per-step accounting over every kept step of every branch (reads manifests and pages,
    not chunks).  A step forked to another branch shares all its bytes with its source."""
    walker = PageWalker(txn, check_pages=False)
    per_step = []
    counts: dict[tuple[Table, bytes], int] = {}
    for key, raw in txn.scan(Table.STEPS):
        manifest = decode_manifest(raw)
        chunk_ids: set = set()
        pages: set = set()
        _collect(walker, manifest, chunk_ids, pages)
        ids = {(Table.CHUNKS, c) for c in chunk_ids} | {(Table.PAGES, p) for p in pages}
        per_step.append((manifest, branch_of(key), ids))
        for item in ids:
            counts[item] = counts.get(item, 0) + 1
    sizes = {}
    for table in (Table.CHUNKS, Table.PAGES):
        wanted = [cid for t, cid in counts if t is table]
        found = chunks.sizes(txn, table, wanted)
        sizes.update({(table, cid): found.get(cid, 0) for cid in wanted})
    accounts = []
    for manifest, branch, ids in per_step:
        referenced = sum(sizes[k] for k in ids)
        unique = sum(sizes[k] for k in ids if counts[k] == 1)
        accounts.append(
            StepAccount(manifest.step, manifest.logical_bytes, referenced, unique, referenced - unique, branch)
        )
    return accounts


def rows(seed: int, n: int = 16) -> np.ndarray:
    """n chunks of incompressible bytes."""
    return np.random.default_rng(seed).integers(0, 256, n * CHUNK, dtype=np.uint8)


def test_usage_agrees_with_stats_and_accounting(tmp_path):
    with castore.Store(tmp_path / "s", chunk_bytes=CHUNK, compression="none") as store:
        data = rows(0)
        for step in range(5):
            data[step * CHUNK : (step + 1) * CHUNK] = rows(100 + step, 1)  # one chunk changes per save
            store.save(step, {"a": data, "b": np.zeros(CHUNK, np.uint8), "v": step})
        store.fork("exp", 2)
        usage = store.usage()
        accounts = naive_accounts(store)
        stats = store.stats()
    assert [(s.branch, s.step) for s in usage.steps] == [("main", i) for i in range(5)] + [("exp", 2)]
    assert usage.live_bytes == stats.stored_bytes == sum(s.new_bytes for s in usage.steps)
    assert usage.logical_bytes == stats.logical_bytes
    for s in usage.steps:
        a = accounts[(s.branch, s.step)]
        assert (s.referenced_bytes, s.unique_bytes, s.logical_bytes) == (
            a.referenced_bytes,
            a.unique_bytes,
            a.logical_bytes,
        )
    first, *later, fork = usage.steps
    assert first.new_bytes == 17 * CHUNK  # a's 16 chunks and b's one
    assert all(s.new_bytes == CHUNK for s in later) and fork.new_bytes == 0
    assert fork.save is None and usage.steps[2].save is not None  # a fork is no save
    assert fork.metrics == usage.steps[2].metrics and fork.created == usage.steps[2].created
    a_total = next(c for c in usage.components if c.name == "a")
    assert (a_total.steps, a_total.raw_bytes, a_total.stored_bytes) == (6, 20 * CHUNK, 20 * CHUNK)
    assert usage.dedup_ratio == pytest.approx(usage.logical_bytes / usage.raw_bytes)
    assert usage.compression_ratio == 1.0 and usage.missing == 0


def test_usage_counts_compression_and_partial_last_chunks(tmp_path):
    with castore.Store(tmp_path / "s", chunk_bytes=CHUNK) as store:
        store.save(0, {"zeros": np.zeros(3 * CHUNK + 10, np.uint8)})
        usage = store.usage()
    (total,) = usage.components
    assert total.raw_bytes == CHUNK + 10  # two distinct chunks: a zero one (three times) and the 10-byte tail
    assert total.stored_bytes < total.raw_bytes / 20 and usage.compression_ratio > 20


def test_save_times_are_recorded_sync_and_async(tmp_path):
    with castore.Store(tmp_path / "s") as store:
        result = store.save(0, {"a": rows(0, 2)})
        handle = store.save_async(1, {"a": rows(1, 2)})
        store.wait()
        saved = {s.step: s.save for s in store.usage().steps}
    assert saved[0].seconds == saved[0].blocked_seconds > 0
    assert saved[0].written_bytes == result.new_bytes
    assert 0 < saved[1].blocked_seconds <= saved[1].seconds and saved[1].written_bytes == handle.result().new_bytes


@given(seconds=st.floats(0, 1e9), blocked=st.floats(0, 1e9), written=st.integers(0, 2**63))
@settings(max_examples=50, deadline=None)
def test_stepinfo_save_times_round_trip(seconds, blocked, written):
    times = SaveTimes(seconds, blocked, written)
    assert decode_stepinfo(encode_stepinfo(1.0, {"x": 1.0}, times), "r").save == times
    assert decode_stepinfo(encode_stepinfo(1.0, None), "r").save is None


@pytest.mark.parametrize(
    "save", [[1.0, 2.0], [float("nan"), 0.0, 1], [-1.0, 0.0, 1], [1.0, 0.0, -5], [1.0, 0.0, 1.5], "x", [True, 0.0, 1]]
)
def test_a_malformed_save_field_is_corrupt(save):
    raw = seal(msgpack.packb({"created": 1.0, "metrics": {}, "save": save}, use_bin_type=True))
    with pytest.raises(CorruptDataError):
        decode_stepinfo(raw, "record")


def test_diff_counts_changed_chunks_and_new_bytes(tmp_path):
    with castore.Store(tmp_path / "s", chunk_bytes=CHUNK, compression="none") as store:
        data = rows(0)
        store.save(0, {"a": data.copy(), "same": rows(9, 2), "n": 1})
        data[3 * CHUNK] ^= 1
        data[7 * CHUNK] ^= 1
        store.save(1, {"a": data, "same": rows(9, 2), "n": 2, "new": rows(5, 1)})
        result = store.diff(0, 1)
    changes = {c.path: c for c in result.changes}
    assert set(changes) == {"a", "n", "new"}
    assert (changes["a"].chunks, changes["a"].changed_chunks, changes["a"].changed_bytes) == (16, 2, 2 * CHUNK)
    assert changes["new"].change == "added" and changes["n"].change == "changed"
    assert result.same_leaves == 1 and result.new_chunks == 3 and result.new_bytes == 3 * CHUNK


def test_plan_gc_with_keep_previews_retention_without_changing_anything(tmp_path):
    with castore.Store(tmp_path / "s", chunk_bytes=CHUNK, compression="none") as store:
        for step in range(4):
            store.save(step, {"a": rows(step, 2)})
        preview = store.plan_gc(keep=2)
        assert store.steps() == [0, 1, 2, 3] and store.plan_gc().is_empty
        assert preview.steps == (0, 1) and preview.freed_bytes == 4 * CHUNK
        assert store.plan_retain(2) == [0, 1]
        store.gc(preview)  # a preview given to gc is planned again: it frees nothing here
        assert store.steps() == [0, 1, 2, 3] and store.verify().ok
        before = store.stats().stored_bytes
        assert store.retain(2) == [0, 1]
        assert before - store.stats().stored_bytes == preview.freed_bytes


def test_gc_reports_progress_by_batch(tmp_path, monkeypatch):
    from castore.maintenance import gc

    monkeypatch.setattr(gc, "DELETE_BATCH", 4)  # batches of 4 ids: 17 chunks take 5 of them
    DELETE_BATCH = 4
    with castore.Store(tmp_path / "s", chunk_bytes=CHUNK, compression="none") as store:
        store.save(0, {"a": rows(0, 17)})
        store.save(1, {"a": np.zeros(1, np.uint8)})
        store.delete(0)
    with castore.Store(tmp_path / "s") as store:  # no baseline of this process pins step 0's chunks
        calls = []
        store.gc(progress=lambda done, total: calls.append((done, total)))
    total = calls[-1][1]
    assert total > DELETE_BATCH and calls[-1][0] == total and len(calls) >= 2
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_rollback_moves_later_steps_to_a_branch(tmp_path):
    with castore.Store(tmp_path / "s") as store:
        for step in range(4):
            store.save(step, {"v": step})
        store.tag("t", 3)
        assert store.rollback(1) == "main-abandoned-1"
        assert store.steps() == [0, 1] and store.steps(branch="main-abandoned-1") == [2, 3]
        assert store.locate("t") == ("main-abandoned-1", 3)
        assert store.rollback(1) is None
        with pytest.raises(castore.StepNotFoundError):
            store.rollback(7)
        store.save(2, {"v": 20})
        assert store.load(2)["v"] == 20 and store.load(2, branch="main-abandoned-1")["v"] == 2


def test_verify_of_some_steps_reports_progress(tmp_path):
    with castore.Store(tmp_path / "s", chunk_bytes=CHUNK, compression="none") as store:
        store.save(0, {"a": rows(0, 4)})
        store.save(1, {"a": rows(1, 2)})
        calls = []
        report = store.verify(steps=[("main", 1)], progress=lambda done, total: calls.append((done, total)))
        assert report.ok and report.steps == 1 and report.chunks == 2
        assert calls[0] == (0, 2 * CHUNK) and calls[-1] == (2 * CHUNK, 2 * CHUNK)
        assert store.verify().chunks == 6


@given(
    history=st.lists(
        st.tuples(
            st.sampled_from(["save", "delete", "fork"]),
            st.integers(0, 700),  # rows to change: up to 700 of 4 KiB chunks, so paged blobs (256 ids a page)
            st.booleans(),  # a second component that shares chunks with the first
        ),
        min_size=1,
        max_size=8,
    )
)
@settings(max_examples=25, deadline=None)
def test_usage_matches_accounting_over_random_histories(tmp_path_factory, history):
    """The incremental walk (units shared by neighbouring steps skipped) against the plain
    per-step sets of accounting(), with paged and inline blobs, duplicates, deletes and forks."""
    path = tmp_path_factory.mktemp("h") / "s"
    rng = np.random.default_rng(len(history))
    data = rng.integers(0, 256, 600 * 4096 + 100, dtype=np.uint8)  # 601 chunks, a short last one
    with castore.Store(path, chunk_bytes=4096, compression="none") as store:
        step = 0
        for i, (action, n, shared) in enumerate(history):
            if action == "delete" and len(store.steps()) > 1:
                store.delete(store.steps()[0])
                continue
            if action == "fork" and store.steps():
                store.fork(f"f{i}", store.steps()[-1])
                continue
            data[rng.integers(0, len(data), n)] ^= 1
            tree = {"a": data, "z": np.zeros(3 * 4096, np.uint8)}  # z: three copies of one chunk
            if shared:
                tree["b"] = data[: 300 * 4096].copy()
            store.save(step, tree)
            step += 1
        usage = store.usage()
        accounts = naive_accounts(store)
        assert {(a.branch, a.step): a for a in store.accounting()} == accounts
        stats = store.stats()
    with castore.Store(path) as store:  # no baseline of this process pins garbage now
        store.gc()
        live = store.stats().stored_bytes
    assert len(usage.steps) == len(accounts)
    for s in usage.steps:
        a = accounts[(s.branch, s.step)]
        assert (s.referenced_bytes, s.unique_bytes) == (a.referenced_bytes, a.unique_bytes), (s.branch, s.step)
    assert usage.live_bytes == live == sum(s.new_bytes for s in usage.steps)
    assert usage.raw_bytes == usage.live_bytes  # nothing compressed: raw chunks and pages as stored
    assert usage.logical_bytes == stats.logical_bytes and usage.missing == 0

"""Restores in place, and the first save after a resume costing only what changed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import castore
from castore.errors import IntegrityError, TrackingError
from castore.format.schema import Table

CHUNK = 4096  # small chunks: a few hundred KB of state spans many
ROWS = 600  # rows of 1 KiB: 4 rows per chunk, 150 chunks per field


def make_run(path, **options):
    ck = castore.Checkpoint(path, chunk_bytes=CHUNK, **options)
    rng = np.random.default_rng(0)
    rb = castore.RingBuffer(ROWS)
    rb.add({"obs": rng.integers(0, 256, (ROWS, 1024), dtype=np.uint8), "reward": rng.random(ROWS, dtype=np.float32)})
    ck.replay = rb
    ck.agent = {"w": rng.standard_normal((256, 256)).astype(np.float32), "b": rng.random(64).astype(np.float32)}
    return ck


def fresh(path, **options):
    """A new process's view: a Checkpoint with empty components registered."""
    ck = castore.Checkpoint(path, chunk_bytes=CHUNK, **options)
    ck.replay = castore.RingBuffer(ROWS)
    ck.agent = {}
    return ck


def test_a_ringbuffer_with_fields_is_filled_in_place(tmp_path):
    ck = make_run(tmp_path / "s")
    saved_obs = np.array(ck.replay["obs"])
    ck.save(1)
    ck.replay.add({"obs": np.zeros((10, 1024), np.uint8), "reward": np.zeros(10, np.float32)})
    own = ck.replay._fields["obs"]
    raw = own.raw
    ck.load(step=1)
    assert ck.replay._fields["obs"] is own and own.raw is raw  # the same memory, no second copy
    np.testing.assert_array_equal(ck.replay["obs"], saved_obs)
    ck.store.close()


def test_store_load_into_fills_matching_arrays_and_allocates_the_rest(tmp_path):
    with castore.Store(tmp_path / "s", chunk_bytes=CHUNK) as store:
        a = np.arange(50_000, dtype=np.float32)
        b = np.arange(3000, dtype=np.int16)
        store.save(0, {"c": {"a": a, "b": b, "n": 3}})
        target_a = np.zeros_like(a)
        wrong_b = np.zeros(10, np.int16)  # wrong shape: not used
        out = store.load(0, into={"c": {"a": target_a, "b": wrong_b}})["c"]
        assert out["a"] is target_a
        np.testing.assert_array_equal(target_a, a)
        assert out["b"] is not wrong_b and (out["b"] == b).all() and not wrong_b.any()
        assert out["n"] == 3
        tracked = castore.TrackedArray(np.zeros_like(a))
        assert store.load(0, into={"c": {"a": tracked}})["c"]["a"] is tracked
        np.testing.assert_array_equal(tracked.raw, a)
        with pytest.raises(castore.UsageError):
            store.load(0, into=[target_a])


def test_a_damaged_chunk_still_fails_a_restore_in_place(tmp_path):
    with castore.Store(tmp_path / "s", chunk_bytes=CHUNK, compression="none") as store:
        a = np.random.default_rng(1).random(20_000).astype(np.float32)
        store.save(0, {"c": {"a": a}})
        with store.backend.read() as txn:
            key, value = next(iter(txn.scan(Table.CHUNKS)))
            key, value = bytes(key), bytearray(value)
        value[0] ^= 0xFF
        store.backend.write(lambda txn: txn.put(Table.CHUNKS, key, bytes(value)))
        with pytest.raises(IntegrityError) as info:
            store.load(0, into={"c": {"a": np.zeros_like(a)}})
        assert info.value.component == "c" and info.value.path == "a"


@pytest.mark.parametrize("compression", ["auto", "none"])
def test_the_first_save_after_a_resume_hashes_only_what_changed(tmp_path, compression):
    ck = make_run(tmp_path / "s", compression=compression)
    full = ck.save(1)
    ck.store.close()

    ck = fresh(tmp_path / "s")
    assert ck.load() == 1
    ck.replay.add({"obs": np.full((8, 1024), 7, np.uint8), "reward": np.ones(8, np.float32)})  # 2 obs chunks
    ck.agent["b"] = ck.agent["b"] + 1  # one small leaf
    result = ck.save(2)
    assert result.changed_bytes <= 2 * (2 * CHUNK + 64 * 4 + 8 * 4)  # the bound: <= 2x what changed
    assert result.changed_bytes < full.changed_bytes / 50
    ck.store.close()
    ck = fresh(tmp_path / "s")
    ck.load()
    assert ck.replay["obs"][0:8].tolist() == np.full((8, 1024), 7, np.uint8).tolist()
    np.testing.assert_array_equal(ck.agent["w"], make_run(tmp_path / "other").agent["w"])
    ck.store.close()


def test_an_async_first_save_after_a_resume_copies_only_what_changed(tmp_path):
    ck = make_run(tmp_path / "s")
    ck.save(1)
    ck.store.close()
    ck = fresh(tmp_path / "s")
    ck.load()
    ck.replay.add({"obs": np.full((4, 1024), 9, np.uint8), "reward": np.ones(4, np.float32)})
    handle = ck.save(2, block=False)
    result = handle.result()
    assert result.changed_bytes <= 2 * (CHUNK + 4 * 4)
    ck.store.close()


def test_check_mode_still_catches_a_missed_change_after_a_resume(tmp_path):
    ck = make_run(tmp_path / "s")
    ck.save(1)
    ck.store.close()
    ck = fresh(tmp_path / "s", check_tracking=True)
    ck.load()
    ck.save(2)  # confirms the loaded ids; the buffer's arrays now have their own baselines
    ck.replay._fields["obs"].raw[5] += 1  # a write that bypasses tracking
    with pytest.raises(TrackingError):
        ck.save(3)
    ck.store.close()


def test_a_change_made_through_raw_right_after_a_load_is_saved(tmp_path):
    """After a load the tracked arrays have no baseline yet: bytes are compared, not marks."""
    ck = make_run(tmp_path / "s")
    ck.save(1)
    ck.store.close()
    ck = fresh(tmp_path / "s")
    ck.load()
    ck.replay._fields["obs"].raw[3] = 42  # unmarked
    ck.save(2)
    ck.store.close()
    with castore.Store(tmp_path / "s") as store:
        assert (store.load(2)["replay"]["fields"]["obs"][3] == 42).all()


def test_loaded_ids_collected_by_another_writer_are_not_reused(tmp_path):
    """Between our load and our save another process deletes the step and collects its
    chunks: the save must notice and store the chunks again."""
    ck = make_run(tmp_path / "s")
    ck.save(1)
    ck.store.close()
    ck = fresh(tmp_path / "s")
    ck.load()  # no writer lock taken: another process may write now
    script = textwrap.dedent(
        f"""
        import castore
        with castore.Store({str(tmp_path / "s")!r}) as store:
            store.save(5, {{"other": 1}})
            store.delete(1)
            store.gc()
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    result = ck.save(6)
    assert result.changed_bytes >= ROWS * 1024  # re-hashed: the loaded ids are gone
    ck.store.close()
    with castore.Store(tmp_path / "s") as store:
        assert store.verify().problems == ()
        np.testing.assert_array_equal(store.load(6)["agent"]["w"], make_run(tmp_path / "o").agent["w"])


def test_a_load_to_look_does_not_undo_what_the_last_save_knows(tmp_path):
    ck = make_run(tmp_path / "s")
    ck.save(1)
    ck.agent["w"] = ck.agent["w"] * 2
    ck.save(2)
    ck.store.load(1)  # an evaluation peeks at step 1
    result = ck.save(3)  # nothing changed since step 2
    assert result.changed_bytes == 0
    ck.store.close()


def test_a_read_only_store_remembers_nothing(tmp_path):
    ck = make_run(tmp_path / "s")
    ck.save(1)
    ck.store.close()
    with castore.Store(tmp_path / "s", readonly=True) as store:
        store.load(1)
        assert store.inspect().pinned_ids() == set()


def test_a_resume_with_nothing_deleted_since_looks_up_no_chunk(tmp_path, monkeypatch):
    """The store's deletion count is unchanged since the load, so no id needs a lookup
    (a lookup faults a whole value into memory: a resume would hold the store twice)."""
    ck = make_run(tmp_path / "s")
    ck.save(1)
    ck.store.close()
    ck = fresh(tmp_path / "s")
    ck.load()
    looked_up = []
    monkeypatch.setattr(castore.storage.chunks.ChunkStore, "has_all", lambda self, txn, ids: looked_up.append(ids))
    result = ck.save(2)
    assert looked_up == [] and result.changed_bytes == 0
    ck.store.close()


def test_a_load_that_fills_a_tracked_array_gives_it_a_baseline(tmp_path):
    ck = make_run(tmp_path / "s")
    ck.save(1)
    ck.store.close()
    ck = fresh(tmp_path / "s")
    ck.replay = castore.RingBuffer(ROWS, fields={"obs": ((1024,), np.uint8), "reward": ((), np.float32)})
    ck.load()
    obs = ck.replay._fields["obs"]
    epoch, baseline, changed = obs.capture()  # what the next save's capture will see
    assert baseline is not None and changed.size == 0
    ck.store.close()


def test_a_resume_from_a_store_older_than_format_4_looks_each_id_up(tmp_path, monkeypatch):
    """An older castore may collect a format-3 store without counting deletions."""
    import shutil

    shutil.copytree(os.path.join(os.path.dirname(__file__), "data", "store-v3"), tmp_path / "v3")
    with castore.Store(tmp_path / "v3") as store:
        state = store.load(200)
        calls = []
        real = castore.storage.chunks.ChunkStore.has_all
        monkeypatch.setattr(
            castore.storage.chunks.ChunkStore, "has_all", lambda self, txn, ids: calls.append(1) or real(self, txn, ids)
        )
        store.save(300, state)
        assert calls  # looked up, not trusted
        assert store.verify().problems == ()


def test_a_buffer_filled_from_one_store_and_saved_to_another_is_stored_there(tmp_path):
    """Neither store ever deleted a chunk: the other store's deletion count proves nothing."""
    a = make_run(tmp_path / "a")
    a.save(1)
    a.store.close()
    b = fresh(tmp_path / "b")
    b.replay = castore.RingBuffer(ROWS, fields={"obs": ((1024,), np.uint8), "reward": ((), np.float32)})
    b.load(tmp_path / "a")
    b.replay.add({"obs": np.ones((4, 1024), np.uint8), "reward": np.ones(4, np.float32)})
    b.save(1)
    b.store.close()
    with castore.Store(tmp_path / "b") as store:
        assert store.verify().problems == ()
        assert (store.load(1)["replay"]["fields"]["obs"][4:] == make_run(tmp_path / "c").replay["obs"][4:]).all()


def test_a_load_into_an_array_an_async_save_is_still_writing_leaves_no_stale_baseline(tmp_path):
    """The async save commits its (older) baseline after the load filled the array: the
    next save must still see every row as changed."""
    rng = np.random.default_rng(5)
    with castore.Store(tmp_path / "w", chunk_bytes=CHUNK) as writer, castore.Store(tmp_path / "r") as other:
        other.save(1, {"c": {"x": rng.integers(0, 256, (64, 1024), dtype=np.uint8)}})
        loaded = other.load(1)["c"]["x"]
        tracked = castore.TrackedArray(np.zeros((64, 1024), np.uint8))
        writer.save(1, {"c": {"x": tracked}})
        tracked[0] = 1
        big = rng.random(4 << 20).astype(np.float32)  # keeps the async save busy for a while
        handle = writer.save_async(2, {"c": {"x": tracked}, "d": {"y": big}})
        reader = castore.Store(tmp_path / "r", readonly=True)  # remembers nothing: no restored()
        reader.load(1, into={"c": {"x": tracked}})
        reader.close()
        handle.result()
        writer.save(3, {"c": {"x": tracked}})
        np.testing.assert_array_equal(writer.load(3)["c"]["x"], loaded)


def test_a_damaged_deletion_count_is_a_typed_problem_not_a_crash(tmp_path):
    from castore.format import journal

    with castore.Store(tmp_path / "s", keep=1, chunk_bytes=CHUNK) as store:
        store.save(1, {"c": {"x": np.arange(10_000, dtype=np.int64)}})
        store.backend.write(lambda txn: txn.put(Table.META, journal.DELETIONS_KEY, b"\xff" * 8))
        store.save(2, {"c": {"x": np.arange(10_000, dtype=np.int64) + 1}})
        store.gc()  # deletes chunks: the count is rewritten, not an OverflowError
        with store.backend.read() as txn:
            assert store.inspect() is not None
            assert journal.decode_deletions(txn.get(Table.META, journal.DELETIONS_KEY)) >= 0

"""Store: dedup, atomic steps, metadata growth, verification, map growth, format checks."""

import os

import lmdb
import msgpack
import numpy as np
import pytest
from conftest import assert_tree_equal

import castore
from castore.format.keys import step_key
from castore.storage import lmdb_engine as blobstore

CHUNK = 64 << 10


def replay(rows=4096, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (rows, 8, 8, 3), dtype=np.uint8)  # 192 B rows


def test_unchanged_second_save_writes_no_chunk_bytes(store):
    tree = {"replay": replay(), "agent": {"w": np.random.default_rng(2).random((300, 300), np.float32)}}
    first = store.save(1, tree)
    second = store.save(2, tree)
    assert first.new_bytes >= first.logical_bytes * 0.99
    assert second.new_bytes == 0 and second.new_chunks == 0
    assert second.reused_chunks == first.new_chunks


def test_k_changed_rows_write_about_k_rows_of_chunks(store):
    data = replay(rows=20_000)  # 3.8 MB in 64 KiB chunks of 341 rows
    store.save(1, {"replay": data})
    row_bytes = data[0].nbytes
    rows_per_chunk = CHUNK // row_bytes
    for step, rows in [(2, [5]), (3, [100, 101, 102]), (4, list(range(7000, 7000 + 2 * rows_per_chunk)))]:
        data[rows] ^= 0xFF
        result = store.save(step, {"replay": data})
        touched = len({r // rows_per_chunk for r in rows})
        page_bytes = 2 * 256 * 32  # at most the changed chunk-list pages (one, or two at a boundary)
        assert result.new_bytes <= touched * rows_per_chunk * row_bytes + page_bytes
        assert result.new_bytes >= touched * rows_per_chunk * row_bytes
        assert_tree_equal(store.load(step)["replay"], data)


def test_chunk_lists_are_paged_so_metadata_grows_with_changes_not_size(tmp_path):
    with castore.Store(tmp_path / "s", chunk_bytes=4096, compression="none") as s:
        data = np.zeros((2_000_000,), np.uint8)  # 489 chunks: the id list needs pages
        data[:] = np.arange(data.size) % 249
        first = s.save(1, {"big": data})
        data[10] += 1
        second = s.save(2, {"big": data})
    assert first.manifest_bytes < 600  # page ids only, not 489 chunk ids
    assert second.new_chunks == 2  # one chunk and the one page that lists it
    assert second.new_bytes == 4096 + 256 * 32


def test_dedup_across_components_and_within_a_save(store):
    block = np.full((1000, 100), 7, np.uint8)
    result = store.save(1, {"a": block, "b": block.copy(), "c": [block, block]})
    assert result.new_chunks == 2  # one chunk of all-sevens: 64 KiB chunks of 655 rows + 345-row tail
    assert result.reused_chunks == 6


def test_existing_step_rules(store):
    tree = {"x": np.arange(10_000)}
    store.save(5, tree)
    assert store.save(5, tree).manifest_bytes == 0  # same state again: a no-op
    with pytest.raises(castore.StepExistsError, match="overwrite=True"):
        store.save(5, {"x": np.arange(10_001)})
    store.save(5, {"x": np.arange(3)}, overwrite=True)
    assert store.load(5)["x"].tolist() == [0, 1, 2]


def test_steps_latest_delete_and_missing(store):
    assert store.latest() is None and store.steps() == []
    with pytest.raises(castore.StepNotFoundError):
        store.load()
    for step in [3, 1, 200, 2**40]:
        store.save(step, {"s": step})
    assert store.steps() == [1, 3, 200, 2**40] and store.latest() == 2**40
    store.delete(200)
    assert store.steps() == [1, 3, 2**40]
    with pytest.raises(castore.StepNotFoundError):
        store.delete(200)
    with pytest.raises(KeyError):  # StepNotFoundError is a KeyError too
        store.load(200)
    for bad in [-1, 2**63, 1.5, "3", True]:
        with pytest.raises(castore.UsageError):
            store.save(bad, {"s": 1})


def test_keys_and_regex_load_only_what_was_asked(store):
    tree = {"agent": {"enc": {"w": np.ones(4)}, "dec": {"w": np.zeros(4)}}, "opt": {"m": 1}}
    store.save(1, tree)
    assert list(store.load(1, keys=["opt"])) == ["opt"]
    selected = store.load(1, keys=["agent"], regex=r"enc/")
    assert list(selected["agent"]) == ["enc/w"]
    with pytest.raises(castore.SelectionError, match="enc/w"):
        store.load(1, regex="nothing")
    with pytest.raises(castore.StepNotFoundError, match="'agent', 'opt'"):
        store.load(1, keys=["critic"])


def _corrupt_one_chunk(path):
    """Flip a byte of one stored chunk through LMDB itself (the store must be closed)."""
    env = lmdb.open(str(path), max_dbs=8)
    chunks = env.open_db(b"chunks")
    with env.begin(write=True) as txn:
        key, value = next(iter(txn.cursor(db=chunks)))
        damaged = bytearray(value)
        damaged[len(damaged) // 2] ^= 1
        txn.put(key, bytes(damaged), db=chunks)
    env.close()
    return key.hex()


def test_damaged_chunk_raises_integrity_error_naming_everything(tmp_path):
    path = tmp_path / "s"
    with castore.Store(path, chunk_bytes=CHUNK) as s:
        s.save(1, {"agent": {"enc": {"w": np.arange(50_000, dtype=np.float32)}}})
    cid = _corrupt_one_chunk(path)
    with castore.Store(path) as s:
        with pytest.raises(castore.ChunkCorruptError) as info:
            s.load(1)
        err = info.value
        assert (err.step, err.component, err.path, err.chunk_id) == (1, "agent", "enc/w", cid)
        assert cid in str(err) and "enc/w" in str(err)
        unverified = s.load(1, verify=False)["agent"]["enc"]["w"]  # explicitly unchecked
        assert not np.array_equal(unverified, np.arange(50_000, dtype=np.float32))


def test_missing_chunk_raises_integrity_error(tmp_path):
    path = tmp_path / "s"
    with castore.Store(path, chunk_bytes=CHUNK) as s:
        s.save(1, {"a": np.arange(100_000)})
        s.save(2, {"b": np.ones(3)})
    env = lmdb.open(str(path), max_dbs=8)
    with env.begin(write=True) as txn:
        chunks = env.open_db(b"chunks", txn=txn)
        key = next(iter(txn.cursor(db=chunks).iternext(values=False)))
        txn.delete(key, db=chunks)
    env.close()
    with castore.Store(path) as s:
        with pytest.raises(castore.ChunkMissingError, match=key.hex()):
            s.load(1)
        assert s.load(2)["b"].tolist() == [1, 1, 1]  # unaffected steps still load


def test_map_grows_by_itself(tmp_path, monkeypatch):
    monkeypatch.setattr(blobstore, "INITIAL_MAP_BYTES", 1 << 20)
    with castore.Store(tmp_path / "s") as s:
        data = np.random.default_rng(1).integers(0, 255, 40 << 20, dtype=np.uint8)
        s.save(1, {"a": data})
        for step in range(2, 6):
            data[: 1 << 20] += 1
            s.save(step, {"a": data})
        assert_tree_equal(s.load(5)["a"], data)


def test_newer_format_is_refused_with_a_clear_message(tmp_path):
    path = tmp_path / "s"
    castore.Store(path).close()
    env = lmdb.open(str(path), max_dbs=8)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        config = msgpack.unpackb(txn.get(b"config", db=meta))
        config["format"] = 99
        txn.put(b"config", msgpack.packb(config), db=meta)
    env.close()
    with pytest.raises(castore.FormatError, match="format 99.*upgrade castore"):
        castore.Store(path)


def test_garbage_manifest_is_a_typed_error(tmp_path):
    path = tmp_path / "s"
    with castore.Store(path) as s:
        s.save(1, {"a": 1})
    env = lmdb.open(str(path), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(step_key(2), b"\x93\xff garbage", db=env.open_db(b"steps", txn=txn))
    env.close()
    with castore.Store(path) as s:
        with pytest.raises(castore.CorruptDataError, match="step 2"):
            s.load(2)
        assert s.load(1) == {"a": 1}


def test_chunk_size_is_a_store_setting(tmp_path):
    castore.Store(tmp_path / "s", chunk_bytes=1 << 16).close()
    with castore.Store(tmp_path / "s") as s:
        assert s.chunk_bytes == 1 << 16
    with pytest.raises(castore.UsageError, match="chunk_bytes=65536"):
        castore.Store(tmp_path / "s", chunk_bytes=1 << 20)
    with pytest.raises(castore.UsageError):
        castore.Store(tmp_path / "t", chunk_bytes=10)


def test_stats_report_dedup(store):
    tree = {"a": replay()}
    store.save(1, tree)
    store.save(2, tree)
    stats = store.stats()
    assert stats.steps == 2 and stats.logical_bytes == 2 * tree["a"].nbytes
    assert 1.9 < stats.dedup_ratio <= 2.0
    assert stats.file_bytes >= stats.stored_bytes


def test_readonly_store_loads_but_refuses_writes(tmp_path):
    with castore.Store(tmp_path / "s") as s:
        s.save(1, {"a": np.arange(5)})
    with castore.Store(tmp_path / "s", readonly=True) as r:
        assert r.load(1)["a"].tolist() == list(range(5))
        with pytest.raises(castore.UsageError, match="read-only"):
            r.save(2, {"a": 1})


def test_closed_store_is_a_usage_error(tmp_path):
    s = castore.Store(tmp_path / "s")
    s.close()
    s.close()
    with pytest.raises(castore.UsageError, match="closed"):
        s.steps()


def test_incremental_metadata_is_a_small_fraction_of_the_chunk_list(tmp_path):
    with castore.Store(tmp_path / "s", chunk_bytes=4096) as s:
        rows = np.random.default_rng(3).integers(0, 255, (20_000, 4096), dtype=np.uint8)  # 20,000 chunks
        s.save(1, {"replay": rows})
        rows[5000:5200] ^= 1  # 1% of the rows
        result = s.save(2, {"replay": rows})
    full_chunk_list = 20_000 * 32
    metadata = result.manifest_bytes + (result.new_bytes - 200 * 4096)
    assert result.new_bytes >= 200 * 4096
    assert metadata < full_chunk_list / 20, (metadata, full_chunk_list)


FULL_DISK_CHILD = """
import os, subprocess, sys, numpy as np, castore
root = sys.argv[1]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", root], check=True)
store, filler = os.path.join(root, "s"), os.path.join(root, "filler")
with castore.Store(store) as s:
    s.save(1, {"a": np.arange(1000)})
    with open(filler, "wb") as f:  # fill the disk but for ~4 MiB
        while os.statvfs(root).f_bavail * os.statvfs(root).f_frsize > (4 << 20):
            f.write(b"x" * (1 << 20))
    try:
        s.save(2, {"a": np.random.default_rng(0).integers(0, 255, 16 << 20, dtype=np.uint8)})
        print("saved despite a full disk")
    except castore.SaveError as exc:
        print("SaveError:", exc)
    print("steps after the failed save:", s.steps())
    os.remove(filler)
    s.save(2, {"a": np.arange(5)})
with castore.Store(store) as s:
    print("step 1 intact:", s.load(1)["a"].tolist() == list(range(1000)))
    print("step 2 saved:", s.load(2)["a"].tolist() == list(range(5)))
"""


def test_a_full_disk_is_a_save_error_and_the_store_stays_usable(tmp_path):
    """A real full disk: a 48 MiB tmpfs in a private mount namespace, filled up."""
    import subprocess
    import sys

    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    as_root = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--map-root-user", "--mount"]
    try:  # a container without CAP_SYS_ADMIN, or no unprivileged user namespaces, cannot
        probe = subprocess.run(
            [*as_root, "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except FileNotFoundError as exc:
        pytest.skip(f"cannot make a private mount namespace: {exc}")
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.strip()}")
    out = subprocess.run(
        [*as_root, sys.executable, "-c", FULL_DISK_CHILD, str(mount_point)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SaveError: no room on disk" in out.stdout, out.stdout
    assert "steps after the failed save: [1]" in out.stdout
    assert "step 1 intact: True" in out.stdout and "step 2 saved: True" in out.stdout


def test_a_save_can_record_another_save_time(tmp_path):
    with castore.Store(tmp_path / "s") as store:
        store.save(1, {"a": np.ones(3)}, created=1_000_000.5)
        assert store.manifest(1).created == 1_000_000.5
        for bad in (float("nan"), float("inf"), "yesterday", True):
            with pytest.raises(castore.UsageError, match="UNIX time"):
                store.save(2, {"a": np.ones(3)}, created=bad)
        assert store.steps() == [1]

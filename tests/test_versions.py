"""Stores written by earlier castores stay readable: the golden stores in tests/data.

``tests/data/make_golden.py`` says which commit wrote each store and defines the content;
the expected states are rebuilt here from its seeds.  The golden directories hold only
``data.mdb``: every test works on a copy, so no test creates ``lock.mdb`` in the repo.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
from pathlib import Path

import lmdb
import msgpack
import pytest
from conftest import assert_tree_equal

import castore
from castore.format.schema import STORE_FORMAT

DATA = Path(__file__).parent / "data"
_spec = importlib.util.spec_from_file_location("make_golden", DATA / "make_golden.py")
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)

VERSIONS = (1, 2)


def copy_golden(version: int, dest: Path) -> Path:
    """A copy of the golden store of ``version`` (its ``data.mdb`` only) at ``dest``."""
    source = DATA / f"store-v{version}"
    dest.mkdir(parents=True)
    shutil.copyfile(source / "data.mdb", dest / "data.mdb")
    return dest


def config_of(path: Path) -> dict:
    """The config record, read with LMDB directly (no castore store may have it open)."""
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=8, subdir=True)
    try:
        with env.begin(db=env.open_db(b"meta", create=False)) as txn:
            return msgpack.unpackb(txn.get(b"config"), raw=False)
    finally:
        env.close()


def set_config_format(path: Path, version: int) -> None:
    env = lmdb.open(str(path), max_dbs=8, subdir=True, map_size=64 << 20)
    try:
        meta = env.open_db(b"meta", create=False)
        with env.begin(write=True, db=meta) as txn:
            config = msgpack.unpackb(txn.get(b"config"), raw=False)
            config["format"] = version
            txn.put(b"config", msgpack.packb(config, use_bin_type=True))
    finally:
        env.close()


def loaded(store: castore.Store, step: int) -> dict:
    """``store.load(step)`` with the sharded component read out of its iterator."""
    state = store.load(step, verify=True)
    state[golden.SHARDED] = list(state[golden.SHARDED])
    return state


def assert_golden_steps(store: castore.Store, version: int) -> None:
    assert store.steps() == list(golden.STEPS)
    for step in golden.STEPS:
        assert_tree_equal(loaded(store, step), golden.state(version, step))


@pytest.mark.parametrize("version", VERSIONS)
def test_golden_directory_holds_only_the_data_file(version):
    # lock.mdb is never committed (LMDB recreates it) and writer.lock is made by writers.
    assert sorted(os.listdir(DATA / f"store-v{version}")) == ["data.mdb"]
    assert os.path.getsize(DATA / f"store-v{version}" / "data.mdb") < 1 << 20  # a compact copy
    assert config_of(DATA / f"store-v{version}")["format"] == version


@pytest.mark.parametrize("version", VERSIONS)
def test_every_golden_step_loads_bit_exact(tmp_path, version):
    path = copy_golden(version, tmp_path / "store")
    with castore.Store(path, create=False) as store:
        assert store.chunk_bytes == golden.CHUNK_BYTES
        assert_golden_steps(store, version)
        # a selection reads only some leaves, flat: old manifests support it too
        selected = store.load(golden.STEPS[1], keys=["agent"], regex="encoder/")
        expected = golden.state(version, golden.STEPS[1])["agent"]["encoder"]
        assert_tree_equal(selected, {"agent": {"encoder/w": expected["w"], "encoder/b": expected["b"]}})
    assert (path / "lock.mdb").exists()  # LMDB made a new one
    assert config_of(path)["format"] == version  # opening and loading do not upgrade


@pytest.mark.parametrize("version", VERSIONS)
def test_a_golden_store_reads_in_place_from_a_read_only_copy(tmp_path, version):
    path = copy_golden(version, tmp_path / "store")
    # LMDB readers need a writable lock.mdb: a reader that may not create one (a directory
    # it cannot write) fails with EACCES. So the lock file is made first, as a shared
    # read-only checkpoint directory would have it; the data stays read-only.
    castore.Store(path, readonly=True).close()
    data = path / "data.mdb"
    before = data.read_bytes()
    os.chmod(data, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    os.chmod(path, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        with castore.Store(path, readonly=True) as store:
            assert_golden_steps(store, version)
            with pytest.raises(castore.UsageError):
                store.save(10**6, {"x": 1})
        assert sorted(os.listdir(path)) == ["data.mdb", "lock.mdb"]  # no writer.lock either
        assert data.read_bytes() == before
    finally:
        os.chmod(path, stat.S_IRWXU)
        os.chmod(data, stat.S_IRUSR | stat.S_IWUSR)


def test_a_writer_upgrades_the_format1_store_and_old_steps_still_load(tmp_path):
    path = copy_golden(1, tmp_path / "store")
    new_step = golden.STEPS[-1] + 100
    new_state = golden.state(1, new_step)
    with castore.Store(path) as store:
        saved = dict(new_state, **{golden.SHARDED: iter(new_state[golden.SHARDED])})
        result = store.save(new_step, saved, metrics={"loss": 0.5})
        # the unchanged chunks of the old steps are reused, not written again
        assert result.reused_chunks > 0 and result.new_bytes < result.logical_bytes
        store.tag("upgraded", new_step)
    assert config_of(path)["format"] == STORE_FORMAT
    with castore.Store(path) as store:
        assert store.steps() == [*golden.STEPS, new_step]
        assert store.tags() == {"upgraded": new_step} and store.metrics(new_step) == {"loss": 0.5}
        assert_tree_equal(loaded(store, new_step), new_state)
        for step in golden.STEPS:
            assert_tree_equal(loaded(store, step), golden.state(1, step))
        # deletes go through the trash now, and GC frees only what no other step holds
        store.delete(golden.STEPS[0])
        assert store.gc().steps == (golden.STEPS[0],)
    with castore.Store(path, readonly=True) as store:
        for step in golden.STEPS[1:]:
            assert_tree_equal(loaded(store, step), golden.state(1, step))
        assert_tree_equal(loaded(store, new_step), new_state)


def test_the_format2_store_keeps_its_tags_metrics_and_trash(tmp_path):
    path = copy_golden(2, tmp_path / "store")
    with castore.Store(path, readonly=True) as store:
        name, step = golden.TAG
        assert store.tags() == {name: step}
        assert store.resolve(name) == step
        for s in golden.STEPS:
            assert store.metrics(s) == golden.metrics(s)
        assert not store.has_step(golden.DELETED_STEP)
    with castore.Store(path) as store:
        plan = store.plan_gc()
        assert plan.steps == (golden.DELETED_STEP,)  # its manifest waited in the trash
        store.gc(plan)
        assert_golden_steps(store, 2)
        assert store.plan_gc().is_empty
        assert store.tags() == {golden.TAG[0]: golden.TAG[1]}
    assert config_of(path)["format"] == STORE_FORMAT  # the writer upgraded it


@pytest.mark.parametrize("readonly", [False, True], ids=["writer", "reader"])
def test_a_store_of_an_unknown_later_format_is_refused(tmp_path, readonly):
    path = copy_golden(2, tmp_path / "store")
    set_config_format(path, 99)
    with pytest.raises(castore.FormatError, match=r"format 99\b.*upgrade castore") as raised:
        castore.Store(path, readonly=readonly)
    assert str(path) in str(raised.value)
    assert config_of(path)["format"] == 99  # refused before anything was written


@pytest.mark.parametrize("version", [1, 2])
def test_saving_a_loaded_golden_step_again_is_a_no_op(tmp_path, version):
    """Resuming: the same state under its step commits nothing, though old manifests are unsealed."""
    path = copy_golden(version, tmp_path / "store")
    with castore.Store(path) as store:
        step = store.latest()
        state = golden.state(version, step)
        state[golden.SHARDED] = iter(state[golden.SHARDED])  # saved from an iterator: shards
        result = store.save(step, state)
        assert result.manifest_bytes == 0 and store.steps()[-1] == step

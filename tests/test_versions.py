"""Stores written by earlier castores stay readable: the golden stores in tests/data.

``tests/data/make_golden.py`` says which commit wrote each store and defines the content;
the expected states are rebuilt here from its seeds.  The golden directories hold only
``data.mdb``: every test works on a copy, so no test creates ``lock.mdb`` in the repo.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import lmdb
import msgpack
import pytest
from conftest import assert_tree_equal

import castore
from castore.format import codec, compression
from castore.format import config as config_module
from castore.format.ids import chunk_id, split_ids
from castore.format.manifest import PagedBlob
from castore.format.schema import STORE_FORMAT, Table
from castore.storage.chunks import PageWalker

DATA = Path(__file__).parent / "data"
_spec = importlib.util.spec_from_file_location("make_golden", DATA / "make_golden.py")
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)

VERSIONS = (1, 2, 3, 4)
REPO = DATA.parent.parent
LAST_FORMAT3 = "061472b"  #: castore 0.4.0, the last commit that reads only up to format 3


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


def loaded(store: castore.Store, step: int, branch: str | None = None) -> dict:
    """``store.load(step)`` with the sharded component read out of its iterator."""
    state = store.load(step, verify=True, branch=branch)
    state[golden.SHARDED] = list(state[golden.SHARDED])
    return state


def assert_golden_steps(store: castore.Store, version: int) -> None:
    """Every step of every branch of the golden store of ``version`` loads bit-exact."""
    assert store.steps() == list(golden.STEPS)
    for step in golden.STEPS:
        assert_tree_equal(loaded(store, step), golden.state(version, step))
    if version >= 3:
        name, forked, new_step = golden.BRANCH
        assert store.branches() == ["main", name]
        assert store.steps(branch=name) == [forked, new_step]
        assert_tree_equal(loaded(store, forked, name), golden.state(version, forked))
        assert_tree_equal(loaded(store, new_step, name), golden.state(version, new_step))


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


@pytest.mark.parametrize("version", VERSIONS)
def test_saving_a_loaded_golden_step_again_is_a_no_op(tmp_path, version):
    """Resuming: the same state under its step commits nothing, though old manifests are unsealed."""
    path = copy_golden(version, tmp_path / "store")
    with castore.Store(path) as store:
        step = store.latest()
        state = golden.state(version, step)
        state[golden.SHARDED] = iter(state[golden.SHARDED])  # saved from an iterator: shards
        result = store.save(step, state)
        assert result.manifest_bytes == 0 and store.steps()[-1] == step


def test_the_format3_store_keeps_its_branch_tags_and_metrics(tmp_path):
    path = copy_golden(3, tmp_path / "store")
    name, _, new_step = golden.BRANCH
    with castore.Store(path, readonly=True) as store:
        assert store.tags() == {golden.TAG[0]: golden.TAG[1]}
        assert store.tags(branch=name) == {golden.BRANCH_TAG[0]: golden.BRANCH_TAG[1]}
        assert store.locate(golden.BRANCH_TAG[0]) == (name, new_step)  # a tag names a branch's step
        assert store.metrics(new_step, branch=name) == golden.metrics(new_step)
        assert store.compression == "none"  # a format-3 config has no setting: chunks are raw
        assert store.verify().ok


def test_a_writer_upgrades_the_format3_store_by_its_config_alone(tmp_path):
    path = copy_golden(3, tmp_path / "store")
    before = config_of(path)
    with castore.Store(path, readonly=True) as store:
        chunks_before = store.inspect().items(Table.CHUNKS)
    name, _, branch_step = golden.BRANCH
    new_step = golden.STEPS[-1] + 100
    new_state = golden.state(4, new_step)  # with the compressible video component
    with castore.Store(path) as store:
        assert store.compression == "none"  # a migrated store keeps storing chunks raw
        store.save(new_step, dict(new_state, **{golden.SHARDED: iter(new_state[golden.SHARDED])}))
        assert store.stats().stored_bytes > 0
    after = config_of(path)
    assert after["format"] == STORE_FORMAT and after["compression"] == "none"
    assert dict(after, format=3, compression=None) == dict(before, compression=None)  # nothing else changed
    with castore.Store(path, readonly=True) as store:
        chunks = store.inspect().items(Table.CHUNKS)
        assert {k: chunks[k] for k in chunks_before} == chunks_before  # no chunk was rewritten
        # "none": nothing zstd-encoded; only the raw chunk beginning with MAGIC is escaped
        assert {compression.codec_of(v) for v in chunks.values()} == {None, compression.RAW}
    # an open with compression="auto" encodes the new compressible chunks; old ones stay raw
    with castore.Store(path, compression="auto") as store:
        assert store.compression == "auto"
        next_step = new_step + 100
        next_state = golden.state(4, next_step)
        store.save(next_step, dict(next_state, **{golden.SHARDED: iter(next_state[golden.SHARDED])}))
        assert store.steps() == [*golden.STEPS, new_step, next_step]
        for step in golden.STEPS:  # the old raw steps still load
            assert_tree_equal(loaded(store, step), golden.state(3, step))
        assert_tree_equal(loaded(store, branch_step, name), golden.state(3, branch_step))
        assert_tree_equal(loaded(store, new_step), new_state)
        assert_tree_equal(loaded(store, next_step), next_state)
        assert store.verify().ok
        encoded = [k for k, v in store.inspect().items(Table.CHUNKS).items() if compression.codec_of(v) == 1]
        frame_ids = set(leaf_chunk_ids(store, next_step, "video", "frames"))
        assert frame_ids and frame_ids <= set(encoded)
    assert config_of(path)["compression"] == "none"  # an open's setting is not recorded
    with castore.Store(path) as store:
        assert store.compression == "none"
        assert store.steps(branch=name)[-1] == branch_step


def leaf_chunk_ids(store: castore.Store, step: int, component: str, path: str, branch: str | None = None) -> list:
    """The chunk ids of one leaf of a step, in order (through its chunk-list pages)."""
    node = dict(store.manifest(step, branch=branch).components)[component]
    blob = dict(codec.leaf_nodes(node))[path].blob
    with store.backend.read() as txn:
        return split_ids(PageWalker(txn, check_pages=True).ids(blob, {}))


def test_the_format4_store_holds_encoded_escaped_and_raw_chunks(tmp_path):
    path = copy_golden(4, tmp_path / "store")
    with castore.Store(path, readonly=True) as store:
        assert store.compression == "auto"  # recorded when the store was created
        values = store.inspect().items(Table.CHUNKS)
        for step in golden.STEPS:
            node = dict(store.manifest(step).components)["video"]
            assert isinstance(dict(codec.leaf_nodes(node))["frames"].blob, PagedBlob)  # ids in pages
            frames = leaf_chunk_ids(store, step, "video", "frames")
            assert len(frames) == 72 and {compression.codec_of(values[c]) for c in frames} == {compression.ZSTD}
            (noise,) = leaf_chunk_ids(store, step, "video", "noise")
            assert values[noise][: len(golden.MAGIC)] == golden.MAGIC == compression.MAGIC
            assert compression.codec_of(values[noise]) == compression.RAW  # escaped, not taken as a header
            assert len(values[noise]) == compression.HEADER_BYTES + 4 + 3000
            for cid in leaf_chunk_ids(store, step, "video", "weights"):  # random floats: stored raw
                assert compression.codec_of(values[cid]) is None and len(values[cid]) == 4096
            # the stored value of an encoded chunk is smaller than its raw bytes
            assert sum(len(values[c]) for c in frames) < 72 * 4096 // 2
        for cid, value in values.items():  # every id hashes the raw bytes, whatever is stored
            assert chunk_id(_raw(value)) == cid
        assert store.verify().ok
        stats = store.stats()
        assert stats.stored_bytes < stats.logical_bytes


def _raw(value: bytes) -> bytes:
    if not compression.is_encoded(value):
        return value
    out = bytearray(int.from_bytes(value[5:9], "little"))  # the raw length of the header
    compression.decode_into(value, memoryview(out), {}, "")
    return bytes(out)


def test_the_format4_store_keeps_its_branch_tags_and_metrics(tmp_path):
    path = copy_golden(4, tmp_path / "store")
    name, _, new_step = golden.BRANCH
    with castore.Store(path, readonly=True) as store:
        assert store.tags() == {golden.TAG[0]: golden.TAG[1]}
        assert store.tags(branch=name) == {golden.BRANCH_TAG[0]: golden.BRANCH_TAG[1]}
        for step in golden.STEPS:
            assert store.metrics(step) == golden.metrics(step)
    with castore.Store(path) as store:
        assert store.plan_gc().steps == (golden.DELETED_STEP,)
        store.gc()
        assert_golden_steps(store, 4)
        assert store.verify().ok
    # a writer migrates a format-4 store by its format number alone
    assert dict(config_of(path), format=4) == config_of(DATA / "store-v4")
    assert config_of(path)["format"] == STORE_FORMAT


def test_a_format3_reader_refuses_a_format4_store(tmp_path, monkeypatch):
    """What castore 0.4.0 does with a format-4 store: its config check says upgrade."""
    path = copy_golden(4, tmp_path / "store")
    monkeypatch.setattr(config_module, "STORE_FORMAT", 3)  # the check of a reader up to format 3
    for readonly in (True, False):
        with pytest.raises(castore.FormatError, match=r"format 4\b.*reads up to 3.*upgrade castore"):
            castore.Store(path, readonly=readonly)
    assert config_of(path)["format"] == 4


def old_castore_refusals(tmp_path, commit: str, version: str, store) -> list[str]:
    """What the castore of ``commit`` (``version``, from this repository's history) says
    opening ``store`` read-only and writable: one FormatError message each."""
    old = tmp_path / f"castore-{version}"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "castore"], capture_output=True, check=False)
    if archive.returncode:
        pytest.skip(f"commit {commit} is not in this clone")
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    script = (
        "import sys, castore\n"
        f"assert castore.__version__ == {version!r}, castore.__file__\n"
        "for readonly in (True, False):\n"
        "    try:\n"
        "        castore.Store(sys.argv[1], readonly=readonly)\n"
        "    except castore.FormatError as exc:\n"
        "        print(exc)\n"
        "    else:\n"
        "        sys.exit('opened')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(old))
    done = subprocess.run([sys.executable, "-c", script, str(store)], env=env, cwd=old, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_castore_0_4_0_itself_refuses_a_format4_store(tmp_path):
    """The real format-3 reader (commit 061472b, from this repository's history) refuses."""
    path = copy_golden(4, tmp_path / "store")
    lines = old_castore_refusals(tmp_path, LAST_FORMAT3, "0.4.0", path)
    assert len(lines) == 2 and all("format 4" in line and "upgrade castore" in line for line in lines)
    assert config_of(path)["format"] == 4


LAST_FORMAT4 = "a4f635b"  #: castore 0.5.0, the last commit that reads only up to format 4


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_castore_0_5_0_itself_refuses_a_format5_store(tmp_path):
    """A store with typed nodes (format 5) is refused by the real 0.5.0 reader, which
    would otherwise take the new nodes for damage."""
    path = tmp_path / "store"
    with castore.Store(path) as store:
        store.save(0, {"opt": {"state": {0: {"step": 3}}, "groups": collections.OrderedDict(lr=0.1)}})
    assert config_of(path)["format"] == STORE_FORMAT == 5
    lines = old_castore_refusals(tmp_path, LAST_FORMAT4, "0.5.0", path)
    assert len(lines) == 2 and all("format 5" in line and "upgrade castore" in line for line in lines)
    with castore.Store(path, readonly=True) as store:
        assert store.load(0)["opt"]["state"] == {0: {"step": 3}}

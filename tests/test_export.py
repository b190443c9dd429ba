"""export_step: every leaf round-trips through plain files, and hostile names stay inside out_dir."""

from __future__ import annotations

import itertools
import json
import os
import re
import tempfile
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import castore
from castore.format.codec import join
from castore.tools.cli import main
from castore.tools.export import DEEP, INDEX, LEAVES, MAX_NAME, encode_name, export_step

HOSTILE = [
    "../../evil",
    "/etc/passwd",
    "a/../../b",
    "..",
    ".",
    "a\x00b",
    "",
    " ",
    "a b",
    "W",
    "w",
    "%2E%2E",
    "%",
    "~deep",
    INDEX,
    LEAVES,
    "leaves",
    "a.npy",
    "a",
    "x" * 5000,
    "ü" * 300,
    "\n",
    "\\..\\x",
    "con",
    "😀/..",
    "-rf",
]


def hostile_tree(seed: int) -> dict:
    """A component with every hostile key as a leaf and as a dict, of every leaf type."""
    rng = np.random.default_rng(seed)
    tree = {}
    for i, key in enumerate(HOSTILE):
        tree[key] = rng.integers(0, 1000, 200 + i).astype(np.int32)  # > 512 bytes: stored in chunks
    tree["nested"] = {key: {key: np.float32(i), "v": [i, key]} for i, key in enumerate(HOSTILE)}
    tree["a.npy"] = {"inner": np.arange(3)}  # a directory named like the file of leaf "a"
    tree["leaves.json"] = {"x": 1}  # a directory named like the component's index
    tree["a/b"], tree["slash"] = 1, {"a": {"b": 2}}  # the same "/"-joined leaf path shape
    deep = np.arange(5, dtype=np.uint16)
    for level in range(40):  # 40 keys of 60 characters: a path too long for most filesystems
        deep = {f"{level:02d}" + "d" * 58: deep}
    tree["deep"] = deep
    tree["types"] = {
        "bf16": np.linspace(-2, 2, 300).astype(ml_dtypes.bfloat16),
        "f8": np.arange(8).astype(ml_dtypes.float8_e4m3fn),
        "u3": np.array(["ab", "ü", ""], "<U3"),
        "s2": np.array([b"x", b"\x00y"], "S2"),
        "dt": np.array([1, 2], "<M8[ns]"),
        "c": np.array([1 + 2j], np.complex64),
        "be": np.arange(4, dtype=">i8"),
        "zero_d": np.array(3.5),
        "empty": np.zeros((0, 4), np.float16),
        "scalars": (np.int8(-3), np.float64(np.nan), np.bool_(True), ml_dtypes.bfloat16(1.5)),
        "values": [
            None,
            True,
            False,
            0,
            -(2**70),
            2**64 - 1,
            0.1,
            float("nan"),
            float("inf"),
            -float("inf"),
            "",
            "a\x00b",
            "😀",
        ],
        "bytes": [b"", b"\x00" * 10, bytes(range(256)) * 4],
    }
    return tree


def component_names() -> list[str]:
    return [name for name in HOSTILE if name] + ["ok"]  # component names are non-empty


def step_tree(seed: int) -> dict:
    tree = {name: {"w": np.full(130 + i, i, np.int32), "k": name} for i, name in enumerate(component_names())}
    tree["hostile"] = hostile_tree(seed)
    tree["leaf"] = np.arange(1000, dtype=np.float64)  # a component that is one leaf
    tree["number"] = 7
    return tree


def shards():
    for index in range(3):
        yield {"obs": np.full((10, 100), index, np.uint8), "../../i": index}


def expected_leaves(value, path=()):
    """``{path tuple: value}`` of every leaf, paths as export writes them (keys str, indices int)."""
    if type(value) is dict:
        items = value.items()
    elif type(value) in (list, tuple):
        items = enumerate(value)
    else:
        return {path: value}
    out = {}
    for key, child in items:
        out.update(expected_leaves(child, (*path, key)))
    return out


def read_export(out: Path) -> dict:
    """``{component: {path tuple: value}}`` read back from an export directory."""
    index = json.loads((out / INDEX).read_text())
    assert index["format"] == "castore-export/1"
    result = {}
    for component in index["components"]:
        leaves = json.loads((out / component["dir"] / LEAVES).read_text())
        values = {}
        for entry in leaves:
            kind = entry["kind"]
            if kind in ("array", "scalar"):
                array = np.load(out / entry["file"], allow_pickle=False)
                if entry["dtype"] in ("bfloat16", "float8_e4m3fn"):
                    array = array.view(getattr(ml_dtypes, entry["dtype"]))
                assert array.dtype == castore.format.codec.dtype_from_name(entry["dtype"])
                assert list(array.shape) == entry["shape"]
                value = array[()] if kind == "scalar" else array
            elif kind == "bytes":
                value = (out / entry["file"]).read_bytes()
            elif kind == "float":
                value = float(entry["value"])
            else:
                value = entry["value"]
            values[tuple(entry["path"])] = value
        result[component["name"]] = values
    return result


def assert_same_leaves(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for path, value in want.items():
        other = got[path]
        assert type(other) is type(value), path
        if isinstance(value, (np.ndarray, np.generic)):
            assert other.dtype == value.dtype and np.shape(other) == np.shape(value), path
            assert np.asarray(other).tobytes() == np.asarray(value).tobytes(), path
        elif isinstance(value, float):
            assert other == value or (np.isnan(other) and np.isnan(value)), path
        else:
            assert other == value, path


def snapshot(root: Path, *skip: Path) -> dict:
    """Every path under ``root`` (except under ``skip``), files with their size and mtime."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) not in skip]
        found.update((Path(dirpath, d), "dir") for d in dirnames)
        for name in filenames:
            stat = os.lstat(Path(dirpath, name))
            found[Path(dirpath, name)] = (stat.st_size, stat.st_mtime_ns)
    return found


def assert_all_inside(out: Path) -> None:
    real = os.path.realpath(out)
    for dirpath, dirnames, filenames in os.walk(out):
        for name in filenames + dirnames:
            path = Path(dirpath, name)
            assert not path.is_symlink()
            assert os.path.commonpath([real, os.path.realpath(path)]) == real
            assert re.fullmatch(r"[A-Za-z0-9._%~-]+", name) and not name.startswith("."), name
            assert len(name.encode()) <= 255


@pytest.fixture
def hostile_store(tmp_path):
    with castore.Store(tmp_path / "store", chunk_bytes=4096) as store:
        tree = step_tree(1)
        store.save(5, dict(tree, sharded=shards()))
        store.tag("best", 5)
        yield store, dict(tree, sharded=list(shards()))


def test_every_leaf_of_hostile_names_round_trips_inside_out_dir(tmp_path, hostile_store):
    store, tree = hostile_store
    sentinel = tmp_path / "a" / "sentinel"
    sentinel.mkdir(parents=True)
    (sentinel / "keep").write_text("keep")
    out = tmp_path / "a" / "b" / "out"
    out.parent.mkdir()
    before = snapshot(tmp_path, out, tmp_path / "store")
    result = export_step(store, 5, out)
    assert snapshot(tmp_path, out, tmp_path / "store") == before  # nothing written outside out_dir
    assert_all_inside(out)
    got = read_export(out)
    assert list(got) == list(tree)  # every component, in order, by its real name
    for name, value in tree.items():
        want = expected_leaves(value)
        if name == "sharded":
            want = {(i, *path): v for i, shard in enumerate(value) for path, v in expected_leaves(shard).items()}
        assert_same_leaves(got[name], want)
    files = [p for p in out.rglob("*") if p.is_file() and p.name not in (INDEX, LEAVES)]
    assert result.files == len(files) and result.leaves == sum(map(len, got.values()))
    assert len({str(p).casefold() for p in out.rglob("*")}) == len(list(out.rglob("*")))  # no case clash
    assert (out / "hostile" / DEEP).is_dir()  # the 40-level path went to ~deep
    assert (out / "leaf" / "value.npy").is_file()


def test_names_are_percent_encoded_and_distinct():
    assert encode_name("..") == "%2E." and encode_name(".") == "%2E" and encode_name("") == "%"
    assert encode_name("a/b") == "a%2Fb" and encode_name("a\x00b") == "a%00b"
    assert encode_name(".hidden") == "%2Ehidden" and encode_name("ü") == "%C3%BC"
    assert encode_name("ok_name-1.npy") == "ok_name-1.npy"
    names = [encode_name(k) for k in HOSTILE]
    assert len(set(names)) == len(HOSTILE)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=20), unique=True, max_size=30))
def test_encoding_is_injective_and_safe(keys):
    names = [encode_name(k) for k in keys]
    assert len(set(names)) == len(keys)
    for name in names:
        assert re.fullmatch(r"[A-Za-z0-9._%-]+", name) and name not in (".", "..") and not name.startswith(".")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=12),
        st.recursive(
            st.one_of(
                st.integers(-5, 5),
                st.text(max_size=5),
                st.binary(max_size=600).map(lambda b: np.frombuffer(b, np.uint8)),
            ),
            lambda inner: st.dictionaries(st.text(max_size=12), inner, max_size=4),
            max_leaves=12,
        ),
        min_size=1,
        max_size=4,
    )
)
def test_random_trees_with_random_names_round_trip(tree):
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        with castore.Store(root / "store", chunk_bytes=4096) as store:
            store.save(1, tree)
            out = root / "x" / "out"
            export_step(store, 1, out)
        assert sorted(os.listdir(root)) == ["store", "x"] and os.listdir(root / "x") == ["out"]
        assert_all_inside(out)
        got = read_export(out)
        for name, value in tree.items():
            assert_same_leaves(got[name], expected_leaves(value))


def test_a_non_empty_directory_is_refused_unless_overwrite(tmp_path, hostile_store):
    store, _ = hostile_store
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    with pytest.raises(castore.UsageError, match="not empty"):
        export_step(store, 5, out, keys=["ok"])
    assert os.listdir(out) == ["mine.txt"]
    export_step(store, 5, out, keys=["ok"], overwrite=True)
    export_step(store, "best", out, keys="ok", overwrite=True)  # again, by tag: files replaced
    assert (out / "mine.txt").read_text() == "mine"
    assert sorted(os.listdir(out)) == [INDEX, "mine.txt", "ok"]
    (tmp_path / "file").write_text("")
    with pytest.raises(castore.UsageError, match="not a directory"):
        export_step(store, 5, tmp_path / "file")


def test_symlinks_planted_in_out_dir_are_not_followed(tmp_path, hostile_store):
    store, _ = hostile_store
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "w.npy").write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(outside, out / "ok")  # the component's directory leads outside
    with pytest.raises(castore.UsageError, match="outside"):
        export_step(store, 5, out, keys=["ok"], overwrite=True)
    assert os.listdir(outside) == ["w.npy"] and (outside / "w.npy").read_text() == "precious"
    os.unlink(out / "ok")
    (out / "ok").mkdir()
    os.symlink(outside / "w.npy", out / "ok" / "w.npy")  # the file itself leads outside
    with pytest.raises(castore.UsageError, match="symlink"):
        export_step(store, 5, out, keys=["ok"], overwrite=True)
    assert (outside / "w.npy").read_text() == "precious"


def test_unknown_components_and_steps_are_refused_before_writing(tmp_path, hostile_store):
    store, _ = hostile_store
    with pytest.raises(castore.StepNotFoundError, match="no component 'nope'"):
        export_step(store, 5, tmp_path / "out", keys=["ok", "nope"])
    with pytest.raises(castore.StepNotFoundError):
        export_step(store, 6, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_long_names_are_cut_with_a_hash(tmp_path):
    keys = ["y" * 300, "y" * 299 + "z", "Y" * 300]  # same cut prefix; and a case twin
    with castore.Store(tmp_path / "store") as store:
        store.save(1, {"c": {k: np.full(200, i) for i, k in enumerate(keys)}})
        export_step(store, 1, tmp_path / "out")
    names = sorted(os.listdir(tmp_path / "out" / "c"))
    assert len(names) == 4 and all(len(n) <= MAX_NAME + 4 for n in names)
    got = read_export(tmp_path / "out")["c"]
    assert [int(got[(k,)][0]) for k in keys] == [0, 1, 2]


def test_cli_export(tmp_path, capsys, hostile_store):
    store, tree = hostile_store
    path = store.path
    store.close()
    out = tmp_path / "cli-out"
    assert main(["export", path, "5", str(out), "--keys", "ok", "leaf"]) == 0
    assert "step 5: 2 components" in capsys.readouterr().out
    got = read_export(out)
    assert_same_leaves(got["leaf"], {(): tree["leaf"]})
    assert main(["export", path, "best", str(out)]) == 2  # not empty: a usage error
    assert "not empty" in capsys.readouterr().err
    assert main(["export", path, "best", str(out), "--overwrite"]) == 0
    assert list(read_export(out)) == list(tree)
    assert main(["export", path, "nosuchtag", str(tmp_path / "x")]) == 2
    assert "no tag 'nosuchtag'" in capsys.readouterr().err


def test_pairs_of_hostile_names_never_share_a_file(tmp_path):
    """Every two hostile keys side by side, as leaves and as directories: no file is shared."""
    with castore.Store(tmp_path / "store") as store:
        for step, (a, b) in enumerate(itertools.combinations(HOSTILE[:12], 2)):
            tree = {"c": {a: np.full(200, 1), b: {a: np.full(200, 2), b: 3}}}
            paths = [a, join(b, a), join(b, b)]
            if len(set(paths)) < 3:  # e.g. b == "": leaves a and ""/a share the path a
                with pytest.raises(castore.UnsupportedValueError, match="two leaves have this path"):
                    store.save(step, tree)
                continue
            store.save(step, tree)
            out = tmp_path / f"out{step}"
            export_step(store, step, out)
            got = read_export(out)["c"]
            assert int(got[(a,)][0]) == 1 and int(got[(b, a)][0]) == 2 and got[(b, b)] == 3


def test_a_tag_on_another_branch_exports_that_branch_step(tmp_path):
    path = str(tmp_path / "store")
    cp = castore.Checkpoint(path)
    for s in range(1, 5):
        cp.w = np.full(4, s, np.float32)
        cp.save(s)
    cp.tag("best", 3)
    cp.load(step=2)
    cp.w = np.full(4, 100, np.float32)
    cp.save()  # main's step 3 is new; the tagged one moved to main-abandoned-2
    cp.close()
    assert main(["export", path, "best", str(tmp_path / "out")]) == 0
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    assert (index["branch"], index["step"]) == ("main-abandoned-2", 3)
    assert read_export(tmp_path / "out")["w"][()].tolist() == [3.0] * 4


def test_framework_values_and_typed_containers_export_as_arrays_and_dicts(tmp_path):
    import collections
    import typing

    import jax.numpy as jnp
    import torch

    class Moments(typing.NamedTuple):
        mu: object
        count: int

    model = torch.nn.Linear(3, 2)
    tree = {
        "model": model.state_dict(),  # an OrderedDict of tensors
        "opt": {"state": {0: {"step": torch.tensor(3.0), "m": torch.ones(2, dtype=torch.bfloat16)}}},
        "jax": Moments(jnp.arange(4.0), 7),
        "od": collections.OrderedDict(b=1, a=np.arange(3)),
    }
    with castore.Store(tmp_path / "store") as store:
        store.save(0, tree)
        export_step(store, 0, tmp_path / "out")
    got = read_export(tmp_path / "out")
    assert np.array_equal(got["model"][("weight",)], model.weight.detach().numpy())
    assert got["opt"][("state", "0", "step")] == 3.0
    assert got["opt"][("state", "0", "m")].dtype == ml_dtypes.bfloat16
    assert np.array_equal(got["jax"][("mu",)], np.arange(4.0)) and got["jax"][("count",)] == 7
    assert list(got["od"]) == [("b",), ("a",)]
    entries = json.loads((tmp_path / "out" / "model" / LEAVES).read_text())
    assert {e["framework"] for e in entries} == {"torch"}


def imported_leaves(out: Path, root: Path) -> dict:
    """``{component: {path tuple: value}}`` of an export imported into a fresh store."""
    from castore.tools.importer import import_dir

    result = import_dir(out, root / "imported")
    with castore.Store(root / "imported", readonly=True) as store:
        loaded = store.load(result.step)
        return {name: expected_leaves(list(value) if name == "sharded" else value) for name, value in loaded.items()}


def test_hostile_names_round_trip_through_npz_inside_out_dir(tmp_path, hostile_store):
    store, tree = hostile_store
    out = tmp_path / "out"
    result = export_step(store, 5, out, format="npz")
    assert_all_inside(out)
    assert result.format == "npz" and result.files == len(list(out.rglob("*.npz")))
    for archive in out.rglob("*.npz"):
        with zipfile.ZipFile(archive) as members:
            for name in members.namelist():  # safe to unzip anywhere: derived names only
                assert not name.startswith("/") and ".." not in name.split("/"), name
                assert all(re.fullmatch(r"[A-Za-z0-9._%~-]+", part) for part in name.split("/")), name
    got = imported_leaves(out, tmp_path)
    assert list(got) == list(tree)
    for name, value in tree.items():
        want = expected_leaves(value)
        if name == "sharded":
            want = {(i, *path): v for i, shard in enumerate(value) for path, v in expected_leaves(shard).items()}
        assert_same_leaves(got[name], want)


def test_safetensors_refuses_dtypes_it_cannot_name_before_writing_the_component(tmp_path, hostile_store):
    store, tree = hostile_store
    out = tmp_path / "out"
    with pytest.raises(castore.UnsupportedValueError, match=r"hostile/types/u3.*--format npy"):
        export_step(store, 5, out, keys=["ok", "hostile"], format="safetensors")
    assert (out / "ok" / "ok.safetensors").is_file()  # the component before it is complete
    assert not list(out.glob("hostile/*.safetensors"))  # nothing of the refused one
    names = [name for name in tree if name != "hostile"]
    export_step(store, 5, out, keys=names, format="safetensors", overwrite=True)
    assert_all_inside(out)
    got = imported_leaves(out, tmp_path)
    for name in names:
        want = expected_leaves(tree[name])
        if name == "sharded":
            want = {(i, *path): v for i, shard in enumerate(tree[name]) for path, v in expected_leaves(shard).items()}
        assert_same_leaves(got[name], want)
    header = json.loads((out / "sharded" / "sharded-0001.safetensors").read_bytes()[8:].split(b"}}")[0] + b"}}")
    assert header["__metadata__"]["shard"] == "1" and "obs" in header  # keys relative to the shard


def test_every_ml_dtype_npy_file_loads_in_plain_numpy(tmp_path):
    kinds = ["bfloat16", "float8_e4m3fn", "float8_e5m2"]  # numpy names float8_e5m2 "<f1", which it cannot read back
    with castore.Store(tmp_path / "store") as store:
        store.save(1, {"c": {k: np.arange(4).astype(getattr(ml_dtypes, k)) for k in kinds}})
        export_step(store, 1, tmp_path / "out")
    for kind in kinds:
        array = np.load(tmp_path / "out" / "c" / f"{kind}.npy", allow_pickle=False)
        assert array.view(getattr(ml_dtypes, kind)).astype(np.float32).tolist() == [0, 1, 2, 3]


def test_an_unknown_format_is_refused(tmp_path, hostile_store):
    store, _ = hostile_store
    with pytest.raises(castore.UsageError, match="unknown export format"):
        export_step(store, 5, tmp_path / "out", format="hdf5")
    assert not (tmp_path / "out").exists()

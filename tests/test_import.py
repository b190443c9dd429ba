"""import_dir: every export layout comes back as the step it was, plain npz/safetensors files
import, and damaged or hostile input only ever raises castore errors."""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_export import assert_same_leaves, expected_leaves

import castore
from castore.tools.export import FORMATS, INDEX, LEAVES, export_nbytes, export_step
from castore.tools.importer import ImportResult, import_dir
from castore.tools.safetensors_io import MAX_HEADER

SAFETENSORS_DTYPES = [
    np.bool_,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.float16,
    np.float32,
    np.float64,
    ml_dtypes.bfloat16,
    ml_dtypes.float8_e4m3fn,
    ml_dtypes.float8_e5m2,
    ">i4",  # written little-endian, restored big-endian from leaves.json
]
OTHER_DTYPES = [np.complex64, "<U3", "S2", "<M8[ns]"]  # npy and npz only


def arrays(dtypes):
    def build(draw):
        dtype = np.dtype(draw(st.sampled_from(dtypes)))
        shape = draw(st.sampled_from([(), (0,), (3,), (2, 0), (4, 3), (2, 3, 2)]))
        data = draw(st.binary(min_size=dtype.itemsize * 24, max_size=dtype.itemsize * 24))
        flat = np.frombuffer(data, np.uint8).copy()
        if dtype == np.bool_:
            flat &= 1
        if dtype.kind == "M":
            flat[:] = 0
        array = flat.view(dtype)[: int(np.prod(shape))].reshape(shape)
        if draw(st.booleans()) and array.ndim:  # non-contiguous: saved (and exported) as a copy
            array = np.repeat(array, 2, axis=0)[::2]
        if draw(st.booleans()) and array.ndim == 0:
            return array[()]  # a numpy scalar
        return array

    return st.composite(lambda draw: build(draw))()


def plain():
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=6),
        st.binary(max_size=40),
    )


def trees(dtypes):
    keys = st.text(alphabet="ab._-ü %", min_size=0, max_size=5)
    leaf = st.one_of(arrays(dtypes), plain())
    node = st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.dictionaries(keys, inner, min_size=1, max_size=3),
            st.lists(inner, min_size=1, max_size=3),
            st.lists(inner, min_size=1, max_size=3).map(tuple),
        ),
        max_leaves=10,
    )
    return st.dictionaries(st.text(alphabet="abc", min_size=1, max_size=3), node, min_size=1, max_size=3)


def as_lists(value):
    """What an import gives back for ``value``: tuples as lists, non-contiguous arrays as copies."""
    if type(value) in (list, tuple):
        return [as_lists(v) for v in value]
    if type(value) is dict:
        return {k: as_lists(v) for k, v in value.items()}
    return value


def assert_imported(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name in want:
        assert_same_leaves(expected_leaves(got[name]), expected_leaves(as_lists(want[name])))
        assert type(got[name]) is type(as_lists(want[name]))


def round_trip(tree: dict, layout: str, root: Path) -> dict:
    with castore.Store(root / "a", chunk_bytes=4096) as store:
        store.save(7, tree)
        export_step(store, 7, root / "out", format=layout)
    result = import_dir(root / "out", root / "b")
    assert result.step == 7 and result.layout == layout and result.components == tuple(tree)
    with castore.Store(root / "b", readonly=True) as store:
        return store.load(7)


@pytest.mark.parametrize("layout", FORMATS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_layout_round_trips(layout, data):
    dtypes = SAFETENSORS_DTYPES + ([] if layout == "safetensors" else OTHER_DTYPES)
    tree = data.draw(trees(dtypes))
    with tempfile.TemporaryDirectory() as scratch:
        assert_imported(round_trip(tree, layout, Path(scratch)), tree)


@pytest.mark.parametrize("layout", FORMATS)
def test_a_full_tree_round_trips_with_shards_and_progress(tmp_path, layout):
    def shards():
        for i in range(3):
            yield {"obs": np.full((4, 5), i, np.uint8), "i": i, "raw": bytes([i]) * 3}

    tree = {
        "model": {
            "w": np.arange(24, dtype=np.float32).reshape(4, 6),
            "bf": np.linspace(-1, 1, 7).astype(ml_dtypes.bfloat16),
            "f8": np.arange(5).astype(ml_dtypes.float8_e5m2),
            "__metadata__": np.zeros(2),
            "big": np.arange(400_000, dtype=np.float64),  # mapped, not read, on import
            "layers": [{"k": np.ones(3)}, (np.int8(-3), 2.5, "x")],
        },
        "step": 12,
        "leaf": np.arange(3),
    }
    with castore.Store(tmp_path / "a", chunk_bytes=4096) as store:
        store.save(3, dict(tree, sharded=shards()))
        told: list[int] = []
        result = export_step(store, 3, tmp_path / "out", format=layout, progress=told.append)
        assert sum(told) == result.data_nbytes == export_nbytes(store, 3)
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    assert index["layout"] == layout and index["components"][-1]["sharded"] is True
    read: list[int] = []
    imported = import_dir(tmp_path / "out", tmp_path / "b", progress=read.append)
    assert sum(read) == imported.nbytes == result.data_nbytes
    with castore.Store(tmp_path / "b") as store:
        got = store.load(3)
        shard_list = list(got.pop("sharded"))
        assert_imported(got, tree)
        assert_imported({"s": shard_list}, {"s": list(shards())})
    again = import_dir(tmp_path / "out", tmp_path / "b")  # the same state again: nothing new
    assert again.unchanged and again.new_bytes == 0
    with pytest.raises(castore.StepExistsError):
        import_dir(tmp_path / "out", tmp_path / "b", keys=["model"])
    other = import_dir(tmp_path / "out", tmp_path / "b", keys=["model"], step=4)
    assert other.components == ("model",) and other.step == 4
    import_dir(tmp_path / "out", tmp_path / "b", keys=["model"], overwrite=True)
    with castore.Store(tmp_path / "b") as store:
        assert list(store.load(3)) == ["model"]


def test_an_open_store_and_a_branch(tmp_path):
    with castore.Store(tmp_path / "a") as store:
        store.save(1, {"w": np.arange(4)})
        export_step(store, 1, tmp_path / "out", format="safetensors")
    with castore.Store(tmp_path / "b", branch="side") as store:
        result = import_dir(tmp_path / "out", store, step=9)
        assert (result.branch, result.step) == ("side", 9) and store.steps() == [9]
        with pytest.raises(castore.UsageError, match="branch"):
            import_dir(tmp_path / "out", store, branch="main")


# --- the real safetensors library and numpy's npz --------------------------------------------------


def test_our_safetensors_files_open_in_the_safetensors_library(tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file as torch_load

    arrays = {
        "a/w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "a/b": np.arange(3, dtype=np.int64),
        "m": np.array([True, False]),
        "s": np.float64(2.5),
        "e": np.zeros((0, 3), np.float16),
        "u": np.arange(5, dtype=np.uint16),
    }
    with castore.Store(tmp_path / "s") as store:
        store.save(2, {"np": {"a": {"w": arrays["a/w"], "b": arrays["a/b"]}, **{k: arrays[k] for k in "mseu"}}})
        store.save(3, {"bf": {"x": np.linspace(0, 1, 6).astype(ml_dtypes.bfloat16), "raw": b"\x01\x02"}})
        export_step(store, 2, tmp_path / "out2", format="safetensors")
        export_step(store, 3, tmp_path / "out3", format="safetensors")
    loaded = safetensors.numpy.load_file(tmp_path / "out2" / "np" / "np.safetensors")
    assert sorted(loaded) == sorted(arrays)
    for key, want in arrays.items():
        assert loaded[key].dtype == np.asarray(want).dtype and np.array_equal(loaded[key], want)
    with safe_open(tmp_path / "out2" / "np" / "np.safetensors", framework="np") as file:
        assert file.metadata() == {"format": "castore-export/1", "component": "np", "step": "2"}
        assert np.array_equal(file.get_tensor("a/w"), arrays["a/w"])
    tensors = torch_load(tmp_path / "out3" / "bf" / "bf.safetensors")
    assert tensors["x"].dtype == torch.bfloat16
    want = torch.from_numpy(np.linspace(0, 1, 6).astype(ml_dtypes.bfloat16).view(np.int16)).view(torch.bfloat16)
    assert torch.equal(tensors["x"], want) and tensors["raw"].tolist() == [1, 2]


def test_files_the_safetensors_library_and_numpy_write_import(tmp_path):
    import torch
    from safetensors.torch import save_file as torch_save

    src = tmp_path / "src"
    src.mkdir()
    numpy_arrays = {"layer.0.weight": np.arange(6.0).reshape(2, 3), "b/c": np.arange(4, dtype=np.int8)}
    safetensors.numpy.save_file(numpy_arrays, src / "np_model.safetensors", metadata={"who": "numpy"})
    weight = torch.randn(3, 4).to(torch.bfloat16)
    torch_save({"w": weight, "n": torch.arange(3, dtype=torch.int32)}, src / "torch_model.safetensors")
    np.savez(src / "plain.npz", a=np.arange(3), f=np.asfortranarray(np.arange(6.0).reshape(2, 3)), z=np.array(5))
    np.savez_compressed(src / "packed.npz", np.eye(3), big=np.zeros(100_000, np.float32))
    (src / "notes.txt").write_text("ignored")
    result = import_dir(src, tmp_path / "store", step=1)
    assert result.layout == "files"
    assert result.components == ("np_model", "packed", "plain", "torch_model")
    with castore.Store(tmp_path / "store") as store:
        got = store.load(1)
    assert_same_leaves(expected_leaves(got["np_model"]), expected_leaves(numpy_arrays))
    bf16 = got["torch_model"]["w"]
    assert bf16.dtype == ml_dtypes.bfloat16 and bf16.tobytes() == weight.view(torch.int16).numpy().tobytes()
    assert got["torch_model"]["n"].tolist() == [0, 1, 2]
    assert np.array_equal(got["plain"]["f"], np.arange(6.0).reshape(2, 3)) and got["plain"]["z"].shape == ()
    assert np.array_equal(got["packed"]["arr_0"], np.eye(3)) and got["packed"]["big"].shape == (100_000,)
    one = import_dir(src / "plain.npz", tmp_path / "store", step=2)
    assert one.components == ("plain",) and one.leaves == 3
    with pytest.raises(castore.UsageError, match="step="):
        import_dir(src / "plain.npz", tmp_path / "store")
    with pytest.raises(castore.UsageError, match="no component"):
        import_dir(src, tmp_path / "store", step=3, keys=["nope"])
    np.savez(src / "plain.safetensors.npz", a=np.arange(2))
    (src / "plain.safetensors").write_bytes((src / "np_model.safetensors").read_bytes())
    with pytest.raises(castore.UsageError, match="both be component 'plain'"):
        import_dir(src, tmp_path / "store", step=3)


# --- damaged and hostile input ------------------------------------------------------------------


def raw_safetensors(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def tensor(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD_SAFETENSORS = {
    "shorter than its length": b"\x01\x02",
    "huge header length": raw_safetensors(b"{}", length=MAX_HEADER + 1),
    "header past the end": raw_safetensors(b"{}", length=1000),
    "header not JSON": raw_safetensors(b"{nope"),
    "header not an object": raw_safetensors(b"[]  "),
    "header not UTF-8": raw_safetensors(b'{"\xff": 1}'),
    "NaN in the header": raw_safetensors(b'{"__metadata__": {"a": NaN}}'),
    "unknown dtype": raw_safetensors({"x": tensor(dtype="F128")}, bytes(8)),
    "offsets past the data": raw_safetensors({"x": tensor(offsets=(0, 16), shape=(4,))}, bytes(8)),
    "overlapping": raw_safetensors({"x": tensor(), "y": tensor(offsets=(4, 12))}, bytes(12)),
    "a hole": raw_safetensors({"x": tensor(offsets=(4, 12))}, bytes(12)),
    "trailing bytes": raw_safetensors({"x": tensor()}, bytes(12)),
    "shape not the span": raw_safetensors({"x": tensor(shape=(3,))}, bytes(8)),
    "negative shape": raw_safetensors({"x": tensor(shape=(-2,))}, bytes(8)),
    "offsets reversed": raw_safetensors({"x": tensor(offsets=(8, 0))}, bytes(8)),
    "entry not an object": raw_safetensors({"x": [1, 2]}, bytes(8)),
    "duplicate name": raw_safetensors(
        b'{"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
        b'"x": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}',
        bytes(2),
    ),
    "metadata not strings": raw_safetensors({"__metadata__": {"a": 1}}),
    "bool bytes not 0/1": raw_safetensors({"x": tensor("BOOL", (2,), (0, 2))}, b"\x00\x02"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAFETENSORS))
def test_a_malformed_safetensors_file_is_a_migration_error(tmp_path, case):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(BAD_SAFETENSORS[case])
    with pytest.raises(castore.MigrationError, match="bad.safetensors"):
        import_dir(path, tmp_path / "store", step=1)
    with castore.Store(tmp_path / "store") as store:
        assert store.steps() == []


def npz_bytes(**arrays) -> bytes:
    path = Path(tempfile.mkdtemp()) / "x.npz"
    np.savez(path, **arrays)
    return path.read_bytes()


def flipped(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def lying_npz() -> bytes:
    """A member whose .npy header declares more elements than it holds."""
    buffer = Path(tempfile.mkdtemp()) / "x.npz"
    with zipfile.ZipFile(buffer, "w") as archive:
        header = np.lib.format.header_data_from_array_1_0(np.zeros(100))
        with archive.open("a.npy", "w") as member:
            np.lib.format.write_array_header_1_0(member, header)
            member.write(bytes(80))
    return buffer.read_bytes()


BAD_NPZ = {
    "not a zip": b"PK but not really",
    "truncated": npz_bytes(a=np.arange(100))[:-30],
    "CRC fails": flipped(npz_bytes(a=np.arange(100)), 300),
    "object array": npz_bytes(a=np.array([{}, None], dtype=object)),
    "declares more than it holds": lying_npz(),
    "not .npy inside": flipped(npz_bytes(a=np.arange(100)), 80),
}


@pytest.mark.parametrize("case", sorted(BAD_NPZ))
def test_a_damaged_npz_is_a_migration_error(tmp_path, case):
    path = tmp_path / "bad.npz"
    path.write_bytes(BAD_NPZ[case])
    with pytest.raises(castore.MigrationError, match="bad.npz"):
        import_dir(path, tmp_path / "store", step=1)


@pytest.fixture
def exported(tmp_path):
    """``(out, layout)`` factory: a small export whose files a test may damage."""

    def make(layout: str) -> Path:
        out = tmp_path / f"out-{layout}"
        with castore.Store(tmp_path / f"src-{layout}") as store:
            store.save(5, {"c": {"w": np.arange(300, dtype=np.float32), "l": [1, np.arange(3)], "b": b"xy"}})
            export_step(store, 5, out, format=layout)
        return out

    return make


def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    path.write_text(json.dumps(change(value)))


def set_in_first(key, value):
    def change(entries):
        entries[0][key] = value
        return entries

    return change


BAD_EXPORTS = {
    "file ../": ("npy", LEAVES, set_in_first("file", "../../etc/passwd")),
    "file absolute": ("npy", LEAVES, set_in_first("file", "/etc/passwd")),
    "file empty part": ("npz", LEAVES, set_in_first("file", "c//c.npz")),
    "file not a string": ("safetensors", LEAVES, set_in_first("file", 7)),
    "file missing": ("npy", LEAVES, set_in_first("file", "c/nope.npy")),
    "key missing from container": ("safetensors", LEAVES, set_in_first("key", "nope")),
    "key missing from npz": ("npz", LEAVES, set_in_first("key", "nope")),
    "unknown kind": ("npy", LEAVES, set_in_first("kind", "pickle")),
    "bad dtype": ("npz", LEAVES, set_in_first("dtype", "i4,i4")),
    "dtype not the file's": ("safetensors", LEAVES, set_in_first("dtype", "<i8")),
    "shape not the file's": ("npy", LEAVES, set_in_first("shape", [2, 150])),
    "path not a list": ("npy", LEAVES, set_in_first("path", "w")),
    "path holds a float": ("npy", LEAVES, set_in_first("path", [1.5])),
    "path mixes keys and indices": ("npy", LEAVES, set_in_first("path", [0])),
    "path twice": ("npy", LEAVES, lambda e: [e[0], e[0], *e[1:]]),
    "path below a leaf": ("npy", LEAVES, lambda e: [*e, dict(e[0], path=["w", "x"])]),
    "value of the wrong type": ("npy", LEAVES, lambda e: [*e, {"path": ["v"], "kind": "int", "value": "7"}]),
    "float not a float": ("npy", LEAVES, lambda e: [*e, {"path": ["v"], "kind": "float", "value": "nanx"}]),
    "leaves not a list": ("npy", LEAVES, lambda e: {"x": e}),
    "leaves not JSON": ("npy", LEAVES, None),
    "index format": ("npy", INDEX, lambda i: dict(i, format="other/1")),
    "index layout": ("npy", INDEX, lambda i: dict(i, layout="hdf5")),
    "index step": ("npy", INDEX, lambda i: dict(i, step=-1)),
    "index components": ("npy", INDEX, lambda i: dict(i, components={"c": "c"})),
    "index dir ../": ("npy", INDEX, lambda i: dict(i, components=[{"name": "c", "dir": ".."}])),
    "index twice": ("npy", INDEX, lambda i: dict(i, components=i["components"] * 2)),
    "index not JSON": ("npy", INDEX, None),
}


@pytest.mark.parametrize("case", sorted(BAD_EXPORTS))
def test_a_malformed_export_is_a_migration_error(tmp_path, exported, case):
    layout, name, change = BAD_EXPORTS[case]
    out = exported(layout)
    target = out / name if name == INDEX else out / "c" / name
    if change is None:
        target.write_text(target.read_text()[:-5])
    else:
        edit_json(target, change)
    with pytest.raises(castore.MigrationError):
        import_dir(out, tmp_path / "store")
    with castore.Store(tmp_path / "store") as store:
        assert store.steps() == []


@pytest.mark.parametrize("layout", FORMATS)
def test_damaged_data_files_and_symlinks_out_are_migration_errors(tmp_path, exported, layout):
    out = exported(layout)
    data = next(p for p in (out / "c").iterdir() if p.is_file() and p.name != LEAVES and p.stat().st_size > 1000)
    original = data.read_bytes()
    data.write_bytes(original[: len(original) // 2])  # truncated
    with pytest.raises(castore.MigrationError, match=data.name):
        import_dir(out, tmp_path / "store")
    outside = tmp_path / "outside"
    outside.write_bytes(original)
    data.unlink()
    data.symlink_to(outside)  # the right bytes, but outside the export
    with pytest.raises(castore.MigrationError, match="outside|symlink"):
        import_dir(out, tmp_path / "store")
    data.unlink()
    os.symlink(os.path.relpath(out / "c" / LEAVES, data.parent), data)  # inside, but a symlink
    with pytest.raises(castore.MigrationError, match="symlink|regular"):
        import_dir(out, tmp_path / "store")


def test_a_source_that_is_nothing_importable_is_a_usage_error(tmp_path):
    with pytest.raises(castore.UsageError, match="does not exist"):
        import_dir(tmp_path / "nope", tmp_path / "store", step=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(castore.UsageError, match="neither"):
        import_dir(tmp_path / "empty", tmp_path / "store", step=1)
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(castore.UsageError, match="not an export"):
        import_dir(tmp_path / "x.txt", tmp_path / "store", step=1)


def test_a_foreign_dtype_castore_does_not_store_is_named(tmp_path):
    np.savez(tmp_path / "v.npz", v=np.zeros(3, "V2"))
    with pytest.raises(castore.UnsupportedValueError, match="v.npz"):
        import_dir(tmp_path / "v.npz", tmp_path / "store", step=1)


# --- fuzz: random damage only ever raises castore errors -----------------------------------------


def good_safetensors() -> bytes:
    path = Path(tempfile.mkdtemp()) / "x.safetensors"
    safetensors.numpy.save_file(
        {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([True, False]), "c": np.zeros(0, np.int8)},
        path,
        metadata={"k": "v"},
    )
    return path.read_bytes()


GOOD_SAFETENSORS = good_safetensors()


def damage(data: bytes, flips: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for at, value in flips:
        out[at % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
    cut=st.none() | st.integers(0, len(GOOD_SAFETENSORS)),
)
def test_damaged_safetensors_only_raise_castore_errors(tmp_path, flips, cut):
    path = tmp_path / "f.safetensors"
    path.write_bytes(damage(GOOD_SAFETENSORS, flips, cut))
    try:
        result = import_dir(path, tmp_path / "store", step=1, overwrite=True)
    except castore.CastoreError:
        return
    assert isinstance(result, ImportResult)


@pytest.fixture(scope="module")
def leaves_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    with castore.Store(root / "src") as store:
        store.save(1, {"c": {"w": np.arange(10.0), "n": [1, "x", None, 2.5], "b": b"q", "s": np.int8(3)}})
        export_step(store, 1, root / "out", format="safetensors")
    return root / "out"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(b'{}[]",:0123456789-.aeflnrstu/\\ ')), max_size=4),
    cut=st.none() | st.integers(0, 2000),
)
def test_damaged_leaves_json_only_raises_castore_errors(tmp_path, leaves_export, flips, cut):
    out = tmp_path / "out"
    if not out.exists():
        import shutil

        shutil.copytree(leaves_export, out)
    original = (leaves_export / "c" / LEAVES).read_bytes()
    (out / "c" / LEAVES).write_bytes(damage(original, flips, cut))
    try:
        import_dir(out, tmp_path / "store", overwrite=True)
    except castore.CastoreError:
        pass

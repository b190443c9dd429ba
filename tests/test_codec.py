"""Round trips of state trees through a real store, and what is refused."""

import collections

import ml_dtypes
import numpy as np
import pytest
from conftest import assert_tree_equal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import castore
from castore.format import codec

DTYPES = [
    np.bool_,
    np.int8,
    np.uint8,
    np.int16,
    np.uint16,
    np.int32,
    np.uint32,
    np.int64,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.complex64,
    np.complex128,
    ">i4",
    ">f8",
]


def arrays():
    shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=40)
    plain = st.sampled_from(DTYPES).flatmap(lambda dt: hnp.arrays(np.dtype(dt), shapes))
    strided = plain.filter(lambda a: a.ndim >= 1).map(lambda a: a[::2])
    transposed = plain.filter(lambda a: a.ndim >= 2).map(lambda a: a.T)
    return st.one_of(plain, strided, transposed)


def scalars():
    return (
        st.sampled_from(DTYPES)
        .flatmap(lambda dt: hnp.from_dtype(np.dtype(dt)))
        .map(lambda v: v if isinstance(v, np.generic) else np.asarray(v)[()])
    )


leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True),
    st.text(max_size=50),
    st.binary(max_size=3000),
    arrays(),
    scalars(),
)
trees = st.recursive(
    leaves,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.lists(kids, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=8), kids, max_size=4),
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=trees)
def test_any_tree_round_trips_exactly(store, tree):
    step = (store.latest() or 0) + 1
    store.save(step, {"c": tree})
    assert_tree_equal(store.load(step)["c"], tree)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(0, 3000), width=st.integers(1, 300), dtype=st.sampled_from([np.uint8, np.float32, np.int64]))
def test_large_arrays_round_trip_across_many_chunks(store, rows, width, dtype):
    array = (np.arange(rows * width) % 251).astype(dtype).reshape(rows, width)
    step = (store.latest() or 0) + 1
    store.save(step, {"a": array})
    assert_tree_equal(store.load(step)["a"], array)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2])
def test_ml_dtypes_round_trip(store, dtype):
    array = np.linspace(-3, 3, 5000).astype(dtype).reshape(50, 100)
    tree = {"w": array, "s": array[0, 0], "z": np.asarray(array[1, 1])}
    store.save(1, {"p": tree})
    assert_tree_equal(store.load(1)["p"], tree)


def test_memmap_and_exotic_dtypes_round_trip(store, tmp_path):
    mm = np.memmap(tmp_path / "m.bin", dtype=np.float32, mode="w+", shape=(100, 10))
    mm[:] = 3
    tree = {"mm": mm, "t": np.array(["2020-01-01"], dtype="datetime64[ns]"), "u": np.array(["ab", "c"]), "big": 2**100}
    store.save(1, {"x": tree})
    loaded = store.load(1)["x"]
    assert type(loaded["mm"]) is np.ndarray and np.array_equal(loaded["mm"], mm)
    assert loaded["t"].dtype == tree["t"].dtype and loaded["u"].tolist() == ["ab", "c"] and loaded["big"] == 2**100


@pytest.mark.parametrize(
    "value, path",
    [
        ({"a": {"b": object()}}, "c/a/b"),
        ({"a": [1, {(2,): 3}]}, "c/a/1"),  # int keys are stored, tuple keys are not
        ({"a": np.array([object()], dtype=object)}, "c/a"),
        ({"dd": collections.defaultdict(list, x=[1])}, "c/dd"),  # OrderedDict is stored, other subclasses not
        ({"s": {1, 2}}, "c/s"),
        ({"rec": np.zeros(3, dtype=[("x", "f4")])}, "c/rec"),
    ],
)
def test_unsupported_values_raise_naming_the_path(store, value, path):
    with pytest.raises(castore.UnsupportedValueError) as info:
        store.save(1, {"c": value})
    assert info.value.path == path
    assert store.steps() == []


def test_cycles_are_refused_not_recursed_forever(store):
    loop = []
    loop.append(loop)
    with pytest.raises(castore.UnsupportedValueError, match="deeper"):
        store.save(1, {"c": loop})


def test_pickle_needs_opt_in_to_save_and_to_load(tmp_path):
    value = {"s": {1, 2, 3}, "a": np.ones(3)}
    with castore.Store(tmp_path / "s", allow_pickle=True) as s:
        s.save(1, {"c": value})
        assert s.load(1)["c"]["s"] == {1, 2, 3}
    with castore.Store(tmp_path / "s") as s:
        with pytest.raises(castore.UnsupportedValueError, match="allow_pickle"):
            s.load(1)


def test_leaf_paths_selection_and_replacement():
    tree = {"enc": {"w": 1, "b": [2, 3]}, "dec": (4,)}
    assert list(codec.leaves(tree)) == [("enc/w", 1), ("enc/b/0", 2), ("enc/b/1", 3), ("dec/0", 4)]
    assert codec.replace_leaves(tree, {"enc/b/1": 9, "dec/0": 8}) == {"enc": {"w": 1, "b": [2, 9]}, "dec": (8,)}


def test_unknown_or_unsafe_dtype_names_are_corrupt_data():
    for name in ["O", "|O", "i4,f4", "V8", "not-a-dtype", "x" * 100]:
        with pytest.raises(castore.CorruptDataError):
            codec.dtype_from_name(name)


@pytest.mark.parametrize(
    "tree",
    [
        {"c": {"a/b": 1, "a": {"b": 2}}},
        {"c": [{"x/0": 1, "x": [2]}]},
    ],
)
def test_leaves_whose_paths_collide_are_refused_before_anything_commits(tmp_path, tree):
    with castore.Store(tmp_path / "s") as store:
        with pytest.raises(castore.UnsupportedValueError, match="two leaves have this path"):
            store.save(1, tree)
        assert store.steps() == []
        store.save(1, {"c": {"a/b": 1, "a": {"c": 2}}})  # slashes alone are fine
        assert store.load(1, regex="a/b") == {"c": {"a/b": 1}}


@pytest.mark.parametrize("tree", [{"a\ud800": 1}, {"c": "x\udcff"}, {"c": {"k\udfff": 1}}])
def test_strings_utf8_cannot_encode_are_refused_as_unsupported(tmp_path, tree):
    with castore.Store(tmp_path / "s") as store:
        with pytest.raises(castore.UnsupportedValueError, match="surrogate"):
            store.save(1, tree)
        assert store.steps() == []

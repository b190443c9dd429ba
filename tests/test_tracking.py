"""TrackedArray: which rows a write marks, what a save then hashes, and check mode."""

import tempfile

import numpy as np
import pytest
from conftest import assert_tree_equal
from hypothesis import given, settings
from hypothesis import strategies as st

import castore
from castore.tracking import Baseline

C = 4096  # chunk_bytes of the stores here: many chunks from small arrays


def open_store(path, **options):
    return castore.Store(path, chunk_bytes=C, **options)


def stride_of(nbytes, row_nbytes, itemsize=1):
    """The chunk stride a store with chunk_bytes C uses for a leaf (see chunker)."""
    if nbytes <= C:
        return nbytes
    if row_nbytes <= C:
        return (C // row_nbytes) * row_nbytes
    return (C // itemsize) * itemsize


def chunk_bytes_of_rows(rows, shape, itemsize):
    """Bytes of the chunks holding any byte of ``rows`` (what a save must re-hash)."""
    row_nbytes = int(np.prod(shape[1:], dtype=np.int64)) * itemsize
    nbytes = shape[0] * row_nbytes
    stride = stride_of(nbytes, row_nbytes, itemsize)
    chunks = set()
    for r in rows:
        chunks.update(range((r * row_nbytes) // stride, ((r + 1) * row_nbytes - 1) // stride + 1))
    return sum(min((j + 1) * stride, nbytes) - j * stride for j in chunks)


def dirty_rows(tracked):
    """Close an epoch and return the rows changed since the previous call (pure bookkeeping).

    The fake baseline's owner is no store's writer session, so it never lets a store reuse ids.
    """
    epoch, _, changed = tracked.capture()
    tracked.committed(Baseline(session=None, nbytes=0, chunk_nbytes=1, ids=b"", fingerprints=None, epoch=epoch))
    return changed.tolist()


def fresh(shape=(10, 3), dtype=np.int32):
    t = castore.TrackedArray(np.zeros(shape, dtype))
    assert dirty_rows(t) == list(range(shape[0]))  # a new array: every row is unsaved
    assert dirty_rows(t) == []
    return t


# --- which rows a write marks ------------------------------------------------------------------


@pytest.mark.parametrize(
    "index, rows",
    [
        (3, [3]),
        (np.int64(5), [5]),
        (-1, [9]),
        (-10, [0]),
        (slice(2, 5), [2, 3, 4]),
        (slice(-3, None), [7, 8, 9]),
        (slice(None, None, 4), [0, 4, 8]),
        (slice(8, 2, -3), [5, 8]),
        (slice(4, 4), []),
        (np.array([1, 7, 7]), [1, 7]),
        ([0, -2], [0, 8]),
        (np.array([], np.int64), []),
        ((3, 0), [3]),
        ((-2, 1), [8]),
        ((slice(1, 3), 2), [1, 2]),
        ((np.array([4, 6]), slice(None)), [4, 6]),
    ],
)
def test_setitem_marks_exactly_the_touched_rows(index, rows):
    t = fresh()
    expected = np.zeros((10, 3), np.int32)
    expected[index] = 42
    t[index] = 42
    assert np.array_equal(t.raw, expected)  # the write itself went through
    assert dirty_rows(t) == rows
    assert sorted(set(np.flatnonzero(expected.any(axis=1)))) == rows  # exactly the rows written


@pytest.mark.parametrize(
    "index",
    [
        np.array([False, False, True, False, False, True, False, False, False, False]),
        [False, True] * 5,
        Ellipsis,
        (Ellipsis, 1),
        None,
        (None, 4),
        (),
        np.True_,
    ],
    ids=["bool-array", "bool-list", "ellipsis", "ellipsis-col", "newaxis", "newaxis-row", "empty-tuple", "np.True_"],
)
def test_masks_ellipsis_and_newaxis_mark_every_row(index):
    t = fresh()
    t[index] = 7
    assert dirty_rows(t) == list(range(10))


# A Python bool is an int, but numpy reads `t[True]` as a mask over every row.
@pytest.mark.parametrize("index", [True, (True,)], ids=["True", "(True,)"])
def test_python_bool_index_marks_every_row(tmp_path, index):
    with open_store(tmp_path / "s") as store:
        t = castore.TrackedArray(np.zeros((1000, 16), np.uint8))  # 4 chunks of 256 rows
        store.save(1, {"c": {"t": t}})
        t[index] = 7
        assert (t.raw == 7).all()
        store.save(2, {"c": {"t": t}})
        assert_tree_equal(store.load(2)["c"]["t"], t.raw.copy())


def test_mark_forms_and_out_of_range():
    t = fresh()
    t.mark(2, 5)
    assert dirty_rows(t) == [2, 3, 4]
    t.mark(7)
    assert dirty_rows(t) == [7]
    t.mark(-1)
    assert dirty_rows(t) == [9]
    t.mark(-3, -1)
    assert dirty_rows(t) == [7, 8]
    t.mark(0, 0)
    assert dirty_rows(t) == []
    t.mark(0, 10)
    assert dirty_rows(t) == list(range(10))
    t.mark()
    assert dirty_rows(t) == list(range(10))
    for args in [(10,), (0, 11), (-11,), (5, 3), (11, 12)]:
        with pytest.raises(castore.UsageError, match="outside the 10 rows"):
            t.mark(*args)
    assert dirty_rows(t) == []  # a refused mark marks nothing
    assert issubclass(castore.UsageError, ValueError)


def test_reads_are_read_only_and_raw_is_the_array():
    data = np.arange(30, dtype=np.float32).reshape(10, 3)
    t = castore.TrackedArray(data)
    dirty_rows(t)
    with pytest.raises(ValueError):
        t[0][1] = 5
    with pytest.raises(ValueError):
        t[2:4][:] = 5
    view = np.asarray(t)
    with pytest.raises(ValueError):
        view[3, 0] = 5
    with pytest.raises(ValueError):
        view += 1
    assert np.array_equal(data, np.arange(30, dtype=np.float32).reshape(10, 3))  # nothing written
    assert dirty_rows(t) == []
    assert np.shares_memory(view, data) and t.raw is data  # adopted, not copied
    copy = np.array(t)
    copy[0, 0] = -1  # an explicit copy is the caller's own
    assert data[0, 0] == 0 and not np.shares_memory(copy, data)
    assert t.shape == (10, 3) and t.dtype == np.float32 and len(t) == 10
    assert float(t[1, 2]) == 5.0


@pytest.mark.parametrize(
    "value",
    [
        np.zeros((6, 4), np.int16)[:, ::2],
        np.zeros((6, 4), np.int16).T,
        np.zeros((6, 4), np.int16)[::2],
        [[1, 2], [3, 4]],
        (1, 2, 3),
        np.ma.masked_array(np.zeros(4)),
        5,
    ],
    ids=["strided-columns", "transposed", "strided-rows", "list", "tuple", "masked-array", "int"],
)
def test_construction_rejects_non_contiguous_and_non_ndarray(value):
    with pytest.raises(castore.UsageError, match="TrackedArray"):
        castore.TrackedArray(value)


def test_construction_rejects_read_only_array():
    data = np.zeros(8)
    data.flags.writeable = False
    with pytest.raises(castore.UsageError, match="writable"):
        castore.TrackedArray(data)


# --- with a store ----------------------------------------------------------------------------


def test_first_save_hashes_everything_an_unchanged_save_nothing(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, (2000, 48), dtype=np.uint8)  # 24 chunks of 85 rows
    snapshot = data.copy()
    t = castore.TrackedArray(data)
    with open_store(tmp_path / "s") as store:
        first = store.save(1, {"replay": {"obs": t}})
        assert first.changed_bytes == data.nbytes
        assert first.new_bytes == data.nbytes
        second = store.save(2, {"replay": {"obs": t}})
        assert second.changed_bytes == 0 and second.new_bytes == 0 and second.new_chunks == 0
        assert second.reused_chunks == -(-data.nbytes // stride_of(data.nbytes, 48))
        for step in (1, 2):
            loaded = store.load(step)
            assert list(loaded) == ["replay"]
            assert type(loaded["replay"]["obs"]) is np.ndarray
            assert_tree_equal(loaded["replay"]["obs"], snapshot)


@pytest.mark.parametrize(
    "shape, dtype",
    [((2000, 48), np.uint8), ((3000, 7), np.float32), ((6, 10000), np.uint8), ((20000,), np.int64)],
    ids=["48B-rows", "28B-rows", "rows-larger-than-chunks", "1-d"],
)
def test_written_rows_change_exactly_the_chunks_covering_them(tmp_path, shape, dtype):
    rng = np.random.default_rng(1)

    def rand(*dims):
        return rng.integers(1, 250, dims).astype(dtype)

    data = rand(*shape)
    t = castore.TrackedArray(data)
    n = shape[0]
    writes = [
        [n // 2],
        [0, n - 1],
        list(range(n // 3, n // 3 + max(1, n // 50))),
        [1, 2, n - 2],
    ]
    snapshots = {}
    with open_store(tmp_path / "s") as store:
        store.save(0, {"c": t})
        snapshots[0] = data.copy()
        for step, rows in enumerate(writes, start=1):
            if step % 2:
                t[np.array(rows)] = rand(len(rows), *shape[1:]) + 1  # differs from what is there
            else:
                for r in rows:  # one row at a time, through int and tuple indices
                    if len(shape) > 1:
                        t[r, ...] = rand(*shape[1:])
                    else:
                        t[r] = rng.integers(1 << 40)
            result = store.save(step, {"c": t})
            assert result.changed_bytes == chunk_bytes_of_rows(rows, shape, data.itemsize), rows
            assert result.changed_bytes < data.nbytes
            snapshots[step] = data.copy()
        for step, snapshot in snapshots.items():
            assert_tree_equal(store.load(step)["c"], snapshot)


def test_unmarked_raw_write_is_caught_by_check_mode(tmp_path):
    data = np.random.default_rng(2).integers(0, 256, (2000, 48), dtype=np.uint8)  # 85 rows per chunk
    t = castore.TrackedArray(data)
    with open_store(tmp_path / "s", check_tracking=True) as store:
        store.save(1, {"c": {"t": t, "other": np.zeros(5000, np.uint8)}})
        t.raw[100, 3] ^= 0xFF  # not marked
        with pytest.raises(castore.TrackingError) as info:
            store.save(2, {"c": {"t": t, "other": np.zeros(5000, np.uint8)}})
        error = info.value
        assert error.path == "c/t"
        assert error.chunk == 1 and error.rows == (85, 170)
        assert "'c/t'" in str(error) and "rows 85..169" in str(error)
        assert isinstance(error, castore.SaveError)
        assert store.steps() == [1]  # nothing committed
        t.mark(100)
        result = store.save(2, {"c": {"t": t}})
        assert result.changed_bytes == 85 * 48
        assert store.steps() == [1, 2]
        assert_tree_equal(store.load(2)["c"]["t"], data.copy())


def test_check_mode_from_environment(tmp_path, monkeypatch):
    data = np.random.default_rng(3).integers(0, 256, (2000, 48), dtype=np.uint8)
    monkeypatch.setenv("CASTORE_CHECK_TRACKING", "1")
    t = castore.TrackedArray(data)
    with open_store(tmp_path / "checked") as store:
        assert store.check_tracking is True
        store.save(1, {"t": t})
        t.raw[1999] += 1
        with pytest.raises(castore.TrackingError, match="rows 1955..1999") as info:
            store.save(2, {"t": t})
        assert info.value.path == "t" and info.value.rows == (1955, 2000)  # the short last chunk
        assert store.steps() == [1]

    # Without check mode the unmarked write is (by design) not seen: the save reuses the old
    # chunk.  This is what check mode is for, and shows the tracked path really skips hashing.
    monkeypatch.setenv("CASTORE_CHECK_TRACKING", "0")
    data2 = np.random.default_rng(4).integers(0, 256, (2000, 48), dtype=np.uint8)
    before = data2.copy()
    t2 = castore.TrackedArray(data2)
    with open_store(tmp_path / "unchecked") as store:
        assert store.check_tracking is False
        store.save(1, {"t": t2})
        t2.raw[1999] += 1
        assert store.save(2, {"t": t2}).changed_bytes == 0
        assert_tree_equal(store.load(2)["t"], before)


def test_same_tracked_array_into_two_stores_writes_everything_to_the_second(tmp_path):
    data = np.random.default_rng(5).integers(0, 256, (2000, 48), dtype=np.uint8)
    t = castore.TrackedArray(data)
    with open_store(tmp_path / "a") as a, open_store(tmp_path / "b") as b:
        a.save(1, {"t": t})
        to_b = b.save(1, {"t": t})  # nothing marked in between
        assert to_b.changed_bytes == data.nbytes and to_b.new_bytes == data.nbytes
        assert_tree_equal(b.load(1)["t"], data.copy())
        t[7] = 1
        back = a.save(2, {"t": t})  # the baseline is now b's: a must not reuse b's ids blindly
        assert_tree_equal(a.load(2)["t"], data.copy())
        assert back.changed_bytes >= 85 * 48
        t[1500] = 2
        b.save(2, {"t": t})
        assert_tree_equal(b.load(2)["t"], data.copy())
    with open_store(tmp_path / "b") as b_again:  # a new writer session: no stale reuse
        t[3] = 3
        assert b_again.save(3, {"t": t}).changed_bytes == data.nbytes
        assert_tree_equal(b_again.load(3)["t"], data.copy())


def test_a_save_failing_at_commit_clears_no_dirty_rows(tmp_path):
    rng = np.random.default_rng(6)
    data = rng.integers(0, 256, (2000, 48), dtype=np.uint8)
    plain = rng.random((3000, 40), np.float32)
    t = castore.TrackedArray(data)
    with open_store(tmp_path / "s") as store:
        store.save(1, {"t": t, "p": plain})
        first = (data.copy(), plain.copy())
        t[[10, 1000]] = 99
        plain[2000, 5] = -1.0
        with pytest.raises(castore.StepExistsError):
            store.save(1, {"t": t, "p": plain})
        assert store.steps() == [1]
        result = store.save(2, {"t": t, "p": plain})
        assert result.changed_bytes == chunk_bytes_of_rows([10, 1000], data.shape, 1) + 4000
        assert_tree_equal(store.load(2), {"t": data.copy(), "p": plain.copy()})
        assert_tree_equal(store.load(1), {"t": first[0], "p": first[1]})


def test_untracked_arrays_are_fingerprinted_per_chunk(tmp_path):
    plain = np.random.default_rng(7).random((1500, 40), np.float32)  # 160 B rows: 60 chunks of 4000 B
    nbytes = plain.nbytes
    with open_store(tmp_path / "s") as store:
        assert store.save(1, {"a": {"p": plain}}).changed_bytes == nbytes
        assert store.save(2, {"a": {"p": plain}}).changed_bytes == 0
        plain[1234, 17] += 1.0
        third = store.save(3, {"a": {"p": plain}})
        assert third.changed_bytes == 4000 and third.new_bytes == 4000
        snapshot3 = plain.copy()
        plain[1499, 0] = 0.5  # the last chunk (240000 % 4000 == 0: a full one)
        plain[0, 0] = 0.25
        fourth = store.save(4, {"a": {"p": plain}})
        assert fourth.changed_bytes == 8000
        plain[1499, 0] = snapshot3[1499, 0]  # changed back: hashed again, but already stored
        plain[0, 0] = snapshot3[0, 0]
        fifth = store.save(5, {"a": {"p": plain}})
        assert fifth.changed_bytes == 8000 and fifth.new_bytes == 0
        assert_tree_equal(store.load(3)["a"]["p"], snapshot3)
        assert_tree_equal(store.load(5)["a"]["p"], snapshot3)
        odd = np.random.default_rng(8).integers(0, 1 << 30, 10_001, dtype=np.int32)  # short last chunk
        store.save(6, {"a": {"p": odd}})
        odd[-1] += 1
        assert store.save(7, {"a": {"p": odd}}).changed_bytes == 40004 - 9 * 4096
        assert_tree_equal(store.load(7)["a"]["p"], odd.copy())


# --- property: whatever the writes, every step loads as the state was at its save --------------

ROWS = st.integers(0, 199)
write_index = st.one_of(
    ROWS,
    ROWS.map(lambda r: r - 200),  # negative
    st.tuples(ROWS, ROWS).map(lambda ab: slice(min(ab), max(ab) + 1)),
    st.lists(ROWS, min_size=1, max_size=6).map(np.array),
    st.tuples(ROWS, st.integers(0, 5)),
    st.just(Ellipsis),
    st.lists(st.booleans(), min_size=200, max_size=200).map(np.array),
)
operation = st.one_of(
    st.tuples(st.just("set"), write_index, st.integers(0, 1 << 20)),
    st.tuples(st.just("raw"), st.tuples(ROWS, ROWS), st.integers(0, 1 << 20)),
    st.tuples(st.just("plain"), st.integers(0, 200 * 6 * 3 - 1), st.integers(0, 1 << 20)),
    st.tuples(st.just("save"), st.none(), st.none()),
)


@settings(max_examples=30, deadline=None)
@given(ops=st.lists(operation, min_size=1, max_size=25))
def test_every_save_loads_the_state_at_save_time(ops):
    tracked = castore.TrackedArray(np.zeros((200, 6), np.int64))  # 48 B rows: 85 rows per chunk
    plain = np.zeros((200, 6, 3), np.int32)  # 72 B rows
    snapshots = {}
    with tempfile.TemporaryDirectory() as directory:
        with open_store(directory, check_tracking=True) as store:  # a missed change raises
            for kind, where, value in ops + [("save", None, None)]:
                if kind == "set":
                    tracked[where] = value
                elif kind == "raw":
                    start, stop = min(where), max(where) + 1
                    tracked.raw[start:stop] = value
                    tracked.mark(start, stop)
                elif kind == "plain":
                    plain.reshape(-1)[where] = value
                else:
                    step = len(snapshots)
                    store.save(step, {"c": {"t": tracked, "p": plain}})
                    snapshots[step] = {"c": {"t": tracked.raw.copy(), "p": plain.copy()}}
                    assert_tree_equal(store.load(step), snapshots[step])
            assert store.steps() == sorted(snapshots)
            for step, snapshot in snapshots.items():
                assert_tree_equal(store.load(step), snapshot)

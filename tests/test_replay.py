"""RingBuffer: insertion order, wrap-around, sampling, save/load and change tracking."""

import tempfile

import numpy as np
import pytest
from conftest import assert_tree_equal
from hypothesis import given, settings
from hypothesis import strategies as st

import castore

C = 4096


def batch(start, count, obs_shape=(3, 2)):
    """Rows whose every field is a function of the insertion counter ``t``."""
    t = np.arange(start, start + count, dtype=np.int64)
    obs = (t[:, None] * 10 + np.arange(int(np.prod(obs_shape)))).reshape(count, *obs_shape).astype(np.float32)
    return {"t": t, "obs": obs, "done": t % 3 == 0}


def assert_rows_coherent(rows):
    """Fields of a row returned together belong to the same insertion (see ``batch``)."""
    t = rows["t"]
    assert t.dtype == np.int64 and rows["obs"].dtype == np.float32 and rows["done"].dtype == np.bool_
    obs = (t.reshape(-1)[:, None] * 10 + np.arange(6)).reshape(*t.shape, 3, 2).astype(np.float32)
    assert np.array_equal(rows["obs"], obs)
    assert np.array_equal(rows["done"], t % 3 == 0)


def plain(rb):
    """The buffer's state with the fields as plain array copies (a snapshot)."""
    state = rb.save()
    state["fields"] = {name: np.array(field) for name, field in state["fields"].items()}
    return state


def test_add_wraps_around_and_keeps_insertion_order():
    rb = castore.RingBuffer(10)
    assert len(rb) == 0 and rb.added == 0 and rb.fields == []
    rb.add(batch(0, 4))
    assert len(rb) == 4 and rb.added == 4 and rb.fields == ["t", "obs", "done"]
    assert rb["t"].tolist() == [0, 1, 2, 3, 0, 0, 0, 0, 0, 0]
    rb.add(batch(4, 8))  # wraps: rows 10 and 11 overwrite storage rows 0 and 1
    assert len(rb) == 10 and rb.added == 12
    assert rb["t"].tolist() == [10, 11, 2, 3, 4, 5, 6, 7, 8, 9]
    assert rb.recent(10)["t"].tolist() == list(range(2, 12))
    assert rb.recent(3)["t"].tolist() == [9, 10, 11]
    assert rb.recent(100)["t"].tolist() == list(range(2, 12))  # capped at what is stored
    assert rb.recent(0)["t"].tolist() == []
    row = {name: value[0] for name, value in batch(12, 1).items()}
    rb.append(row)
    assert len(rb) == 10 and rb.added == 13
    assert rb["t"].tolist() == [10, 11, 12, 3, 4, 5, 6, 7, 8, 9]
    recent = rb.recent(4)
    assert recent["t"].tolist() == [9, 10, 11, 12]
    assert_rows_coherent(recent)
    assert_rows_coherent({name: rb[name] for name in rb.fields})  # storage rows are coherent too
    recent["t"][0] = -1  # a copy
    assert rb.recent(4)["t"][0] == 9


@pytest.mark.parametrize("before, count", [(0, 10), (3, 10), (3, 23), (9, 100), (0, 7)])
def test_a_batch_larger_than_capacity_keeps_the_last_rows(before, count):
    capacity = 10
    rb = castore.RingBuffer(capacity)
    if before:
        rb.add(batch(0, before))
    rb.add(batch(before, count))
    total = before + count
    kept = min(total, capacity)
    assert rb.added == total and len(rb) == kept
    assert rb.recent(capacity)["t"].tolist() == list(range(total - kept, total))
    assert sorted(rb["t"][:kept].tolist()) == list(range(total - kept, total))
    assert_rows_coherent(rb.recent(capacity))


def test_sample_returns_stored_rows_only():
    rb = castore.RingBuffer(50)
    with pytest.raises(castore.UsageError, match="at least 1"):
        rb.sample(4)
    rb.add(batch(0, 130))  # stored: 80..129
    rng = np.random.default_rng(0)
    rows = rb.sample(2000, rng)
    assert rows["t"].shape == (2000,) and rows["obs"].shape == (2000, 3, 2)
    assert set(rows["t"].tolist()) == set(range(80, 130))  # only stored rows, and all of them
    assert_rows_coherent(rows)
    assert rb.sample(0, rng)["t"].shape == (0,)


def test_sample_sequences_are_consecutive_and_never_cross_the_head():
    rb = castore.RingBuffer(10)
    rb.add(batch(0, 16))  # head at storage row 6; stored insertions 6..15 wrap at storage row 9 -> 0
    rng = np.random.default_rng(1)
    runs = rb.sample_sequences(3000, 3, rng)
    t = runs["t"]
    assert t.shape == (3000, 3) and runs["obs"].shape == (3000, 3, 3, 2)
    assert (np.diff(t, axis=1) == 1).all()  # consecutive insertions
    assert t.min() >= 6 and t.max() <= 15  # never reaching past the oldest or newest row
    assert set(t[:, 0].tolist()) == set(range(6, 14))  # every valid start, incl. across the wrap
    assert_rows_coherent(runs)
    assert (rb.sample_sequences(5, 10, rng)["t"] == np.arange(6, 16)).all()  # the only full run
    with pytest.raises(castore.UsageError, match="at least 11"):
        rb.sample_sequences(1, 11, rng)
    with pytest.raises(castore.UsageError):
        rb.sample_sequences(1, 0, rng)


def test_mismatched_batches_are_refused_and_change_nothing():
    rb = castore.RingBuffer(8)
    rb.add(batch(0, 5))
    before = plain(rb)
    good = batch(5, 2)
    bad_batches = [
        {"t": good["t"], "obs": good["obs"]},  # a field missing
        {**good, "extra": np.zeros(2)},  # a field too many
        {**good, "obs": np.zeros((2, 3, 3), np.float32)},  # another row shape
        {**good, "obs": np.zeros((2, 6), np.float32)},
        {**good, "t": np.arange(3)},  # row counts differ
        {**good, "t": np.int64(5)},  # a 0-d value has no rows
        {},
        [good["t"]],
    ]
    for bad in bad_batches:
        with pytest.raises(castore.UsageError):
            rb.add(bad)
    with pytest.raises(castore.UsageError):
        rb.append({"t": 1, "obs": np.zeros((3, 2))})
    assert_tree_equal(plain(rb), before)
    rb.add(good)
    assert rb.recent(7)["t"].tolist() == list(range(7))


def test_fields_declared_up_front():
    rb = castore.RingBuffer(4, fields={"x": ((2,), np.int16), "y": ((), np.float64)})
    assert rb.fields == ["x", "y"] and rb["x"].shape == (4, 2) and rb["x"].dtype == np.int16
    assert len(rb) == 0
    with pytest.raises(castore.UsageError, match="shape"):
        rb.add({"x": np.zeros((1, 3)), "y": np.zeros(1)})
    rb.add({"x": np.ones((1, 2)), "y": np.full(1, 2.5)})  # values are cast to the field's dtype
    assert rb["x"].dtype == np.int16 and rb["x"][0].tolist() == [1, 1] and rb["y"][0] == 2.5


def test_field_arrays_are_read_only():
    rb = castore.RingBuffer(6)
    rb.add(batch(0, 3))
    field = rb["t"]
    with pytest.raises(ValueError):
        field[0] = 99
    with pytest.raises(ValueError):
        rb["obs"][1] += 1
    assert rb["t"][:3].tolist() == [0, 1, 2]
    with pytest.raises(KeyError, match="no field 'nope'"):
        rb["nope"]


@pytest.mark.parametrize("capacity", [0, -3, 2.5, True, "8", None, np.float64(4.0)])
def test_bad_capacity_is_refused(capacity):
    with pytest.raises(castore.UsageError, match="capacity"):
        castore.RingBuffer(capacity)


def test_numpy_int_capacity_is_accepted():
    rb = castore.RingBuffer(np.int32(5))
    assert rb.capacity == 5 and type(rb.capacity) is int


# --- as a checkpoint component ------------------------------------------------------------------


def test_save_load_round_trip_then_continues_like_the_original(tmp_path):
    capacity = 300
    original = castore.RingBuffer(capacity)
    original.add(batch(0, 250))
    original.add(batch(250, 170))  # wrapped: head at 120
    with castore.Checkpoint(tmp_path / "ck", chunk_bytes=C) as cp:
        cp.replay = original
        cp.save()
        saved = plain(original)
    assert (saved["head"], saved["size"], saved["added"]) == (120, 300, 420)

    restored = castore.RingBuffer(capacity)
    with castore.Checkpoint(tmp_path / "ck") as cp2:
        cp2.replay = restored
        assert cp2.load() == 0
    assert cp2.replay is restored  # a component is loaded in place
    assert_tree_equal(plain(restored), saved)
    assert len(restored) == 300 and restored.added == 420 and restored.fields == ["t", "obs", "done"]

    for start, count in [(420, 7), (427, 1), (428, 250), (678, 301)]:
        for rb in (original, restored):
            rb.add(batch(start, count))
        assert_tree_equal(plain(restored), plain(original))
        assert_tree_equal(restored.recent(capacity), original.recent(capacity))
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    assert_tree_equal(restored.sample_sequences(20, 4, rng_a), original.sample_sequences(20, 4, rng_b))
    assert restored.recent(3)["t"].tolist() == [976, 977, 978]

    with castore.Checkpoint(tmp_path / "ck") as cp3:
        cp3.replay = castore.RingBuffer(capacity + 1)
        with pytest.raises(castore.UsageError, match=f"RingBuffer\\({capacity}\\)"):
            cp3.load()
        assert len(cp3.replay) == 0 and cp3.replay.fields == []


def test_loading_a_state_that_does_not_fit_is_refused():
    rb = castore.RingBuffer(4)
    rb.add(batch(0, 2))
    good = plain(rb)
    target = castore.RingBuffer(4)
    for broken in [
        {**good, "head": 4},
        {**good, "size": 5},
        {**good, "fields": {"t": np.zeros(3, np.int64)}},
        {k: v for k, v in good.items() if k != "added"},
        "not a state",
    ]:
        with pytest.raises(castore.UsageError):
            target.load(broken)
        assert len(target) == 0 and target.fields == []
    target.load(good)
    assert_tree_equal(plain(target), good)


def chunk_bytes_of_rows(rows, row_nbytes, capacity):
    nbytes = capacity * row_nbytes
    stride = nbytes if nbytes <= C else (C // row_nbytes) * row_nbytes
    chunks = {(r * row_nbytes) // stride for r in rows} | {((r + 1) * row_nbytes - 1) // stride for r in rows}
    return sum(min((j + 1) * stride, nbytes) - j * stride for j in chunks), len(chunks), stride


def test_a_save_after_adding_one_percent_hashes_about_one_percent(tmp_path):
    capacity = 10_000
    rng = np.random.default_rng(7)

    def rows(count):
        return {
            "obs": rng.integers(0, 256, (count, 64), dtype=np.uint8),  # 64 B rows
            "reward": rng.random(count, np.float32),  # 4 B rows
            "action": rng.integers(0, 1 << 40, (count, 3)),  # 24 B rows
        }

    row_nbytes = {"obs": 64, "reward": 4, "action": 24}
    total = capacity * sum(row_nbytes.values())
    rb = castore.RingBuffer(capacity)
    rb.add(rows(9_950))
    with castore.Checkpoint(tmp_path / "ck", chunk_bytes=C) as cp:
        cp.replay = rb
        first = cp.save()
        assert first.changed_bytes == total
        snapshots = {first.step: plain(rb)}
        for count in (100, 100, 37):  # the first batch wraps around the end
            head = rb.save()["head"]
            new_rows = [(head + i) % capacity for i in range(count)]
            rb.add(rows(count))
            result = cp.save()
            wraps = head + count > capacity
            expected = bound = 0
            for size in row_nbytes.values():
                nbytes, chunks, stride = chunk_bytes_of_rows(new_rows, size, capacity)
                expected += nbytes
                # the chunks the new rows fill, + 1 for misalignment (+ 1 more if they wrap)
                most = -(-count * size // stride) + 1 + wraps
                assert chunks <= most
                bound += most * stride
            assert result.changed_bytes == expected
            assert result.changed_bytes <= bound
            assert result.changed_bytes < total // 20
            snapshots[result.step] = plain(rb)
        for step, snapshot in snapshots.items():
            assert_tree_equal(cp.store.load(step)["replay"], snapshot)


# --- property: each step loads back as the buffer was at its save ------------------------------


@settings(max_examples=25, deadline=None)
@given(
    capacity=st.integers(1, 60),
    plan=st.lists(st.tuples(st.integers(0, 130), st.booleans()), min_size=1, max_size=12),
)
def test_every_step_loads_back_as_the_buffer_was(capacity, plan):
    rb = castore.RingBuffer(capacity)
    added = 0
    snapshots = {}
    with tempfile.TemporaryDirectory() as directory:
        with castore.Checkpoint(directory, chunk_bytes=C, check_tracking=True) as cp:
            cp.replay = rb
            for count, save in plan + [(0, True)]:
                rb.add(batch(added, count, obs_shape=(10, 10)))  # 400 B rows: chunked past 10 rows
                added += count
                assert rb.added == added and len(rb) == min(added, capacity)
                assert rb.recent(capacity)["t"].tolist() == list(range(added - len(rb), added))
                if save:
                    step = cp.save().step
                    snapshots[step] = plain(rb)
            assert cp.steps() == sorted(snapshots)
            for step, snapshot in snapshots.items():
                assert_tree_equal(cp.store.load(step)["replay"], snapshot)
                other = castore.RingBuffer(capacity)
                cp.replay = other
                cp.load(step=step)
                assert_tree_equal(plain(other), snapshot)

"""castore.tools.migrate: elements checkpoints and embodied replay chunks into a store.

Checkpoints are written by the real ``elements.Checkpoint``; replay chunks as embodied's
``Chunk.save`` writes them (np.savez_compressed into ``{time}-{uuid}-{succ}-{length}.npz``).
"""

import copy
import datetime
import io
import os
import pickle
import uuid as uuidlib

import elements
import numpy as np
import pytest
from conftest import assert_tree_equal
from hypothesis import given, settings
from hypothesis import strategies as st

import castore
from castore.storage import memory
from castore.tools.cli import main
from castore.tools.migrate import import_elements, import_replay

# -- elements checkpoints ----------------------------------------------------------------------


class Agent:
    """What DreamerV3's agent saves: ``{'params': {name: array}, 'counters': {...}}``."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.params = {
            "enc/conv0/kernel": rng.standard_normal((3, 3, 3, 16)).astype(np.float32),
            "dyn/gru/bias": rng.standard_normal(64).astype(np.float32),
            "opt/step": np.int32(0),
        }
        self.updates = 0

    def train(self):
        self.params["dyn/gru/bias"] = self.params["dyn/gru/bias"] + 1
        self.params["opt/step"] = np.int32(self.params["opt/step"] + 1)
        self.updates += 1

    def save(self):
        return {"params": dict(self.params), "counters": {"updates": self.updates, "batches": 2 * self.updates}}

    def load(self, data):
        self.params = dict(data["params"])


class Sharded:
    """A component whose save() yields shards, as a big replay or optimizer state might."""

    def __init__(self):
        self.arrays = [np.arange(5 * i, dtype=np.int64) for i in range(3)]

    def save(self):
        for i, array in enumerate(self.arrays):
            yield {"index": i, "array": array}

    def load(self, shards):
        self.arrays = [shard["array"] for shard in shards]


class Opaque:
    """No save()/load(): elements pickles the object itself; castore does not store it."""

    def __init__(self):
        self.value = 3

    def save(self):
        return {"weights": np.ones(3), "thing": self}

    def load(self, data):
        pass


def _write_checkpoints(directory, saves=3, *, step=True, incomplete=True):
    """A run of ``saves`` checkpoints (keep=None) and, optionally, one more whose ``done`` is
    gone; returns ``{step or index: expected state}`` of the complete ones."""
    counter = elements.Counter(100)
    cp = elements.Checkpoint(directory, step=counter if step else None, keep=None)
    cp.step = counter
    cp.agent = agent = Agent()
    cp.shards = sharded = Sharded()
    expected = {}
    for i in range(saves + incomplete):
        cp.save()
        if i < saves:
            expected[int(counter) if step else i] = {
                "agent": copy.deepcopy(agent.save()),
                "shards": list(copy.deepcopy(list(sharded.save()))),
                "step": int(counter),
            }
        agent.train()
        sharded.arrays[1] = sharded.arrays[1] + 1
        counter.increment(50)
    if incomplete:
        newest = directory / (directory / "latest").read_text()
        os.remove(newest / "done")
    return expected


def _assert_store_holds(store_path, expected):
    with castore.Store(store_path, readonly=True) as store:
        assert store.steps() == sorted(expected)
        for step, want in expected.items():
            got = store.load(step)
            got["shards"] = list(got["shards"])
            assert_tree_equal(got, want)


def test_every_complete_step_round_trips_bit_exact(tmp_path):
    expected = _write_checkpoints(tmp_path / "ckpt")
    result = import_elements(tmp_path / "ckpt", tmp_path / "store", allow_pickle=True)
    assert [s.step for s in result.imported] == [100, 150, 200]
    assert all(s.components == ("agent", "shards", "step") and not s.unchanged for s in result.imported)
    assert [(s.folder.endswith("-000000000250"), s.reason) for s in result.skipped] == [
        (True, "incomplete: no 'done' file (the save did not finish)")
    ]
    _assert_store_holds(tmp_path / "store", expected)


def test_pickles_are_not_read_without_allow_pickle(tmp_path):
    _write_checkpoints(tmp_path / "ckpt", saves=1, incomplete=False)
    with pytest.raises(castore.UsageError, match="allow_pickle=True.*if you trust them"):
        import_elements(tmp_path / "ckpt", tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_rerun_is_a_no_op_and_other_content_needs_overwrite(tmp_path):
    expected = _write_checkpoints(tmp_path / "ckpt")
    import_elements(tmp_path / "ckpt", tmp_path / "store", allow_pickle=True)
    again = import_elements(tmp_path / "ckpt", tmp_path / "store", allow_pickle=True)
    assert [s.unchanged for s in again.imported] == [True, True, True]
    folder = tmp_path / "ckpt" / again.imported[1].folder
    changed = pickle.loads((folder / "step.pkl").read_bytes()) + 1
    (folder / "step.pkl").write_bytes(pickle.dumps(changed))
    with pytest.raises(castore.StepExistsError, match="overwrite"):
        import_elements(tmp_path / "ckpt", tmp_path / "store", allow_pickle=True)
    import_elements(tmp_path / "ckpt", tmp_path / "store", allow_pickle=True, overwrite=True)
    expected[150]["step"] = changed
    _assert_store_holds(tmp_path / "store", expected)


def test_folders_without_a_step_are_numbered_in_time_order(tmp_path):
    expected = _write_checkpoints(tmp_path / "ckpt", step=False)  # DreamerV3's Checkpoint(logdir / 'ckpt')
    result = import_elements(tmp_path / "ckpt", tmp_path / "store", allow_pickle=True)
    assert [s.step for s in result.imported] == [0, 1, 2]
    _assert_store_holds(tmp_path / "store", expected)
    by_counter = import_elements(tmp_path / "ckpt", tmp_path / "other", allow_pickle=True, step_key="step")
    assert [s.step for s in by_counter.imported] == [100, 150, 200]
    _assert_store_holds(tmp_path / "other", {want["step"]: want for want in expected.values()})


def test_mixed_numbering_is_refused_and_a_repeated_step_keeps_the_newest(tmp_path):
    _write_checkpoints(tmp_path / "ckpt", saves=2, incomplete=False)
    first, second = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.is_dir())
    (tmp_path / "ckpt" / first).rename(tmp_path / "ckpt" / first.split("-")[0])
    with pytest.raises(castore.UsageError, match="mixes folders"):
        import_elements(tmp_path / "ckpt", tmp_path / "store", allow_pickle=True)
    (tmp_path / "ckpt" / first.split("-")[0]).rename(tmp_path / "ckpt" / (first.split("-")[0] + "-000000000150"))
    result = import_elements(tmp_path / "ckpt", tmp_path / "store", allow_pickle=True)
    assert [(s.step, s.folder) for s in result.imported] == [(150, second)]
    assert [s.reason for s in result.skipped] == [f"step 150 is saved again by {second}"]
    with castore.Store(tmp_path / "store", readonly=True) as store:
        assert store.load(150)["step"] == 150  # the newer folder's state (the older one held 100)


def test_bad_files_raise_typed_errors_naming_them(tmp_path):
    _write_checkpoints(tmp_path / "ckpt", saves=1, incomplete=False)
    folder = next(p for p in (tmp_path / "ckpt").iterdir() if p.is_dir())
    (folder / "agent.pkl").write_bytes((folder / "agent.pkl").read_bytes()[:50])
    with pytest.raises(castore.MigrationError, match="cannot unpickle") as caught:
        import_elements(tmp_path / "ckpt", tmp_path / "store", allow_pickle=True)
    assert caught.value.path == str(folder / "agent.pkl")
    (folder / "agent.pkl").unlink()
    (folder / "shards-0001.pkl").unlink()
    with pytest.raises(castore.MigrationError, match="without a gap") as caught:
        import_elements(tmp_path / "ckpt", tmp_path / "store", allow_pickle=True)
    assert caught.value.path == str(folder / "shards-0001.pkl")
    with pytest.raises(castore.UsageError, match="does not exist"):
        import_elements(tmp_path / "nothing", tmp_path / "store", allow_pickle=True)


def test_values_castore_does_not_store_name_their_path_and_folder(tmp_path):
    cp = elements.Checkpoint(tmp_path / "ckpt", step=elements.Counter(7), keep=None)
    cp.agent = Opaque()
    cp.save()
    with pytest.raises(
        castore.UnsupportedValueError, match=r"Opaque is not a storable type, read from .*-000000000007"
    ):
        import_elements(tmp_path / "ckpt", tmp_path / "store", allow_pickle=True)
    with castore.Store(tmp_path / "store", allow_pickle=True) as pickling:  # the way to keep it
        import_elements(tmp_path / "ckpt", pickling, allow_pickle=True)
        assert pickling.load(7)["agent"]["thing"].value == 3


def test_cli_import_elements(tmp_path, capsys):
    _write_checkpoints(tmp_path / "ckpt", saves=2)
    args = ["import-elements", str(tmp_path / "ckpt"), str(tmp_path / "store")]
    assert main(args) == 2  # refused without --allow-pickle: a usage error
    assert capsys.readouterr().err.startswith("castore: reading an elements checkpoint unpickles")
    assert main([*args, "--allow-pickle"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("step 100 <- ") and "(agent, shards, step;" in out[0]
    assert out[2].startswith("skipped ") and out[2].endswith("incomplete: no 'done' file (the save did not finish)")
    assert out[3].startswith("2 steps imported, 0 stored already, 1 folders skipped")
    assert main([*args, "--allow-pickle"]) == 0
    assert "0 steps imported, 2 stored already" in capsys.readouterr().out
    assert main(["import-elements", str(tmp_path / "ckpt")]) == 2  # a missing argument


# -- embodied replay chunks --------------------------------------------------------------------

START = datetime.datetime(2024, 5, 1, 12)


def _save_chunk(directory, time, uuid, succ, data):
    """embodied.core.chunk.Chunk.save, byte for byte."""
    length = len(next(iter(data.values())))
    with io.BytesIO() as stream:
        np.savez_compressed(stream, **data)
        stream.seek(0)
        (directory / f"{time}-{uuid}-{succ}-{length}.npz").write_bytes(stream.read())


def _rows(stream, start, count):
    """Rows whose values say where they came from: stream * 10_000 + index in the stream."""
    ids = stream * 10_000 + np.arange(start, start + count)
    return {
        "image": (ids[:, None, None, None] % 251 + np.zeros((1, 4, 4, 3))).astype(np.uint8),
        "action": np.stack([ids, -ids], 1).astype(np.float32),
        "reward": ids.astype(np.float64),
        "is_first": ids % 7 == 0,
        "stepid": np.zeros((count, 20), np.uint8),
    }


def _write_replay(directory, streams, *, offsets=None):
    """Chunks of worker streams (``streams[w]``: chunk lengths), created at interleaved times,
    linked by ``succ``; the last chunk of each stream names a successor never saved, as a
    running Replay's does.  Returns ``[(time, stream, start, length)]`` of every chunk."""
    directory.mkdir(exist_ok=True)
    chunks = []
    for w, lengths in enumerate(streams):
        ids = [elements.UUID() for _ in lengths] + [elements.UUID()]
        start = 0
        for i, length in enumerate(lengths):
            # chunk i of every stream at minute i (+ the stream's offset); stream w a second later than w-1
            minutes = i + (offsets[w] if offsets else 0)
            time = elements.timestamp(START + datetime.timedelta(minutes=minutes, seconds=w), millis=True)
            _save_chunk(directory, time, ids[i], ids[i + 1], _rows(w, start, length))
            chunks.append((time, w, start, length))
            start += length
    return chunks


def _model(chunks, capacity):
    """The rows an import keeps, in order: the newest by chunk time, grouped by stream,
    streams ordered by their newest kept chunk."""
    kept, total = {}, 0
    for time, w, start, length in sorted(chunks, reverse=True):
        if total >= capacity:
            break
        take = min(length, capacity - total)
        kept.setdefault(w, []).append((time, start + length - take, take))
        total += take
    order = sorted(kept, key=lambda w: max(kept[w])[0])
    ids = [w * 10_000 + np.arange(s, s + n) for w in order for _, s, n in sorted(kept[w], key=lambda c: c[1])]
    return np.concatenate(ids), [len(kept[w]) for w in order]


def _buffer(store, step=0, name="replay"):
    state = store.load(step)[name]
    buffer = castore.RingBuffer(state["capacity"])
    buffer.load(state)
    return buffer, state


def test_replay_round_trips_stream_by_stream(tmp_path):
    chunks = _write_replay(tmp_path / "replay", [[8, 8, 3], [8, 5], [8, 8, 8, 2]], offsets=[0, 1, 0])
    result = import_replay(tmp_path / "replay", tmp_path / "store")
    total = sum(c[3] for c in chunks)
    assert (result.rows, result.capacity, result.dropped_rows, result.files) == (total, total, 0, 9)
    # newest chunks: stream 0 at minute 2, stream 1 at 1 + 1, stream 2 at 3
    assert result.stream_starts == (0, 19, 32)
    with castore.Store(tmp_path / "store", readonly=True) as store:
        buffer, state = _buffer(store)
    assert state["added"] == total and len(buffer) == total
    rows = buffer.recent(total)
    want, _ = _model(chunks, total)
    np.testing.assert_array_equal(rows["reward"], want)
    for key, value in _rows(0, 0, 1).items():
        assert rows[key].dtype == value.dtype and rows[key].shape[1:] == value.shape[1:]
    for w, start in zip((0, 1, 2), result.stream_starts):
        n = 19 if w == 0 else 13 if w == 1 else 26
        assert_tree_equal({k: v[start : start + n] for k, v in rows.items()}, _rows(w, 0, n))
    assert import_replay(tmp_path / "replay", tmp_path / "store").unchanged


def test_replay_capacity_keeps_the_newest_rows(tmp_path):
    chunks = _write_replay(tmp_path / "replay", [[10, 10, 10], [10, 10, 10]])
    result = import_replay(tmp_path / "replay", tmp_path / "store", capacity=25, step=3, name="buffer")
    assert (result.rows, result.dropped_rows, result.stream_starts) == (25, 35, (0, 10))
    with castore.Store(tmp_path / "store", readonly=True) as store:
        buffer, _ = _buffer(store, 3, "buffer")
    # minute 2 of both streams (20 rows), then the last 5 rows of stream 1's minute 1 chunk
    np.testing.assert_array_equal(buffer.recent(25)["reward"], _model(chunks, 25)[0])
    assert buffer.recent(25)["reward"][:10].tolist() == list(range(20, 30))
    assert buffer.recent(25)["reward"][10:15].tolist() == list(range(10_015, 10_020))


@settings(max_examples=25, deadline=None)
@given(
    streams=st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=3), min_size=1, max_size=3),
    offsets=st.lists(st.integers(0, 3), min_size=3, max_size=3),
    cut=st.integers(-5, 30),
)
def test_replay_import_matches_a_model(tmp_path_factory, streams, offsets, cut):
    directory = tmp_path_factory.mktemp("replay")
    chunks = _write_replay(directory, streams, offsets=offsets)
    total = sum(c[3] for c in chunks)
    capacity = max(1, total - cut)
    name = f"migrate-{uuidlib.uuid4().hex}"
    try:
        with castore.Store(f"memory://{name}") as store:
            result = import_replay(directory, store, capacity=capacity)
            buffer, _ = _buffer(store)
    finally:
        memory.discard(name)
    want, per_stream = _model(chunks, capacity)
    assert result.rows == len(buffer) == len(want) == min(capacity, total)
    np.testing.assert_array_equal(buffer.recent(capacity)["reward"], want)
    np.testing.assert_array_equal(buffer.recent(capacity)["action"][:, 0], want.astype(np.float32))
    assert len(result.stream_starts) == len(per_stream)


def test_replay_bad_files_raise_typed_errors_naming_them(tmp_path):
    _write_replay(tmp_path / "replay", [[4, 4]])
    first, second = sorted((tmp_path / "replay").iterdir())
    data = second.read_bytes()
    second.write_bytes(data[: len(data) // 2])
    with pytest.raises(castore.MigrationError, match="not a readable .npz") as caught:
        import_replay(tmp_path / "replay", tmp_path / "store")
    assert caught.value.path == str(second)
    second.write_bytes(_object_npz())
    with pytest.raises(castore.MigrationError, match="object array") as caught:
        import_replay(tmp_path / "replay", tmp_path / "store")
    assert caught.value.path == str(second)
    second.unlink()
    _save_chunk(tmp_path / "replay", "20240501T130000F000000", elements.UUID(), elements.UUID(0), _rows(0, 0, 3))
    (tmp_path / "replay" / "stray.npz").write_bytes(b"")
    with pytest.raises(castore.MigrationError, match="is not named"):
        import_replay(tmp_path / "replay", tmp_path / "store")
    (tmp_path / "replay" / "stray.npz").unlink()
    odd = _rows(0, 0, 3)
    odd["reward"] = odd["reward"].astype(np.float32)
    _save_chunk(tmp_path / "replay", "20240501T140000F000000", elements.UUID(), elements.UUID(0), odd)
    with pytest.raises(castore.MigrationError, match="has fields .*reward float32"):
        import_replay(tmp_path / "replay", tmp_path / "store")
    assert not (tmp_path / "store").exists()  # nothing was opened, let alone written


def _object_npz():
    with io.BytesIO() as stream:
        np.savez_compressed(stream, reward=np.array([{"a": 1}] * 4, dtype=object))
        return stream.getvalue()


def test_replay_corrupt_data_found_while_copying(tmp_path):
    """A flipped byte deep inside a large field passes the header pass (which reads a few
    KiB of each field) and fails the copy."""
    (tmp_path / "replay").mkdir()
    data = _rows(0, 0, 200)
    data["image"] = np.random.default_rng(0).integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)  # 600 KiB
    _save_chunk(tmp_path / "replay", "20240501T120000F000000", elements.UUID(), elements.UUID(0), data)
    (path,) = (tmp_path / "replay").iterdir()
    damaged = bytearray(path.read_bytes())
    damaged[300_000] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(castore.MigrationError, match="cannot be read") as caught:
        import_replay(tmp_path / "replay", tmp_path / "store")
    assert caught.value.path == str(path)
    assert not (tmp_path / "store").exists()


def test_replay_merges_into_an_imported_checkpoint_step(tmp_path):
    expected = _write_checkpoints(tmp_path / "ckpt", saves=2, incomplete=False)
    import_elements(tmp_path / "ckpt", tmp_path / "store", allow_pickle=True)
    _write_replay(tmp_path / "replay", [[6, 6]])
    with pytest.raises(castore.StepExistsError):
        import_replay(tmp_path / "replay", tmp_path / "store", step=150)
    result = import_replay(tmp_path / "replay", tmp_path / "store", step=150, merge=True)
    assert not result.unchanged
    assert import_replay(tmp_path / "replay", tmp_path / "store", step=150, merge=True).unchanged
    with castore.Store(tmp_path / "store", readonly=True) as store:
        state = store.load(150)
        state["shards"] = list(state["shards"])
        replay = state.pop("replay")
        assert_tree_equal(state, expected[150])
        assert len(replay["fields"]["reward"]) == 12


def test_cli_import_replay(tmp_path, capsys):
    _write_replay(tmp_path / "replay", [[5, 5], [5]])
    args = ["import-replay", str(tmp_path / "replay"), str(tmp_path / "store")]
    assert main([*args, "--capacity", "12", "--step", "4"]) == 0
    out = capsys.readouterr().out
    assert "12 rows of 3 chunk files in 2 streams, 3 older rows left out, capacity 12" in out
    assert "saved as 'replay' of step 4" in out
    assert main(["import-replay", str(tmp_path / "none"), str(tmp_path / "store")]) == 2  # no such directory
    assert capsys.readouterr().err.startswith("castore: ")
    assert main([*args, "--capacity", "0"]) == 2


def test_imported_steps_keep_their_folders_save_time(tmp_path):
    import datetime

    _write_checkpoints(tmp_path / "ckpt", saves=2, incomplete=False)
    result = import_elements(tmp_path / "ckpt", tmp_path / "store", allow_pickle=True)
    with castore.Store(tmp_path / "store", readonly=True) as store:
        for imported in result.imported:
            stamp = imported.folder.split("-")[0]  # elements' local-time timestamp
            want = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SF%f").timestamp()
            assert store.manifest(imported.step).created == pytest.approx(want, abs=1e-6)
            assert store.metrics(imported.step) == {}


def test_replay_merge_carries_the_other_components_without_reading_them(tmp_path):
    import collections

    _write_replay(tmp_path / "replay", [[4]])
    with castore.Store(tmp_path / "store", allow_pickle=True) as store:  # a leaf only a pickling store reads
        store.save(0, {"agent": {"w": np.arange(3.0), "extra": collections.deque([1])}})
    assert not import_replay(tmp_path / "replay", tmp_path / "store", step=0, merge=True).unchanged
    with castore.Store(tmp_path / "store", allow_pickle=True) as store:
        state = store.load(0)
        assert state["agent"]["extra"] == collections.deque([1]) and len(state["replay"]["fields"]["reward"]) == 4

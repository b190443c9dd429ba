"""Per-chunk codecs (format 4): the decoder against hostile values, and round trips.

``castore.format.compression.decode_into`` reads bytes from a store: whatever they are, it
fills its ``out`` buffer exactly or raises :class:`ChunkCorruptError`, writes nothing past
``out`` and allocates nothing near a size the value claims (no decompression bombs).
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
import zstandard
from conftest import assert_tree_equal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import castore
from castore.errors import ChunkCorruptError
from castore.format import compression
from castore.format.codec import leaf_nodes
from castore.format.compression import HEADER_BYTES, MAGIC, RAW, RETRY_SAVES, ZSTD, LeafChoices
from castore.format.ids import chunk_id, short, split_ids
from castore.format.schema import Table
from castore.storage.chunks import PageWalker

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20
CHUNK = 4096  # the smallest chunk_bytes: small arrays span many chunks
# Examples take milliseconds to a few hundred; the deadline is what a loaded 2-core machine keeps.
PROPERTY = settings(
    deadline=datetime.timedelta(seconds=20),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
SETTINGS = ["none", "auto", "zstd", "zstd:1", "zstd:19", "zstd:-3"]


def header(codec: int, nbytes: int) -> bytes:
    return MAGIC + bytes([codec]) + nbytes.to_bytes(4, "little")


def decode(value: bytes, nbytes: int) -> bytes:
    out = bytearray(nbytes)
    compression.decode_into(value, memoryview(out), {}, "c")
    return bytes(out)


# --- decompression bombs -------------------------------------------------------------------------

#: run in a child (a fresh process, so its peak is this decode's): decode each bomb named
#: on the command line into a 1 MiB buffer, print the growth of the peak virtual size
#: (VmPeak: what zstd asked the allocator for, touched or not) and resident size (VmHWM)
_BOMB_CHILD = textwrap.dedent(
    """
    import sys
    from castore.errors import ChunkCorruptError
    from castore.format import compression

    def peak(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith(field))

    warm = compression.stored_value(bytes(1 << 20), 1)  # the decoder's own buffers, once
    compression.decode_into(warm, memoryview(bytearray(1 << 20)), {}, "warm")
    for name in sys.argv[1:]:
        with open(name, "rb") as f:
            value = f.read()
        out = bytearray(1 << 20)
        before = peak("VmPeak"), peak("VmHWM")
        try:
            compression.decode_into(value, memoryview(out), {}, "bomb")
        except ChunkCorruptError:
            outcome = "refused"
        else:
            outcome = "decoded"
        print(outcome, peak("VmPeak") - before[0], peak("VmHWM") - before[1])
    """
)


def _bombs(tmp_path) -> list[str]:
    """Encoded values for a 1 MiB chunk whose zstd frame holds 100 MB of zeros: one as zstd
    writes it (a 2 MiB window), one declaring a 100 MB window, one without a content size."""
    zeros = bytes(100 * MiB)
    wide = zstandard.ZstdCompressionParameters.from_level(3, window_log=27)
    frames = {
        "default": zstandard.ZstdCompressor(level=3).compress(zeros),
        "wide-window": zstandard.ZstdCompressor(compression_params=wide).compress(zeros),
        "no-size": zstandard.ZstdCompressor(level=3, write_content_size=False).compress(zeros),
    }
    names = []
    for name, frame in frames.items():
        path = tmp_path / name
        path.write_bytes(header(ZSTD, MiB) + frame)
        names.append(str(path))
    return names


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc/self/status")
def test_a_decompression_bomb_is_refused_without_allocating_its_size(tmp_path):
    bombs = _bombs(tmp_path)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    done = subprocess.run(
        [sys.executable, "-c", _BOMB_CHILD, *bombs], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    for bomb, line in zip(bombs, done.stdout.splitlines(), strict=True):
        outcome, virtual, resident = line.split()
        assert outcome == "refused", bomb
        # a few MiB of decoder state at most, never the 100 MB the frame claims
        assert int(virtual) < 16 * MiB and int(resident) < 16 * MiB, (bomb, line)


@pytest.mark.parametrize("level", [level for level in compression.ZSTD_LEVELS if level])
def test_every_level_writes_frames_the_bounded_decoder_reads(level):
    """The window bound refuses no frame castore writes: zstd fits the window to the chunk."""
    sizes = [1, 1023, 1024, 1025, 4097, 65537] + ([MiB + 1] if level in (-7, 1, 3, 22) else [])
    for nbytes in sizes:
        raw = bytes(i % 7 for i in range(nbytes))
        value = header(ZSTD, nbytes) + compression._compressor(level).compress(raw)
        assert decode(value, nbytes) == raw, (level, nbytes)


# --- decode_into against damaged values ----------------------------------------------------------

#: raw chunks: compressible (runs, few symbols) and not (random), empty and a byte long too
raw_chunks = st.one_of(
    st.binary(min_size=0, max_size=3000),
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=8), st.integers(1, 800)),
    st.builds(
        lambda seed, n: bytes(np.random.default_rng(seed).integers(0, 3, n, dtype=np.uint8)),
        st.integers(0, 2**32),
        st.integers(1, 5000),
    ),
    st.just(MAGIC + bytes(100)),
)
#: edits of a stored value: flip/set/insert/delete a byte, truncate, extend; header fields
edits = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete", "truncate", "extend", "codec", "length"]),
        st.integers(0, 1 << 16),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=4,
)


def edited(value: bytes, changes) -> bytes:
    out = bytearray(value)
    for kind, where, byte in changes:
        at = where % (len(out) + 1)
        if kind == "flip" and out:
            out[at % len(out)] ^= 1 << (byte % 8)
        elif kind == "set" and out:
            out[at % len(out)] = byte
        elif kind == "insert":
            out[at:at] = bytes([byte])
        elif kind == "delete" and out:
            del out[at % len(out)]
        elif kind == "truncate":
            del out[at:]
        elif kind == "extend":
            out += bytes([byte]) * (1 + where % 64)
        elif kind == "codec" and len(out) > 4:
            out[4] = byte
        elif kind == "length" and len(out) >= HEADER_BYTES:
            out[5:9] = ((int.from_bytes(out[5:9], "little") + (byte - 128 or 1)) % (1 << 32)).to_bytes(4, "little")
    return bytes(out)


def guarded_decode(value: bytes, nbytes: int) -> bytes | None:
    """Decode into the middle of a larger buffer, twice (pre-filled 0x00, then 0xff).

    Returns the bytes, or None for a ChunkCorruptError (any other exception propagates).
    Fails if a byte outside ``out`` changed, or if the two runs differ (a byte of ``out``
    was left as it was: not filled).
    """
    guard = 64
    results = []
    for fill in (0x00, 0xFF):
        buffer = bytearray([fill]) * (guard + nbytes + guard)
        try:
            compression.decode_into(value, memoryview(buffer)[guard : guard + nbytes], {"step": 1}, "c")
            outcome = bytes(buffer[guard : guard + nbytes])
        except ChunkCorruptError as exc:
            assert exc.chunk_id == "c" and exc.step == 1
            outcome = None
        assert buffer[:guard] == bytearray([fill]) * guard, "wrote before out"
        assert buffer[guard + nbytes :] == bytearray([fill]) * guard, "wrote past out"
        results.append(outcome)
    assert results[0] == results[1], "out was not filled exactly"
    return results[0]


@PROPERTY
@given(raw=raw_chunks, level=st.sampled_from([None, -3, 1, 19]))
def test_a_stored_value_decodes_to_its_raw_bytes(raw, level):
    value = compression.stored_value(raw, level)
    assert guarded_decode(bytes(value), len(raw)) == raw
    if compression.is_encoded(value):  # encoded only if it saves 1/16, or escaped (MAGIC)
        codec = compression.codec_of(value)
        assert codec == RAW and raw.startswith(MAGIC) or codec == ZSTD and len(value) <= len(raw) * 15 / 16
    else:
        assert value is raw  # raw chunks are stored as they are, without a copy


@settings(PROPERTY, max_examples=600)
@given(raw=raw_chunks, level=st.sampled_from([None, 1, 19]), changes=edits, delta=st.sampled_from([0, 0, -1, 1]))
def test_a_damaged_value_decodes_exactly_or_is_a_chunk_corrupt_error(raw, level, changes, delta):
    """Any edit, and a wrong expected length: ChunkCorruptError or exactly ``out`` filled."""
    value = edited(bytes(compression.stored_value(raw, level)), changes)
    nbytes = max(0, len(raw) + delta)
    guarded_decode(value, nbytes)


@settings(PROPERTY, max_examples=300)
@given(value=st.binary(max_size=600), nbytes=st.integers(0, 5000), codec=st.integers(0, 255))
def test_arbitrary_bytes_after_a_header_decode_exactly_or_are_refused(value, nbytes, codec):
    guarded_decode(header(codec, nbytes) + value, nbytes)
    guarded_decode(value, nbytes)


def test_each_kind_of_damage_to_an_encoded_value_is_refused():
    raw = bytes(range(256)) * 40
    value = bytes(compression.stored_value(raw, 3))
    assert compression.codec_of(value) == ZSTD
    frame = value[HEADER_BYTES:]
    cases = {
        "truncated": value[:-5],
        "header only": value[:HEADER_BYTES],
        "shorter than a header": value[:6],
        "trailing bytes": value + b"\0" * 8,
        "a second frame": value + zstandard.ZstdCompressor().compress(b"x"),
        "raw length too small": header(ZSTD, len(raw) - 1) + frame,
        "raw length too large": header(ZSTD, len(raw) + 1) + frame,
        "frame of fewer bytes": header(ZSTD, len(raw)) + zstandard.ZstdCompressor().compress(raw[:-1]),
        "frame of more bytes": header(ZSTD, len(raw)) + zstandard.ZstdCompressor().compress(raw + b"!"),
        "unknown codec": header(2, len(raw)) + frame,
        "codec 255": header(255, len(raw)) + frame,
        "escaped, short": header(RAW, len(raw)) + raw[:-1],
        "escaped, long": header(RAW, len(raw)) + raw + b"!",
        "not a frame": header(ZSTD, len(raw)) + raw,
    }
    for name, bad in cases.items():
        with pytest.raises(ChunkCorruptError, match="c"):
            compression.decode_into(bad, memoryview(bytearray(len(raw))), {"step": 7, "path": "w"}, "c")
        assert guarded_decode(bad, len(raw)) is None, name
    assert decode(header(RAW, len(raw)) + raw, len(raw)) == raw  # escaped: the payload as it is


# --- damage in a real store ----------------------------------------------------------------------


def frames(seed: int, rows: int = 16) -> np.ndarray:
    """Low-entropy uint8 "frames" (zstd shrinks them ~5x), one 4 KiB chunk per row."""
    rng = np.random.default_rng(seed)
    return (rng.random((rows, CHUNK)) < 0.05).astype(np.uint8) * 255


def leaf_chunk_ids(store: castore.Store, step: int, component: str, path: str) -> list[bytes]:
    node = dict(store.manifest(step).components)[component]
    blob = dict(leaf_nodes(node))[path].blob
    with store.backend.read() as txn:
        return split_ids(PageWalker(txn, check_pages=True).ids(blob, {}))


def put_chunk(store: castore.Store, cid: bytes, value: bytes) -> None:
    store.backend.write(lambda txn: txn.put(Table.CHUNKS, cid, value))


def _damages(value: bytes, nbytes: int) -> dict[str, bytes]:
    frame = value[HEADER_BYTES:]
    bomb = zstandard.ZstdCompressor(level=3).compress(bytes(64 * MiB))
    return {
        "flipped payload byte": value[:-3] + bytes([value[-3] ^ 0x10]) + value[-2:],
        "truncated": value[: len(value) // 2],
        "extended": value + b"\0" * 16,
        "wrong raw length": header(ZSTD, nbytes + 1) + frame,
        "unknown codec": header(9, nbytes) + frame,
        "bomb": header(ZSTD, nbytes) + bomb,
        "raw of the right length": bytes(nbytes),  # a plain raw value, wrong bytes
    }


@pytest.mark.parametrize("damage", list(_damages(header(ZSTD, 1) + b"xxxx", 1)))
def test_a_damaged_compressed_chunk_is_a_typed_error_naming_everything(tmp_path, damage):
    original = frames(1)
    with castore.Store(tmp_path / "s", chunk_bytes=CHUNK, compression="zstd") as store:
        store.save(1, {"agent": {"enc": {"frames": original}}})
        store.save(2, {"other": np.arange(10_000, dtype=np.int32)})
        cid = leaf_chunk_ids(store, 1, "agent", "enc/frames")[3]
        value = store.inspect().get(Table.CHUNKS, cid)
        assert compression.codec_of(value) == ZSTD
        put_chunk(store, cid, _damages(value, CHUNK)[damage])
        with pytest.raises(castore.ChunkCorruptError) as raised:
            store.load(1)
        err = raised.value
        assert isinstance(err, castore.IntegrityError)
        assert (err.step, err.component, err.path, err.chunk_id) == (1, "agent", "enc/frames", short(cid))
        assert short(cid) in str(err) and "enc/frames" in str(err)
        report = store.verify()
        assert [(p.kind, p.step, p.component, p.path, p.chunk) for p in report.problems] == [
            ("chunk-corrupt", 1, "agent", "enc/frames", short(cid))
        ]
        assert report.affected_steps == [("main", 1)]
        assert_tree_equal(store.load(2), {"other": np.arange(10_000, dtype=np.int32)})  # others still load
        # unverified: damage that breaks the header or the frame is still refused; damage
        # that decodes (a flipped literal, plain wrong bytes) comes back unchecked, wrong
        try:
            unverified = store.load(1, verify=False)["agent"]["enc"]["frames"]
        except castore.ChunkCorruptError as exc:
            assert damage != "raw of the right length"
            assert (exc.step, exc.path, exc.chunk_id) == (1, "enc/frames", short(cid))
        else:
            assert damage in ("flipped payload byte", "raw of the right length")
            assert unverified.shape == original.shape and not np.array_equal(unverified, original)
            rows = [i for i in range(len(original)) if not np.array_equal(unverified[i], original[i])]
            assert rows == [3]  # only the damaged chunk's bytes are wrong


def test_unverified_loads_refuse_structural_damage_to_an_encoded_chunk(tmp_path):
    """The documented split: with verify=False, an encoded value that does not decode to
    exactly its chunk's length is still a ChunkCorruptError (no check can be skipped there)."""
    with castore.Store(tmp_path / "s", chunk_bytes=CHUNK, compression="zstd:1") as store:
        store.save(1, {"x": frames(2)})
        cid = leaf_chunk_ids(store, 1, "x", "")[0]
        value = store.inspect().get(Table.CHUNKS, cid)
        for name, bad in _damages(value, CHUNK).items():
            if name in ("flipped payload byte", "raw of the right length"):
                continue
            put_chunk(store, cid, bad)
            with pytest.raises(castore.ChunkCorruptError):
                store.load(1, verify=False)
        put_chunk(store, cid, value)
        assert_tree_equal(store.load(1, verify=False), {"x": frames(2)})


# --- round trips under every setting -------------------------------------------------------------

DTYPES = ["|u1", "<i2", "<f4", "<f8", "|b1", "<c8", ">u4"]


@st.composite
def arrays(draw) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 40), min_size=0, max_size=3)))
    if int(np.prod(shape)) * dtype.itemsize > 64 * CHUNK:
        shape = (draw(st.integers(0, 64 * CHUNK // dtype.itemsize)),)
    n = int(np.prod(shape))
    rng = np.random.default_rng(draw(st.integers(0, 2**32)))
    kind = draw(st.sampled_from(["random", "zeros", "few values", "runs"]))
    raw = rng.integers(0, 256, n * dtype.itemsize, dtype=np.uint8)
    if kind == "zeros":
        raw[:] = 0
    elif kind == "few values":
        raw = rng.integers(0, 2, raw.size, dtype=np.uint8) * 7
    elif kind == "runs":
        raw = np.resize(np.repeat(raw[: max(1, raw.size // 97)], 97), raw.size)
    if dtype.kind == "b":
        raw = raw & 1
    return raw.view(dtype).reshape(shape) if n else np.zeros(shape, dtype)


trees = st.dictionaries(
    st.sampled_from(["agent", "opt", "replay"]),
    st.dictionaries(st.text("abcw", min_size=1, max_size=3), arrays(), min_size=1, max_size=3),
    min_size=1,
    max_size=2,
)


@settings(PROPERTY, max_examples=40)
@given(tree=trees, first=st.sampled_from(SETTINGS), second=st.sampled_from(SETTINGS))
def test_trees_round_trip_under_every_setting_and_dedup_ignores_it(tree, first, second):
    with tempfile.TemporaryDirectory() as scratch:
        with castore.Store(os.path.join(scratch, "s"), chunk_bytes=CHUNK, compression=first) as store:
            store.save(1, tree)
            assert_tree_equal(store.load(1), tree)
            held = store.stats().chunks
        with castore.Store(os.path.join(scratch, "s"), compression=second) as store:
            result = store.save(2, tree)  # the same arrays under another setting
            assert result.new_chunks == 0 and result.new_bytes == 0  # ids hash the raw bytes
            assert store.stats().chunks == held
            assert_tree_equal(store.load(1), tree)
            assert_tree_equal(store.load(2), tree)
            assert store.verify().ok


@pytest.mark.parametrize("setting", SETTINGS)
def test_every_setting_round_trips_empty_zero_d_and_many_chunk_leaves(tmp_path, setting):
    rng = np.random.default_rng(5)
    tree = {
        "a": {
            "empty": np.zeros((0, 7), np.float32),
            "zero_d": np.array(3.5),
            "frames": frames(3, rows=70),  # 70 chunks: ids in chunk-list pages
            "weights": rng.standard_normal((40, 300)).astype(np.float32),
            "magic": np.frombuffer(MAGIC + rng.bytes(CHUNK * 2 - 4), np.uint8),  # first chunk escaped
            "bytes": MAGIC + bytes(5000),
        }
    }
    with castore.Store(tmp_path / "s", chunk_bytes=CHUNK, compression=setting) as store:
        store.save(1, tree)
        assert_tree_equal(store.load(1), tree)
        assert store.verify().ok
        values = store.inspect().items(Table.CHUNKS)
        codecs = {compression.codec_of(values[c]) for c in leaf_chunk_ids(store, 1, "a", "frames")}
        assert codecs == ({None} if setting == "none" else {ZSTD})
        first = leaf_chunk_ids(store, 1, "a", "magic")[0]
        assert compression.codec_of(values[first]) == RAW  # random after MAGIC: escaped in every setting
        for cid, value in values.items():
            raw = value if not compression.is_encoded(value) else decode(value, _raw_length(value))
            assert chunk_id(raw) == cid


def _raw_length(value: bytes) -> int:
    return int.from_bytes(value[5:9], "little")


# --- stats ---------------------------------------------------------------------------------------


def test_auto_stores_compressible_data_smaller_and_random_floats_at_their_raw_size(tmp_path):
    weights = np.random.default_rng(7).standard_normal((32, 1024)).astype(np.float32)  # 32 chunks
    with castore.Store(tmp_path / "auto", chunk_bytes=CHUNK) as store:
        store.save(1, {"obs": frames(4, rows=32)})
        stats = store.stats()
        assert stats.stored_bytes < stats.logical_bytes / 3
    sizes = {}
    for setting in ("auto", "none"):
        with castore.Store(tmp_path / f"floats-{setting}", chunk_bytes=CHUNK, compression=setting) as store:
            store.save(1, {"w": weights})
            sizes[setting] = store.stats().stored_bytes
            values = store.inspect().items(Table.CHUNKS)
            assert {compression.codec_of(v) for v in values.values()} == {None}
    assert sizes["auto"] == sizes["none"] == weights.nbytes  # no byte added over raw


# --- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["bogus", "zstd:99", "zstd:0", "zstd:x", "zstd:-8", "lz4", 3, True])
def test_an_unknown_setting_is_a_usage_error_before_anything_is_created(tmp_path, bad):
    with pytest.raises(castore.UsageError, match="compression"):
        castore.Store(tmp_path / "s", compression=bad)
    assert not (tmp_path / "s").exists()
    with pytest.raises(castore.UsageError):
        castore.Checkpoint(tmp_path / "c", compression=bad)


@pytest.mark.parametrize(
    ("given", "name"),
    [
        (None, "auto"),
        ("auto", "auto"),
        ("none", "none"),
        ("zstd", "zstd:3"),
        ("zstd:1", "zstd:1"),
        ("zstd:-3", "zstd:-3"),
    ],
)
def test_a_new_store_records_its_setting_and_a_reopen_uses_it(tmp_path, given, name):
    path = tmp_path / "s"
    with castore.Store(path, compression=given) as store:
        assert store.compression == name
    with castore.Store(path) as store:
        assert store.compression == name
        assert store.inspect().config()["compression"] == name
    with castore.Store(path, compression="zstd:19") as store:  # an open may choose another
        assert store.compression == "zstd:19"
        assert store.inspect().config()["compression"] == name  # without recording it
    with castore.Store(path, readonly=True) as store:
        assert store.compression == name


class _Frames:
    """A component in the save() / load() protocol."""

    def save(self) -> dict:
        return {"frames": frames(5)}

    def load(self, state) -> None:
        self.state = state


def test_checkpoint_passes_compression_through(tmp_path):
    with castore.Checkpoint(tmp_path / "c", compression="none", chunk_bytes=CHUNK) as ckpt:
        assert ckpt.store.compression == "none"
        ckpt.obs = _Frames()
        ckpt.save(1)
        values = ckpt.store.inspect().items(Table.CHUNKS)
        assert {compression.codec_of(v) for v in values.values()} == {None}
    with castore.Checkpoint(tmp_path / "z", compression="zstd:1", chunk_bytes=CHUNK) as ckpt:
        assert ckpt.store.compression == "zstd:1"


# --- auto mode -----------------------------------------------------------------------------------


def test_auto_mode_judges_each_leaf_by_its_data(tmp_path):
    tree = {
        "agent": {"w": np.random.default_rng(8).standard_normal(4096).astype(np.float32)},
        "replay": {"obs": frames(9)},
    }
    with castore.Store(tmp_path / "s", chunk_bytes=CHUNK, compression="auto") as store:
        store.save(1, tree)
        values = store.inspect().items(Table.CHUNKS)
        weights = {compression.codec_of(values[c]) for c in leaf_chunk_ids(store, 1, "agent", "w")}
        obs = {compression.codec_of(values[c]) for c in leaf_chunk_ids(store, 1, "replay", "obs")}
        assert weights == {None} and obs == {ZSTD}


def test_auto_mode_judges_a_leaf_again_within_retry_saves(tmp_path):
    """A replay buffer that starts random-looking and turns compressible is encoded again
    within RETRY_SAVES saves (its first trial is remembered until then)."""
    rng = np.random.default_rng(10)
    with castore.Store(tmp_path / "s", chunk_bytes=CHUNK, compression="auto") as store:
        store.save(0, {"r": {"obs": rng.integers(0, 256, (2, CHUNK), dtype=np.uint8)}})
        stored_raw = 0
        for step in range(1, RETRY_SAVES + 2):
            obs = frames(100 + step, rows=2)  # changed every save: the leaf is written each time
            store.save(step, {"r": {"obs": obs}})
            value = store.inspect().get(Table.CHUNKS, leaf_chunk_ids(store, step, "r", "obs")[0])
            if compression.codec_of(value) == ZSTD:
                break
            stored_raw += 1
        else:
            pytest.fail(f"still stored raw after {RETRY_SAVES + 1} saves of compressible data")
        assert 1 <= stored_raw <= RETRY_SAVES  # the first choice stuck, then was judged again
        assert store.verify().ok


def test_leaf_choices_try_a_leaf_again_after_retry_saves():
    """Zeros, then random: the choice to encode is used RETRY_SAVES times, then re-judged."""
    choices = LeafChoices(compression.Compression.parse("auto"))
    zeros, noise = bytes(CHUNK), np.random.default_rng(11).bytes(CHUNK)
    assert choices.level_for("obs", zeros) == compression.AUTO_LEVEL
    levels = [choices.level_for("obs", noise) for _ in range(RETRY_SAVES)]
    assert levels[: RETRY_SAVES - 1] == [compression.AUTO_LEVEL] * (RETRY_SAVES - 1)
    assert levels[-1] is None  # judged again on the new data
    assert choices.level_for("other", noise) is None  # per leaf path
    choices.forget()
    assert choices.level_for("obs", zeros) == compression.AUTO_LEVEL
    assert LeafChoices(compression.Compression.parse("none")).level_for("obs", zeros) is None
    assert LeafChoices(compression.Compression.parse("zstd:7")).level_for("obs", noise) == 7

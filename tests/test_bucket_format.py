"""The bucket layout's records (castore/format/bucket.py) as untrusted input: every decoder
round-trips what its encoder wrote, and any other bytes (random, a flipped bit, a valid seal
around a wrong body) are a CorruptDataError, never another exception."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from castore.errors import CorruptDataError
from castore.format import bucket as layout
from castore.format.bucket import CHUNK, PAGE, Lock, PartObject
from castore.format.ids import chunk_id
from castore.format.keys import step_key
from castore.format.sealing import seal

KEY = step_key(5, "main")
OTHER = step_key(5, "exp")


def index_of(values: list[bytes]) -> bytes:
    return layout.build_pack([(CHUNK if i % 3 else PAGE, chunk_id(v), v) for i, v in enumerate(values)]).index


def decoders(raw: bytes) -> list:
    """Every decoder applied to ``raw``; each must return or raise CorruptDataError."""
    return [
        lambda: layout.decode_index(raw, "an index"),
        lambda: layout.decode_step(raw, KEY, "a step record"),
        lambda: layout.decode_tag(raw, "a tag"),
        lambda: layout.decode_lock(raw, "a lock"),
        lambda: layout.decode_config(raw, "a config"),
        lambda: layout.decode_part(raw, KEY, 1, "a part"),
        lambda: layout.trailer_index_bytes(raw[-layout.TRAILER_BYTES :], len(raw), "a pack"),
    ]


def only_corrupt(raw: bytes) -> None:
    for decode in decoders(raw):
        try:
            decode()
        except CorruptDataError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_are_corrupt_data_or_decode(raw):
    only_corrupt(raw)
    only_corrupt(seal(raw))  # a valid seal around arbitrary bytes
    only_corrupt(layout.SEAL + raw)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.dictionaries(
            st.sampled_from(
                [
                    "format",
                    "kinds",
                    "ids",
                    "lengths",
                    "key",
                    "manifest",
                    "stepinfo",
                    "kind",
                    "owner",
                    "created",
                    "expires",
                    "rank",
                    "world",
                    "attempt",
                    "written",
                    "castore_bucket",
                    "hash",
                    "page_ids",
                ]
            ),
            st.one_of(
                st.none(),
                st.booleans(),
                st.integers(-(2**63), 2**64 - 1),
                st.floats(),
                st.binary(max_size=80),
                st.text(max_size=20),
                st.lists(st.integers(0, 2**32), max_size=3),
            ),
        ),
        st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4),
        st.integers(-(2**63), 2**64 - 1),
    )
)
def test_sealed_msgpack_of_any_shape_is_corrupt_data_or_decodes(body):
    only_corrupt(seal(msgpack.packb(body, use_bin_type=True)))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=300), min_size=0, max_size=20), st.data())
def test_an_index_round_trips_and_any_flipped_byte_is_caught(values, data):
    pack = layout.build_pack([(CHUNK if i % 2 else PAGE, chunk_id(v), v) for i, v in enumerate(values)])
    index = layout.decode_index(pack.index, "an index")
    assert len(index) == len(values) and index.data_bytes == sum(map(len, values))
    for i, value in enumerate(values):
        start = int(index.offsets[i])
        assert index.id(i) == chunk_id(value) and bytes(pack.data[start : start + int(index.lengths[i])]) == value
        assert index.kinds[i] == (CHUNK if i % 2 else PAGE)
    # the trailer holds the same index, and its length
    tail = bytes(pack.data[-layout.TRAILER_BYTES :])
    length = layout.trailer_index_bytes(tail, len(pack.data), "a pack")
    assert bytes(pack.data[-layout.TRAILER_BYTES - length : -layout.TRAILER_BYTES]) == pack.index
    assert pack.pack_id == chunk_id(bytes(pack.data)).hex() and layout.is_pack_id(pack.pack_id)
    at = data.draw(st.integers(0, len(pack.index) - 1))
    damaged = bytearray(pack.index)
    damaged[at] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(CorruptDataError):
        layout.decode_index(bytes(damaged), "an index")


def test_records_round_trip_and_refuse_another_step_or_rank():
    step = layout.decode_step(layout.encode_step(KEY, b"m", b"s"), KEY, "a step record")
    assert (step.key, step.manifest, step.stepinfo) == (KEY, b"m", b"s")
    with pytest.raises(CorruptDataError, match="another step"):
        layout.decode_step(layout.encode_step(OTHER, b"m", b"s"), KEY, "a step record")
    assert layout.decode_tag(layout.encode_tag(OTHER), "a tag") == OTHER
    with pytest.raises(CorruptDataError):
        layout.decode_tag(layout.encode_tag(b"\xff\x00bad"), "a tag")  # not a step key
    lock = Lock("gc", "host-1-ab", 10.0, 20.0)
    assert layout.decode_lock(layout.encode_lock(lock), "a lock") == lock
    part = PartObject(KEY, 1, 3, "job-7-0", 5.0, b"m", b"s")
    assert layout.decode_part(layout.encode_part(part), KEY, 1, "a part") == part
    for key, rank in ((OTHER, 1), (KEY, 2)):
        with pytest.raises(CorruptDataError):
            layout.decode_part(layout.encode_part(part), key, rank, "a part")
    config = layout.decode_config(layout.encode_config(1.0, 256), "a config")
    assert config["castore_bucket"] == layout.BUCKET_FORMAT and config["page_ids"] == 256


def test_object_names_round_trip_and_hostile_names_are_refused():
    assert layout.step_key_of(layout.step_object(OTHER)) == OTHER
    for name in ("steps/zz", "steps/0", "steps/", "other/00", "steps/00/11", "steps/" + "ff" * 3):
        with pytest.raises(CorruptDataError):
            layout.step_key_of(name)
    assert layout.hex_name(layout.tag_object("best/é"), layout.TAGS, "tag").decode() == "best/é"


def test_a_trailer_naming_more_than_the_pack_is_refused():
    tail = struct.pack("<I", 1000) + layout.PACK_MAGIC
    with pytest.raises(CorruptDataError, match="longer than the pack"):
        layout.trailer_index_bytes(tail, 500, "a pack")
    with pytest.raises(CorruptDataError, match="trailer"):
        layout.trailer_index_bytes(b"x" * layout.TRAILER_BYTES, 500, "a pack")


def test_an_index_of_impossible_lengths_is_refused():
    body = {"format": 1, "kinds": b"\x00", "ids": b"\x00" * 32, "lengths": struct.pack("<I", 0)}
    with pytest.raises(CorruptDataError, match="entry of 0"):
        layout.decode_index(seal(msgpack.packb(body)), "an index")
    body = {"format": 1, "kinds": b"\x07", "ids": b"\x00" * 32, "lengths": struct.pack("<I", 1)}
    with pytest.raises(CorruptDataError, match="unknown kind"):
        layout.decode_index(seal(msgpack.packb(body)), "an index")
    body = {"format": 1, "kinds": b"\x00\x00", "ids": b"\x00" * 32, "lengths": struct.pack("<I", 1)}
    with pytest.raises(CorruptDataError):
        layout.decode_index(seal(msgpack.packb(body)), "an index")

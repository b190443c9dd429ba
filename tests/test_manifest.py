"""Manifest records: exact wire round trips; hostile bytes raise only CorruptDataError."""

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

import castore
from castore.format.manifest import (
    ArrayLeaf,
    ChunkedBlob,
    DictNode,
    InlineBlob,
    Manifest,
    PagedBlob,
    ScalarLeaf,
    SeqNode,
    ShardsNode,
    ValueLeaf,
    decode_manifest,
    encode_manifest,
)

ID = bytes(range(32))


def sample_manifest():
    node = DictNode(
        (
            ("w", ArrayLeaf("<f4", (4, 3), InlineBlob(b"\0" * 48))),
            ("big", ArrayLeaf("|u1", (100,), ChunkedBlob(100, 50, ID * 2))),
            ("paged", ArrayLeaf("|u1", (1000,), PagedBlob(1000, 1, ID * 4))),
            ("seq", SeqNode(True, (ValueLeaf(None), ValueLeaf(2**70), ValueLeaf("x"), ScalarLeaf("<i8", b"\1" * 8)))),
        )
    )
    return Manifest(7, 1.5, 1234, (("agent", node), ("replay", ShardsNode((ValueLeaf(1.0),)))))


def test_manifest_round_trips():
    m = sample_manifest()
    assert decode_manifest(encode_manifest(m)) == m


@settings(max_examples=2000, deadline=None)
@given(data=st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_corrupt_data(data):
    try:
        decode_manifest(data)
    except castore.CorruptDataError:
        pass


wire = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=5),
        st.binary(max_size=70),
        st.sampled_from(["A", "D", "L", "T", "H", "Y", "P", "G", "I", "J", "c", "p", "i", "<f4", "|u1"]),
    ),
    lambda kids: st.one_of(st.lists(kids, max_size=5), st.dictionaries(st.text(max_size=3), kids, max_size=3)),
    max_leaves=30,
)


@settings(max_examples=2000, deadline=None)
@given(
    components=wire,
    step=st.one_of(st.integers(-(2**63), 2**63), st.none()),
    created=st.one_of(st.floats(), st.integers(-(2**63), 2**63)),
)
def test_structured_garbage_raises_only_corrupt_data(components, step, created):
    data = msgpack.packb(
        {"format": 1, "step": step, "created": created, "logical_bytes": 0, "components": [["c", components]]},
        use_bin_type=True,
    )
    try:
        decode_manifest(data)
    except castore.CorruptDataError:
        pass


def test_deep_nesting_is_bounded():
    node = ["N"]
    for _ in range(5000):
        node = ["L", [node]]
    try:
        data = msgpack.packb({"format": 1, "step": 1, "created": 1.0, "logical_bytes": 0, "components": [["c", node]]})
    except (ValueError, RecursionError):  # msgpack refuses to even build it: nothing to decode
        return
    try:
        decode_manifest(data)
    except castore.CorruptDataError:
        pass


def test_claimed_sizes_are_bounded_by_the_format():
    huge = ["c", 1 << 60, 1 << 60, ID]  # one chunk id claiming an exabyte
    data = msgpack.packb(
        {"format": 1, "step": 1, "created": 1.0, "logical_bytes": 0, "components": [["c", ["Y", huge]]]},
        use_bin_type=True,
    )
    try:
        decode_manifest(data)
    except castore.CorruptDataError as exc:
        assert "chunk size" in str(exc)
    else:
        raise AssertionError("an exabyte chunk was accepted")

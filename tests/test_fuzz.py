"""Hostile input: untrusted bytes decode, or raise a CastoreError subclass, and nothing else.

Every decoder of bytes read from a store is fed (a) arbitrary bytes, (b) valid encodings
with flipped, set, inserted or deleted bytes and truncations, (c) well-formed msgpack of
the wrong shape: wrong types, huge declared lengths and sizes, deep nesting, unsafe dtypes,
shapes whose product overflows.  Decoded manifests go on through the codec, so a shape or
dtype that only fails when an array is built is caught too.  Any other exception, an
example slower than the deadline, or one that hangs (an alarm interrupts it) fails.

Damaged LMDB files can crash the C library itself, so stores with damaged meta pages are
opened in child processes: a child must exit with a castore error, never by a signal.
The damage found to kill the child anyway (in LMDB, past castore's reach) is pinned by
strict xfail tests at the end.  Run with ``-s`` to see how many cases each test ran, with ``CASTORE_FUZZ_SCALE=20``
to hunt twenty times longer.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import faulthandler
import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import warnings

import lmdb
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from workload import fingerprint

import castore
from castore import catalog
from castore.errors import CastoreError, ChunkMissingError
from castore.format import codec, config
from castore.format.ids import ID_BYTES, split_ids
from castore.format.keys import branch_of, step_key
from castore.format.manifest import (
    MAX_DEPTH,
    ArrayLeaf,
    BytesLeaf,
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
    page_ids_in,
    unseal,
)
from castore.format.schema import STORE_FORMAT
from castore.format.sealing import SEAL_BYTES
from castore.format.stepinfo import encode_stepinfo
from castore.maintenance.retention import Keep, StepInfo

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ID = bytes(range(32))
# Examples take milliseconds; the bounds are what a loaded 2-core machine keeps (Hypothesis
# fails an example over its deadline, and one that is not over it again as flaky).
HANG_SECONDS = 60  # an alarm interrupts an example running this long: a hang fails, not blocks
FUZZ = settings(
    deadline=datetime.timedelta(seconds=10),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


#: CASTORE_FUZZ_SCALE=20 runs 20 times the examples (a longer hunt than the default run)
SCALE = float(os.environ.get("CASTORE_FUZZ_SCALE", "1"))


def fuzz(examples: int) -> settings:
    return settings(FUZZ, max_examples=max(1, int(examples * SCALE)))


CASES: collections.Counter = collections.Counter()  # test name -> inputs fed to a decoder


@pytest.fixture(scope="module", autouse=True)
def _report_and_guard():
    """Print the case counts; end the process if a C decoder hangs where no alarm reaches."""
    faulthandler.dump_traceback_later(900 * max(SCALE, 1), exit=True)  # ~40 s on a loaded 2-core machine
    yield
    faulthandler.cancel_dump_traceback_later()
    total = sum(CASES.values())
    lines = "".join(f"\n  {n:6d}  {name}" for name, n in sorted(CASES.items()))
    print(f"\nfuzz cases run: {total}{lines}")


@contextlib.contextmanager
def _time_limit(seconds: float):
    def hang(signum, frame):
        raise TimeoutError(f"example still running after {seconds}s: a hang")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def survives(case: str, fn, *args):
    """``fn(*args)``, or None if it raised a CastoreError; anything else propagates (fails)."""
    CASES[case] += 1
    with _time_limit(HANG_SECONDS):
        try:
            return fn(*args)
        except CastoreError:
            return None


# --- mutations of valid encodings --------------------------------------------------------------

#: msgpack headers that declare far more than any input holds, and rarely-valid extension types
HOSTILE = [
    b"\xdd\xff\xff\xff\xff",
    b"\xdc\xff\xff",
    b"\xdf\xff\xff\xff\xff",
    b"\xde\xff\xff",  # array/map 2^32-1
    b"\xc6\xff\xff\xff\xff",
    b"\xdb\xff\xff\xff\xff",
    b"\xc9\xff\xff\xff\xff\x05",  # bin/str/ext32
    b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\xd3\x80\x00\x00\x00\x00\x00\x00\x00",  # uint64 max, int64 min
    b"\xd7\xff\xff\xff\xff\xff\x00\x00\x00\x00",
    b"\xd6\xff\x00\x00\x00\x00",
    b"\xc7\x03\xff\x00\x00\x00",  # timestamps
    b"\xc1",
    b"\x91" * 64,
    b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",  # never-used byte, nesting, NaN
]

mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete", "truncate", "hostile"]),
        st.integers(0, 1 << 16),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=6,
)


def mutate(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for kind, where, value in ops:
        at = where % (len(buf) + 1)
        if kind == "truncate":
            del buf[at:]
        elif kind == "insert":
            buf[at:at] = bytes([value])
        elif kind == "hostile":
            buf[at:at] = HOSTILE[value % len(HOSTILE)]
        elif at < len(buf):
            if kind == "flip":
                buf[at] ^= 1 << (value % 8)
            elif kind == "set":
                buf[at] = value
            else:
                del buf[at]
    return bytes(buf)


# --- manifests, through the codec ----------------------------------------------------------------


def fake_read_blob(blob, out, path, *, deferred=False):
    """A store holding zero-filled chunks of small blobs (not of large ones: no huge writes)."""
    if out.nbytes != blob.nbytes:
        raise AssertionError(f"codec allocated {out.nbytes} bytes for a blob of {blob.nbytes}")
    if out.nbytes > 1 << 20:
        raise ChunkMissingError("chunk is missing (fuzz)", path=path)
    out[:] = 0


KEEP = Keep(last=2, every=1000, interval=3600.0)


def load_manifest(data: bytes):
    """Decode a manifest and every component's value, as ``Store.load`` would, and run a
    retention policy over it, as ``Store.retain`` would."""
    manifest = decode_manifest(data)
    KEEP.select([StepInfo(manifest.step, manifest.created, {}, False)])
    return {name: codec.decode(node, fake_read_blob, name) for name, node in manifest.components}


def sample_manifests() -> list[bytes]:
    ml = [ScalarLeaf("bfloat16", b"\x80\x3f")]
    node = DictNode(
        (
            ("w", ArrayLeaf("<f4", (4, 3), InlineBlob(b"\0" * 48))),
            ("t", ArrayLeaf("<M8[ns]", (2,), InlineBlob(b"\1" * 16))),
            ("s", ArrayLeaf("<U3", (2, 1), InlineBlob(b"a\0\0\0" * 6))),
            ("big", ArrayLeaf("|u1", (100,), ChunkedBlob(100, 50, ID * 2))),
            ("paged", ArrayLeaf("<i8", (1000, 2), PagedBlob(16000, 4096, ID))),
            ("bytes", BytesLeaf(InlineBlob(b"abc"))),
            (
                "seq",
                SeqNode(
                    True,
                    (
                        ValueLeaf(None),
                        ValueLeaf(2**70),
                        ValueLeaf("x"),
                        ValueLeaf(True),
                        ValueLeaf(-1.5),
                        ScalarLeaf("<i8", b"\1" * 8),
                        *ml,
                    ),
                ),
            ),
        )
    )
    shards = ShardsNode((ValueLeaf(1.0), SeqNode(False, (ValueLeaf(3),))))
    return [
        encode_manifest(Manifest(7, 1.5, 1234, (("agent", node), ("replay", shards)))),
        encode_manifest(Manifest(0, 0.0, 0, (("x", ArrayLeaf("|b1", (0, 5), InlineBlob(b""))),))),
    ]


# Sealed records (as written now: a mutation mostly meets the checksum) and their bare bodies
# (as formats 1-2 wrote them: a mutation reaches the decoder itself).
MANIFESTS = sample_manifests() + [unseal(m, "manifest") for m in sample_manifests()]


def test_sample_manifests_load():
    for data in MANIFESTS:
        assert load_manifest(data)


@fuzz(1500)
@given(data=st.binary(max_size=600))
def test_manifest_arbitrary_bytes(data):
    survives("manifest: arbitrary bytes", load_manifest, data)


@fuzz(2000)
@given(which=st.sampled_from(range(len(MANIFESTS))), ops=mutations)
def test_manifest_mutated(which, ops):
    survives("manifest: mutated encoding", load_manifest, mutate(MANIFESTS[which], ops))


def _wire_manifest(components, **fields) -> bytes:
    record = {"format": 1, "step": 1, "created": 1.0, "logical_bytes": 0, "components": components}
    record.update(fields)
    return msgpack.packb(record, use_bin_type=True)


anything = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=4),
        st.binary(max_size=40),
    ),
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=3), kids, max_size=3)),
    max_leaves=8,
)
HUGE = [1 << 31, 1 << 32, (1 << 62) - 1, 1 << 62, (1 << 62) + 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
sizes = st.one_of(st.integers(0, 5000), st.sampled_from(HUGE), st.integers(-(2**63), -1), anything)
dims = st.one_of(st.integers(0, 6), st.sampled_from([0, *HUGE]), st.integers(-(2**63), -1), anything)
shapes = st.one_of(
    st.lists(dims, max_size=8),
    st.lists(st.sampled_from([0, 1, 1 << 62, 3]), min_size=2, max_size=70),
    st.lists(st.integers(2, 255), min_size=8, max_size=20),  # the product overflows int64
    anything,
)
UNSAFE_DTYPES = [
    "O",
    "|O",
    "V8",
    "|V0",
    "i4,i4",
    "(2,)i4",
    "[('a', '<i4')]",
    "S0",
    "U0",
    "|S0",
    "<U0",
    "a",
    "a4",
    "U",
    "S",
    "str",
    "bytes",
    "object",
    "void",
    "T",
    "S2147483647",
    "U536870911",
    "<U268435456",
    "M8[99999999999999999999Y]",
    "m8[7as]",
    "<M8[-1s]",
    "M8[as/7]",
    "f16",
    "<c32",
    "bool",
    "float",
    "int",
    "=i8",
    "|i8",
    "<f2",
    "bfloat16",
    "float8_e4m3fn",
    "int4",
    "uint2",
    "int64,",
    "i",
    "b",
    "?",
    "e",
    "p",
    "P",
    "G",
    "g",
    "F",
    "D",
    "\x00",
    "<",
    "|",
]
dtypes = st.one_of(
    st.sampled_from(UNSAFE_DTYPES),
    st.from_regex(r"[<>|=]?[a-zA-Z?][0-9]{0,12}(\[[0-9]{0,22}[a-zA-Z/]{0,4}\])?", fullmatch=True),
    st.text(max_size=40),
    anything,
)
ids = st.one_of(st.binary(max_size=100), st.integers(0, 6).map(lambda n: ID * n), anything)
blobs = st.one_of(
    st.tuples(st.just("i"), st.one_of(st.binary(max_size=80), anything)).map(list),
    st.tuples(st.sampled_from(["c", "p"]), sizes, sizes, ids).map(list),
    st.lists(anything, max_size=5),
)
leaves = st.one_of(
    st.tuples(st.just("A"), dtypes, shapes, blobs).map(list),
    st.tuples(st.just("G"), dtypes, st.one_of(st.binary(max_size=20), anything)).map(list),
    st.tuples(st.sampled_from(["Y", "P"]), blobs).map(list),
    st.tuples(st.sampled_from(["N", "B", "I", "F", "S", "J"]), anything).map(list),
    st.tuples(st.just("J"), st.text(alphabet="0123456789-+_ ", max_size=30)).map(list),
    st.lists(anything, max_size=4),
    anything,
)
# Format 5's nodes: M (a dict keyed by value nodes) and X (a typed node: kind, attrs, node).
# Their attrs are drawn from what the codec reads (a type name, torch dtype names, devices,
# tied paths) as well as garbage, so decoding reaches the torch, jax and record code.
TORCH_NAMES = (
    "bool uint8 int8 int16 int32 int64 uint16 uint32 uint64 float16 float32 float64 complex64 complex128 "
    "bfloat16 float8_e4m3fn float8_e5m2 float8_e4m3fnuz float8_e5m2fnuz complex32 qint8 float double".split()
)
DEVICES = ["cpu", "cuda", "cuda:0", "cuda:7", "cpu:3", "meta", "mps", "xpu", "hpu", "cuda:-1", "gpu", ""]
TYPE_NAMES = [
    "collections:OrderedDict",
    "os:stat_result",
    "inspect:FullArgSpec",  # a NamedTuple of an imported module
    "castore.format.manifest:ArrayLeaf",  # a dataclass of an imported module
    "castore.format.manifest:TypedNode.attr",
    "no.such.module:Thing",
    "a:b:c",
    ":",
    "builtins:int",
]
attr_values = st.one_of(
    st.sampled_from(TORCH_NAMES + DEVICES + TYPE_NAMES + ["a", "0", "c/a", "0/w"]),
    st.booleans(),
    st.none(),
    st.integers(-2, 2),
    st.floats(),
    st.text(max_size=6),
    st.lists(st.text(max_size=4), max_size=3),
)
typed_attrs = st.one_of(
    st.dictionaries(
        st.one_of(
            st.sampled_from(["type", "dtype", "device", "requires_grad", "parameter", "tied"]), st.text(max_size=3)
        ),
        attr_values,
        max_size=6,
    ),
    anything,
)
typed_kinds = st.one_of(st.sampled_from(["odict", "namedtuple", "dataclass", "torch", "jax"]), anything)
key_nodes = st.one_of(
    st.tuples(st.sampled_from(["N", "B", "I", "F", "S", "J"]), anything).map(list),
    st.sampled_from([["N"], ["I", 0], ["S", "0"], ["B", True], ["F", -0.0], ["J", "99999999999999999999999"]]),
    anything,
)
STORED_DTYPES = ["<f4", "<f8", "<f2", "|u1", "|i1", "|b1", "<u2", "<i8", "<c8", ">f4", "<U2", "|S2", "<M8[ns]"]
STORED_DTYPES += ["bfloat16", "float8_e4m3fn", "float8_e5m2", "int4"]


@st.composite
def claimed_tensors(draw):
    """A torch or jax node around an array whose inline bytes match its dtype and shape, so
    decoding gets as far as building the tensor, with attrs that may not fit the array."""
    stored = draw(st.sampled_from(STORED_DTYPES))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    nbytes = math.prod(shape) * codec.dtype_from_name(stored).itemsize
    attrs = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "dtype": st.sampled_from(TORCH_NAMES),
                "device": st.sampled_from(DEVICES),
                "requires_grad": st.one_of(st.booleans(), attr_values),
                "parameter": st.one_of(st.booleans(), attr_values),
                "tied": st.sampled_from(["a", "0", "c/a", "0/w", ""]),
            },
        )
    )
    data = draw(st.binary(min_size=nbytes, max_size=nbytes))
    return ["X", draw(st.sampled_from(["torch", "jax"])), attrs, ["A", stored, shape, ["i", data]]]


nodes = st.recursive(
    st.one_of(leaves, claimed_tensors()),
    lambda kids: st.one_of(
        st.tuples(
            st.just("D"), st.lists(st.one_of(st.tuples(st.text(max_size=3), kids).map(list), anything), max_size=3)
        ).map(list),
        st.tuples(st.sampled_from(["L", "T", "H"]), st.lists(kids, max_size=3)).map(list),
        st.tuples(st.just("M"), st.lists(st.one_of(st.tuples(key_nodes, kids).map(list), anything), max_size=3)).map(
            list
        ),
        st.tuples(st.just("X"), typed_kinds, typed_attrs, kids).map(list),
    ),
    max_leaves=10,
)


@st.composite
def claimed_arrays(draw):
    """Array nodes whose inline bytes match what dtype and shape claim, so the codec builds them."""
    name = draw(st.sampled_from(UNSAFE_DTYPES + ["<f8", "|u1", "<U3", "|S2", "<M8[ns]", "|b1"]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy's deprecated aliases ("a")
            itemsize = np.dtype(name).itemsize
    except Exception:
        itemsize = draw(st.integers(0, 16))
    shape = draw(
        st.one_of(
            st.lists(st.integers(0, 4), max_size=4),
            st.lists(st.sampled_from([1, 2, 1 << 31, 1 << 40, 1 << 62]), min_size=1, max_size=4).map(lambda s: [0, *s]),
        )
    )
    nbytes = int(np.prod(shape, dtype=object)) * itemsize
    blob = ["i", b"\0" * nbytes] if nbytes <= 4096 else ["c", nbytes, 1 << 28, ID * -(-nbytes // (1 << 28))]
    if draw(st.booleans()):
        return ["A", name, shape, blob]
    return ["G", name, b"\0" * min(itemsize, 4096)]


@fuzz(1500)
@given(
    node=st.one_of(nodes, claimed_arrays()),
    name=st.one_of(st.text(max_size=3), anything),
    step=sizes,
    created=st.one_of(st.floats(), anything),
    logical=sizes,
    fmt=st.one_of(st.just(1), anything),
)
def test_manifest_wrong_types_and_sizes(node, name, step, created, logical, fmt):
    data = _wire_manifest([[name, node]], step=step, created=created, logical_bytes=logical, format=fmt)
    survives("manifest: structured garbage", load_manifest, data)


@fuzz(300)
@given(node=claimed_arrays())
def test_manifest_claimed_arrays(node):
    survives("manifest: claimed arrays", load_manifest, _wire_manifest([["c", node]]))


@pytest.mark.parametrize("depth", [MAX_DEPTH, MAX_DEPTH + 1, 200, 1000, 10_000])
def test_manifest_deep_nesting_is_bounded(depth):
    prefix = _wire_manifest([["c", ["N"]]])
    head = prefix[: prefix.index(b"\x91\x92\xa1c")]  # the manifest up to its components list
    component = head + b"\x91\x92\xa1c"  # ... and into [["c", node]]
    cases = {  # raw msgpack: packb itself refuses to build the deepest
        "lists": head + b"\x91" * depth + b"\xc0",  # [[[...]]]
        "maps": head + b"\x81\xa1k" * depth + b"\xc0",  # {"k": {"k": ...}}
        "nodes": component + b"\x92\xa1L\x91" * depth + b"\x91\xa1N",  # ["L", [["L", [...]]]]
        "dicts": component + b"\x92\xa1D\x91\x92\xa1k" * depth + b"\x91\xa1N",  # ["D", [["k", ...]]]
    }
    for kind, data in cases.items():
        survives("manifest: deep nesting", load_manifest, data)
        if kind in ("nodes", "dicts"):
            if depth <= MAX_DEPTH:
                load_manifest(data)  # as deep as the format allows: decodes
            else:
                with pytest.raises(castore.CorruptDataError):
                    load_manifest(data)


@pytest.mark.parametrize("header", HOSTILE)
def test_manifest_huge_declared_lengths(header):
    good = MANIFESTS[-2]  # a bare body: the lengths meet the decoder, not the checksum
    for at in range(0, len(good), 7):
        survives("manifest: huge declared lengths", load_manifest, good[:at] + header + good[at:])
        survives("manifest: huge declared lengths", load_manifest, good[:at] + header)


@pytest.mark.parametrize("created", [float("inf"), float("-inf"), float("nan")])
def test_manifest_created_must_be_finite(created):
    with pytest.raises(castore.CorruptDataError, match="created"):  # was OverflowError in retention
        load_manifest(_wire_manifest([["c", ["N"]]], created=created))


@pytest.mark.parametrize(
    "node, message",
    [
        (["A", "|S0", [3], ["i", b""]], "dtype"),
        (["G", "<U0", b""], "dtype"),
        (["A", "<f8", [0, 1 << 62, 1 << 62], ["i", b""]], "shape"),
        (["A", "<U268435456", [0, 1 << 40], ["i", b""]], "shape"),
        (["A", "<f8", [2] * 63, ["i", b""]], "shape"),
        (["G", "O", b"\0" * 8], "dtype"),
        (["A", "i4,i4", [1], ["i", b"\0" * 8]], "dtype"),
        (["G", "a", b""], "dtype"),
        (["G", "int", b"\0" * 8], "dtype"),
    ],
)
def test_manifest_hostile_arrays_raise_corrupt_data(node, message):
    with pytest.raises(castore.CorruptDataError, match=message):
        load_manifest(_wire_manifest([["c", node]]))


def load_typed(data: bytes, map_location):
    """Decode every component as ``Store.load`` does (paths from the component's root, so
    tied paths can meet), placing torch tensors with ``map_location``."""
    manifest = decode_manifest(data)
    return {
        name: codec.decode(node, fake_read_blob, "", map_location=map_location) for name, node in manifest.components
    }


typed_nodes = st.recursive(
    claimed_tensors(),
    lambda kids: st.one_of(
        st.tuples(st.just("D"), st.lists(st.tuples(st.sampled_from(["a", "0", "w"]), kids).map(list), max_size=3)).map(
            list
        ),
        st.tuples(st.just("M"), st.lists(st.tuples(key_nodes, kids).map(list), max_size=3)).map(list),
        st.tuples(st.just("X"), typed_kinds, typed_attrs, kids).map(list),
        st.tuples(st.just("L"), st.lists(kids, max_size=3)).map(list),
    ),
    max_leaves=6,
)


@fuzz(800)
@given(node=typed_nodes, map_location=st.sampled_from([None, "cpu", {"cuda:0": "cpu"}]))
def test_manifest_typed_and_map_nodes(node, map_location):
    survives("manifest: typed and map nodes", load_typed, _wire_manifest([["c", node]]), map_location)


TENSOR = ["A", "<f4", [2], ["i", b"\0" * 8]]


@pytest.mark.parametrize(
    "node",
    [
        ["M", [[["L", []], ["N"]]]],  # a key that is not a value node
        ["M", [[["S", "k"]]]],  # an item without its node
        ["M", [["k", ["N"]]]],  # a bare key
        ["M", {"k": ["N"]}],
        ["X", "pickle", {}, ["N"]],  # an unknown kind
        ["X", "odict", {}, ["L", []]],  # kinds around the wrong node
        ["X", "namedtuple", {"type": "m:T"}, ["L", []]],
        ["X", "dataclass", {"type": "m:T"}, ["N"]],
        ["X", "torch", {"dtype": "float32"}, ["D", []]],
        ["X", "jax", {}, ["S", "x"]],
        ["X", "odict", [], ["D", []]],  # attrs that are not a short map
        ["X", "odict", {"k" * 65: 1}, ["D", []]],
        ["X", "odict", {str(i): i for i in range(33)}, ["D", []]],
        ["X", "odict", {"a": {"nested": 1}}, ["D", []]],
        ["X", "odict", {}, ["D", []], "extra"],
        ["X", "torch", {"dtype": "qint8"}, TENSOR],  # dtypes no save writes
        ["X", "torch", {"dtype": 7}, TENSOR],
        ["X", "torch", {"dtype": "float64"}, TENSOR],  # the array is not of the tensor's dtype
        ["X", "torch", {"dtype": "bfloat16"}, ["A", "|u1", [3], ["i", b"\0" * 3]]],
        ["X", "torch", {"dtype": "float32"}, ["A", "<U1", [2], ["i", b"\0" * 8]]],
        ["X", "torch", {"dtype": "float32"}, ["A", ">f4", [2], ["i", b"\0" * 8]]],
        ["X", "torch", {"dtype": "float32", "device": 3}, TENSOR],
        ["X", "jax", {}, ["A", "<U1", [2], ["i", b"\0" * 8]]],  # no jax array of strings or dates
        ["X", "jax", {}, ["A", "<M8[ns]", [1], ["i", b"\0" * 8]]],
        ["X", "namedtuple", {"type": "m:T"}, ["D", [["a", ["N"]], ["a", ["N"]]]]],  # one field twice
        ["X", "dataclass", {"type": "m:T"}, ["D", [["a", ["N"]], ["a", ["N"]]]]],
    ],
)
def test_hostile_map_and_typed_nodes_raise_corrupt_data(node):
    for map_location in (None, "cpu"):
        with pytest.raises(castore.CorruptDataError):
            load_typed(_wire_manifest([["c", node]]), map_location)


def test_a_device_torch_does_not_know_is_corrupt_data_unless_mapped():
    data = _wire_manifest([["c", ["X", "torch", {"dtype": "float32", "device": "nonsense"}, TENSOR]]])
    with pytest.raises(castore.CorruptDataError, match="not a torch device"):
        load_typed(data, None)
    assert load_typed(data, "cpu")["c"].device.type == "cpu"  # as torch.load: map_location decides


# --- chunk-list pages ------------------------------------------------------------------------------


@fuzz(300)
@given(page=st.one_of(st.binary(max_size=9000), st.integers(0, 300).map(lambda n: ID * n)))
def test_chunk_list_pages(page):
    checked = survives("chunk-list page", page_ids_in, page)
    if checked is not None:
        assert b"".join(split_ids(checked)) == page and len(page) % ID_BYTES == 0


# --- the config record -----------------------------------------------------------------------------

CONFIG = config.new_config(1 << 20)


def parse(raw):
    """``parse_config``; what it accepts, ``migrate`` (run when a writer takes the store) takes too."""
    parsed = config.parse_config(raw, "fuzz")
    chunk_bytes, version = parsed.chunk_bytes, parsed.format
    assert type(chunk_bytes) is int and type(version) is int
    current = config.migrate(raw)
    if current is not None:
        assert config.parse_config(current, "fuzz") == config.StoreConfig(chunk_bytes, STORE_FORMAT, parsed.compression)
    return chunk_bytes, version


@fuzz(800)
@given(data=st.one_of(st.binary(max_size=300), mutations.map(lambda ops: mutate(CONFIG, ops))))
def test_config_bytes(data):
    survives("config: bytes", parse, data)


GOOD_CONFIG = msgpack.unpackb(CONFIG)


@st.composite
def config_records(draw):
    """The valid config with a few fields replaced by values of the wrong type or range, or dropped."""
    record = dict(GOOD_CONFIG)
    wrong = {
        "format": st.one_of(st.integers(-3, STORE_FORMAT + 2), st.booleans(), st.floats(0, 4), anything),
        "hash": st.one_of(st.sampled_from(["blake3-256", "sha256", ""]), anything),
        "chunk_bytes": st.one_of(st.sampled_from([4096, 4095, 256 << 20, (256 << 20) + 1, True, 65536.0]), sizes),
        "page_ids": st.one_of(st.sampled_from([256, 255, 256.0, True]), anything),
        "created": anything,
    }
    for key in draw(st.lists(st.sampled_from(sorted(wrong)), min_size=1, max_size=3, unique=True)):
        if draw(st.integers(0, 5)) == 0:
            del record[key]
        else:
            record[key] = draw(wrong[key])
    if draw(st.booleans()):
        record[draw(st.text(max_size=4))] = draw(anything)
    return record


@fuzz(800)
@given(record=st.one_of(config_records(), anything))
def test_config_wrong_types(record):
    survives("config: structured garbage", parse, msgpack.packb(record, use_bin_type=True))


# --- catalog records: metrics and tags ---------------------------------------------------------------


class FakeTxn:
    """What catalog reads of a transaction: ``get`` (one value) and ``scan`` (given items)."""

    def __init__(self, value=None, items=()):
        self.value, self.items = value, items

    def get(self, table, key):
        return self.value

    def scan(self, table, start=b"", stop=None, *, reverse=False):
        return iter(self.items)


def read_metrics(raw):
    record = catalog.read_stepinfo(FakeTxn(raw), step_key(3))
    assert record.created is None or (type(record.created) is float and math.isfinite(record.created))
    assert all(type(k) is str and type(v) is float for k, v in record.metrics.items())
    return record.metrics


METRICS = msgpack.packb({"metrics": {"loss": 0.5, "acc": 1.0}}, use_bin_type=True)
STEPINFO = encode_stepinfo(1.7e9, {"loss": 0.5})


@fuzz(600)
@given(
    raw=st.one_of(
        st.binary(max_size=200),
        mutations.map(lambda ops: mutate(METRICS, ops)),
        mutations.map(lambda ops: mutate(STEPINFO, ops)),
        mutations.map(lambda ops: mutate(STEPINFO[SEAL_BYTES:], ops)),
        st.one_of(st.dictionaries(st.text(max_size=3), anything, max_size=3), anything).map(
            lambda m: msgpack.packb({"metrics": m}, use_bin_type=True)
        ),
        anything.map(lambda c: msgpack.packb({"created": c, "metrics": {}}, use_bin_type=True)),
        anything.map(lambda r: msgpack.packb(r, use_bin_type=True)),
    )
)
def test_metrics_records(raw):
    survives("catalog: metrics record", read_metrics, raw)


step_keys = st.one_of(
    st.binary(max_size=40),
    st.builds(
        lambda name, n: step_key(n, name),
        st.from_regex(r"[a-z][a-z0-9./-]{0,8}", fullmatch=True),
        st.integers(0, 2**63 - 1),
    ),
    st.builds(
        lambda name, n: b"\xff" + name + b"\x00" + n.to_bytes(8, "big"),
        st.binary(max_size=12),
        st.integers(0, 2**64 - 1),
    ),
)


@fuzz(600)
@given(items=st.lists(st.tuples(st.binary(min_size=1, max_size=20), step_keys), max_size=4), name=st.text(max_size=6))
def test_tag_values(items, name):
    found = survives("catalog: tags", catalog.tags, FakeTxn(items=items))
    if found is not None:
        assert all(branch_of(v) for v in found.values())
    if items:
        survives("catalog: tags", catalog.find_tag, FakeTxn(items[0][1], items), name or "t", "fuzz")
    for _, value in items:
        survives("catalog: tags", branch_of, value)


# --- opening a store whose data file is damaged (in child processes) -----------------------------------

#: runs the cases of a JSON file, each on a fresh copy of a store's data file, and prints per case
#: ``start I``, then ``ok I STEP FINGERPRINT`` or ``castore I ERROR`` or ``other I ERROR: MESSAGE``
OPEN_SCRIPT = textwrap.dedent("""
    import faulthandler, json, os, resource, shutil, sys
    faulthandler.enable()  # a crash in LMDB prints where it happened to stderr
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # and dumps no core (slow, and litter)
    import castore
    from workload import fingerprint

    spec = json.load(open(sys.argv[1]))
    image = open(spec["image"], "rb").read()
    for i in range(int(sys.argv[2]), len(spec["cases"])):
        case = spec["cases"][i]
        data = bytearray(image)
        for at, value in case["writes"]:
            data[at] = value
        path = os.path.join(spec["work"], str(i))
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        with open(os.path.join(path, "data.mdb"), "wb") as f:
            if case["length"] is None:
                f.write(data)
                f.truncate(spec["file_bytes"])  # as LMDB leaves it: sparse up to the map size
            else:
                f.write(data[: case["length"]])
        print("start", i, flush=True)
        try:
            with castore.Store(path, create=False, readonly=case["readonly"]) as store:
                state = store.load()
                print("ok", i, store.latest(), fingerprint(state), flush=True)
        except castore.CastoreError as exc:
            print("castore", i, type(exc).__name__, flush=True)
        except BaseException as exc:
            print("other", i, f"{type(exc).__name__}: {exc}"[:300].replace(chr(10), " "), flush=True)
        shutil.rmtree(path, ignore_errors=True)
""")


def _states():
    rng = np.random.default_rng(7)
    first = {
        "agent": {"w": rng.standard_normal((300, 64), np.float32), "step": np.int64(1), "name": "run"},
        "replay": rng.integers(0, 255, (400, 1024), np.uint8),  # 100 chunks of 4 KiB: a paged id list
        "small": [1, 2.5, None, b"xyz", (True, "a")],
    }
    second = dict(first, agent=dict(first["agent"], step=np.int64(2)))
    return {1: first, 2: second}


@pytest.fixture(scope="module")
def saved_store(tmp_path_factory):
    """A real store (two steps, metrics, a tag): its path, an ``image`` file of its used pages,
    their size, LMDB's page size, the fingerprint of each step's state."""
    path = tmp_path_factory.mktemp("fuzz") / "store"
    states = _states()
    with castore.Store(path, chunk_bytes=4096) as store:
        for step, state in states.items():
            store.save(step, state, metrics={"loss": 1.0 / step})
        store.tag("best", 1)
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=16)
    try:
        used = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        page = env.stat()["psize"]
    finally:
        env.close()
    image = path.parent / "image"
    with open(path / "data.mdb", "rb") as f:  # the used pages only: the file is a sparse 1 GiB
        image.write_bytes(f.read(used))
    expected = {str(step): fingerprint(state) for step, state in states.items()}
    return {
        "path": path,
        "image": image,
        "used": used,
        "page": page,
        "expected": expected,
        "file_bytes": os.path.getsize(path / "data.mdb"),
    }


def run_open_cases(store: dict, cases: list[dict], work) -> dict:
    """Run the cases in child processes; returns ``{index: outcome line or crash}``.

    A child that dies by a signal is restarted after the case that killed it.
    """
    spec = work / "cases.json"
    spec.write_text(
        json.dumps({"image": str(store["image"]), "file_bytes": store["file_bytes"], "work": str(work), "cases": cases})
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, os.path.join(REPO_ROOT, "tests")]))
    outcomes: dict[int, str] = {}
    start = 0
    while start < len(cases):
        try:
            child = subprocess.run(
                [sys.executable, "-c", OPEN_SCRIPT, str(spec), str(start)],
                env=env,
                capture_output=True,
                text=True,
                timeout=60 + 0.1 * (len(cases) - start),
            )
        except subprocess.TimeoutExpired as exc:
            running = [line for line in (exc.stdout or b"").decode().splitlines() if line.startswith("start")]
            raise AssertionError(f"opening a damaged store hangs: case {running[-1:]} {cases[start]}") from None
        started = None
        for line in child.stdout.splitlines():
            words = line.split()
            if words[0] == "start":
                started = int(words[1])
            else:
                outcomes[int(words[1])] = line
        if child.returncode == 0:
            break
        assert started is not None, f"child failed before any case: {child.stderr[-2000:]}"
        how = f"signal {signal.Signals(-child.returncode).name}" if child.returncode < 0 else f"exit {child.returncode}"
        outcomes[started] = f"died by {how}: {child.stderr[-600:]}"
        start = started + 1
    CASES["store: open damaged data file"] += len(cases)
    return outcomes


def _assert_clean(store: dict, cases: list[dict], outcomes: dict) -> None:
    bad = []
    for i, case in enumerate(cases):
        outcome = outcomes.get(i, "no outcome")
        words = outcome.split()
        if words[0] == "ok":
            if store["expected"].get(words[2]) != words[3]:
                bad.append((case, f"loaded step {words[2]} is not the state saved at it"))
        elif words[0] != "castore":
            bad.append((case, outcome))
    assert not bad, f"{len(bad)} of {len(cases)} damaged stores escaped castore's errors:\n" + "\n".join(
        f"  {case}: {outcome}" for case, outcome in bad[:10]
    )


def meta_page_damage(seed: int, count: int, page: int, used: int) -> list[dict]:
    """Random writes into LMDB's two meta pages (each alone, or the same bytes in both), and
    truncations opened writable (read-only ones are the known crash below)."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        kind = rng.choice(["flip", "bytes", "both", "truncate"])
        length, writes = None, []
        if kind == "flip":
            writes = [[rng.randrange(2 * page), rng.randrange(256)] for _ in range(rng.randint(1, 4))]
        elif kind == "bytes":
            at = rng.randrange(2 * page)
            writes = [[min(at + k, 2 * page - 1), rng.randrange(256)] for k in range(rng.randint(1, 64))]
        elif kind == "both":  # the same damage in both metas: LMDB cannot fall back to the other one
            at = 16 + rng.randrange(136)  # MDB_meta follows the 16-byte page header
            values = [rng.randrange(256) for _ in range(rng.choice([1, 2, 8]))]
            writes = [[base + at + k, v] for base in (0, page) for k, v in enumerate(values) if at + k < page]
        else:
            length = rng.randrange(used)
        cases.append(
            {"writes": writes, "length": length, "readonly": kind != "truncate" and rng.random() < 0.5, "kind": kind}
        )
    return cases


def test_store_with_damaged_meta_pages_raises_only_castore_errors(saved_store, tmp_path):
    seed = int(os.environ.get("CASTORE_FUZZ_SEED", "20240611"))
    cases = meta_page_damage(seed, max(1, int(600 * SCALE)), saved_store["page"], saved_store["used"])
    outcomes = run_open_cases(saved_store, cases, tmp_path)
    _assert_clean(saved_store, cases, outcomes)
    kinds = collections.Counter(
        o.split()[0] + ("" if o.startswith("ok") else " " + o.split()[2]) for o in outcomes.values()
    )
    assert kinds["ok"] and len(kinds) > 1, kinds  # both clean loads and refusals were exercised


def test_undamaged_copy_loads(saved_store, tmp_path):
    cases = [{"writes": [], "length": None, "readonly": ro} for ro in (False, True)]
    outcomes = run_open_cases(saved_store, cases, tmp_path)
    _assert_clean(saved_store, cases, outcomes)
    assert all(o.startswith("ok 0 2") or o.startswith("ok 1 2") for o in outcomes.values()), outcomes


# --- known crashes of damaged data files: LMDB itself dies, castore cannot catch a signal -------------


class EscapedCastoreError(AssertionError):
    """A damaged store made the opening process die or raise something else than a CastoreError."""


def open_damaged(store: dict, tmp_path, *, writes=(), length=None, readonly: bool) -> str:
    cases = [{"writes": [list(w) for w in writes], "length": length, "readonly": readonly}]
    outcome = run_open_cases(store, cases, tmp_path)[0]
    if not outcome.startswith(("castore", "ok")):
        raise EscapedCastoreError(outcome)
    return outcome


def _u64(image: bytes, at: int) -> int:
    return int.from_bytes(image[at : at + 8], "little")


def _u16(image: bytes, at: int) -> int:
    return int.from_bytes(image[at : at + 2], "little")


def _page_nodes(image: bytes, page: int, pgno: int):
    """``(offset of node header, flags, key, offset of data)`` of each node of a leaf page.

    LMDB's layout: a page starts with ``pgno`` (8 bytes), pad, flags, lower, upper (2 each),
    then ``lower - 16`` bytes of 2-byte node offsets; a node is ``mn_lo, mn_hi`` (its data
    size), ``mn_flags``, ``mn_ksize`` (2 bytes each), key, data.
    """
    base = pgno * page
    for slot in range(base + 16, base + _u16(image, base + 12), 2):
        node = base + _u16(image, slot)
        ksize = _u16(image, node + 6)
        yield node, _u16(image, node + 4), image[node + 8 : node + 8 + ksize], node + 8 + ksize


def _leaf_nodes(image: bytes, page: int):
    """The nodes of every leaf page (flags 0x02; an overflow page's contents do not count)."""
    for pgno in range(len(image) // page):
        if _u64(image, pgno * page) == pgno and _u16(image, pgno * page + 10) == 0x02:
            yield from _page_nodes(image, page, pgno)


def test_truncated_data_file_opened_readonly(saved_store, tmp_path):
    open_damaged(saved_store, tmp_path, length=2 * saved_store["page"], readonly=True)  # the meta pages only


def test_truncated_data_file_opened_writable_is_refused(saved_store, tmp_path):
    outcome = open_damaged(saved_store, tmp_path, length=2 * saved_store["page"], readonly=False)
    assert outcome.startswith("castore")


def test_main_root_on_a_free_page_opened_writable(saved_store, tmp_path):
    image, page = saved_store["image"].read_bytes(), saved_store["page"]
    # a meta page: 16-byte header, magic, version, address, map size, then two 48-byte MDB_db
    # (free and main database; md_root their last 8 bytes), last page, txn id
    newest = max((0, page), key=lambda meta: _u64(image, meta + 144))  # mm_txnid
    free_root = _u64(image, newest + 80)  # mm_dbs[FREE_DBI].md_root: one leaf page in this small store
    # free database records: key = txn id, data = count, then the freed page numbers descending
    records = sorted(
        (_u64(key, 0), [_u64(image, data + 8 * (k + 1)) for k in range(_u64(image, data))])
        for _, _, key, data in _page_nodes(image, page, free_root)
    )
    first_reused = records[0][1][-1]  # mdb_page_alloc hands out the lowest page of the oldest record first
    root = first_reused.to_bytes(8, "little")
    writes = [(meta + 128 + k, b) for meta in (0, page) for k, b in enumerate(root)]  # mm_dbs[MAIN_DBI].md_root
    open_damaged(saved_store, tmp_path, writes=writes, readonly=False)


@pytest.mark.xfail(
    strict=True,
    raises=EscapedCastoreError,
    reason=(
        "a leaf node of a large chunk whose data size is inflated (one byte of its 8-byte node header) "
        "kills the reader by SIGBUS (SIGSEGV when opened writable) inside lmdb's Transaction.get: LMDB "
        "trusts the size, and the value runs past the file and the map before castore sees it"
    ),
)
def test_inflated_chunk_size_in_a_leaf_node(saved_store, tmp_path):
    image, page = saved_store["image"].read_bytes(), saved_store["page"]
    node = next(node for node, flags, key, _ in _leaf_nodes(image, page) if flags & 0x01 and len(key) == ID_BYTES)
    # the file holds every used page, as a compacted copy does (a writable open, which grows the
    # file to the map size first, dies the same way but only after reading 1 GiB of zeros)
    open_damaged(saved_store, tmp_path, writes=[(node + 3, 0x60)], length=len(image), readonly=True)

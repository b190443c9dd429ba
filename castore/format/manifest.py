"""Format records of a step (frozen dataclasses) and their msgpack wire form.

``docs/format.md`` is the specification; this module follows it.  Decoding treats its
input as untrusted: any malformed input raises :class:`CorruptDataError` and nothing else,
sizes are checked against the bytes present, and nesting depth is bounded.

Past ~400 lines on purpose: every record of docs/format.md's *Manifest* section, its
writer and its untrusted reader, in one place to hold against the spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NoReturn

import msgpack

from ..errors import CorruptDataError
from .chunker import MAX_CHUNK_BYTES
from .ids import ID_BYTES
from .sealing import seal, unpack_untrusted, unseal

MANIFEST_FORMAT = 1  #: the manifest record's own ``format`` field (the store format is schema.STORE_FORMAT)
MAX_DEPTH = 128  # nesting of containers in one component; encode and decode both enforce it
PAGE_IDS = 256  # chunk ids per chunk-list page (8 KiB pages)
INLINE_IDS = 64  # a blob with at most this many chunks lists ids in the manifest itself
MAX_MANIFEST_BYTES = 1 << 30
INT64_MIN, UINT64_MAX = -(1 << 63), (1 << 64) - 1


# --- blobs: where the bytes of a leaf live -------------------------------------------


@dataclass(frozen=True, slots=True)
class InlineBlob:
    """Bytes kept in the manifest itself (small leaves)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ChunkedBlob:
    """Bytes cut into chunks of ``chunk_nbytes`` (the last shorter), ids listed inline."""

    nbytes: int
    chunk_nbytes: int
    ids: bytes  #: concatenated 32-byte chunk ids, in order


@dataclass(frozen=True, slots=True)
class PagedBlob:
    """Like :class:`ChunkedBlob`, but the id list lives in content-addressed pages."""

    nbytes: int
    chunk_nbytes: int
    page_ids: bytes  #: concatenated ids of pages; each page holds up to PAGE_IDS chunk ids


Blob = InlineBlob | ChunkedBlob | PagedBlob


# --- nodes of a component's tree ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ValueLeaf:
    """A Python ``None``, ``bool``, ``int``, ``float`` or ``str``."""

    value: object


@dataclass(frozen=True, slots=True)
class BytesLeaf:
    """A Python ``bytes`` value."""

    blob: Blob


@dataclass(frozen=True, slots=True)
class ScalarLeaf:
    """A numpy scalar (``np.int64(3)``): its dtype name and raw bytes."""

    dtype: str
    data: bytes


@dataclass(frozen=True, slots=True)
class ArrayLeaf:
    """A numpy array: dtype name, shape, and its C-order bytes."""

    dtype: str
    shape: tuple[int, ...]
    blob: Blob


@dataclass(frozen=True, slots=True)
class PickleLeaf:
    """A pickled object, stored only with ``allow_pickle=True``."""

    blob: Blob


@dataclass(frozen=True, slots=True)
class DictNode:
    """A dict with str keys, in insertion order."""

    items: tuple[tuple[str, Node], ...]


@dataclass(frozen=True, slots=True)
class MapNode:
    """A dict with keys that are not all str (``None``, ``bool``, ``int``, ``float``,
    ``str``: a torch optimizer's state is keyed by parameter index), in insertion order."""

    items: tuple[tuple[object, Node], ...]


#: kinds of :class:`TypedNode`; the codec (``castore.format.codec``) gives their meaning
TYPED_KINDS = frozenset({"odict", "namedtuple", "dataclass", "torch", "jax"})
MAX_ATTRS = 32
MAX_ATTR_TEXT = 4096  #: UTF-8 bytes of a str attr (or of each str of a list attr)


@dataclass(frozen=True, slots=True)
class TypedNode:
    """A value of a named kind around an ordinary node: an ``OrderedDict``, a NamedTuple or
    dataclass (fields as a str-keyed dict node), a ``torch.Tensor`` or ``jax.Array`` (an
    array leaf).  ``attrs`` are small facts of the kind (the type's name, a tensor's device)."""

    kind: str
    attrs: tuple[tuple[str, object], ...]
    node: Node

    def attr(self, name: str, default=None):
        for key, value in self.attrs:
            if key == name:
                return value
        return default


@dataclass(frozen=True, slots=True)
class SeqNode:
    """A list or a tuple."""

    is_tuple: bool
    items: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class ShardsNode:
    """The shards a component's ``save()`` generator yielded, in order."""

    shards: tuple[Node, ...]


Node = (
    ValueLeaf | BytesLeaf | ScalarLeaf | ArrayLeaf | PickleLeaf | DictNode | MapNode | TypedNode | SeqNode | ShardsNode
)


@dataclass(frozen=True, slots=True)
class Manifest:
    """One committed step: what each component's state was and where its bytes live."""

    step: int
    created: float  #: UNIX time of the save
    logical_bytes: int  #: bytes of all leaves, before deduplication
    components: tuple[tuple[str, Node], ...]

    def component(self, name: str) -> Node:
        for key, node in self.components:
            if key == name:
                return node
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [key for key, _ in self.components]


# --- encoding ---------------------------------------------------------------------------


def _blob_wire(blob: Blob) -> list:
    if isinstance(blob, InlineBlob):
        return ["i", blob.data]
    if isinstance(blob, ChunkedBlob):
        return ["c", blob.nbytes, blob.chunk_nbytes, blob.ids]
    return ["p", blob.nbytes, blob.chunk_nbytes, blob.page_ids]


def _value_wire(value) -> list:
    if value is None:
        return ["N"]
    if isinstance(value, bool):
        return ["B", value]
    if isinstance(value, int):
        if INT64_MIN <= value <= UINT64_MAX:
            return ["I", value]
        return ["J", str(value)]
    if isinstance(value, float):
        return ["F", value]
    return ["S", value]


def _node_wire(node: Node) -> list:
    if isinstance(node, ValueLeaf):
        return _value_wire(node.value)
    if isinstance(node, ArrayLeaf):
        return ["A", node.dtype, list(node.shape), _blob_wire(node.blob)]
    if isinstance(node, ScalarLeaf):
        return ["G", node.dtype, node.data]
    if isinstance(node, BytesLeaf):
        return ["Y", _blob_wire(node.blob)]
    if isinstance(node, PickleLeaf):
        return ["P", _blob_wire(node.blob)]
    if isinstance(node, DictNode):
        return ["D", [[k, _node_wire(v)] for k, v in node.items]]
    if isinstance(node, MapNode):
        return ["M", [[_value_wire(k), _node_wire(v)] for k, v in node.items]]
    if isinstance(node, TypedNode):
        return [
            "X",
            node.kind,
            {k: list(v) if isinstance(v, tuple) else v for k, v in node.attrs},
            _node_wire(node.node),
        ]
    if isinstance(node, SeqNode):
        return ["T" if node.is_tuple else "L", [_node_wire(v) for v in node.items]]
    return ["H", [_node_wire(v) for v in node.shards]]


def encode_manifest(manifest: Manifest) -> bytes:
    record = {
        "format": MANIFEST_FORMAT,
        "step": manifest.step,
        "created": manifest.created,
        "logical_bytes": manifest.logical_bytes,
        "components": [[k, _node_wire(v)] for k, v in manifest.components],
    }
    return seal(msgpack.packb(record, use_bin_type=True))


# --- decoding (untrusted input) ---------------------------------------------------------


def _fail(what: str) -> NoReturn:
    raise CorruptDataError(f"malformed manifest: {what}")


def _int(value, what: str, lo: int = 0, hi: int = UINT64_MAX) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        _fail(f"{what} must be an integer in [{lo}, {hi}], got {type(value).__name__}")
    return value


def _bytes(value, what: str) -> bytes:
    if not isinstance(value, bytes):
        _fail(f"{what} must be bytes, got {type(value).__name__}")
    return value


def _ids(value, what: str) -> bytes:
    data = _bytes(value, what)
    if len(data) % ID_BYTES:
        _fail(f"{what} length {len(data)} is not a multiple of {ID_BYTES}")
    return data


def _blob_from_wire(w) -> Blob:
    if not isinstance(w, list) or not w:
        _fail("blob must be a non-empty list")
    tag = w[0]
    if tag == "i" and len(w) == 2:
        return InlineBlob(_bytes(w[1], "inline blob"))
    if tag in ("c", "p") and len(w) == 4:
        nbytes = _int(w[1], "blob size")
        chunk_nbytes = _int(w[2], "chunk size", lo=1, hi=MAX_CHUNK_BYTES)
        if tag == "c":
            ids = _ids(w[3], "chunk ids")
            if len(ids) // ID_BYTES != -(-nbytes // chunk_nbytes):
                _fail("chunk id count does not match blob size")
            return ChunkedBlob(nbytes, chunk_nbytes, ids)
        pages = _ids(w[3], "page ids")
        n_chunks = -(-nbytes // chunk_nbytes)
        if len(pages) // ID_BYTES != -(-n_chunks // PAGE_IDS):
            _fail("page id count does not match blob size")
        return PagedBlob(nbytes, chunk_nbytes, pages)
    _fail(f"unknown blob tag {tag!r}")


def _value_from_wire(tag, w) -> ValueLeaf:
    if tag == "N" and len(w) == 1:
        return ValueLeaf(None)
    if len(w) != 2:
        _fail(f"value node {tag!r} must have one field")
    v = w[1]
    if tag == "B" and isinstance(v, bool):
        return ValueLeaf(v)
    if tag == "I" and isinstance(v, int) and not isinstance(v, bool):
        return ValueLeaf(v)
    if tag == "F" and isinstance(v, float):
        return ValueLeaf(v)
    if tag == "S" and isinstance(v, str):
        return ValueLeaf(v)
    if tag == "J" and isinstance(v, str) and 0 < len(v) <= 4000:
        try:
            return ValueLeaf(int(v))
        except ValueError:
            _fail("big integer is not decimal")
    _fail(f"value node {tag!r} has a field of type {type(v).__name__}")


def _shape_from_wire(w) -> tuple[int, ...]:
    if not isinstance(w, list) or len(w) > 64:
        _fail("shape must be a list of at most 64 dimensions")
    shape = tuple(_int(d, "dimension", hi=1 << 62) for d in w)
    size = math.prod(shape)
    if size > 1 << 62:
        _fail("shape is too large")
    return shape


def _node_from_wire(w, depth: int) -> Node:
    if depth > MAX_DEPTH:
        _fail(f"nesting deeper than {MAX_DEPTH}")
    if not isinstance(w, list) or not w or not isinstance(w[0], str):
        _fail("node must be a list starting with a tag")
    tag = w[0]
    if tag in ("N", "B", "I", "J", "F", "S"):
        return _value_from_wire(tag, w)
    if tag == "A" and len(w) == 4:
        if not isinstance(w[1], str):
            _fail("array dtype must be a string")
        return ArrayLeaf(w[1], _shape_from_wire(w[2]), _blob_from_wire(w[3]))
    if tag == "G" and len(w) == 3:
        if not isinstance(w[1], str):
            _fail("scalar dtype must be a string")
        return ScalarLeaf(w[1], _bytes(w[2], "scalar data"))
    if tag in ("Y", "P") and len(w) == 2:
        blob = _blob_from_wire(w[1])
        return BytesLeaf(blob) if tag == "Y" else PickleLeaf(blob)
    if tag == "M" and len(w) == 2 and isinstance(w[1], list):
        return MapNode(tuple(_key_item_from_wire(i, depth + 1) for i in w[1]))
    if tag == "X" and len(w) == 4:
        if not isinstance(w[1], str) or w[1] not in TYPED_KINDS:  # a list kind is unhashable
            _fail(f"unknown typed node kind {str(w[1])[:40]!r}")
        return TypedNode(w[1], _attrs_from_wire(w[2]), _node_from_wire(w[3], depth + 1))
    if tag in ("D", "L", "T", "H") and len(w) == 2 and isinstance(w[1], list):
        if tag == "D":
            return DictNode(tuple(_item_from_wire(i, depth + 1) for i in w[1]))
        items = tuple(_node_from_wire(i, depth + 1) for i in w[1])
        return ShardsNode(items) if tag == "H" else SeqNode(tag == "T", items)
    _fail(f"unknown node tag {tag!r} or wrong field count")


def _item_from_wire(w, depth: int) -> tuple[str, Node]:
    if not isinstance(w, list) or len(w) != 2 or not isinstance(w[0], str):
        _fail("dict item must be [str key, node]")
    return w[0], _node_from_wire(w[1], depth)


def _key_item_from_wire(w, depth: int) -> tuple[object, Node]:
    if not isinstance(w, list) or len(w) != 2 or not isinstance(w[0], list) or not w[0]:
        _fail("map item must be [key value node, node]")
    tag = w[0][0]
    if tag not in ("N", "B", "I", "J", "F", "S"):
        _fail(f"map key must be a value node, got tag {str(tag)[:10]!r}")
    return _value_from_wire(tag, w[0]).value, _node_from_wire(w[1], depth)


def _attr_value(value, what: str):
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str) and len(value.encode()) <= MAX_ATTR_TEXT:
        return value
    if (
        isinstance(value, list)
        and len(value) <= 65536
        and all(isinstance(v, str) and len(v.encode()) <= MAX_ATTR_TEXT for v in value)
    ):
        return tuple(value)
    _fail(f"{what} must be None, a bool, number, str or list of str")


def _attrs_from_wire(w) -> tuple[tuple[str, object], ...]:
    if not isinstance(w, dict) or len(w) > MAX_ATTRS:
        _fail(f"typed node attrs must be a map of at most {MAX_ATTRS} entries")
    attrs = []
    for key, value in w.items():
        if not isinstance(key, str) or len(key) > 64:
            _fail("typed node attr names must be short strings")
        attrs.append((key, _attr_value(value, f"attr {key!r}")))
    return tuple(attrs)


def decode_manifest(data: bytes | memoryview) -> Manifest:
    """Decode a manifest; raises :class:`CorruptDataError` for anything malformed."""
    if len(data) > MAX_MANIFEST_BYTES:
        _fail("manifest larger than the format allows")
    data = unseal(data, "manifest")
    try:
        record = unpack_untrusted(data)
    except (msgpack.UnpackException, ValueError, TypeError, RecursionError) as exc:
        raise CorruptDataError(f"manifest is not valid msgpack: {exc}") from None
    if not isinstance(record, dict):
        _fail("top level must be a map")
    version = record.get("format")
    if version != MANIFEST_FORMAT:
        _fail(f"manifest format {version!r}, this castore reads {MANIFEST_FORMAT}")
    created = record.get("created")
    if not isinstance(created, float) or not math.isfinite(created):
        _fail("created must be a finite float")  # retention buckets steps by it
    comps = record.get("components")
    if not isinstance(comps, list):
        _fail("components must be a list")
    return Manifest(
        step=_int(record.get("step"), "step", hi=(1 << 63) - 1),
        created=created,
        logical_bytes=_int(record.get("logical_bytes"), "logical_bytes"),
        components=tuple(_item_from_wire(c, 0) for c in comps),
    )


def page_ids_in(page: bytes) -> bytes:
    """Validate a chunk-list page read from the store; returns it unchanged."""
    if len(page) % ID_BYTES or not 0 < len(page) <= PAGE_IDS * ID_BYTES:
        raise CorruptDataError(f"chunk-list page of {len(page)} bytes is malformed")
    return page


def iter_blobs(node: Node):
    """Yield every blob referenced by a node, depth first (for GC and verify)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, (ArrayLeaf, BytesLeaf, PickleLeaf)):
            yield n.blob
        elif isinstance(n, (DictNode, MapNode)):
            stack.extend(v for _, v in n.items)
        elif isinstance(n, TypedNode):
            stack.append(n.node)
        elif isinstance(n, SeqNode):
            stack.extend(n.items)
        elif isinstance(n, ShardsNode):
            stack.extend(n.shards)

"""State trees <-> manifest nodes (pure: bytes move through callbacks, no I/O here).

A state tree is nested ``dict`` (str keys), ``list`` and ``tuple`` of numpy arrays, numpy
scalars, ``None``, ``bool``, ``int``, ``float``, ``str`` and ``bytes``.  Types come back
exactly; anything else raises :class:`UnsupportedValueError` naming its path, unless the
caller opted into pickling.  Leaf paths join dict keys and sequence indices with ``/``.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import pickle
import re
import types
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from ..errors import CorruptDataError, UnsupportedValueError
from ..tracking import TrackedArray
from .chunker import row_nbytes_of
from .manifest import (
    MAX_DEPTH,
    ArrayLeaf,
    Blob,
    BytesLeaf,
    DictNode,
    InlineBlob,
    Node,
    PickleLeaf,
    ScalarLeaf,
    SeqNode,
    ShardsNode,
    ValueLeaf,
)

try:  # bfloat16 and float8 types, when the user has them
    import ml_dtypes
except ImportError:  # pragma: no cover - exercised only without ml_dtypes
    ml_dtypes = None  # type: ignore[assignment]

_PLAIN = (type(None), bool, int, float, str)
_MAX_NBYTES = np.iinfo(np.intp).max  # numpy's bound on an array's size times its item size
_ARRAY_KINDS = "biufcmMSU"  # numeric, bool, datetime, fixed-size strings: all pickle-free
#: a ``dtype.str`` of those kinds: byte order, kind, item size, datetime unit ("<M8[ns]")
_DTYPE_STR = re.compile(r"[<>|][biufcmMSU][0-9]{1,10}(\[[0-9]{0,10}[A-Za-z]{1,2}\])?")
_ML_DTYPE_NAMES = frozenset(
    "bfloat16 float8_e3m4 float8_e4m3 float8_e4m3b11fnuz float8_e4m3fn float8_e4m3fnuz "
    "float8_e5m2 float8_e5m2fnuz float8_e8m0fnu float6_e2m3fn float6_e3m2fn float4_e2m1fn "
    "int2 int4 uint2 uint4".split()
)


class MakeBlob(Protocol):
    """Stores a flat byte buffer; returns its Blob, or a placeholder the caller resolves
    later with :func:`map_blobs` (a save's capture does)."""

    def __call__(
        self, buffer: memoryview, row_nbytes: int, itemsize: int, path: str, *, tracked: TrackedArray | None = None
    ) -> Any: ...


class ReadBlob(Protocol):
    """Fills the writable flat uint8 array ``out`` with a blob's bytes.  With ``deferred``
    it may instead queue the work and fill ``out`` any time before the reader's owner
    finishes the load (arrays: filled on every core at once); without, ``out`` is filled
    when the call returns (bytes leaves, which are copied at once)."""

    def __call__(self, blob: Blob, out: np.ndarray, path: str, *, deferred: bool = False) -> None: ...


def join(path: str, key) -> str:
    return f"{path}/{key}" if path else str(key)


# --- dtypes -------------------------------------------------------------------------------


def dtype_name(dtype: np.dtype, path: str) -> str:
    """The stored name of a dtype; raises for dtypes that would need pickling."""
    if dtype.name in _ML_DTYPE_NAMES and ml_dtypes is not None:
        if np.dtype(getattr(ml_dtypes, dtype.name)) == dtype:
            return dtype.name
    if dtype.kind not in _ARRAY_KINDS or dtype.hasobject or dtype.fields is not None:
        raise UnsupportedValueError(path, f"dtype {dtype} is not stored (object and structured dtypes need pickling)")
    return dtype.str


def dtype_from_name(name: str) -> np.dtype:
    """Parse a stored dtype name; raises :class:`CorruptDataError` for anything unknown.

    Only what :func:`dtype_name` writes is accepted: an ``ml_dtypes`` name or a numpy
    ``dtype.str`` of a stored kind.  numpy's other spellings (``"int"``, ``"a"``,
    ``"i4,i4"``) are refused before its parser sees them, and so are zero-size items
    (``"|S0"``), of which numpy builds no array.
    """
    if name in _ML_DTYPE_NAMES:
        if ml_dtypes is None:
            raise CorruptDataError(f"dtype {name!r} needs the ml_dtypes package: pip install ml_dtypes")
        return np.dtype(getattr(ml_dtypes, name))
    if not _DTYPE_STR.fullmatch(name):
        raise CorruptDataError(f"dtype {name[:40]!r} is not a numpy dtype.str castore writes")
    try:
        dtype = np.dtype(name)
    except (TypeError, ValueError, SyntaxError) as exc:
        raise CorruptDataError(f"unknown dtype {name!r}: {exc}") from None
    if dtype.kind not in _ARRAY_KINDS or dtype.hasobject or dtype.fields is not None or not dtype.itemsize:
        raise CorruptDataError(f"dtype {name!r} is not one castore stores")
    return dtype


# --- encoding -----------------------------------------------------------------------------


def _check_text(text: str, path: str, what: str) -> None:
    """Refuse a str UTF-8 cannot encode (lone surrogates): the manifest could not hold it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsupportedValueError(path, f"{what} {text[:40]!r} is not valid Unicode (lone surrogate)") from None


def _check_unique_paths(node: Node, name: str) -> None:
    """Refuse two leaves with one path (``{"a/b": 1, "a": {"b": 2}}``): regex loads and
    exports address leaves by path, so one would shadow the other."""
    seen = set()
    for path, _ in leaf_nodes(node):
        if path in seen:
            raise UnsupportedValueError(join(name, path), "two leaves have this path (a dict key contains '/')")
        seen.add(path)


class Encoder:
    """Turns a state tree into nodes, handing large byte buffers to ``make_blob``."""

    def __init__(self, make_blob: MakeBlob, *, allow_pickle: bool = False, inline_max: int = 512, on_shard=None):
        self.make_blob = make_blob
        self.on_shard = on_shard  # called after each shard: the generator may reuse its buffers
        self.allow_pickle = allow_pickle
        self.inline_max = inline_max
        self.logical_bytes = 0

    def component(self, value, name: str) -> Node:
        """Encode one component's state; a generator or iterator becomes shards."""
        _check_text(name, name, "component name")
        node: Node
        if isinstance(value, (types.GeneratorType, collections.abc.Iterator)):
            node = ShardsNode(tuple(self._shard(shard, join(name, i)) for i, shard in enumerate(value)))
        else:
            node = self.node(value, name, 0)
        _check_unique_paths(node, name)
        return node

    def _shard(self, value, path: str) -> Node:
        node = self.node(value, path, 1)
        if self.on_shard is not None:
            self.on_shard()
        return node

    def node(self, value, path: str, depth: int) -> Node:
        if depth > MAX_DEPTH:
            raise UnsupportedValueError(path, f"nesting deeper than {MAX_DEPTH} (a cycle?)")
        kind = type(value)
        if kind in _PLAIN:
            if kind is str:
                _check_text(value, path, "string")
            self.logical_bytes += 8 if kind is not str else len(value)
            return ValueLeaf(value)
        if kind is bytes:
            return BytesLeaf(self._blob(memoryview(value), 1, 1, path))
        if isinstance(value, np.generic):
            return self._scalar(value, path)
        if kind is np.ndarray or kind is np.memmap:
            return self._array(value, path)
        if kind is TrackedArray:
            return self._array(value.raw, path, value)
        if kind is dict:
            return DictNode(tuple(self._item(k, v, path, depth) for k, v in value.items()))
        if kind is list or kind is tuple:
            items = tuple(self.node(v, join(path, i), depth + 1) for i, v in enumerate(value))
            return SeqNode(kind is tuple, items)
        return self._other(value, path)

    def _item(self, key, value, path: str, depth: int) -> tuple[str, Node]:
        if type(key) is not str:
            raise UnsupportedValueError(path, f"dict key {key!r} is a {type(key).__name__}, not str")
        _check_text(key, path, "dict key")
        return key, self.node(value, join(path, key), depth + 1)

    def _scalar(self, value: np.generic, path: str) -> Node:
        array = np.asarray(value)
        data = array.tobytes()
        self.logical_bytes += len(data)
        return ScalarLeaf(dtype_name(array.dtype, path), data)

    def _array(self, array: np.ndarray, path: str, tracked: TrackedArray | None = None) -> ArrayLeaf:
        name = dtype_name(array.dtype, path)
        # copies only when strided (np.ascontiguousarray would also turn 0-d into 1-d)
        contiguous = array if array.flags.c_contiguous else array.copy(order="C")
        flat = contiguous.reshape(-1).view(np.uint8) if contiguous.size else np.empty(0, np.uint8)
        blob = self._blob(flat.data, row_nbytes_of(contiguous), contiguous.dtype.itemsize, path, tracked)
        return ArrayLeaf(name, tuple(array.shape), blob)

    def _blob(self, buffer: memoryview, row_nbytes: int, itemsize: int, path: str, tracked=None) -> Blob:
        self.logical_bytes += buffer.nbytes
        if buffer.nbytes <= self.inline_max:
            return InlineBlob(bytes(buffer))
        if tracked is not None:
            return self.make_blob(buffer, row_nbytes, itemsize, path, tracked=tracked)
        return self.make_blob(buffer, row_nbytes, itemsize, path)

    def _other(self, value, path: str) -> Node:
        if not self.allow_pickle:
            hint = ""
            if isinstance(value, (dict, list, tuple)):
                hint = f"; convert the {type(value).__name__} subclass to a plain dict/list/tuple"
            elif hasattr(value, "__array__"):
                hint = "; convert it with np.asarray()"
            raise UnsupportedValueError(
                path,
                f"{type(value).__module__}.{type(value).__qualname__} is not a storable type"
                f"{hint} (or opt in with allow_pickle=True)",
            )
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        return PickleLeaf(self._blob(memoryview(data), 1, 1, path))


# --- decoding -----------------------------------------------------------------------------


def _read_bytes(blob: Blob, read_blob: ReadBlob, path: str) -> bytes:
    if isinstance(blob, InlineBlob):
        return blob.data
    try:
        out = np.empty(blob.nbytes, np.uint8)
    except MemoryError:
        raise CorruptDataError(f"at {path!r}: cannot allocate {blob.nbytes} bytes") from None
    read_blob(blob, out, path)
    return out.tobytes()


def _fillable(into, shape: tuple, dtype: np.dtype) -> np.ndarray | None:
    """The array of a restore target ``into`` (an ndarray or a TrackedArray) if the leaf
    can be decoded straight into it: same shape and dtype, C-contiguous and writable."""
    array = into.raw if type(into) is TrackedArray else into
    if type(array) is not np.ndarray or array.shape != shape or array.dtype != dtype:
        return None
    if not array.flags.c_contiguous or not array.flags.writeable:
        return None
    return array


def _array_from(node: ArrayLeaf, read_blob: ReadBlob, path: str, into=None):
    dtype = dtype_from_name(node.dtype)
    # numpy refuses a shape whose non-zero dimensions times the item size overflow, even
    # when another dimension is 0 and the array holds no byte
    if math.prod(max(d, 1) for d in node.shape) * dtype.itemsize > _MAX_NBYTES:
        raise CorruptDataError(f"at {path!r}: shape {node.shape} of {dtype} is larger than numpy allows")
    nbytes = math.prod(node.shape) * dtype.itemsize
    blob = node.blob
    have = len(blob.data) if isinstance(blob, InlineBlob) else blob.nbytes
    if have != nbytes:
        raise CorruptDataError(f"at {path!r}: array of {nbytes} bytes has a blob of {have}")
    target = None if into is None else _fillable(into, tuple(node.shape), dtype)
    if target is not None:  # a restore in place: the target comes back, filled
        if type(into) is TrackedArray:
            # its baseline named the chunks of what it held before; marking every row also
            # voids an older baseline an async save in flight may still commit
            into.forget()
            into.mark()
        if isinstance(blob, InlineBlob):
            target.reshape(-1).view(np.uint8)[:] = np.frombuffer(blob.data, np.uint8)
        elif nbytes:
            read_blob(blob, target.reshape(-1).view(np.uint8), path, deferred=True)
        return into
    if isinstance(blob, InlineBlob):
        return np.frombuffer(blob.data, dtype).reshape(node.shape).copy()
    try:
        out = np.empty(node.shape, dtype)
    except (MemoryError, ValueError) as exc:
        raise CorruptDataError(f"at {path!r}: cannot allocate {nbytes} bytes: {exc}") from None
    read_blob(blob, out.reshape(-1).view(np.uint8), path, deferred=True)
    return out


def _scalar_from(node: ScalarLeaf, path: str) -> np.generic:
    dtype = dtype_from_name(node.dtype)
    if len(node.data) != dtype.itemsize:
        raise CorruptDataError(f"at {path!r}: scalar of {dtype} has {len(node.data)} bytes")
    return np.frombuffer(node.data, dtype)[0]


def decode(node: Node, read_blob: ReadBlob, path: str, *, allow_pickle: bool = False, into=None):
    """Rebuild the value of ``node``; shards come back as a list (see ``iter_shards``).

    ``into`` is a restore target: a tree shaped like the value whose array leaves (numpy
    arrays or :class:`TrackedArray`) are filled in place where shape and dtype match and
    come back as themselves; other leaves are decoded into new arrays as usual.
    """
    if isinstance(node, ValueLeaf):
        return node.value
    if isinstance(node, ArrayLeaf):
        return _array_from(node, read_blob, path, into)
    if isinstance(node, ScalarLeaf):
        return _scalar_from(node, path)
    if isinstance(node, BytesLeaf):
        return _read_bytes(node.blob, read_blob, path)
    if isinstance(node, PickleLeaf):
        if not allow_pickle:
            raise UnsupportedValueError(path, "leaf is pickled; load with allow_pickle=True if you trust this store")
        return pickle.loads(_read_bytes(node.blob, read_blob, path))
    if isinstance(node, DictNode):
        named: dict = into if type(into) is dict else {}
        return {
            k: decode(v, read_blob, join(path, k), allow_pickle=allow_pickle, into=named.get(k)) for k, v in node.items
        }
    if isinstance(node, SeqNode):
        inside = into if type(into) in (list, tuple) and len(into) == len(node.items) else [None] * len(node.items)
        items = [
            decode(v, read_blob, join(path, i), allow_pickle=allow_pickle, into=t)
            for i, (v, t) in enumerate(zip(node.items, inside))
        ]
        return tuple(items) if node.is_tuple else items
    return [decode(v, read_blob, join(path, i), allow_pickle=allow_pickle) for i, v in enumerate(node.shards)]


def map_blobs(node: Node, fn) -> Node:
    """A copy of ``node`` with every blob of its leaves replaced by ``fn(blob)``."""
    if isinstance(node, (ArrayLeaf, BytesLeaf, PickleLeaf)):
        return dataclasses.replace(node, blob=fn(node.blob))
    if isinstance(node, DictNode):
        return DictNode(tuple((k, map_blobs(v, fn)) for k, v in node.items))
    if isinstance(node, SeqNode):
        return SeqNode(node.is_tuple, tuple(map_blobs(v, fn) for v in node.items))
    if isinstance(node, ShardsNode):
        return ShardsNode(tuple(map_blobs(v, fn) for v in node.shards))
    return node


# --- leaf paths and selection ---------------------------------------------------------------


def leaf_nodes(node: Node, path: str = "") -> Iterator[tuple[str, Node]]:
    """Yield ``(path, leaf node)`` for every leaf, paths relative to ``node``."""
    if isinstance(node, DictNode):
        for k, v in node.items:
            yield from leaf_nodes(v, join(path, k))
    elif isinstance(node, SeqNode):
        for i, v in enumerate(node.items):
            yield from leaf_nodes(v, join(path, i))
    elif isinstance(node, ShardsNode):
        for i, v in enumerate(node.shards):
            yield from leaf_nodes(v, join(path, i))
    else:
        yield path, node


def leaves(tree, path: str = "") -> Iterator[tuple[str, object]]:
    """Yield ``(path, value)`` for every leaf of a state tree."""
    if type(tree) is dict:
        for k, v in tree.items():
            yield from leaves(v, join(path, k))
    elif type(tree) in (list, tuple):
        for i, v in enumerate(tree):
            yield from leaves(v, join(path, i))
    else:
        yield path, tree


def select(node: Node, regex: str) -> list[tuple[str, Node]]:
    """Leaves whose path matches ``regex`` from its start (``re.match``)."""
    pattern = re.compile(regex)
    return [(p, n) for p, n in leaf_nodes(node) if pattern.match(p)]


def replace_leaves(tree, values: dict, path: str = ""):
    """A copy of ``tree`` with the leaves at the paths in ``values`` replaced."""
    if type(tree) is dict:
        return {k: replace_leaves(v, values, join(path, k)) for k, v in tree.items()}
    if type(tree) in (list, tuple):
        items = [replace_leaves(v, values, join(path, i)) for i, v in enumerate(tree)]
        return tuple(items) if type(tree) is tuple else items
    return values.get(path, tree)

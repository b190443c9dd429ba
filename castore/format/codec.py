"""State trees <-> manifest nodes (pure: bytes move through callbacks, no I/O here).

A state tree is nested ``dict`` (keys ``str``, or ``None``/``bool``/``int``/``float``),
``OrderedDict``, ``list``, ``tuple``, NamedTuple and dataclass instances, of numpy arrays,
numpy scalars, ``torch.Tensor``, ``jax.Array``, ``None``, ``bool``, ``int``, ``float``,
``str`` and ``bytes``.  Types come back exactly (NamedTuples and dataclasses: see
:func:`decode`); anything else raises :class:`UnsupportedValueError` naming its path,
unless the caller opted into pickling.  Leaf paths join dict keys, field names and
sequence indices with ``/``.

The module is past ~400 lines on purpose: the encoder and the decoder of each node kind
are two halves of one mapping and sit side by side so that a change to one is read with
the other; the tree walks every layer uses (``leaf_nodes``, ``children``, ``rebuild``)
follow the same kinds.
"""

from __future__ import annotations

import collections
import collections.abc
import copy
import dataclasses
import inspect
import keyword
import math
import pickle
import re
import sys
import types
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from ..errors import CorruptDataError, SelectionError, UnsupportedValueError
from ..tracking import TrackedArray
from . import frameworks, mldtypes
from .chunker import row_nbytes_of
from .manifest import (
    MAX_ATTR_TEXT,
    MAX_DEPTH,
    ArrayLeaf,
    Blob,
    BytesLeaf,
    DictNode,
    InlineBlob,
    MapNode,
    Node,
    PickleLeaf,
    ScalarLeaf,
    SeqNode,
    ShardsNode,
    TypedNode,
    ValueLeaf,
)

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
    if dtype.name in _ML_DTYPE_NAMES and (ml_dtypes := mldtypes.module()) is not None:
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
        ml_dtypes = mldtypes.module()
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
            raise UnsupportedValueError(
                join(name, path), "two leaves have this path (a dict key contains '/', or keys 1 and '1' side by side)"
            )
        seen.add(path)


class Encoder:
    """Turns a state tree into nodes, handing large byte buffers to ``make_blob``."""

    def __init__(self, make_blob: MakeBlob, *, allow_pickle: bool = False, inline_max: int = 512, on_shard=None):
        self.make_blob = make_blob
        self.on_shard = on_shard  # called after each shard: the generator may reuse its buffers
        self.allow_pickle = allow_pickle
        self.inline_max = inline_max
        self.logical_bytes = 0
        # torch identity -> (path, node, the tensor itself) in this component or shard: the
        # tensor is held so its memory cannot be freed and reused by another tensor meanwhile
        self._tensors: dict[tuple, tuple[str, Node, object]] = {}
        self._prefix = ""  # of the paths of the component being encoded

    def component(self, value, name: str) -> Node:
        """Encode one component's state; a generator or iterator becomes shards."""
        _check_text(name, name, "component name")
        self._tensors, self._prefix = {}, name + "/"
        node: Node
        if isinstance(value, (types.GeneratorType, collections.abc.Iterator)):
            node = ShardsNode(tuple(self._shard(shard, join(name, i)) for i, shard in enumerate(value)))
        else:
            node = self.node(value, name, 0)
        _check_unique_paths(node, name)
        return node

    def _shard(self, value, path: str) -> Node:
        # ties end at a shard's edge: shards load one by one, and a generator frees the
        # tensors of the last shard, whose addresses the next one's may then reuse
        self._tensors = {}
        node = self.node(value, path, 1)
        self._tensors = {}
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
            return self._dict(value, path, depth)
        if kind is list or kind is tuple:
            items = tuple(self.node(v, join(path, i), depth + 1) for i, v in enumerate(value))
            return SeqNode(kind is tuple, items)
        return self._other(value, path, depth)

    def _dict(self, value: dict, path: str, depth: int) -> DictNode | MapNode:
        if all(type(k) is str for k in value):
            return DictNode(tuple(self._item(k, v, path, depth) for k, v in value.items()))
        return MapNode(tuple(self._key_item(k, v, path, depth) for k, v in value.items()))

    def _item(self, key, value, path: str, depth: int) -> tuple[str, Node]:
        _check_text(key, path, "dict key")
        return key, self.node(value, join(path, key), depth + 1)

    def _key_item(self, key, value, path: str, depth: int) -> tuple[object, Node]:
        if type(key) not in _PLAIN:
            raise UnsupportedValueError(
                path, f"dict key {key!r} is a {type(key).__name__}; keys are str, int, float, bool or None"
            )
        if type(key) is str:
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

    def _other(self, value, path: str, depth: int) -> Node:
        torch, jax = frameworks.torch_module(), frameworks.jax_module()
        if torch is not None and isinstance(value, torch.Tensor):
            return self._tensor(value, path)
        if jax is not None and isinstance(value, jax.Array):
            return TypedNode("jax", (), self._array(frameworks.jax_to_numpy(value, path), path))
        kind = type(value)
        if kind is collections.OrderedDict:
            return TypedNode("odict", (), self._dict(value, path, depth))
        if isinstance(value, tuple) and isinstance(getattr(kind, "_fields", None), tuple):
            fields = dict(zip(kind._fields, value))
            return TypedNode(
                "namedtuple", (("type", _stored_type_name(kind, path)),), self._fields(fields, path, depth)
            )
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            if kind.__new__ is not object.__new__:  # also a dict, an Exception, ...: its fields are not all of it
                raise UnsupportedValueError(
                    path, f"dataclass {kind.__qualname__} also derives from a builtin type; store its fields as a dict"
                )
            fields = {}
            for field in dataclasses.fields(value):
                try:
                    fields[field.name] = getattr(value, field.name)
                except AttributeError:
                    raise UnsupportedValueError(
                        join(path, field.name), "dataclass field is not set (init=False and never assigned)"
                    ) from None
            return TypedNode("dataclass", (("type", _stored_type_name(kind, path)),), self._fields(fields, path, depth))
        return self._pickled(value, path)

    def _fields(self, fields: dict, path: str, depth: int) -> DictNode:
        return DictNode(tuple(self._item(k, v, path, depth) for k, v in fields.items()))

    def _tensor(self, tensor, path: str) -> TypedNode:
        array, attrs = frameworks.torch_to_numpy(tensor, path)  # first: it refuses sparse and nested tensors
        identity = frameworks.torch_identity(tensor)
        seen = self._tensors.get(identity) if identity is not None else None
        if seen is not None:  # tied weights: the same bytes, hashed and stored once
            first, node, _ = seen
            self.logical_bytes += array.nbytes
            tie = (("tied", first),) if len(first.encode()) <= MAX_ATTR_TEXT else ()  # else stored twice, deduplicated
            return TypedNode("torch", tuple(attrs.items()) + tie, node)
        node = self._array(array, path)
        if identity is not None:
            self._tensors[identity] = (path.removeprefix(self._prefix), node, tensor)  # as a load names it
        return TypedNode("torch", tuple(attrs.items()), node)

    def _pickled(self, value, path: str) -> Node:
        if not self.allow_pickle:
            hint = ""
            if isinstance(value, (dict, list, tuple)):
                hint = f"; convert the {type(value).__name__} subclass to a plain dict/list/tuple"
            elif isinstance(value, collections.abc.Mapping):
                hint = "; convert the mapping to a plain dict"
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


def _array_from(node: ArrayLeaf, read_blob: ReadBlob, path: str, into=None, *, deferred: bool = True):
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
            read_blob(blob, target.reshape(-1).view(np.uint8), path, deferred=deferred)
        return into
    if isinstance(blob, InlineBlob):
        return np.frombuffer(blob.data, dtype).reshape(node.shape).copy()
    try:
        out = np.empty(node.shape, dtype)
    except (MemoryError, ValueError) as exc:
        raise CorruptDataError(f"at {path!r}: cannot allocate {nbytes} bytes: {exc}") from None
    read_blob(blob, out.reshape(-1).view(np.uint8), path, deferred=deferred)
    return out


def _scalar_from(node: ScalarLeaf, path: str) -> np.generic:
    dtype = dtype_from_name(node.dtype)
    if len(node.data) != dtype.itemsize:
        raise CorruptDataError(f"at {path!r}: scalar of {dtype} has {len(node.data)} bytes")
    return np.frombuffer(node.data, dtype)[0]


def _type_name(kind: type) -> str:
    return f"{kind.__module__}:{kind.__qualname__}"


def _stored_type_name(kind: type, path: str) -> str:
    name = _type_name(kind)
    if len(name.encode()) > MAX_ATTR_TEXT:
        raise UnsupportedValueError(path, f"type name {name[:60]!r}... is longer than {MAX_ATTR_TEXT} bytes")
    return name


def find_type(name, fields: tuple, *, namedtuple: bool) -> type | None:
    """The NamedTuple / dataclass type stored as ``module:qualname`` with these fields, if
    this program has imported its module.  Nothing is imported and no attribute hook runs:
    names are looked up statically (``inspect.getattr_static``) in real modules and in
    classes whose metaclass is ``type``; anything else is not found."""
    if not isinstance(name, str) or ":" not in name:
        return None
    module_name, _, qualname = name.partition(":")
    module = sys.modules.get(module_name)
    if not issubclass(type(module), types.ModuleType):
        return None
    found: object = module
    for part in qualname.split("."):
        found = inspect.getattr_static(found, part, None)
        if type(found) is not type:  # no metaclass, so no hook on its attributes
            return None
    kind: type = found  # type: ignore[assignment]
    if namedtuple:
        ok = issubclass(kind, tuple) and inspect.getattr_static(kind, "_fields", None) == fields
    else:
        declared = inspect.getattr_static(kind, "__dataclass_fields__", None)
        ok = isinstance(declared, dict) and tuple(_field_names(declared)) == fields
    return kind if ok else None


def _field_names(declared: dict):
    """The names ``dataclasses.fields`` would give, from a ``__dataclass_fields__`` dict."""
    plain = getattr(dataclasses, "_FIELD", None)
    for key, field in declared.items():
        if isinstance(field, dataclasses.Field) and getattr(field, "_field_type", plain) is plain:
            yield key


def _can_build(kind: type) -> bool:
    """Whether a dataclass can be made without its ``__init__``: no builtin base, not abstract."""
    return kind.__new__ is object.__new__ and not inspect.isabstract(kind)


class _Decoder:
    """One decode of a component: options, and the tensors seen (for tied weights)."""

    def __init__(self, read_blob: ReadBlob, allow_pickle: bool, map_location):
        self.read_blob = read_blob
        self.allow_pickle = allow_pickle
        self.map_location = map_location
        self.tensors: dict[str, object] = {}  # leaf path -> torch tensor decoded there

    def node(self, node: Node, path: str, into):
        if isinstance(node, ValueLeaf):
            return node.value
        if isinstance(node, ArrayLeaf):
            return _array_from(node, self.read_blob, path, into)
        if isinstance(node, ScalarLeaf):
            return _scalar_from(node, path)
        if isinstance(node, BytesLeaf):
            return _read_bytes(node.blob, self.read_blob, path)
        if isinstance(node, PickleLeaf):
            if not self.allow_pickle:
                raise UnsupportedValueError(
                    path, "leaf is pickled; load with allow_pickle=True if you trust this store"
                )
            return pickle.loads(_read_bytes(node.blob, self.read_blob, path))
        if isinstance(node, (DictNode, MapNode)):
            named: dict = into if isinstance(into, dict) else {}
            return {k: self.node(v, join(path, k), named.get(k)) for k, v in node.items}
        if isinstance(node, SeqNode):
            fits = isinstance(into, (list, tuple)) and len(into) == len(node.items)
            inside = into if fits else [None] * len(node.items)
            items = [self.node(v, join(path, i), t) for i, (v, t) in enumerate(zip(node.items, inside))]
            return tuple(items) if node.is_tuple else items
        if isinstance(node, TypedNode):
            return self.typed(node, path, into)
        return [self.node(v, join(path, i), None) for i, v in enumerate(node.shards)]

    def typed(self, node: TypedNode, path: str, into):
        inner = node.node
        if node.kind == "odict" and isinstance(inner, (DictNode, MapNode)):
            return collections.OrderedDict(self.node(inner, path, into))
        if node.kind in ("namedtuple", "dataclass") and isinstance(inner, DictNode):
            return self.record(node, inner, path, into)
        if node.kind == "torch" and isinstance(inner, ArrayLeaf):
            return self.tensor(node, inner, path, into)
        if node.kind == "jax" and isinstance(inner, ArrayLeaf):
            dtype = dtype_from_name(inner.dtype)
            sharding = frameworks.jax_target_sharding(into, tuple(inner.shape), dtype)
            # the bytes must be there before device_put copies them: read now, not deferred
            host = _array_from(inner, self.read_blob, path, deferred=False)
            return frameworks.jax_from_numpy(host, path, sharding)
        raise CorruptDataError(f"at {path!r}: a {node.kind!r} node holds a {type(inner).__name__}")

    def record(self, node: TypedNode, inner: DictNode, path: str, into):
        """A NamedTuple or dataclass: of the restore target's type if it has the stored
        type's name and fields, else of that type if this program imported it, else a
        namedtuple made from the stored names (NamedTuple) or a dict (dataclass)."""
        is_tuple = node.kind == "namedtuple"
        name, fields = node.attr("type"), tuple(k for k, _ in inner.items)
        if len(set(fields)) != len(fields):
            raise CorruptDataError(f"at {path!r}: a {node.kind} node names a field twice")
        into_kind_fits = into is not None and (
            (isinstance(into, tuple) and is_tuple) or (not is_tuple and dataclasses.is_dataclass(into))
        )
        if into_kind_fits and _type_name(type(into)) == name:
            same = find_type(name, fields, namedtuple=is_tuple) is type(into) or _fields_of(into) == fields
            kind = type(into) if same else None
        else:
            kind = find_type(name, fields, namedtuple=is_tuple)
            into = into if into_kind_fits and kind is type(into) else None
        if kind is not None and not is_tuple and not _can_build(kind):
            kind = None
        targets = _fields_as_dict(into) if kind is not None and into is not None else {}
        values = {k: self.node(v, join(path, k), targets.get(k)) for k, v in inner.items}
        if is_tuple:
            if kind is not None:
                return kind._make(values.values())
            return _anonymous_namedtuple(name, fields)._make(values.values())
        if kind is None:
            return values
        record = copy.copy(into) if into is not None and type(into) is kind else object.__new__(kind)
        for key, value in values.items():
            object.__setattr__(record, key, value)  # frozen dataclasses too; __init__ is not run
        return record

    def tensor(self, node: TypedNode, inner: ArrayLeaf, path: str, into):
        attrs = dict(node.attrs)
        torch, dtype = frameworks.torch_dtype_of(attrs, path)
        stored = dtype_from_name(inner.dtype)
        frameworks.check_torch_array(attrs, stored, path)
        tied = attrs.get("tied")
        if isinstance(tied, str) and tied in self.tensors:
            earlier = self.tensors[tied]
            if tuple(earlier.shape) == tuple(inner.shape) and earlier.dtype == dtype:  # type: ignore[attr-defined]
                tensor = earlier
                if not _same_kind(earlier, attrs):  # a Parameter and its .detach(): one memory, two kinds
                    tensor = frameworks.finish_tensor(earlier.detach(), attrs)  # type: ignore[attr-defined]
                self.tensors[path] = tensor
                return tensor
        host = frameworks.torch_host_view(into, dtype) if into is not None else None
        if host is not None and host.dtype.itemsize == stored.itemsize and tuple(host.shape) == tuple(inner.shape):
            _array_from(inner, self.read_blob, path, host.view(stored))  # filled in place
            self.tensors[path] = into
            return into
        if isinstance(into, torch.Tensor) and into.dtype == dtype and tuple(into.shape) == tuple(inner.shape):
            # a target on a device, or not contiguous: copy into it where it is, so no second
            # buffer stays; the copy reads the bytes now, so the read is not deferred
            array = _array_from(inner, self.read_blob, path, deferred=False)
            with torch.no_grad():
                into.copy_(frameworks.torch_from_numpy(array, {**attrs, "requires_grad": False}, path, "cpu"))
            self.tensors[path] = into
            return into
        device = frameworks.torch_device(attrs, path, self.map_location)
        on_host = not callable(device) and str(device) == "cpu"  # a device copy reads the bytes at once
        array = _array_from(inner, self.read_blob, path, deferred=on_host)
        tensor = frameworks.torch_from_numpy(array, attrs, path, self.map_location)
        self.tensors[path] = tensor
        return tensor


def _same_kind(tensor, attrs) -> bool:
    """Whether ``tensor`` is what ``attrs`` describe: a Parameter or not, requiring grad or not."""
    is_parameter = type(tensor) is frameworks.torch_module().nn.Parameter
    wants_grad = attrs.get("requires_grad") is True and (tensor.is_floating_point() or tensor.is_complex())
    return is_parameter == (attrs.get("parameter") is True) and tensor.requires_grad == wants_grad


def _fields_of(value) -> tuple | None:
    if isinstance(value, tuple) and isinstance(getattr(type(value), "_fields", None), tuple):
        return type(value)._fields  # type: ignore[attr-defined]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return tuple(f.name for f in dataclasses.fields(value))
    return None


def _fields_as_dict(value) -> dict:
    fields = _fields_of(value)
    return {} if fields is None else {k: getattr(value, k) for k in fields}


def _anonymous_namedtuple(name, fields: tuple):
    typename = str(name).rpartition(".")[2].rpartition(":")[2]
    typename = typename if typename.isidentifier() and not keyword.iskeyword(typename) else "Record"
    return collections.namedtuple(typename, fields, rename=True)


def decode(node: Node, read_blob: ReadBlob, path: str, *, allow_pickle: bool = False, into=None, map_location=None):
    """Rebuild the value of ``node``; shards come back as a list (see ``iter_shards``).

    ``into`` is a restore target: a tree shaped like the value whose array leaves (numpy
    arrays, :class:`TrackedArray`, CPU ``torch.Tensor``) are filled in place where shape
    and dtype match and come back as themselves; a torch tensor on a device is copied
    into; a ``jax.Array`` lends its sharding; other leaves are decoded into new arrays.

    NamedTuples and dataclasses come back as the target's type when it has the stored
    type's name and fields, else as the stored type if the program has imported its
    module (nothing is imported, nothing unpickled; a dataclass's ``__init__`` is not
    run, as with ``copy``), else as a namedtuple of the stored field names or, for a
    dataclass, a dict of its fields.  ``map_location`` places torch tensors as
    ``torch.load``'s does; by default each goes back to the device it was saved from.
    """
    return _Decoder(read_blob, allow_pickle, map_location).node(node, path, into)


def node_nbytes(node: Node) -> int:
    """The logical bytes of a node's leaves, as an encode of its value counts them."""
    total = 0
    for _, leaf in leaf_nodes(node):
        if isinstance(leaf, TypedNode):
            leaf = leaf.node
        if isinstance(leaf, ValueLeaf):
            total += len(leaf.value) if isinstance(leaf.value, str) else 8
        elif isinstance(leaf, ScalarLeaf):
            total += len(leaf.data)
        elif isinstance(leaf, (ArrayLeaf, BytesLeaf, PickleLeaf)):
            total += len(leaf.blob.data) if isinstance(leaf.blob, InlineBlob) else leaf.blob.nbytes
    return total


def map_blobs(node: Node, fn) -> Node:
    """A copy of ``node`` with every blob of its leaves replaced by ``fn(blob)``."""
    if isinstance(node, (ArrayLeaf, BytesLeaf, PickleLeaf)):
        return dataclasses.replace(node, blob=fn(node.blob))
    if isinstance(node, DictNode):
        return DictNode(tuple((k, map_blobs(v, fn)) for k, v in node.items))
    if isinstance(node, MapNode):
        return MapNode(tuple((k, map_blobs(v, fn)) for k, v in node.items))
    if isinstance(node, TypedNode):
        return TypedNode(node.kind, node.attrs, map_blobs(node.node, fn))
    if isinstance(node, SeqNode):
        return SeqNode(node.is_tuple, tuple(map_blobs(v, fn) for v in node.items))
    if isinstance(node, ShardsNode):
        return ShardsNode(tuple(map_blobs(v, fn) for v in node.shards))
    return node


# --- leaf paths and selection ---------------------------------------------------------------


_LEAF_KINDS = ("torch", "jax")  #: typed nodes that are leaves (the rest are containers)


def leaf_nodes(node: Node, path: str = "") -> Iterator[tuple[str, Node]]:
    """Yield ``(path, leaf node)`` for every leaf, paths relative to ``node``; a tensor's
    typed node is its leaf."""
    if isinstance(node, (DictNode, MapNode)):
        for k, v in node.items:
            yield from leaf_nodes(v, join(path, k))
    elif isinstance(node, TypedNode) and node.kind not in _LEAF_KINDS:
        yield from leaf_nodes(node.node, path)
    elif isinstance(node, SeqNode):
        for i, v in enumerate(node.items):
            yield from leaf_nodes(v, join(path, i))
    elif isinstance(node, ShardsNode):
        for i, v in enumerate(node.shards):
            yield from leaf_nodes(v, join(path, i))
    else:
        yield path, node


def children(tree) -> list[tuple[object, object]] | None:
    """``(key, child)`` of a container of a state tree, or None for a leaf."""
    kind = type(tree)
    if kind is dict or kind is collections.OrderedDict:
        return list(tree.items())
    if kind is list or kind is tuple:
        return list(enumerate(tree))
    fields = _fields_of(tree)
    if fields is not None:
        return [(k, getattr(tree, k)) for k in fields]
    return None


def rebuild(tree, values: list):
    """A container like ``tree`` (see :func:`children`) holding ``values`` instead."""
    kind = type(tree)
    if kind is dict or kind is collections.OrderedDict:
        return kind(zip(tree.keys(), values))
    if kind is list or kind is tuple:
        return kind(values)
    if isinstance(tree, tuple):
        return kind._make(values)
    record = copy.copy(tree)
    for key, value in zip(_fields_of(tree) or (), values):
        object.__setattr__(record, key, value)
    return record


def leaves(tree, path: str = "") -> Iterator[tuple[str, object]]:
    """Yield ``(path, value)`` for every leaf of a state tree."""
    items = children(tree)
    if items is None:
        yield path, tree
        return
    for k, v in items:
        yield from leaves(v, join(path, k))


def select(node: Node, regex: str) -> list[tuple[str, Node]]:
    """Leaves whose path matches ``regex`` from its start (``re.match``)."""
    try:
        pattern = re.compile(regex)
    except (re.error, TypeError) as exc:
        raise SelectionError(f"regex {regex!r} is not a valid regular expression: {exc}") from None
    return [(p, n) for p, n in leaf_nodes(node) if pattern.match(p)]


def replace_leaves(tree, values: dict, path: str = ""):
    """A copy of ``tree`` with the leaves at the paths in ``values`` replaced."""
    items = children(tree)
    if items is None:
        return values.get(path, tree)
    return rebuild(tree, [replace_leaves(v, values, join(path, k)) for k, v in items])

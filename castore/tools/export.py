"""Export one step of a store as plain files that numpy, safetensors and any JSON reader open.

``format`` chooses how arrays are written: ``"npy"`` (the default: one ``.npy`` file per
array), ``"npz"`` (one zip of ``.npy`` members per component) or ``"safetensors"`` (one
safetensors file per component).  Every layout has the same index and the same
``leaves.json`` per component; only where an array's bytes live differs.  Layout of
``out_dir``::

    export.json                 {"format": "castore-export/1", "layout": "npy" | "npz" | "safetensors",
                                 "store": ..., "branch": ..., "step": N,
                                 "components": [{"name": <component>, "dir": <its directory>,
                                                 "sharded": true (only for a sharded component)}]}
    <component>/leaves.json     every leaf of the component, in tree order:
                                {"path": [key or index, ...], "leaf": "a/b/0", "kind": ..., ...}

    npy:          <component>/<key>/.../<key>.npy   numpy arrays and numpy scalars (0-d), np.load(allow_pickle=False)
                  <component>/<key>/.../<key>.bin   ``bytes`` leaves, raw
    npz:          <component>/<component>.npz       every array, scalar and ``bytes`` leaf (as uint8) of the
                                                    component: np.load(f)[key]; uncompressed (ZIP_STORED)
    safetensors:  <component>/<component>.safetensors   the same as tensors named by ``key``

``kind`` is ``array`` or ``scalar`` (with ``file``, ``dtype`` as castore names it and
``shape``), ``bytes`` (with ``file``), or ``none``, ``bool``, ``int``, ``float``, ``str``
(with ``value`` inline; a non-finite float is the string ``"nan"``, ``"inf"`` or
``"-inf"``, so the files are strict JSON).  ``file`` is relative to ``out_dir``.  In the
npz and safetensors layouts ``file`` names the container and ``key`` the array in it:

* npz: the member's name without ``.npy``, built like the npy layout's file path below the
  component's directory (each key percent-encoded, ``/`` between levels, no ``.npy``
  suffix; e.g. ``model/layer1/w``); a leaf that is the whole component is ``value``;
* safetensors: the leaf's ``/``-joined path below the component (``model/layer1/w``, any
  characters: JSON carries them), ``value`` for a component that is one leaf;
  ``__metadata__`` (reserved by the format) gets ``~`` and 16 hex digits of its BLAKE3.
  The header's ``__metadata__`` is ``{"format": "castore-export/1", "component": ...,
  "step": ...}`` (and ``"shard"``).  Tensor dtypes: BOOL, U8..U64, I8..I64, F16, F32, F64,
  BF16, F8_E4M3 (float8_e4m3fn), F8_E5M2; a big-endian array is written little-endian
  (``dtype`` in leaves.json keeps its byte order); other dtypes (complex, strings,
  datetimes) raise :class:`UnsupportedValueError` naming the leaf, before anything of the
  component is written: export those with ``format="npy"``.

A sharded component gets one container per shard, ``<component>-0000.npz`` (or
``.safetensors``), ``-0001``, ...; keys in a shard's container are relative to the shard
(``obs``, not ``0/obs``).  A component (or shard) without array, scalar or ``bytes``
leaves gets no container.

``path`` holds dict keys as strings and sequence indices as integers; it is the exact
position in the tree, where the ``/``-joined ``leaf`` is ambiguous if a key holds ``/``.  A
sharded component's first path element is the shard index.  bfloat16 and float8 arrays are
written in ``.npy`` (npy and npz layouts) as void dtypes of their width (``.npy`` has no
name for them): ``np.load(f).view(ml_dtypes.bfloat16)`` using ``dtype``; safetensors names
them.  Containers themselves are not recorded (lists and tuples look alike; empty ones
vanish): dicts with keys that are not str, OrderedDicts, NamedTuples and dataclasses are
written as dicts (keys as ``str(key)``, fields by name); a ``torch.Tensor`` or ``jax.Array``
leaf is an ``array`` with ``"framework": "torch"`` / ``"jax"``.
:func:`castore.tools.importer.import_dir` reads any of the layouts back into a store.

Names are untrusted: a store may come from elsewhere, and its component names and dict
keys may be anything (``../x``, ``/etc/passwd``, ``a\\0b``, ``""``, ``..``, 10,000 bytes).
So every file name (and npz member name) is derived, never taken:

* each key is percent-encoded: every UTF-8 byte outside ``[A-Za-z0-9._-]`` becomes
  ``%XX``, as does a leading ``.`` (so no name is ``.``, ``..`` or hidden); ``""`` becomes
  ``%``.  This is injective, and the result never holds ``/`` or ``~``;
* a name longer than :data:`MAX_NAME` characters, or equal (ignoring case, for
  case-insensitive filesystems) to a name already given in the same directory, is cut and
  gets ``~`` and 16 hex digits of the key's BLAKE3: names never collide, so no leaf
  overwrites another;
* a leaf whose relative path would exceed :data:`MAX_PATH` characters goes to
  ``<component>/~deep/<BLAKE3 of its path>`` (in an npz: member ``~deep/<BLAKE3>``);
* before each write the real path (symlinks resolved) must be inside ``out_dir``, and
  files are opened with ``O_NOFOLLOW``; otherwise :class:`UsageError` is raised.

``out_dir`` must be empty or absent unless ``overwrite=True`` (then files of the same
names are replaced; other files stay).  Memory: one component is loaded at a time (one
shard at a time for a sharded component); arrays are written from their own memory
(safetensors: straight from it; ``.npy``: numpy's writer, in 16 MiB pieces).
"""

from __future__ import annotations

import collections.abc
import json
import math
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import blake3
import numpy as np

from ..errors import StepNotFoundError, UnsupportedValueError, UsageError
from ..format import codec, frameworks
from ..format.codec import dtype_name
from ..format.manifest import ArrayLeaf, BytesLeaf, InlineBlob, ScalarLeaf, TypedNode
from ..store import Store
from .safetensors_io import METADATA, dtype_code, write_safetensors

EXPORT_FORMAT = "castore-export/1"
INDEX = "export.json"
LEAVES = "leaves.json"
MAX_NAME = 120  #: characters of an encoded name before it is cut (filesystems allow 255 bytes)
MAX_PATH = 1024  #: characters of a leaf's path under its component before it goes to ``~deep``
DEEP = "~deep"
FORMATS = ("npy", "npz", "safetensors")  #: the layouts ``export_step(format=)`` writes
_SUFFIX = {"npz": ".npz", "safetensors": ".safetensors"}

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_VALUE_KINDS = {type(None): "none", bool: "bool", int: "int", float: "float", str: "str"}


@dataclass(frozen=True, slots=True)
class ExportResult:
    """What :func:`export_step` wrote."""

    step: int
    out_dir: str  #: the real path of the export directory
    components: int
    leaves: int
    files: int  #: data files: ``.npy`` and ``.bin``, or containers (the JSON files not counted)
    nbytes: int  #: bytes of those files
    format: str = "npy"  #: the layout written: ``npy``, ``npz`` or ``safetensors``
    data_nbytes: int = 0  #: leaf data bytes written (what ``progress`` was told; :func:`export_nbytes`)


def encode_name(key: str) -> str:
    """The percent-encoded file name of one key (see the module docstring); injective."""
    data = key.encode("utf-8", "surrogatepass")
    name = "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in data)
    if name.startswith("."):
        name = "%2E" + name[1:]
    return name or "%"


def _digest(text: str) -> str:
    return blake3.blake3(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _cut(name: str, limit: int) -> str:
    """``name`` cut to at most ``limit`` characters, never inside a ``%XX`` escape."""
    name = name[:limit]
    tail = name.rfind("%", max(0, len(name) - 2))
    return name[:tail] if tail >= 0 else name


class _Directory:
    """Names given in one output directory: safe, and distinct ignoring case."""

    def __init__(self, rel: str, reserved=()):
        self.rel = rel  #: relative to out_dir, "/"-joined
        self._taken = {name.casefold() for name in reserved}

    def name(self, key: str, suffix: str = "") -> str:
        stem = encode_name(key)
        if len(stem) > MAX_NAME or (stem + suffix).casefold() in self._taken:
            stem = f"{_cut(stem, MAX_NAME - 20)}~{_digest(key)}"
            base, n = stem, 0
            while (stem + suffix).casefold() in self._taken:  # a 64-bit digest clash: never in practice
                n += 1
                stem = f"{base}-{n}"
        self._taken.add((stem + suffix).casefold())
        return stem + suffix

    def child(self, key: str) -> _Directory:
        return _Directory(f"{self.rel}/{self.name(key)}")


class _Writer:
    """Writes files under one real directory, refusing any path that leaves it."""

    def __init__(self, root: str):
        self.root = root
        self.files = 0
        self.nbytes = 0

    def path(self, rel: str) -> str:
        """The absolute path of ``rel``, its parents created, checked to be inside the root."""
        path = os.path.join(self.root, *rel.split("/"))
        parent = os.path.dirname(path)
        self._check_inside(os.path.realpath(parent), rel)  # before creating anything
        os.makedirs(parent, exist_ok=True)
        self._check_inside(os.path.realpath(parent), rel)  # a symlinked directory on the way
        return path

    def _check_inside(self, real: str, rel: str) -> None:
        if os.path.commonpath([self.root, real]) != self.root:
            raise UsageError(f"export of {rel!r} would write outside {self.root} (a symlink?); nothing written there")

    def write(self, rel: str, fill, *, is_data: bool = True) -> None:
        path = self.path(rel)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc.strerror} (a symlink or a directory there?)") from None
        with os.fdopen(fd, "wb") as file:
            fill(file)
            if is_data:
                self.files += 1
                self.nbytes += file.tell()

    def write_json(self, rel: str, record) -> None:
        data = json.dumps(record, ensure_ascii=True, allow_nan=False, indent=1).encode()
        self.write(rel, lambda file: file.write(data), is_data=False)


def _prepare(out_dir, overwrite: bool) -> str:
    out = os.path.abspath(os.fspath(out_dir))
    if os.path.lexists(out) and not os.path.isdir(out):
        raise UsageError(f"export target {out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise UsageError(f"export target {out} is not empty; pass overwrite=True (--overwrite) to write into it")
    os.makedirs(out, exist_ok=True)
    return os.path.realpath(out)


def _json_value(value):
    if type(value) is float and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


class _Exporter:
    """Walks one component, writing its leaves (npy) or its containers (npz, safetensors)."""

    def __init__(self, writer: _Writer, component: str, component_dir: str, layout: str, step: int, progress=None):
        self.writer = writer
        self.component = component
        self.component_dir = component_dir
        self.layout = layout
        self.step = step
        self.progress = progress
        self.leaves: list[dict] = []
        self.data_nbytes = 0  #: leaf data bytes written (what ``progress`` was told)
        # the container being filled (npz, safetensors): its file, its entries, and where
        # its keys start in a leaf's path (after the shard index of a sharded component)
        self._container = ""
        self._pending: list[tuple[str, np.ndarray]] = []
        self._keys: set[str] = set()
        self._prefix = 0

    def export(self, value, directory: _Directory) -> None:
        if isinstance(value, collections.abc.Iterator):  # sharded: read one shard at a time
            for index, shard in enumerate(value):
                if self.layout == "npy":
                    self._item(index, shard, [], directory)
                else:
                    self._fill(shard, [index], f"{directory.rel}/{_stem(directory)}-{index:04d}{_SUFFIX[self.layout]}")
        elif self.layout == "npy":
            self._walk(value, [], directory)
        else:
            self._fill(value, [], f"{directory.rel}/{_stem(directory)}{_SUFFIX[self.layout]}")

    def _walk(self, value, path: list, directory: _Directory) -> None:
        items = codec.children(value)
        if items is None:
            self._leaf(value, path, directory)
            return
        # dicts (any key), OrderedDicts, NamedTuples and dataclasses by key, sequences by index
        is_sequence = type(value) in (list, tuple)
        for key, child in items:
            self._item(key if is_sequence else str(key), child, path, directory)

    def _item(self, key, child, path: list, directory: _Directory) -> None:
        if codec.children(child) is not None:
            self._walk(child, [*path, key], directory.child(str(key)))
        else:
            self._leaf(child, [*path, key], directory)

    def _fill(self, value, prefix: list, container: str) -> None:
        """Walk ``value`` (at ``prefix``) into one container file, then write it."""
        self._container, self._pending, self._keys, self._prefix = container, [], set(), len(prefix)
        self._walk(value, prefix, _Directory("", reserved=(DEEP,)))  # npz member names, as npy file paths
        if not self._pending:
            return
        pending = self._pending
        if self.layout == "safetensors":
            metadata = {"format": EXPORT_FORMAT, "component": self.component, "step": str(self.step)}
            if prefix:
                metadata["shard"] = str(prefix[0])
            after = lambda i: self._wrote(pending[i][1].nbytes)
            self.writer.write(container, lambda file: write_safetensors(file, pending, metadata, after))
        else:
            self.writer.write(container, lambda file: self._write_npz(file, pending))

    def _write_npz(self, file, pending: list[tuple[str, np.ndarray]]) -> None:
        with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for key, array in pending:
                with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, _npy_able(array), allow_pickle=False)
                self._wrote(array.nbytes)

    def _wrote(self, nbytes: int) -> None:
        self.data_nbytes += nbytes
        if self.progress is not None:
            self.progress(nbytes)

    def _leaf(self, value, path: list, directory: _Directory) -> None:
        leaf = "/".join(map(str, path))
        entry: dict[str, Any] = {"path": path, "leaf": leaf}
        torch, jax = frameworks.torch_module(), frameworks.jax_module()
        if torch is not None and isinstance(value, torch.Tensor):  # written as the array it holds
            value, entry["framework"] = frameworks.torch_to_numpy(value, leaf)[0], "torch"
        elif jax is not None and isinstance(value, jax.Array):
            value, entry["framework"] = np.asarray(value), "jax"
        kind = type(value)
        if kind in _VALUE_KINDS:
            entry.update(kind=_VALUE_KINDS[kind], value=_json_value(value))
        elif kind is bytes:
            entry["kind"] = "bytes"
            if self.layout == "npy":
                entry["file"] = self._file(path, directory, ".bin")
                self.writer.write(entry["file"], lambda file: file.write(value))
                self._wrote(len(value))
            else:
                self._add(entry, path, directory, np.frombuffer(value, np.uint8))
        elif isinstance(value, (np.ndarray, np.generic)):
            array = np.asarray(value)
            entry.update(kind="array" if kind is np.ndarray else "scalar")
            dtype, shape = dtype_name(array.dtype, leaf), list(array.shape)
            if self.layout == "npy":
                entry.update(file=self._file(path, directory, ".npy"), dtype=dtype, shape=shape)
                self.writer.write(entry["file"], lambda file: np.save(file, _npy_able(array), allow_pickle=False))
                self._wrote(array.nbytes)
            else:
                if self.layout == "safetensors" and dtype_code(array.dtype) is None:
                    raise UnsupportedValueError(
                        f"{self.component}/{leaf}",
                        f"dtype {array.dtype} has no safetensors name; nothing of this component was "
                        "written: export it with format='npy' (--format npy), which keeps every dtype",
                    )
                self._add(entry, path, directory, array)
                entry.update(dtype=dtype, shape=shape)
        else:  # a pickled leaf of a store opened with allow_pickle=True
            raise UnsupportedValueError(f"{self.component}/{leaf}", f"a {kind.__name__} (pickled leaf) is not exported")
        self.leaves.append(entry)

    def _add(self, entry: dict, path: list, directory: _Directory, array: np.ndarray) -> None:
        """Queue ``array`` for the container being filled; ``entry`` gets its file and key."""
        inner = path[self._prefix :]
        if self.layout == "npz":
            key = self._file(inner, directory, ".npy", base="").removeprefix("/").removesuffix(".npy")
        else:
            key = "/".join(map(str, inner)) if inner else "value"
            if key == METADATA or key in self._keys:  # keys are distinct leaf paths: only METADATA clashes
                key, n = f"{key}~{_digest(json.dumps(path))}", 0
                while key in self._keys:
                    n, key = n + 1, f"{key}-{n + 1}"
            self._keys.add(key)
        entry.update(file=self._container, key=key)
        self._pending.append((key, array))

    def _file(self, path: list, directory: _Directory, suffix: str, base: str | None = None) -> str:
        # a component that is one leaf is alone in its directory: it takes a fixed name
        base = self.component_dir if base is None else base
        name = directory.name(str(path[-1]), suffix) if path else f"value{suffix}"
        rel = f"{directory.rel}/{name}"
        if len(rel) - len(base) > MAX_PATH:
            rel = f"{base}/{DEEP}/{_digest(json.dumps(path))}{suffix}"
        return rel


def _npy_able(array: np.ndarray) -> np.ndarray:
    """``array`` as ``.npy`` can name it: an ml_dtypes array as void of its width.  numpy
    would write float8_e5m2 as ``<f1``, a descr no numpy reads back."""
    if dtype_name(array.dtype, "")[:1] not in "<>|":  # castore names ml_dtypes by name, others by dtype.str
        return array.view(f"V{array.dtype.itemsize}")
    return array


def _stem(directory: _Directory) -> str:
    """A container's file name stem: its component's directory name (already safe)."""
    return directory.rel.rsplit("/", 1)[-1]


def _leaf_nbytes(node) -> int:
    if isinstance(node, TypedNode):
        node = node.node
    if isinstance(node, ScalarLeaf):
        return len(node.data)
    if isinstance(node, (ArrayLeaf, BytesLeaf)):
        return len(node.blob.data) if isinstance(node.blob, InlineBlob) else node.blob.nbytes
    return 0


def _selection(store: Store, step: int | str | None, keys) -> tuple[str, int, list[str]]:
    branch, step = store.locate(step)  # a tag may name a step of another branch
    stored = store.manifest(step, branch=branch).names
    names = stored if keys is None else ([keys] if isinstance(keys, str) else list(keys))
    missing = [name for name in names if name not in stored]
    if missing:
        raise StepNotFoundError(f"step {step} of {store.path} has no component {', '.join(map(repr, missing))}")
    return branch, step, names


def export_nbytes(store: Store, step: int | str | None, *, keys=None) -> int:
    """The leaf data bytes :func:`export_step` will write (and report to ``progress``) for
    the same arguments: array, scalar and ``bytes`` leaves, from the manifest (no chunk
    is read).  Raises StepNotFoundError as export_step does."""
    branch, step, names = _selection(store, step, keys)
    manifest = store.manifest(step, branch=branch)
    return sum(_leaf_nbytes(node) for name in names for _, node in codec.leaf_nodes(manifest.component(name)))


def export_step(
    store: Store,
    step: int | str | None,
    out_dir,
    *,
    keys=None,
    overwrite: bool = False,
    format: str = "npy",
    progress: Callable[[int], None] | None = None,
) -> ExportResult:
    """Write ``step`` (an int, a tag, or None for the latest) of ``store`` under ``out_dir``.

    ``keys`` restricts the components; ``format`` is ``"npy"``, ``"npz"`` or
    ``"safetensors"`` (the layouts of the module docstring).  ``progress(nbytes)`` is called
    after each leaf's data is written, with its bytes; they add up to
    :func:`export_nbytes`.  Chunks are verified as the store's ``verify`` says.  Raises
    StepNotFoundError (unknown step, tag or component), UsageError (an unknown format,
    ``out_dir`` not empty without ``overwrite``, or a path that would leave it),
    UnsupportedValueError (a pickled leaf; for safetensors a dtype it has no name for),
    and what :meth:`Store.load` raises for damaged data; files written before an error stay.
    """
    if format not in FORMATS:
        raise UsageError(f"unknown export format {format!r}: one of {', '.join(FORMATS)}")
    branch, step, names = _selection(store, step, keys)
    writer = _Writer(_prepare(out_dir, overwrite))
    top = _Directory("", reserved=(INDEX,))
    components, count, data_nbytes = [], 0, 0
    for name in names:
        (value,) = store.load(step, keys=[name], branch=branch).values()
        directory = _Directory(top.name(name), reserved=(LEAVES, DEEP))
        exporter = _Exporter(writer, name, directory.rel, format, step, progress)
        exporter.export(value, directory)
        writer.write_json(f"{directory.rel}/{LEAVES}", exporter.leaves)
        record: dict[str, Any] = {"name": name, "dir": directory.rel}
        if isinstance(value, collections.abc.Iterator):
            record["sharded"] = True
        components.append(record)
        count += len(exporter.leaves)
        data_nbytes += exporter.data_nbytes
        del value, exporter  # one component in memory at a time
    index = {"format": EXPORT_FORMAT, "layout": format, "store": store.path, "branch": branch, "step": step}
    writer.write_json(INDEX, {**index, "components": components})
    return ExportResult(step, writer.root, len(components), count, writer.files, writer.nbytes, format, data_nbytes)

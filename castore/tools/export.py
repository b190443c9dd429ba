"""Export one step of a store as plain files that numpy and any JSON reader open.

Layout of ``out_dir``::

    export.json                 {"format": "castore-export/1", "store": ..., "step": N,
                                 "components": [{"name": <component>, "dir": <its directory>}]}
    <component>/leaves.json     every leaf of the component, in tree order:
                                {"path": [key or index, ...], "leaf": "a/b/0", "kind": ..., ...}
    <component>/<key>/.../<key>.npy   numpy arrays and numpy scalars (0-d), np.load(allow_pickle=False)
    <component>/<key>/.../<key>.bin   ``bytes`` leaves, raw

``kind`` is ``array`` or ``scalar`` (with ``file``, ``dtype`` as castore names it and
``shape``), ``bytes`` (with ``file``), or ``none``, ``bool``, ``int``, ``float``, ``str``
(with ``value`` inline; a non-finite float is the string ``"nan"``, ``"inf"`` or
``"-inf"``, so the files are strict JSON).  ``path`` holds dict keys as strings and
sequence indices as integers; it is the exact position in the tree, where the ``/``-joined
``leaf`` is ambiguous if a key holds ``/``.  A sharded component's first path element is
the shard index.  bfloat16 and float8 arrays are written as void dtypes of their width
(``.npy`` has no name for them): ``np.load(f).view(ml_dtypes.bfloat16)`` using ``dtype``.
Containers themselves are not recorded (lists and tuples look alike; empty ones vanish):
dicts with keys that are not str, OrderedDicts, NamedTuples and dataclasses are written as
dicts (keys as ``str(key)``, fields by name); a ``torch.Tensor`` or ``jax.Array`` leaf is
an ``array`` with ``"framework": "torch"`` / ``"jax"``.

Names are untrusted: a store may come from elsewhere, and its component names and dict
keys may be anything (``../x``, ``/etc/passwd``, ``a\\0b``, ``""``, ``..``, 10,000 bytes).
So every file name is derived, never taken:

* each key is percent-encoded: every UTF-8 byte outside ``[A-Za-z0-9._-]`` becomes
  ``%XX``, as does a leading ``.`` (so no name is ``.``, ``..`` or hidden); ``""`` becomes
  ``%``.  This is injective, and the result never holds ``/`` or ``~``;
* a name longer than :data:`MAX_NAME` characters, or equal (ignoring case, for
  case-insensitive filesystems) to a name already given in the same directory, is cut and
  gets ``~`` and 16 hex digits of the key's BLAKE3: names never collide, so no leaf
  overwrites another;
* a leaf whose relative path would exceed :data:`MAX_PATH` characters goes to
  ``<component>/~deep/<BLAKE3 of its path>``;
* before each write the real path (symlinks resolved) must be inside ``out_dir``, and
  files are opened with ``O_NOFOLLOW``; otherwise :class:`UsageError` is raised.

``out_dir`` must be empty or absent unless ``overwrite=True`` (then files of the same
names are replaced; other files stay).  Memory: one component is loaded at a time (one
shard at a time for a sharded component).
"""

from __future__ import annotations

import collections.abc
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import blake3
import numpy as np

from ..errors import StepNotFoundError, UnsupportedValueError, UsageError
from ..format import codec, frameworks
from ..format.codec import dtype_name
from ..store import Store

EXPORT_FORMAT = "castore-export/1"
INDEX = "export.json"
LEAVES = "leaves.json"
MAX_NAME = 120  #: characters of an encoded name before it is cut (filesystems allow 255 bytes)
MAX_PATH = 1024  #: characters of a leaf's path under its component before it goes to ``~deep``
DEEP = "~deep"

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_VALUE_KINDS = {type(None): "none", bool: "bool", int: "int", float: "float", str: "str"}


@dataclass(frozen=True, slots=True)
class ExportResult:
    """What :func:`export_step` wrote."""

    step: int
    out_dir: str  #: the real path of the export directory
    components: int
    leaves: int
    files: int  #: ``.npy`` and ``.bin`` files (the JSON files not counted)
    nbytes: int  #: bytes of those files


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
    def __init__(self, writer: _Writer, component: str, component_dir: str):
        self.writer = writer
        self.component = component
        self.component_dir = component_dir
        self.leaves: list[dict] = []

    def export(self, value, directory: _Directory) -> None:
        if isinstance(value, collections.abc.Iterator):  # sharded: read one shard at a time
            for index, shard in enumerate(value):
                self.item(index, shard, [], directory)
        elif codec.children(value) is not None:
            self.tree(value, [], directory)
        else:
            self.leaf(value, [], directory)

    def tree(self, value, path: list, directory: _Directory) -> None:
        # dicts (any key), OrderedDicts, NamedTuples and dataclasses by key, sequences by index
        is_sequence = type(value) in (list, tuple)
        for key, child in codec.children(value) or ():
            self.item(key if is_sequence else str(key), child, path, directory)

    def item(self, key, child, path: list, directory: _Directory) -> None:
        if codec.children(child) is not None:
            self.tree(child, [*path, key], directory.child(str(key)))
        else:
            self.leaf(child, [*path, key], directory)

    def leaf(self, value, path: list, directory: _Directory) -> None:
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
            entry.update(kind="bytes", file=self._file(path, directory, ".bin"))
            self.writer.write(entry["file"], lambda file: file.write(value))
        elif isinstance(value, (np.ndarray, np.generic)):
            array = np.asarray(value)
            entry.update(
                kind="array" if kind is np.ndarray else "scalar",
                file=self._file(path, directory, ".npy"),
                dtype=dtype_name(array.dtype, leaf),
                shape=list(array.shape),
            )
            self.writer.write(entry["file"], lambda file: np.save(file, array, allow_pickle=False))
        else:  # a pickled leaf of a store opened with allow_pickle=True
            raise UnsupportedValueError(f"{self.component}/{leaf}", f"a {kind.__name__} (pickled leaf) is not exported")
        self.leaves.append(entry)

    def _file(self, path: list, directory: _Directory, suffix: str) -> str:
        # a component that is one leaf is alone in its directory: it takes a fixed name
        name = directory.name(str(path[-1]), suffix) if path else f"value{suffix}"
        rel = f"{directory.rel}/{name}"
        if len(rel) - len(self.component_dir) > MAX_PATH:
            rel = f"{self.component_dir}/{DEEP}/{_digest(json.dumps(path))}{suffix}"
        return rel


def export_step(store: Store, step: int | str | None, out_dir, *, keys=None, overwrite: bool = False) -> ExportResult:
    """Write ``step`` (an int, a tag, or None for the latest) of ``store`` under ``out_dir``.

    ``keys`` restricts the components.  Chunks are verified as the store's ``verify``
    says.  Raises StepNotFoundError (unknown step, tag or component), UsageError
    (``out_dir`` not empty without ``overwrite``, or a path that would leave it),
    UnsupportedValueError (a pickled leaf), and what :meth:`Store.load` raises for damaged
    data; files written before an error stay.
    """
    branch, step = store.locate(step)  # a tag may name a step of another branch
    stored = store.manifest(step, branch=branch).names
    names = stored if keys is None else ([keys] if isinstance(keys, str) else list(keys))
    missing = [name for name in names if name not in stored]
    if missing:
        raise StepNotFoundError(f"step {step} of {store.path} has no component {', '.join(map(repr, missing))}")
    writer = _Writer(_prepare(out_dir, overwrite))
    top = _Directory("", reserved=(INDEX,))
    components, count = [], 0
    for name in names:
        (value,) = store.load(step, keys=[name], branch=branch).values()
        directory = _Directory(top.name(name), reserved=(LEAVES, DEEP))
        exporter = _Exporter(writer, name, directory.rel)
        exporter.export(value, directory)
        writer.write_json(f"{directory.rel}/{LEAVES}", exporter.leaves)
        components.append({"name": name, "dir": directory.rel})
        count += len(exporter.leaves)
    writer.write_json(
        INDEX, {"format": EXPORT_FORMAT, "store": store.path, "branch": branch, "step": step, "components": components}
    )
    return ExportResult(step, writer.root, len(components), count, writer.files, writer.nbytes)

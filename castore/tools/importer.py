"""Import what :func:`castore.tools.export.export_step` wrote, or plain ``.npz`` / ``.safetensors`` files, as one step.

Sources :func:`import_dir` reads:

* an export directory (it holds ``export.json``), in any of its layouts (``npy``, ``npz``,
  ``safetensors``: ``layout`` in ``export.json``; an export without it is ``npy``).  Each
  component is rebuilt from its ``leaves.json``: a ``path`` element that is a string is a
  dict key, an integer a list index.  So a tuple, NamedTuple, dataclass or OrderedDict
  comes back as a list or dict, a dict with keys that were not strings has string keys,
  and a ``torch.Tensor`` or ``jax.Array`` leaf comes back as the numpy array it holds.
  Empty containers are not exported: an empty dict or list vanishes, and a list position
  one held comes back as None.  A sharded component (``"sharded": true``) is saved as
  shards again;
* a ``.npz`` or ``.safetensors`` file, or a directory of them without ``export.json``:
  each file becomes a component named after its file stem (``model.safetensors`` ->
  ``model``), a flat dict of its arrays by name; names holding ``/`` or ``.``
  (``layer.0.weight``) stay flat keys, they are not split into levels.

Everything read is untrusted.  JSON files and headers must have the shapes the layout
spec says; file names in them must be relative paths inside the source (no ``..``, no
absolute path), and are opened with ``O_NOFOLLOW`` after their real path is checked to be
inside; a safetensors header is checked as :mod:`castore.tools.safetensors_io` says; a
``.npy`` member's declared shape must match its size; object arrays are refused
(``allow_pickle=False``).  Any of this raises :class:`MigrationError` naming the file;
nothing of the step is committed then.

Memory: arrays are read-only memory maps of the source files where the bytes lie as
they are (``.npy`` files, safetensors tensors, npz members stored uncompressed, as
``export_step`` writes them; their CRC is checked on the way), so an import holds little
beyond the page cache; members of a compressed ``.npz`` (``np.savez_compressed``) are
decoded into memory, and a step commits atomically, so all of them are held until the save.
bfloat16 and float8 arrays come back with their ``ml_dtypes`` dtype, named by ``dtype`` in
``leaves.json`` (``.npy`` stores them as void of their width) or by the safetensors header.
"""

from __future__ import annotations

import io
import json
import logging
import math
import mmap
import os
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import CorruptDataError, MigrationError, UsageError
from ..format.codec import dtype_from_name
from ..format.keys import MAX_STEP
from ..format.manifest import MAX_DEPTH
from ..store import Store
from .export import EXPORT_FORMAT, FORMATS, INDEX, LEAVES
from .migrate.target import open_target, save_step
from .safetensors_io import SafetensorsFile

__all__ = ["ImportResult", "import_dir"]

log = logging.getLogger("castore.import")

MAX_JSON = 1 << 30  #: bytes of an ``export.json`` or ``leaves.json`` read at most
FOREIGN = (".npz", ".safetensors")
_SMALL = 1 << 20  # .npy files smaller than this are read, not mapped (a map per leaf costs more)
_VALUE_TYPES = {"none": (type(None),), "bool": (bool,), "int": (int,), "float": (float, int, str), "str": (str,)}
_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_DEFLATE_RATIO = 1100  # deflate expands at most ~1032x: a member declaring more is lying (or a bomb)


@dataclass(frozen=True, slots=True)
class ImportResult:
    """What :func:`import_dir` saved."""

    store: str  #: the store's path
    branch: str  #: the branch the step was saved to
    step: int
    source: str  #: the real path of what was read
    layout: str  #: ``npy``, ``npz`` or ``safetensors`` (an export), or ``files`` (plain .npz/.safetensors)
    components: tuple[str, ...]  #: the components saved, in order
    leaves: int  #: leaves saved (an export's leaves.json entries; a plain file's arrays)
    nbytes: int  #: leaf data bytes read (what ``progress`` was told)
    new_bytes: int  #: bytes the save added to the store
    unchanged: bool  #: the store held this step with this very state already (the save was a no-op)


class _Source:
    """Reads files under one real directory, refusing names that would leave it."""

    def __init__(self, root: str):
        self.root = root

    def path(self, rel, what: str) -> str:
        """The checked absolute path of ``rel``, a ``/``-separated name from an untrusted file."""
        if type(rel) is not str or not rel or rel.startswith("/") or "\0" in rel:
            raise MigrationError(self.root, f"{what} {str(rel)[:200]!r} is not a relative path")
        if any(part in ("", ".", "..") for part in rel.split("/")):
            raise MigrationError(self.root, f"{what} {rel[:200]!r} holds an empty, '.' or '..' part")
        path = os.path.join(self.root, *rel.split("/"))
        real = os.path.realpath(path)
        if os.path.commonpath([self.root, real]) != self.root:
            raise MigrationError(path, f"{what} leads outside {self.root} (a symlink?); not read")
        return path

    def open(self, path: str) -> int:
        """A read-only descriptor of the regular file ``path`` (never through a symlink)."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | os.O_NONBLOCK)
        except OSError as exc:
            raise MigrationError(path, f"cannot open: {exc.strerror or exc} (missing, or a symlink?)") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise MigrationError(path, "is not a regular file")
        return fd

    def read_json(self, path: str):
        fd = self.open(path)
        try:
            size = os.fstat(fd).st_size
            if size > MAX_JSON:
                raise MigrationError(path, f"is {size} bytes, more than the {MAX_JSON} read of a JSON file")
            with os.fdopen(os.dup(fd), "rb") as file:
                data = file.read(MAX_JSON + 1)
        finally:
            os.close(fd)
        try:
            return json.loads(data.decode("utf-8"), parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            raise MigrationError(path, f"is not valid JSON: {str(exc)[:200]}") from None


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


# --- .npy bytes: in a file or an npz member --------------------------------------------------------


def _npy_header(file, path: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, header bytes)`` of the ``.npy`` data at ``file``'s start."""
    try:
        version = np.lib.format.read_magic(file)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(file)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(file)
        else:
            raise ValueError(f".npy version {version} is not read")
    except (ValueError, EOFError, OSError, SyntaxError, TypeError, KeyError) as exc:
        raise MigrationError(path, f"is not a .npy array: {str(exc)[:200]}") from None
    if dtype.hasobject:
        raise MigrationError(path, "holds an object array, which needs unpickling: refused")
    return tuple(shape), bool(fortran), dtype, file.tell()


def _npy_nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _shaped(flat: np.ndarray, shape: tuple[int, ...], fortran: bool) -> np.ndarray:
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)


def _mapped(buffer, offset: int, shape: tuple[int, ...], fortran: bool, dtype: np.dtype) -> np.ndarray:
    count = math.prod(shape)
    flat = np.frombuffer(buffer, dtype, count, offset) if count else np.zeros(0, dtype)
    return _shaped(flat, shape, fortran)


def _read_npy_file(source: _Source, path: str) -> np.ndarray:
    fd = source.open(path)
    try:
        size = os.fstat(fd).st_size
        with os.fdopen(os.dup(fd), "rb") as file:
            shape, fortran, dtype, start = _npy_header(file, path)
            nbytes = _npy_nbytes(shape, dtype)
            if start + nbytes != size:
                raise MigrationError(path, f"declares {nbytes} bytes of {dtype} {shape} but holds {size - start}")
            if nbytes < _SMALL:
                data = file.read(nbytes)
                if len(data) != nbytes:
                    raise MigrationError(path, "changed size while it was read")
                return _shaped(np.frombuffer(data, dtype) if nbytes else np.zeros(0, dtype), shape, fortran)
        return _mapped(mmap.mmap(fd, 0, access=mmap.ACCESS_READ), start, shape, fortran, dtype)
    finally:
        os.close(fd)


def _read_raw_file(source: _Source, path: str) -> np.ndarray:
    fd = source.open(path)
    try:
        size = os.fstat(fd).st_size
        with os.fdopen(os.dup(fd), "rb") as file:
            data = file.read(size + 1)
    finally:
        os.close(fd)
    if len(data) != size:
        raise MigrationError(path, "changed size while it was read")
    return np.frombuffer(data, np.uint8)


class _Npz:
    """An npz file's members, read one at a time: stored ones mapped, compressed ones decoded."""

    def __init__(self, source: _Source, path: str):
        self.path = path
        fd = source.open(path)
        try:
            self.size = os.fstat(fd).st_size
            self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if self.size else None
            self._file = os.fdopen(os.dup(fd), "rb")
        finally:
            os.close(fd)
        try:
            self._zip = zipfile.ZipFile(self._file)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, OverflowError) as exc:
            self.close()
            raise MigrationError(path, f"is not a zip file (a damaged .npz?): {exc}") from None
        self.members: dict[str, zipfile.ZipInfo] = {}
        for info in self._zip.infolist():
            if info.filename in self.members:
                self.close()
                raise MigrationError(path, f"holds member {info.filename[:200]!r} twice")
            self.members[info.filename] = info

    def close(self) -> None:
        self._file.close()  # arrays mapped from ``_map`` keep it open as long as they live

    def keys(self) -> list[str]:
        return [name.removesuffix(".npy") for name in self.members if not name.endswith("/")]

    def array(self, key: str) -> np.ndarray:
        info = self.members.get(key + ".npy") or self.members.get(key)
        if info is None:
            raise MigrationError(self.path, f"has no member {key[:200]!r}.npy")
        where = f"{self.path}[{info.filename[:200]!r}]"
        if info.flag_bits & 0x1:
            raise MigrationError(where, "is encrypted")
        try:
            if info.compress_type == zipfile.ZIP_STORED and self._map is not None:
                return self._stored(info, where, self._map)
            if info.compress_type != zipfile.ZIP_DEFLATED:
                raise MigrationError(
                    where, f"uses zip compression method {info.compress_type}; only stored and deflated are read"
                )
            return self._deflated(info, where)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, OverflowError, ValueError) as exc:
            if isinstance(exc, MigrationError):
                raise
            raise MigrationError(where, f"cannot be read (damaged?): {str(exc)[:200]}") from None

    def _stored(self, info: zipfile.ZipInfo, where: str, whole: mmap.mmap) -> np.ndarray:
        local = whole[info.header_offset : info.header_offset + 30]
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise MigrationError(where, "has no local header where the directory says")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        end = start + info.compress_size
        if info.compress_size != info.file_size or end > self.size:
            raise MigrationError(where, f"claims {info.file_size} bytes at {start}, past the file's {self.size}")
        with memoryview(whole)[start:end] as view:
            if zlib.crc32(view) != info.CRC:
                raise MigrationError(where, "fails its CRC check (damaged)")
        head = io.BytesIO(whole[start : min(end, start + 65536)])
        shape, fortran, dtype, header = _npy_header(head, where)
        if header + _npy_nbytes(shape, dtype) != info.file_size:
            raise MigrationError(where, f"declares {dtype} {shape} but holds {info.file_size - header} bytes")
        return _mapped(whole, start + header, shape, fortran, dtype)

    def _deflated(self, info: zipfile.ZipInfo, where: str) -> np.ndarray:
        if info.file_size > info.compress_size * _DEFLATE_RATIO + 65536:
            raise MigrationError(where, f"claims {info.file_size} bytes from {info.compress_size} compressed: refused")
        with self._zip.open(info) as member:
            shape, fortran, dtype, header = _npy_header(member, where)
            nbytes = _npy_nbytes(shape, dtype)
            if header + nbytes != info.file_size:
                raise MigrationError(where, f"declares {dtype} {shape} but holds {info.file_size - header} bytes")
            flat = np.empty(math.prod(shape), dtype)
            view, done = flat.view(np.uint8).data if nbytes else memoryview(b""), 0
            while done < nbytes:
                got = member.readinto(view[done:])  # type: ignore[attr-defined]  # a ZipExtFile
                if not got:
                    raise MigrationError(where, f"ends after {done} of {nbytes} bytes")
                done += got
            if member.read(1):  # reading to the end also checks the CRC
                raise MigrationError(where, "holds more bytes than its header declares")
        return _shaped(flat, shape, fortran)


# --- an export directory --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Component:
    name: str
    dir: str
    is_sharded: bool


def _index(source: _Source, path: str) -> tuple[str, int, list[_Component]]:
    index = source.read_json(path)
    if type(index) is not dict or index.get("format") != EXPORT_FORMAT:
        raise MigrationError(path, f"is not a castore export index (format {EXPORT_FORMAT!r})")
    layout, step, components = index.get("layout", "npy"), index.get("step"), index.get("components")
    if layout not in FORMATS:
        raise MigrationError(path, f"has layout {str(layout)[:40]!r}, not one of {', '.join(FORMATS)}")
    if type(step) is not int or not 0 <= step <= MAX_STEP:
        raise MigrationError(path, f"has step {str(step)[:40]!r}, not an int in [0, 2**63)")
    if type(components) is not list:
        raise MigrationError(path, "has no list of components")
    found: list[_Component] = []
    for record in components:
        if type(record) is not dict or type(record.get("name")) is not str or not record["name"]:
            raise MigrationError(path, f"lists a component {str(record)[:200]} without a name")
        if any(c.name == record["name"] for c in found):
            raise MigrationError(path, f"lists component {record['name'][:200]!r} twice")
        source.path(record.get("dir"), f"the directory of component {record['name'][:200]!r}")
        found.append(_Component(record["name"], record["dir"], record.get("sharded") is True))
    return layout, step, found


class _Reader:
    """Reads the leaves of one component of an export, keeping its containers open."""

    def __init__(self, source: _Source, layout: str, leaves_path: str, progress):
        self.source, self.layout, self.leaves_path, self.progress = source, layout, leaves_path, progress
        self.nbytes = 0
        self._safetensors: dict[str, tuple[SafetensorsFile, dict]] = {}
        self._npz: dict[str, _Npz] = {}

    def close(self) -> None:
        for npz in self._npz.values():
            npz.close()

    def value(self, entry: dict, where: str):
        kind = entry.get("kind")
        if kind in _VALUE_TYPES:
            return _plain(entry, kind, where)
        if kind not in ("array", "scalar", "bytes"):
            raise MigrationError(self.leaves_path, f"{where}: unknown kind {str(kind)[:40]!r}")
        array = self._array(entry, where)
        if kind == "bytes":
            if array.dtype != np.uint8 or array.ndim != 1:
                raise MigrationError(self.leaves_path, f"{where}: a bytes leaf is not a 1-d uint8 array")
            value: object = array.tobytes()
        else:
            name = entry.get("dtype")
            try:
                dtype = dtype_from_name(name if isinstance(name, str) else "?")
            except CorruptDataError as exc:
                raise MigrationError(self.leaves_path, f"{where}: {exc}") from None
            shape = entry.get("shape")
            if type(shape) is not list or tuple(shape) != array.shape:
                raise MigrationError(
                    self.leaves_path, f"{where}: shape {str(shape)[:80]} but the file holds {array.shape}"
                )
            if array.dtype != dtype:
                if array.dtype.itemsize != dtype.itemsize or array.dtype.kind not in ("V", dtype.kind):
                    raise MigrationError(self.leaves_path, f"{where}: dtype {dtype} but the file holds {array.dtype}")
                # .npy keeps bfloat16/float8 as void; safetensors is little-endian only
                array = array.view(dtype) if array.dtype.kind == "V" else array.astype(dtype)
            value = array[()] if kind == "scalar" else array
            if kind == "scalar" and array.ndim:
                raise MigrationError(self.leaves_path, f"{where}: a scalar of shape {array.shape}")
        self.nbytes += array.nbytes
        if self.progress is not None:
            self.progress(array.nbytes)
        return value

    def _array(self, entry: dict, where: str) -> np.ndarray:
        path = self.source.path(entry.get("file"), f"{where}: file")
        if self.layout == "npy" and entry["kind"] == "bytes":
            return _read_raw_file(self.source, path)
        if self.layout == "npy":
            return _read_npy_file(self.source, path)
        key = entry.get("key")
        if type(key) is not str:
            raise MigrationError(self.leaves_path, f"{where}: no key in its container")
        if self.layout == "npz":
            if path not in self._npz:
                self._npz[path] = _Npz(self.source, path)
            return self._npz[path].array(key)
        if path not in self._safetensors:
            fd = self.source.open(path)
            try:
                file = SafetensorsFile(fd, path)
            finally:
                os.close(fd)
            self._safetensors[path] = (file, {t.name: t for t in file.tensors})
        file, tensors = self._safetensors[path]
        if key not in tensors:
            raise MigrationError(path, f"has no tensor {key[:200]!r} ({where})")
        return file.array(tensors[key])


def _plain(entry: dict, kind: str, where: str):
    value = entry.get("value")
    if "value" not in entry or type(value) not in _VALUE_TYPES[kind]:
        raise MigrationError(where, f"a {kind} leaf with value {str(value)[:80]!r}")
    if kind == "float":
        if type(value) is str:
            if value not in _FLOATS:
                raise MigrationError(where, f"a float leaf with value {value[:80]!r}")
            return _FLOATS[value]
        return float(value)  # type: ignore[arg-type]  # an int: checked above
    return value


class _Tree:
    """A tree built from leaf paths: str elements are dict keys, int elements list indices."""

    def __init__(self, where: str):
        self.where = where
        self.root: dict = {}
        self.leaf_root = False
        self.value: object = None

    def add(self, path, value) -> None:
        if type(path) is not list or len(path) > MAX_DEPTH:
            raise MigrationError(self.where, f"leaf path {str(path)[:200]} is not a list of at most {MAX_DEPTH} keys")
        for key in path:
            if type(key) is not str and (type(key) is not int or key < 0):
                raise MigrationError(self.where, f"leaf path {str(path)[:200]} holds {str(key)[:40]!r}")
        if not path:
            if self.leaf_root or self.root:
                raise MigrationError(self.where, "the whole component is a leaf, beside other leaves")
            self.leaf_root, self.value = True, value
            return
        if self.leaf_root:
            raise MigrationError(self.where, "the whole component is a leaf, beside other leaves")
        node = self.root
        for depth, key in enumerate(path):
            last = depth == len(path) - 1
            if node and (type(key) is int) != (type(next(iter(node))) is int):
                raise MigrationError(self.where, f"leaf path {str(path)[:200]} mixes dict keys and list indices")
            if last:
                if key in node:
                    raise MigrationError(self.where, f"leaf path {str(path)[:200]} is given twice or holds leaves")
                node[key] = _Leaf(value)
            else:
                child = node.setdefault(key, {})
                if isinstance(child, _Leaf):
                    raise MigrationError(self.where, f"leaf path {str(path)[:200]} continues below a leaf")
                node = child

    def build(self):
        return self.value if self.leaf_root else _built(self.root)


@dataclass(slots=True)
class _Leaf:
    value: object


def _built(node: dict):
    values = {key: child.value if isinstance(child, _Leaf) else _built(child) for key, child in node.items()}
    if values and type(next(iter(values))) is int:
        items: list[object] = [None] * (max(values) + 1)  # a gap: an empty container export did not record
        for index, value in values.items():
            items[index] = value
        return items
    return values


def _component(source: _Source, layout: str, component: _Component, progress, counts: list[int]):
    """The state of one exported component (an iterator of its shards if it is sharded)."""
    leaves_path = source.path(f"{component.dir}/{LEAVES}", f"the leaves of component {component.name[:200]!r}")
    entries = source.read_json(leaves_path)
    if type(entries) is not list or not all(type(e) is dict for e in entries):
        raise MigrationError(leaves_path, "is not a list of leaf objects")
    reader = _Reader(source, layout, leaves_path, progress)
    try:
        if component.is_sharded:
            return _shards(reader, entries, leaves_path, counts)
        tree = _Tree(leaves_path)
        for entry in entries:
            tree.add(entry.get("path"), reader.value(entry, f"{leaves_path}: leaf {str(entry.get('leaf'))[:200]!r}"))
        counts[0] += len(entries)
        counts[1] += reader.nbytes
        return tree.build()
    finally:
        if not component.is_sharded:
            reader.close()


def _shards(reader: _Reader, entries: list[dict], leaves_path: str, counts: list[int]) -> Iterator:
    by_shard: dict[int, list[dict]] = {}
    for entry in entries:
        path = entry.get("path")
        if type(path) is not list or not path or type(path[0]) is not int or path[0] < 0:
            raise MigrationError(leaves_path, f"a sharded leaf path {str(path)[:200]} starts with no shard index")
        by_shard.setdefault(path[0], []).append(entry)
    if sorted(by_shard) != list(range(len(by_shard))):
        raise MigrationError(leaves_path, "the shard indices do not run 0, 1, 2, ...")
    return _shard_values(reader, by_shard, leaves_path, counts)


def _shard_values(reader: _Reader, by_shard: dict[int, list[dict]], leaves_path: str, counts: list[int]) -> Iterator:
    try:
        for index in range(len(by_shard)):
            tree = _Tree(f"{leaves_path} (shard {index})")
            for entry in by_shard[index]:
                tree.add(
                    entry["path"][1:], reader.value(entry, f"{leaves_path}: leaf {str(entry.get('leaf'))[:200]!r}")
                )
            counts[0] += len(by_shard[index])
            yield tree.build()
    finally:
        counts[1] += reader.nbytes
        reader.close()


# --- plain files ----------------------------------------------------------------------------------


def _foreign_file(source: _Source, path: str, progress, counts: list[int]) -> dict:
    arrays: dict[str, np.ndarray] = {}
    if path.endswith(".npz"):
        npz = _Npz(source, path)
        try:
            for key in npz.keys():
                arrays[key] = npz.array(key)
        finally:
            npz.close()
    else:
        fd = source.open(path)
        try:
            file = SafetensorsFile(fd, path)
        finally:
            os.close(fd)
        arrays = {entry.name: file.array(entry) for entry in file.tensors}
    for array in arrays.values():
        counts[1] += array.nbytes
        if progress is not None:
            progress(array.nbytes)
    counts[0] += len(arrays)
    return arrays


def _foreign_files(source: str) -> tuple[str, dict[str, str]]:
    """The source root and ``{component: file path}`` of a plain file or a directory of them."""
    if os.path.isdir(source):
        root = os.path.realpath(source)
        try:
            names = sorted(os.listdir(root))
        except OSError as exc:
            raise MigrationError(root, f"cannot list: {exc.strerror or exc}") from None
        files = [n for n in names if n.endswith(FOREIGN) and not n.startswith(".")]
        if not files:
            raise UsageError(f"{source} holds neither {INDEX} (an export) nor .npz or .safetensors files")
    else:
        real = os.path.realpath(source)  # a file named explicitly may be a symlink: it is followed
        if not real.endswith(FOREIGN):
            raise UsageError(f"{source} is not an export directory, a .npz or a .safetensors file")
        root, files = os.path.dirname(real), [os.path.basename(real)]
    components: dict[str, str] = {}
    for name in files:
        _Source(root).path(name, "file")  # a symlink in a directory must stay inside it
        stem = name.removesuffix(".npz").removesuffix(".safetensors")
        if not stem:
            raise UsageError(f"{os.path.join(root, name)} has no stem to name its component by")
        if stem in components:
            raise UsageError(f"{components[stem]} and {name} in {root} would both be component {stem!r}: rename one")
        components[stem] = os.path.join(root, name)
    return root, components


def import_dir(
    source: str | os.PathLike,
    store: str | os.PathLike | Store,
    *,
    step: int | None = None,
    branch: str | None = None,
    overwrite: bool = False,
    keys=None,
    progress: Callable[[int], None] | None = None,
    allow_network_fs: bool = False,
) -> ImportResult:
    """Save what ``source`` holds (see the module docstring) into ``store`` as one step.

    ``store`` is a path (the store is created if absent, and closed afterwards) or an open
    :class:`Store`.  ``step`` defaults to the exported step (``export.json``); plain files
    need it.  ``keys`` restricts the components.  ``progress(nbytes)`` is called after each
    leaf's data is read or mapped (the save that follows hashes and writes it).  A step the
    store holds with this very state already is left as it is (``unchanged``).

    Raises :class:`UsageError` for a source that is none of the kinds read, a missing
    ``step`` for plain files, or ``keys`` naming no component of it;
    :class:`MigrationError` (with the file) for anything malformed, damaged or leading
    outside the source; :class:`UnsupportedValueError` for a value castore does not store
    (a void or structured dtype of a plain .npz); :class:`StepExistsError` if the step
    holds other content, unless ``overwrite``.  Nothing is committed on an error.
    """
    source = os.fspath(source)
    if not os.path.exists(source):
        raise UsageError(f"{source} does not exist: pass an export directory, or a .npz or .safetensors file")
    counts = [0, 0]  # leaves, bytes of the attempt being saved
    if os.path.isdir(source) and os.path.lexists(os.path.join(source, INDEX)):
        reader = _Source(os.path.realpath(source))
        layout, exported_step, components = _index(reader, reader.path(INDEX, "the index"))
        by_name = {c.name: c for c in components}
        names = _selected(list(by_name), keys, source)
        tree_of = lambda: {name: _component(reader, layout, by_name[name], progress, counts) for name in names}
        step = exported_step if step is None else step
    else:
        root, files = _foreign_files(source)
        reader, layout = _Source(root), "files"
        names = _selected(list(files), keys, source)
        tree_of = lambda: {name: _foreign_file(reader, files[name], progress, counts) for name in names}
        if step is None:
            raise UsageError(f"{source} is not a castore export, so it names no step: pass step= (--step)")

    def attempt() -> dict:
        counts[:] = [0, 0]
        return tree_of()

    with open_target(store, branch, allow_network_fs) as target:
        result = save_step(target, step, attempt, overwrite=overwrite, source=os.path.realpath(source))
        unchanged = result.manifest_bytes == 0
        log.info("step %d from %s%s", step, reader.root, " (stored already)" if unchanged else "")
        return ImportResult(
            target.path,
            target.branch,
            step,
            os.path.realpath(source),
            layout,
            tuple(names),
            counts[0],
            counts[1],
            result.new_bytes,
            unchanged,
        )


def _selected(names: list[str], keys, source: str) -> list[str]:
    if keys is None:
        return names
    wanted = [keys] if isinstance(keys, str) else list(keys)
    missing = [k for k in wanted if k not in names]
    if missing:
        raise UsageError(
            f"{source} has no component {', '.join(map(repr, missing))} (it has {', '.join(map(repr, names))})"
        )
    return wanted

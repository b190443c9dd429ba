"""The safetensors file format, written and read by castore itself (no ``safetensors`` package).

A file is (https://github.com/huggingface/safetensors, README "Format")::

    8 bytes     N, the header's length: unsigned 64-bit little-endian
    N bytes     a UTF-8 JSON object: {"__metadata__": {str: str}, <name>: {"dtype": "F32",
                "shape": [2, 3], "data_offsets": [begin, end]}, ...}; may end in spaces
    rest        the tensors' bytes, C order, little-endian; offsets are relative to here

Writing streams: the header is built from shapes and dtypes alone, then each array's bytes
go from its memory to the file (no copy of the component, none of a C-contiguous
little-endian array).  Tensors are laid out by item size, largest first, after a header
padded to a multiple of 8 bytes (as the reference writer does), so every tensor is aligned
to its item size in a memory map.

Reading trusts nothing: the header length is capped at :data:`MAX_HEADER` and must fit the
file; the JSON must be an object of well-formed entries (no duplicate names, known dtypes,
``shape`` times item size equal to the byte span); the spans must cover the data exactly,
without overlap or holes (the reference rule, which also rules out polyglot files).
Anything else raises :class:`MigrationError` naming the file.  Tensors are views of a
read-only memory map: nothing is read into memory before it is used.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from ..errors import MigrationError
from ..format import mldtypes

__all__ = ["MAX_HEADER", "METADATA", "SafetensorsFile", "TensorEntry", "dtype_code", "write_safetensors"]

MAX_HEADER = 100_000_000  #: bytes of JSON header read at most (the reference library's cap)
METADATA = "__metadata__"

_NUMPY_CODES = {
    ("b", 1): "BOOL",
    ("u", 1): "U8",
    ("u", 2): "U16",
    ("u", 4): "U32",
    ("u", 8): "U64",
    ("i", 1): "I8",
    ("i", 2): "I16",
    ("i", 4): "I32",
    ("i", 8): "I64",
    ("f", 2): "F16",
    ("f", 4): "F32",
    ("f", 8): "F64",
}
_ML_CODES = {"bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


#: safetensors dtype code -> the numpy dtype it reads as (the ml_dtypes ones: see _dtype_of)
DTYPES: dict[str, np.dtype | None] = {
    **{
        code: np.dtype(f"<{kind}{size}") if kind != "b" else np.dtype(bool)
        for (kind, size), code in _NUMPY_CODES.items()
    },
    **{code: None for code in _ML_CODES.values()},
}


def _dtype_of(code: str) -> np.dtype | None:
    """The numpy dtype of a known code; None for BF16/F8 without ml_dtypes (imported here,
    when a file holds such a tensor, not with this module: it costs ~0.65 s)."""
    dtype = DTYPES[code]
    if dtype is None and (ml_dtypes := mldtypes.module()) is not None:
        name = next(name for name, c in _ML_CODES.items() if c == code)
        dtype = np.dtype(getattr(ml_dtypes, name))
    return dtype


def dtype_code(dtype: np.dtype) -> str | None:
    """The safetensors code of ``dtype`` (either byte order), or None if the format has none."""
    if (
        dtype.name in _ML_CODES
        and (ml_dtypes := mldtypes.module()) is not None
        and dtype == np.dtype(getattr(ml_dtypes, dtype.name))
    ):
        return _ML_CODES[dtype.name]
    if dtype.fields is not None or dtype.subdtype is not None:
        return None
    return _NUMPY_CODES.get((dtype.kind, dtype.itemsize))


def _little_endian_c(array: np.ndarray) -> np.ndarray:
    """``array`` as a C-contiguous little-endian array: itself when it is one (the usual case)."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array)


def write_safetensors(
    file,
    tensors: Sequence[tuple[str, np.ndarray]],
    metadata: dict[str, str] | None = None,
    after_each: Callable[[int], None] | None = None,
) -> int:
    """Write ``tensors`` (``(name, array)``, names distinct and not ``__metadata__``, dtypes
    with a :func:`dtype_code`) to the binary ``file``; returns the bytes written.

    ``after_each(i)`` is called once the bytes of ``tensors[i]`` are written.
    """
    order = sorted(range(len(tensors)), key=lambda i: -tensors[i][1].dtype.itemsize)  # stable: aligned spans
    spans: dict[int, tuple[int, int]] = {}
    offset = 0
    for i in order:
        spans[i] = (offset, offset + tensors[i][1].nbytes)
        offset += tensors[i][1].nbytes
    header: dict = {METADATA: dict(metadata)} if metadata else {}
    for i, (name, array) in enumerate(tensors):
        code = dtype_code(array.dtype)
        if code is None or name == METADATA or name in header:  # the caller checked: a bug if reached
            raise ValueError(f"tensor {name!r} of dtype {array.dtype} cannot be written")
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": list(spans[i])}
    text = json.dumps(header, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode()
    text += b" " * (-(8 + len(text)) % 8)
    file.write(struct.pack("<Q", len(text)))
    file.write(text)
    for i in order:
        array = _little_endian_c(tensors[i][1])
        if array.nbytes:
            file.write(array.reshape(-1).view(np.uint8).data)  # the array's own memory, no copy
        if after_each is not None:
            after_each(i)
    return 8 + len(text) + offset


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of a safetensors header, checked against the file."""

    name: str
    code: str  #: the safetensors dtype code ("F32", "BF16", ...)
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  #: offset of its bytes after the header
    end: int


def _reject_duplicates(pairs):
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"the name {key[:80]!r} appears twice")
        seen[key] = value
    return seen


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def _int(value) -> bool:
    return type(value) is int and value >= 0


class SafetensorsFile:
    """A safetensors file opened for reading: its checked header, tensors as memory-map views.

    ``fd`` is an open file descriptor (the caller opened it safely; it may close it after
    this returns: the map keeps its own).  Views stay valid as long as they are referenced.
    """

    def __init__(self, fd: int, path: str):
        self.path = path
        size = os.fstat(fd).st_size
        if size < 8:
            raise MigrationError(path, f"is {size} bytes: too short for a safetensors header length")
        (length,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        if length > MAX_HEADER:
            raise MigrationError(path, f"declares a {length}-byte header, more than the {MAX_HEADER} read at most")
        if 8 + length > size:
            raise MigrationError(path, f"declares a {length}-byte header but holds {size - 8} bytes after its length")
        raw = os.pread(fd, length, 8)
        if len(raw) != length:
            raise MigrationError(path, "the header could not be read in full (the file shrank?)")
        self.data_start = 8 + length
        self.data_nbytes = size - self.data_start
        self.metadata, self.tensors = self._parse(raw)
        self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else None

    def _parse(self, raw: bytes) -> tuple[dict[str, str], list[TensorEntry]]:
        try:
            text = raw.decode("utf-8")
            if not text.startswith("{"):
                raise ValueError("the header is not a JSON object")
            header = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise MigrationError(self.path, f"the header is not valid JSON: {exc}") from None
        if type(header) is not dict:
            raise MigrationError(self.path, "the header is not a JSON object")
        metadata = header.pop(METADATA, None) or {}
        if type(metadata) is not dict or not all(type(v) is str for v in metadata.values()):
            raise MigrationError(self.path, f"{METADATA} is not an object of strings")
        entries = [self._entry(name, info) for name, info in header.items()]
        position = 0
        for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
            if entry.begin != position:
                what = "overlaps the tensor before it" if entry.begin < position else "leaves a hole before it"
                raise MigrationError(self.path, f"tensor {entry.name[:80]!r} {what} (bytes {entry.begin}..{entry.end})")
            position = entry.end
        if position != self.data_nbytes:
            raise MigrationError(
                self.path, f"the tensors span {position} bytes but {self.data_nbytes} follow the header"
            )
        return metadata, entries

    def _entry(self, name: str, info) -> TensorEntry:
        where = f"tensor {name[:80]!r}"
        if type(info) is not dict or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise MigrationError(self.path, f"{where} is not an object with dtype, shape and data_offsets")
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if type(code) is not str or code not in DTYPES or _dtype_of(code) is None:
            hint = " (bfloat16 and float8 need the ml_dtypes package)" if code in ("BF16", "F8_E4M3", "F8_E5M2") else ""
            raise MigrationError(self.path, f"{where} has dtype {str(code)[:20]!r}, which castore does not read{hint}")
        if type(shape) is not list or not all(map(_int, shape)):
            raise MigrationError(self.path, f"{where} has shape {str(shape)[:80]}, not a list of sizes")
        if type(offsets) is not list or len(offsets) != 2 or not all(map(_int, offsets)) or offsets[0] > offsets[1]:
            raise MigrationError(self.path, f"{where} has data_offsets {str(offsets)[:80]}, not [begin, end]")
        begin, end = offsets
        if end > self.data_nbytes:
            raise MigrationError(self.path, f"{where} ends at byte {end}, past the {self.data_nbytes} in the file")
        dtype = cast(np.dtype, _dtype_of(code))  # not None: checked above
        if math.prod(shape) * dtype.itemsize != end - begin:
            raise MigrationError(
                self.path,
                f"{where}: shape {shape} of {code} is {math.prod(shape) * dtype.itemsize} bytes, not {end - begin}",
            )
        return TensorEntry(name, code, dtype, tuple(shape), begin, end)

    def array(self, entry: TensorEntry) -> np.ndarray:
        """The tensor as a read-only view of the file (bool tensors checked to hold 0 and 1)."""
        if entry.begin == entry.end or self._map is None:
            return np.zeros(entry.shape, entry.dtype)
        count = (entry.end - entry.begin) // entry.dtype.itemsize
        array = np.frombuffer(self._map, entry.dtype, count, self.data_start + entry.begin).reshape(entry.shape)
        if entry.code == "BOOL" and array.view(np.uint8).max() > 1:
            raise MigrationError(self.path, f"tensor {entry.name[:80]!r} is BOOL but holds bytes other than 0 and 1")
        return array

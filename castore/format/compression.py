"""Per-chunk codecs: how a chunk's bytes are stored, and how they come back (pure, no I/O).

A chunk's id is always the BLAKE3-256 of its *raw* bytes, so deduplication and
verification never depend on a setting.  Its stored value (format 4, see
``docs/format.md``) is either

* the raw bytes themselves, when they do not begin with :data:`MAGIC`; or
* an *encoded value*: ``MAGIC`` (4 bytes), the codec (1 byte), the raw length (uint32,
  little-endian), then the codec's payload.  A raw chunk that happens to begin with
  ``MAGIC`` is stored as an encoded value of codec :data:`RAW`, so every value reads back
  one way.

Raw chunks are stored without a header so an incompressible chunk costs no copy.  Decoding
never produces more than the raw length the manifest records: a payload that would decode
to more (a decompression bomb) or to less is a :class:`ChunkCorruptError`.

Which chunks to encode is a :class:`Compression` setting: ``"none"``, a named codec and
level (``"zstd"``, ``"zstd:3"``), or ``"auto"``: a trial on a sample of each leaf decides
whether that leaf's chunks are encoded, remembered per leaf and tried again now and then
(:class:`LeafChoices`).  zstd was chosen by measurement (``docs/benchmarks.md``): on
real 64x64 Crafter frames of random play, level 5 stores them at 7.6x (level 1: 6.4x, 3:
7.1x, 9: 7.7x, zlib 6 as in ``np.savez_compressed``: 8.7x) at ~290 MB/s per thread
(level 1: ~670, 3: ~530, zlib: ~90) and decodes at ~2 GB/s per thread; in the whole
benchmark run auto mode at level 5 stores the replay at 8.2x (level 3: 7.7x) for the
same save time (the encode runs on the hashing threads, beside the writes it shrinks).
lz4 was no faster on frames and far larger; on float32 weights no codec we tried (zstd,
lz4, blosc2 with byte-shuffle) saved more than ~15%.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

import zstandard

from ..errors import ChunkCorruptError, UsageError

MAGIC = b"\x89CZ\x1a"  #: first bytes of an encoded value (0x89: not text; 0x1a: not a zstd frame)
RAW, ZSTD = 0, 1  #: codec numbers of an encoded value
_HEADER = struct.Struct("<4sBI")
HEADER_BYTES = _HEADER.size  # 9

#: an encoded chunk is kept only if it saves at least 1/16 of the raw bytes
MIN_SAVING = 1 / 16
#: auto mode encodes a leaf only if a trial shrinks its sample to at most this fraction:
#: below ~1.25x, encoding costs more save time than the bytes it saves (float32 weights)
AUTO_MAX_FRACTION = 0.8
AUTO_LEVEL = 5  #: zstd level of auto mode: frames ~6% smaller than level 3 and decoded as fast
TRIAL_LEVEL = 1  #: zstd level of auto mode's trial
TRIAL_BYTES = 256 << 10  #: bytes of a leaf's first changed chunk a trial compresses
RETRY_SAVES = 64  #: auto mode tries a leaf again after this many saves of it
ZSTD_LEVELS = range(-7, 23)


@dataclass(frozen=True, slots=True)
class Compression:
    """A compression setting: ``mode`` is "none", "auto" or "codec" (then ``level``)."""

    mode: str
    level: int = AUTO_LEVEL

    @property
    def name(self) -> str:
        """The setting as it is spelled (``Compression.parse(c.name) == c``)."""
        return f"zstd:{self.level}" if self.mode == "codec" else self.mode

    @classmethod
    def parse(cls, value) -> Compression:
        """``"auto"``, ``"none"`` (or None/False), ``"zstd"``, ``"zstd:LEVEL"``."""
        if isinstance(value, Compression):
            return value
        if value is None or value is False or value == "none":
            return cls("none")
        if value == "auto":
            return cls("auto")
        if isinstance(value, str) and (value == "zstd" or value.startswith("zstd:")):
            _, _, level_text = value.partition(":")
            try:
                level = int(level_text) if value != "zstd" else 3
            except ValueError:
                level = None
            if level is None or level not in ZSTD_LEVELS or level == 0:
                raise UsageError(f"compression {value!r}: the zstd level must be an integer in -7..-1 or 1..22")
            return cls("codec", level)
        raise UsageError(f"compression must be 'auto', 'none', 'zstd' or 'zstd:LEVEL', not {value!r}")


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """A compressor per thread and level (zstandard's objects are not thread-safe)."""
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    found = cache.get(level)
    if found is None:
        found = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return found


def _decompressor(nbytes: int) -> zstandard.ZstdDecompressor:
    """A decompressor per thread that refuses a frame whose window exceeds ``nbytes``
    rounded up to a power of two (at least 1 KiB, zstd's least).

    zstd's streaming decoder allocates the window a frame declares (up to 128 MiB by
    default) before it writes a byte, so an unbounded one would let a hostile value
    reserve far more than its chunk.  Our frames never need more: they record their
    content size, so zstd fits their window to the chunk.
    """
    window = max(1 << 10, 1 << (nbytes - 1).bit_length()) if nbytes > 1 else 1 << 10
    cache = getattr(_local, "decompressors", None)
    if cache is None:
        cache = _local.decompressors = {}
    found = cache.get(window)
    if found is None:
        found = cache[window] = zstandard.ZstdDecompressor(max_window_size=window)
    return found


def stored_value(raw, level: int | None):
    """The value to store for the raw chunk bytes ``raw`` (a buffer).

    With ``level`` None the chunk is stored raw (``raw`` itself: no copy); else it is zstd
    encoded at ``level`` and kept encoded if that saves at least :data:`MIN_SAVING`.
    """
    nbytes = len(raw)
    if level is not None and nbytes:
        payload = _compressor(level).compress(raw)
        if HEADER_BYTES + len(payload) <= nbytes - nbytes * MIN_SAVING:
            return _HEADER.pack(MAGIC, ZSTD, nbytes) + payload
    if bytes(raw[: len(MAGIC)]) == MAGIC:  # would read as encoded: store it escaped
        return _HEADER.pack(MAGIC, RAW, nbytes) + bytes(raw)
    return raw


def trial_fraction(raw, level: int = TRIAL_LEVEL) -> float:
    """Stored size over raw size of a sample of ``raw`` (auto mode's trial, at level 1: ~2x
    faster than the level it decides on, and a bound on what that level achieves)."""
    nbytes = len(raw)
    if nbytes <= TRIAL_BYTES:
        sample = raw
    else:
        start = (nbytes - TRIAL_BYTES) // 2
        sample = raw[start : start + TRIAL_BYTES]
    if not len(sample):
        return 1.0
    return len(_compressor(level).compress(sample)) / len(sample)


def is_encoded(value) -> bool:
    """True if a stored value has the encoded-value header."""
    return bytes(value[: len(MAGIC)]) == MAGIC


def codec_of(value) -> int | None:
    """The codec number of a stored value; None for a raw one."""
    if len(value) < HEADER_BYTES or not is_encoded(value):
        return None
    return _HEADER.unpack_from(value)[1]


def decode_into(value, out: memoryview, context: dict, chunk: str) -> None:
    """Decode the stored value ``value`` into ``out`` (writable, exactly the raw length).

    Raises :class:`ChunkCorruptError` (with ``context`` and ``chunk``) unless the value
    decodes to exactly ``len(out)`` bytes; never writes or allocates beyond ``out``.
    """
    expected = len(out)
    if len(value) < len(MAGIC) or not is_encoded(value):
        if len(value) != expected:
            raise ChunkCorruptError(
                f"stored chunk is {len(value)} bytes, its blob needs {expected}", chunk_id=chunk, **context
            )
        out[:] = value
        return
    if len(value) < HEADER_BYTES:
        raise ChunkCorruptError("encoded chunk is shorter than its header", chunk_id=chunk, **context)
    _, codec, nbytes = _HEADER.unpack_from(value)
    if nbytes != expected:
        raise ChunkCorruptError(
            f"encoded chunk says {nbytes} raw bytes, its blob needs {expected}", chunk_id=chunk, **context
        )
    payload = memoryview(value)[HEADER_BYTES:]
    if codec == RAW:
        if len(payload) != expected:
            raise ChunkCorruptError("escaped raw chunk has a wrong length", chunk_id=chunk, **context)
        out[:] = payload
        return
    if codec != ZSTD:
        raise ChunkCorruptError(f"chunk has unknown codec {codec}", chunk_id=chunk, **context)
    try:
        reader = _decompressor(expected).stream_reader(payload, read_across_frames=False)
        filled = 0
        while filled < expected:
            got = reader.readinto(out[filled:])
            if not got:
                break
            filled += got
        extra = reader.read(1) if filled == expected else b""
    except zstandard.ZstdError as exc:
        raise ChunkCorruptError(f"compressed chunk does not decode ({exc})", chunk_id=chunk, **context) from None
    if filled != expected or extra:
        raise ChunkCorruptError(
            "compressed chunk decodes to " + ("more" if extra else f"{filled}") + f" bytes, not {expected}",
            chunk_id=chunk,
            **context,
        )


class LeafChoices:
    """Auto mode's memory: per leaf path, whether its chunks are encoded, and for how long.

    :meth:`level_for` runs a trial on a leaf's first changed chunk when the leaf is new or
    its choice has been used :data:`RETRY_SAVES` times, so a leaf whose data changes
    character (a replay that starts empty) is judged again.
    """

    def __init__(self, setting: Compression):
        self.setting = setting
        self._choices: dict[str, list] = {}  # path -> [level or None, saves left]
        self._lock = threading.Lock()

    def level_for(self, path: str, sample) -> int | None:
        """The zstd level to encode ``path``'s changed chunks at, or None (store raw)."""
        mode = self.setting.mode
        if mode == "none":
            return None
        if mode == "codec":
            return self.setting.level
        with self._lock:
            choice = self._choices.get(path)
            if choice is not None and choice[1] > 0:
                choice[1] -= 1
                return choice[0]
        level = AUTO_LEVEL if trial_fraction(sample) <= AUTO_MAX_FRACTION else None
        with self._lock:
            self._choices[path] = [level, RETRY_SAVES - 1]
        return level

    def forget(self) -> None:
        """Drop every leaf's choice: the next save of each tries it again."""
        with self._lock:
            self._choices.clear()

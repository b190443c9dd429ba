"""The bucket layout (bucket format 1): a store's steps, chunks and pages as objects (pure).

A mirror (``Store(path, mirror="s3://bucket/prefix")``) keeps, under the URL's prefix:

=========================  ==============================================================
``config``                 sealed msgpack ``{"castore_bucket": 1, "hash", "page_ids", "created"}``,
                           created once (conditional create)
``packs/<hh>/<pack id>``   a pack: stored values (chunk values as the local store holds them,
                           raw or encoded; pages) back to back, then the pack's index, its length
                           (u32 LE) and :data:`PACK_MAGIC`.  The pack id is the BLAKE3-256 of the
                           whole object (hex); ``hh`` its first two hex digits
``index/<pack id>``        the same index bytes as the pack's trailer: which ids the pack holds,
                           where.  Written after its pack; a pack without one is garbage
``steps/<step key hex>``   a step record: the step's sealed manifest and stepinfo record, as the
                           local store holds them.  Written after every pack it needs: a step is
                           visible once its record is, and only then
``tags/<tag name hex>``    sealed msgpack ``{"key": step key}``
``locks/<kind>-<owner>``   a lock record (see :func:`encode_lock`): bucket GC excludes uploads
``gc-epoch``               32 hex digits, written anew by each bucket GC before its first delete
``parts/<step key hex>/<rank>``  one rank's part of a multi-host step (see :func:`encode_part`):
                           written after the rank's packs, until the step commits; rank in 6 digits
=========================  ==============================================================

Hex keeps every key in the object stores' narrow alphabet, and a step key's hex sorts as its
bytes do, so listing ``steps/`` lists each branch's steps in order, as the ``steps`` table does.
Everything read from a bucket is untrusted: each decoder here checks types, ranges and
checksums and raises :class:`~castore.errors.CorruptDataError`.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import msgpack
import numpy as np

from ..errors import CorruptDataError
from .ids import ID_BYTES, chunk_id
from .keys import branch_of
from .sealing import SEAL, seal, unpack_untrusted, unseal

BUCKET_FORMAT = 1
CONFIG = "config"
GC_EPOCH = "gc-epoch"  #: 32 hex digits a bucket GC writes anew before it deletes anything
PACKS, INDEX, STEPS, TAGS, LOCKS, PARTS = "packs", "index", "steps", "tags", "locks", "parts"
PACK_MAGIC = b"CSTPACK1"
TRAILER_BYTES = 4 + len(PACK_MAGIC)
#: kinds of pack entries: a chunk's stored value, a chunk-list page
CHUNK, PAGE = 0, 1
#: entries of one pack at most (a 64 MiB pack of 4 KiB chunks holds 16,384)
MAX_PACK_ENTRIES = 1 << 20
#: bytes of one stored value at most: the largest chunk (256 MiB) and an encoded value's header
MAX_VALUE_BYTES = (256 << 20) + 64
_U32 = np.dtype("<u4")


def pack_key(pack_id: str) -> str:
    return f"{PACKS}/{pack_id[:2]}/{pack_id}"


def index_key(pack_id: str) -> str:
    return f"{INDEX}/{pack_id}"


def step_object(key: bytes) -> str:
    """The object of a step record, from its step key."""
    return f"{STEPS}/{bytes(key).hex()}"


def part_object(key: bytes, rank: int) -> str:
    return f"{PARTS}/{bytes(key).hex()}/{rank:06d}"


def part_folder(key: bytes) -> str:
    """The folder of every part of step ``key``."""
    return f"{PARTS}/{bytes(key).hex()}"


def part_of(name: str) -> tuple[bytes, int]:
    """``(step key, rank)`` a ``parts/<hex>/<rank>`` object names (checked)."""
    head, _, rank = name.rpartition("/")
    key = hex_name(head, PARTS, "part")
    branch_of(key)
    if len(rank) != 6 or not rank.isdigit() or not rank.isascii():
        raise CorruptDataError(f"part object {name!r} is not named {PARTS}/<hex>/<6-digit rank>")
    return key, int(rank)


def tag_object(name: str) -> str:
    return f"{TAGS}/{name.encode('utf-8').hex()}"


def hex_name(name: str, folder: str, what: str) -> bytes:
    """The bytes a ``folder/<hex>`` object name encodes; :class:`CorruptDataError` otherwise."""
    head, _, tail = name.partition("/")
    if head != folder or not tail or "/" in tail or len(tail) % 2:
        raise CorruptDataError(f"{what} object {name!r} is not named {folder}/<hex>")
    try:
        return bytes.fromhex(tail)
    except ValueError:
        raise CorruptDataError(f"{what} object {name!r} is not named {folder}/<hex>") from None


def step_key_of(name: str) -> bytes:
    """The step key a ``steps/<hex>`` object names (checked: a valid step key)."""
    key = hex_name(name, STEPS, "step")
    branch_of(key)  # CorruptDataError for a malformed key
    return key


def is_pack_id(text: str) -> bool:
    return len(text) == 2 * ID_BYTES and all(c in "0123456789abcdef" for c in text)


# -- packs and their indexes ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PackIndex:
    """What one pack holds: entry ``i`` is ``kinds[i]`` (:data:`CHUNK` or :data:`PAGE`) with id
    ``ids[32 i: 32 i + 32]`` at ``offsets[i]``, ``lengths[i]`` bytes; values end at ``data_bytes``."""

    kinds: bytes
    ids: bytes
    offsets: np.ndarray  #: int64, ascending, the first 0
    lengths: np.ndarray  #: int64
    data_bytes: int

    def __len__(self) -> int:
        return len(self.kinds)

    def id(self, i: int) -> bytes:
        return self.ids[i * ID_BYTES : (i + 1) * ID_BYTES]


def encode_index(kinds: bytes, ids: bytes, lengths: list[int]) -> bytes:
    """The sealed index of a pack whose values, of these ``lengths``, lie back to back from 0."""
    body = {
        "format": BUCKET_FORMAT,
        "kinds": bytes(kinds),
        "ids": bytes(ids),
        "lengths": np.asarray(lengths, dtype=_U32).tobytes(),
    }
    return seal(msgpack.packb(body, use_bin_type=True))


def decode_index(raw, what: str) -> PackIndex:
    """A pack index as :func:`encode_index` wrote it, checked; :class:`CorruptDataError` if not."""
    raw = bytes(raw)
    if raw[:1] != SEAL:
        raise CorruptDataError(f"{what} is not a sealed index")
    body = unseal(raw, what)
    try:
        record = unpack_untrusted(body)
        if not isinstance(record, dict) or record.get("format") != BUCKET_FORMAT:
            raise TypeError(f"not an index of bucket format {BUCKET_FORMAT}")
        kinds, ids, lengths = record["kinds"], record["ids"], record["lengths"]
        if not all(isinstance(v, bytes) for v in (kinds, ids, lengths)):
            raise TypeError("kinds, ids and lengths must be bytes")
    except (msgpack.UnpackException, ValueError, TypeError, KeyError) as exc:
        raise CorruptDataError(f"{what} is malformed: {exc}") from None
    n = len(kinds)
    if n > MAX_PACK_ENTRIES or len(ids) != n * ID_BYTES or len(lengths) != n * _U32.itemsize:
        raise CorruptDataError(f"{what} is malformed: {n} kinds, {len(ids)} id bytes, {len(lengths)} length bytes")
    if kinds.strip(bytes([CHUNK, PAGE])):
        raise CorruptDataError(f"{what} is malformed: an entry of unknown kind")
    sizes = np.frombuffer(lengths, dtype=_U32).astype(np.int64)
    if n and (sizes.min() < 1 or sizes.max() > MAX_VALUE_BYTES):
        raise CorruptDataError(f"{what} is malformed: an entry of {int(sizes.min())} or {int(sizes.max())} bytes")
    offsets = np.zeros(n, dtype=np.int64)
    if n:
        np.cumsum(sizes[:-1], out=offsets[1:])
    return PackIndex(kinds, ids, offsets, sizes, int(sizes.sum()))


@dataclass(frozen=True, slots=True)
class Pack:
    """A pack built by :class:`PackBuilder`: its object bytes, id and index bytes."""

    data: memoryview
    pack_id: str
    index: bytes


class PackBuilder:
    """Values copied into one buffer, then :meth:`finish`: index and trailer.

    Each value is copied once, by numpy, which lets go of the GIL for large copies: a
    training loop's thread keeps running while an uploader fills a pack.  ``capacity``
    (bytes) is allocated up front; the buffer grows if the values need more.
    """

    def __init__(self, capacity: int = 0) -> None:
        self._buffer = bytearray(capacity)
        self._used = 0
        self._kinds = bytearray()
        self._ids: list[bytes] = []
        self._lengths: list[int] = []

    def __len__(self) -> int:
        return len(self._lengths)

    @property
    def nbytes(self) -> int:
        return self._used

    def _room(self, size: int) -> None:
        if self._used + size > len(self._buffer):
            grown = bytearray(max(2 * len(self._buffer), self._used + size))
            _copy(grown, 0, memoryview(self._buffer)[: self._used])
            self._buffer = grown

    def add(self, kind: int, cid: bytes, value) -> None:
        view = memoryview(value).cast("B")
        if not 0 < len(view) <= MAX_VALUE_BYTES:
            raise CorruptDataError(f"a stored value of {len(view)} bytes cannot be packed")
        self._room(len(view))
        _copy(self._buffer, self._used, view)
        self._used += len(view)
        self._kinds.append(kind)
        self._ids.append(bytes(cid))
        self._lengths.append(len(view))

    def finish(self) -> Pack:
        index = encode_index(bytes(self._kinds), b"".join(self._ids), self._lengths)
        tail = index + struct.pack("<I", len(index)) + PACK_MAGIC
        self._room(len(tail))
        self._buffer[self._used : self._used + len(tail)] = tail
        data = memoryview(self._buffer)[: self._used + len(tail)]
        return Pack(data, chunk_id(data).hex(), index)


def _copy(target: bytearray, at: int, source: memoryview) -> None:
    """``target[at:at + len(source)] = source`` through numpy (no GIL held for the copy)."""
    if len(source):
        np.frombuffer(target, np.uint8, len(source), at)[:] = np.frombuffer(source, np.uint8)


def build_pack(entries: list[tuple[int, bytes, object]]) -> Pack:
    """A pack of ``(kind, id, stored value)`` entries."""
    builder = PackBuilder()
    for kind, cid, value in entries:
        builder.add(kind, cid, value)
    return builder.finish()


def trailer_index_bytes(tail: bytes, pack_bytes: int, what: str) -> int:
    """From a pack's last :data:`TRAILER_BYTES`, the length of the index before them."""
    if len(tail) != TRAILER_BYTES or tail[4:] != PACK_MAGIC:
        raise CorruptDataError(f"{what} does not end with a pack trailer")
    (length,) = struct.unpack("<I", tail[:4])
    if length + TRAILER_BYTES > pack_bytes:
        raise CorruptDataError(f"{what}: its trailer names an index of {length} bytes, longer than the pack")
    return length


# -- step records, tags, config --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepObject:
    """A decoded step record: the step's records as its local store holds them."""

    key: bytes
    manifest: bytes  #: the sealed manifest
    stepinfo: bytes  #: the sealed stepinfo record


def encode_step(key: bytes, manifest: bytes, stepinfo: bytes) -> bytes:
    body = {"format": BUCKET_FORMAT, "key": bytes(key), "manifest": bytes(manifest), "stepinfo": bytes(stepinfo)}
    return seal(msgpack.packb(body, use_bin_type=True))


def decode_step(raw, key: bytes, what: str) -> StepObject:
    """A step record, checked, that must be the record of step key ``key`` (its name's)."""
    record = _sealed_map(raw, what)
    found, manifest, stepinfo = record.get("key"), record.get("manifest"), record.get("stepinfo")
    if not (isinstance(found, bytes) and isinstance(manifest, bytes) and isinstance(stepinfo, bytes)):
        raise CorruptDataError(f"{what} is malformed: key, manifest and stepinfo must be bytes")
    if found != bytes(key):
        raise CorruptDataError(f"{what} holds the record of another step ({found.hex()})")
    return StepObject(found, manifest, stepinfo)


#: ranks of one multi-host step at most (part names hold 6 digits)
MAX_WORLD = 1 << 16
#: characters of an attempt name at most
MAX_ATTEMPT = 200


@dataclass(frozen=True, slots=True)
class PartObject:
    """A decoded part record: what rank ``rank`` of ``world`` saved as step ``key`` in ``attempt``."""

    key: bytes
    rank: int
    world: int
    attempt: str  #: the launch that saved it: only parts of one attempt are merged
    written: float  #: UNIX time the rank wrote it (bucket GC's grace period counts from it)
    manifest: bytes  #: the rank's sealed manifest, as its local store holds it
    stepinfo: bytes  #: the rank's sealed stepinfo record


def encode_part(part: PartObject) -> bytes:
    body = {
        "format": BUCKET_FORMAT,
        "key": bytes(part.key),
        "rank": part.rank,
        "world": part.world,
        "attempt": part.attempt,
        "written": float(part.written),
        "manifest": bytes(part.manifest),
        "stepinfo": bytes(part.stepinfo),
    }
    return seal(msgpack.packb(body, use_bin_type=True))


def decode_part(raw, key: bytes, rank: int, what: str) -> PartObject:
    """A part record, checked, that must be rank ``rank``'s part of step ``key`` (its name's)."""
    record = _sealed_map(raw, what)
    found, world, attempt, written = (record.get(k) for k in ("key", "world", "attempt", "written"))
    manifest, stepinfo, own = record.get("manifest"), record.get("stepinfo"), record.get("rank")
    if not (isinstance(found, bytes) and isinstance(manifest, bytes) and isinstance(stepinfo, bytes)):
        raise CorruptDataError(f"{what} is malformed: key, manifest and stepinfo must be bytes")
    if found != bytes(key) or own != rank or isinstance(own, bool):
        raise CorruptDataError(f"{what} holds the part of another step or rank ({found.hex()}, rank {own!r})")
    if isinstance(world, bool) or not isinstance(world, int) or not rank < world <= MAX_WORLD:
        raise CorruptDataError(f"{what} is malformed: world {world!r} for rank {rank}")
    if not isinstance(attempt, str) or not 0 < len(attempt) <= MAX_ATTEMPT:
        raise CorruptDataError(f"{what} is malformed: attempt {str(attempt)[:40]!r}")
    if isinstance(written, bool) or not isinstance(written, (int, float)) or not math.isfinite(written):
        raise CorruptDataError(f"{what} is malformed: time {written!r}")
    return PartObject(found, rank, world, attempt, float(written), manifest, stepinfo)


def encode_tag(key: bytes) -> bytes:
    return seal(msgpack.packb({"format": BUCKET_FORMAT, "key": bytes(key)}, use_bin_type=True))


def decode_tag(raw, what: str) -> bytes:
    key = _sealed_map(raw, what).get("key")
    if not isinstance(key, bytes):
        raise CorruptDataError(f"{what} is malformed: no step key")
    branch_of(key)
    return key


def encode_config(created: float, page_ids: int) -> bytes:
    body = {"castore_bucket": BUCKET_FORMAT, "hash": "blake3-256", "page_ids": page_ids, "created": float(created)}
    return seal(msgpack.packb(body, use_bin_type=True))


def decode_config(raw, what: str) -> dict:
    """The bucket's config; :class:`CorruptDataError` if damaged, and the caller refuses a
    ``castore_bucket`` newer than :data:`BUCKET_FORMAT`."""
    record = _sealed_map(raw, what, check_format=False)
    version = record.get("castore_bucket")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CorruptDataError(f"{what} is not a castore bucket config")
    if not isinstance(record.get("hash"), str) or not isinstance(record.get("page_ids"), int):
        raise CorruptDataError(f"{what} is malformed: hash and page_ids")
    return record


# -- locks -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lock:
    """A lock record: who holds it (``owner``: host, pid, a random tag) and until when."""

    kind: str  #: ``"upload"`` (shared) or ``"gc"`` (exclusive)
    owner: str
    created: float  #: UNIX time of the first take
    expires: float  #: UNIX time after which a lock not refreshed is stale


def encode_lock(lock: Lock) -> bytes:
    body = {"format": BUCKET_FORMAT, "kind": lock.kind, "owner": lock.owner, "created": lock.created}
    body["expires"] = lock.expires
    return seal(msgpack.packb(body, use_bin_type=True))


def decode_lock(raw, what: str) -> Lock:
    record = _sealed_map(raw, what)
    kind, owner, created, expires = (record.get(k) for k in ("kind", "owner", "created", "expires"))
    if kind not in ("upload", "gc") or not isinstance(owner, str):
        raise CorruptDataError(f"{what} is malformed: kind {kind!r}")
    times = []
    for value in (created, expires):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CorruptDataError(f"{what} is malformed: time {value!r}")
        times.append(float(value))
    return Lock(kind, owner, times[0], times[1])


def _sealed_map(raw, what: str, *, check_format: bool = True) -> dict:
    raw = bytes(raw)
    if raw[:1] != SEAL:
        raise CorruptDataError(f"{what} is not a sealed record")
    try:
        record = unpack_untrusted(unseal(raw, what))
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        raise CorruptDataError(f"{what} is malformed: {exc}") from None
    if not isinstance(record, dict):
        raise CorruptDataError(f"{what} is malformed: not a map")
    if check_format and record.get("format") != BUCKET_FORMAT:
        raise CorruptDataError(f"{what} is not a record of bucket format {BUCKET_FORMAT}")
    return record

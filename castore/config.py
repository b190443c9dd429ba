"""The store's config record (``meta/config``): format version, hash, chunk size."""

from __future__ import annotations

import time

import msgpack

from .chunker import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES
from .errors import FormatError
from .ids import HASH_NAME
from .manifest import PAGE_IDS, unpack_untrusted

STORE_FORMAT = 3  #: config ``format``: 2 adds trash, journal, stepinfo, tags; 3 adds branches (manifests stay 1)


def new_config(chunk_bytes: int) -> bytes:
    return msgpack.packb(
        {"format": STORE_FORMAT, "hash": HASH_NAME, "chunk_bytes": chunk_bytes,
         "page_ids": PAGE_IDS, "created": time.time()},
        use_bin_type=True,
    )


def upgraded(raw: bytes) -> bytes | None:
    """The config record at the current format, or None if it is current already."""
    config = msgpack.unpackb(bytes(raw), raw=False)
    if config.get("format", 0) >= STORE_FORMAT:
        return None
    config["format"] = STORE_FORMAT
    return msgpack.packb(config, use_bin_type=True)


def parse_config(raw: bytes, path: str) -> tuple[int, int]:
    """Check a store's config record; returns ``(chunk size, format)``."""
    try:
        config = unpack_untrusted(raw)
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        raise FormatError(f"{path}: config record is not valid msgpack: {exc}") from None
    if not isinstance(config, dict):
        raise FormatError(f"{path}: config record is not a map")
    version = config.get("format")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FormatError(f"{path}: config has no valid format version")
    if version > STORE_FORMAT:
        raise FormatError(
            f"{path} was written in castore format {version}; this castore reads up to "
            f"{STORE_FORMAT}: upgrade castore to open it"
        )
    if config.get("hash") != HASH_NAME:
        raise FormatError(f"{path}: unknown chunk hash {config.get('hash')!r}")
    chunk_bytes = config.get("chunk_bytes")
    if not isinstance(chunk_bytes, int) or not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise FormatError(f"{path}: config chunk_bytes {chunk_bytes!r} is out of range")
    if config.get("page_ids") != PAGE_IDS:
        raise FormatError(f"{path}: config page_ids {config.get('page_ids')!r} is not {PAGE_IDS}")
    return chunk_bytes, version

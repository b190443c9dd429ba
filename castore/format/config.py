"""The store's config record (``meta/config``): format version, hash, chunk size, the
compression of new chunks; and the one migration path from older formats (pure: bytes in,
bytes out)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import msgpack

from ..errors import FormatError, UsageError
from .chunker import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES
from .compression import Compression
from .ids import HASH_NAME
from .manifest import PAGE_IDS
from .schema import STORE_FORMAT
from .sealing import unpack_untrusted

CONFIG_KEY = b"config"  #: key of the config record in the ``meta`` table


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """What a store's config record says."""

    chunk_bytes: int  #: target chunk size of new leaves
    format: int  #: the store format version the record was written at
    compression: str = "none"  #: how new chunks are stored unless an open says otherwise


def new_config(chunk_bytes: int, compression: str = "auto") -> bytes:
    """The config record of a new store at the current format."""
    return msgpack.packb(
        {
            "format": STORE_FORMAT,
            "hash": HASH_NAME,
            "chunk_bytes": chunk_bytes,
            "page_ids": PAGE_IDS,
            "compression": Compression.parse(compression).name,
            "created": time.time(),
        },
        use_bin_type=True,
    )


def migrate(raw: bytes) -> bytes | None:
    """The config record brought to the current format, or None if it is current already.

    Formats 1 to 4 differ from 5 only in what the writer may put in the store from now on:
    format 2 added the trash, journal, stepinfo and tags tables (an engine creates the
    missing ones, :func:`castore.format.schema.missing_tables`), format 3 branch step keys,
    format 4 encoded chunk values, format 5 typed manifest nodes (``M``, ``X``).  No existing record is rewritten, so migration is the
    config record alone; a migrated store keeps storing chunks raw (``compression`` "none")
    unless an open asks for compression.
    """
    config = msgpack.unpackb(bytes(raw), raw=False)
    if config.get("format", 0) >= STORE_FORMAT:
        return None
    config["format"] = STORE_FORMAT
    config.setdefault("compression", "none")
    return msgpack.packb(config, use_bin_type=True)


def parse_config(raw: bytes, path: str) -> StoreConfig:
    """Check a store's config record; raises :class:`FormatError` for anything unknown."""
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
    compression = config.get("compression", "none")
    try:
        compression = Compression.parse(compression).name if isinstance(compression, str) else None
    except UsageError:
        compression = None
    if compression is None:
        raise FormatError(f"{path}: config compression {config.get('compression')!r} is unknown")
    return StoreConfig(chunk_bytes, version, compression)

"""Chunk ids: the BLAKE3-256 digest of a chunk's raw bytes; and chunk fingerprints, the
xxh3-128 change detectors that are never ids."""

from __future__ import annotations

import blake3
import xxhash

HASH_NAME = "blake3-256"
ID_BYTES = 32
FP_BYTES = 16


def fingerprint(view) -> bytes:
    """xxh3-128 of a chunk (~30 GB/s): detects a change, never names content."""
    return xxhash.xxh3_128_digest(view)


def chunk_id(data) -> bytes:
    """BLAKE3-256 of a C-contiguous bytes-like object; releases the GIL for large inputs."""
    return blake3.blake3(data).digest()


def short(cid: bytes) -> str:
    """Hex form of an id for messages (the full id: it is what users grep for)."""
    return bytes(cid).hex()


def split_ids(packed: bytes) -> list[bytes]:
    """Split a concatenation of ids into the ids; caller checks the length first."""
    return [packed[i : i + ID_BYTES] for i in range(0, len(packed), ID_BYTES)]

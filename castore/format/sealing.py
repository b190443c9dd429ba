"""Sealed records: a BLAKE3 digest in front of a record whose bytes are not content-addressed
(manifests, metrics), and the bounded msgpack decoder every untrusted record goes through."""

from __future__ import annotations

import msgpack

from ..errors import CorruptDataError
from .ids import ID_BYTES, chunk_id

SEAL = b"\xc1"  # a byte msgpack never uses: no bare record (formats 1-2) starts with it
SEAL_BYTES = 1 + ID_BYTES


def seal(body: bytes) -> bytes:
    """``SEAL + BLAKE3-256(body) + body``: a flipped bit anywhere is caught by :func:`unseal`."""
    return SEAL + chunk_id(body) + body


def unseal(data: bytes | memoryview, what: str) -> bytes:
    """The body of a sealed record, checked; a bare (older, unsealed) record as it is.

    Raises :class:`CorruptDataError` if the digest does not match.
    """
    data = bytes(data)
    if data[:1] != SEAL:
        return data
    body = data[SEAL_BYTES:]
    if len(data) < SEAL_BYTES or chunk_id(body) != data[1:SEAL_BYTES]:
        raise CorruptDataError(f"{what} bytes do not match their checksum (damaged on disk)")
    return body


def unpack_untrusted(data: bytes):
    """msgpack-decode an untrusted record, refusing what cannot be in ``data``.

    Every declared length is bounded by the bytes present (each element takes at least one
    byte), so a hostile header cannot make the decoder allocate more than the input's
    size; msgpack's own stack bounds nesting (1,024 levels).  Raises
    ``msgpack.UnpackException``, ``ValueError`` or ``TypeError``; callers wrap them.
    """
    data = bytes(data)
    n = len(data)
    return msgpack.unpackb(
        data,
        raw=False,
        strict_map_key=True,
        use_list=True,
        max_str_len=n,
        max_bin_len=n,
        max_array_len=n,
        max_map_len=n // 2,
        max_ext_len=n,
    )

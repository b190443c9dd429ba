"""Storage: the only package that touches the storage engines (and the only importer of ``lmdb``).

* :mod:`~castore.storage.base`: the :class:`Backend` / :class:`ReadTxn` / :class:`WriteTxn`
  contract every engine keeps;
* :mod:`~castore.storage.lmdb_engine` (the default, with ``lmdb_file`` and ``lock``) and
  :mod:`~castore.storage.memory` (``memory://name``): the engines;
* :mod:`~castore.storage.chunks`: the one chunk store through which every chunk and
  chunk-list page is read, written, sized and deleted, and the one walk from a blob to its
  chunk ids.
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlsplit

from ..errors import UnsupportedLocationError, UsageError
from .base import Backend, ReadTxn, WriteTxn
from .bucket import Bucket
from .chunks import ChunkStore, PageWalker
from .lmdb_engine import LmdbBackend
from .memory import SCHEME as MEMORY_SCHEME
from .memory import MemoryBackend
from .objects import open_object_store
from .remote import RemoteBackend

__all__ = [
    "Backend",
    "ChunkStore",
    "LmdbBackend",
    "MemoryBackend",
    "PageWalker",
    "ReadTxn",
    "WriteTxn",
    "check_location",
    "open_backend",
]


def open_backend(
    path: str | os.PathLike,
    *,
    create: bool = True,
    readonly: bool = False,
    allow_network_fs: bool = False,
    lock_timeout: float | None = None,
) -> Backend:
    """The engine for ``path``: ``memory://name`` in memory, a local directory in LMDB.

    Openers of one path in one process share one backend; pair each call with ``close()``.
    Any other URL (``gs://``, ``s3://``, ``https://``, ``file://``, ...) is refused with
    :class:`UnsupportedLocationError` before anything is created (see :func:`check_location`).
    """
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if text.startswith(MEMORY_SCHEME):
        return MemoryBackend.open(
            text[len(MEMORY_SCHEME) :], create=create, readonly=readonly, lock_timeout=lock_timeout
        )
    if re.match(r"(?i)s3://", text):
        return _open_bucket(text, create=create, readonly=readonly)
    check_location(text)
    return LmdbBackend.open(
        text, create=create, readonly=readonly, allow_network_fs=allow_network_fs, lock_timeout=lock_timeout
    )


def _open_bucket(url: str, *, create: bool, readonly: bool) -> Backend:
    """``s3://bucket/prefix`` as a read-only store (a bucket is written through a mirror)."""
    if not readonly:
        raise UsageError(
            f"{url}: a bucket opens read-only (Store(url, readonly=True)); to save to it, save to a local "
            f"store that mirrors it: Store(path, mirror={url!r}), or castore push STORE URL"
        )
    return RemoteBackend(Bucket(open_object_store(url), create=False))


#: ``scheme://``: a URL (RFC 3986 scheme), never a local path.  One letter is a Windows drive.
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+)://")
#: object-storage schemes also refused with one slash: ``pathlib.Path("gs://b/run")`` is
#: ``gs:/b/run``, and a folder ``gs:`` is never what the caller meant
_OBJECT_STORAGE = frozenset("s3 s3a s3n gs gcs az abfs abfss adl wasb wasbs hdfs oss r2 http https".split())
_ONE_SLASH = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+):/(?!/)")


def check_location(text: str) -> None:
    """Refuse a URL as a store location: :class:`UnsupportedLocationError`, nothing created.

    A local path may contain colons (``run:3/ckpt``, ``C:\\runs``); only ``scheme://...``
    (any scheme but ``memory``), and ``gs:/...``, ``s3:/...`` and the like (a URL whose
    slashes ``pathlib`` collapsed), are refused.  ``./gs:/x`` names a local folder ``gs:``.
    """
    match = _URL.match(text) or _ONE_SLASH.match(text)
    if match is None or (match.re is _ONE_SLASH and match["scheme"].lower() not in _OBJECT_STORAGE):
        return
    scheme = match["scheme"].lower()
    if scheme == "file":
        parts = urlsplit(text)
        local = unquote(parts.path) if parts.netloc in ("", "localhost") else None
        advice = (
            f"pass the local path {local!r} instead of a file:// URL"
            if local
            else "file:// URLs are not accepted; pass a local path"
        )
    elif scheme in _OBJECT_STORAGE:
        advice = (
            f"{scheme}:// is not supported; castore mirrors to S3-compatible object storage (s3://bucket/prefix, "
            "with AWS_ENDPOINT_URL for GCS's S3 API, Ceph, MinIO, ...): Store(path, mirror='s3://...')"
        )
    else:
        advice = f"{scheme}:// is not a supported location; pass a local directory (or memory://name for tests)"
    raise UnsupportedLocationError(text, scheme, advice)

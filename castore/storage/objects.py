"""Object storage: the narrow interface castore's remote tier talks to, and a memory engine.

:class:`ObjectStore` is to a bucket what :class:`~castore.storage.base.Backend` is to an
LMDB environment: a handful of operations whose docstrings carry the semantics (in the
manner of restic's ``Backend`` and kopia's ``blob.Storage``), kept narrow so that any S3
server, a test double or another cloud can stand behind it.  What an object store does
*not* have shapes everything built on it: no rename, no transaction over several objects,
no append.  The one atomic primitive beyond whole-object puts is :meth:`put_if_absent`
(S3's conditional create, ``If-None-Match: *``).

Implementations: :class:`MemoryObjectStore` (here, for fast tests) and
:class:`~castore.storage.s3.S3ObjectStore` (``s3://bucket/prefix``, the ``castore[s3]``
extra).  :func:`open_object_store` picks one from a URL.  ``tests/storage/
test_objects_contract.py`` is the contract suite both pass.

Keys are ``/``-separated paths of segments made of ``A-Z a-z 0-9 . _ = -`` (not ``.`` or
``..``), at most :data:`MAX_KEY_BYTES` long: castore names its own objects, so a narrow
alphabet costs nothing and means no percent-encoding differences between servers and
clients.  Anything else is a :class:`~castore.errors.UsageError`.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

from ..errors import RemoteNotFoundError, UsageError

__all__ = ["MAX_KEY_BYTES", "MemoryObjectStore", "ObjectStore", "check_key", "check_prefix", "open_object_store"]

#: S3 allows 1,024 bytes of key, the URL's prefix included; castore keeps well inside
MAX_KEY_BYTES = 900
_SEGMENT = re.compile(r"[A-Za-z0-9._=-]+")


def check_key(key: str) -> str:
    """``key`` if it is a valid object key, else :class:`UsageError` naming it."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_BYTES:
        raise UsageError(f"object key {key!r}: must be a non-empty str of at most {MAX_KEY_BYTES} characters")
    for segment in key.split("/"):
        if segment in (".", "..") or not _SEGMENT.fullmatch(segment):
            raise UsageError(
                f"object key {key!r}: segments between '/' must be non-empty, of A-Z a-z 0-9 . _ = -, "
                "and not '.' or '..'"
            )
    return key


def check_prefix(prefix: str) -> str:
    """``prefix`` without a trailing ``/`` if it is ``""`` or a valid key, else :class:`UsageError`."""
    prefix = prefix.rstrip("/") if isinstance(prefix, str) else prefix
    return "" if prefix == "" else check_key(prefix)


@runtime_checkable
class ObjectStore(Protocol):
    """A flat namespace of immutable-until-replaced objects (``key -> bytes``).

    Guarantees every implementation keeps (the contract suite checks them):

    * **Whole objects.**  A put is atomic: readers see the old object or the new one in
      full, never part of one; a failed put leaves the old object (or none).
    * **Read after write.**  Once a put or delete has returned, every later ``get``,
      ``head`` and ``list`` in any process sees it (S3 has been strongly consistent since
      2020; so is Ceph RGW).
    * **Thread-safe.**  Every method may be called from many threads at once; that is how
      callers get concurrency (the S3 store keeps a connection pool).
    * **Typed failures.**  A missing object is :class:`~castore.errors.RemoteNotFoundError`
      (a ``KeyError``); everything else that goes wrong remotely is a
      :class:`~castore.errors.RemoteError` subclass (bucket missing, permission, server
      unreachable after retries).  Bad keys are :class:`~castore.errors.UsageError`.
      No message contains credentials.
    * **Retries are inside.**  An implementation that talks to a network retries transient
      failures itself (bounded; see its policy): an error that reaches the caller is final.
      A retried request may have taken effect before it failed, which matters only for
      :meth:`put_if_absent` (see there).
    """

    @property
    def url(self) -> str:
        """Where the objects live (``s3://bucket/prefix``, ``memory://name``); no credentials."""
        ...

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` as ``key``, replacing any object there (atomically, see above)."""
        ...

    def put_if_absent(self, key: str, data: bytes | bytearray | memoryview) -> bool:
        """Store ``data`` as ``key`` only if no object is there: True if this call created it.

        False means an object already existed and was left unchanged.  Atomic across
        processes and hosts (S3: ``If-None-Match: *``, 412 when the key exists), so it can
        decide one winner among many writers.  Caveat: if a retried attempt of this very
        call had landed before the retry, the retry sees the object and returns False;
        callers that must tell "someone else" from "my earlier attempt" compare the
        content (``get``), which for content-addressed objects is the same thing.
        """
        ...

    def get(self, key: str) -> bytes:
        """The whole object; :class:`~castore.errors.RemoteNotFoundError` if there is none."""
        ...

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """``get(key)[start:start + length]`` without fetching the rest.

        Shorter than ``length`` when the object ends first, empty when ``start`` is at or
        past its end; :class:`~castore.errors.RemoteNotFoundError` if there is no object.
        ``start`` and ``length`` must be >= 0 (:class:`UsageError` otherwise).
        """
        ...

    def head(self, key: str) -> int | None:
        """The object's size in bytes, or None if there is none (never raises for absence)."""
        ...

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """``(key, size)`` of every object under the folder ``prefix``, in ascending key order.

        ``prefix`` names whole segments: ``list("packs")`` yields ``packs/a`` and
        ``packs/x/y`` but not ``packs`` itself nor ``packsx``; ``""`` lists everything.
        Pages are fetched lazily as the iterator advances: objects put or deleted while it
        runs may or may not appear, everything put before the call does.
        """
        ...

    def delete(self, keys: Iterable[str]) -> None:
        """Delete every one of ``keys``; keys with no object are not an error (idempotent).

        Not atomic as a whole: if it raises, some of the keys may be gone already.
        """
        ...


class MemoryObjectStore:
    """An :class:`ObjectStore` in a dict, for tests: same semantics, no network, no retries.

    Data is copied in and out (a caller changing its buffer after ``put`` changes nothing).
    """

    def __init__(self, name: str = "objects"):
        self._name = name
        self._objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryObjectStore({self._name!r}, {len(self._objects)} objects)"

    @property
    def url(self) -> str:
        return f"memory://{self._name}"

    def _missing(self, key: str) -> RemoteNotFoundError:
        return RemoteNotFoundError(f"no object {key!r} in {self.url}", url=f"{self.url}/{key}", status=404)

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        value = bytes(data)
        with self._lock:
            self._objects[check_key(key)] = value

    def put_if_absent(self, key: str, data: bytes | bytearray | memoryview) -> bool:
        value = bytes(data)
        with self._lock:
            if check_key(key) in self._objects:
                return False
            self._objects[key] = value
            return True

    def get(self, key: str) -> bytes:
        with self._lock:
            value = self._objects.get(check_key(key))
        if value is None:
            raise self._missing(key)
        return value

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise UsageError(f"get_range({key!r}, {start}, {length}): start and length must be >= 0")
        return self.get(key)[start : start + length]

    def head(self, key: str) -> int | None:
        with self._lock:
            value = self._objects.get(check_key(key))
        return None if value is None else len(value)

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        folder = check_prefix(prefix)
        start = folder + "/" if folder else ""
        with self._lock:
            found = sorted((k, len(v)) for k, v in self._objects.items() if k.startswith(start))
        return iter(found)

    def delete(self, keys: Iterable[str]) -> None:
        wanted = [check_key(k) for k in ([keys] if isinstance(keys, str) else keys)]
        with self._lock:
            for key in wanted:
                self._objects.pop(key, None)


def open_object_store(url: str, **options) -> ObjectStore:
    """The object store at ``url``: ``s3://bucket/prefix`` (needs ``castore[s3]``).

    ``options`` go to :meth:`castore.storage.s3.S3ObjectStore.from_url` (``retry``,
    ``endpoint``, ...).  Raises :class:`UsageError` for another scheme or a missing extra,
    and whatever opening the store raises (:class:`~castore.errors.RemoteBucketNotFoundError`,
    :class:`~castore.errors.RemotePermissionError`, ...).
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme != "s3":
        raise UsageError(f"object store {url!r}: only s3://bucket/prefix URLs are supported")
    try:
        # Imported here, not at the top: obstore is an optional extra, and castore without
        # it must still import (every other store kind works without it).
        from .s3 import S3ObjectStore
    except ImportError as e:
        raise UsageError(f"object store {url!r} needs the s3 extra: pip install 'castore[s3]' ({e})") from None
    return S3ObjectStore.from_url(url, **options)

"""The S3 :class:`~castore.storage.objects.ObjectStore`: ``s3://bucket/prefix`` through obstore.

Why obstore (Rust's ``object_store`` crate) rather than boto3: measured against a real
Ceph RADOS Gateway (``bench/s3_clients.py``, table in ``docs/benchmarks.md``) it put and got
1.1-2x faster from threads, it releases the GIL for the whole request, and its retry loop
(exponential backoff with jitter on 5xx, throttling and connection errors, bounded by a
count and a deadline) is configurable per store; boto3 stays the baseline the benchmarks
compare against.

Configuration follows the AWS conventions: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``,
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (a non-AWS server: Ceph, MinIO, ...);
arguments override them.  Requests use path-style addressing (``endpoint/bucket/key``),
which every S3 server accepts and which IP-address endpoints need.  Without keys in the
environment, obstore's own chain applies (web identity, instance metadata); the shared
``~/.aws`` files are not read.

Errors: obstore's exceptions become :mod:`castore.errors` ``Remote*`` errors, raised
``from None`` with a message built here (the operation, the ``s3://`` URL, the HTTP status
and S3 error code, what to do), scrubbed of the credentials in any case.  obstore tells
some failures only in its message text (a missing bucket is a 404 like a missing key; a
416 is "generic"), so :func:`_status` and :func:`_code` read the status and the S3
``<Code>`` from it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import obstore
import obstore.exceptions as obx
from obstore.store import S3Store

from ..errors import (
    RemoteBucketNotFoundError,
    RemoteError,
    RemoteNotFoundError,
    RemotePermissionError,
    RemoteUnavailableError,
    UsageError,
)
from .objects import check_key, check_prefix

if TYPE_CHECKING:  # obstore's config types exist for the type checker only
    from obstore.store import S3Config

__all__ = ["RetryPolicy", "S3ObjectStore", "parse_s3_url"]

log = logging.getLogger(__name__)

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How an :class:`S3ObjectStore` retries and times out (obstore's retry loop does it).

    Retried: 5xx replies (S3's ``503 SlowDown`` throttling included), connection errors,
    dropped connections, and timeouts of read-only requests; each retry waits a random time
    up to ``initial_backoff * base**n`` (capped at ``max_backoff``).  No request is retried
    more than ``max_retries`` times nor after ``deadline`` seconds from its first attempt;
    then :class:`~castore.errors.RemoteUnavailableError`.  The defaults give up on an
    unreachable server after about 20 s.
    """

    #: retries after the first attempt (0: none)
    max_retries: int = 8
    #: seconds: the first backoff's upper bound
    initial_backoff: float = 0.1
    #: seconds: no backoff longer than this
    max_backoff: float = 5.0
    #: growth of the backoff per retry
    base: float = 2.0
    #: seconds from a request's first attempt after which it is not retried again
    deadline: float = 60.0
    #: seconds to establish a connection
    connect_timeout: float = 5.0
    #: seconds for one attempt of a request, its body included
    request_timeout: float = 300.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or min(self.initial_backoff, self.max_backoff, self.deadline) < 0 or self.base < 1:
            raise UsageError(f"{self}: retries and times must be >= 0 and base >= 1")
        if min(self.connect_timeout, self.request_timeout) <= 0:
            raise UsageError(f"{self}: timeouts must be > 0")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of ``s3://bucket[/prefix]``; :class:`UsageError` when malformed."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise UsageError(f"{url!r} is not an s3://bucket/prefix URL")
    if not _BUCKET.fullmatch(parts.netloc) or ".." in parts.netloc:
        raise UsageError(f"{url!r}: {parts.netloc!r} is not a valid bucket name (3-63 of a-z 0-9 . -)")
    return parts.netloc, check_prefix(parts.path.strip("/"))


def _status(message: str) -> int | None:
    found = _STATUS.search(message)
    return int(found.group(1)) if found else None


def _code(message: str) -> str | None:
    found = _CODE.search(message)
    return found.group(1) if found else None


class S3ObjectStore:
    """An :class:`~castore.storage.objects.ObjectStore` on one S3 bucket under one prefix.

    Build it with :meth:`from_url`, which checks that the bucket exists and the credentials
    work.  Large puts go up as multipart uploads of ``part_bytes`` parts, ``part_concurrency``
    at a time; :meth:`put_if_absent` is always one request (S3 has no conditional multipart
    complete here), so it takes objects up to 5 GiB.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        retry: RetryPolicy | None = None,
        part_bytes: int = 8 << 20,
        part_concurrency: int = 8,
    ):
        env = os.environ
        endpoint = endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        region = region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
        access_key_id = access_key_id or env.get("AWS_ACCESS_KEY_ID") or None
        secret_access_key = secret_access_key or env.get("AWS_SECRET_ACCESS_KEY") or None
        session_token = session_token or env.get("AWS_SESSION_TOKEN") or None
        if part_bytes < 5 << 20 or part_concurrency < 1:
            raise UsageError("part_bytes must be >= 5 MiB (S3's smallest part) and part_concurrency >= 1")
        self.bucket, self.prefix = bucket, check_prefix(prefix)
        self.endpoint, self.region = endpoint, region
        self.retry = retry or RetryPolicy()
        self.part_bytes, self.part_concurrency = part_bytes, part_concurrency
        #: every credential string, to scrub from any text that leaves this object
        self._secrets = tuple(s for s in (access_key_id, secret_access_key, session_token) if s)
        config: S3Config = {"region": region, "virtual_hosted_style_request": False}
        if endpoint:
            config["endpoint"] = endpoint
        if access_key_id:
            config["access_key_id"] = access_key_id
        if secret_access_key:
            config["secret_access_key"] = secret_access_key
        if session_token:
            config["session_token"] = session_token
        r = self.retry
        self._store = S3Store(
            bucket,
            prefix=self.prefix or None,
            config=config,
            client_options={
                "allow_http": bool(endpoint and endpoint.lower().startswith("http://")),
                "connect_timeout": timedelta(seconds=r.connect_timeout),
                "timeout": timedelta(seconds=r.request_timeout),
            },
            retry_config={
                "max_retries": r.max_retries,
                "retry_timeout": timedelta(seconds=r.deadline),
                "backoff": {
                    "init_backoff": timedelta(seconds=r.initial_backoff),
                    "max_backoff": timedelta(seconds=r.max_backoff),
                    "base": r.base,
                },
            },
        )

    @classmethod
    def from_url(cls, url: str, *, check: bool = True, **options) -> S3ObjectStore:
        """The store at ``s3://bucket/prefix``; ``options`` as for the constructor.

        With ``check`` (the default) one listing request proves the bucket exists and the
        credentials are accepted: :class:`~castore.errors.RemoteBucketNotFoundError`,
        :class:`~castore.errors.RemotePermissionError` or
        :class:`~castore.errors.RemoteUnavailableError` otherwise.
        """
        bucket, prefix = parse_s3_url(url)
        store = cls(bucket, prefix, **options)
        if check:
            store.check()
        return store

    def __repr__(self) -> str:
        where = f" at {self.endpoint}" if self.endpoint else ""
        return f"S3ObjectStore({self.url!r}{where})"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def check(self) -> None:
        """Raise the ``Remote*`` error that would stop every request (no bucket, bad keys, no server)."""
        try:
            stream = obstore.list(self._store, None, chunk_size=1)
            next(iter(stream), None)
        except Exception as e:
            raise self._error(e, "list", None) from None

    # -- the protocol ------------------------------------------------------------------------

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        check_key(key)
        try:
            obstore.put(
                self._store,
                key,
                memoryview(data),
                use_multipart=len(data) > self.part_bytes,
                chunk_size=self.part_bytes,
                max_concurrency=self.part_concurrency,
            )
        except Exception as e:
            raise self._error(e, "put", key) from None

    def put_if_absent(self, key: str, data: bytes | bytearray | memoryview) -> bool:
        check_key(key)
        try:
            obstore.put(self._store, key, memoryview(data), mode="create", use_multipart=False)
        except (obx.AlreadyExistsError, obx.PreconditionError):
            return False
        except Exception as e:
            raise self._error(e, "put_if_absent", key) from None
        return True

    def get(self, key: str) -> bytes:
        check_key(key)
        try:
            return bytes(obstore.get(self._store, key).bytes())
        except Exception as e:
            raise self._error(e, "get", key) from None

    def get_range(self, key: str, start: int, length: int) -> bytes:
        check_key(key)
        if start < 0 or length < 0:
            raise UsageError(f"get_range({key!r}, {start}, {length}): start and length must be >= 0")
        if length == 0:  # S3 has no empty range; absence must still raise
            if self.head(key) is None:
                raise self._missing(key)
            return b""
        try:
            return bytes(obstore.get_range(self._store, key, start=start, length=length))
        except Exception as e:
            if _status(str(e)) == 416:  # start at or past the end of an object that exists
                return b""
            raise self._error(e, "get_range", key) from None

    def head(self, key: str) -> int | None:
        check_key(key)
        try:
            return int(obstore.head(self._store, key)["size"])
        except FileNotFoundError:
            return None
        except Exception as e:
            raise self._error(e, "head", key) from None

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        folder = check_prefix(prefix)  # checked now, not at the first next()
        return self._list(folder)

    def _list(self, folder: str) -> Iterator[tuple[str, int]]:
        try:
            for batch in obstore.list(self._store, folder or None, chunk_size=1000):
                for meta in batch:
                    yield meta["path"], int(meta["size"])
        except Exception as e:
            raise self._error(e, "list", folder or None) from None

    def delete(self, keys: Iterable[str]) -> None:
        wanted = [check_key(k) for k in ([keys] if isinstance(keys, str) else keys)]
        if not wanted:
            return
        try:
            obstore.delete(self._store, wanted)  # DeleteObjects, 1,000 keys a request
        except Exception as e:
            raise self._error(e, "delete", wanted[0] if len(wanted) == 1 else None) from None

    # -- errors ------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _key_url(self, key: str | None) -> str:
        return self.url if key is None else f"{self.url.rstrip('/')}/{key}"

    def _missing(self, key: str) -> RemoteNotFoundError:
        return RemoteNotFoundError(f"no object {self._key_url(key)}", url=self._key_url(key), status=404)

    def _error(self, e: BaseException, op: str, key: str | None) -> Exception:
        """The castore error for obstore's ``e``; its text scrubbed and logged at debug level."""
        if isinstance(e, UsageError | RemoteError):
            return e
        text = self._scrub(str(e))
        status, code = _status(text), _code(text)
        url = self._key_url(key)
        where = f"{op} {url}" + (f" at {self.endpoint}" if self.endpoint else "")
        reply = f"HTTP {status}" + (f" {code}" if code else "") if status else None
        log.debug("%s failed: %s: %s", where, type(e).__name__, text)
        kw: dict[str, Any] = {"url": url, "status": status, "code": code}
        # a missing bucket is a 404 like a missing key; only the body's code tells, and a put
        # or a delete can meet no other 404
        bucket_404 = op in ("put", "put_if_absent", "delete") and isinstance(e, FileNotFoundError)
        if code == "NoSuchBucket" or bucket_404:
            return RemoteBucketNotFoundError(
                f"{where}: bucket {self.bucket!r} does not exist ({reply or 'not found'}); create it or fix the URL",
                **kw,
            )
        if isinstance(e, FileNotFoundError):
            return RemoteNotFoundError(f"{where}: no such object ({reply or 'not found'})", **kw)
        if isinstance(e, obx.PermissionDeniedError | obx.UnauthenticatedError) or status in (401, 403):
            return RemotePermissionError(
                f"{where}: refused ({reply or type(e).__name__}); check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY and the user's rights on the bucket",
                **kw,
            )
        if isinstance(e, obx.InvalidPathError):
            return UsageError(f"{where}: invalid object path: {text.splitlines()[0] if text else e!r}")
        if status is None or status >= 500:  # no reply at all, or 5xx: obstore has retried
            first = text.splitlines()[0] if text else type(e).__name__
            return RemoteUnavailableError(
                f"{where}: server unavailable after the allowed retries ({reply or 'no reply'}): {first}", **kw
            )
        return RemoteError(f"{where}: failed ({reply}): {text.splitlines()[0]}", **kw)

"""Faults of the S3 object store: wrong credentials, a missing bucket, a gateway that goes
away and comes back (the real RADOS Gateway of ``s3_server``), and a server that throttles
(a local stub that answers ``503 SlowDown``, since a real gateway cannot be made to).

Every wait is bounded: the stores here retry with a short :class:`RetryPolicy`, and each
test states the time it may take.
"""

from __future__ import annotations

import concurrent.futures
import http.server
import logging
import threading
import time
import traceback

import pytest

import castore
from castore.storage.s3 import RetryPolicy, S3ObjectStore

#: a policy that gives up on an unreachable server in well under two seconds
FAST = RetryPolicy(max_retries=3, initial_backoff=0.05, max_backoff=0.2, deadline=5.0, connect_timeout=1.0)


def store_for(server, bucket, **overrides) -> S3ObjectStore:
    options = dict(
        endpoint=server.endpoint,
        access_key_id=server.access_key,
        secret_access_key=server.secret_key,
        retry=FAST,
    )
    options.update(overrides)
    return S3ObjectStore.from_url(f"s3://{bucket}/p", **options)


def every_text(error: BaseException, store, caplog) -> str:
    """All the text a user could see: the message, repr, traceback, the store's repr, the logs."""
    return "\n".join(
        [str(error), repr(error), "".join(traceback.format_exception(error)), repr(store), caplog.text]
        + [r.getMessage() for r in caplog.records]
    )


@pytest.mark.parametrize("wrong", ["secret", "access key"])
def test_wrong_credentials_are_a_permission_error_without_the_secret(s3_server, bucket, caplog, wrong):
    caplog.set_level(logging.DEBUG)
    secret = "WrongSecret0123456789abcdefWRONG" if wrong == "secret" else s3_server.secret_key
    access = s3_server.access_key if wrong == "secret" else "CASTORENOSUCHUSER000"
    with pytest.raises(castore.RemotePermissionError) as info:
        store_for(s3_server, bucket, access_key_id=access, secret_access_key=secret)
    assert info.value.status == 403 and isinstance(info.value, PermissionError)
    assert "AWS_SECRET_ACCESS_KEY" in str(info.value)  # says what to check
    unchecked = store_for(s3_server, bucket, access_key_id=access, secret_access_key=secret, check=False)
    for call in (lambda: unchecked.get("k"), lambda: unchecked.put("k", b"v"), lambda: list(unchecked.list())):
        with pytest.raises(castore.RemotePermissionError) as info:
            call()
        text = every_text(info.value, unchecked, caplog)
        assert secret not in text and s3_server.secret_key not in text


def test_the_secret_never_appears_in_errors_or_logs_of_a_working_store(s3_server, bucket, caplog):
    caplog.set_level(logging.DEBUG)
    store = store_for(s3_server, bucket)
    store.put("k", b"v")
    with pytest.raises(castore.RemoteNotFoundError) as info:
        store.get("missing")
    assert s3_server.secret_key not in every_text(info.value, store, caplog)


def test_a_missing_bucket_is_named(s3_server):
    with pytest.raises(castore.RemoteBucketNotFoundError) as info:
        store_for(s3_server, "no-such-bucket-here")
    assert "'no-such-bucket-here' does not exist" in str(info.value) and info.value.code == "NoSuchBucket"
    unchecked = store_for(s3_server, "no-such-bucket-here", check=False)
    for call in (
        lambda: unchecked.get("k"),  # a 404 like a missing key's: told apart by NoSuchBucket
        lambda: unchecked.put("k", b"v"),
        lambda: unchecked.put_if_absent("k", b"v"),
        lambda: list(unchecked.list()),
        lambda: unchecked.delete(["k"]),
    ):
        with pytest.raises(castore.RemoteBucketNotFoundError):
            call()


def test_bad_urls_are_usage_errors():
    for url in ["s3://", "s3://B_ad/x", "gs://b/x", "s3://ok-bucket/a//b", "s3://ok-bucket/x?y=1"]:
        with pytest.raises(castore.UsageError):
            castore.storage.objects.open_object_store(url)


def gateway_answers(server) -> bool:
    import rgw

    return rgw._http_ok(server.endpoint)


@pytest.fixture
def restores_the_gateway(s3_server):
    """Whatever a test did to the shared gateway, it answers again afterwards."""
    yield s3_server
    if not gateway_answers(s3_server):
        s3_server.start_gateway()


def test_gateway_stopped_then_restarted(s3_server, bucket, restores_the_gateway):
    store = store_for(s3_server, bucket)
    keys = [f"k/{i:04d}" for i in range(1001)]  # two listing pages
    store.put("before", b"kept")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: store.put(key, b""), keys))
    listing = store.list("k")
    first = [next(listing) for _ in range(1000)]  # the first page is read; the second is not yet
    s3_server.stop_gateway()
    t0 = time.monotonic()
    with pytest.raises(castore.RemoteUnavailableError) as info:
        next(listing)  # mid-listing: the second page's request finds no server
    for call in (lambda: store.get("before"), lambda: store.put("during", b"x"), lambda: store.head("before")):
        with pytest.raises(castore.RemoteUnavailableError):
            call()
    took = time.monotonic() - t0
    assert took < 4 * FAST.deadline, f"the retries took {took:.1f} s"
    assert isinstance(info.value, ConnectionError) and info.value.status is None
    assert s3_server.secret_key not in str(info.value)
    s3_server.start_gateway()
    assert store.get("before") == b"kept"  # the same store object: it reconnects
    assert [k for k, _ in store.list("k")] == keys and first[0][0] == keys[0]
    assert store.head("during") is None  # a put that failed left nothing


class Stub(http.server.BaseHTTPRequestHandler):
    """Answers ``503 SlowDown`` to the first ``server.failures`` requests, then a 5-byte object."""

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        server = self.server
        server.requests += 1  # type: ignore[attr-defined]
        if server.requests <= server.failures:  # type: ignore[attr-defined]
            body = b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>slow down</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
        else:
            body = b"hello"
            self.send_response(200)
            self.send_header("ETag", '"5d41402abc4b2a76b9719d911017c592"')
            self.send_header("Last-Modified", "Wed, 02 Dec 2026 00:00:00 GMT")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def throttling_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    server.requests, server.failures = 0, 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def stub_store(server, retry: RetryPolicy) -> S3ObjectStore:
    return S3ObjectStore(
        "stub-bucket",
        endpoint=f"http://127.0.0.1:{server.server_address[1]}",
        access_key_id="STUBKEY",
        secret_access_key="stub-secret-0123456789",
        retry=retry,
    )


def test_throttling_is_retried_with_backoff(throttling_server):
    throttling_server.failures = 2
    assert stub_store(throttling_server, FAST).get("k") == b"hello"
    assert throttling_server.requests == 3


def test_throttling_gives_up_after_max_retries(throttling_server):
    throttling_server.failures = 100
    t0 = time.monotonic()
    with pytest.raises(castore.RemoteUnavailableError) as info:
        stub_store(throttling_server, FAST).get("k")
    assert throttling_server.requests == FAST.max_retries + 1
    assert time.monotonic() - t0 < FAST.deadline
    assert info.value.status == 503 and "HTTP 503" in str(info.value)
    assert "stub-secret" not in str(info.value)


def test_no_retries_when_told(throttling_server):
    throttling_server.failures = 100
    with pytest.raises(castore.RemoteUnavailableError):
        stub_store(throttling_server, RetryPolicy(max_retries=0)).get("k")
    assert throttling_server.requests == 1


def test_retry_policy_is_checked():
    with pytest.raises(castore.UsageError):
        RetryPolicy(max_retries=-1)
    with pytest.raises(castore.UsageError):
        RetryPolicy(connect_timeout=0)

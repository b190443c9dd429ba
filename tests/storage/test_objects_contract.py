"""The object-store contract (``castore/storage/objects.py``), checked against every implementation.

As ``test_backend_contract.py`` does for the engines (zarr's ``StoreTests`` pattern):
:class:`ObjectStoreContract` holds the tests and the ``objects`` fixture hook; each
implementation subclasses it once.  :class:`TestMemoryObjectStore` runs in microseconds;
:class:`TestS3ObjectStore` runs the same tests against the real RADOS Gateway of the
``s3_server`` fixture, a fresh bucket per test (``bucket``), under a prefix so that the
prefix handling is exercised too.
"""

from __future__ import annotations

import concurrent.futures
import os

import pytest

import castore
from castore.storage.objects import MemoryObjectStore, ObjectStore, open_object_store


class ObjectStoreContract:
    """The tests every :class:`ObjectStore` passes; subclasses provide the ``objects`` fixture."""

    @pytest.fixture
    def objects(self) -> ObjectStore:
        raise NotImplementedError

    def test_is_an_object_store(self, objects):
        assert isinstance(objects, ObjectStore)
        assert "://" in objects.url

    def test_put_get_head(self, objects):
        objects.put("a/b", b"12345")
        assert objects.get("a/b") == b"12345"
        assert objects.head("a/b") == 5
        assert isinstance(objects.get("a/b"), bytes)

    def test_put_replaces_whole_object(self, objects):
        objects.put("k", b"a long first value")
        objects.put("k", bytearray(b"short"))
        assert objects.get("k") == b"short"
        assert objects.head("k") == 5

    def test_empty_object_is_an_object(self, objects):
        objects.put("empty", b"")
        assert objects.get("empty") == b""
        assert objects.head("empty") == 0
        assert list(objects.list()) == [("empty", 0)]

    def test_put_takes_any_buffer_and_copies_it(self, objects):
        data = bytearray(b"abcdef")
        objects.put("buf", memoryview(data)[1:4])
        data[:] = b"zzzzzz"
        assert objects.get("buf") == b"bcd"

    def test_missing_object(self, objects):
        with pytest.raises(castore.RemoteNotFoundError) as info:
            objects.get("nope/x")
        assert isinstance(info.value, KeyError) and isinstance(info.value, castore.RemoteError)
        assert "nope/x" in str(info.value) and info.value.url.endswith("nope/x")
        assert objects.head("nope/x") is None
        with pytest.raises(castore.RemoteNotFoundError):
            objects.get_range("nope/x", 0, 10)
        with pytest.raises(castore.RemoteNotFoundError):
            objects.get_range("nope/x", 0, 0)

    def test_put_if_absent_creates_once(self, objects):
        assert objects.put_if_absent("once", b"first") is True
        assert objects.put_if_absent("once", b"second") is False
        assert objects.get("once") == b"first"
        objects.delete(["once"])
        assert objects.put_if_absent("once", b"third") is True
        assert objects.get("once") == b"third"

    def test_put_if_absent_has_one_winner_among_threads(self, objects):
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            won = list(pool.map(lambda i: objects.put_if_absent("race", b"%d" % i), range(16)))
        assert won.count(True) == 1
        assert objects.get("race") == b"%d" % won.index(True)

    def test_get_range(self, objects):
        data = bytes(range(200))
        objects.put("r", data)
        for start, length in [(0, 200), (0, 1), (10, 20), (199, 1), (150, 100), (200, 5), (300, 5), (5, 0), (0, 0)]:
            assert objects.get_range("r", start, length) == data[start : start + length], (start, length)
        with pytest.raises(castore.UsageError):
            objects.get_range("r", -1, 5)
        with pytest.raises(castore.UsageError):
            objects.get_range("r", 0, -1)

    def test_list_is_sorted_and_by_whole_segments(self, objects):
        for key in ["packs/b", "packs/a", "packs/x/y", "packsx", "packs-old/z", "steps/1", "top"]:
            objects.put(key, key.encode())
        assert list(objects.list("packs")) == [("packs/a", 7), ("packs/b", 7), ("packs/x/y", 9)]
        assert list(objects.list("packs/")) == list(objects.list("packs"))
        assert [k for k, _ in objects.list()] == sorted(
            ["packs/b", "packs/a", "packs/x/y", "packsx", "packs-old/z", "steps/1", "top"]
        )
        assert list(objects.list("missing")) == []
        assert list(objects.list("top")) == []  # an object is not a folder

    def test_delete_is_idempotent(self, objects):
        objects.put("d/1", b"1")
        objects.put("d/2", b"2")
        objects.delete(["d/1", "d/never"])
        assert objects.head("d/1") is None and objects.head("d/2") == 1
        objects.delete("d/2")  # one key as a str is one key, not its characters
        objects.delete([])
        assert list(objects.list("d")) == []

    def test_delete_many(self, objects):
        keys = [f"many/{i:04d}" for i in range(1100)]  # more than one DeleteObjects request
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda k: objects.put(k, b"x"), keys))
        listed = list(objects.list("many"))
        assert [k for k, _ in listed] == keys  # more than one listing page, in order
        objects.delete(keys)
        assert list(objects.list("many")) == []

    @pytest.mark.parametrize("key", ["", "/a", "a/", "a//b", "a/../b", ".", "a b", "a\nb", "ü", "a?b", "x" * 901])
    def test_bad_keys_are_usage_errors(self, objects, key):
        for call in (
            lambda: objects.put(key, b"x"),
            lambda: objects.put_if_absent(key, b"x"),
            lambda: objects.get(key),
            lambda: objects.get_range(key, 0, 1),
            lambda: objects.head(key),
            lambda: objects.delete([key]),
        ):
            with pytest.raises(castore.UsageError):
                call()

    def test_bad_list_prefix_is_a_usage_error_at_once(self, objects):
        with pytest.raises(castore.UsageError):
            objects.list("a//b")

    def test_big_object_round_trip(self, objects):
        data = os.urandom((20 << 20) + 12345)  # past the S3 store's multipart threshold
        objects.put("big", data)
        assert objects.head("big") == len(data)
        assert objects.get("big") == data
        assert objects.get_range("big", 9 << 20, 100) == data[9 << 20 : (9 << 20) + 100]


class TestMemoryObjectStore(ObjectStoreContract):
    @pytest.fixture
    def objects(self):
        return MemoryObjectStore("contract")

    def test_repr_and_url(self, objects):
        assert objects.url == "memory://contract"
        assert "contract" in repr(objects)


class TestS3ObjectStore(ObjectStoreContract):
    @pytest.fixture
    def objects(self, s3_server, bucket, monkeypatch):
        for name, value in s3_server.env.items():
            monkeypatch.setenv(name, value)  # the standard AWS variables, AWS_ENDPOINT_URL included
        return open_object_store(f"s3://{bucket}/run-1/")

    def test_url_and_prefix(self, objects, bucket, s3_admin):
        assert objects.url == f"s3://{bucket}/run-1"
        objects.put("k", b"v")
        assert [o["Key"] for o in s3_admin.list_objects_v2(Bucket=bucket)["Contents"]] == ["run-1/k"]

    def test_put_if_absent_is_a_conditional_put_on_the_server(self, objects, bucket, s3_admin):
        s3_admin.put_object(Bucket=bucket, Key="run-1/other-writer", Body=b"theirs")
        assert objects.put_if_absent("other-writer", b"mine") is False
        assert objects.get("other-writer") == b"theirs"

    def test_without_a_prefix(self, s3_server, bucket):
        store = open_object_store(
            f"s3://{bucket}",
            endpoint=s3_server.endpoint,
            access_key_id=s3_server.access_key,
            secret_access_key=s3_server.secret_key,
        )
        store.put("top", b"1")
        assert store.url == f"s3://{bucket}" and list(store.list()) == [("top", 1)]

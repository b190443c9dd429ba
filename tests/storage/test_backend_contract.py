"""The storage contract (``castore/storage/base.py``), checked against every engine.

In the pattern of zarr-python's ``StoreTests``: :class:`BackendContract` holds the tests
and a factory hook (:meth:`BackendContract.open_store`, with the ``opener`` fixture that
pairs every open with a close); each engine subclasses it once, :class:`TestLmdbBackend`
on a fresh ``tmp_path`` directory per test, :class:`TestMemoryBackend` on a fresh
memory name per test (discarded after).  A test that only one engine can run (a reader
in another process) lives in that engine's class.

Every wait is bounded by a timeout and synchronised by queues, events or pipes, never by
sleeping; a correct engine passes however slowly the machine runs.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import subprocess
import sys
import threading
import uuid

import numpy as np
import pytest

import castore
from castore.format import journal
from castore.format.chunker import chunk_count
from castore.format.ids import ID_BYTES, chunk_id, short
from castore.format.keys import MAIN, branch_end, branch_prefix, step_key
from castore.format.manifest import PAGE_IDS, ChunkedBlob, InlineBlob, PagedBlob
from castore.format.schema import ALL_TABLES, Table
from castore.storage import ChunkStore, LmdbBackend, MemoryBackend, PageWalker, lmdb_engine, memory, open_backend
from castore.storage.chunks import PAGE_CORRUPT, PAGE_MALFORMED, PAGE_MISSING

WAIT = 30.0  # generous bound on every wait for another thread or process (never reached when all is well)


def items(txn, table, start=b"", stop=None, *, reverse=False) -> list[tuple[bytes, bytes]]:
    return [(bytes(k), bytes(v)) for k, v in txn.scan(table, start, stop, reverse=reverse)]


def keys(txn, table, start=b"", stop=None, *, reverse=False) -> list[bytes]:
    return [k for k, _ in items(txn, table, start, stop, reverse=reverse)]


def put_all(backend, table, mapping: dict) -> None:
    def fn(txn):
        for k, v in mapping.items():
            txn.put(table, k, v)

    backend.write(fn)


class Boom(Exception):
    """The error a failing ``fn`` raises: it must come out of ``write`` unchanged."""


class BackendContract:
    """The tests every engine passes; subclasses provide :meth:`open_store`."""

    #: whether ``write`` may run ``fn`` more than once (the LMDB engine: after growing its map)
    RERUNS = False
    #: writes committed while a reader thread runs free (LMDB syncs each: fewer)
    FREE_WRITES = 1500

    # -- the factory hook ----------------------------------------------------------------------

    @pytest.fixture
    def location(self, tmp_path):
        """Where the store of one test lives (a directory, a memory name)."""
        raise NotImplementedError

    def open_store(self, location, **kwargs):
        """Open the engine's store at ``location`` (``create``, ``readonly``, ``lock_timeout``)."""
        raise NotImplementedError

    def backend_url(self, location) -> str:
        """What :func:`castore.storage.open_backend` takes for ``location``."""
        raise NotImplementedError

    def prepare_rerun(self, monkeypatch) -> int:
        """Make the next open's store re-run a write of a few MiB; the value size to write."""
        return 4 << 20

    @pytest.fixture
    def opener(self, location):
        """``opener(**kwargs)`` opens the test's store; every open is closed after the test."""
        opened = []

        def open_(**kwargs):
            backend = self.open_store(location, **kwargs)
            opened.append(backend)
            return backend

        open_.opened = opened
        yield open_
        for backend in reversed(opened):
            if backend.refs > 0:
                backend.close()

    @pytest.fixture
    def backend(self, opener):
        return opener()

    @staticmethod
    def close_all(opener) -> None:
        """Close every open so far (the last close releases the engine)."""
        for backend in reversed(opener.opened):
            while backend.refs > 0:
                backend.close()

    # -- opening ---------------------------------------------------------------------------------

    def test_new_store_is_empty_and_has_every_table(self, backend):
        for table in ALL_TABLES:
            assert backend.has_table(table)
        with backend.read() as txn:
            for table in ALL_TABLES:
                assert txn.count(table) == 0
                assert items(txn, table) == []
                assert txn.get(table, b"k") is None
        assert not backend.readonly

    def test_openers_share_one_backend(self, backend, opener):
        backend.write(lambda txn: txn.put(Table.STEPS, b"k", b"v"))
        other = opener()
        assert other is backend
        with other.read() as txn:
            assert bytes(txn.get(Table.STEPS, b"k")) == b"v"

    def test_open_backend_picks_this_engine(self, backend, location):
        via = open_backend(self.backend_url(location))
        try:
            assert via is backend
        finally:
            via.close()

    def test_missing_store_not_created_when_create_false(self, location):
        with pytest.raises(castore.StoreNotFoundError):
            self.open_store(location, create=False)

    # -- get / put / put_new / delete / count ----------------------------------------------------

    def test_put_then_get(self, backend):
        put_all(backend, Table.STEPS, {b"a": b"1", b"b": b"22"})
        with backend.read() as txn:
            assert bytes(txn.get(Table.STEPS, b"a")) == b"1"
            assert bytes(txn.get(Table.STEPS, b"b")) == b"22"
            assert txn.get(Table.STEPS, b"c") is None
            assert txn.count(Table.STEPS) == 2

    def test_put_replaces(self, backend):
        put_all(backend, Table.STEPS, {b"a": b"old"})
        put_all(backend, Table.STEPS, {b"a": b"new value"})
        with backend.read() as txn:
            assert bytes(txn.get(Table.STEPS, b"a")) == b"new value"
            assert txn.count(Table.STEPS) == 1

    def test_empty_value_is_a_value(self, backend):
        put_all(backend, Table.META, {b"empty": b""})
        with backend.read() as txn:
            value = txn.get(Table.META, b"empty")
            assert value is not None and bytes(value) == b""
            assert txn.count(Table.META) == 1

    def test_tables_are_separate(self, backend):
        def fn(txn):
            for table in ALL_TABLES:
                txn.put(table, b"same key", table.value.encode())

        backend.write(fn)
        backend.write(lambda txn: txn.delete(Table.CHUNKS, b"same key"))
        with backend.read() as txn:
            for table in ALL_TABLES:
                got = txn.get(table, b"same key")
                if table is Table.CHUNKS:
                    assert got is None and txn.count(table) == 0
                else:
                    assert bytes(got) == table.value.encode() and txn.count(table) == 1

    def test_put_new_stores_once_and_keeps_first_value(self, backend):
        results = backend.write(
            lambda txn: (txn.put_new(Table.CHUNKS, b"id", b"first"), txn.put_new(Table.CHUNKS, b"id", b"second"))
        )
        assert results == (True, False)
        assert backend.write(lambda txn: txn.put_new(Table.CHUNKS, b"id", b"third")) is False
        with backend.read() as txn:
            assert bytes(txn.get(Table.CHUNKS, b"id")) == b"first"
            assert txn.count(Table.CHUNKS) == 1

    def test_put_new_after_delete_stores_again(self, backend):
        put_all(backend, Table.CHUNKS, {b"id": b"v1"})
        result = backend.write(lambda txn: (txn.delete(Table.CHUNKS, b"id"), txn.put_new(Table.CHUNKS, b"id", b"v2")))
        assert result == (True, True)
        with backend.read() as txn:
            assert bytes(txn.get(Table.CHUNKS, b"id")) == b"v2"

    def test_delete_reports_presence(self, backend):
        put_all(backend, Table.TAGS, {b"t1": b"x", b"t2": b"y"})
        assert backend.write(lambda txn: txn.delete(Table.TAGS, b"t1")) is True
        assert backend.write(lambda txn: txn.delete(Table.TAGS, b"t1")) is False
        assert backend.write(lambda txn: txn.delete(Table.TAGS, b"never")) is False
        with backend.read() as txn:
            assert txn.get(Table.TAGS, b"t1") is None
            assert bytes(txn.get(Table.TAGS, b"t2")) == b"y"
            assert txn.count(Table.TAGS) == 1
            assert keys(txn, Table.TAGS) == [b"t2"]

    def test_write_txn_sees_its_own_writes(self, backend):
        put_all(backend, Table.STEPS, {b"a": b"1", b"c": b"3"})

        def fn(txn):
            seen = {}
            txn.put(Table.STEPS, b"b", b"2")
            txn.put(Table.STEPS, b"a", b"1bis")
            seen["get"] = bytes(txn.get(Table.STEPS, b"a")), bytes(txn.get(Table.STEPS, b"b"))
            seen["count"] = txn.count(Table.STEPS)
            seen["scan"] = items(txn, Table.STEPS)
            txn.delete(Table.STEPS, b"c")
            seen["after delete"] = txn.get(Table.STEPS, b"c"), txn.count(Table.STEPS), keys(txn, Table.STEPS)
            seen["reverse"] = keys(txn, Table.STEPS, reverse=True)
            return seen

        seen = backend.write(fn)
        assert seen["get"] == (b"1bis", b"2")
        assert seen["count"] == 3
        assert seen["scan"] == [(b"a", b"1bis"), (b"b", b"2"), (b"c", b"3")]
        assert seen["after delete"] == (None, 2, [b"a", b"b"])
        assert seen["reverse"] == [b"b", b"a"]

    def test_write_returns_fn_result_and_passes_args(self, backend):
        result = backend.write(lambda txn, a, b: (txn.put(Table.META, a, b), a + b)[1], b"k", b"v")
        assert result == b"kv"
        with backend.read() as txn:
            assert bytes(txn.get(Table.META, b"k")) == b"v"

    @pytest.mark.parametrize(
        "kind", ["bytes", "bytearray", "memoryview", "memoryview-slice", "numpy", "numpy-2d", "numpy-slice"]
    )
    def test_buffer_values_read_back_as_equal_bytes(self, backend, kind):
        raw = bytes(range(256)) * 9
        value = {
            "bytes": raw,
            "bytearray": bytearray(raw),
            "memoryview": memoryview(raw),
            "memoryview-slice": memoryview(raw)[7:1000],  # contiguous, offset into its buffer
            "numpy": np.frombuffer(raw, np.uint8).copy(),
            "numpy-2d": np.frombuffer(raw, np.uint8).reshape(9, 256),
            "numpy-slice": np.frombuffer(raw, np.uint8)[100:2000],
        }[kind]
        expected = bytes(memoryview(value).cast("B"))
        backend.write(lambda txn: txn.put(Table.CHUNKS, b"plain", value))
        assert backend.write(lambda txn: txn.put_new(Table.CHUNKS, b"new", value)) is True
        if isinstance(value, bytearray):
            value[:] = b"\x00" * len(value)  # the store holds a copy, not the caller's buffer
        elif isinstance(value, np.ndarray) and value.flags.writeable:
            value[...] = 0
        with backend.read() as txn:
            assert bytes(txn.get(Table.CHUNKS, b"plain")) == expected
            assert bytes(txn.get(Table.CHUNKS, b"new")) == expected
            assert len(txn.get(Table.CHUNKS, b"plain")) == len(expected)
            assert np.array_equal(
                np.frombuffer(txn.get(Table.CHUNKS, b"plain"), np.uint8), np.frombuffer(expected, np.uint8)
            )

    def test_memoryview_keys_find_bytes_keys(self, backend):
        put_all(backend, Table.STEPS, {b"key-1": b"v"})
        with backend.read() as txn:
            assert bytes(txn.get(Table.STEPS, memoryview(b"key-1"))) == b"v"
        assert backend.write(lambda txn: txn.delete(Table.STEPS, memoryview(b"key-1"))) is True

    # -- atomicity ---------------------------------------------------------------------------------

    def test_failed_write_commits_nothing_and_raises_unchanged(self, backend):
        put_all(backend, Table.STEPS, {b"keep": b"1", b"doomed": b"2"})
        put_all(backend, Table.STEPINFO, {b"keep": b"info"})
        before = backend.generation()
        error = Boom("from fn")

        def fn(txn):
            txn.put(Table.STEPS, b"new", b"x")
            txn.put(Table.STEPS, b"keep", b"changed")
            assert txn.put_new(Table.CHUNKS, b"chunk", b"c")
            assert txn.delete(Table.STEPS, b"doomed")
            assert txn.delete(Table.STEPINFO, b"keep")
            raise error

        with pytest.raises(Boom) as info:
            backend.write(fn)
        assert info.value is error
        assert backend.generation() == before
        with backend.read() as txn:
            assert items(txn, Table.STEPS) == [(b"doomed", b"2"), (b"keep", b"1")]
            assert items(txn, Table.STEPINFO) == [(b"keep", b"info")]
            assert txn.count(Table.CHUNKS) == 0 and txn.get(Table.CHUNKS, b"chunk") is None
            assert txn.generation == before
        # the store still takes writes, and put_new sees nothing of the failed one
        assert backend.write(lambda txn: txn.put_new(Table.CHUNKS, b"chunk", b"c2")) is True

    def test_base_exception_in_fn_commits_nothing(self, backend):
        def fn(txn):
            txn.put(Table.STEPS, b"k", b"v")
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            backend.write(fn)
        with backend.read() as txn:
            assert txn.count(Table.STEPS) == 0

    def test_castore_error_from_fn_is_not_wrapped(self, backend):
        error = castore.UsageError("mine")

        def fn(txn):
            txn.put(Table.STEPS, b"k", b"v")
            raise error

        with pytest.raises(castore.UsageError) as info:
            backend.write(fn)
        assert info.value is error

    # -- re-run safety -----------------------------------------------------------------------------

    def test_deterministic_fn_gives_the_same_state_however_often_it_runs(self, opener, monkeypatch):
        big_bytes = self.prepare_rerun(monkeypatch)
        backend = opener()
        put_all(backend, Table.META, {b"counter": b"5"})
        put_all(backend, Table.STEPS, {b"existing": b"kept", b"doomed": b"x"})
        big = np.arange(big_bytes // 8, dtype=np.uint64).view(np.uint8)
        calls = []

        def fn(txn, payload):
            calls.append(txn.generation)
            n = int(bytes(txn.get(Table.META, b"counter")))
            txn.put(Table.META, b"counter", str(n + 1).encode())
            fresh = txn.put_new(Table.STEPS, b"fresh", b"first")
            again = txn.put_new(Table.STEPS, b"fresh", b"second")
            present = txn.put_new(Table.STEPS, b"existing", b"other")
            deleted = txn.delete(Table.STEPS, b"doomed")
            deleted_again = txn.delete(Table.STEPS, b"doomed")
            count = txn.count(Table.STEPS)
            txn.put(Table.CHUNKS, b"big", payload)  # last: a re-run has done everything above before
            return n, fresh, again, present, deleted, deleted_again, count

        result = backend.write(fn, big)
        if self.RERUNS:
            assert len(calls) >= 2, "the store was to fill its map and re-run fn"
        else:
            assert len(calls) == 1
        assert result == (5, True, False, False, True, False, 2)  # what a single run reports
        with backend.read() as txn:
            assert bytes(txn.get(Table.META, b"counter")) == b"6"
            assert items(txn, Table.STEPS) == [(b"existing", b"kept"), (b"fresh", b"first")]
            assert bytes(txn.get(Table.CHUNKS, b"big")) == big.tobytes()
            assert txn.count(Table.CHUNKS) == 1
        # the next write sees exactly one run's writes
        assert backend.write(lambda txn: txn.put_new(Table.STEPS, b"fresh", b"x")) is False

    # -- ordered scans -----------------------------------------------------------------------------

    TRICKY_KEYS = [
        b"\x00",
        b"\x00\x00",
        b"\x01",
        b"A",
        b"a",
        b"a\x00",
        b"a\x00\x00",
        b"a\x01",
        b"ab",
        b"b",
        b"\x7f",
        b"\x80",
        b"\x80\x00",
        b"\xfe\xff",
        b"\xff",
        b"\xff\x00",
        b"\xff\xff",
    ]

    @pytest.fixture
    def filled(self, backend):
        shuffled = sorted(self.TRICKY_KEYS, key=lambda k: chunk_id(k))  # an order unrelated to the keys'
        put_all(backend, Table.TRASH, {k: b"v" + k for k in shuffled})
        return backend

    def test_scan_is_bytewise_ascending(self, filled):
        with filled.read() as txn:
            assert items(txn, Table.TRASH) == [(k, b"v" + k) for k in sorted(self.TRICKY_KEYS)]
            assert keys(txn, Table.TRASH)[:3] == [b"\x00", b"\x00\x00", b"\x01"]  # shorter prefix first
            assert keys(txn, Table.TRASH)[-3:] == [b"\xff", b"\xff\x00", b"\xff\xff"]  # unsigned bytes

    def test_scan_reverse_is_descending(self, filled):
        with filled.read() as txn:
            assert keys(txn, Table.TRASH, reverse=True) == sorted(self.TRICKY_KEYS, reverse=True)

    @pytest.mark.parametrize(
        "start, stop",
        [
            (b"", None),
            (b"a", None),
            (b"a", b"b"),
            (b"a\x00", b"a\x01"),
            (b"\x00", b"\x01"),
            (b"\x00\x00", b"\xff"),
            (b"0", b"Z"),
            (b"a\x00\x00\x00", b"ab"),
            (b"\x80", None),
            (b"\xff", b"\xff\xff"),
            (b"", b"\x80"),
            (b"\xff\xff", None),
            (b"\xff\xff\x00", None),
            (b"", b"\x00"),
            (b"", b"\x00\x00"),
        ],
    )
    def test_scan_bounds_start_inclusive_stop_exclusive(self, filled, start, stop):
        expected = [k for k in sorted(self.TRICKY_KEYS) if k >= start and (stop is None or k < stop)]
        with filled.read() as txn:
            assert keys(txn, Table.TRASH, start, stop) == expected
            assert keys(txn, Table.TRASH, start, stop, reverse=True) == expected[::-1]
            assert all(v == b"v" + k for k, v in items(txn, Table.TRASH, start, stop, reverse=True))

    @pytest.mark.parametrize(
        "start, stop",
        [
            (b"a", b"a"),
            (b"b", b"a"),
            (b"\xff\xff", b"\x00"),
            (b"a\x00\x00\x00", b"a\x01"),
            (b"", b""),
            (b"\xff\xff\x00", None),
            (b"c", b"\x7f"),
            (b"ab\x00", b"b"),
        ],
    )
    def test_empty_ranges(self, filled, start, stop):
        with filled.read() as txn:
            assert keys(txn, Table.TRASH, start, stop) == []
            assert keys(txn, Table.TRASH, start, stop, reverse=True) == []

    def test_scan_of_an_empty_table(self, filled):
        with filled.read() as txn:
            for reverse in (False, True):
                assert items(txn, Table.JOURNAL, reverse=reverse) == []
                assert items(txn, Table.JOURNAL, b"a", b"z", reverse=reverse) == []

    BRANCHES = [MAIN, "a", "a.b", "a-b", "b", "z/1", "A"]
    STEPS = [0, 1, 255, 256, 2**40]

    def test_branch_step_keys_scan_as_contiguous_ranges(self, backend):
        pairs = [(b, s) for b in self.BRANCHES for s in self.STEPS]
        # insertion order unrelated to key order
        shuffled = sorted(pairs, key=lambda p: chunk_id(step_key(p[1], p[0])))

        def fn(txn):
            for branch, step in shuffled:
                txn.put(Table.STEPS, step_key(step, branch), f"{branch}@{step}".encode())
                txn.put(Table.STEPINFO, step_key(step, branch), b"info")

        backend.write(fn)
        with backend.read() as txn:
            for branch in self.BRANCHES:
                lo, hi = branch_prefix(branch), branch_end(branch)
                found = items(txn, Table.STEPS, lo, hi)
                assert [v for _, v in found] == [f"{branch}@{s}".encode() for s in self.STEPS], branch
                assert [k for k, _ in found] == [step_key(s, branch) for s in self.STEPS]
                latest_first = items(txn, Table.STEPS, lo, hi, reverse=True)
                assert latest_first == found[::-1]
                assert latest_first[0][1] == f"{branch}@{2**40}".encode()
            everything = keys(txn, Table.STEPS)
            assert everything[: len(self.STEPS)] == [step_key(s) for s in self.STEPS]  # main first
            ordered = [MAIN] + sorted((b for b in self.BRANCHES if b != MAIN), key=str.encode)
            assert everything == [step_key(s, b) for b in ordered for s in self.STEPS]
            assert keys(txn, Table.STEPS, reverse=True)[0] == step_key(2**40, ordered[-1])
            assert txn.count(Table.STEPS) == len(pairs)
            # a branch's range excludes every key of the branches around it
            assert keys(txn, Table.STEPINFO, branch_prefix("a"), branch_end("a")) == [
                step_key(s, "a") for s in self.STEPS
            ]

    # -- generations ---------------------------------------------------------------------------------

    def test_generation_increases_on_every_commit(self, backend):
        seen = [backend.generation()]
        writes = [
            lambda txn: txn.put(Table.STEPS, b"a", b"1"),
            lambda txn: txn.put(Table.STEPS, b"a", b"1"),  # the same value again is still a commit
            lambda txn: txn.put_new(Table.CHUNKS, b"c", b"1"),
            lambda txn: txn.delete(Table.STEPS, b"a"),
            lambda txn: (txn.put(Table.META, b"m", b"x"), txn.put(Table.TAGS, b"t", b"y")),
        ]
        for fn in writes:
            backend.write(fn)
            seen.append(backend.generation())
            with backend.read() as txn:
                assert txn.generation == seen[-1]
        assert seen == sorted(set(seen)), seen

    def test_each_commit_adds_one_and_a_write_sees_the_generation_it_makes(self, backend):
        """What counting commits by generation delta, and a cache valid at one generation,
        rely on (the save's one-commit test, the retention index)."""

        def put(txn, key):
            txn.put(Table.STEPS, key, b"v")
            return txn.generation

        for i in range(5):
            before = backend.generation()
            seen = backend.write(put, b"k%d" % i)
            assert seen == before + 1 == backend.generation()
            with backend.read() as txn:
                assert txn.generation == seen

    def test_failed_and_empty_writes_never_lower_the_generation(self, backend):
        backend.write(lambda txn: txn.put(Table.STEPS, b"a", b"1"))
        g = backend.generation()

        def failing(txn):
            txn.put(Table.STEPS, b"b", b"2")
            raise Boom()

        with pytest.raises(Boom):
            backend.write(failing)
        assert backend.generation() == g
        for fn in (
            lambda txn: None,
            lambda txn: txn.delete(Table.STEPS, b"absent"),
            lambda txn: txn.put_new(Table.STEPS, b"a", b"other"),
        ):
            backend.write(fn)
            assert backend.generation() >= g
            g = backend.generation()
        backend.write(lambda txn: txn.put(Table.STEPS, b"c", b"3"))
        assert backend.generation() > g

    def test_read_txn_generation_is_fixed_at_begin(self, backend):
        backend.write(lambda txn: txn.put(Table.STEPS, b"a", b"1"))
        with backend.read() as txn:
            g = backend.generation()
            assert txn.generation == g
            backend.write(lambda t: t.put(Table.STEPS, b"b", b"2"))
            backend.write(lambda t: t.put(Table.STEPS, b"c", b"3"))
            assert backend.generation() > g
            assert txn.generation == g
        with backend.read() as txn:
            assert txn.generation == backend.generation() > g

    # -- snapshot isolation --------------------------------------------------------------------------

    def test_reader_keeps_its_snapshot_across_commits(self, backend):
        put_all(backend, Table.STEPS, {b"a": b"old", b"b": b"old", b"c": b"old"})
        with backend.read() as old:
            backend.write(
                lambda txn: (
                    txn.put(Table.STEPS, b"a", b"new"),
                    txn.delete(Table.STEPS, b"b"),
                    txn.put(Table.STEPS, b"d", b"new"),
                    txn.put(Table.TAGS, b"t", b"new"),
                )
            )
            with backend.read() as new:
                assert bytes(old.get(Table.STEPS, b"a")) == b"old"
                assert bytes(old.get(Table.STEPS, b"b")) == b"old"
                assert old.get(Table.STEPS, b"d") is None and old.get(Table.TAGS, b"t") is None
                assert items(old, Table.STEPS) == [(b"a", b"old"), (b"b", b"old"), (b"c", b"old")]
                assert keys(old, Table.STEPS, reverse=True) == [b"c", b"b", b"a"]
                assert old.count(Table.STEPS) == 3 and old.count(Table.TAGS) == 0

                assert items(new, Table.STEPS) == [(b"a", b"new"), (b"c", b"old"), (b"d", b"new")]
                assert new.count(Table.STEPS) == 3 and new.count(Table.TAGS) == 1
                assert new.get(Table.STEPS, b"b") is None
                assert new.generation > old.generation

    def test_reader_thread_snapshot_spans_a_commit(self, backend):
        """A reader in another thread, paused inside its snapshot while a write commits."""
        put_all(backend, Table.STEPS, {b"k": b"before"})
        inside, committed = queue.Queue(), queue.Queue()

        def reader():
            with backend.read() as txn:
                first = bytes(txn.get(Table.STEPS, b"k"))
                inside.put(txn.generation)
                committed.get(timeout=WAIT)
                return first, bytes(txn.get(Table.STEPS, b"k")), items(txn, Table.STEPS), txn.count(Table.STEPS)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(reader)
            gen = inside.get(timeout=WAIT)
            backend.write(lambda txn: (txn.put(Table.STEPS, b"k", b"after"), txn.put(Table.STEPS, b"k2", b"x")))
            committed.put(None)
            assert future.result(WAIT) == (b"before", b"before", [(b"k", b"before")], 1)
        assert backend.generation() > gen

    # -- readers beside a writer ----------------------------------------------------------------------

    @staticmethod
    def commit_step(backend, i: int) -> None:
        """Write ``i``: a new key in STEPS and STEPINFO together, and rewrite key 0 in both."""
        value = f"rev{i}".encode()

        def fn(txn):
            for table in (Table.STEPS, Table.STEPINFO):
                txn.put(table, step_key(i), value)
                txn.put(table, step_key(0), value)

        backend.write(fn)

    @staticmethod
    def consistent_snapshot(txn) -> tuple[int, int]:
        """Check the two tables agree in one snapshot; ``(generation, keys)``."""
        steps = items(txn, Table.STEPS)
        info = items(txn, Table.STEPINFO)
        assert steps == info
        assert txn.count(Table.STEPS) == txn.count(Table.STEPINFO) == len(steps)
        if steps:
            n = len(steps)
            assert [k for k, _ in steps] == [step_key(i) for i in range(n)]
            assert (
                bytes(txn.get(Table.STEPS, step_key(0)))
                == bytes(txn.get(Table.STEPINFO, step_key(0)))
                == f"rev{n - 1}".encode()
            )
        return txn.generation, len(steps)

    def test_reader_thread_sees_only_whole_writes(self, backend):
        lockstep, free = 15, self.FREE_WRITES
        self.commit_step(backend, 0)
        inside, committed = queue.Queue(), queue.Queue()
        target = 1 + lockstep + free

        def reader():
            # lockstep: a commit lands between reading the two tables of one snapshot
            for i in range(lockstep):
                with backend.read() as txn:
                    before = items(txn, Table.STEPS)
                    inside.put(len(before))
                    committed.get(timeout=WAIT)
                    gen, n = self.consistent_snapshot(txn)
                    assert n == len(before) == i + 1 and items(txn, Table.STEPS) == before
                    assert txn.generation == gen
            inside.put("free")
            # free running: snapshots while the writer commits, until the last write shows
            # (most snapshots are cheap, so that many begin while a commit is under way)
            generations, snapshots, n = [], 0, 0
            for snapshots in range(1, 2_000_000):
                with backend.read() as txn:
                    if snapshots % 64:
                        n = txn.count(Table.STEPS)
                        assert txn.count(Table.STEPINFO) == n
                        assert bytes(txn.get(Table.STEPS, step_key(0))) == bytes(txn.get(Table.STEPINFO, step_key(0)))
                    else:
                        gen, n = self.consistent_snapshot(txn)
                        generations.append(gen)
                if n == target:
                    break
            assert generations == sorted(generations)
            return n, snapshots

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # switch threads often: a torn commit would show (never a timing assumption)
        try:
            n, snapshots = self._run_reader_beside_writer(backend, reader, inside, committed, lockstep, target)
        finally:
            sys.setswitchinterval(interval)
        assert n == target and snapshots >= 1

    def _run_reader_beside_writer(self, backend, reader, inside, committed, lockstep, target):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(reader)
            for i in range(1, lockstep + 1):
                try:
                    assert inside.get(timeout=WAIT) == i
                except queue.Empty:
                    future.result(0)  # the reader's own failure, if any
                    raise
                self.commit_step(backend, i)
                committed.put(None)
            assert inside.get(timeout=WAIT) == "free"
            for i in range(lockstep + 1, target):
                self.commit_step(backend, i)
            return future.result(WAIT)

    # -- the writer lock ------------------------------------------------------------------------------

    def test_acquire_writer_once(self, backend):
        assert not backend.is_writer()
        assert backend.acquire_writer() is True
        assert backend.is_writer()
        assert backend.acquire_writer() is False
        assert backend.acquire_writer(timeout=0) is False
        assert backend.is_writer()
        backend.write(lambda txn: txn.put(Table.STEPS, b"k", b"v"))  # the writer writes
        with backend.read() as txn:
            assert bytes(txn.get(Table.STEPS, b"k")) == b"v"

    def test_writer_lock_is_released_by_the_last_close(self, backend, opener):
        assert backend.acquire_writer() is True
        self.close_all(opener)
        again = opener()
        assert not again.is_writer()
        assert again.acquire_writer() is True

    def test_acquire_writer_rejects_a_bad_timeout(self, backend):
        with pytest.raises(castore.UsageError):
            backend.acquire_writer(timeout=-1)
        assert not backend.is_writer()

    def test_read_only_store_refuses_writes(self, backend, opener):
        backend.write(lambda txn: txn.put(Table.STEPS, b"k", b"v"))
        self.close_all(opener)
        readonly = opener(readonly=True)
        assert readonly.readonly
        with pytest.raises(castore.UsageError):
            readonly.write(lambda txn: txn.put(Table.STEPS, b"k", b"changed"))
        with pytest.raises(castore.UsageError):
            readonly.acquire_writer()
        assert not readonly.is_writer()
        with readonly.read() as txn:
            assert bytes(txn.get(Table.STEPS, b"k")) == b"v"
            assert txn.count(Table.STEPS) == 1

    def test_read_only_open_beside_a_writable_one_refuses_writes(self, backend, opener):
        backend.write(lambda txn: txn.put(Table.STEPS, b"k", b"v"))
        readonly = opener(readonly=True)  # this process has the store open writable already
        assert readonly.readonly and not backend.readonly
        with pytest.raises(castore.UsageError):
            readonly.write(lambda txn: txn.put(Table.STEPS, b"k", b"changed"))
        with pytest.raises(castore.UsageError):
            readonly.acquire_writer()
        with readonly.read() as txn:
            assert bytes(txn.get(Table.STEPS, b"k")) == b"v"
        backend.write(lambda txn: txn.put(Table.STEPS, b"k", b"w"))  # the writable opener still writes
        with readonly.read() as txn:
            assert bytes(txn.get(Table.STEPS, b"k")) == b"w"

    def test_a_writable_open_after_a_read_only_one_writes_and_the_view_stays_read_only(self, backend, opener):
        backend.write(lambda txn: txn.put(Table.STEPS, b"k", b"v"))
        self.close_all(opener)
        readonly = opener(readonly=True)  # the first open of the engine now
        writable = opener()
        assert readonly.readonly and not writable.readonly
        writable.write(lambda txn: txn.put(Table.STEPS, b"k", b"w"))
        with readonly.read() as txn:
            assert bytes(txn.get(Table.STEPS, b"k")) == b"w"
        with pytest.raises(castore.UsageError):
            readonly.write(lambda txn: txn.put(Table.STEPS, b"k", b"changed"))
        readonly.close()
        writable.write(lambda txn: txn.put(Table.STEPS, b"k", b"x"))  # the view's close leaves it writing
        with writable.read() as txn:
            assert bytes(txn.get(Table.STEPS, b"k")) == b"x"

    def test_the_writer_lock_goes_with_the_last_writable_close(self, backend, opener):
        readonly = opener(readonly=True)
        second = opener()
        assert backend.acquire_writer() is True
        backend.close()
        assert second.is_writer()  # a writable opener is left: it keeps the lock
        second.close()
        assert not readonly.is_writer()
        with readonly.read() as txn:  # the view reads on
            assert txn.count(Table.STEPS) == 0
        again = opener()
        assert again.acquire_writer() is True  # taken afresh: it had been released
        again.close()
        readonly.close()

    @pytest.mark.parametrize("size", [0, 512, 4096])
    def test_keys_outside_the_limits_are_usage_errors(self, backend, size):
        key = b"k" * size
        with pytest.raises(castore.UsageError, match="1 to 511 bytes"):
            backend.write(lambda txn: txn.put(Table.STEPS, key, b"v"))
        with pytest.raises(castore.UsageError, match="1 to 511 bytes"):
            backend.write(lambda txn: txn.put_new(Table.STEPS, key, b"v"))
        with backend.read() as txn, pytest.raises(castore.UsageError, match="1 to 511 bytes"):
            txn.get(Table.STEPS, key)
        backend.write(lambda txn: txn.put(Table.STEPS, b"k" * 511, b"longest"))
        with backend.read() as txn:
            assert bytes(txn.get(Table.STEPS, b"k" * 511)) == b"longest"
            assert txn.count(Table.STEPS) == 1

    @pytest.mark.parametrize("kind", ["memoryview", "ndarray"])
    def test_non_contiguous_values_are_usage_errors_and_commit_nothing(self, backend, kind):
        value = memoryview(b"abcdefgh")[::2] if kind == "memoryview" else np.zeros((4, 4), np.uint8)[:, ::2]

        def fn(txn):
            txn.put(Table.STEPS, b"first", b"1")
            txn.put(Table.STEPS, b"k", value)

        with pytest.raises(castore.UsageError, match="C-contiguous"):
            backend.write(fn)
        with backend.read() as txn:
            assert txn.count(Table.STEPS) == 0

    def test_a_thread_holding_a_snapshot_may_write(self, backend):
        with backend.read() as txn:
            backend.write(lambda w: w.put(Table.STEPS, b"k", b"v"))
            assert txn.get(Table.STEPS, b"k") is None  # its snapshot is as it was
            with backend.read() as newer:
                assert bytes(newer.get(Table.STEPS, b"k")) == b"v"

    def test_a_write_inside_a_write_is_refused_and_the_outer_commits_nothing(self, backend):
        def outer(txn):
            txn.put(Table.STEPS, b"outer", b"1")
            backend.write(lambda inner: inner.put(Table.STEPS, b"inner", b"2"))

        with pytest.raises(castore.UsageError, match="inside write"):
            backend.write(outer)
        with backend.read() as txn:
            assert txn.count(Table.STEPS) == 0
        backend.write(lambda txn: txn.put(Table.STEPS, b"after", b"3"))  # the engine is usable after
        with backend.read() as txn:
            assert keys(txn, Table.STEPS) == [b"after"]

    def test_bad_keys_and_values_in_delete_and_put_are_usage_errors(self, backend):
        with pytest.raises(castore.UsageError, match="1 to 511 bytes"):
            backend.write(lambda txn: txn.delete(Table.STEPS, b""))
        for value in ("text", 7, None):
            with pytest.raises(castore.UsageError, match="bytes-like"):
                backend.write(lambda txn, value=value: txn.put(Table.STEPS, b"k", value))
        with backend.read() as txn:
            assert txn.count(Table.STEPS) == 0

    def test_snapshots_of_one_thread_may_end_in_any_order(self, backend):
        backend.write(lambda txn: txn.put(Table.STEPS, b"k", b"v"))
        outer_cm, inner_cm = backend.read(), backend.read()
        outer = outer_cm.__enter__()
        inner = inner_cm.__enter__()
        outer_cm.__exit__(None, None, None)  # the outer one ends first
        assert bytes(inner.get(Table.STEPS, b"k")) == b"v"
        inner_cm.__exit__(None, None, None)
        del outer
        backend.write(lambda txn: txn.put(Table.STEPS, b"k", b"w"))
        with backend.read() as txn:
            assert bytes(txn.get(Table.STEPS, b"k")) == b"w"

    def test_nested_reads_in_one_thread(self, backend):
        backend.write(lambda txn: txn.put(Table.STEPS, b"k", b"v"))
        with backend.read() as outer:
            with backend.read() as inner:
                assert bytes(inner.get(Table.STEPS, b"k")) == b"v"
                assert inner.generation == outer.generation
            assert bytes(outer.get(Table.STEPS, b"k")) == b"v"
        backend.write(lambda txn: txn.put(Table.STEPS, b"k", b"w"))  # no snapshot is left open
        with backend.read() as txn:
            assert bytes(txn.get(Table.STEPS, b"k")) == b"w"

    def test_read_only_open_of_a_missing_store_fails(self, location):
        with pytest.raises(castore.StoreNotFoundError):
            self.open_store(location, readonly=True)

    # -- exclusive_writes -----------------------------------------------------------------------------

    def test_exclusive_writes_holds_off_other_threads(self, backend):
        backend.write(lambda txn: txn.put(Table.STEPS, b"k", b"0"))
        started, done = threading.Event(), threading.Event()

        def other_thread():
            started.set()
            backend.write(lambda txn: txn.put(Table.STEPS, b"k", b"from other"))
            done.set()

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            with backend.exclusive_writes():
                held_at = backend.generation()
                future = pool.submit(other_thread)
                assert started.wait(WAIT)
                assert not done.wait(0.2)
                # whatever the timing, nothing has committed while the block runs
                assert backend.generation() == held_at
                with backend.read() as txn:
                    assert bytes(txn.get(Table.STEPS, b"k")) == b"0"
                # the holder's own thread still writes
                backend.write(lambda txn: txn.put(Table.STEPS, b"mine", b"1"))
                assert not done.is_set()
                with backend.read() as txn:
                    assert bytes(txn.get(Table.STEPS, b"k")) == b"0"
            assert done.wait(WAIT)
            future.result(WAIT)
        with backend.read() as txn:
            assert bytes(txn.get(Table.STEPS, b"k")) == b"from other"
            assert bytes(txn.get(Table.STEPS, b"mine")) == b"1"

    def test_exclusive_writes_waits_for_a_running_write(self, backend):
        in_fn, release, entered = threading.Event(), threading.Event(), threading.Event()

        def slow_write():
            def fn(txn):
                txn.put(Table.STEPS, b"slow", b"1")
                in_fn.set()
                assert release.wait(WAIT)

            backend.write(fn)

        def take_exclusive():
            with backend.exclusive_writes():
                entered.set()
                with backend.read() as txn:
                    return bytes(txn.get(Table.STEPS, b"slow"))

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            writing = pool.submit(slow_write)
            assert in_fn.wait(WAIT)
            holding = pool.submit(take_exclusive)
            assert not entered.wait(0.2)
            release.set()
            writing.result(WAIT)
            assert holding.result(WAIT) == b"1"  # the running write finished first

    # -- the chunk store ------------------------------------------------------------------------------

    def test_chunk_store_put_many_counts_new_and_reused(self, backend):
        cs = ChunkStore(backend)
        chunks = [bytes([i]) * (100 + i) for i in range(4)]
        ids = [chunk_id(c) for c in chunks]
        page = b"".join(ids[:3])
        first = backend.write(
            lambda txn: cs.put_many(
                txn, [(Table.CHUNKS, ids[i], chunks[i]) for i in range(3)] + [(Table.PAGES, chunk_id(page), page)]
            )
        )
        assert first.new == [
            (Table.CHUNKS, ids[0]),
            (Table.CHUNKS, ids[1]),
            (Table.CHUNKS, ids[2]),
            (Table.PAGES, chunk_id(page)),
        ]
        assert first.reused == 0
        assert first.new_bytes == sum(map(len, chunks[:3])) + len(page)
        with backend.read() as txn:
            assert cs.counters(txn) == (4, first.new_bytes)

        second = backend.write(
            lambda txn: cs.put_many(
                txn,
                [
                    (Table.CHUNKS, ids[1], chunks[1]),
                    (Table.CHUNKS, ids[3], chunks[3]),
                    (Table.CHUNKS, ids[3], chunks[3]),  # twice in one call: the second is reused
                    (Table.PAGES, chunk_id(page), page),
                ],
            )
        )
        assert second.new == [(Table.CHUNKS, ids[3])]
        assert second.reused == 3
        assert second.new_bytes == len(chunks[3])
        with backend.read() as txn:
            assert cs.counters(txn) == (5, first.new_bytes + len(chunks[3]))
            assert txn.count(Table.CHUNKS) == 4 and txn.count(Table.PAGES) == 1
            assert [bytes(v) for v in cs.get_many(txn, ids)] == chunks

        nothing = backend.write(lambda txn: cs.put_many(txn, [(Table.CHUNKS, ids[0], chunks[0])]))
        assert (nothing.new, nothing.reused, nothing.new_bytes) == ([], 1, 0)
        with backend.read() as txn:
            assert cs.counters(txn) == (5, first.new_bytes + len(chunks[3]))

    def test_chunk_store_counters_roll_back_with_a_failed_write(self, backend):
        cs = ChunkStore(backend)

        def fn(txn):
            cs.put_many(txn, [(Table.CHUNKS, chunk_id(b"x"), b"x")])
            raise Boom()

        with pytest.raises(Boom):
            backend.write(fn)
        with backend.read() as txn:
            assert cs.counters(txn) == (0, 0)
            assert txn.get(Table.META, journal.COUNTERS_KEY) is None
            assert cs.get(txn, chunk_id(b"x")) is None

    def test_chunk_store_sizes_get_many_delete_many(self, backend):
        cs = ChunkStore(backend)
        chunks = {chunk_id(bytes([i]) * i): bytes([i]) * i for i in range(1, 6)}
        present = list(chunks)[:3]
        absent = list(chunks)[3:]
        backend.write(lambda txn: cs.put_many(txn, [(Table.CHUNKS, c, chunks[c]) for c in present]))
        with backend.read() as txn:
            assert cs.sizes(txn, Table.CHUNKS, present + absent) == {c: len(chunks[c]) for c in present}
            assert cs.sizes(txn, Table.PAGES, present) == {}
            got = cs.get_many(txn, [absent[0], present[1], absent[1], present[0]])
            assert got[0] is None and got[2] is None
            assert bytes(got[1]) == chunks[present[1]] and bytes(got[3]) == chunks[present[0]]
            assert bytes(cs.get(txn, present[2])) == chunks[present[2]]
            assert cs.get(txn, present[2], Table.PAGES) is None
            total = cs.counters(txn)
        assert total == (3, 1 + 2 + 3)

        doomed = [present[0], present[2], absent[0]]
        assert backend.write(lambda txn: cs.delete_many(txn, Table.CHUNKS, doomed)) == (2, 1 + 3)
        with backend.read() as txn:
            assert cs.counters(txn) == (1, 2)
            assert cs.sizes(txn, Table.CHUNKS, list(chunks)) == {present[1]: 2}
        assert backend.write(lambda txn: cs.delete_many(txn, Table.CHUNKS, doomed)) == (0, 0)
        with backend.read() as txn:
            assert cs.counters(txn) == (1, 2)
            assert txn.count(Table.CHUNKS) == 1

    # -- the page walker ------------------------------------------------------------------------------

    CHUNK_NBYTES = 4096

    @pytest.fixture
    def paged(self, backend):
        """A blob of 300 chunks listed by two stored pages (256 + 44 ids)."""
        n = 300
        ids = [chunk_id(i.to_bytes(4, "big")) for i in range(n)]
        pages = [b"".join(ids[i : i + PAGE_IDS]) for i in range(0, n, PAGE_IDS)]
        page_ids = [chunk_id(p) for p in pages]
        nbytes = (n - 1) * self.CHUNK_NBYTES + 123
        assert chunk_count(nbytes, self.CHUNK_NBYTES) == n and len(pages) == 2
        blob = PagedBlob(nbytes=nbytes, chunk_nbytes=self.CHUNK_NBYTES, page_ids=b"".join(page_ids))
        cs = ChunkStore(backend)
        backend.write(lambda txn: cs.put_many(txn, [(Table.PAGES, pid, p) for pid, p in zip(page_ids, pages)]))
        return blob, b"".join(ids), pages, page_ids

    @pytest.mark.parametrize("check_pages", [True, False])
    def test_walker_ids_concatenate_the_pages(self, backend, paged, check_pages):
        blob, all_ids, pages, page_ids = paged
        with backend.read() as txn:
            walker = PageWalker(txn, check_pages=check_pages)
            assert walker.ids(blob, {}) == all_ids
            walk = walker.walk(blob)
            assert walk.complete and walk.chunk_ids == all_ids and walk.pages == page_ids
            assert walk.damaged == [] and walk.listed is None
            chunked = ChunkedBlob(nbytes=2 * self.CHUNK_NBYTES, chunk_nbytes=self.CHUNK_NBYTES, ids=all_ids[:64])
            assert walker.ids(chunked, {}) == all_ids[:64]
            assert walker.walk(chunked).chunk_ids == all_ids[:64]
            assert walker.walk(InlineBlob(b"abc")).chunk_ids == b""

    @pytest.mark.parametrize("check_pages", [True, False])
    def test_walker_missing_page(self, backend, paged, check_pages):
        blob, all_ids, pages, page_ids = paged
        backend.write(lambda txn: txn.delete(Table.PAGES, page_ids[1]))
        with backend.read() as txn:
            walker = PageWalker(txn, check_pages=check_pages)
            with pytest.raises(castore.ChunkMissingError) as info:
                walker.ids(blob, {"step": 7, "component": "model", "path": "w"})
            assert info.value.chunk_id == short(page_ids[1])
            assert info.value.step == 7 and info.value.component == "model"
            walk = walker.walk(blob)
            assert walk.damaged == [(PAGE_MISSING, page_ids[1])]
            assert not walk.complete
            assert walk.chunk_ids == pages[0]
            assert walk.listed is None  # a damaged walk does not also report a miscount

    def test_walker_corrupt_page_caught_only_when_checking(self, backend, paged):
        blob, all_ids, pages, page_ids = paged
        forged = chunk_id(b"forged") + pages[0][ID_BYTES:]  # well-formed, wrong bytes for its id
        backend.write(lambda txn: txn.put(Table.PAGES, page_ids[0], forged))
        with backend.read() as txn:
            checking = PageWalker(txn, check_pages=True)
            with pytest.raises(castore.ChunkCorruptError) as info:
                checking.ids(blob, {})
            assert info.value.chunk_id == short(page_ids[0])
            walk = checking.walk(blob)
            assert walk.damaged == [(PAGE_CORRUPT, page_ids[0])] and not walk.complete
            assert walk.chunk_ids == pages[1]

            trusting = PageWalker(txn, check_pages=False)
            assert trusting.ids(blob, {}) == forged + pages[1]  # shape checked only
            walk = trusting.walk(blob)
            assert walk.complete and walk.chunk_ids == forged + pages[1]

    @pytest.mark.parametrize("check_pages", [True, False])
    @pytest.mark.parametrize("bad", [b"", b"x" * 33, b"y" * (ID_BYTES * (PAGE_IDS + 1))])
    def test_walker_malformed_page(self, backend, paged, check_pages, bad):
        blob, all_ids, pages, page_ids = paged
        backend.write(lambda txn: txn.put(Table.PAGES, page_ids[1], bad))
        with backend.read() as txn:
            walker = PageWalker(txn, check_pages=check_pages)
            with pytest.raises((castore.CorruptDataError, castore.ChunkCorruptError)):
                walker.ids(blob, {})
            walk = walker.walk(blob)
            assert walk.damaged == [(PAGE_CORRUPT if check_pages else PAGE_MALFORMED, page_ids[1])]
            assert walk.chunk_ids == pages[0]

    def test_walker_reports_a_miscount(self, backend, paged):
        blob, all_ids, pages, page_ids = paged
        longer = PagedBlob(
            nbytes=blob.nbytes + self.CHUNK_NBYTES, chunk_nbytes=blob.chunk_nbytes, page_ids=blob.page_ids
        )
        shorter = PagedBlob(
            nbytes=blob.nbytes - 200 * self.CHUNK_NBYTES, chunk_nbytes=blob.chunk_nbytes, page_ids=blob.page_ids
        )
        with backend.read() as txn:
            walker = PageWalker(txn, check_pages=True)
            for wrong in (longer, shorter):
                with pytest.raises(castore.CorruptDataError):
                    walker.ids(wrong, {})
                walk = walker.walk(wrong)
                assert walk.listed == 300 and walk.damaged == [] and not walk.complete
                assert walk.chunk_ids == all_ids

    def test_walker_skips_pages(self, backend, paged):
        blob, all_ids, pages, page_ids = paged
        backend.write(lambda txn: txn.delete(Table.PAGES, page_ids[0]))
        with backend.read() as txn:
            walker = PageWalker(txn, check_pages=True)
            walk = walker.walk(blob, skip={page_ids[0]})
            assert walk.pages == [page_ids[1]] and walk.damaged == [] and walk.listed is None
            assert walk.chunk_ids == pages[1]
            walk = walker.walk(blob, skip=frozenset(page_ids))
            assert walk.pages == [] and walk.chunk_ids == b"" and walk.damaged == [] and walk.listed is None
            walk = walker.walk(blob)  # nothing skipped: the missing page shows
            assert walk.damaged == [(PAGE_MISSING, page_ids[0])]

    def test_walker_reads_each_page_once(self, backend, paged):
        blob, all_ids, pages, page_ids = paged
        other = PagedBlob(nbytes=blob.nbytes, chunk_nbytes=blob.chunk_nbytes, page_ids=blob.page_ids)

        class Counting:
            def __init__(self, txn):
                self.txn, self.gets = txn, []

            def get(self, table, key):
                self.gets.append((table, bytes(key)))
                return self.txn.get(table, key)

        with backend.read() as txn:
            counting = Counting(txn)
            walker = PageWalker(counting, check_pages=True)
            assert walker.ids(blob, {}) == walker.ids(other, {}) == all_ids
            assert walker.walk(other).complete
            assert sorted(counting.gets) == sorted((Table.PAGES, pid) for pid in page_ids)


# ---------------------------------------------------------------------------------------------------
# the engines
# ---------------------------------------------------------------------------------------------------

READER_SCRIPT = r"""
import sys
from castore.format.keys import step_key
from castore.format.schema import Table
from castore.storage.lmdb_engine import LmdbBackend

def items(txn, table):
    return [(bytes(k), bytes(v)) for k, v in txn.scan(table)]

def check(txn):
    steps, info = items(txn, Table.STEPS), items(txn, Table.STEPINFO)
    n = len(steps)
    ok = (steps == info and txn.count(Table.STEPS) == txn.count(Table.STEPINFO) == n
          and [k for k, _ in steps] == [step_key(i) for i in range(n)]
          and (n == 0 or bytes(txn.get(Table.STEPINFO, step_key(0))) == ("rev%d" % (n - 1)).encode()))
    return ok, n

backend = LmdbBackend.open(sys.argv[1], create=False, readonly=True)
print("ready", flush=True)
while True:
    words = sys.stdin.readline().split() or ["quit"]
    if words[0] == "pause":  # a snapshot the parent commits a write in the middle of
        with backend.read() as txn:
            gen, before = txn.generation, items(txn, Table.STEPS)
            print("inside", len(before), gen, flush=True)
            if sys.stdin.readline().strip() != "committed":
                sys.exit("protocol")
            ok, n = check(txn)
            ok = ok and items(txn, Table.STEPS) == before and txn.generation == gen
        print("snapshot", int(ok), n, flush=True)
    elif words[0] == "free":  # snapshots until the last write shows, bounded
        target, bound = int(words[1]), int(words[2])
        bad, last_gen, monotonic, n, snapshots = 0, 0, 1, -1, 0
        print("running", flush=True)
        while n != target and snapshots < bound:
            snapshots += 1
            with backend.read() as txn:
                ok, n = check(txn)
                bad += not ok
                monotonic &= txn.generation >= last_gen
                last_gen = txn.generation
        print("done", bad, monotonic, n, snapshots, flush=True)
    elif words[0] == "quit":
        break
backend.close()
"""


class Child:
    """A reader process spoken to by lines; every wait for a line is bounded."""

    def __init__(self, *args):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", READER_SCRIPT, *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.lines: queue.Queue = queue.Queue()
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, word: str) -> list[str]:
        try:
            line = self.lines.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"reader process sent nothing for {WAIT} s, expecting {word!r}") from None
        if line is None:
            self.proc.wait(WAIT)
            raise AssertionError(f"reader process ended ({self.proc.returncode}): {self.proc.stderr.read()}")
        words = line.split()
        assert words and words[0] == word, line
        return words[1:]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)
        self._pump.join(WAIT)  # it reads to the end of the dead process's output
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()


class TestLmdbBackend(BackendContract):
    RERUNS = True
    FREE_WRITES = 60

    @pytest.fixture
    def location(self, tmp_path):
        return str(tmp_path / "store")

    def open_store(self, location, **kwargs):
        return LmdbBackend.open(location, **kwargs)

    def backend_url(self, location):
        return location

    def prepare_rerun(self, monkeypatch):
        # a 1 MiB map and little slack: a write of 4 MiB fills the map twice before it fits
        monkeypatch.setattr(lmdb_engine, "INITIAL_MAP_BYTES", 1 << 20)
        monkeypatch.setattr(lmdb_engine, "RESERVE_SLACK", 64 << 10)
        return 4 << 20

    def test_put_new_in_a_rerun_reports_the_committed_state(self, opener, monkeypatch):
        big = self.prepare_rerun(monkeypatch)
        backend = opener()
        assert backend.map_size() == 1 << 20
        put_all(backend, Table.CHUNKS, {b"old": b"o"})
        reports = []

        def fn(txn):
            reports.append((txn.put_new(Table.CHUNKS, b"old", b"x"), txn.put_new(Table.CHUNKS, b"new", b"n")))
            txn.put(Table.PAGES, b"big", b"\xab" * big)
            return reports[-1]

        assert backend.write(fn) == (False, True)
        assert len(reports) >= 2 and set(reports) == {(False, True)}
        assert backend.map_size() > 1 << 20
        with backend.read() as txn:
            assert items(txn, Table.CHUNKS) == [(b"new", b"n"), (b"old", b"o")]
            assert len(txn.get(Table.PAGES, b"big")) == big

    def test_a_write_that_must_grow_the_map_inside_a_snapshot_is_refused_not_hung(self, opener, monkeypatch):
        big = self.prepare_rerun(monkeypatch)
        backend = opener()
        with backend.read() as txn:
            with pytest.raises(castore.UsageError, match="must grow"):
                backend.write(lambda w: w.put(Table.PAGES, b"big", b"\xab" * big))
            assert txn.get(Table.PAGES, b"big") is None
        backend.write(lambda w: w.put(Table.PAGES, b"big", b"\xab" * big))  # after the snapshot it grows
        with backend.read() as txn:
            assert len(txn.get(Table.PAGES, b"big")) == big

    def test_snapshots_of_a_thread_nest_while_another_thread_grows_the_map(self, opener, monkeypatch):
        big = self.prepare_rerun(monkeypatch)
        backend = opener()
        backend.write(lambda w: w.put(Table.STEPS, b"k", b"v"))
        grown = threading.Event()

        def grow():
            backend.write(lambda w: w.put(Table.PAGES, b"big", b"\xab" * big))
            grown.set()

        with backend.read() as outer:
            writer = threading.Thread(target=grow, daemon=True)
            writer.start()
            assert not grown.wait(0.2)  # the resize waits for this thread's snapshot...
            with backend.read() as inner:  # ...and a nested snapshot does not wait for the resize
                assert bytes(inner.get(Table.STEPS, b"k")) == b"v"
            assert outer.get(Table.PAGES, b"big") is None
        assert grown.wait(WAIT), "the map never grew after the snapshots ended"
        writer.join(WAIT)
        with backend.read() as txn:
            assert len(txn.get(Table.PAGES, b"big")) == big

    def test_reader_process_sees_only_whole_writes(self, backend, location):
        lockstep, free = 10, 40
        self.commit_step(backend, 0)
        with Child(location) as child:
            child.expect("ready")
            for i in range(1, lockstep + 1):
                child.send("pause")
                n, gen = map(int, child.expect("inside"))
                assert n == i and gen == backend.generation()
                self.commit_step(backend, i)
                child.send("committed")
                ok, n = map(int, child.expect("snapshot"))
                assert ok and n == i, "the reader's snapshot changed under it or its tables disagreed"
            target = lockstep + free + 1
            child.send(f"free {target} 1000000")
            child.expect("running")
            for i in range(lockstep + 1, target):
                self.commit_step(backend, i)
            bad, monotonic, n, snapshots = map(int, child.expect("done"))
            assert bad == 0 and monotonic == 1
            assert n == target and snapshots >= 1
            child.send("quit")
            assert child.proc.wait(WAIT) == 0, child.proc.stderr.read()

    def test_writer_lock_admits_one_process(self, backend, location):
        assert backend.acquire_writer() is True
        script = (
            "import sys, castore\n"
            "from castore.storage.lmdb_engine import LmdbBackend\n"
            "b = LmdbBackend.open(sys.argv[1], create=False)\n"
            "try:\n"
            "    b.acquire_writer(timeout=0)\n"
            "except castore.StoreLockedError as e:\n"
            "    print('locked', e.pid)\n"
            "else:\n"
            "    print('acquired')\n"
        )
        done = subprocess.run([sys.executable, "-c", script, location], capture_output=True, text=True, timeout=WAIT)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["locked", str(os.getpid())]


class TestMemoryBackend(BackendContract):
    RERUNS = False

    @pytest.fixture
    def location(self):
        name = f"contract-{uuid.uuid4().hex}"
        yield name
        memory.discard(name)

    def open_store(self, location, **kwargs):
        return MemoryBackend.open(location, **kwargs)

    def backend_url(self, location):
        return memory.SCHEME + location

    def test_discard_forgets_the_store(self, backend, opener, location):
        backend.write(lambda txn: txn.put(Table.STEPS, b"k", b"v"))
        self.close_all(opener)
        memory.discard(location)
        fresh = opener()
        assert fresh is not backend
        with fresh.read() as txn:
            assert txn.count(Table.STEPS) == 0

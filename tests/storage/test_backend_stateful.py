"""Model-based test of the storage contract: random writes, failing writes, snapshots and
scans against each engine and a plain dict-of-dicts model, compared after every step.

Each engine gets its own machine (a fresh store per example); the budget is kept small so
each runs in a few seconds (every LMDB commit syncs).
"""

from __future__ import annotations

import bisect
import shutil
import tempfile
import uuid

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from castore.format.schema import Table
from castore.storage import LmdbBackend, MemoryBackend, memory

TABLES = (Table.STEPS, Table.CHUNKS, Table.META)

# keys from a few bytes, so that operations collide and ranges hit edges (0x00, 0x7f/0x80, 0xff);
# LMDB refuses empty keys, so every key has at least one byte
key_st = st.lists(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF]), min_size=1, max_size=3).map(bytes)
bound_st = st.one_of(st.none(), st.lists(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]), max_size=3).map(bytes))
value_st = st.binary(max_size=24)
op_st = st.tuples(st.sampled_from(["put", "put_new", "delete"]), st.sampled_from(TABLES), key_st, value_st)
ops_st = st.lists(op_st, min_size=1, max_size=8)


class Boom(Exception):
    pass


def apply(model: dict, ops) -> list:
    """Apply ``ops`` to a dict-of-dicts model; what each op returns (None, or put_new/delete's bool)."""
    results = []
    for op, table, key, value in ops:
        data = model[table]
        if op == "put":
            data[key] = value
            results.append(None)
        elif op == "put_new":
            results.append(key not in data)
            data.setdefault(key, value)
        else:
            results.append(data.pop(key, None) is not None)
    return results


def model_scan(data: dict, start: bytes, stop: bytes | None, reverse: bool) -> list:
    ordered = sorted(data)
    lo = bisect.bisect_left(ordered, start)
    hi = len(ordered) if stop is None else max(lo, bisect.bisect_left(ordered, stop))
    span = ordered[lo:hi]
    return [(k, data[k]) for k in (reversed(span) if reverse else span)]


def snapshot(txn) -> dict:
    return {table: [(bytes(k), bytes(v)) for k, v in txn.scan(table)] for table in TABLES}


def model_items(model: dict) -> dict:
    return {table: sorted(model[table].items()) for table in TABLES}


class BackendMachine(RuleBasedStateMachine):
    """The machine every engine runs; subclasses open and remove the store."""

    #: whether a write may run fn more than once
    RERUNS = False

    def open_store(self):
        raise NotImplementedError

    def remove_store(self) -> None:
        raise NotImplementedError

    def __init__(self):
        super().__init__()
        self.backend = self.open_store()
        self.model = {table: {} for table in TABLES}
        self.generation = self.backend.generation()
        self.held = None  # (read txn context, txn, model as of its snapshot)

    def teardown(self):
        if self.held is not None:
            self.held[0].__exit__(None, None, None)
        self.backend.close()
        self.remove_store()

    def _run(self, ops, *, fail: bool):
        committed = {table: dict(data) for table, data in self.model.items()}
        runs = []

        def fn(txn):
            scratch = {table: dict(data) for table, data in committed.items()}  # each run starts anew
            got = []
            for op, table, key, value in ops:
                if op == "put":
                    got.append(txn.put(table, key, value))
                elif op == "put_new":
                    got.append(txn.put_new(table, key, value))
                else:
                    got.append(txn.delete(table, key))
                apply(scratch, [(op, table, key, value)])
                now = txn.get(table, key)
                assert (None if now is None else bytes(now)) == scratch[table].get(key)
            assert snapshot(txn) == model_items(scratch)  # a write transaction sees its own writes
            assert all(txn.count(t) == len(scratch[t]) for t in TABLES)
            runs.append(got)
            if fail:
                raise Boom()
            return got

        expected = apply({table: dict(data) for table, data in committed.items()}, ops)
        if fail:
            try:
                self.backend.write(fn)
            except Boom:
                pass
            else:
                raise AssertionError("the error of fn did not propagate")
        else:
            assert self.backend.write(fn) == expected
            apply(self.model, ops)
        assert runs and runs[-1] == expected
        if not self.RERUNS:
            assert len(runs) == 1

    @rule(ops=ops_st)
    def write(self, ops):
        before = self.backend.generation()
        self._run(ops, fail=False)
        assert self.backend.generation() >= before

    @rule(ops=ops_st)
    def failing_write(self, ops):
        before = self.backend.generation()
        self._run(ops, fail=True)
        assert self.backend.generation() == before

    @rule(table=st.sampled_from(TABLES), key=key_st, value=value_st)
    def put_new_twice(self, table, key, value):
        had = self.model[table].get(key)
        first, second = self.backend.write(
            lambda txn: (txn.put_new(table, key, value), txn.put_new(table, key, value + b"!"))
        )
        assert (first, second) == (had is None, False)
        self.model[table].setdefault(key, value)

    @rule(table=st.sampled_from(TABLES), start=bound_st, stop=bound_st, reverse=st.booleans())
    def scan(self, table, start, stop, reverse):
        start = start or b""
        with self.backend.read() as txn:
            got = [(bytes(k), bytes(v)) for k, v in txn.scan(table, start, stop, reverse=reverse)]
        assert got == model_scan(self.model[table], start, stop, reverse)

    @precondition(lambda self: self.held is None)
    @rule()
    def begin_snapshot(self):
        context = self.backend.read()
        txn = context.__enter__()
        self.held = (context, txn, {table: dict(data) for table, data in self.model.items()})

    @precondition(lambda self: self.held is not None)
    @rule(table=st.sampled_from(TABLES), start=bound_st, stop=bound_st, reverse=st.booleans())
    def check_and_end_snapshot(self, table, start, stop, reverse):
        context, txn, then = self.held
        self.held = None
        try:
            assert snapshot(txn) == model_items(then)
            assert all(txn.count(t) == len(then[t]) for t in TABLES)
            start = start or b""
            got = [(bytes(k), bytes(v)) for k, v in txn.scan(table, start, stop, reverse=reverse)]
            assert got == model_scan(then[table], start, stop, reverse)
        finally:
            context.__exit__(None, None, None)

    @invariant()
    def matches_the_model(self):
        with self.backend.read() as txn:
            assert snapshot(txn) == model_items(self.model)
            for table in TABLES:
                assert txn.count(table) == len(self.model[table])
            assert txn.get(Table.STEPS, b"\x80\x80\x80\x80") is None  # a key no rule writes
            assert txn.generation >= self.generation
            self.generation = txn.generation
        if self.held is not None:
            assert self.held[1].generation <= self.generation


SETTINGS = settings(
    max_examples=20,
    stateful_step_count=20,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class LmdbMachine(BackendMachine):
    RERUNS = True

    def open_store(self):
        self.directory = tempfile.mkdtemp(prefix="castore-contract-")
        return LmdbBackend.open(self.directory)

    def remove_store(self):
        shutil.rmtree(self.directory, ignore_errors=True)


class MemoryMachine(BackendMachine):
    def open_store(self):
        self.name = f"contract-machine-{uuid.uuid4().hex}"
        return MemoryBackend.open(self.name)

    def remove_store(self):
        memory.discard(self.name)


TestLmdbMachine = LmdbMachine.TestCase
TestLmdbMachine.settings = SETTINGS
TestMemoryMachine = MemoryMachine.TestCase
TestMemoryMachine.settings = settings(SETTINGS, max_examples=60, stateful_step_count=30)  # no syncs: cheap

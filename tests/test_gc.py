"""Garbage collection: plans that free exactly the garbage, pins, crash safety, plateaus.

The oracles here are independent of castore's bookkeeping: the chunk ids a state must be
stored under are BLAKE3 digests of its 4096-byte slices (and of its chunk-list pages),
computed by the tests, and what the store holds is read straight from its LMDB databases.

The SIGKILL instants come from ``random.Random`` seeded by ``CASTORE_GC_SEED``::

    CASTORE_GC_SEED=1234 pytest tests/test_gc.py -k sigkill -s
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time

import blake3
import lmdb
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # workload.py beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workload import Child, assert_state_equal, fingerprint

import castore
import castore.maintenance.gc
import castore.maintenance.maintainer
import castore.save.pipeline
from castore import Keep
from castore.format.manifest import ChunkedBlob, PagedBlob, decode_manifest, iter_blobs
from castore.format.schema import (
    STORE_FORMAT,
    Table,
)
from castore.storage import memory

SEED = int(os.environ.get("CASTORE_GC_SEED", "20240917"))
CHUNK = 4096  # chunk_bytes of every store here: many chunks from small arrays
ROW = 1024  # bytes per row of the uint8 test arrays: 4 rows per chunk
INLINE_MAX = 512  # leaves up to this size live in the manifest (codec.Encoder.inline_max)
INLINE_IDS = 64  # blobs of more chunks list their ids in chunk-list pages
PAGE_IDS = 256  # ids per page
DEFER_PREFIX = b"gc-defer"


# --- independent oracles ---------------------------------------------------------------------


def digest(data) -> bytes:
    return blake3.blake3(bytes(data)).digest()


def blob_ids(data: bytes) -> tuple[list[bytes], list[bytes]]:
    """``(chunk ids, page ids)`` castore must store a leaf of these bytes under.

    Every array here has rows that divide 4096 bytes, so a leaf over 4096 bytes is cut in
    4096-byte chunks and a smaller one is a single chunk; leaves up to 512 bytes are inline.
    """
    if len(data) <= INLINE_MAX:
        return [], []
    stride = len(data) if len(data) <= CHUNK else CHUNK
    ids = [digest(data[i : i + stride]) for i in range(0, len(data), stride)]
    pages = []
    if len(ids) > INLINE_IDS:
        pages = [digest(b"".join(ids[i : i + PAGE_IDS])) for i in range(0, len(ids), PAGE_IDS)]
    return ids, pages


def leaves(tree, path: str = ""):
    """``(path, bytes)`` of every array leaf of a state tree (paths as castore joins them)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from leaves(value, f"{path}/{key}" if path else key)
    elif isinstance(tree, np.ndarray):
        yield path, np.ascontiguousarray(tree).tobytes()


def state_ids(state) -> tuple[set, set, dict]:
    """``(chunk ids, page ids, {leaf path: chunk ids})`` of a state."""
    chunks, pages, by_path = set(), set(), {}
    for path, data in leaves(state):
        ids, pids = blob_ids(data)
        chunks.update(ids)
        pages.update(pids)
        if ids:
            by_path[path] = set(ids)
    return chunks, pages, by_path


def db_items(store: castore.Store, name: str) -> dict[bytes, int]:
    """``{key: value size}`` of one of the store's LMDB databases (empty if it does not exist)."""
    return {k: len(v) for k, v in store.inspect().items(Table(name)).items()}


def journal_ids(store: castore.Store) -> dict[bytes, set]:
    """``{journal key: ids it lists}`` (entries are ``tag + id`` records)."""
    out = {}
    for key, raw in store.inspect().items(Table.JOURNAL).items():
        assert len(raw) % 33 == 0, f"journal entry {key!r} is malformed"
        out[key] = {raw[i + 1 : i + 33] for i in range(0, len(raw), 33)}
    return out


def live_ids(store: castore.Store) -> tuple[set, set]:
    """Chunk and page ids named by the committed steps, read from manifests and pages."""
    chunks, pages = set(), set()
    with store.backend.read() as txn:
        for _, raw in txn.scan(Table.STEPS):
            manifest = decode_manifest(bytes(raw))
            for _, node in manifest.components:
                for blob in iter_blobs(node):
                    if isinstance(blob, ChunkedBlob):
                        chunks.update(split(blob.ids))
                    elif isinstance(blob, PagedBlob):
                        for pid in split(blob.page_ids):
                            pages.add(pid)
                            page = txn.get(Table.PAGES, pid)
                            assert page is not None, "a live chunk-list page is missing"
                            chunks.update(split(bytes(page)))
    return chunks, pages


def split(packed) -> list[bytes]:
    packed = bytes(packed)
    return [packed[i : i + 32] for i in range(0, len(packed), 32)]


def assert_counters_match(store: castore.Store) -> None:
    """``stats()`` (kept in ``meta/counters``) agrees with what the databases hold."""
    chunks, pages = db_items(store, "chunks"), db_items(store, "pages")
    stats = store.stats()
    assert stats.chunks == len(chunks) + len(pages), (
        f"counter says {stats.chunks} chunks, dbs hold {len(chunks)} + {len(pages)} pages"
    )
    assert stats.stored_bytes == sum(chunks.values()) + sum(pages.values())


def assert_no_garbage(store: castore.Store, pinned: set = frozenset()) -> None:
    """Every chunk and page held is named by a committed step (or pinned), nothing is pending."""
    live_c, live_p = live_ids(store)
    assert set(db_items(store, "chunks")) == live_c | (pinned & set(db_items(store, "chunks")))
    assert set(db_items(store, "pages")) == live_p
    assert db_items(store, "trash") == {}
    assert all(k.startswith(DEFER_PREFIX) for k in db_items(store, "journal"))
    assert_counters_match(store)


def rows(seed, count: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, ROW), dtype=np.uint8)


def read_config(store: castore.Store) -> dict:
    return msgpack.unpackb(store.inspect().get(Table.META, b"config"), raw=False)


# --- 1. a stateful model -------------------------------------------------------------------------

POOL = np.random.default_rng(7).integers(0, 256, (10, 4, ROW), dtype=np.uint8)  # 10 one-chunk blocks
TAIL = np.random.default_rng(8).integers(0, 256, (6, ROW), dtype=np.uint8)  # rows of a short last chunk
STEPS = st.integers(0, 7)
TAGS = st.sampled_from(["best", "keep-me"])
KEEPS = st.one_of(
    st.integers(1, 3),
    st.builds(Keep, last=st.integers(1, 3)),
    st.builds(Keep, every=st.integers(2, 4)),
    st.builds(
        lambda n, mode: Keep(best=n, metric="loss", mode=mode), st.integers(1, 2), st.sampled_from(["min", "max"])
    ),
    st.just(Keep(last=1, every=3)),
)


@st.composite
def states(draw):
    """Small states whose chunks overlap across steps: arrays of blocks from a pool of 10."""
    blocks = draw(st.lists(st.integers(0, 9), min_size=1, max_size=5))
    tail = draw(st.lists(st.integers(0, 5), max_size=3))
    x = np.concatenate([POOL[b] for b in blocks] + ([TAIL[tail]] if tail else []))
    y = np.random.default_rng([9, draw(st.integers(0, 2))]).standard_normal(300).astype(np.float32)
    state = {"model": {"x": x, "y": y}}
    big = draw(st.none() | st.tuples(st.integers(1, 3), st.integers(0, 2)))
    if big is not None:  # 70 chunks: its ids go to a chunk-list page
        a, b = big
        state["big"] = {"p": np.concatenate([POOL[(a * i + b) % 10] for i in range(70)])}
    state["meta"] = {"lr": draw(st.sampled_from([0.1, 0.25])), "name": draw(st.sampled_from(["a", "b"]))}
    return state


class GcMachine(RuleBasedStateMachine):
    """A real Store against a dict model {step: state}; after every GC nothing is garbage."""

    engine = "lmdb"

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="castore-gc-model-")
        if self.engine == "memory":
            self.path = f"memory://gc-model-{os.path.basename(self.dir)}"
        else:
            self.path = os.path.join(self.dir, "store")
        self.store = castore.Store(self.path, chunk_bytes=CHUNK)
        self.states: dict[int, dict] = {}
        self.ids: dict[int, tuple[set, set]] = {}
        self.metrics: dict[int, dict] = {}
        self.tagged: dict[str, int] = {}
        self.trashed: set[int] = set()  # steps deleted or overwritten since the last GC
        self.baselines: dict[str, set] = {}  # leaf path -> ids of its last committed save
        self.collected = False  # nothing happened since a GC

    def teardown(self):
        try:
            self.store.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            memory.discard(self.path.removeprefix("memory://"))

    # -- the model ----------------------------------------------------------------------------

    def live(self) -> tuple[set, set]:
        chunks, pages = set(), set()
        for c, p in self.ids.values():
            chunks |= c
            pages |= p
        return chunks, pages

    def pinned(self) -> set:
        return set().union(*self.baselines.values()) if self.baselines else set()

    def remember(self, state) -> None:
        self.baselines.update(state_ids(state)[2])

    def commit(self, step: int, state, metrics) -> None:
        chunks, pages, _ = state_ids(state)
        self.states[step], self.ids[step], self.metrics[step] = state, (chunks, pages), metrics or {}
        self.remember(state)

    def forget(self, step: int) -> None:
        del self.states[step], self.ids[step], self.metrics[step]

    def expected_kept(self, keep) -> set:
        steps = sorted(self.states)
        if not steps:
            return set()
        if isinstance(keep, int):
            keep = Keep(last=keep)
        kept = {steps[-1]} | set(self.tagged.values())
        if keep.last:
            kept |= set(steps[-keep.last :])
        if keep.every:
            buckets = {}
            for step in steps:
                buckets.setdefault(step // keep.every, step)
            kept |= set(buckets.values())
        if keep.best:
            scored = [s for s in steps if "loss" in self.metrics[s]]
            sign = -1 if keep.mode == "max" else 1
            scored.sort(key=lambda s: (sign * self.metrics[s]["loss"], -s))
            kept |= set(scored[: keep.best])
        return kept

    # -- rules ----------------------------------------------------------------------------------

    @initialize(first=st.lists(states(), min_size=2, max_size=4))
    def save_a_few(self, first):
        for step, state in enumerate(first):
            self.store.save(step, state)
            self.commit(step, state, None)

    @rule(
        step=STEPS,
        state=states(),
        overwrite=st.booleans(),
        use_async=st.booleans(),
        loss=st.none() | st.sampled_from([0.5, 1.0, 2.0]),
    )
    def save(self, step, state, overwrite, use_async, loss):
        metrics = None if loss is None else {"loss": loss}

        def call():
            if use_async:
                return self.store.save_async(step, state, overwrite=overwrite, metrics=metrics).result()
            return self.store.save(step, state, overwrite=overwrite, metrics=metrics)

        exists = step in self.states
        same = exists and fingerprint(state) == fingerprint(self.states[step])
        self.collected = False
        if exists and not overwrite and not same:
            with pytest.raises(castore.StepExistsError):
                call()  # its new chunks were written first: garbage now, listed in the journal
        elif exists and not overwrite:
            call()  # the same state again: a no-op (its metrics stay)
            self.remember(state)
        else:
            call()
            if exists:
                self.trashed.add(step)
            self.commit(step, state, metrics)

    @precondition(lambda self: self.states)
    @rule(data=st.data(), overwrite=st.booleans())
    def save_same_again(self, data, overwrite):
        step = data.draw(st.sampled_from(sorted(self.states)))
        state = self.states[step]
        self.store.save(step, state, overwrite=overwrite)
        self.collected = False
        if overwrite:  # commits again: the old manifest goes to the trash (its chunks stay live)
            self.trashed.add(step)
            self.commit(step, state, None)
        else:
            self.remember(state)

    @rule(step=STEPS, blocks=st.lists(st.integers(0, 9), min_size=1, max_size=4), seed=st.integers(0, 3))
    def failed_sharded_save(self, step, blocks, seed):
        """Two shards are committed (their chunks journaled), then the generator fails."""

        def shards():
            yield {"rows": np.concatenate([POOL[b] for b in blocks])}
            yield {"rows": rows([11, seed], 8)}
            raise RuntimeError("data loader broke")

        with pytest.raises(RuntimeError, match="loader broke"):
            self.store.save(step, {"s": shards()})
        self.collected = False

    @rule(step=STEPS)
    def delete(self, step):
        if step not in self.states:
            with pytest.raises(castore.StepNotFoundError):
                self.store.delete(step)
        elif step in self.tagged.values():
            with pytest.raises(castore.UsageError):
                self.store.delete(step)
        else:
            self.store.delete(step)
            self.forget(step)
            self.trashed.add(step)
            self.collected = False

    @rule(name=TAGS, step=STEPS)
    def tag(self, name, step):
        if step not in self.states:
            with pytest.raises(castore.StepNotFoundError):
                self.store.tag(name, step)
        else:
            assert self.store.tag(name, step) == step
            self.tagged[name] = step

    @rule(name=TAGS)
    def untag(self, name):
        if name in self.tagged:
            self.store.untag(name)
            del self.tagged[name]
        else:
            with pytest.raises(castore.StepNotFoundError):
                self.store.untag(name)

    @rule(pass_plan=st.booleans())
    def gc(self, pass_plan):
        live_c, live_p = self.live()
        pinned = self.pinned()
        chunks, pages = db_items(self.store, "chunks"), db_items(self.store, "pages")
        before = self.store.stats()
        plan = self.store.plan_gc()
        # A dry run frees nothing ...
        assert db_items(self.store, "chunks") == chunks and db_items(self.store, "pages") == pages
        assert self.store.stats().stored_bytes == before.stored_bytes
        # ... and plans exactly the garbage: held, not named by a kept step, not pinned.
        garbage = set(chunks) - live_c
        assert set(plan.chunks) == garbage - pinned
        assert set(plan.deferred) == garbage & pinned
        assert set(plan.pages) == set(pages) - live_p
        assert plan.freed_bytes == sum(chunks[c] for c in plan.chunks) + sum(pages[p] for p in plan.pages)
        assert plan.steps == tuple(sorted(self.trashed))
        for what in ("chunks", "pages", "deferred", "journal_keys", "trash_keys"):
            event(f"gc plan has {what}: {bool(getattr(plan, what))}")
        done = self.store.gc(plan if pass_plan else None)
        assert (set(done.chunks), set(done.pages)) == (set(plan.chunks), set(plan.pages))
        after = self.store.stats()
        assert before.stored_bytes - after.stored_bytes == plan.freed_bytes
        assert before.chunks - after.chunks == len(plan.chunks) + len(plan.pages)
        self.trashed.clear()
        self.collected = True

    @rule(keep=KEEPS)
    def retain(self, keep):
        expected = sorted(set(self.states) - self.expected_kept(keep))
        assert self.store.retain(keep) == expected
        for step in expected:
            self.forget(step)
        self.trashed.clear()  # retain collects
        self.collected = True

    @rule(dice=st.integers(0, 3))
    def reopen(self, dice):
        if dice:  # a quarter as often as the other rules: pins live within a session
            return
        self.store.close()
        self.store = castore.Store(self.path)
        self.baselines.clear()  # a new writer session remembers nothing
        self.collected = False

    @rule(step=STEPS)
    def load_one(self, step):
        if step not in self.states:
            with pytest.raises(castore.StepNotFoundError):
                self.store.load(step)
        else:
            loaded = self.store.load(step, keys="model", verify=True)
            assert_state_equal(loaded, {"model": self.states[step]["model"]})

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def store_matches_model(self):
        assert self.store.steps() == sorted(self.states)
        for step, state in self.states.items():
            assert_state_equal(self.store.load(step, verify=True), state, f"<step {step}>")
            assert self.store.metrics(step) == self.metrics[step]
        assert self.store.tags() == self.tagged
        assert_counters_match(self.store)
        chunks, pages = set(db_items(self.store, "chunks")), set(db_items(self.store, "pages"))
        live_c, live_p = self.live()
        pinned = self.pinned()
        assert self.store.inspect().pinned_ids() == pinned, "pins are not the ids of each leaf's last save"
        assert live_c | pinned <= chunks, "a chunk a step names or a baseline may reuse is gone"
        assert live_p <= pages
        if self.collected:  # no garbage left: only pinned chunks no step names
            assert chunks == live_c | pinned
            assert pages == live_p
            assert db_items(self.store, "trash") == {}
            assert all(k.startswith(DEFER_PREFIX) for k in db_items(self.store, "journal"))
            again = self.store.plan_gc()
            assert (again.chunks, again.pages, again.trash_keys, again.steps, again.freed_bytes) == ((), (), (), (), 0)
            assert set(again.deferred) == pinned - live_c


GcMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestGcStateMachine = GcMachine.TestCase


class MemoryGcMachine(GcMachine):
    """The same model on the in-memory engine: the Store above the storage seam is engine-blind."""

    engine = "memory"


MemoryGcMachine.TestCase.settings = GcMachine.TestCase.settings
TestGcStateMachineInMemory = MemoryGcMachine.TestCase


# --- 2. exactly the unique chunks ---------------------------------------------------------------


def two_steps():
    """Two states sharing most chunks: 3 chunks and 1 chunk-list page differ."""
    paged = rows(21, 80 * 4)  # 80 chunks: ids in a page
    small = rows(22, 16)  # 4 chunks: ids inline
    shared = rows(23, 32)
    s1 = {"a": {"p": paged, "s": small, "shared": shared}, "n": 1}
    paged2, small2 = paged.copy(), small.copy()
    paged2[0], paged2[41] = 1, 2  # chunks 0 and 10
    small2[5] += 1  # chunk 1
    s2 = {"a": {"p": paged2, "s": small2, "shared": shared}, "n": 2}
    return s1, s2


def test_gc_frees_exactly_the_chunks_only_the_deleted_step_had(tmp_path):
    s1, s2 = two_steps()
    c1, p1, _ = state_ids(s1)
    c2, p2, _ = state_ids(s2)
    assert len(c1 - c2) == 3 and len(p1 - p2) == 1 and len(c1 & c2) == 89
    with castore.Store(tmp_path / "store", chunk_bytes=CHUNK) as store:
        store.save(1, s1)
        store.save(2, s2)
        assert set(db_items(store, "chunks")) == c1 | c2
        store.delete(1)
        chunks, pages = db_items(store, "chunks"), db_items(store, "pages")
        before = store.stats()
        plan = store.plan_gc()
        assert plan.steps == (1,)
        assert set(plan.chunks) == c1 - c2 and len(plan.chunks) == 3
        assert set(plan.pages) == p1 - p2 and len(plan.pages) == 1
        assert plan.deferred == () and plan.journal_keys == () and len(plan.trash_keys) == 1
        assert plan.freed_bytes == 3 * CHUNK + 80 * 32  # three chunks and a page of 80 ids
        # a dry run frees nothing
        assert db_items(store, "chunks") == chunks and db_items(store, "pages") == pages
        assert (store.stats().chunks, store.stats().stored_bytes) == (before.chunks, before.stored_bytes)
        assert db_items(store, "trash") != {}
        done = store.gc()
        assert (set(done.chunks), set(done.pages), done.freed_bytes) == (c1 - c2, p1 - p2, plan.freed_bytes)
        after = store.stats()
        assert after.chunks == before.chunks - 4
        assert after.stored_bytes == before.stored_bytes - plan.freed_bytes
        assert set(db_items(store, "chunks")) == c2 and set(db_items(store, "pages")) == p2
        assert_state_equal(store.load(2, verify=True), s2)
        with pytest.raises(castore.StepNotFoundError):
            store.load(1)
        assert store.plan_gc().is_empty
        assert_no_garbage(store)


def test_gc_replans_a_stale_plan_instead_of_freeing_chunks_a_later_save_reused(tmp_path):
    s1, s2 = two_steps()
    with castore.Store(tmp_path / "store", chunk_bytes=CHUNK) as store:
        store.save(1, s1)
        store.save(2, s2)
        store.delete(1)
        plan = store.plan_gc()
        assert len(plan.chunks) == 3
        result = store.save(3, s1)  # step 1's content again: its garbage chunks are reused
        assert result.new_chunks == 0
        done = store.gc(plan)
        assert done.generation != plan.generation and done.chunks == () and done.pages == ()
        assert_state_equal(store.load(3, verify=True), s1)
        assert_state_equal(store.load(2, verify=True), s2)
        assert_no_garbage(store)


# --- 3. failed saves -------------------------------------------------------------------------------


def assert_garbage_is_journaled(store: castore.Store) -> set:
    """Every held chunk no step names is listed in the journal (or trash); returns them."""
    live_c, live_p = live_ids(store)
    listed = set().union(*journal_ids(store).values()) if journal_ids(store) else set()
    unreferenced = (set(db_items(store, "chunks")) - live_c) | (set(db_items(store, "pages")) - live_p)
    assert db_items(store, "trash") == {}
    assert unreferenced <= listed, f"{len(unreferenced - listed)} unreferenced chunks are in no journal entry"
    return unreferenced


def test_chunks_of_a_failed_sharded_save_are_journaled_and_collected(tmp_path):
    keep = {"w": rows(30, 64), "n": 0}
    shard1, shard2 = rows(31, 64), np.concatenate([rows(32, 32), keep["w"][:32]])  # shard 2 half reused

    def shards():
        yield {"rows": shard1}
        yield {"rows": shard2}
        raise RuntimeError("data loader broke")

    with castore.Store(tmp_path / "store", chunk_bytes=CHUNK) as store:
        store.save(0, keep)
        held, counters = set(db_items(store, "chunks")), store.stats()
        with pytest.raises(RuntimeError):
            store.save(1, {"s": shards()})
        assert store.steps() == [0]
        new = (state_ids({"a": shard1})[0] | state_ids({"b": shard2})[0]) - held
        assert len(new) == 16 + 8
        journal = journal_ids(store)
        assert journal and set().union(*journal.values()) == new  # committed in batches, all listed
        assert assert_garbage_is_journaled(store) == new
        plan = store.plan_gc()
        assert set(plan.chunks) == new and set(plan.journal_keys) == set(journal) and plan.steps == ()
        store.gc()
        assert set(db_items(store, "chunks")) == held and journal_ids(store) == {}
        assert (store.stats().chunks, store.stats().stored_bytes) == (counters.chunks, counters.stored_bytes)
        assert_state_equal(store.load(0, verify=True), keep)
        assert_no_garbage(store)


def test_a_save_refused_as_step_exists_commits_none_of_its_last_batch(tmp_path):
    first = {"w": rows(40, 64)}
    other = {"w": np.concatenate([rows(41, 16), first["w"][16:]])}  # 4 new chunks, 12 shared
    with castore.Store(tmp_path / "store", chunk_bytes=CHUNK) as store:
        store.save(1, first)
        held = set(db_items(store, "chunks"))
        generation = store.backend.generation()
        with pytest.raises(castore.StepExistsError):
            store.save(1, other)  # found to differ only once its chunks were hashed
        # The one batch was to be committed with the manifest: nothing was, not even garbage.
        assert store.backend.generation() == generation
        assert set(db_items(store, "chunks")) == held and journal_ids(store) == {}
        assert_state_equal(store.load(1, verify=True), first)
        assert_no_garbage(store)


def test_chunks_of_earlier_batches_of_a_save_refused_as_step_exists_are_collected(tmp_path, monkeypatch):
    monkeypatch.setattr(castore.save.pipeline, "BATCH_BYTES", 3 * CHUNK)  # a batch per three chunks
    first = {"w": rows(40, 64)}
    other = {"w": np.concatenate([rows(41, 16), first["w"][16:]])}  # 4 new chunks, 12 shared
    with castore.Store(tmp_path / "store", chunk_bytes=CHUNK) as store:
        store.save(1, first)
        held = set(db_items(store, "chunks"))
        with pytest.raises(castore.StepExistsError):
            store.save(1, other)
        new = state_ids(other)[0] - held
        assert len(new) == 4
        # Every batch but the last was committed (journaled): those chunks are garbage now.
        committed = set(db_items(store, "chunks")) - held
        assert committed and committed < new
        assert assert_garbage_is_journaled(store) == committed
        assert set(store.gc().chunks) == committed
        assert set(db_items(store, "chunks")) == held
        assert_state_equal(store.load(1, verify=True), first)
        assert_no_garbage(store)


def test_a_save_failing_on_an_unsupported_value_leaves_no_unlisted_garbage(tmp_path):
    with castore.Store(tmp_path / "store", chunk_bytes=CHUNK) as store:
        store.save(0, {"w": rows(50, 16)})
        tree = {"big": rows(51, 256), "later": {"bad": object()}}
        with pytest.raises(castore.UnsupportedValueError):
            store.save(1, tree)
        assert store.steps() == [0]
        assert_garbage_is_journaled(store)  # whatever was written is findable (here: nothing)
        store.gc()
        assert_no_garbage(store)
        assert store.plan_gc().is_empty
        store.save(1, {"big": rows(51, 256)})
        assert_state_equal(store.load(1, verify=True), {"big": rows(51, 256)})


def test_committed_saves_leave_no_journal_entries_and_gc_never_frees_their_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(castore.save.pipeline, "BATCH_BYTES", 16 << 10)  # a journal entry every 4 chunks
    states_ = {step: {"w": np.concatenate([rows(60, 32), rows([61, step], 32)]), "n": step} for step in range(4)}

    def shards():
        yield {"rows": states_[3]["w"]}  # step 3's chunks written by a save that fails ...
        raise RuntimeError("broke")

    with castore.Store(tmp_path / "store", chunk_bytes=CHUNK) as store:
        for step in range(3):
            store.save(step, states_[step])
            assert journal_ids(store) == {}, f"step {step} committed but its journal entries remain"
        with pytest.raises(RuntimeError):
            store.save(3, {"s": shards()})
        assert journal_ids(store)
        store.save(3, states_[3])  # ... and then by one that commits: they exist, so are reused
        assert store.plan_gc().chunks == ()
        store.gc()
        for step in range(4):
            assert_state_equal(store.load(step, verify=True), states_[step])
        assert_no_garbage(store)


# --- subprocess children -------------------------------------------------------------------------

CHILD = r"""
import sys, time
import numpy as np
import castore, castore.maintenance.gc, castore.save.pipeline

def say(*words):
    sys.stdout.write(" ".join(map(str, words)) + "\n")
    sys.stdout.flush()

mode, path = sys.argv[1], sys.argv[2]
if mode == "gc":  # collect; print before starting, so the parent can kill it shortly after
    castore.maintenance.gc.DELETE_BATCH = int(sys.argv[3])
    if len(sys.argv) > 4:  # announce a later phase, and stop in its first transaction to be killed
        phase = sys.argv[4]
        target = "_delete_entries" if phase == "entries" else "_delete_ids"
        original = getattr(castore.maintenance.gc, target)
        def paused(txn, blobs, *args, _announced=[]):
            if not _announced and (phase == "entries" or args[0] == phase):
                _announced.append(True)
                say("phase", phase)
                time.sleep(60)  # until the parent kills it, however late that comes
            return original(txn, blobs, *args)
        setattr(castore.maintenance.gc, target, paused)
    with castore.Store(path) as store:
        store.plan_gc()  # takes the writer lock first
        say("gc-start")
        started = time.perf_counter()
        plan = store.gc()
        say("gc-done", len(plan.chunks), len(plan.pages), f"{time.perf_counter() - started:.6f}")
elif mode == "stall":  # a sharded save that stalls once its first shard is committed
    step, seed = int(sys.argv[3]), int(sys.argv[4])
    def shards():
        yield {"rows": np.random.default_rng([seed, 0]).integers(0, 256, (64, 1024), dtype=np.uint8)}
        say("flushed")
        time.sleep(60)
        yield {"rows": np.zeros((8, 1024), np.uint8)}
    with castore.Store(path) as store:
        store.save(step, {"s": shards()})
elif mode == "save":  # one save in small chunk transactions
    castore.save.pipeline.BATCH_BYTES = 64 << 10
    step, seed = int(sys.argv[3]), int(sys.argv[4])
    state = {"w": np.random.default_rng([seed, 1]).integers(0, 256, (2048, 1024), dtype=np.uint8)}
    with castore.Store(path) as store:
        say("saving", step)
        store.save(step, state)
        say("committed", step)
"""


def gc_child(command: str, store, *args) -> Child:
    """The ``CHILD`` script in a subprocess (workload's Child: stdout lines, kill, reap)."""
    return Child(command, store, *args, script=CHILD)


def test_chunks_of_a_killed_save_are_journaled_and_collected(tmp_path):
    path = tmp_path / "store"
    kept = {"w": rows(70, 64)}
    with castore.Store(path, chunk_bytes=CHUNK) as store:
        store.save(0, kept)
        held = set(db_items(store, "chunks"))
    with gc_child("stall", path, 1, 71) as child:  # killed once its first shard is committed
        child.expect("flushed", 30)
        assert child.kill() == -9
    shard = np.random.default_rng([71, 0]).integers(0, 256, (64, 1024), dtype=np.uint8)
    with castore.Store(path) as store:
        assert store.steps() == [0]
        new = state_ids({"s": shard})[0]
        assert set(db_items(store, "chunks")) == held | new
        assert set().union(*journal_ids(store).values()) == new
        assert set(store.gc().chunks) == new
        assert set(db_items(store, "chunks")) == held
        assert_state_equal(store.load(0, verify=True), kept)
        assert_no_garbage(store)
    # Kills at random instants of a save in small transactions: whatever it left is journaled.
    rng = random.Random(SEED)
    outcomes = collections.Counter()
    for attempt in range(4):
        step = attempt + 1
        with gc_child("save", path, step, 72 + attempt) as child:
            child.expect("saving", 30)
            time.sleep(rng.uniform(0.0, 0.05))
            child.kill()
            committed = bool(child.words("committed"))
        state = {"w": np.random.default_rng([72 + attempt, 1]).integers(0, 256, (2048, 1024), dtype=np.uint8)}
        with castore.Store(path) as store:
            assert_garbage_is_journaled(store)
            if store.has_step(step):
                outcomes["committed"] += 1
                assert_state_equal(store.load(step, verify=True), state)
                store.delete(step)
            else:
                assert not committed
                outcomes["journaled" if journal_ids(store) else "nothing written"] += 1
            store.gc()
            assert_no_garbage(store)
            assert store.steps() == [0]
            assert_state_equal(store.load(0, verify=True), kept)
    print(f"killed saves (seed {SEED}): {dict(outcomes)}")


# --- 4. SIGKILL during GC -----------------------------------------------------------------------------

GC_KILLS = 22
GC_DELETE_BATCH = 4
SHARED_BLOCKS = np.random.default_rng(77).integers(0, 256, (200, 4, ROW), dtype=np.uint8)


def gc_state(step: int) -> dict:
    """400 chunks (ids in two pages): 40% from 200 blocks shared by all steps, 60% new."""
    r = np.random.default_rng([77, step])
    blocks = SHARED_BLOCKS[r.integers(0, 200, 400)]
    fresh = r.random(400) < 0.6
    blocks[fresh] = r.integers(0, 256, (int(fresh.sum()), 4, ROW), dtype=np.uint8)
    return {"w": {"a": blocks.reshape(-1, ROW), "b": r.standard_normal(64).astype(np.float32)}, "step": step}


@pytest.mark.usefixtures("drop_big_stores_of_passing_tests")
def test_sigkill_during_gc_at_random_instants_loses_no_kept_chunk(tmp_path):
    rng = random.Random(SEED)
    path = tmp_path / "store"
    digests: dict[int, str] = {}  # kept step -> fingerprint of its state
    outcomes = collections.Counter()
    gc_seconds: list[float] = []
    next_step = 0
    kills = 0
    round_ = -1
    while kills < GC_KILLS and round_ < 2 * GC_KILLS:  # round 0 measures; then until 22 kills
        round_ += 1
        # Fresh garbage: four new steps (sharing blocks with every other), then all but
        # step 0 and the newest deleted.
        with castore.Store(path, chunk_bytes=CHUNK) as store:
            for _ in range(4):
                store.save(next_step, gc_state(next_step))
                digests[next_step] = fingerprint(gc_state(next_step))
                next_step += 1
            for step in sorted(digests):
                if 0 < step < next_step - 1:
                    store.delete(step)
                    del digests[step]
        with castore.Store(path) as store:  # a new session: no pins, the plan is what the child frees
            plan = store.plan_gc()
        assert len(plan.chunks) > 200 and plan.trash_keys
        context = f"seed {SEED}, round {round_}"
        # Most kills come at a random instant of the whole collection (mostly its chunk
        # deletes); some at a random instant of a pause the child makes inside the first
        # transaction of a later phase: deleting pages, or dropping trash/journal entries.
        phase = () if round_ == 0 or rng.random() < 0.7 else (rng.choice(["pages", "entries"]),)
        with gc_child("gc", path, GC_DELETE_BATCH, *phase) as child:
            child.expect("gc-start", 30)
            if round_ == 0:  # the first run measures how long a collection takes
                assert child.finish(60) == 0, child.describe()
            else:
                if phase:
                    child.expect("phase", 30)
                    time.sleep(rng.uniform(0.0, 0.1))
                else:
                    time.sleep(rng.uniform(0.0, 1.25 * statistics.median(gc_seconds)))
                assert child.kill() == -9 or child.words("gc-done"), child.describe()
            done = child.words("gc-done")
            kills += bool(round_ and not done)  # killed inside store.gc()
            gc_seconds += [float(w[3]) for w in done] if not phase else []
        with castore.Store(path) as store:
            chunks, pages = set(db_items(store, "chunks")), set(db_items(store, "pages"))
            left_c, left_p = set(plan.chunks) & chunks, set(plan.pages) & pages
            left_t = set(plan.trash_keys) & set(db_items(store, "trash"))
            if done or not (left_c or left_p or left_t):
                outcome = "after"
            elif left_c == set(plan.chunks) and left_p == set(plan.pages) and left_t == set(plan.trash_keys):
                outcome = "before any delete"
            elif left_c:
                outcome = "mid: deleting chunks"
            elif left_p:
                outcome = "mid: deleting pages"
            else:
                outcome = "mid: dropping trash and journal entries"
            if round_:
                outcomes[outcome] += 1
            # Every kept step is intact, the counters agree with the databases, and whatever
            # the killed GC left is still found by a plan (nothing leaked).
            assert store.steps() == sorted(digests), context
            for step, expected in digests.items():
                loaded = store.load(step, verify=True)
                if fingerprint(loaded) != expected:
                    assert_state_equal(loaded, gc_state(step), f"<{context}: step {step}>")
            assert_counters_match(store)
            live_c, live_p = live_ids(store)
            again = store.plan_gc()
            assert set(again.chunks) == chunks - live_c, context
            assert set(again.pages) == pages - live_p, context
            assert again.deferred == ()
            cleanup = "parent" if kills >= GC_KILLS else rng.choice(["parent", "child", "carry over"])
            if cleanup == "parent":
                store.gc()
                assert store.plan_gc().is_empty, context
                assert_no_garbage(store)
        if cleanup == "child":
            with gc_child("gc", path, GC_DELETE_BATCH) as child:
                assert child.finish(60) == 0, child.describe()
                gc_seconds += [float(w[3]) for w in child.words("gc-done")]
            with castore.Store(path) as store:
                assert store.plan_gc().is_empty, context
                assert_no_garbage(store)
    summary = (
        f"seed {SEED}: {kills} kills during GC (median GC {statistics.median(gc_seconds) * 1000:.0f} ms): "
        f"{dict(outcomes)}"
    )
    print(summary)
    mid = sum(n for outcome, n in outcomes.items() if outcome.startswith("mid"))
    assert kills >= 20, summary
    assert mid >= 8, f"only {mid} kills landed inside a collection: {summary}"


# --- amortized collection after saves ---------------------------------------------------------------------


def amortized_state(step: int) -> dict:
    return {"w": np.full(1024, step, np.float32), "fixed": np.arange(1024, dtype=np.float32)}


@pytest.mark.parametrize("engine", ["lmdb", "memory"])
def test_saves_collect_once_enough_garbage_waits_and_gc_frees_the_rest(tmp_path, monkeypatch, engine):
    monkeypatch.setattr(castore.maintenance.maintainer, "GC_MIN_ENTRIES", 4)
    monkeypatch.setattr(castore.maintenance.maintainer, "GC_KEPT_SHARE", 0.25)
    path = tmp_path / "store" if engine == "lmdb" else f"memory://amortized-{os.getpid()}"
    try:
        with castore.Store(path, keep=Keep(last=40)) as store:
            trash, chunks = [], []
            for step in range(120):
                store.save(step, amortized_state(step))
                trash.append(store.inspect().count(Table.TRASH))
                chunks.append(store.stats().chunks)
            # past 40 steps each save trashes one; the threshold is max(4, 40 / 4) = 10 entries
            assert max(trash) == 9 and trash[-20:].count(0) == 2
            assert max(chunks) <= 40 + 9 + 1  # kept steps, at most 9 waiting, the shared chunk
            # nothing kept was freed, and what is left is findable: gc() frees all of it
            for step in store.steps():
                assert_state_equal(store.load(step, verify=True), amortized_state(step))
            left = store.plan_gc()
            assert len(left.steps) == trash[-1] and set(store.gc().chunks) == set(left.chunks)
            assert_no_garbage(store, pinned=store.inspect().pinned_ids())
    finally:
        if engine == "memory":
            memory.discard(f"amortized-{os.getpid()}")


def test_saves_that_write_many_bytes_collect_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(castore.maintenance.maintainer, "GC_WRITTEN_BYTES", 8192)  # two saves' chunks
    with castore.Store(tmp_path / "store", keep=Keep(last=2), compression="none") as store:  # bytes as written
        trash = []
        for step in range(12):
            store.save(step, amortized_state(step))
            trash.append(store.inspect().count(Table.TRASH))
        assert max(trash) == 1 and trash[2:].count(0) == 5  # every other save collects


def test_closing_retaining_and_compacting_collect_what_saves_left(tmp_path):
    path = tmp_path / "store"
    with castore.Store(path, keep=Keep(last=1)) as store:
        for step in range(5):
            store.save(step, amortized_state(step))
        assert len(store.plan_gc().steps) == 4  # fewer than GC_MIN_ENTRIES: left for later
    with castore.Store(path) as store:  # closing collected them
        assert store.plan_gc().is_empty and store.steps() == [4]
        for step in range(5, 8):
            store.save(step, amortized_state(step))
        assert store.retain(Keep(last=1)) == [4, 5, 6] and store.plan_gc().is_empty
    with castore.Store(path, keep=Keep(last=1)) as store:
        for step in range(8, 11):
            store.save(step, amortized_state(step))
        store.compact()
        assert store.plan_gc().is_empty and store.steps() == [10]
        assert_no_garbage(store)


# --- 5. plateau ---------------------------------------------------------------------------------------------


def test_store_size_plateaus_with_a_ring_buffer_and_keep(tmp_path):
    capacity, new_rows = 4096, 205  # 5% new rows per save
    rng = np.random.default_rng(90)
    cp = castore.Checkpoint(tmp_path / "store", keep=3, chunk_bytes=CHUNK)
    try:
        rb = castore.RingBuffer(capacity)
        rb.add(
            {
                "obs": rng.integers(0, 256, (capacity, 256), dtype=np.uint8),
                "rew": rng.standard_normal(capacity).astype(np.float32),
            }
        )
        cp.replay = rb
        weights = rng.standard_normal((64, 256)).astype(np.float32)  # 64 KB, 16 chunks
        file_bytes, used_pages, saved = [], [], {}
        for step in range(110):
            rb.add(
                {
                    "obs": rng.integers(0, 256, (new_rows, 256), dtype=np.uint8),
                    "rew": rng.standard_normal(new_rows).astype(np.float32),
                }
            )
            weights[rng.integers(0, 64, 8)] += 1.0
            cp.agent = {"w": weights.copy(), "step": step}
            cp.save(step)
            saved[step] = {"obs": rb["obs"].copy(), "rew": rb["rew"].copy(), "w": weights.copy()}
            saved.pop(step - 3, None)
            file_bytes.append(cp.store.stats().file_bytes)
            used_pages.append(cp.store.inspect().last_page())
        assert cp.steps() == [107, 108, 109]
        for step in cp.steps():
            loaded = cp.store.load(step, verify=True)
            for name in ("obs", "rew"):
                assert np.array_equal(loaded["replay"]["fields"][name], saved[step][name])
            assert np.array_equal(loaded["agent"]["w"], saved[step]["w"])
        for series, name in ((file_bytes, "file bytes"), (used_pages, "LMDB pages in use")):
            early, late = max(series[30:60]), max(series[60:110])
            assert late <= early * 1.05, f"{name} still grow: max {early} over saves 30..60, {late} after"
        # amortized GC leaves the garbage of fewer than GC_MIN_ENTRIES deleted steps; gc() frees it
        assert len(cp.store.plan_gc().steps) < castore.maintenance.maintainer.GC_MIN_ENTRIES
        cp.store.gc()
        assert_no_garbage(cp.store, pinned=cp.store.inspect().pinned_ids())
        live = sum(db_items(cp.store, "chunks").values())
        assert live < 3 * (capacity * 260 + weights.nbytes), f"{live} bytes held for 3 steps"
    finally:
        cp.close()


# --- 6. format 1 ---------------------------------------------------------------------------------------------


def make_format1(tmp_path, later_dbs: bool):
    """A format-1 store (two steps) and its states; without ``later_dbs`` it has only the
    meta/chunks/pages/steps databases, as a castore before format 2 created it."""
    states_ = {1: {"a": {"w": rows(80, 300)}, "n": 1}, 2: {"a": {"w": rows(81, 300)}, "n": 2}}
    normal = tmp_path / "normal"
    with castore.Store(normal, chunk_bytes=CHUNK) as store:
        for step, state in states_.items():
            store.save(step, state)
    if later_dbs:  # rewrite the config in place (copying would fill in the sparse data file)
        dest, names, src_env = normal, (b"meta",), None
    else:
        dest = tmp_path / "format1"
        os.makedirs(dest)
        names = (b"meta", b"chunks", b"pages", b"steps")
        src_env = lmdb.open(str(normal), max_dbs=8, readonly=True, subdir=True, lock=False)
    env = lmdb.open(str(dest), max_dbs=8, map_size=64 << 20, subdir=True)
    try:
        for name in names:
            db = env.open_db(name)
            with env.begin(write=True) as txn:
                if src_env is not None:
                    src_db = src_env.open_db(name, create=False)
                    with src_env.begin() as src:
                        for key, value in src.cursor(db=src_db):
                            txn.put(key, value, db=db)
                config = msgpack.unpackb(txn.get(b"config", db=db), raw=False) if name == b"meta" else None
                if config is not None:
                    assert config["format"] == STORE_FORMAT
                    config["format"] = 1
                    txn.put(b"config", msgpack.packb(config, use_bin_type=True), db=db)
        if not later_dbs:
            with env.begin() as txn:
                main = {bytes(k) for k in txn.cursor().iternext(values=False)}
            assert main == set(names), main
    finally:
        env.close()
        if src_env is not None:
            src_env.close()
    return dest, states_


@pytest.mark.parametrize("later_dbs", [True, False], ids=["format1-config", "format1-four-databases"])
def test_a_format1_store_loads_and_a_writer_upgrades_it(tmp_path, later_dbs):
    path, states_ = make_format1(tmp_path, later_dbs)
    with castore.Store(path, readonly=True) as store:
        assert read_config(store)["format"] == 1
        if not later_dbs:
            assert not store.inspect().has_table(Table.TRASH) and not store.inspect().has_table(Table.TAGS)
        assert store.steps() == [1, 2] and store.latest() == 2
        for step, state in states_.items():
            assert_state_equal(store.load(step, verify=True), state)
        assert store.tags() == {} and store.metrics(1) == {}
        assert store.stats().steps == 2
        assert store.plan_gc().is_empty  # a dry run works read-only, and finds no garbage
        with pytest.raises(castore.UsageError):
            store.gc()
    with castore.Store(path) as store:
        assert_state_equal(store.load(2, verify=True), states_[2])
        assert read_config(store)["format"] == 1  # opening does not upgrade; a writer does
        third = {"a": {"w": np.concatenate([states_[1]["a"]["w"][:100], rows(82, 200)])}, "n": 3}
        store.save(3, third)
        assert read_config(store)["format"] == STORE_FORMAT
        store.delete(1)  # through the trash now
        freed = store.gc()
        assert freed.steps == (1,)
        assert set(freed.chunks) == state_ids(states_[1])[0] - state_ids(third)[0]
        store.tag("best", 3)
        assert_no_garbage(store)
    with castore.Store(path, readonly=True) as store:
        assert read_config(store)["format"] == STORE_FORMAT
        assert store.steps() == [2, 3] and store.tags() == {"best": 3}
        assert_state_equal(store.load(3, verify=True), third)
        assert_state_equal(store.load(2, verify=True), states_[2])


def test_a_store_of_a_later_format_is_refused(tmp_path):
    path = tmp_path / "store"
    castore.Store(path).close()
    env = lmdb.open(str(path), max_dbs=8, subdir=True)
    db = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        config = msgpack.unpackb(txn.get(b"config", db=db), raw=False)
        config["format"] = STORE_FORMAT + 1
        txn.put(b"config", msgpack.packb(config, use_bin_type=True), db=db)
    env.close()
    with pytest.raises(castore.FormatError, match=f"format {STORE_FORMAT + 1}"):
        castore.Store(path)


# --- 7. pins: chunks a baseline may reuse ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["delete", "retain", "overwrite"])
def test_gc_defers_chunks_a_baseline_may_reuse_until_it_moved_on(tmp_path, how):
    a = rows(100, 64)  # 16 chunks
    with castore.Store(tmp_path / "store", chunk_bytes=CHUNK) as store:
        ids_a = state_ids({"x": a})[0]
        if how == "overwrite":
            store.save(1, {"m": {"a": a}})
            store.save(1, {"m": {"other": rows(101, 16)}}, overwrite=True)  # leaf m/a's last save: trashed
            store.save(2, {"m": {"other": rows(101, 16)}})
        else:
            store.save(1, {"m": {"a": a}})
            store.save(2, {"m": {"other": rows(101, 16)}})
            store.delete(1) if how == "delete" else store.retain(1)
        plan = store.plan_gc() if how != "retain" else None
        done = store.gc()
        for p in filter(None, [plan, done]):
            assert set(p.deferred) == ids_a and p.chunks == () and p.freed_bytes == 0
        assert ids_a <= set(db_items(store, "chunks"))
        deferred = {k: v for k, v in journal_ids(store).items() if k.startswith(DEFER_PREFIX)}
        assert set().union(*deferred.values()) == ids_a  # re-listed for a later GC
        assert db_items(store, "trash") == {}

        a2 = a.copy()
        a2[5] += 1  # one chunk changes; the save reuses 15 ids from the baseline unhashed
        result = store.save(3, {"m": {"a": a2}})
        assert result.new_chunks == 1 and result.changed_bytes == CHUNK
        assert_state_equal(store.load(3, verify=True), {"m": {"a": a2}})
        done = store.gc()  # the baseline moved on: the replaced chunk goes, the others are live
        assert set(done.chunks) == ids_a - state_ids({"x": a2})[0] and done.deferred == ()

        c = rows(102, 64)
        store.save(4, {"m": {"a": c}})
        store.delete(3)
        done = store.gc()
        assert set(done.chunks) == state_ids({"x": a2})[0] and done.deferred == ()
        assert_state_equal(store.load(4, verify=True), {"m": {"a": c}})
        assert_no_garbage(store)


def test_deferred_chunks_are_freed_once_no_session_remembers_them(tmp_path):
    a = rows(110, 64)
    path = tmp_path / "store"
    with castore.Store(path, chunk_bytes=CHUNK) as store:
        store.save(1, {"a": a})
        store.save(2, {"b": rows(111, 8)})
        store.delete(1)
        assert set(store.gc().deferred) == state_ids({"a": a})[0]
    with castore.Store(path) as store:  # a new writer session: the trash entry is gone, the ids are not
        plan = store.plan_gc()
        assert set(plan.chunks) == state_ids({"a": a})[0] and plan.deferred == () and plan.steps == ()
        store.gc()
        assert_no_garbage(store)
        assert store.plan_gc().is_empty


def test_gc_through_another_store_object_keeps_the_first_ones_baselines(tmp_path):
    a = rows(120, 64)
    first = castore.Store(tmp_path / "store", chunk_bytes=CHUNK)
    second = castore.Store(tmp_path / "store")  # same process: shares the environment and session
    try:
        first.save(1, {"a": a})
        first.save(2, {"b": rows(121, 8)})
        second.delete(1)
        done = second.gc()
        assert set(done.deferred) == state_ids({"a": a})[0] and done.chunks == ()
        a2 = a.copy()
        a2[0] = 0
        assert first.save(3, {"a": a2}).new_chunks == 1
        assert_state_equal(first.load(3, verify=True), {"a": a2})
        assert_state_equal(second.load(3, verify=True), {"a": a2})
    finally:
        second.close()
        first.close()


# A tracked array's baseline ids are pinned too: the next save reuses them unhashed.
def test_gc_keeps_chunks_a_tracked_array_baseline_may_reuse(tmp_path):
    tracked = castore.TrackedArray(rows(130, 64))
    with castore.Store(tmp_path / "store", chunk_bytes=CHUNK) as store:
        store.save(1, {"a": tracked})
        store.save(2, {"b": rows(131, 8)})
        store.delete(1)
        store.gc()
        tracked[3] = 7  # one row changes: 15 chunk ids come from the baseline
        store.save(3, {"a": tracked})
        assert_state_equal(store.load(3, verify=True), {"a": np.asarray(tracked).copy()})


# The same, as users meet it: keep=1 with a partial save(keys=...) deletes the last step
# holding the ring buffer; the next full save reuses the RingBuffer's baselines.
def test_partial_saves_with_keep_do_not_break_the_ring_buffer(tmp_path):
    rng = np.random.default_rng(140)
    with castore.Checkpoint(tmp_path / "store", keep=1, chunk_bytes=CHUNK) as cp:
        cp.replay = castore.RingBuffer(256)
        cp.replay.add({"obs": rng.integers(0, 256, (256, ROW), dtype=np.uint8)})
        cp.agent = {"w": rng.standard_normal(2048).astype(np.float32)}
        cp.save(1)
        cp.agent = {"w": rng.standard_normal(2048).astype(np.float32)}
        cp.save(2, keys=["agent"])  # keep=1: step 1, the last holding the replay, is collected
        cp.replay.add({"obs": rng.integers(0, 256, (4, ROW), dtype=np.uint8)})
        cp.save(3)
        loaded = cp.store.load(3, verify=True)
        assert np.array_equal(loaded["replay"]["fields"]["obs"], cp.replay["obs"])


# Retention after an async commit must not run while the caller captures the next save
# (it may reuse ids of a baseline older than that commit).  Writes are held until step 3
# has captured 'a'; its generator then keeps the capture going until step 2 committed (and
# would have run retention), as capturing a large state would.
def test_async_retention_does_not_free_ids_a_save_being_captured_reuses(tmp_path):
    x, y = rows(150, 64), rows(151, 64)
    with castore.Store(tmp_path / "store", chunk_bytes=CHUNK, keep=1, max_pending=2) as store:
        store.save_async(1, {"a": x}).result()
        held, release = threading.Event(), threading.Event()

        def hold_writes():
            with store.inspect().holding_writes():
                held.set()
                release.wait(30)

        holder = threading.Thread(target=hold_writes)
        holder.start()
        held.wait(30)
        second = store.save_async(2, {"a": y, "big": rows(152, 16 << 10)})  # cannot commit yet
        seen = {}

        def slow_capture():
            seen["step 2 committed before 'a' was captured"] = store.has_step(2)
            release.set()
            while not second.done():  # until step 2 committed (and tried its retention)
                time.sleep(0.001)
            yield {"v": np.zeros(4)}

        third = store.save_async(3, {"a": x, "g": slow_capture()})  # 'a' reuses step 1's ids
        third.result()
        holder.join(30)
        assert seen == {"step 2 committed before 'a' was captured": False}
        assert store.steps() == [3]
        assert_state_equal(store.load(3, keys="a", verify=True), {"a": x})


def test_gc_through_one_store_waits_for_another_stores_save_on_the_same_path(tmp_path):
    """Two writable Stores on one path (two branches) in one process: a collection through
    one must not free the journaled chunks of the other's save in flight."""
    import time

    path = tmp_path / "store"
    with castore.Store(path, chunk_bytes=1 << 20) as a, castore.Store(path, branch="other") as b:
        b.save(0, {"x": np.zeros(3)})
        big = np.random.default_rng(0).random((300 << 20) // 8)  # journaled batches of 128 MiB
        handle = a.save_async(0, {"big": big})
        deadline = time.monotonic() + 120
        while not handle.done() and time.monotonic() < deadline:  # a batch journaled, not committed
            with a.backend.read() as txn:
                if txn.count(Table.JOURNAL):
                    break
            time.sleep(0.005)
        b.gc()  # waits for a's save: its chunks are either journaled or named by step 0
        assert handle.result().step == 0
        assert a.verify().ok
        assert np.array_equal(a.load(0)["big"], big)


@pytest.mark.parametrize("through", ["own", "other"])
def test_gc_from_inside_a_save_is_refused_and_frees_nothing_of_it(tmp_path, through):
    """A shard generator runs on the saving thread, which holds its saver's (re-entrant)
    lock: a gc() from there must not pass the gate and free the shards written so far."""
    path = tmp_path / "store"
    with castore.Store(path, chunk_bytes=1 << 20) as a, castore.Store(path, branch="other") as b:
        collector = a if through == "own" else b
        errors = []

        def shards():
            for i in range(3):
                if i == 2:
                    try:
                        collector.gc()
                    except castore.UsageError as exc:
                        errors.append(exc)
                yield {"x": np.full((300 << 20) // 8 // 3, float(i))}  # a journaled batch each

        a.save(0, {"s": shards()})
        assert len(errors) == 1 and "inside a save" in str(errors[0])
        assert a.verify().ok and [np.asarray(s["x"])[0] for s in a.load(0)["s"]] == [0.0, 1.0, 2.0]
        with pytest.raises(castore.UsageError, match="inside a save"):
            a.save(1, {"s": (a.save(2, {"y": 1}) for _ in range(1))})  # a save inside a save
        assert a.steps() == [0]


def test_gc_through_another_store_leaves_a_background_error_to_its_store(tmp_path):
    path = tmp_path / "store"
    a, b = castore.Store(path), castore.Store(path, branch="other")
    try:
        a.save(0, {"x": np.zeros(3)})
        handle = a.save_async(0, {"x": np.ones(3)})  # other content under step 0: fails in the background
        handle.wait()
        b.gc()  # does not raise a's error, nor use it up
        with pytest.raises(castore.StepExistsError):
            a.wait()
    finally:
        b.close()
        a.close()

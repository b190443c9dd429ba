"""The saver: capture, then commit; async saves; baselines; the rollback rule.

Guarantees:

* a step is visible only once its manifest is committed, in the transaction that also
  commits the last batch of its chunks (the earlier batches, journaled, commit before);
  a reader never sees half a step;
* retention (the store's ``keep``) deletes in that same transaction: a step is never
  visible without it;
* chunks are content-addressed (BLAKE3-256 of their bytes) and written once;
* *the rollback rule*: after :meth:`Saver.continue_from` (a load of step k), the save
  that commits first moves the branch's steps after k to ``<branch>-abandoned-<k>`` in the
  transaction that commits its manifest; a save that commits nothing keeps it pending.

Past ~400 lines on purpose: these orderings (capture, chunk batches, the manifest's
transaction with retention, rollback moves and partial-save checks, baselines after the
commit) are what make a save crash-safe, and they are kept in one file to be read together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import catalog
from ..errors import SaveError, StepExistsError, UsageError
from ..format import codec
from ..format.compression import Compression, LeafChoices
from ..format.keys import check_step, describe_key, step_key
from ..format.manifest import Manifest, encode_manifest
from ..format.schema import Table
from ..format.sealing import unseal
from ..format.stepinfo import SaveTimes
from ..storage.base import Backend, WriteTxn
from ..storage.chunks import ChunkStore
from ..tracking import Baseline
from .background import Background, SaveHandle
from .capture import Capture, PendingBlob, Staging
from .pipeline import SaveJob, drop_journal

log = logging.getLogger("castore.save")


@dataclass(frozen=True, slots=True)
class SaveResult:
    """What one save did."""

    step: int
    logical_bytes: int  #: bytes of every leaf of the state, before deduplication
    new_bytes: int  #: bytes of chunks (and chunk-list pages) this save added to the store
    new_chunks: int  #: chunks and pages added
    reused_chunks: int  #: chunks and pages that were already stored
    manifest_bytes: int  #: bytes of the committed manifest (0: the same state was committed already)
    seconds: float  #: from the call to the commit
    changed_bytes: int = 0  #: bytes of chunks found changed since the last save (hashed)
    capture_seconds: float = 0.0  #: time the caller was blocked capturing (async saves)
    abandoned_to: str | None = None  #: branch the later steps moved to (see ``continue_from``)


class LoadedSession:
    """The session of baselines a load left, until a save confirms them: ``mark`` is the
    deletion count (None: unknown) of the store ``engine`` when the load read them."""

    __slots__ = ("mark", "engine")

    def __init__(self, mark: int | None, engine):
        self.mark = mark
        self.engine = engine


def _engine(backend):
    """The engine under a backend (a read-only view reads through a shared one)."""
    return getattr(backend, "shared", backend)


@dataclass(frozen=True, slots=True)
class _Captured:
    """A save between its capture (in the caller) and its write (maybe in the background)."""

    step: int
    components: tuple
    logical_bytes: int
    overwrite: bool
    metrics: dict | None
    job: SaveJob
    started: float
    capture_seconds: float
    continue_from: int | None  #: the loaded step this save continues from (see continue_from)
    #: a partial save: the step key its other components were carried from, and that
    #: step's record as read then (the commit checks it is still there, unchanged)
    carried_from: tuple[bytes, bytes] | None = None
    created: float | None = None  #: the save time to record (an import's); None: the commit's
    background: bool = False  #: committed by the background worker (the caller waited only for the capture)

    def is_continuation(self) -> bool:
        """True if this save moves the branch's steps after ``continue_from`` away first."""
        return self.continue_from is not None and self.step > self.continue_from


def _check_created(created) -> float:
    if isinstance(created, bool) or not isinstance(created, (int, float)) or not math.isfinite(created):
        raise UsageError(f"created= is a UNIX time (a finite number), got {created!r}")
    return float(created)


def _resolved(blob):
    return blob.resolved if isinstance(blob, PendingBlob) else blob


class Saver:
    """Saves of one ``Store`` (one branch).  Collaborators are given, not reached for:

    ``take_writer()`` takes the writer lock and returns the writer session token;
    ``retain_in_commit(txn, step, created, metrics, moved)`` runs inside the transaction
    that commits a manifest, after the manifest and its stepinfo record are in it
    (retention: it may delete steps in ``txn``, and is re-run with it); its result goes to
    ``after_commit(result, new_bytes, key)`` once the transaction committed (garbage collection;
    ``key``: the step key committed, None for a save of the same state again, e.g. to mirror it);
    ``writer`` is the backend's :class:`~castore.save.session.WriterState`, where the saver
    registers its baselines.
    """

    def __init__(
        self,
        backend: Backend,
        chunks: ChunkStore,
        *,
        take_writer: Callable[[], object],
        writer,
        pool,
        workers: int,
        chunk_bytes: int,
        compression: Compression,
        branch: str,
        where: str,
        allow_pickle: bool,
        check_tracking: bool,
        max_pending: int,
        retain_in_commit: Callable[[WriteTxn, int, float, dict | None, bool], Any],
        after_commit: Callable[[Any, int, bytes | None], None],
    ):
        self._backend = backend
        self._chunks = chunks
        self._take_writer = take_writer
        self._writer = writer
        self._pool = pool
        self._workers = workers
        self._chunk_bytes = chunk_bytes
        self._choices = LeafChoices(compression)  # auto mode's per-leaf decisions
        self._branch = branch
        self._where = where
        self._allow_pickle = allow_pickle
        self._check_tracking = check_tracking
        self._max_pending = max_pending
        self._retain_in_commit = retain_in_commit
        self._after_commit = after_commit
        self._continue_from: int | None = None
        self._lock = threading.RLock()  # saves (capture, submit) vs. maintenance
        self._baselines: dict = {}  # leaf path -> Baseline of untracked leaves (see capture)
        self._staging = Staging()
        self._background: Background | None = None
        self._saving = threading.local()  # .depth: saves this thread is inside (capture, or capture + write)
        self._closed = False
        writer.add_holder(self)
        writer.add_saver(self)

    # -- saving ----------------------------------------------------------------------------

    def save(
        self, step: int, tree: dict, *, overwrite: bool, metrics: dict | None, carry=None, created=None
    ) -> SaveResult:
        created = None if created is None else _check_created(created)  # before a capture holds anything
        with self._lock, self._saving_here():
            self.wait()
            captured = self._capture(step, tree, overwrite, metrics, copy=False, carry=carry)
            return self._write(dataclasses.replace(captured, created=created))

    def save_async(self, step: int, tree: dict, *, overwrite: bool, metrics: dict | None, carry=None) -> SaveHandle:
        background = self._background_worker()
        while True:
            while background.in_flight() >= background.max_pending:
                background.wait(raise_errors=False)  # bound memory; not holding the save lock
            with self._lock, self._saving_here():
                if background.in_flight() >= background.max_pending:
                    continue  # another thread took the slot
                background.raise_failed()  # checked after the wait: a save in flight may have failed
                captured = self._capture(step, tree, overwrite, metrics, copy=True, carry=carry)
                return background.submit(SaveHandle(captured.step), self._write, captured)

    @contextlib.contextmanager
    def _saving_here(self):
        """Mark this thread as inside a save of this saver; a save inside one (a shard
        generator that saves) is refused: the outer save's lock would not hold it off."""
        if self.is_saving_here():
            raise UsageError(f"a save of {self._where} inside a save of it (from a shard generator?) is refused")
        self._saving.depth = 1
        try:
            yield
        finally:
            self._saving.depth = 0

    def is_saving_here(self) -> bool:
        """Whether this thread is inside a save of this saver (its lock is re-entrant, so
        what frees chunks must ask: a shard generator may call ``gc()``)."""
        return getattr(self._saving, "depth", 0) > 0

    def in_flight(self) -> int:
        """Async saves submitted and not yet finished."""
        return 0 if self._background is None else self._background.in_flight()

    def wait(self, *, raise_errors: bool = True) -> None:
        """Wait for async saves in flight; raise the first error nobody has seen (unless not
        ``raise_errors``: then errors stay for the next wait)."""
        if self._background is not None:
            self._background.wait(raise_errors=raise_errors)

    def raise_failed(self) -> None:
        if self._background is not None:
            self._background.raise_failed()

    def _background_worker(self) -> Background:
        if self._background is None:
            self._background = Background(self._where, self._max_pending)
        return self._background

    # -- what maintenance needs ----------------------------------------------------------------

    @contextlib.contextmanager
    def quiesced(self):
        """Writer lock held, no save being captured, none in flight: chunks may be freed."""
        with self._lock:
            self._take_writer()
            self.wait()
            yield

    @contextlib.contextmanager
    def locked(self):
        """Writer lock held and no save being captured (saves in flight may still commit)."""
        with self._lock:
            self._take_writer()
            yield

    @contextlib.contextmanager
    def held_for_other(self, *, quiet: bool):
        """This saver held off for another ``Store``'s maintenance on the same backend: no
        save being captured, and (``quiet``) none in flight.  Its errors stay its own (not
        raised here), and a closed saver holds nothing off."""
        with self._lock:
            if not self._closed and quiet:
                self.wait(raise_errors=False)
            yield

    def try_lock(self) -> bool:
        """Take the save lock if free (a commit's amortized GC must not wait for it)."""
        return self._lock.acquire(blocking=False)

    def unlock(self) -> None:
        self._lock.release()

    @contextlib.contextmanager
    def quiet_after_commit(self):
        """Yields True if nothing else is being saved (a commit may retain), else False.

        Saves being captured or queued may reuse ids (from baselines older than this
        commit) that GC would free; the commit of the last of them retains instead.
        """
        if not self._lock.acquire(blocking=False):
            yield False
            return
        try:
            yield self.in_flight() <= 1
        finally:
            self._lock.release()

    def pinned_ids(self, session) -> bytes:
        """Chunk ids remembered by this saver's baselines in ``session`` (GC keeps them)."""
        return b"".join(b.ids for b in list(self._baselines.values()) if b.session is session)

    # -- the rollback rule ---------------------------------------------------------------------

    def continue_from(self, step: int) -> None:
        self._continue_from = check_step(step)

    @property
    def continuing_from(self) -> int | None:
        return self._continue_from

    # -- capture, then write -------------------------------------------------------------------

    def _capture(self, step, tree, overwrite: bool, metrics, *, copy: bool, carry=None) -> _Captured:
        step = check_step(step)
        metrics = catalog.check_metrics(metrics)
        if type(tree) is not dict or not all(type(k) is str and k for k in tree):
            raise UsageError("a step's tree must be a dict of non-empty str component names")
        session = self._take_writer()
        started = time.perf_counter()
        capture = Capture(
            session=session,
            baselines=self._baselines,
            chunk_bytes=self._chunk_bytes,
            copy=copy,
            check=self._check_tracking,
            staging=self._staging,
            pool=self._pool,
            workers=self._workers,
            confirm=functools.partial(self._confirm_loaded, session=session, memo={}),
        )
        job = SaveJob(self._chunks, self._pool, capture, self._staging, self._choices)
        encoder = codec.Encoder(capture, allow_pickle=self._allow_pickle, on_shard=None if copy else job.flush)
        try:
            components = tuple((name, encoder.component(value, name)) for name, value in tree.items())
        except BaseException:
            job.abort()
            raise
        carried_from = None
        if carry is not None:
            try:
                carried, carried_from = self._carried(carry, tree)
            except BaseException:
                job.abort()
                raise
            components += carried
            encoder.logical_bytes += sum(codec.node_nbytes(node) for _, node in carried)
        continue_from, self._continue_from = self._continue_from, None  # this save carries it now
        return _Captured(
            step,
            components,
            encoder.logical_bytes,
            overwrite,
            metrics,
            job,
            started,
            time.perf_counter() - started,
            continue_from,
            carried_from,
            background=copy,  # a copying capture is an async save's
        )

    def _carried(self, carry, tree: dict) -> tuple[tuple, tuple[bytes, bytes]]:
        """The components ``carry = (step, names)`` names, as that step's manifest holds
        them: a partial save references their chunks again instead of writing them."""
        try:
            source, names = carry
        except (TypeError, ValueError):
            raise UsageError(f"carry is (step, [component names]), got {carry!r}") from None
        if isinstance(names, str) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            raise UsageError(f"carry=(step, names): names is a list of distinct component names, got {names!r}")
        names = list(names)
        key = step_key(check_step(source), self._branch)
        with self._backend.read() as txn:
            raw = txn.get(Table.STEPS, key)
            if raw is None:
                raise UsageError(f"step {source} to carry {names} from is not in {self._where}")
            manifest = catalog.manifest(txn, key, self._where)
            raw = bytes(raw)
        have = dict(manifest.components)
        missing = [name for name in names if name not in have]
        if missing or any(name in tree for name in names):
            raise UsageError(f"cannot carry {names} from step {source}: it lacks {missing} or they are saved anew")
        return tuple((name, have[name]) for name in names), (key, raw)

    def _write(self, captured: _Captured) -> SaveResult:
        job = captured.job
        try:
            data, abandoned_to, retained = self._finish_and_commit(captured)
        except BaseException:
            self._keep_rollback_pending(captured)
            raise
        if not data:
            self._keep_rollback_pending(captured)
        if abandoned_to is not None:
            log.info(
                "steps of branch %r after %d moved to branch %r", self._branch, captured.continue_from, abandoned_to
            )
        self._remember_baselines(job.capture)
        sink = job.sink
        self._after_commit(retained, sink.new_bytes, step_key(captured.step, self._branch) if data else None)
        return SaveResult(
            step=captured.step,
            logical_bytes=captured.logical_bytes,
            new_bytes=sink.new_bytes,
            new_chunks=sink.new_chunks,
            reused_chunks=sink.reused_chunks + job.capture.reused_chunks,
            manifest_bytes=len(data),
            seconds=time.perf_counter() - captured.started,
            changed_bytes=job.capture.changed_bytes,
            capture_seconds=captured.capture_seconds,
            abandoned_to=abandoned_to,
        )

    def _finish_and_commit(self, captured: _Captured) -> tuple[bytes, str | None, Any]:
        """Write the chunks, then commit the manifest with the last batch of them and
        retention, in one transaction.  Returns the manifest (b"" if the same state was
        committed already), the branch later steps moved to, and what retention left."""
        job = captured.job
        try:
            job.finish()
        except BaseException:
            job.abort()
            raise
        committed = False
        try:
            components = tuple((name, codec.map_blobs(node, _resolved)) for name, node in captured.components)
            created = time.time() if captured.created is None else captured.created
            manifest = Manifest(captured.step, created, captured.logical_bytes, components)
            if not (captured.overwrite or captured.is_continuation()) and self._is_same_as_committed(manifest):
                job.commit_last_batch()
                return b"", None, None  # the same state saved again under its step: nothing to commit
            data = encode_manifest(manifest)
            self._backend.reserve(len(data) + job.last_batch_bytes)
            abandoned_to, retained = self._backend.write(self._commit_manifest, captured, manifest.created, data, [])
            committed = True
            return data, abandoned_to, retained
        finally:
            job.done(manifest_committed=committed)

    def _keep_rollback_pending(self, captured: _Captured) -> None:
        """Nothing committed, so nothing moved: the next save continues from the same step."""
        if captured.continue_from is not None and self._continue_from is None:
            self._continue_from = captured.continue_from

    def _remember_baselines(self, capture: Capture) -> None:
        """After a commit: the ids of every leaf are known present for the next save."""
        for blob in capture.pending:
            baseline = blob.baseline(capture.session)
            if blob.tracked is not None:
                blob.tracked.committed(baseline)
                self._writer.add_holder(blob.tracked)  # GC must keep what it may reuse
                self._baselines.pop(blob.path, None)  # the array's own baseline rules now
            else:
                self._baselines[blob.path] = baseline

    # -- resuming without re-hashing -------------------------------------------------------------

    def adopt_loaded(self, leaves, mark: int | None) -> None:
        """Remember the chunk ids and fingerprints of leaves a load read (``LoadedLeaf``),
        so the next save of unchanged chunks neither hashes nor writes them.

        A leaf with a baseline of the current writer session keeps it (a load to look at
        an old step does not undo what the last save knows; fingerprints compare bytes, so
        either baseline is correct).  The others get baselines of a :class:`LoadedSession`:
        a save confirms each, holding the writer lock, before reusing any of its ids
        (:meth:`_confirm_loaded`).  A TrackedArray the load filled gets its baseline
        itself, so the next save reads only the rows written since.  ``mark`` is the
        store's deletion count as of the load (None: not kept by every writer).
        """
        loaded = LoadedSession(mark, _engine(self._backend))
        session = self._writer.session
        with self._lock:
            for leaf in leaves:

                def baseline(epoch: int, leaf=leaf) -> Baseline:
                    return Baseline(loaded, leaf.nbytes, leaf.chunk_nbytes, leaf.ids, leaf.fingerprints, epoch)

                if leaf.tracked is not None:
                    leaf.tracked.restored(baseline)
                    continue
                have = self._baselines.get(leaf.path)
                if have is not None and session is not None and have.session is session:
                    continue
                self._baselines[leaf.path] = baseline(0)

    def _confirm_loaded(self, path: str, baseline: Baseline, session, memo: dict) -> Baseline | None:
        """A load's baseline, as of ``session``, for one save, if all its chunks are still
        stored (another writer may have collected some since the load); else forgotten.

        An unchanged deletion count of this store proves it at once; otherwise (another
        store's load, e.g. a TrackedArray filled from one store and saved to another)
        each id is looked up in this one.
        ``memo`` holds what this save found out already.
        """
        loaded = baseline.session
        if not isinstance(loaded, LoadedSession):
            return baseline
        if "deletions" not in memo:  # one read per save: the writer lock keeps it true
            with self._backend.read() as txn:
                memo["deletions"] = self._chunks.deletion_mark(txn)
        same_store = loaded.engine is _engine(self._backend)  # a count proves nothing of another store
        present = same_store and loaded.mark is not None and loaded.mark == memo["deletions"]
        if not present:
            with self._backend.read() as txn:
                present = self._chunks.has_all(txn, baseline.ids)
        if not present:
            if self._baselines.get(path) is baseline:
                del self._baselines[path]
            return None
        # for this save only: GC waits for it, and its commit replaces the baseline anyway
        return dataclasses.replace(baseline, session=session)

    def _is_same_as_committed(self, manifest: Manifest) -> bool:
        """True if ``manifest.step`` exists with the same content; raises if it differs."""
        key = step_key(manifest.step, self._branch)
        with self._backend.read() as txn:
            raw = txn.get(Table.STEPS, key)
            if raw is None:
                return False
            committed = catalog.manifest(txn, key, self._where)
            raw = bytes(raw)
        again = encode_manifest(dataclasses.replace(manifest, created=committed.created))
        if unseal(again, "manifest") == unseal(raw, "manifest"):  # a bare record of format 1-2 too
            return True
        raise StepExistsError(
            f"step {manifest.step} exists in {self._where} with different content; pass overwrite=True to replace it"
        )

    def _commit_manifest(
        self, txn: WriteTxn, captured: _Captured, created: float, data: bytes, attempts: list
    ) -> tuple[str | None, Any]:
        """Commit the last batch of chunks, the manifest and its stepinfo, and retention.

        The chunks go in first: a manifest names only chunks committed before it or in its
        own transaction.  Returns the branch later steps moved to, if any, and what
        retention left (for ``after_commit``).  May be re-run (``attempts`` counts runs).
        """
        attempts.append(1)
        if captured.carried_from is not None:
            source, record = captured.carried_from
            now = txn.get(Table.STEPS, source)
            if now is None or bytes(now) != record:  # its chunks may be garbage by now
                raise SaveError(
                    f"{describe_key(source)}, which this partial save carries components from, was deleted or "
                    f"replaced while it was being saved; nothing was committed: save again"
                )
        captured.job.put_last_batch(txn, attempts)
        key = step_key(captured.step, self._branch)
        abandoned_to = None
        if captured.continue_from is not None:
            abandoned_to = catalog.move_steps_after(txn, self._branch, captured.continue_from)
        old = txn.get(Table.STEPS, key)
        if old is not None:
            if not captured.overwrite:
                raise StepExistsError(
                    f"step {captured.step} exists in {self._where}; pass overwrite=True to replace it"
                )
            catalog.trash_manifest(txn, key, old)
        txn.put(Table.STEPS, key, data)
        seconds = time.perf_counter() - captured.started
        times = SaveTimes(
            seconds,
            captured.capture_seconds if captured.background else seconds,
            captured.job.written_bytes(),
        )
        catalog.put_stepinfo(txn, key, created, captured.metrics, times)
        drop_journal(txn, captured.job.sink.token)  # its chunks are referenced now
        moved = abandoned_to is not None or old is not None  # steps changed beyond this one
        return abandoned_to, self._retain_in_commit(txn, captured.step, created, captured.metrics, moved)

    def close(self) -> None:
        """Wait for async saves (errors stay for :meth:`raise_failed`); other stores' GC no
        longer waits for this saver."""
        if self._background is not None:
            self._background.wait(raise_errors=False)
        self._closed = True
        self._writer.discard_saver(self)

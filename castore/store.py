"""Store: commit a step atomically, read a step back verified, list and delete steps.

Guarantees:

* a step is visible only once its manifest is committed, which happens after every chunk
  it names is committed; a reader never sees half a step;
* chunks are content-addressed (BLAKE3-256 of their bytes) and written once;
* reads verify each chunk's digest unless ``verify=False`` and raise
  :class:`IntegrityError` naming step, component, leaf path and chunk id.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from . import catalog, codec, reading
from . import verify as verify_
from .background import Background, SaveHandle
from .blobstore import BlobStore
from .capture import Capture, PendingBlob, Staging
from .chunker import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES
from .config import STORE_FORMAT, new_config, parse_config, upgraded
from .errors import (
    CorruptDataError,
    FormatError,
    SelectionError,
    StepExistsError,
    StepNotFoundError,
    UsageError,
)
from .maintenance import Maintenance
from .manifest import Manifest, ShardsNode, decode_manifest, encode_manifest, unseal
from .pipeline import SaveJob, drop_journal, read_counters
from .retention import Keep, policy_of

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SaveResult:
    """What one save did."""

    step: int
    logical_bytes: int  #: bytes of every leaf of the state, before deduplication
    new_bytes: int  #: bytes of chunks (and chunk-list pages) this save added to the store
    new_chunks: int  #: chunks and pages added
    reused_chunks: int  #: chunks and pages that were already stored
    manifest_bytes: int
    seconds: float  #: from the call to the commit
    changed_bytes: int = 0  #: bytes of chunks found changed since the last save (hashed)
    capture_seconds: float = 0.0  #: time the caller was blocked capturing (async saves)
    abandoned_to: str | None = None  #: branch the later steps moved to (see ``continue_from``)


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Totals of a store."""

    steps: int
    chunks: int  #: chunks and chunk-list pages held (including garbage not yet collected)
    stored_bytes: int  #: bytes of those chunks and pages
    logical_bytes: int  #: sum over steps of each step's logical bytes
    file_bytes: int  #: size of the LMDB data file

    @property
    def dedup_ratio(self) -> float:
        """Logical bytes of all steps per stored chunk byte (higher is better)."""
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else 1.0


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

    def is_continuation(self) -> bool:
        """True if this save moves the branch's steps after ``continue_from`` away first."""
        return self.continue_from is not None and self.step > self.continue_from


def _resolved(blob):
    return blob.resolved if isinstance(blob, PendingBlob) else blob


step_key, step_of, branch_of = catalog.step_key, catalog.step_of, catalog.branch_of
check_step, _describe = catalog.check_step, catalog.describe_key


class Store(Maintenance):
    """A content-addressed, deduplicating store of steps, each a dict of component trees.

    ``Store(path)`` opens the store in directory ``path``, creating it unless
    ``create=False``.  Opening the same path again in one process shares one LMDB
    environment.  The first save or delete takes the store's single-writer lock, raising
    :class:`StoreLockedError` if another process holds it (at once, or after waiting
    ``lock_timeout`` seconds).  A directory on a
    network filesystem (NFS, SMB, ...) is refused with :class:`UnsafeFilesystemError`
    unless ``allow_network_fs=True``: LMDB's map and locks are not safe there.

    A store holds branches, each its own sequence of steps; a ``Store`` works on one
    (``branch``, default ``"main"``): ``save``, ``steps``, ``latest``, ``delete`` and
    ``retain`` act on it.  Tags name a step of any branch.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        create: bool = True,
        readonly: bool = False,
        chunk_bytes: int | None = None,
        verify: bool = True,
        allow_pickle: bool = False,
        workers: int | None = None,
        check_tracking: bool | None = None,
        max_pending: int = 1,
        keep=None,
        branch: str = catalog.MAIN,
        allow_network_fs: bool = False,
        lock_timeout: float | None = None,
    ):
        if not isinstance(max_pending, int) or max_pending < 1:
            raise UsageError(f"max_pending must be an int >= 1, got {max_pending!r}")
        self.path = os.fspath(path)
        self.readonly = readonly
        self.verify_reads = verify  # the default of load(verify=...)
        self.allow_pickle = allow_pickle
        if check_tracking is None:
            check_tracking = os.environ.get("CASTORE_CHECK_TRACKING", "").lower() in ("1", "true", "yes")
        self.check_tracking = check_tracking
        self.max_pending = max_pending
        self.keep: Keep | None = policy_of(keep)
        self.branch = catalog.check_branch(branch)
        self._continue_from: int | None = None  # see continue_from()
        self._save_lock = threading.RLock()  # saves (capture, submit) vs. garbage collection
        self._baselines: dict = {}  # leaf path -> Baseline of untracked leaves (see capture)
        self._staging = Staging()
        self._background: Background | None = None
        self._blobs = BlobStore.open(self.path, create=create, readonly=readonly,
                                     allow_network_fs=allow_network_fs, lock_timeout=lock_timeout)
        try:
            self.chunk_bytes = self._open_config(chunk_bytes)
        except BaseException:
            self._blobs.close()
            raise
        self._blobs.pin_holders.add(self)
        self.workers = workers or os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="castore-hash")
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for async saves, release the environment (and the writer lock). Idempotent.

        Raises the error of an async save nobody has seen, after closing.
        """
        if self._closed:
            return
        try:
            if self._background is not None:
                self._background.wait(raise_errors=False)
        finally:
            self._closed = True
            self._pool.shutdown(wait=True)
            self._blobs.close()
        if self._background is not None:
            self._background.raise_failed()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError(f"store {self.path} is closed")

    def _take_writer_lock(self) -> None:
        self._check_open()
        if self.readonly:
            raise UsageError(f"store {self.path} is open read-only")
        self._blobs.acquire_writer()
        if self._format < STORE_FORMAT:
            self._blobs.write(self._upgrade_config)
            self._format = STORE_FORMAT

    def _upgrade_config(self, txn) -> None:
        """A format-1 store gets format 2 when a writer first takes it: no data changes, but
        from now on deletes go through the trash and saves through the journal."""
        current = upgraded(txn.get(b"config", db=self._blobs.dbs["meta"]))
        if current is not None:
            txn.put(b"config", current, db=self._blobs.dbs["meta"])

    def _open_config(self, chunk_bytes: int | None) -> int:
        if chunk_bytes is not None and not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise UsageError(f"chunk_bytes must be in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}]")
        with self._blobs.read() as txn:
            raw = txn.get(b"config", db=self._blobs.dbs["meta"])
            config = None if raw is None else bytes(raw)
        if config is None:
            if self._blobs.readonly:
                raise FormatError(f"{self.path} is not a castore store (no config record)")
            config = self._blobs.write(self._create_config, chunk_bytes or DEFAULT_CHUNK_BYTES)
        stored, self._format = parse_config(config, self.path)
        if chunk_bytes is not None and chunk_bytes != stored:
            raise UsageError(
                f"store {self.path} was created with chunk_bytes={stored}; "
                f"it cannot be opened with chunk_bytes={chunk_bytes} (omit the argument)"
            )
        return stored

    def _create_config(self, txn, chunk_bytes: int) -> bytes:
        meta = self._blobs.dbs["meta"]
        existing = txn.get(b"config", db=meta)
        if existing is not None:  # another opener created it first
            return bytes(existing)
        if txn.stat(self._blobs.dbs["steps"])["entries"]:
            raise FormatError(f"{self.path} holds steps but no config record")
        config = new_config(chunk_bytes)
        txn.put(b"config", config, db=meta)
        return config

    # -- writing --------------------------------------------------------------------------------

    def save(self, step: int, tree: dict, *, overwrite: bool = False, metrics: dict | None = None) -> SaveResult:
        """Commit ``tree`` (component name -> state) as ``step``; atomic and durable.

        A component whose state is a generator or iterator is saved as shards.  Only
        chunks that changed since the last save are hashed and written (see ``capture``).
        Saving the same state again under an existing step is a no-op.  Async saves still
        in flight commit first.  Raises :class:`StepExistsError` if the step exists with
        other content and ``overwrite`` is false, :class:`UnsupportedValueError` for values
        castore does not store, :class:`StoreLockedError` if another process writes this
        store, :class:`TrackingError` in check mode, and the error of an earlier async
        save nobody has seen.  A save that raises commits no step (chunks it wrote stay as
        garbage for GC).  ``metrics`` (``{name: number}``) are recorded with the step for
        ``Keep(best=...)``.  With a ``keep`` policy, steps it does not keep are deleted and
        their chunks collected after the commit.
        """
        with self._save_lock:
            self.wait()
            return self._write(self._capture(step, tree, overwrite, metrics, copy=False))

    def save_async(self, step: int, tree: dict, *, overwrite: bool = False,
                   metrics: dict | None = None) -> SaveHandle:
        """Capture ``tree`` now and commit it in the background; returns a :class:`SaveHandle`.

        When this returns, the changed chunks have been copied (at most ``max_pending``
        saves' worth of changed bytes are held), so the caller may change its state at
        once.  Saves commit in the order they were submitted.  Raises at once what
        :meth:`save` raises before writing (bad input, locked store, an earlier async
        save's unseen error); errors while writing come from the handle or :meth:`wait`.
        """
        background = self._saver()
        while True:
            while background.in_flight() >= background.max_pending:
                background.wait(raise_errors=False)  # bound memory; not holding the save lock
            with self._save_lock:
                if background.in_flight() >= background.max_pending:
                    continue  # another thread took the slot
                background.raise_failed()  # checked after the wait: a save in flight may have failed
                captured = self._capture(step, tree, overwrite, metrics, copy=True)
                return background.submit(SaveHandle(captured.step), self._write, captured)

    def in_flight(self) -> int:
        """Async saves submitted and not yet finished."""
        return 0 if self._background is None else self._background.in_flight()

    def wait(self) -> None:
        """Wait for async saves in flight; raise the first error nobody has seen yet."""
        if self._background is not None:
            self._background.wait()

    def _saver(self) -> Background:
        self._check_open()
        if self._background is None:
            self._background = Background(self.path, self.max_pending)
        return self._background

    def _capture(self, step, tree, overwrite: bool, metrics, *, copy: bool) -> "_Captured":
        step = check_step(step)
        metrics = catalog.check_metrics(metrics)
        if type(tree) is not dict or not all(type(k) is str and k for k in tree):
            raise UsageError("a step's tree must be a dict of non-empty str component names")
        self._take_writer_lock()
        started = time.perf_counter()
        capture = Capture(
            owner=self._blobs.writer_session, baselines=self._baselines, chunk_bytes=self.chunk_bytes,
            copy=copy, check=self.check_tracking, staging=self._staging, pool=self._pool, workers=self.workers,
        )
        job = SaveJob(self._blobs, self._pool, capture, self._staging)
        encoder = codec.Encoder(capture, allow_pickle=self.allow_pickle, on_shard=None if copy else job.flush)
        try:
            components = tuple((name, encoder.component(value, name)) for name, value in tree.items())
        except BaseException:
            job.abort()
            raise
        continue_from, self._continue_from = self._continue_from, None  # this save carries it now
        return _Captured(step, components, encoder.logical_bytes, overwrite, metrics, job, started,
                         time.perf_counter() - started, continue_from)

    def _write(self, captured: "_Captured") -> SaveResult:
        job = captured.job
        try:
            data, abandoned_to = self._finish_and_commit(captured)
        except BaseException:
            self._keep_rollback_pending(captured)
            raise
        if not data:
            self._keep_rollback_pending(captured)
        if abandoned_to is not None:
            log.info("steps of branch %r after %d moved to branch %r", self.branch, captured.continue_from, abandoned_to)
        self._remember_baselines(job.capture)
        self._retain_after_commit()
        sink = job.sink
        return SaveResult(
            captured.step, captured.logical_bytes, sink.new_bytes, sink.new_chunks,
            sink.reused_chunks + job.capture.reused_chunks,
            len(data), time.perf_counter() - captured.started, job.capture.changed_bytes,
            captured.capture_seconds, abandoned_to,
        )

    def _finish_and_commit(self, captured: "_Captured") -> tuple[bytes, str | None]:
        """Write the chunks, then the manifest; returns it (b"" if the same state was
        committed already) and the branch later steps moved to."""
        try:
            captured.job.finish()
        except BaseException:
            captured.job.abort()
            raise
        components = tuple((name, codec.map_blobs(node, _resolved)) for name, node in captured.components)
        manifest = Manifest(captured.step, time.time(), captured.logical_bytes, components)
        if not (captured.overwrite or captured.is_continuation()) and self._is_same_as_committed(manifest):
            return b"", None  # the same state saved again under its step: nothing to commit
        data = encode_manifest(manifest)
        self._blobs.reserve(len(data))
        return data, self._blobs.write(self._commit_manifest, captured, data)

    def _keep_rollback_pending(self, captured: "_Captured") -> None:
        """Nothing committed, so nothing moved: the next save continues from the same step."""
        if captured.continue_from is not None and self._continue_from is None:
            self._continue_from = captured.continue_from

    def _remember_baselines(self, capture: Capture) -> None:
        """After a commit: the ids of every leaf are known present for the next save."""
        for blob in capture.pending:
            baseline = blob.baseline(capture.owner)
            if blob.tracked is not None:
                blob.tracked.committed(baseline)
                self._blobs.pin_holders.add(blob.tracked)  # GC must keep what it may reuse
            else:
                self._baselines[blob.path] = baseline

    def _is_same_as_committed(self, manifest: Manifest) -> bool:
        """True if ``manifest.step`` exists with the same content; raises if it differs."""
        key = self._key(manifest.step)
        with self._blobs.read() as txn:
            raw = txn.get(key, db=self._blobs.dbs["steps"])
            if raw is None:
                return False
            committed = self._manifest(txn, key)
        again = encode_manifest(dataclasses.replace(manifest, created=committed.created))
        if unseal(again, "manifest") == unseal(raw, "manifest"):  # a bare record of format 1-2 too
            return True
        raise StepExistsError(
            f"step {manifest.step} exists in {self.path} with different content; "
            "pass overwrite=True to replace it"
        )

    def _commit_manifest(self, txn, captured: "_Captured", data: bytes) -> str | None:
        """Commit the manifest; returns the branch later steps moved to, if any."""
        key, steps_db = self._key(captured.step), self._blobs.dbs["steps"]
        abandoned_to = None
        if captured.continue_from is not None:
            abandoned_to = catalog.move_steps_after(txn, self._blobs, self.branch, captured.continue_from)
        old = txn.get(key, db=steps_db)
        if old is not None:
            if not captured.overwrite:
                raise StepExistsError(
                    f"step {captured.step} exists in {self._where()}; pass overwrite=True to replace it")
            catalog.trash_manifest(txn, self._blobs, key, old)
        txn.put(key, data, db=steps_db)
        catalog.put_metrics(txn, self._blobs, key, captured.metrics)
        drop_journal(txn, self._blobs, captured.job.sink.token)  # its chunks are referenced now
        return abandoned_to

    def delete(self, step: int) -> None:
        """Remove a step; its chunks stay until garbage collection (:meth:`gc`) frees them.

        Raises StepNotFoundError, and UsageError for a tagged step (untag it first).
        """
        key = self._key(check_step(step))
        with self._save_lock:
            self._take_writer_lock()
            self._blobs.write(self._delete_steps, [key])

    def _delete_steps(self, txn, keys: list[bytes]) -> None:
        tagged = {key: name for name, key in catalog.tags(txn, self._blobs).items()}
        for key in keys:
            raw = txn.get(key, db=self._blobs.dbs["steps"])
            if raw is None:
                raise StepNotFoundError(f"{_describe(key)} does not exist in {self.path}")
            if key in tagged:
                raise UsageError(f"{_describe(key)} is tagged {tagged[key]!r}: untag it before deleting")
            catalog.trash_manifest(txn, self._blobs, key, raw)
            txn.delete(key, db=self._blobs.dbs["steps"])

    # -- listing ----------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Committed step numbers of this branch, ascending."""
        self._check_open()
        with self._blobs.read() as txn:
            return list(catalog.branch_items(txn, self._blobs, self.branch, values=False))

    def latest(self) -> int | None:
        """The highest committed step of this branch, or None if it has none."""
        self._check_open()
        with self._blobs.read() as txn:
            return catalog.latest_step(txn, self._blobs, self.branch)

    def has_step(self, step: int) -> bool:
        self._check_open()
        with self._blobs.read() as txn:
            return txn.get(self._key(check_step(step)), db=self._blobs.dbs["steps"]) is not None

    def manifest(self, step: int | str | None = None, *, branch: str | None = None) -> Manifest:
        """The decoded manifest of ``step`` (default: latest of ``branch``, default this
        store's; or a tag); raises StepNotFoundError."""
        self._check_open()
        with self._blobs.read() as txn:
            return self._manifest(txn, self._locate(txn, step, None if branch is None else catalog.check_branch(branch)))

    def resolve(self, step: int | str | None = None) -> int:
        """The step number of ``step``: an int, a tag name, or None for the latest.

        Raises StepNotFoundError for an unknown tag or an empty branch (an int is only
        range-checked; loading it says whether it exists).
        """
        return self.locate(step)[1]

    def locate(self, step: int | str | None = None) -> tuple[str, int]:
        """``(branch, step)`` of ``step``: a tag may name a step of another branch."""
        self._check_open()
        with self._blobs.read() as txn:
            key = self._locate(txn, step)
        return branch_of(key), step_of(key)

    def _key(self, step: int) -> bytes:
        return step_key(step, self.branch)

    def _where(self) -> str:
        return self.path if self.branch == catalog.MAIN else f"branch {self.branch!r} of {self.path}"

    def _locate(self, txn, step: int | str | None, branch: str | None = None) -> bytes:
        """The step key of a tag, a step number or None (the latest) of ``branch``."""
        if isinstance(step, str):
            return catalog.find_tag(txn, self._blobs, step)
        branch = self.branch if branch is None else branch
        if step is not None:
            return step_key(check_step(step), branch)
        latest = catalog.latest_step(txn, self._blobs, branch)
        if latest is None:
            where = self.path if branch == catalog.MAIN else f"branch {branch!r} of {self.path}"
            raise StepNotFoundError(f"{where} has no steps yet")
        return step_key(latest, branch)

    def _manifest_bytes(self, txn, key: bytes):
        raw = txn.get(key, db=self._blobs.dbs["steps"])
        if raw is None:
            raise StepNotFoundError(f"{_describe(key)} does not exist in {self.path}")
        return raw

    def _manifest(self, txn, key: bytes) -> Manifest:
        try:
            manifest = decode_manifest(self._manifest_bytes(txn, key))
        except CorruptDataError as exc:
            raise CorruptDataError(f"{_describe(key)}: {exc}") from None
        if manifest.step != step_of(key):
            raise CorruptDataError(f"{_describe(key)}: its manifest says step {manifest.step}")
        return manifest

    def verify(self, sample: float = 1.0, *, seed: int | None = None) -> verify_.VerifyReport:
        """Check every step of every branch down to its chunks; returns every problem found.

        All chunks are hashed unless ``sample`` (a fraction, e.g. 0.05) asks for a part;
        presence and length are always checked.  Damage is reported, never raised: each
        problem names step, branch, component, leaf path and chunk.  Runs in one read
        transaction beside a writer.
        """
        self._check_open()
        return verify_.verify(self._blobs, self._pool, sample=sample, seed=seed)

    def stats(self) -> StoreStats:
        """Store totals; reads every manifest (small) but no chunk."""
        self._check_open()
        with self._blobs.read() as txn:
            chunks, stored = read_counters(txn, self._blobs)
            logical = steps = 0
            for value in txn.cursor(db=self._blobs.dbs["steps"]).iternext(keys=False):
                logical += decode_manifest(value).logical_bytes
                steps += 1
        return StoreStats(steps, chunks, stored, logical, self._blobs.file_bytes())

    # -- reading ----------------------------------------------------------------------------------

    def load(self, step: int | str | None = None, keys=None, regex: str | None = None, *,
             verify: bool | None = None, branch: str | None = None) -> dict:
        """Read a step (default: latest) as component name -> state.

        ``step`` is a number or None (the latest) of ``branch`` (default: this store's), or
        a tag.  ``keys`` restricts the components.  With ``regex``, each component's value is a flat
        dict ``{leaf path: value}`` of the leaves whose path matches from its start, and
        only those leaves are read.  A sharded component comes back as an iterator that
        reads one shard at a time.  Raises StepNotFoundError, SelectionError (regex
        matched nothing), IntegrityError (missing or damaged chunk).
        """
        self._check_open()
        verify = self.verify_reads if verify is None else verify
        with self._blobs.read() as txn:
            key = self._locate(txn, step, None if branch is None else catalog.check_branch(branch))
            step = step_of(key)
            if not verify:
                log.info("loading %s of %s WITHOUT checking chunk digests (verify=False)", _describe(key), self.path)
            manifest = self._manifest(txn, key)
            names = self._select_components(manifest, keys)
            if regex is not None:
                return self._load_selected(txn, manifest, names, regex, verify)
            result = {}
            for name in names:
                node = manifest.component(name)
                if isinstance(node, ShardsNode):
                    result[name] = self._iter_shards(step, name, node, verify)
                else:
                    reader = reading.blob_reader(self._blobs, self._pool, txn, step, name, verify)
                    result[name] = codec.decode(node, reader, "", allow_pickle=self.allow_pickle)
            return result

    def _select_components(self, manifest: Manifest, keys) -> list[str]:
        if keys is None:
            return manifest.names
        if isinstance(keys, str):
            keys = [keys]
        missing = [k for k in keys if k not in manifest.names]
        if missing:
            raise StepNotFoundError(
                f"step {manifest.step} has no component {', '.join(map(repr, missing))}; "
                f"it has {', '.join(map(repr, manifest.names)) or 'none'}"
            )
        return list(keys)

    def _load_selected(self, txn, manifest: Manifest, names, regex: str, verify: bool) -> dict:
        result, available = {}, []
        for name in names:
            node = manifest.component(name)
            reader = reading.blob_reader(self._blobs, self._pool, txn, manifest.step, name, verify)
            chosen = codec.select(node, regex)
            result[name] = {p: codec.decode(n, reader, p, allow_pickle=self.allow_pickle) for p, n in chosen}
            if not chosen:
                available += [f"{name}:{p}" for p, _ in codec.leaf_nodes(node)][:20]
        if not any(result.values()):
            raise SelectionError(
                f"regex {regex!r} selects no leaf of {', '.join(names)} at step {manifest.step}; "
                f"leaf paths include: {', '.join(available[:40])}"
            )
        return result

    def _iter_shards(self, step: int, name: str, node: ShardsNode, verify: bool):
        for index, shard in enumerate(node.shards):
            with self._blobs.read() as txn:
                reader = reading.blob_reader(self._blobs, self._pool, txn, step, name, verify)
                value = codec.decode(shard, reader, str(index), allow_pickle=self.allow_pickle)
            yield value

"""Store: a thin facade over the collaborators that save, load and maintain a store.

``Store`` opens the storage engine and the config, then composes:

* a :class:`~castore.save.saver.Saver` (capture, commit, async saves, baselines, rollback);
* a :class:`~castore.loading.Loader` (verified reads of steps);
* a :class:`~castore.maintenance.maintainer.Maintainer` (retention, GC, compaction,
  accounting, deletes, tags, branches);
* the :mod:`~castore.catalog` functions for listing steps, branches and tags.

Each receives its dependencies here; none reaches into another.  The module is past ~400
lines on purpose: it is the public API, one documented method per operation, each a line
or two of delegation; the logic lives in the collaborators.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from concurrent.futures import ThreadPoolExecutor

from . import catalog
from .errors import UsageError
from .format.chunker import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES
from .format.compression import Compression
from .format.keys import MAIN, branch_of, check_branch, check_step, step_key, step_of
from .format.manifest import Manifest
from .format.schema import STORE_FORMAT, Table
from .inspection import StoreInspector
from .loading import Loader
from .maintenance import verify as verify_
from .maintenance.diffing import StepDiff
from .maintenance.gc import GcPlan, StepAccount, StoreStats
from .maintenance.maintainer import Maintainer
from .maintenance.retention import policy_of
from .maintenance.usage import StoreUsage
from .mirror import Mirror, MirrorOptions, bucket_gc, transfer
from .mirror.mirror import push_steps
from .save.background import SaveHandle
from .save.saver import Saver, SaveResult
from .save.session import SharedGate, writer_state
from .storage import ChunkStore, open_backend
from .storage.base import Backend
from .storage.bucket import Bucket
from .storage.objects import open_object_store
from .storage.remote import RemoteBackend

__all__ = ["Store"]

log = logging.getLogger(__name__)


class Store:
    """A content-addressed, deduplicating store of steps, each a dict of component trees.

    ``Store(path)`` opens the store in directory ``path``, creating it (and missing
    parents) unless ``create=False`` or ``readonly=True`` (``"memory://name"``: a store in
    this process's memory, for tests).  Without creating, a path that holds no store is
    refused with :class:`StoreNotFoundError` and left exactly as it was.
    ``Store("s3://bucket/prefix", readonly=True)`` reads a bucket a mirror or ``push`` wrote
    (a writable open of one is a :class:`UsageError`: writes go through a local store's
    ``mirror=``).  Other URLs (``gs://``, ``https://``, ``file://``, ...) are refused with
    :class:`UnsupportedLocationError` before anything is created.  A file in the way is a :class:`StoreNotFoundError`, a missing
    permission a :class:`StorePermissionError`; each says what to do.  ``readonly=True``
    loads from a store this user may not write, and beside another process writing it.

    Opening the same path again in one process shares one storage engine, in any mix and
    order of read-only, writable and other-branch ``Store`` objects, each closed when its
    owner likes (the writer lock goes with the last writable one).  The first save
    or delete takes the store's single-writer lock, raising :class:`StoreLockedError` if
    another process holds it (at once, or after waiting ``lock_timeout`` seconds).  A
    directory on a network filesystem (NFS, SMB, ...) is refused with
    :class:`UnsafeFilesystemError` unless ``allow_network_fs=True``: LMDB's map and locks
    are not safe there.

    ``compression`` says how new chunks are stored: ``"auto"`` (a trial per leaf decides;
    real observations shrink ~10x, float weights are stored raw), ``"none"``, or
    ``"zstd"`` / ``"zstd:LEVEL"``.  A new store records it (default ``"auto"``); an open
    without it uses the recorded setting.  Chunk ids hash the raw bytes, so stores of
    mixed settings deduplicate and verify alike.

    ``mirror="s3://bucket/prefix"`` uploads each committed step of this branch to a bucket
    in the background (see :class:`~castore.mirror.Mirror`; ``mirror_options`` a
    :class:`~castore.mirror.MirrorOptions`): ``wait()`` waits for the uploads too, and an
    upload's error is raised once by the next ``save``, ``wait`` or ``close``, after the
    local commit.

    A store holds branches, each its own sequence of steps; a ``Store`` works on one
    (``branch``, default ``"main"``): ``save``, ``delete`` and ``retain`` act on it, and
    ``steps``, ``latest``, ``tags`` and ``resolve`` default to it.  Tags name a step of
    any branch.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        create: bool = True,
        readonly: bool = False,
        chunk_bytes: int | None = None,
        compression: str | None = None,
        verify: bool = True,
        allow_pickle: bool = False,
        workers: int | None = None,
        check_tracking: bool | None = None,
        max_pending: int = 1,
        keep=None,
        branch: str = MAIN,
        allow_network_fs: bool = False,
        lock_timeout: float | None = None,
        mirror: str | None = None,
        mirror_options: MirrorOptions | None = None,
    ):
        if not isinstance(max_pending, int) or isinstance(max_pending, bool) or max_pending < 1:
            raise UsageError(f"max_pending must be an int >= 1, got {max_pending!r}")
        if chunk_bytes is not None and not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise UsageError(f"chunk_bytes must be in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}]")
        setting = None if compression is None else Compression.parse(compression)  # UsageError early
        self.path = os.fspath(path)
        self._readonly = readonly
        self.verify_reads = verify  # the default of load(verify=...)
        self._allow_pickle = allow_pickle
        if check_tracking is None:
            check_tracking = os.environ.get("CASTORE_CHECK_TRACKING", "").lower() in ("1", "true", "yes")
        self._check_tracking = check_tracking
        self._max_pending = max_pending
        self._branch_name = check_branch(branch)
        keep = policy_of(keep)
        self._closed = False
        self._backend = open_backend(
            self.path, create=create, readonly=readonly, allow_network_fs=allow_network_fs, lock_timeout=lock_timeout
        )
        try:
            config = catalog.open_config(
                self._backend, chunk_bytes, self.path, setting.name if setting else "auto", create=create
            )
            self._chunk_bytes, self._format = config.chunk_bytes, config.format
            self._compression = setting or Compression.parse(config.compression)
        except BaseException:
            self._backend.close()
            raise
        # a bucket's reads wait on the network, not the CPU: more of them at once
        remote = isinstance(self._backend, RemoteBackend)
        self._workers = workers or (max(16, os.cpu_count() or 1) if remote else os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="castore-hash")
        self._writer = writer_state(self._backend)
        self._chunks = ChunkStore(self._backend)
        where = self.path if self.branch == MAIN else f"branch {self.branch!r} of {self.path}"
        self._saver = Saver(
            self._backend,
            self._chunks,
            take_writer=self._take_writer,
            writer=self._writer,
            pool=self._pool,
            workers=self.workers,
            chunk_bytes=self.chunk_bytes,
            compression=self._compression,
            branch=self.branch,
            where=where,
            allow_pickle=allow_pickle,
            check_tracking=check_tracking,
            max_pending=max_pending,
            # the maintainer is built just below (it needs the saver as its gate)
            retain_in_commit=lambda *args: self._maintainer.retain_in_commit(*args),
            after_commit=self._after_commit,
        )
        self._loader = Loader(self._backend, self._chunks, pool=self._pool, where=self.path, allow_pickle=allow_pickle)
        self._maintainer = Maintainer(
            self._backend,
            self._chunks,
            gate=SharedGate(self._writer, self._saver),  # GC waits for every Store's saves on this path
            pinned_ids=self._writer.pinned_ids,
            branch=self.branch,
            path=self.path,
            keep=keep,
        )
        self._mirror: Mirror | None = None
        if mirror is not None:
            self._open_mirror(mirror, mirror_options or MirrorOptions())

    def _open_mirror(self, url: str, options: MirrorOptions) -> None:
        if self.readonly:
            raise UsageError(f"store {self.path} is open read-only: it cannot mirror (mirror= is for writers)")
        if not isinstance(options, MirrorOptions):
            raise UsageError(f"mirror_options must be a castore.MirrorOptions, got {type(options).__name__}")
        try:
            bucket = Bucket(open_object_store(url, **options.object_store_options()), create=True)
            self._mirror = Mirror(
                self._backend, self._chunks, bucket, branch=self.branch, keep=lambda: self.keep, options=options
            )
        except BaseException:
            self.close()
            raise

    def _after_commit(self, retained, new_bytes: int, key: bytes | None) -> None:
        self._maintainer.after_commit(retained, new_bytes)
        if key is not None and self._mirror is not None:
            self._mirror.enqueue(key)

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for async saves, release the engine (and the writer lock).  Idempotent.

        Raises the error of an async save nobody has seen, after closing.
        """
        if self._closed:
            return
        try:
            try:
                self._saver.close()
                self._maintainer.close()  # collects what amortized GC left behind
            finally:
                if self._mirror is not None:  # whatever happened above: its thread reads the backend
                    self._mirror.close()  # uploads what is queued first
        finally:
            self._closed = True
            self._pool.shutdown(wait=True)
            self._backend.close()
        self._saver.raise_failed()
        if self._mirror is not None:
            self._mirror.raise_failed()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def keep(self):
        """The retention policy applied after each commit (None: keep every step); settable."""
        return self._maintainer.keep

    @keep.setter
    def keep(self, keep) -> None:
        self._maintainer.keep = policy_of(keep)

    # Settings fixed at open (the collaborators were built with them): read-only.
    readonly = property(lambda self: self._readonly, doc="Opened with ``readonly=True``.")
    allow_pickle = property(lambda self: self._allow_pickle, doc="Pickled leaves may be saved and loaded.")
    check_tracking = property(lambda self: self._check_tracking, doc="Check mode: reused chunks re-hashed.")
    max_pending = property(lambda self: self._max_pending, doc="Async saves in flight at most.")
    branch = property(lambda self: self._branch_name, doc="The branch this store saves to and lists.")
    chunk_bytes = property(lambda self: self._chunk_bytes, doc="The store's target chunk size.")
    workers = property(lambda self: self._workers, doc="Threads hashing and verifying chunks.")
    compression = property(
        lambda self: self._compression.name, doc="How new chunks are stored: 'auto', 'none' or 'zstd:LEVEL'."
    )

    @property
    def backend(self) -> Backend:
        """The storage engine (for inspection and tests: ``with store.backend.read() as txn``)."""
        return self._backend

    @property
    def format(self) -> int:
        """The store format version of the data on disk."""
        return self._format

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError(f"store {self.path} is closed")

    def _take_writer(self) -> object:
        """The writer lock, taken once; a store of an older format is upgraded on the way."""
        self._check_open()
        if self.readonly:
            raise UsageError(f"store {self.path} is open read-only")
        session = self._writer.take_writer()
        if self._format < STORE_FORMAT:
            self._backend.write(catalog.migrate_config)
            self._format = STORE_FORMAT
        return session

    # -- writing --------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        tree: dict,
        *,
        overwrite: bool = False,
        metrics: dict | None = None,
        carry=None,
        created: float | None = None,
    ) -> SaveResult:
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

        ``carry=(source_step, [names])`` makes a partial save whole: those components of
        ``source_step`` (of this branch) go into the new step as they are, by reference
        (no chunk is read or written).  If the source step is deleted or replaced before
        the commit, the save raises :class:`SaveError` and commits nothing.

        ``created`` records another save time than now (UNIX time; an import of old
        checkpoints keeps theirs, so time-based retention buckets them as they were).
        """
        self._check_open()
        result = self._saver.save(step, tree, overwrite=overwrite, metrics=metrics, carry=carry, created=created)
        self._raise_mirror_failed()
        return result

    def _raise_mirror_failed(self) -> None:
        """An upload error nobody has seen, raised after the local commit (the step is safe)."""
        if self._mirror is not None:
            self._mirror.raise_failed()

    def save_async(
        self, step: int, tree: dict, *, overwrite: bool = False, metrics: dict | None = None, carry=None
    ) -> SaveHandle:
        """Capture ``tree`` now and commit it in the background; returns a :class:`SaveHandle`.

        When this returns, the changed chunks have been copied (at most ``max_pending``
        saves' worth of changed bytes are held), so the caller may change its state at
        once.  Saves commit in the order they were submitted.  Raises at once what
        :meth:`save` raises before writing (bad input, locked store, an earlier async
        save's unseen error); errors while writing come from the handle or :meth:`wait`.
        ``carry`` as in :meth:`save`.
        """
        self._check_open()
        handle = self._saver.save_async(step, tree, overwrite=overwrite, metrics=metrics, carry=carry)
        self._raise_mirror_failed()
        return handle

    def in_flight(self) -> int:
        """Async saves submitted and not yet finished."""
        return self._saver.in_flight()

    def wait(self, *, raise_errors: bool = True) -> None:
        """Wait for async saves in flight; raise the first error nobody has seen yet (with
        ``raise_errors=False`` the errors stay for the next save, wait or close)."""
        self._saver.wait(raise_errors=raise_errors)
        if self._mirror is not None:
            self._mirror.wait(raise_errors=raise_errors)

    # -- the mirror -----------------------------------------------------------------------------

    @property
    def mirror(self) -> Mirror | None:
        """The background uploader of ``mirror=`` (None without one): ``pending()``, ``results``."""
        return self._mirror

    def pull(self, step: int | str | None = None, *, branch: str | None = None, url: str | None = None):
        """Copy a step (default: the latest of ``branch``) from the mirror (or the bucket at
        ``url``) into this store, fetching only the chunks it lacks; returns the step, or None
        if the bucket has no step of the branch.  Verified on the way in.  A step the store
        has already is left as it is; one it has with other content is a StepExistsError.
        """
        self._check_open()
        branch = self._branch(branch)
        with self._remote(url) as bucket:
            key = transfer.remote_key(bucket, step, branch)
            if key is None:
                return None
            with self._saver.locked():  # the writer lock; GC waits (it would see the pull's batches as garbage)
                transfer.pull_step(bucket, self._backend, self._chunks, key)
        return step_of(key)

    def push(self, url: str | None = None, *, branches=None, options: MirrorOptions | None = None) -> list:
        """Upload every step of ``branches`` (default: all) and their tags to the bucket at
        ``url`` (default: the mirror's), only what it lacks; returns an
        :class:`~castore.mirror.UploadResult` per step sent.  Waits for the mirror first."""
        self._check_open()
        self.wait()
        names = self.branches() if branches is None else [check_branch(b) for b in branches]
        options = options or (self._mirror.options if self._mirror is not None else MirrorOptions())
        with self._remote(url, create=True, options=options, refresh=False) as bucket:
            return push_steps(self._backend, self._chunks, bucket, names, options)

    def mirror_gc(self, *, url: str | None = None, dry_run: bool = False, repack_below: float = 0.5):
        """Bucket GC of the mirror (or ``url``): free packs no step needs, repack mostly-garbage
        ones; returns the :class:`~castore.mirror.BucketGcPlan`.  Raises BucketBusyError while
        an upload holds the bucket's lock (this store's own uploads are waited for first)."""
        self._check_open()
        if url is None and self._mirror is not None:
            self._mirror.wait(raise_errors=False)
        with self._remote(url, refresh=False) as bucket:
            return bucket_gc.collect(bucket, dry_run=dry_run, repack_below=repack_below)

    @contextlib.contextmanager
    def _remote(
        self, url: str | None, *, create: bool = False, options: MirrorOptions | None = None, refresh: bool = True
    ):
        """The bucket at ``url`` (default: the mirror's), its index read unless ``refresh=False``
        (push and bucket GC read it themselves, under their lock)."""
        if url is None:
            if self._mirror is None:
                raise UsageError(f"store {self.path} has no mirror: pass url= or open it with mirror=")
            url = self._mirror.url
        if options is None and self._mirror is not None:
            options = self._mirror.options  # its retry policy too
        extra = options.object_store_options() if options is not None else {}
        bucket = Bucket(open_object_store(url, **extra), create=create)
        try:
            if refresh:
                bucket.refresh_index()
            yield bucket
        finally:
            bucket.close()

    def continue_from(self, step: int) -> None:
        """Make the next save continue the lineage of ``step`` (of this branch).

        When that save commits, the branch's steps after ``step`` move to a new branch
        ``<branch>-abandoned-<step>`` in the same transaction (metrics and tags follow
        them), so the old future stays reachable but is not mixed into this one.
        ``Checkpoint.load`` calls this; a save that commits nothing keeps it pending.  With a
        mirror, the bucket's steps after ``step`` move aside the same way when that save is
        uploaded.
        """
        self._saver.continue_from(step)
        if self._mirror is not None:
            self._mirror.note_continue(step)

    @property
    def continuing_from(self) -> int | None:
        """The step the next save continues from, if :meth:`continue_from` set one."""
        return self._saver.continuing_from

    # -- maintenance ----------------------------------------------------------------------------

    def delete(self, step) -> None:
        """Remove a step, or a list of steps in one transaction (all or none); their chunks
        stay until garbage collection (:meth:`gc`) frees them.

        Raises StepNotFoundError, and UsageError for a tagged step (untag it first).
        """
        self._check_open()
        if isinstance(step, (list, tuple)):
            self._maintainer.delete(list(step))
        else:
            self._maintainer.delete([step])

    def retain(self, keep=None) -> list[int]:
        """Delete the steps ``keep`` (default: the store's policy) does not keep, then collect.

        Returns the deleted steps.  The latest and tagged steps are always kept.
        """
        self._check_open()
        return self._maintainer.retain(keep)

    def plan_retain(self, keep=None) -> list[int]:
        """The steps :meth:`retain` would delete now (a dry run); nothing changes."""
        self._check_open()
        return self._maintainer.plan_retain(keep)

    def rollback(self, step: int) -> str | None:
        """Make ``step`` this branch's latest now: its later steps move (with their tags and
        metrics) to a new branch ``<branch>-abandoned-<step>``, whose name is returned (None
        if ``step`` is the latest already).  No chunk is written or freed.  A
        :class:`Checkpoint` does this lazily, at the first save after ``load(step=...)``.

        Raises StepNotFoundError.
        """
        self._check_open()
        return self._maintainer.rollback(step)

    def plan_gc(self, *, keep=None) -> GcPlan:
        """What :meth:`gc` would free now: steps, chunks, pages, bytes (a dry run).

        With ``keep`` (a policy as for :meth:`retain`), what ``retain(keep)`` would delete
        and free; such a plan given to :meth:`gc` is planned again, as the store is.  Works
        on a read-only store too.
        """
        self._check_open()
        return self._maintainer.plan_gc(quiesce=not self.readonly, keep=keep)

    def gc(self, plan: GcPlan | None = None, *, progress=None) -> GcPlan:
        """Free the chunks and pages no kept step references; returns what was freed.

        Crash-safe (a kill loses no chunk of a kept step; what is left is found by the next
        GC), never frees a chunk a save in this process may reuse, and readers keep
        working.  A ``plan`` from :meth:`plan_gc` is re-planned if the store changed since.
        ``progress(done, total)`` is called with ids freed so far, after each batch.
        """
        self._check_open()
        return self._maintainer.gc(plan, progress)

    def compact(self) -> tuple[int, int]:
        """Collect garbage, then rewrite the data file without free pages.

        Returns the disk bytes ``(before, after)``.  Needs the store to itself: raises
        :class:`StoreBusyError` if another process has it open, :class:`StoreLockedError` if
        another process writes it.  A kill at any instant leaves a loadable store.
        """
        self._check_open()
        return self._maintainer.compact()

    def accounting(self) -> list[StepAccount]:
        """Per kept step: logical bytes, stored bytes it references, bytes only it references
        (what deleting it would free) and bytes it shares.  Reads manifests, not chunks."""
        self._check_open()
        return self._maintainer.accounting()

    def usage(self) -> StoreUsage:
        """Where the bytes go: every kept step (with its components, tags, metrics and save
        times) and the totals, dedup and compression ratios.  Reads manifests, not chunks."""
        self._check_open()
        return self._maintainer.usage()

    def diff(
        self, a: int | str | None, b: int | str | None = None, *, branch: str | None = None, branch_b: str | None = None
    ) -> StepDiff:
        """What changed from step ``a`` to step ``b`` (default: the latest), leaf by leaf:
        chunks changed at each position, and stored bytes of B that A does not reference.
        Steps are ints or tags; ``branch_b`` (default ``branch``) is B's branch.  Reads
        manifests and pages, not chunks.  Raises StepNotFoundError."""
        self._check_open()
        branch = self._branch(branch)
        return self._maintainer.diff((a, branch), (b, branch if branch_b is None else check_branch(branch_b)))

    def tag(self, name: str, step: int | str | None = None) -> int:
        """Name ``step`` (default: latest); tagged steps survive retention. Returns the step."""
        self._check_open()
        step = self._maintainer.tag(name, step)
        if self._mirror is not None:
            self._mirror.tags_changed()
        return step

    def untag(self, name: str) -> None:
        self._check_open()
        self._maintainer.untag(name)
        if self._mirror is not None:
            self._mirror.tags_changed()

    def fork(self, name: str, step: int | str | None = None) -> int:
        """Start branch ``name`` at ``step`` (default: latest; a tag may name another branch).

        Writes no chunk: the new branch's first step shares the manifest (and metrics) of
        ``step``.  Open it with ``Store(path, branch=name)``.  Raises UsageError if the
        branch has steps already, StepNotFoundError.  Returns the step.
        """
        self._check_open()
        return self._maintainer.fork(name, step)

    def delete_branch(self, name: str) -> list[int]:
        """Delete every step of branch ``name``; returns them.  Chunks stay until :meth:`gc`.

        Raises UsageError for this store's own branch or if a tag names one of its steps,
        StepNotFoundError if the branch has no steps.
        """
        self._check_open()
        return self._maintainer.delete_branch(name)

    def verify(
        self, sample: float = 1.0, *, seed: int | None = None, steps=None, progress=None
    ) -> verify_.VerifyReport:
        """Check every step of every branch down to its chunks; returns every problem found.

        All chunks are hashed unless ``sample`` (a fraction, e.g. 0.05) asks for a part;
        presence and length are always checked.  ``steps`` (``(branch, step)`` pairs)
        checks only those steps' chunks (tags, trash and counters are checked still).
        ``progress(done, total)`` is called with chunk bytes hashed so far and to hash.
        Damage is reported, never raised: each problem names step, branch, component, leaf
        path and chunk.  Runs in one read transaction beside a writer.
        """
        self._check_open()
        report = verify_.verify(self._chunks, self._pool, sample=sample, seed=seed, steps=steps, progress=progress)
        if isinstance(self._backend, RemoteBackend):  # what the bucket's own objects say
            found = [verify_.Problem("bucket", f"{key}: {what}") for key, what in self._backend.check()]
            report = dataclasses.replace(report, problems=tuple(found) + report.problems)
        return report

    # -- listing --------------------------------------------------------------------------------

    def _branch(self, branch: str | None) -> str:
        return self.branch if branch is None else check_branch(branch)

    def steps(self, *, branch: str | None = None) -> list[int]:
        """Committed step numbers of ``branch`` (default: this store's), ascending."""
        self._check_open()
        with self._backend.read() as txn:
            return catalog.branch_steps(txn, self._branch(branch))

    def latest(self, *, branch: str | None = None) -> int | None:
        """The highest committed step of ``branch`` (default: this store's), or None."""
        self._check_open()
        with self._backend.read() as txn:
            return catalog.latest_step(txn, self._branch(branch))

    def has_step(self, step: int, *, branch: str | None = None) -> bool:
        self._check_open()
        with self._backend.read() as txn:
            return txn.get(Table.STEPS, step_key(check_step(step), self._branch(branch))) is not None

    def branches(self) -> list[str]:
        """Branches holding steps (``main`` always), main first, then by name."""
        self._check_open()
        with self._backend.read() as txn:
            return catalog.branch_names(txn)

    def tags(self, *, branch: str | None = None) -> dict[str, int]:
        """``{tag: step}`` of the tags naming steps of ``branch`` (default: this store's)."""
        self._check_open()
        branch = self._branch(branch)
        with self._backend.read() as txn:
            tagged = catalog.tags(txn)
        return {name: step_of(key) for name, key in tagged.items() if branch_of(key) == branch}

    def metrics(self, step: int | str | None = None, *, branch: str | None = None) -> dict:
        """The metrics recorded with a step (default: latest)."""
        self._check_open()
        with self._backend.read() as txn:
            return catalog.read_metrics(txn, self._locate(txn, step, branch))

    def manifest(self, step: int | str | None = None, *, branch: str | None = None) -> Manifest:
        """The decoded manifest of ``step`` (default: latest of ``branch``, default this
        store's; or a tag); raises StepNotFoundError."""
        self._check_open()
        with self._backend.read() as txn:
            return catalog.manifest(txn, self._locate(txn, step, branch), self.path)

    def resolve(self, step: int | str | None = None, *, branch: str | None = None) -> int:
        """The step number of ``step``: an int, a tag name, or None for the latest.

        Raises StepNotFoundError for an unknown tag or an empty branch (an int is only
        range-checked; loading it says whether it exists).
        """
        return self.locate(step, branch=branch)[1]

    def locate(self, step: int | str | None = None, *, branch: str | None = None) -> tuple[str, int]:
        """``(branch, step)`` of ``step``: a tag may name a step of another branch."""
        self._check_open()
        with self._backend.read() as txn:
            key = self._locate(txn, step, branch)
        return branch_of(key), step_of(key)

    def _locate(self, txn, step: int | str | None, branch: str | None) -> bytes:
        return catalog.locate(txn, step, self._branch(branch), self.path)

    def stats(self) -> StoreStats:
        """Store totals; reads every manifest (small) but no chunk."""
        self._check_open()
        return self._maintainer.stats()

    # -- reading ----------------------------------------------------------------------------------

    def load(
        self,
        step: int | str | None = None,
        keys=None,
        regex: str | None = None,
        *,
        verify: bool | None = None,
        branch: str | None = None,
        into: dict | None = None,
        map_location=None,
    ) -> dict:
        """Read a step (default: latest) as component name -> state.

        ``step`` is a number or None (the latest) of ``branch`` (default: this store's), or
        a tag.  ``keys`` restricts the components.  With ``regex``, each component's value is a flat
        dict ``{leaf path: value}`` of the leaves whose path matches from its start, and
        only those leaves are read.  A sharded component comes back as an iterator that
        reads one shard at a time.  Raises StepNotFoundError, SelectionError (regex
        matched nothing), IntegrityError (missing or damaged chunk).

        ``into`` restores in place: ``{component: target}``, where a target is a tree shaped
        like the component's state whose numpy arrays (or TrackedArrays) are filled where
        shape and dtype match, and come back as themselves (no second copy of the state in
        memory).  If the load fails, a target may hold part of the step.  CPU torch tensors
        are filled in place too; device tensors are copied into.

        ``torch.Tensor`` leaves come back as tensors on the device they were saved from,
        or where ``map_location`` says (as in ``torch.load``: ``"cpu"``, a device, a
        ``{saved: wanted}`` dict, or ``fn(tensor, saved_device)``).

        A store open for writing remembers the chunk ids (and fingerprints) of what a full
        load read: the next save of this store hashes and writes only the chunks that
        changed since, tracked arrays or not.
        """
        self._check_open()
        verify = self.verify_reads if verify is None else verify
        if into is not None and (type(into) is not dict or regex is not None):
            raise UsageError("into= is a dict {component: target tree}, and cannot be combined with regex=")
        remember: list | None = None if self.readonly or regex is not None else []
        with self._backend.read() as txn:
            key = self._locate(txn, step, branch)
            result = self._loader.load(
                txn, key, keys, regex, verify, into=into, remember=remember, map_location=map_location
            )
            mark = self._chunks.deletion_mark(txn) if remember else None
        if remember:
            self._saver.adopt_loaded(remember, mark)
        return result

    def inspect(self) -> StoreInspector:
        """A read-only view of the store's tables and writer state, for tests and tools."""
        return StoreInspector(self._backend, self._writer)

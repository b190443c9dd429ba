"""Mirror: each committed step of a store's branch uploaded to a bucket, in the background.

``Store(path, mirror="s3://bucket/prefix")`` builds one :class:`Mirror`; the saver's
after-commit hook hands it each committed step key (:meth:`Mirror.enqueue`), and one
uploader thread sends them in commit order (:func:`~castore.mirror.transfer.upload_step`:
the values the bucket lacks, in packs, then the step record).  The training loop never
waits for the network: a save returns once it committed locally.

* **Errors** are kept and raised once, by the store's next ``save``, ``wait`` or
  ``close`` (:class:`~castore.errors.MirrorError`, chained to the remote error); the steps
  not uploaded stay queued and go with the next commit or ``wait``.  Throttling, 5xx and
  dropped connections are retried inside the object store first (its ``RetryPolicy``).
* **Resuming**: when the mirror opens, every step of the branch the local store has and
  the bucket lacks is queued, oldest first, so a killed run's uploads finish on restart.
* **Bounded**: ``(uploads + 1) * pack_bytes`` of upload buffers, ``max_rate`` bytes per
  second (None: as fast as the link goes).
* **The bucket follows the branch**: the bucket's steps after a rollback's step move to
  the abandoned branch there too before the next upload (the bucket shows the local
  lineage; later steps it cannot account for stop the upload with an error), the
  store's ``keep`` policy is applied to the bucket's steps of the branch after each
  upload (tagged steps are kept; tags are mirrored), and bucket GC runs once
  ``gc_after`` deleted steps have accumulated (:mod:`castore.mirror.bucket_gc`).
* **Locks**: the uploader holds a shared ``upload`` lock while it has work; bucket GC takes
  an exclusive one, and each waits for the other (``lock_wait`` seconds, then an error).
* **Many hosts, one step** (``MirrorOptions(rank=r, world=N, attempt=...)``): each rank
  uploads a part, and the step commits once every rank's part is there
  (:mod:`castore.mirror.multihost`); :meth:`Mirror.wait_committed` waits for that.  Rank 0
  alone applies retention, tags and bucket GC to the bucket; rollbacks are not followed
  (a committed step is never replaced) and local steps are not re-uploaded at open.

The module is past ~400 lines on purpose: the uploader thread's queue, its lock and GC
epoch, and the rules by which the bucket follows the branch (rollbacks, retention, tags)
share one state, and splitting them would pass that state around; ``push_steps`` reuses it.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401 - registers its exit hook before ours (see the end)
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..catalog import branch_names as catalog_branches
from ..catalog import tags as local_tags
from ..errors import BucketBusyError, CastoreError, CorruptDataError, LockLostError, MirrorError, UsageError
from ..format.keys import branch_end, branch_of, branch_prefix, describe_key, in_branch, step_key, step_of
from ..format.schema import Table
from ..format.stepinfo import decode_stepinfo
from ..maintenance.retention import Keep, StepInfo
from ..save.background import wait_all_at_exit
from ..storage import ChunkStore
from ..storage.base import Backend
from ..storage.bucket import Bucket, LockHandle
from . import bucket_gc
from .multihost import PartCommitter, check_ranks
from .transfer import RateLimit, UploadResult, remote_key, upload_step

if TYPE_CHECKING:  # obstore (under storage.s3) is the s3 extra's: imported when an s3:// URL opens
    from ..storage.s3 import RetryPolicy

__all__ = ["Mirror", "MirrorOptions"]

log = logging.getLogger("castore.mirror")

#: the newest steps a mirror compares with the bucket's records when it opens (older ones by name)
RECHECKED_AT_OPEN = 64
#: uploads of one step redone after a bucket GC took the lock away, before the error stands
LOCK_LOST_RETRIES = 2
#: how much lower than the training loop the upload threads run (``nice``; Linux)
UPLOAD_NICENESS = 10


@dataclass(frozen=True, slots=True)
class MirrorOptions:
    """How a :class:`Mirror` uploads (``Store(..., mirror_options=MirrorOptions(...))``)."""

    #: target pack size: values are sent in objects of about this many bytes
    pack_bytes: int = 32 << 20
    #: packs uploading at once (memory: ``(uploads + 1) * pack_bytes``)
    uploads: int = 4
    #: bytes per second at most (None: no limit)
    max_rate: float | None = None
    #: seconds a lock lives unless refreshed (uploads refresh it every third of this)
    lock_ttl: float = 600.0
    #: seconds an upload waits for a bucket GC's lock before it fails
    lock_wait: float = 120.0
    #: run bucket GC after this many steps were deleted from the bucket (0: never by itself)
    gc_after: int = 8
    #: how the bucket's requests retry and time out (None: the object store's default
    #: :class:`~castore.storage.s3.RetryPolicy`, which gives up on an unreachable server
    #: after about 20 s; a shorter one surfaces an outage sooner, as a MirrorError)
    retry: RetryPolicy | None = None
    #: this process's rank among ``world`` processes that save one step together
    #: (``castore.mirror.multihost``); ``world=1``: this store's steps are whole steps
    rank: int = 0
    world: int = 1
    #: with ``world > 1``: the name of this launch, the same on every rank and new at each
    #: restart (e.g. the scheduler's job id and restart count); only parts of one attempt merge
    attempt: str | None = None

    def __post_init__(self):
        if not isinstance(self.pack_bytes, int) or not 1 << 20 <= self.pack_bytes <= 1 << 30:
            raise UsageError(f"pack_bytes must be an int in [1 MiB, 1 GiB], got {self.pack_bytes!r}")
        if not isinstance(self.uploads, int) or not 1 <= self.uploads <= 64:
            raise UsageError(f"uploads must be an int in [1, 64], got {self.uploads!r}")
        if self.max_rate is not None and not self.max_rate > 0:
            raise UsageError(f"max_rate must be positive bytes per second or None, got {self.max_rate!r}")
        if not self.lock_ttl > 0 or not self.lock_wait >= 0 or self.gc_after < 0:
            raise UsageError("lock_ttl must be > 0, lock_wait >= 0, gc_after >= 0")
        if self.retry is not None:
            # here, not at the top: castore.storage.s3 imports obstore (the s3 extra), which
            # whoever built a RetryPolicy has imported already
            from ..storage import s3

            if not isinstance(self.retry, s3.RetryPolicy):
                raise UsageError(f"retry must be a castore.storage.s3.RetryPolicy or None, got {self.retry!r}")
        check_ranks(self.rank, self.world, self.attempt)

    def object_store_options(self) -> dict:
        """What :func:`~castore.storage.objects.open_object_store` is given for these options."""
        return {} if self.retry is None else {"retry": self.retry}


class Mirror:
    """The uploader of one store's branch (see the module docstring)."""

    def __init__(
        self,
        backend: Backend,
        chunks: ChunkStore,
        bucket: Bucket,
        *,
        branch: str,
        keep: Callable[[], Keep | None],
        options: MirrorOptions,
    ):
        self.backend, self.chunks, self.bucket = backend, chunks, bucket
        self.branch = branch
        self.options = options
        self._keep = keep
        self._limit = RateLimit(options.max_rate)
        self._pool = ThreadPoolExecutor(
            options.uploads, thread_name_prefix="castore-upload", initializer=background_priority
        )
        self._cond = threading.Condition()
        self._queue: deque[bytes] = deque()
        self._busy = False
        self._stalled = False  # the last attempt failed: wait for enqueue() or wait() to retry
        self._tags_changed = False  # the store's tags changed since the uploader last mirrored them
        self._error: BaseException | None = None
        self._closing = False
        self._lock: LockHandle | None = None
        self._epoch = b""  # the bucket's GC epoch when the lock was taken (and the index read)
        self._continued_from: int | None = None  # see note_continue
        # locks whose release failed (the bucket was unreachable): released once it answers
        # again, or they would hold bucket GC off for lock_ttl
        self._unreleased: list[LockHandle] = []
        self._deleted_since_gc = 0
        self._infos: dict[bytes, StepInfo] = {}  # bucket steps' stepinfo, read once each
        #: what the uploads did, oldest first (for tests, benchmarks and ``castore``)
        self.results: list[UploadResult] = []
        #: a multi-host rank's parts and commits (None for a single-host mirror)
        self.parts: PartCommitter | None = None
        if options.world > 1:
            attempt = options.attempt or ""  # checked by MirrorOptions already
            self.parts = PartCommitter(bucket, rank=options.rank, world=options.world, attempt=attempt)
        else:  # a multi-host rank does not know which attempt saved its old steps: not re-uploaded
            remote = set(bucket.step_keys())
            with backend.read() as txn:
                local = {
                    bytes(k): bytes(v)
                    for k, v in txn.scan(Table.STEPS, branch_prefix(branch), branch_end(branch))
                    if in_branch(k, branch)
                }
            # the steps the bucket lacks, and the newest it has with another manifest (an
            # overwrite or a rollback committed while no mirror ran, or before its upload)
            shared = sorted(k for k in local if k in remote)[-RECHECKED_AT_OPEN:]
            differ = {k for k, r in bucket.get_steps(shared).items() if getattr(r, "manifest", None) != local[k]}
            self._queue.extend(k for k in sorted(local) if k not in remote or k in differ)
        self._thread = threading.Thread(target=self._run, name="castore-mirror", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    @property
    def url(self) -> str:
        return self.bucket.url

    # -- the store's side ----------------------------------------------------------------------------

    def enqueue(self, key: bytes) -> None:
        """Queue a step the store just committed (and retry what failed before)."""
        with self._cond:
            key = bytes(key)
            in_flight = self._busy and self._queue and self._queue[0] == key
            if key not in self._queue or (in_flight and self._queue.count(key) == 1):
                # a key in flight is queued again: its upload may have read the manifest an
                # overwrite (or a rollback's re-save) has replaced since
                self._queue.append(key)
            self._stalled = False
            self._cond.notify_all()

    def tags_changed(self) -> None:
        """The store's tags changed (``tag``, ``untag``): mirror them once what is queued is
        uploaded, without waiting for the next commit (rank 0's alone in a multi-host job)."""
        if self.options.rank != 0:
            return
        with self._cond:
            self._tags_changed = True
            self._cond.notify_all()

    def pending(self) -> int:
        """Steps committed locally and not uploaded yet."""
        with self._cond:
            return len(self._queue)

    def wait(self, *, raise_errors: bool = True) -> None:
        """Upload every queued step (retrying one that failed) and the tags, then raise an
        unseen error."""
        with self._cond:
            if not self._closing:  # a closed mirror uploads nothing more: no one to wait for
                self._stalled = False
                self._cond.notify_all()
                while (self._queue or self._tags_changed or self._busy) and not self._stalled:
                    self._cond.wait()
        if raise_errors:
            self.raise_failed()

    def raise_failed(self) -> None:
        """Raise the upload error nobody has seen yet (once)."""
        with self._cond:
            error, self._error = self._error, None
        if error is not None:
            if isinstance(error, MirrorError):
                raise error
            raise MirrorError(f"uploading to the mirror {self.url} failed: {error}") from error

    def wait_committed(self, step: int, *, timeout: float = 60.0) -> None:
        """Wait for this store's uploads (:meth:`wait`), then until ``step`` of the branch is
        committed in the bucket: with ``world > 1``, until every rank's part is there and one
        of them wrote the step record.

        Raises this store's upload error (:class:`~castore.errors.MirrorError`), and for a
        multi-host step :class:`~castore.errors.CommitTimeoutError` after ``timeout`` seconds
        (naming the ranks whose part is missing), :class:`~castore.errors.ComponentCollisionError`.
        """
        key = step_key(step, self.branch)
        self.wait()
        if self.parts is not None:
            self.parts.wait_committed(key, timeout)
        elif self.bucket.get_step(key) is None:
            raise MirrorError(f"{describe_key(key)} is not in {self.url} (not saved here, or deleted since)")

    def latest_committed(self) -> int | None:
        """The latest step of the branch committed in the bucket (None if none): where every
        rank of a multi-host job resumes from."""
        key = remote_key(self.bucket, None, self.branch)
        return None if key is None else step_of(key)

    def close(self, *, upload: bool = True) -> None:
        """Upload what is queued (unless ``upload=False``), stop the thread, release the lock.
        Idempotent."""
        with self._cond:
            if self._closing:
                return
        try:
            if upload:
                self.wait(raise_errors=False)
        finally:
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            self._thread.join()
            self._pool.shutdown(wait=True)
            self._release()
            self.bucket.close()
            _LIVE.discard(self)

    # -- the uploader thread -------------------------------------------------------------------------

    def _run(self) -> None:
        background_priority()
        while True:
            with self._cond:
                while not self._closing and (not (self._queue or self._tags_changed) or self._stalled):
                    if self._lock is not None and not self._queue:
                        break  # idle: let a bucket GC in
                    self._cond.wait()
                if self._closing:
                    return
                if not (self._queue or self._tags_changed) or self._stalled:
                    idle = True
                else:
                    idle = False
                    key = self._queue[0] if self._queue else None  # None: only the tags changed
                    if key is None:
                        self._tags_changed = False  # a change from here on asks for another pass
                    self._busy = True
            if idle:
                self._release()
                continue
            try:
                if key is None:
                    self._sync_tags()
                else:
                    self._upload(key)
            except BaseException as exc:  # kept for the store's next call
                what = "mirroring the tags" if key is None else f"upload of {describe_key(key)}"
                log.warning("%s to %s failed: %s", what, self.url, exc)
                self._release()
                with self._cond:
                    if self._error is None:
                        self._error = exc
                    self._tags_changed = self._tags_changed or key is None
                    self._stalled = True
                    self._busy = False
                    self._cond.notify_all()
                continue
            with self._cond:
                if key is not None and self._queue and self._queue[0] == key:
                    self._queue.popleft()
                drained = not self._queue
            if drained:
                # before wait() can return: a bucket GC right after it (Store.mirror_gc) must
                # not find this store's own upload lock still there
                self._release()
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _take_lock(self) -> LockHandle:
        if self._lock is not None:
            self._lock.refresh_if_due()
            return self._lock
        deadline = time.monotonic() + self.options.lock_wait
        delay = 0.2
        while True:
            try:
                self._lock = self.bucket.take_lock("upload", self.options.lock_ttl)
                break
            except BucketBusyError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        self._epoch = self.bucket.gc_epoch()  # before the index: a GC from here on changes it
        self.bucket.refresh_index()  # a GC may have removed packs since we last looked
        self._release_unreleased()
        return self._lock

    def _release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None and not lock.release():
            self._unreleased.append(lock)
        elif lock is not None:
            self._release_unreleased()

    def _release_unreleased(self) -> None:
        self._unreleased = [lock for lock in self._unreleased if not lock.release()]

    def _upload(self, key: bytes) -> None:
        for attempt in range(LOCK_LOST_RETRIES + 1):
            lock = self._take_lock()
            keys = self._follow_rollback(key, self._branch_keys()) if self.parts is None else []
            try:
                result = upload_step(
                    self.backend,
                    self.chunks,
                    self.bucket,
                    key,
                    lock=lock,
                    pack_bytes=self.options.pack_bytes,
                    uploads=self.options.uploads,
                    limit=self._limit,
                    pool=self._pool,
                    epoch=self._epoch,
                    publish=None if self.parts is None else self.parts.publish,
                )
                break
            except LockLostError:  # a bucket GC ran meanwhile: a new lock (it waits for the GC), again
                self._release()  # its object is gone or stale: deleting it is harmless
                if attempt == LOCK_LOST_RETRIES:
                    raise
                log.info("mirror %s: %s; uploading %s again", self.url, "lock lost", describe_key(key))
        if result is None:
            return  # deleted locally before its turn
        # its record may replace one of the same key (a rollback's new future): read it again
        self._infos.pop(key, None)
        self.results.append(result)
        if self.options.rank != 0:
            return  # one rank looks after the bucket's steps
        if self.parts is None:
            keys = sorted(set(keys) | {key})
        else:  # listed now: whether this step committed yet depends on the other ranks
            keys = self._branch_keys()
        tags = self._sync_tags(keys)
        self._retain(keys, tags)

    def _branch_keys(self) -> list[bytes]:
        return [k for k in self.bucket.step_keys() if in_branch(k, self.branch)]

    def note_continue(self, step: int) -> None:
        """The store's next save continues from ``step`` (``Store.continue_from``): when it is
        uploaded, the bucket's steps of the branch after ``step`` move to a branch
        ``<branch>-abandoned-<step>`` there too (nothing is deleted)."""
        with self._cond:
            self._continued_from = step

    def _follow_rollback(self, key: bytes, keys: list[bytes]) -> list[bytes]:
        """Before step ``key`` goes up: the bucket's steps of the branch after it that the
        local lineage does not have are an abandoned future; returns the branch's keys left.

        * after :meth:`note_continue(p) <note_continue>` (a load of an earlier step), every
          bucket step after ``p`` moves to ``<branch>-abandoned-<p>`` in the bucket;
        * a step the local store moved to another branch (``Store.rollback``, a continuation
          committed while no mirror ran), found there with the same manifest, moves to that
          branch in the bucket;
        * any other is another host's (or this store resumed from behind the bucket):
          :class:`MirrorError`, and nothing is changed.
        """
        with self._cond:
            since, self._continued_from = self._continued_from, None
        if since is not None and since < step_of(key):
            moving = [k for k in keys if step_of(k) > since]
            if moving:
                self._move_in_bucket(moving, self._free_branch(f"{self.branch}-abandoned-{since}"), keys)
            return [k for k in keys if k not in moving]
        later = [k for k in keys if step_of(k) > step_of(key)]
        if not later:
            return keys
        with self.backend.read() as txn:
            later = [k for k in later if txn.get(Table.STEPS, k) is None]
            branches = [b for b in catalog_branches(txn) if b != self.branch]
            targets: dict[bytes, str] = {}
            for k, record in self.bucket.get_steps(later).items():
                if record is None or isinstance(record, CastoreError):
                    continue
                for branch in branches:
                    moved = txn.get(Table.STEPS, step_key(step_of(k), branch))
                    if moved is not None and bytes(moved) == record.manifest:
                        targets[k] = branch
                        break
        stray = [k for k in later if k not in targets]
        if stray:
            raise MirrorError(
                f"{self.url} holds steps of branch {self.branch!r} after {step_of(key)} that this store does not "
                f"have ({', '.join(str(step_of(k)) for k in stray[:5])}): another host saved them, or this store "
                "resumed from behind the bucket; pull the bucket's latest step first (Store.pull) or load the "
                "step to continue from (it moves the later ones aside); nothing was changed"
            )
        for branch in sorted(set(targets.values())):
            self._move_in_bucket([k for k, b in targets.items() if b == branch], branch, keys)
        return [k for k in keys if k not in targets]

    def _free_branch(self, base: str) -> str:
        """``base``, or ``base-2``, ``base-3``, ... : the first name with no step in the bucket."""
        taken = {_branch_or_none(k) for k in self.bucket.step_keys()}
        name, n = base[:190], 1
        while name in taken:
            n += 1
            name = f"{base[:190]}-{n}"
        return name

    def _move_in_bucket(self, moving: list[bytes], branch: str, keys: list[bytes]) -> None:
        """Copy the step records of ``moving`` to ``branch`` (same numbers), re-point their tags,
        then delete the originals: a kill in between leaves both, never neither."""
        records = self.bucket.get_steps(moving)
        tags = self.bucket.tags()
        for old, record in records.items():
            if record is None or isinstance(record, CastoreError):
                continue
            new = step_key(step_of(old), branch)
            self.bucket.put_step(new, record.manifest, record.stepinfo)
            for name, tagged in tags.items():
                if tagged == old:
                    self.bucket.put_tag(name, new)
        self.bucket.delete_steps(moving)
        for old in moving:
            self._infos.pop(old, None)
        log.info("mirror %s: %d steps of %r moved to %r in the bucket", self.url, len(moving), self.branch, branch)

    def _sync_tags(self, keys: list[bytes] | None = None) -> dict[str, bytes]:
        """The bucket's tags of this branch become the local ones (``keys``: the branch's steps
        in the bucket, listed if None); returns the bucket's tags."""
        if keys is None:
            keys = self._branch_keys()
        with self.backend.read() as txn:
            local = {n: k for n, k in local_tags(txn).items() if in_branch(k, self.branch)}
        remote = self.bucket.tags()
        present = set(keys)
        for name, key in local.items():
            if remote.get(name) != key and key in present:
                self.bucket.put_tag(name, key)
                remote[name] = key
        stale = [n for n, k in remote.items() if n not in local and _branch_or_none(k) == self.branch]
        self.bucket.delete_tags(stale)
        for name in stale:
            del remote[name]
        return remote

    def _retain(self, keys: list[bytes], tags: dict[str, bytes]) -> None:
        policy = self._keep()
        if policy is None:
            return
        tagged = set(tags.values())
        missing = [k for k in keys if k not in self._infos]
        for key, record in self.bucket.get_steps(missing).items():
            if record is None or isinstance(record, CastoreError):
                continue
            try:
                info = decode_stepinfo(record.stepinfo, f"stepinfo of {describe_key(key)} in {self.url}")
                created = info.created if info.created is not None else 0.0
            except CorruptDataError:
                continue
            self._infos[key] = StepInfo(step_of(key), created, info.metrics, False)
        infos = [
            StepInfo(i.step, i.created, i.metrics, k in tagged) for k in keys if (i := self._infos.get(k)) is not None
        ]
        kept = policy.select(infos)
        doomed = [step_key(i.step, self.branch) for i in infos if i.step not in kept]
        if doomed:
            self.bucket.delete_steps(doomed)
            for key in doomed:
                self._infos.pop(key, None)
            self._deleted_since_gc += len(doomed)
        if self.options.gc_after and self._deleted_since_gc >= self.options.gc_after:
            self._release()  # GC needs the bucket to itself; our next upload takes the lock again
            try:
                bucket_gc.collect(self.bucket, lock_ttl=self.options.lock_ttl)
                self._deleted_since_gc = 0
            except BucketBusyError as exc:
                log.info("mirror %s: bucket GC put off: %s", self.url, exc)


def _branch_or_none(key: bytes) -> str | None:
    try:
        return branch_of(key)
    except CorruptDataError:
        return None


def background_priority() -> None:
    """Lower this thread's CPU priority (Linux schedules threads one by one: nice 10 here
    leaves the training loop's threads first in line on a busy machine); a no-op elsewhere."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), UPLOAD_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not permitted: uploads run as they are
        pass


_LIVE: weakref.WeakSet[Mirror] = weakref.WeakSet()


def _upload_at_exit() -> None:
    """A script that ends without closing its store still gets its committed steps uploaded
    (as its async saves are committed): the saves first, then every mirror's queue."""
    wait_all_at_exit()
    for mirror in list(_LIVE):
        if mirror.pending():
            log.info("waiting for %d step(s) to upload to %s before exiting", mirror.pending(), mirror.url)
        try:
            mirror.wait()
        except BaseException as exc:
            log.error("upload to the mirror %s failed and nobody waited for it: %s", mirror.url, exc)


# Like the async saves' hook: before concurrent.futures shuts its executors down at exit
# (the upload pool is one); threading runs these hooks last registered, first run.
if hasattr(threading, "_register_atexit"):
    threading._register_atexit(_upload_at_exit)
else:  # pragma: no cover - CPython has it since 3.9
    atexit.register(_upload_at_exit)


def push_steps(
    backend: Backend, chunks: ChunkStore, bucket: Bucket, branches: list[str], options: MirrorOptions
) -> list[UploadResult]:
    """Upload every step of ``branches`` the bucket lacks, oldest first per branch, then the
    local tags naming uploaded steps; under an upload lock, in the caller's thread."""
    lock = bucket.take_lock("upload", options.lock_ttl)
    limit = RateLimit(options.max_rate)
    results = []
    try:
        epoch = bucket.gc_epoch()
        bucket.refresh_index()
        remote = set(bucket.step_keys())
        with backend.read() as txn:
            local = [bytes(k) for k, _ in txn.scan(Table.STEPS)]
            tagged = local_tags(txn)
        wanted = [k for k in local if k not in remote and _branch_or_none(k) in branches]
        with ThreadPoolExecutor(options.uploads, thread_name_prefix="castore-upload") as pool:
            for key in wanted:
                result = upload_step(
                    backend,
                    chunks,
                    bucket,
                    key,
                    lock=lock,
                    pack_bytes=options.pack_bytes,
                    uploads=options.uploads,
                    limit=limit,
                    pool=pool,
                    epoch=epoch,
                )
                if result is not None:
                    results.append(result)
                    remote.add(key)
        remote_tags = bucket.tags()
        for name, key in tagged.items():
            if key in remote and remote_tags.get(name) != key:
                bucket.put_tag(name, key)
    finally:
        lock.release()
    return results

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
* **The bucket follows the branch**: steps of the branch a rollback moved away locally
  are removed from it before the next upload (the bucket shows the local lineage), the
  store's ``keep`` policy is applied to the bucket's steps of the branch after each
  upload (tagged steps are kept; tags are mirrored), and bucket GC runs once
  ``gc_after`` deleted steps have accumulated (:mod:`castore.mirror.bucket_gc`).
* **Locks**: the uploader holds a shared ``upload`` lock while it has work; bucket GC takes
  an exclusive one, and each waits for the other (``lock_wait`` seconds, then an error).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..catalog import tags as local_tags
from ..errors import BucketBusyError, CastoreError, CorruptDataError, MirrorError, UsageError
from ..format.keys import branch_end, branch_of, branch_prefix, describe_key, in_branch, step_key, step_of
from ..format.schema import Table
from ..format.stepinfo import decode_stepinfo
from ..maintenance.retention import Keep, StepInfo
from ..storage import ChunkStore
from ..storage.base import Backend
from ..storage.bucket import Bucket, LockHandle
from . import bucket_gc
from .transfer import RateLimit, UploadResult, upload_step

if TYPE_CHECKING:  # castore.storage.s3 needs obstore (the s3 extra): imported where a bucket opens
    from ..storage.s3 import RetryPolicy

__all__ = ["Mirror", "MirrorOptions"]

log = logging.getLogger("castore.mirror")


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
    #: how the mirror's requests are retried (None: :class:`~castore.storage.s3.RetryPolicy`'s
    #: defaults, about 20 s before an unreachable server fails an upload)
    retry: RetryPolicy | None = None

    def __post_init__(self):
        if not isinstance(self.pack_bytes, int) or not 1 << 20 <= self.pack_bytes <= 1 << 30:
            raise UsageError(f"pack_bytes must be an int in [1 MiB, 1 GiB], got {self.pack_bytes!r}")
        if not isinstance(self.uploads, int) or not 1 <= self.uploads <= 64:
            raise UsageError(f"uploads must be an int in [1, 64], got {self.uploads!r}")
        if self.max_rate is not None and not self.max_rate > 0:
            raise UsageError(f"max_rate must be positive bytes per second or None, got {self.max_rate!r}")
        if not self.lock_ttl > 0 or not self.lock_wait >= 0 or self.gc_after < 0:
            raise UsageError("lock_ttl must be > 0, lock_wait >= 0, gc_after >= 0")


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
        self._pool = ThreadPoolExecutor(options.uploads, thread_name_prefix="castore-upload")
        self._cond = threading.Condition()
        self._queue: deque[bytes] = deque()
        self._busy = False
        self._stalled = False  # the last attempt failed: wait for enqueue() or wait() to retry
        self._error: BaseException | None = None
        self._closing = False
        self._lock: LockHandle | None = None
        # locks whose release failed (the bucket was unreachable): released once it answers
        # again, or they would hold bucket GC off for lock_ttl
        self._unreleased: list[LockHandle] = []
        self._deleted_since_gc = 0
        self._infos: dict[bytes, StepInfo] = {}  # bucket steps' stepinfo, read once each
        #: what the uploads did, oldest first (for tests, benchmarks and ``castore``)
        self.results: list[UploadResult] = []
        remote = set(bucket.step_keys())
        with backend.read() as txn:
            local = [bytes(k) for k, _ in txn.scan(Table.STEPS, branch_prefix(branch), branch_end(branch))]
        self._queue.extend(k for k in local if in_branch(k, branch) and k not in remote)
        self._thread = threading.Thread(target=self._run, name="castore-mirror", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return self.bucket.url

    # -- the store's side ----------------------------------------------------------------------------

    def enqueue(self, key: bytes) -> None:
        """Queue a step the store just committed (and retry what failed before)."""
        with self._cond:
            if key not in self._queue:
                self._queue.append(bytes(key))
            self._stalled = False
            self._cond.notify_all()

    def pending(self) -> int:
        """Steps committed locally and not uploaded yet."""
        with self._cond:
            return len(self._queue)

    def wait(self, *, raise_errors: bool = True) -> None:
        """Upload every queued step (retrying one that failed), then raise an unseen error."""
        with self._cond:
            self._stalled = False
            self._cond.notify_all()
            while (self._queue or self._busy) and not self._stalled:
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

    def close(self, *, upload: bool = True) -> None:
        """Upload what is queued (unless ``upload=False``), stop the thread, release the lock."""
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

    # -- the uploader thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closing and (not self._queue or self._stalled):
                    if self._lock is not None and not self._queue:
                        break  # idle: let a bucket GC in
                    self._cond.wait()
                if self._closing:
                    return
                if not self._queue or self._stalled:
                    idle = True
                else:
                    idle = False
                    key = self._queue[0]
                    self._busy = True
            if idle:
                self._release()
                continue
            try:
                self._upload(key)
            except BaseException as exc:  # kept for the store's next call
                log.warning("upload of %s to %s failed: %s", describe_key(key), self.url, exc)
                self._release()
                with self._cond:
                    if self._error is None:
                        self._error = exc
                    self._stalled = True
                    self._busy = False
                    self._cond.notify_all()
                continue
            with self._cond:
                if self._queue and self._queue[0] == key:
                    self._queue.popleft()
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
        lock = self._take_lock()
        self._follow_rollback(key)
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
        )
        if result is None:
            return  # deleted locally before its turn
        self.results.append(result)
        self._sync_tags()
        self._retain()

    def _branch_keys(self) -> list[bytes]:
        return [k for k in self.bucket.step_keys() if in_branch(k, self.branch)]

    def _follow_rollback(self, key: bytes) -> None:
        """Steps of the branch after ``key`` that the local branch no longer has were moved
        away by a rollback: take them out of the bucket's branch too."""
        later = [k for k in self._branch_keys() if step_of(k) > step_of(key)]
        if not later:
            return
        with self.backend.read() as txn:
            gone = [k for k in later if txn.get(Table.STEPS, k) is None]
        if gone:
            log.info(
                "mirror %s: %d later steps of %r left the branch locally; removed", self.url, len(gone), self.branch
            )
            self.bucket.delete_steps(gone)
            self._deleted_since_gc += len(gone)

    def _sync_tags(self) -> None:
        """The bucket's tags of this branch become the local ones (names and steps)."""
        with self.backend.read() as txn:
            local = {n: k for n, k in local_tags(txn).items() if in_branch(k, self.branch)}
        remote = {n: k for n, k in self.bucket.tags().items() if _branch_or_none(k) == self.branch}
        present = set(self._branch_keys())
        for name, key in local.items():
            if remote.get(name) != key and key in present:
                self.bucket.put_tag(name, key)
        self.bucket.delete_tags([n for n in remote if n not in local])

    def _retain(self) -> None:
        policy = self._keep()
        if policy is None:
            return
        keys = self._branch_keys()
        tagged = {k for k in self.bucket.tags().values()}
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


def push_steps(
    backend: Backend, chunks: ChunkStore, bucket: Bucket, branches: list[str], options: MirrorOptions
) -> list[UploadResult]:
    """Upload every step of ``branches`` the bucket lacks, oldest first per branch, then the
    local tags naming uploaded steps; under an upload lock, in the caller's thread."""
    lock = bucket.take_lock("upload", options.lock_ttl)
    limit = RateLimit(options.max_rate)
    results = []
    try:
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

"""Moving one step between a local store and a bucket: :func:`upload_step` and :func:`pull_step`.

Both move stored values as they are (chunk values raw or encoded, pages), so a step costs
the same bytes in the bucket as on disk, and both keep the write orders that make a crash
harmless:

* **upload**: the values the bucket lacks go into packs (about ``pack_bytes`` each, a few
  uploading at once while the next fills), each pack before its index; the step record
  goes last, once every pack it needs is indexed, and only while the uploader's lock is
  held (bucket GC cannot have freed what it relied on).  A kill leaves packs no step names
  (garbage for bucket GC) and no visible step.
* **pull**: values go into the local store through the save pipeline's
  :class:`~castore.save.pipeline.ChunkSink` (journaled batches, so a killed pull leaves
  garbage GC finds); the manifest and its stepinfo commit in one transaction with the last
  batch.  Each value is verified (decoded and hashed against its id) before it is written.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import (
    ChunkCorruptError,
    ChunkMissingError,
    CorruptDataError,
    LockLostError,
    StepExistsError,
    StepNotFoundError,
)
from ..format.bucket import CHUNK, PAGE, PackBuilder
from ..format.chunker import chunk_count
from ..format.compression import is_encoded
from ..format.ids import chunk_id, short, split_ids
from ..format.keys import check_step, describe_key, in_branch, step_key, step_of
from ..format.manifest import ChunkedBlob, Manifest, PagedBlob, decode_manifest, iter_blobs
from ..format.schema import Table
from ..format.stepinfo import decode_stepinfo, encode_stepinfo
from ..save.pipeline import ChunkSink, drop_journal
from ..storage import ChunkStore, PageWalker
from ..storage.base import Backend, WriteTxn
from ..storage.bucket import Bucket, LockHandle

__all__ = ["PullResult", "RateLimit", "UploadResult", "pull_step", "remote_key", "step_values", "upload_step"]

_TABLE = {CHUNK: Table.CHUNKS, PAGE: Table.PAGES}


@dataclass(frozen=True, slots=True)
class UploadResult:
    """What :func:`upload_step` sent for one step."""

    key: bytes
    values: int  #: chunks and pages uploaded (the ones the bucket lacked)
    value_bytes: int  #: their stored bytes
    packs: int
    object_bytes: int  #: bytes put: packs (with their trailers), indexes and the step record
    seconds: float


@dataclass(frozen=True, slots=True)
class PullResult:
    key: bytes
    values: int  #: chunks and pages fetched (the ones the local store lacked)
    value_bytes: int
    seconds: float


class RateLimit:
    """At most ``bytes_per_second`` on average (None: no limit); :meth:`take` sleeps as needed."""

    def __init__(self, bytes_per_second: float | None):
        self.rate = bytes_per_second
        self._next = time.monotonic()
        self._lock = threading.Lock()  # packs upload from several threads

    def take(self, nbytes: int) -> None:
        if not self.rate:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + nbytes / self.rate
        if start > now:
            time.sleep(start - now)


def remote_key(bucket: Bucket, step: int | str | None, branch: str) -> bytes | None:
    """The step key in ``bucket`` of ``step``: None for the latest of ``branch`` (None if the
    branch has none there), an int of ``branch``, or a tag of the bucket's (any branch).
    Raises :class:`StepNotFoundError` for a step or tag the bucket lacks."""
    if isinstance(step, str):
        found = bucket.tags().get(step)
        if found is None:
            raise StepNotFoundError(f"no tag {step!r} in {bucket.url}")
        return found
    keys = [k for k in bucket.step_keys() if in_branch(k, branch)]
    if step is None:
        return keys[-1] if keys else None
    key = step_key(check_step(step), branch)
    if key not in keys:
        raise StepNotFoundError(f"{describe_key(key)} does not exist in {bucket.url}")
    return key


class _Pages:
    """The pages a pull holds (local, or fetched and checked) as :class:`PageWalker` reads them."""

    def __init__(self, pages: dict[bytes, bytes]):
        self.pages = pages

    def get(self, table: Table, key: bytes) -> bytes | None:
        return self.pages.get(bytes(key)) if table is Table.PAGES else None


def step_values(walker: PageWalker, manifest: Manifest) -> list[tuple[int, bytes, int]]:
    """``(kind, id, raw bytes)`` of every page and chunk ``manifest`` names, each once, pages
    of a blob before its chunks (raw bytes 0 for pages).  Raises what the walk raises for a
    missing or damaged page."""
    out: list[tuple[int, bytes, int]] = []
    seen: set[bytes] = set()
    for name, node in manifest.components:
        for blob in iter_blobs(node):
            if not isinstance(blob, (ChunkedBlob, PagedBlob)):
                continue
            if isinstance(blob, PagedBlob):
                for pid in split_ids(blob.page_ids):
                    if pid not in seen:
                        seen.add(pid)
                        out.append((PAGE, pid, 0))
            ids = walker.ids(blob, {"step": manifest.step, "component": name})
            n = chunk_count(blob.nbytes, blob.chunk_nbytes)
            for i, cid in enumerate(split_ids(ids)):
                if cid not in seen:
                    seen.add(cid)
                    last = i == n - 1
                    out.append((CHUNK, cid, blob.nbytes - i * blob.chunk_nbytes if last else blob.chunk_nbytes))
    return out


def upload_step(
    backend: Backend,
    chunks: ChunkStore,
    bucket: Bucket,
    key: bytes,
    *,
    lock: LockHandle,
    pack_bytes: int,
    uploads: int,
    limit: RateLimit,
    pool: concurrent.futures.Executor,
    epoch: bytes,
    publish: Callable[[bytes, bytes, bytes], int] | None = None,
) -> UploadResult | None:
    """Upload step ``key`` of the local store: the values the bucket lacks, then its record.

    ``publish(key, manifest, stepinfo) -> bytes put``, if given, is called instead of writing
    the step record (a multi-host rank writes its part there: :mod:`castore.mirror.multihost`),
    at the same point: every value uploaded, the lock checked.

    ``epoch`` is the bucket's GC epoch read before its index was (see
    :meth:`~castore.storage.bucket.Bucket.gc_epoch`).  Before the step becomes visible the
    lock is refreshed (a GC that has not begun deleting then sees it live and stops) and the
    epoch read again: if a GC began deleting since the index was read, values this upload
    counted on may be gone, so :class:`~castore.errors.LockLostError` is raised and nothing
    is made visible (the caller takes a new lock and uploads again: what is there is kept).

    Returns None if the local store no longer has the step (retention deleted it before its
    turn) or holds another manifest under its key now (an overwrite: it is queued again).
    ``uploads`` packs are in flight at most (memory: ``(uploads + 1) * pack_bytes``).
    Raises :class:`~castore.errors.RemoteError` subclasses (``LockLostError`` among them),
    :class:`IntegrityError` for a local chunk missing or damaged.
    """
    started = time.perf_counter()
    with backend.read() as txn:
        raw = txn.get(Table.STEPS, key)
        if raw is None:
            return None
        manifest_raw = bytes(raw)
        manifest = decode_manifest(manifest_raw)
        info = txn.get(Table.STEPINFO, key)
        stepinfo = bytes(info) if info is not None else encode_stepinfo(manifest.created, None)
        wanted = [(kind, cid) for kind, cid, _ in step_values(PageWalker(txn, check_pages=False), manifest)]
    wanted = [(kind, cid) for kind, cid in wanted if not bucket.has(cid)]
    sent = value_bytes = packs = object_bytes = 0
    in_flight: list[concurrent.futures.Future] = []

    def ship(builder: PackBuilder) -> int:
        pack = builder.finish()
        limit.take(len(pack.data))
        bucket.upload_pack(pack)
        return len(pack.data) + len(pack.index)

    def drain(keep: int) -> None:
        nonlocal object_bytes
        while len(in_flight) > keep:
            try:  # a slow link (max_rate) must not let the lock expire while packs go up
                object_bytes += in_flight[0].result(timeout=max(lock.ttl / 3, 0.05))
            except concurrent.futures.TimeoutError:
                lock.refresh_if_due()
                continue
            in_flight.pop(0)

    builder = PackBuilder(pack_bytes + (1 << 20))
    at = 0
    try:
        while at < len(wanted):
            with backend.read() as txn:  # one short snapshot per pack: LMDB may reuse pages meanwhile
                while at < len(wanted) and builder.nbytes < pack_bytes:
                    kind, cid = wanted[at]
                    value = chunks.get(txn, cid, _TABLE[kind])
                    if value is None:
                        if txn.get(Table.STEPS, key) is None:
                            return None  # deleted (and collected) while it waited: nothing to mirror
                        raise ChunkMissingError(
                            f"{describe_key(key)}: a {'page' if kind else 'chunk'} is missing "
                            "locally, so it cannot be uploaded",
                            chunk_id=short(cid),
                        )
                    builder.add(kind, cid, value)
                    txn.release(value)
                    sent += 1
                    value_bytes += len(value)
                    at += 1
            if builder.nbytes >= pack_bytes or at == len(wanted):
                drain(max(uploads - 1, 0))
                in_flight.append(pool.submit(ship, builder))
                packs += 1
                builder = PackBuilder(pack_bytes + (1 << 20))
                lock.refresh_if_due()
        drain(0)
    finally:
        for future in in_flight:
            future.cancel()
        concurrent.futures.wait(in_flight)
    with backend.read() as txn:  # an overwrite committed meanwhile: the newer manifest goes instead
        now = txn.get(Table.STEPS, key)
        if now is None or bytes(now) != manifest_raw:
            return None
    lock.refresh()  # LockLostError if a GC took it for stale; else a GC about to delete sees it
    if bucket.gc_epoch() != epoch:
        raise LockLostError(
            f"{describe_key(key)}: a bucket GC of {bucket.url} began deleting while it uploaded; nothing was "
            "made visible (uploaded again under a new lock)",
            url=bucket.url,
        )
    if publish is None:
        bucket.put_step(key, manifest_raw, stepinfo)
        object_bytes += len(manifest_raw) + len(stepinfo)
    else:
        object_bytes += publish(key, manifest_raw, stepinfo)
    return UploadResult(key, sent, value_bytes, packs, object_bytes, time.perf_counter() - started)


def pull_step(
    bucket: Bucket,
    backend: Backend,
    chunks: ChunkStore,
    key: bytes,
    *,
    target: bytes | None = None,
    verify: bool = True,
) -> PullResult:
    """Copy step ``key`` of ``bucket`` into the local store (as ``target``, default the same key).

    Only the values the local store lacks are fetched, as few ranged reads as can be, many
    at once.  Raises :class:`StepNotFoundError`, :class:`StepExistsError` if the local store
    has another step under the key (the same one is a no-op), :class:`IntegrityError` for a
    value missing from or damaged in the bucket (nothing is committed then).  The caller
    holds the local writer lock.
    """
    started = time.perf_counter()
    target = key if target is None else target
    record = bucket.get_step(key)
    if record is None:
        raise StepNotFoundError(f"{describe_key(key)} does not exist in {bucket.url}")
    with backend.read() as txn:
        existing = txn.get(Table.STEPS, target)
        if existing is not None:
            if bytes(existing) == record.manifest:
                return PullResult(target, 0, 0, time.perf_counter() - started)
            raise StepExistsError(f"{describe_key(target)} exists in {backend.path} with other content")
    where = f"{describe_key(key)} of {bucket.url}"
    manifest = decode_manifest(record.manifest)
    if manifest.step != step_of(key):
        raise CorruptDataError(f"{where}: its manifest says step {manifest.step}")
    decode_stepinfo(record.stepinfo, f"the stepinfo record of {where}")  # CorruptDataError if damaged
    # pages first: they say which chunks the step has
    pages: dict[bytes, bytes] = {}
    with backend.read() as txn:
        wanted_pages = []
        for _, node in manifest.components:
            for blob in iter_blobs(node):
                if isinstance(blob, PagedBlob):
                    for pid in split_ids(blob.page_ids):
                        local = txn.get(Table.PAGES, pid)
                        if local is not None:
                            pages[pid] = bytes(local)
                        elif pid not in pages:
                            pages[pid] = b""
                            wanted_pages.append(pid)
    fetched_pages = {cid: value for cid, value in bucket.read_many(wanted_pages)}
    for pid in wanted_pages:
        value = fetched_pages.get(pid)
        if value is None:
            raise ChunkMissingError(f"{where}: a chunk-list page is missing from the bucket", chunk_id=short(pid))
        value = bytes(value)
        if chunk_id(value) != pid:
            raise ChunkCorruptError(f"{where}: a chunk-list page is damaged in the bucket", chunk_id=short(pid))
        pages[pid] = value
    sink = ChunkSink(chunks)
    count = nbytes = 0
    try:
        for pid in wanted_pages:
            sink.put(Table.PAGES, pid, pages[pid])
            count += 1
            nbytes += len(pages[pid])
        sizes: dict[bytes, int] = {}  # the chunks the local store lacks, and their raw lengths
        with backend.read() as txn:
            walker = PageWalker(_Pages(pages), check_pages=False)  # type: ignore[arg-type]  # reads pages only
            for kind, cid, raw_bytes in step_values(walker, manifest):
                if kind == CHUNK:
                    value = txn.get(Table.CHUNKS, cid)
                    if value is None:
                        sizes[cid] = raw_bytes
                    else:
                        txn.release(value)
        scratch = threading.local()  # a decode buffer per fetching thread

        def check(cid: bytes, value) -> None:  # on the fetching threads: decoding and BLAKE3 in parallel
            if not verify:  # at least the length: a read past a cut pack comes back short
                if not is_encoded(value) and len(value) != sizes[cid]:
                    raise ChunkCorruptError(f"{where}: a chunk is cut short in the bucket", chunk_id=short(cid))
                return
            if not hasattr(scratch, "buffer"):
                scratch.buffer = bytearray()
            if not chunks.intact(value, cid, sizes[cid], scratch.buffer):
                raise ChunkCorruptError(f"{where}: a chunk is damaged in the bucket", chunk_id=short(cid))

        for cid, value in bucket.read_many(list(sizes), span=8 << 20, check=check):
            if value is None:
                raise ChunkMissingError(f"{where}: a chunk is missing from the bucket", chunk_id=short(cid))
            sink.put(Table.CHUNKS, cid, value)  # a view of the fetched bytes: LMDB copies it once
            count += 1
            nbytes += len(value)
        sink.finish()
    except BaseException:
        sink.abort()
        raise

    def commit(txn: WriteTxn, attempts: list) -> None:
        attempts.append(1)
        sink.put_last_batch(txn, attempts)
        existing = txn.get(Table.STEPS, target)
        if existing is not None and bytes(existing) != record.manifest:
            raise StepExistsError(f"{describe_key(target)} exists in {backend.path} with other content")
        txn.put(Table.STEPS, target, record.manifest)
        txn.put(Table.STEPINFO, target, record.stepinfo)
        drop_journal(txn, sink.token)

    backend.reserve(sink.last_batch_bytes + len(record.manifest))
    backend.write(commit, [])
    sink.last_batch_committed()
    return PullResult(target, count, nbytes, time.perf_counter() - started)

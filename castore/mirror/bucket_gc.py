"""Bucket GC: free the packs no step record needs, repack the mostly-garbage ones.

``plan`` reads every step record (the roots: every branch's steps) and walks their chunks
through the pages, then sorts each pack by its live bytes (a value counts where the index
finds it; a copy in another pack is garbage):

* no live value: the pack is deleted;
* live share below ``repack_below``: its live values are copied into new packs (uploaded,
  with their indexes, before anything is deleted), then it is deleted;
* a pack object without an index object (an upload killed between the two) is deleted, as
  is an index whose pack is gone, and every stale lock;
* part records of multi-host steps (:mod:`castore.mirror.multihost`) are roots too while
  their step may still commit; parts of committed steps, and parts older than
  ``part_grace`` seconds whose step never committed, are deleted (before any pack).

``execute`` deletes index objects before their packs, so a pack is never indexed without
its bytes for longer than a request.  Safety beside uploads comes from the locks
(:meth:`~castore.storage.bucket.Bucket.take_lock`): :func:`collect` takes the exclusive
``gc`` lock, which an uploader never overlaps (it writes its own lock, then checks), and an
uploader whose lock a GC removed as stale re-checks before it writes a step record
(:func:`~castore.mirror.transfer.upload_step`).  A plan is only valid under the lock it
was made with.  Readers of a snapshot taken before a GC may find a moved value gone: they
look again in a fresh index (see ``storage/remote.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..errors import BucketBusyError, CorruptDataError, RemoteNotFoundError
from ..format import bucket as layout
from ..format.bucket import PAGE, PackBuilder
from ..format.ids import chunk_id, split_ids
from ..format.manifest import PagedBlob, decode_manifest, iter_blobs
from ..storage import PageWalker
from ..storage.bucket import Bucket
from ..storage.remote import RemoteSnapshot
from .multihost import DEFAULT_PART_GRACE, classify_parts

__all__ = ["BucketGcPlan", "collect", "execute", "plan"]


@dataclass(slots=True)
class BucketGcPlan:
    """What a bucket GC frees (bytes are object bytes: values and index trailers)."""

    delete: list[str] = field(default_factory=list)  #: packs with no live value
    repack: list[str] = field(default_factory=list)  #: packs whose live values move to new packs
    orphan_packs: list[str] = field(default_factory=list)  #: pack objects (keys) without an index
    orphan_indexes: list[str] = field(default_factory=list)  #: index objects (keys) without a pack
    #: packs whose index object is written again from their trailer (it was deleted, damaged,
    #: or another pack's, and the pack holds live values)
    reindex: list[str] = field(default_factory=list)
    #: pack objects (keys) without a readable index kept because live values are missing
    kept_packs: list[str] = field(default_factory=list)
    missing_values: int = 0  #: live values found in no pack: damage (``castore verify`` names the steps)
    #: part objects (keys) of committed steps, or older than the grace period
    doomed_parts: list[str] = field(default_factory=list)
    parts: int = 0  #: part records kept as roots
    live_values: int = 0
    live_bytes: int = 0  #: bytes of live values, kept
    moved_bytes: int = 0  #: of those, bytes repacking copies
    #: object bytes deleted (packs and their index objects), less the values repacking writes
    #: again (the new packs' indexes and trailers, a few bytes per value, are not subtracted)
    freed_bytes: int = 0
    steps: int = 0
    #: ids of every live value
    live: set = field(default_factory=set, repr=False)
    #: ``{pack id: the live ids repacking copies out of it}``, fixed when planned
    moves: dict = field(default_factory=dict, repr=False)
    #: ``{step key: manifest}`` and ``{(key, rank, attempt, written)}`` of the parts: the roots
    #: the plan saw (execute stops if they changed)
    roots: dict = field(default_factory=dict, repr=False)
    parts_seen: set = field(default_factory=set, repr=False)

    @property
    def is_empty(self) -> bool:
        return not (
            self.delete or self.repack or self.orphan_packs or self.orphan_indexes or self.doomed_parts or self.reindex
        )


def plan(
    bucket: Bucket, *, repack_below: float = 0.5, part_grace: float = DEFAULT_PART_GRACE, lock=None
) -> BucketGcPlan:
    """What :func:`execute` would do now (reads step and part records and pages; changes nothing).

    Raises :class:`CorruptDataError` if a step or part record or a page it needs cannot be
    read: GC must see every root, or it would free what an unreadable one names.
    """
    # Parts are listed before steps: a committed step's parts are deleted only after its
    # record exists, so if this listing misses them, the step listing below sees the record.
    all_parts, _ = classify_parts(bucket, set(), grace=float("inf"))  # every part, as objects
    now = time.time()
    pending = [p for p in all_parts if now - p.written <= part_grace]
    doomed_parts = [layout.part_object(p.key, p.rank) for p in all_parts if now - p.written > part_grace]
    snapshot = RemoteSnapshot(bucket, 0)  # refreshes the index, reads every step record
    # unreadable roots stop GC; a damaged index or a missing pack is what GC looks at below,
    # and tags are not roots (a tag names a step, which is one)
    damaged = [
        p for p in snapshot.problems if not p[0].startswith((layout.INDEX + "/", layout.PACKS + "/", layout.TAGS + "/"))
    ]
    if damaged:
        raise CorruptDataError(
            f"bucket GC of {bucket.url} refused: {len(damaged)} object(s) unreadable, first {damaged[0][0]}: "
            f"{damaged[0][1]} (castore verify {bucket.url})"
        )
    walker = PageWalker(snapshot, check_pages=True)
    live: set[bytes] = set()
    parts = [p for p in pending if p.key not in snapshot.steps]
    doomed_parts += [layout.part_object(p.key, p.rank) for p in pending if p.key in snapshot.steps]
    roots = [(key.hex(), raw) for key, raw in snapshot.steps.items()]
    roots += [(f"rank {p.rank}'s part of {p.key.hex()}", p.manifest) for p in parts]
    for where, raw in roots:
        if lock is not None:
            lock.refresh_if_due()  # a long walk must not let the gc lock go stale
        manifest = decode_manifest(raw)
        for _, node in manifest.components:
            for blob in iter_blobs(node):
                walk = walker.walk(blob)
                if walk.damaged:
                    raise CorruptDataError(
                        f"bucket GC of {bucket.url} refused: a page of {where} is {walk.damaged[0][0]}"
                    )
                if isinstance(blob, PagedBlob):
                    live.update(split_ids(blob.page_ids))
                live.update(split_ids(walk.chunk_ids))
    result = BucketGcPlan(steps=len(snapshot.steps), live=live, doomed_parts=doomed_parts, parts=len(parts))
    result.roots = dict(snapshot.steps)
    result.parts_seen = {(p.key, p.rank, p.attempt, p.written) for p in all_parts}
    packs = bucket.packs()
    live_in: dict[str, int] = {}
    for cid in live:
        loc = bucket.locate(cid)
        if loc is not None:
            live_in[loc.pack_id] = live_in.get(loc.pack_id, 0) + loc.length
            result.live_values += 1
            result.live_bytes += loc.length
    sizes = {key.rpartition("/")[2]: size for key, size in bucket.objects.list(layout.PACKS)}
    index_sizes = {key.rpartition("/")[2]: size for key, size in bucket.objects.list(layout.INDEX)}
    for pack_id, index in packs.items():
        kept = live_in.get(pack_id, 0)
        size = sizes.get(pack_id)
        if size is None:
            continue  # deleted since the index was read: an orphan index, below
        if kept == 0:
            result.delete.append(pack_id)
            result.freed_bytes += size + index_sizes.get(pack_id, 0)
        elif kept < repack_below * index.data_bytes:
            result.repack.append(pack_id)
            result.moves[pack_id] = _live_ids(bucket, pack_id, live)
            result.moved_bytes += kept
            result.freed_bytes += size + index_sizes.get(pack_id, 0) - kept
    for pack_id in sorted(index_sizes):
        if pack_id not in sizes and layout.is_pack_id(pack_id):
            result.orphan_indexes.append(layout.index_key(pack_id))
            result.freed_bytes += index_sizes[pack_id]
    # A pack without a usable index object is garbage of a killed upload, unless its trailer
    # lists live values the index lacks (its index object was deleted or damaged): then the
    # index object is written again from the trailer instead.  A pack whose trailer cannot
    # be read is kept while live values are missing (it may hold them).
    unlocated = {cid for cid in live if bucket.locate(cid) is None}
    for pack_id in sorted(sizes):
        if pack_id in packs or not layout.is_pack_id(pack_id):
            continue
        try:
            listed = set(split_ids(layout.decode_index(bucket.pack_index_bytes(pack_id), "a trailer").ids))
        except (CorruptDataError, RemoteNotFoundError):
            if unlocated:
                result.kept_packs.append(layout.pack_key(pack_id))
                continue
            listed = set()
        if listed & unlocated:
            result.reindex.append(pack_id)
            unlocated -= listed
        else:
            result.orphan_packs.append(layout.pack_key(pack_id))
            result.freed_bytes += sizes[pack_id]
    damaged_indexes = {key.rpartition("/")[2] for key, _ in snapshot.problems if key.startswith(layout.INDEX + "/")}
    result.reindex += sorted(p for p in damaged_indexes if p in packs and p in sizes)  # read from trailers now
    result.missing_values = len(unlocated)
    result.delete.sort()
    result.repack.sort()
    return result


def execute(bucket: Bucket, gc_plan: BucketGcPlan, *, pack_bytes: int = 32 << 20, lock=None) -> None:
    """Carry out ``gc_plan`` (made under the ``gc`` lock the caller holds: ``lock``, refreshed).

    Before the first delete: a new GC epoch, then a look for uploaders and at the roots.  An
    uploader re-reads the epoch (after refreshing its lock) before it makes a step visible:
    one that read the old epoch had refreshed its lock before, so it is seen live here, or
    its step record is, and this GC stops (:class:`~castore.errors.BucketBusyError`, nothing
    deleted); one that reads the new epoch stops itself.
    """
    if gc_plan.is_empty:
        return
    if lock is not None:
        lock.refresh()  # LockLostError if an uploader took it for stale meanwhile
    bucket.next_gc_epoch()
    busy = bucket.live_locks("upload", skip=None if lock is None else lock.key)
    if busy:
        raise BucketBusyError(
            f"{bucket.url}: an upload holds a lock ({busy[0][0]}); this GC deleted nothing (run it again)",
            url=bucket.url,
            holder=busy[0][1].owner,
        )
    _check_roots_unchanged(bucket, gc_plan)
    for pack_id in gc_plan.reindex:  # repairs first: the values they hold are found again
        bucket.objects.put(layout.index_key(pack_id), bucket.pack_index_bytes(pack_id))
    if gc_plan.reindex:
        bucket.forget_packs(gc_plan.reindex)
        bucket.refresh_index()
    bucket.objects.delete(gc_plan.doomed_parts)  # roots first: what they alone named is garbage already
    if gc_plan.repack:
        wanted = [cid for pack_id in gc_plan.repack for cid in gc_plan.moves.get(pack_id, ())]
        where = {cid: bucket.locate(cid) for cid in wanted}

        def check(cid: bytes, value) -> None:  # a short read must not become the only copy
            loc = where[cid]
            if loc is None or len(value) != loc.length or (loc.kind == PAGE and chunk_id(value) != cid):
                raise CorruptDataError(f"bucket GC of {bucket.url}: a live value read back damaged; nothing deleted")

        builder = PackBuilder()
        for cid, value in bucket.read_many(wanted, check=check):
            loc = where[cid]
            if value is None or loc is None:
                raise CorruptDataError(f"bucket GC of {bucket.url}: a live value vanished while repacking")
            builder.add(loc.kind, cid, value)
            if builder.nbytes >= pack_bytes:
                bucket.upload_pack(builder.finish())
                builder = PackBuilder()
                if lock is not None:
                    lock.refresh_if_due()
        if len(builder):
            bucket.upload_pack(builder.finish())
    doomed = gc_plan.delete + gc_plan.repack
    _check_nothing_live_is_lost(bucket, gc_plan, set(doomed))
    bucket.forget_packs(doomed)  # the new packs' copies are found from here on
    bucket.objects.delete([layout.index_key(p) for p in doomed] + gc_plan.orphan_indexes)
    bucket.objects.delete([layout.pack_key(p) for p in doomed] + gc_plan.orphan_packs)


def _check_roots_unchanged(bucket: Bucket, gc_plan: BucketGcPlan) -> None:
    """BucketBusyError if a step record or part appeared or changed since the plan read them."""
    keys = bucket.step_keys()
    records = bucket.get_steps(keys)
    now = {k: r.manifest for k, r in records.items() if r is not None and not isinstance(r, Exception)}
    pending, _ = classify_parts(bucket, set(), grace=float("inf"))
    parts_now = {(p.key, p.rank, p.attempt, p.written) for p in pending if p.key not in now}
    if now != gc_plan.roots or not parts_now <= gc_plan.parts_seen:
        raise BucketBusyError(
            f"{bucket.url}: steps were saved or changed while this GC planned; it deleted nothing (run it again)",
            url=bucket.url,
            holder="an uploader",
        )


def _check_nothing_live_is_lost(bucket: Bucket, gc_plan: BucketGcPlan, doomed: set[str]) -> None:
    """The last line before deletes: every live value a doomed pack holds must be in a pack
    that stays (a copy, or the repacked one); else CorruptDataError and nothing is deleted."""
    kept: set[bytes] = set()
    lost: set[bytes] = set()
    for pack_id, index in bucket.packs().items():
        ids = split_ids(index.ids)
        (lost if pack_id in doomed else kept).update(cid for cid in ids if cid in gc_plan.live)
    if lost - kept:
        raise CorruptDataError(
            f"bucket GC of {bucket.url}: {len(lost - kept)} live value(s) would be left in no pack; nothing was "
            "deleted (a bug: please report it)"
        )


def _live_ids(bucket: Bucket, pack_id: str, live: set[bytes]) -> list[bytes]:
    """The live values the index finds in ``pack_id`` (not their copies in other packs)."""
    index = bucket.packs().get(pack_id)
    if index is None:
        return []
    ids = []
    for i in range(len(index)):
        cid = index.id(i)
        loc = bucket.locate(cid)
        if cid in live and loc is not None and loc.pack_id == pack_id:
            ids.append(cid)
    return ids


def collect(
    bucket: Bucket,
    *,
    lock_ttl: float = 600.0,
    repack_below: float = 0.5,
    dry_run: bool = False,
    part_grace: float = DEFAULT_PART_GRACE,
) -> BucketGcPlan:
    """Take the ``gc`` lock, plan, execute (unless ``dry_run``), release; returns the plan.

    Raises :class:`~castore.errors.BucketBusyError` if an upload or another GC holds a lock.
    """
    lock = bucket.take_lock("gc", lock_ttl)
    try:
        bucket.delete_stale_locks(keep=lock.key)
        gc_plan = plan(bucket, repack_below=repack_below, part_grace=part_grace, lock=lock)
        if not dry_run:
            execute(bucket, gc_plan, lock=lock)
        return gc_plan
    finally:
        lock.release()

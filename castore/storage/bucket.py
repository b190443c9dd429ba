"""Bucket: castore's objects in an :class:`~castore.storage.objects.ObjectStore` (``docs/format.md``,
*Bucket layout*): packs and their index, step records, tags, locks.

A :class:`Bucket` keeps the bucket's index in memory (``id -> pack, offset, length``), loaded
by :meth:`Bucket.refresh_index` from the ``index/`` objects (many at once), each checked; an
index object that is missing or damaged is read again from its pack's trailer (the same
bytes), so one bad object costs a ranged read, not the chunks it lists.  What could not be
read is kept in :attr:`Bucket.problems` for ``verify``.

Writes keep the layout's order: a pack, then its index, then (elsewhere) the step record
naming its chunks.  Locks (:meth:`Bucket.take_lock`) let bucket GC exclude uploaders
without a server-side lock: each party writes its own lock object, then lists the others
(the store is strongly consistent, so of two that race at least one sees the other), and
the GC epoch (:meth:`Bucket.gc_epoch`) tells an uploader that a GC overtook it.

The module is past ~400 lines on purpose: it is the one place that reads and writes each
kind of object of the layout (the index and its checks against the packs, records, locks,
the GC epoch), with the size bounds and typed errors each needs.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..errors import (
    BucketBusyError,
    CorruptDataError,
    FormatError,
    LockLostError,
    RemoteError,
    RemoteNotFoundError,
    StoreNotFoundError,
)
from ..format import bucket as layout
from ..format.bucket import Lock, Pack, PackIndex, StepObject
from ..format.keys import MAX_TAG_BYTES
from ..format.manifest import PAGE_IDS
from ..format.sealing import unseal
from .objects import ObjectStore

__all__ = ["Bucket", "Location", "LockHandle"]

log = logging.getLogger("castore.storage")

#: requests one bucket runs at once for its own fan-out (index loads, ranged reads)
DEFAULT_CONNECTIONS = 16
#: bytes an index object may have: MAX_PACK_ENTRIES entries of 37 bytes, and the record around
MAX_INDEX_BYTES = layout.MAX_PACK_ENTRIES * 37 + 4096
#: bytes a step or part record may have (a manifest of a few million leaves); tags and locks
MAX_RECORD_BYTES = 256 << 20
MAX_SMALL_RECORD_BYTES = 64 << 10


@dataclass(frozen=True, slots=True)
class Location:
    """Where one stored value lives in a bucket."""

    pack_id: str
    offset: int
    length: int
    kind: int  #: :data:`~castore.format.bucket.CHUNK` or :data:`~castore.format.bucket.PAGE`


class Bucket:
    """castore's layout over ``objects``; thread-safe.

    ``create=True`` writes the config record if the bucket (prefix) has none; otherwise a
    prefix without one is refused (:class:`~castore.errors.StoreNotFoundError`).
    """

    def __init__(self, objects: ObjectStore, *, create: bool, connections: int = DEFAULT_CONNECTIONS):
        self.objects = objects
        self.url = objects.url
        self.connections = connections
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()
        self._packs: dict[str, PackIndex] = {}
        self._where: dict[bytes, Location] = {}
        self._notes: list[tuple[str, str]] = []  # what listings since the last refresh could not use
        self._damaged: dict[str, list[tuple[str, str]]] = {}  # pack id -> problems of its index or pack
        self._pool = ThreadPoolExecutor(connections, thread_name_prefix="castore-bucket")
        self.config = self._open_config(create)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    @property
    def problems(self) -> list[tuple[str, str]]:
        """``(object key, what is wrong)``: packs and indexes the last index refresh could not
        use, and step, tag and lock objects the listings since could not read."""
        with self._lock:
            return [p for found in self._damaged.values() for p in found] + list(self._notes)

    def _note(self, problem: tuple[str, str]) -> None:
        with self._lock:
            self._notes.append(problem)

    def __repr__(self) -> str:
        return f"Bucket({self.url!r}, {len(self._packs)} packs, {len(self._where)} values)"

    def _open_config(self, create: bool) -> dict:
        what = f"the bucket config {self.url}/{layout.CONFIG}"
        try:
            raw = self.objects.get(layout.CONFIG)
        except RemoteNotFoundError:
            if not create:
                raise StoreNotFoundError(
                    f"no castore store at {self.url}: it holds no {layout.CONFIG!r} object (push a store "
                    "there, or save with mirror= first)"
                ) from None
            self.objects.put_if_absent(layout.CONFIG, layout.encode_config(time.time(), PAGE_IDS))
            raw = self.objects.get(layout.CONFIG)
        config = layout.decode_config(raw, what)
        if config["castore_bucket"] > layout.BUCKET_FORMAT:
            raise FormatError(
                f"{self.url} is of bucket format {config['castore_bucket']}; this castore reads up to "
                f"{layout.BUCKET_FORMAT}: upgrade castore"
            )
        if config["hash"] != "blake3-256" or config["page_ids"] != PAGE_IDS:
            raise FormatError(f"{self.url}: hash {config['hash']!r} / page_ids {config['page_ids']} unknown here")
        return config

    # -- the index -----------------------------------------------------------------------------------

    def refresh_index(self) -> None:
        """Bring the index up to the bucket's ``index/`` objects: read new ones, drop gone ones.

        ``index/`` is listed before ``packs/`` (a pack is put before its index, so every index
        listed has its pack listed, unless a GC is deleting both), and each new index is
        checked against its pack's size: an index object that belongs to another pack, or
        was cut, is set aside for the pack's own trailer.
        """
        with self._refreshing:  # one refresh at a time (loader threads may all ask after a GC)
            self._refresh_index()

    def _refresh_index(self) -> None:
        with self._lock:
            self._notes = []  # a new look: what the listings since find
        listed = {}
        for key, size in self.objects.list(layout.INDEX):
            if size > MAX_INDEX_BYTES:
                self._note((key, f"{size} bytes, more than an index can be"))
                continue
            pack_id = key.rpartition("/")[2]
            if layout.is_pack_id(pack_id) and key == layout.index_key(pack_id):
                listed[pack_id] = size
        pack_sizes = {key.rpartition("/")[2]: size for key, size in self.objects.list(layout.PACKS)}
        with self._lock:
            known = set(self._packs)
        new = [p for p in listed if p not in known]
        gone = {p for p in known if p not in listed or p not in pack_sizes}
        found: dict[str, list[tuple[str, str]]] = {p: [] for p in new}
        loaded = list(self._pool.map(lambda p: self._load_index(p, listed[p], pack_sizes.get(p), found[p]), new))
        with self._lock:
            for pack_id in gone:
                del self._packs[pack_id]
            # what is wrong with a pack or its index is kept while the pack is indexed (or tried
            # again at the next refresh if it could not be), so every snapshot reports it
            self._damaged = {p: v for p, v in self._damaged.items() if p in self._packs and p not in gone}
            self._damaged.update({p: v for p, v in found.items() if v})
            for pack_id, index in zip(new, loaded):
                if index is not None:
                    self._packs[pack_id] = index
            if gone:
                self._where = {}
                for pack_id, index in self._packs.items():
                    self._add_locations(pack_id, index)
            else:
                for pack_id, index in zip(new, loaded):
                    if index is not None:
                        self._add_locations(pack_id, index)

    def _add_locations(self, pack_id: str, index: PackIndex) -> None:
        for i in range(len(index)):
            cid = index.id(i)
            if cid not in self._where:
                self._where[cid] = Location(pack_id, int(index.offsets[i]), int(index.lengths[i]), index.kinds[i])

    def _load_index(self, pack_id: str, index_size: int, pack_size: int | None, problems: list) -> PackIndex | None:
        key = layout.index_key(pack_id)
        if pack_size is None:
            problems.append((layout.pack_key(pack_id), f"missing: its index object {key} is there"))
            return None
        try:
            index = layout.decode_index(self.objects.get(key), f"index {self.url}/{key}")
            if index.data_bytes + index_size + layout.TRAILER_BYTES == pack_size:
                return index
            problems.append(
                (
                    key,
                    f"does not fit its pack ({index.data_bytes} bytes of values + {index_size} of index, the "
                    f"pack is {pack_size}): another pack's index, or damaged",
                )
            )
        except RemoteNotFoundError:
            problems.append((key, "index object vanished while listing"))
        except CorruptDataError as exc:
            problems.append((key, str(exc)))
        try:  # the pack's trailer holds the same bytes
            return self.pack_index(pack_id)
        except (CorruptDataError, RemoteNotFoundError) as exc:
            problems.append((layout.pack_key(pack_id), f"its index is unreadable too: {exc}"))
            return None

    def pack_index(self, pack_id: str) -> PackIndex:
        """A pack's index read from its own trailer (two ranged reads), checked against its size."""
        return layout.decode_index(self.pack_index_bytes(pack_id), f"trailer of pack {self.url}/{pack_id}")

    def pack_index_bytes(self, pack_id: str) -> bytes:
        """The index bytes of a pack's own trailer, checked: they decode, and the values they
        list end where the trailer begins."""
        key = layout.pack_key(pack_id)
        size = self.objects.head(key)
        if size is None:
            raise RemoteNotFoundError(f"no pack {self.url}/{key}", url=f"{self.url}/{key}", status=404)
        what = f"pack {self.url}/{key}"
        if size < layout.TRAILER_BYTES:
            raise CorruptDataError(f"{what} is {size} bytes, shorter than a trailer")
        tail = self.objects.get_range(key, size - layout.TRAILER_BYTES, layout.TRAILER_BYTES)
        length = layout.trailer_index_bytes(tail, size, what)
        if length > MAX_INDEX_BYTES:
            raise CorruptDataError(f"{what}: its trailer names an index of {length} bytes, more than an index can be")
        start = size - layout.TRAILER_BYTES - length
        raw = self.objects.get_range(key, start, length)
        index = layout.decode_index(raw, f"trailer of {what}")
        if index.data_bytes != start:
            raise CorruptDataError(
                f"{what}: its index lists {index.data_bytes} bytes of values, the pack holds {start}"
            )
        return raw

    def check_packs(self) -> list[tuple[str, str]]:
        """``(pack object, what is wrong)`` of every indexed pack that is missing now, or whose
        size is not its index's values plus trailer (one listing; no pack is read)."""
        sizes = dict(self.objects.list(layout.PACKS))
        out = []
        for pack_id, index in sorted(self.packs().items()):
            key = layout.pack_key(pack_id)
            size = sizes.get(key)
            if size is None:
                out.append((key, f"missing: its index lists {len(index)} values"))
            elif size - index.data_bytes - layout.TRAILER_BYTES <= 0:
                out.append((key, f"{size} bytes, its index lists {index.data_bytes} bytes of values: cut short"))
        return out

    def locate(self, cid: bytes) -> Location | None:
        return self._where.get(bytes(cid))

    def has(self, cid: bytes) -> bool:
        return bytes(cid) in self._where

    def packs(self) -> dict[str, PackIndex]:
        """``{pack id: its index}`` of every pack the index knows (a copy)."""
        with self._lock:
            return dict(self._packs)

    def counts(self) -> tuple[int, int]:
        """``(values indexed, their bytes)``: the bucket's chunk-and-page counters."""
        with self._lock:
            return len(self._where), sum(loc.length for loc in self._where.values())

    def values(self, kind: int) -> Iterator[tuple[bytes, Location]]:
        """``(id, location)`` of every indexed value of ``kind``, in id order."""
        with self._lock:
            items = sorted((cid, loc) for cid, loc in self._where.items() if loc.kind == kind)
        return iter(items)

    def read(self, cid: bytes) -> bytes | None:
        """The stored value of ``cid`` (one ranged read), or None if the bucket lacks it.

        The bytes are not checked here (the caller hashes what it decodes); a value cut
        short by a damaged pack comes back short.
        """
        loc = self.locate(cid)
        if loc is None:
            return None
        try:
            return self.objects.get_range(layout.pack_key(loc.pack_id), loc.offset, loc.length)
        except RemoteNotFoundError:
            return None

    def read_many(self, ids: Iterable[bytes], *, gap: int = 1 << 20, span: int = 64 << 20, check=None):
        """``(id, value)`` of ``ids`` the bucket holds, fetched as few ranged reads as can be:
        values of one pack closer than ``gap`` bytes are read together, up to ``span`` bytes.

        Yields as reads finish (not in ``ids`` order), ``connections`` reads at a time; values
        are memoryviews of the bytes fetched.  Ids the index lacks (or whose pack is gone)
        are yielded with None.  ``check(id, value)``, if given, runs on the fetching thread
        (many at once: hashing and decoding release the GIL) and raises to stop the reads.
        """
        by_pack: dict[str, list[tuple[int, int, bytes]]] = {}
        for cid in ids:
            loc = self.locate(cid)
            if loc is None:
                yield cid, None
                continue
            by_pack.setdefault(loc.pack_id, []).append((loc.offset, loc.length, bytes(cid)))
        ranges = []
        for pack_id, wanted in by_pack.items():
            wanted.sort()
            run = [wanted[0]]
            for item in wanted[1:]:
                first, last = run[0], run[-1]
                if item[0] - (last[0] + last[1]) <= gap and item[0] + item[1] - first[0] <= span:
                    run.append(item)
                else:
                    ranges.append((pack_id, run))
                    run = [item]
            ranges.append((pack_id, run))

        def fetch(job):
            pack_id, run = job
            start = run[0][0]
            try:
                data = self.objects.get_range(layout.pack_key(pack_id), start, run[-1][0] + run[-1][1] - start)
            except RemoteNotFoundError:
                return [(cid, None) for _, _, cid in run]
            view = memoryview(data)
            found = [(cid, view[off - start : off - start + length]) for off, length, cid in run]
            if check is not None:
                for cid, value in found:
                    check(cid, value)
            return found

        # bounded in flight: at most ``connections`` ranges (each <= span) are held at once
        pending = []
        for job in ranges:
            pending.append(self._pool.submit(fetch, job))
            if len(pending) >= self.connections:
                yield from pending.pop(0).result()
        for future in pending:
            yield from future.result()

    def upload_pack(self, pack: Pack) -> None:
        """Put a pack, then its index; index it here (others see it once the index is up)."""
        self.objects.put(layout.pack_key(pack.pack_id), pack.data)
        self.objects.put(layout.index_key(pack.pack_id), pack.index)
        index = layout.decode_index(pack.index, "a pack index just built")
        with self._lock:
            self._packs[pack.pack_id] = index
            self._add_locations(pack.pack_id, index)

    def forget_packs(self, pack_ids: Iterable[str]) -> None:
        """Drop packs from the in-memory index (GC deleted them, or rewrote their index)."""
        with self._lock:
            for pack_id in pack_ids:
                self._packs.pop(pack_id, None)
                self._damaged.pop(pack_id, None)
            self._where = {}
            for pack_id, index in self._packs.items():
                self._add_locations(pack_id, index)

    # -- steps and tags ----------------------------------------------------------------------------

    def step_keys(self) -> list[bytes]:
        """The step keys of every step record, in key order (branches as in the ``steps`` table)."""
        keys = []
        for name, size in self.objects.list(layout.STEPS):
            try:
                key = layout.step_key_of(name)
            except CorruptDataError as exc:
                self._note((name, str(exc)))
                continue
            if size > MAX_RECORD_BYTES:
                self._note((name, f"{size} bytes, more than a step record can be"))
                continue
            keys.append(key)
        return sorted(keys)

    def get_step(self, key: bytes) -> StepObject | None:
        """The step record of ``key``, checked (CorruptDataError if damaged), or None."""
        name = layout.step_object(key)
        try:
            raw = self.objects.get(name)
        except RemoteNotFoundError:
            return None
        step = layout.decode_step(raw, key, f"step record {self.url}/{name}")
        unseal(step.manifest, f"the manifest in {self.url}/{name}")  # its seal, checked here too
        return step

    def get_steps(self, keys: list[bytes]) -> dict[bytes, StepObject | CorruptDataError | None]:
        """:meth:`get_step` of many keys at once; a damaged record maps to its error."""

        def one(key):
            try:
                return self.get_step(key)
            except CorruptDataError as exc:
                return exc

        return dict(zip(keys, self._pool.map(one, keys)))

    def put_step(self, key: bytes, manifest: bytes, stepinfo: bytes, *, if_absent: bool = False) -> bool:
        """Write a step record (last: it makes the step visible).  With ``if_absent``, only if
        none is there (True if this call created it)."""
        data = layout.encode_step(key, manifest, stepinfo)
        if if_absent:
            return self.objects.put_if_absent(layout.step_object(key), data)
        self.objects.put(layout.step_object(key), data)
        return True

    def delete_steps(self, keys: Iterable[bytes]) -> None:
        self.objects.delete([layout.step_object(k) for k in keys])

    def tags(self) -> dict[str, bytes]:
        """``{tag: step key}``; damaged tag objects go to :attr:`problems`."""
        out = {}
        for name, size in self.objects.list(layout.TAGS):
            try:
                tag = layout.hex_name(name, layout.TAGS, "tag").decode("utf-8")
                if size > MAX_SMALL_RECORD_BYTES or not 0 < len(tag.encode()) <= MAX_TAG_BYTES or tag.isdigit():
                    raise CorruptDataError(f"not a tag castore writes ({size} bytes)")
                out[tag] = layout.decode_tag(self.objects.get(name), f"tag {self.url}/{name}")
            except (CorruptDataError, UnicodeDecodeError, RemoteNotFoundError) as exc:
                self._note((name, str(exc)))
        return out

    def put_tag(self, name: str, key: bytes) -> None:
        self.objects.put(layout.tag_object(name), layout.encode_tag(key))

    def delete_tags(self, names: Iterable[str]) -> None:
        self.objects.delete([layout.tag_object(n) for n in names])

    # -- locks ---------------------------------------------------------------------------------------

    def locks(self, *, skip: str | None = None) -> list[tuple[str, Lock | None]]:
        """``(object key, lock or None if unreadable)`` of every lock object but ``skip``
        (one's own: not read back)."""
        out: list[tuple[str, Lock | None]] = []
        for name, size in self.objects.list(layout.LOCKS):
            if name == skip:
                continue
            if size > MAX_SMALL_RECORD_BYTES:
                out.append((name, None))  # not a lock castore writes: counts as held, never read
                continue
            try:
                out.append((name, layout.decode_lock(self.objects.get(name), f"lock {self.url}/{name}")))
            except RemoteNotFoundError:
                continue  # released while listing
            except CorruptDataError:
                out.append((name, None))
        return out

    def take_lock(self, kind: str, ttl: float) -> LockHandle:
        """Write a ``kind`` lock (``"upload"``: shared among uploaders; ``"gc"``: exclusive),
        then look at the others: :class:`BucketBusyError` (ours withdrawn) if a live one
        conflicts: a ``gc`` lock for an upload, any other live lock for a gc.

        A lock not refreshed within ``ttl`` seconds is stale and ignored (a GC deletes it).
        """
        owner = _owner()
        now = time.time()
        handle = LockHandle(self, f"{layout.LOCKS}/{kind}-{owner}", Lock(kind, owner, now, now + ttl), ttl)
        handle.refresh()  # the first write: nothing to lose yet
        try:
            for name, lock in self.locks(skip=handle.key):
                if lock is None or lock.expires < time.time():
                    continue
                if kind == "gc" or lock.kind == "gc":
                    raise BucketBusyError(
                        f"{self.url}: {'a bucket GC' if lock.kind == 'gc' else 'an upload'} holds the lock "
                        f"{name!r} ({lock.owner}, until {time.ctime(lock.expires)})",
                        url=self.url,
                        holder=lock.owner,
                    )
        except BaseException:
            handle.release()
            raise
        return handle

    def gc_epoch(self) -> bytes:
        """The bucket's GC epoch: changed by every bucket GC before it deletes anything (b""
        if no GC ever ran).  An uploader reads it when it reads the index and again before
        it makes a step visible: a change means values it counted on may be gone."""
        try:
            return bytes(self.objects.get(layout.GC_EPOCH))
        except RemoteNotFoundError:
            return b""

    def next_gc_epoch(self) -> bytes:
        """Write a new GC epoch (a GC, before its first delete); returns it."""
        epoch = os.urandom(16).hex().encode()
        self.objects.put(layout.GC_EPOCH, epoch)
        return epoch

    def live_locks(self, kind: str, *, skip: str | None = None) -> list[tuple[str, Lock]]:
        """The ``kind`` locks not stale by this clock (unreadable ones count as live)."""
        now = time.time()
        return [
            (n, lock or Lock(kind, "unreadable", 0.0, float("inf")))
            for n, lock in self.locks(skip=skip)
            if lock is None or (lock.kind == kind and lock.expires >= now)
        ]

    def delete_stale_locks(self, keep: str) -> list[str]:
        """Delete every stale or unreadable lock object but ``keep``; their keys."""
        stale = [n for n, lock in self.locks() if n != keep and (lock is None or lock.expires < time.time())]
        self.objects.delete(stale)
        return stale


class LockHandle:
    """A lock this process wrote: :meth:`refresh` before ``ttl`` runs out, :meth:`held` to
    check nobody removed it, :meth:`release` when done."""

    def __init__(self, bucket: Bucket, key: str, lock: Lock, ttl: float):
        self.bucket, self.key, self.lock, self.ttl = bucket, key, lock, ttl
        self.refreshed = 0.0

    def refresh(self) -> None:
        """Push the lock's expiry ``ttl`` on; :class:`LockLostError` if its object is gone (a
        GC took it for stale): it is never written again then, so the GC that removed it
        cannot be fooled into taking the uploader for absent a second time."""
        if self.refreshed and not self.held():
            raise LockLostError(
                f"the {self.lock.kind} lock {self.key!r} on {self.bucket.url} expired or was removed as stale",
                url=self.bucket.url,
            )
        self._put()

    def _put(self) -> None:
        now = time.time()
        self.lock = Lock(self.lock.kind, self.lock.owner, self.lock.created, now + self.ttl)
        self.bucket.objects.put(self.key, layout.encode_lock(self.lock))
        self.refreshed = time.monotonic()

    def refresh_if_due(self) -> None:
        if time.monotonic() - self.refreshed > self.ttl / 3:
            self.refresh()

    def held(self) -> bool:
        """True if the lock object is still there and not stale by this clock."""
        if self.lock.expires < time.time():
            return False
        return self.bucket.objects.head(self.key) is not None

    def release(self) -> bool:
        """Delete the lock object; False (logged) if the bucket could not be reached."""
        try:
            self.bucket.objects.delete([self.key])
        except RemoteError as exc:  # a lock left behind goes stale after ttl
            log.warning("could not release lock %s: %s", self.key, exc)
            return False
        return True


def _owner() -> str:
    host = "".join(c if c.isalnum() or c in "._-" else "_" for c in socket.gethostname())[:60] or "host"
    return f"{host}-{os.getpid()}-{os.urandom(4).hex()}"

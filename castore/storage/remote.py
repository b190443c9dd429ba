"""A read-only :class:`~castore.storage.base.Backend` over a bucket: ``Store("s3://...", readonly=True)``.

The bucket layout (``docs/format.md``, *Bucket layout*) is shown as the tables a local store
has, so every read-only operation (load, ls, show, diff, du, verify) works on a bucket
unchanged:

* ``steps`` and ``stepinfo``: from the step records (all fetched when a snapshot is taken,
  many at once: they are small); ``tags`` from the tag objects;
* ``chunks`` and ``pages``: looked up in the bucket's index and read with one ranged read
  each, on the caller's thread (the loader reads a leaf's chunks on its pool, so a load
  runs ``workers`` requests at once);
* ``meta``: a config record made from the bucket's (the chunk size is only a writer's
  setting) and the counters from the index; ``trash`` and ``journal`` are empty.

A snapshot is the bucket as listed when it was taken; :meth:`RemoteBackend.read` takes a new
one when the last is older than ``refresh`` seconds, so a reader polling for new steps sees
them.  A step record that is damaged is left out of ``steps`` and named in
:attr:`RemoteBackend.problems` (``verify`` reports it); a chunk whose pack is gone reads as
absent, which the loader reports as a missing chunk.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
import time
from collections.abc import Iterator

from ..errors import CorruptDataError, UsageError
from ..format import journal
from ..format.bucket import CHUNK, PAGE, step_object
from ..format.config import CONFIG_KEY, new_config
from ..format.keys import tag_key
from ..format.schema import Table
from .bucket import Bucket

__all__ = ["RemoteBackend"]

_EMPTY = (Table.TRASH, Table.JOURNAL)


class RemoteSnapshot:
    """The tables of one listing of a bucket (a :class:`~castore.storage.base.ReadTxn`).

    ``deferred_reads``: a chunk's look-up is a request, so :meth:`ChunkStore.blob_read`
    asks :meth:`has` up front and fetches each chunk in the task that decodes it.
    """

    deferred_reads = True

    def __init__(self, bucket: Bucket, generation: int):
        self.bucket = bucket
        self.generation = generation
        self.problems: list[tuple[str, str]] = []
        bucket.refresh_index()
        keys = bucket.step_keys()
        self.steps: dict[bytes, bytes] = {}
        self.stepinfo: dict[bytes, bytes] = {}
        for key, found in bucket.get_steps(keys).items():
            if isinstance(found, CorruptDataError):
                self.problems.append((step_object(key), str(found)))
            elif found is not None:
                self.steps[key] = found.manifest
                self.stepinfo[key] = found.stepinfo
        self.step_order = sorted(self.steps)
        self.tags = {tag_key(name): key for name, key in bucket.tags().items() if name and not name.isdigit()}
        self.tag_order = sorted(self.tags)
        self.problems += bucket.problems
        count, nbytes = bucket.counts()
        self.meta = {
            CONFIG_KEY: new_config(1 << 20, "none"),
            journal.COUNTERS_KEY: journal.encode_counters(count, nbytes),
        }
        self.meta_order = sorted(self.meta)

    def get_many(self, table: Table, keys) -> list:
        """:meth:`get` of many keys; chunks and pages by coalesced ranged reads, many at once."""
        keys = [bytes(k) for k in keys]
        if table is not Table.CHUNKS and table is not Table.PAGES:
            return [self.get(table, k) for k in keys]
        known = [k for k in keys if self.has(table, k)]
        found = dict(self.bucket.read_many(known, span=8 << 20))
        missing = [k for k in known if found.get(k) is None]
        if missing:  # a bucket GC since this snapshot may have moved them: look again
            self.bucket.refresh_index()
            found.update(self.bucket.read_many(missing, span=8 << 20))
        return [found.get(k) for k in keys]

    def has(self, table: Table, key: bytes) -> bool:
        """Whether ``key`` is in ``table``; for chunks and pages from the index, without a request."""
        if table is Table.CHUNKS or table is Table.PAGES:
            loc = self.bucket.locate(bytes(key))
            return loc is not None and loc.kind == (CHUNK if table is Table.CHUNKS else PAGE)
        return self.get(table, key) is not None

    def get(self, table: Table, key: bytes):
        key = bytes(key)
        if table is Table.CHUNKS or table is Table.PAGES:
            loc = self.bucket.locate(key)
            if loc is None or loc.kind != (CHUNK if table is Table.CHUNKS else PAGE):
                return None
            value = self.bucket.read(key)
            if value is None:  # a bucket GC since this snapshot may have moved it: look again
                self.bucket.refresh_index()
                value = self.bucket.read(key)
            return value
        if table is Table.STEPS:
            return self.steps.get(key)
        if table is Table.STEPINFO:
            return self.stepinfo.get(key)
        if table is Table.TAGS:
            return self.tags.get(key)
        if table is Table.META:
            return self.meta.get(key)
        return None

    def scan(self, table: Table, start: bytes = b"", stop: bytes | None = None, *, reverse: bool = False) -> Iterator:
        if table is Table.CHUNKS or table is Table.PAGES:
            kind = CHUNK if table is Table.CHUNKS else PAGE
            items = [cid for cid, _ in self.bucket.values(kind)]
            source = None
        elif table in _EMPTY:
            return iter(())
        else:
            source, items = {
                Table.STEPS: (self.steps, self.step_order),
                Table.STEPINFO: (self.stepinfo, self.step_order),
                Table.TAGS: (self.tags, self.tag_order),
                Table.META: (self.meta, self.meta_order),
            }[table]
        lo = bisect.bisect_left(items, bytes(start))
        hi = len(items) if stop is None else bisect.bisect_left(items, bytes(stop))
        chosen = items[lo:hi]
        if reverse:
            chosen = chosen[::-1]
        if source is None:
            return ((cid, self.get(table, cid)) for cid in chosen)
        return ((key, source[key]) for key in chosen if key in source)

    def count(self, table: Table) -> int:
        if table is Table.CHUNKS or table is Table.PAGES:
            return sum(1 for _ in self.bucket.values(CHUNK if table is Table.CHUNKS else PAGE))
        return sum(1 for _ in self.scan(table))

    def release(self, value) -> None:
        return None


class RemoteBackend:
    """A bucket opened read-only (see the module docstring); close it like any backend."""

    readonly = True

    def __init__(self, bucket: Bucket, *, refresh: float = 10.0):
        self.bucket = bucket
        self.path = bucket.url
        self.refresh = refresh
        self._lock = threading.Lock()
        self._generation = 0
        self._snapshot: RemoteSnapshot | None = None
        self._taken = 0.0
        self._closed = False
        self._snap()

    def _snap(self) -> RemoteSnapshot:
        with self._lock:
            if self._snapshot is None or time.monotonic() - self._taken > self.refresh:
                self._generation += 1
                self._snapshot = RemoteSnapshot(self.bucket, self._generation)
                self._taken = time.monotonic()
            return self._snapshot

    @property
    def problems(self) -> list[tuple[str, str]]:
        """``(object, what is wrong)`` of what the latest snapshot could not read."""
        return list(self._snap().problems)

    def check(self) -> list[tuple[str, str]]:
        """``(object, what is wrong)`` for a fresh look at the bucket: what the snapshot could
        not read (step records, index objects, tags) and every indexed pack that is missing
        or whose size disagrees with its index (:meth:`Bucket.check_packs`)."""
        with self._lock:
            self._snapshot = None
        return self.problems + self.bucket.check_packs()

    @contextlib.contextmanager
    def read(self):
        yield self._snap()

    def write(self, fn, *args):
        raise UsageError(f"store {self.path} is open read-only (a bucket is written through Store(path, mirror=...))")

    def generation(self) -> int:
        return self._generation

    def reserve(self, nbytes: int) -> None:
        raise UsageError(f"store {self.path} is open read-only")

    def acquire_writer(self, timeout: float | None = None) -> bool:
        raise UsageError(f"store {self.path} is open read-only")

    def is_writer(self) -> bool:
        return False

    def has_table(self, table: Table) -> bool:
        return True

    @contextlib.contextmanager
    def exclusive_writes(self):
        yield

    def clear_stale_readers(self) -> int:
        return 0

    def compact(self) -> None:
        raise UsageError(f"store {self.path} is open read-only")

    def file_bytes(self) -> int:
        return sum(size for _, size in self.bucket.objects.list(""))

    def close(self, *, view: bool = False) -> None:
        if not self._closed:
            self._closed = True
            self.bucket.close()

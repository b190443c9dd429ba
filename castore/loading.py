"""The loader: a step's components read back, every chunk checked against its id.

Reads run in one storage snapshot per load (one per shard for a sharded component, so a
replay buffer streams shard by shard).  Each chunk's length is always checked and, unless
``verify=False``, its BLAKE3 digest; damage raises :class:`IntegrityError` naming step,
component, leaf path and chunk id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from . import catalog
from .errors import SelectionError, StepNotFoundError
from .format import codec
from .format.keys import describe_key, step_of
from .format.manifest import Blob, Manifest, ShardsNode
from .storage.base import Backend, ReadTxn
from .storage.chunks import ChunkStore, PageWalker, run_tasks
from .tracking import TrackedArray

log = logging.getLogger("castore.load")


@dataclass(frozen=True, slots=True)
class LoadedLeaf:
    """A chunked leaf as a load read it: what a later save needs to reuse its chunk ids."""

    path: str  #: ``component/leaf/path``, as a save names the leaf
    nbytes: int
    chunk_nbytes: int
    ids: bytes  #: its chunk ids, concatenated
    fingerprints: bytes  #: xxh3-128 of each chunk as loaded, concatenated
    tracked: TrackedArray | None = None  #: the restore target it was filled into, if tracked


class Loader:
    """Loads of one ``Store``: ``backend`` and ``chunks`` to read, ``pool`` to hash on."""

    def __init__(self, backend: Backend, chunks: ChunkStore, *, pool, where: str, allow_pickle: bool):
        self._backend = backend
        self._chunks = chunks
        self._pool = pool
        self._where = where
        self._allow_pickle = allow_pickle

    def load(
        self,
        txn: ReadTxn,
        key: bytes,
        keys,
        regex: str | None,
        verify: bool,
        *,
        into: dict | None = None,
        remember: list | None = None,
        map_location=None,
    ) -> dict:
        """Component name -> state of the step at ``key`` (see :meth:`castore.Store.load`).

        ``into`` maps component names to restore targets (see :func:`codec.decode`);
        with ``remember`` a :class:`LoadedLeaf` is appended for every chunked leaf read.
        """
        into = into or {}
        step = step_of(key)
        if not verify:
            log.info("loading %s of %s WITHOUT checking chunk digests (verify=False)", describe_key(key), self._where)
        manifest = catalog.manifest(txn, key, self._where)
        names = self._select_components(manifest, keys)
        options = {"allow_pickle": self._allow_pickle, "map_location": map_location}
        if regex is not None:
            return self._load_selected(txn, manifest, names, regex, verify, options)
        result = {}
        for name in names:
            node = manifest.component(name)
            if isinstance(node, ShardsNode):
                result[name] = self._iter_shards(step, name, node, verify, options)
            else:
                reader = self.blob_reader(txn, step, name, verify, remember is not None)
                result[name] = codec.decode(node, reader, "", into=into.get(name), **options)
                read = reader.finish()
                if remember is not None:
                    filled = {p: v for p, v in codec.leaves(result[name]) if type(v) is TrackedArray}
                    remember.extend(
                        LoadedLeaf(
                            codec.join(name, path), blob.nbytes, blob.chunk_nbytes, ids, prints or b"", filled.get(path)
                        )
                        for path, (blob, ids, prints) in read.items()
                    )
        return result

    def blob_reader(self, txn: ReadTxn, step: int, component: str, verify: bool, remember: bool = False):
        """A :class:`BlobReader` for the codec over ``txn``; call its ``finish()``."""
        return BlobReader(
            self._chunks, txn, PageWalker(txn, check_pages=verify), self._pool, step, component, verify, remember
        )

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

    def _load_selected(self, txn: ReadTxn, manifest: Manifest, names, regex: str, verify: bool, options) -> dict:
        result, available = {}, []
        for name in names:
            node = manifest.component(name)
            reader = self.blob_reader(txn, manifest.step, name, verify)
            chosen = codec.select(node, regex)
            result[name] = {p: codec.decode(n, reader, p, **options) for p, n in chosen}
            reader.finish()
            if not chosen:
                available += [f"{name}:{p}" for p, _ in codec.leaf_nodes(node)][:20]
        if not any(result.values()):
            raise SelectionError(
                f"regex {regex!r} selects no leaf of {', '.join(names)} at step {manifest.step}; "
                f"leaf paths include: {', '.join(available[:40])}"
            )
        return result

    def _iter_shards(self, step: int, name: str, node: ShardsNode, verify: bool, options):
        for index, shard in enumerate(node.shards):
            with self._backend.read() as txn:
                reader = self.blob_reader(txn, step, name, verify)
                value = codec.decode(shard, reader, str(index), **options)
                reader.finish()
            yield value


class BlobReader:
    """``read_blob`` for the codec within one snapshot: deferred reads (arrays) are queued
    and run together by :meth:`finish` on every thread of the pool, so a state of many
    small leaves decodes on all cores as one of a few large ones does."""

    def __init__(self, chunks: ChunkStore, txn: ReadTxn, walker: PageWalker, pool, step, component, verify, remember):
        self._chunks, self._txn, self._walker, self._pool = chunks, txn, walker, pool
        self._step, self._component, self._verify, self._remember = step, component, verify, remember
        self._reads: dict[str, tuple] = {}  # path -> (blob, BlobRead)
        self._queued: list = []

    def __call__(self, blob: Blob, out, path: str, *, deferred: bool = False) -> None:
        context = {"step": self._step, "component": self._component, "path": path}
        read = self._chunks.blob_read(
            self._txn, self._walker, blob, out, verify=self._verify, context=context, fingerprints=self._remember
        )
        self._reads[path] = (blob, read)
        if deferred:
            self._queued += read.tasks
        else:
            self._run(read.tasks)

    def finish(self) -> dict:
        """Run the queued reads; returns ``path -> (blob, ids, fingerprints)`` of every blob."""
        queued, self._queued = self._queued, []
        self._run(queued)
        return {path: (blob, *read.result()) for path, (blob, read) in self._reads.items()}

    def _run(self, tasks: list) -> None:
        run_tasks(self._pool, tasks)

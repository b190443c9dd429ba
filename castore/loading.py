"""The loader: a step's components read back, every chunk checked against its id.

Reads run in one storage snapshot per load (one per shard for a sharded component, so a
replay buffer streams shard by shard).  Each chunk's length is always checked and, unless
``verify=False``, its BLAKE3 digest; damage raises :class:`IntegrityError` naming step,
component, leaf path and chunk id.
"""

from __future__ import annotations

import logging

from . import catalog
from .errors import SelectionError, StepNotFoundError
from .format import codec
from .format.keys import describe_key, step_of
from .format.manifest import Blob, Manifest, ShardsNode
from .storage.base import Backend, ReadTxn
from .storage.chunks import ChunkStore, PageWalker

log = logging.getLogger("castore.load")


class Loader:
    """Loads of one ``Store``: ``backend`` and ``chunks`` to read, ``pool`` to hash on."""

    def __init__(self, backend: Backend, chunks: ChunkStore, *, pool, where: str, allow_pickle: bool):
        self._backend = backend
        self._chunks = chunks
        self._pool = pool
        self._where = where
        self._allow_pickle = allow_pickle

    def load(self, txn: ReadTxn, key: bytes, keys, regex: str | None, verify: bool) -> dict:
        """Component name -> state of the step at ``key`` (see :meth:`castore.Store.load`)."""
        step = step_of(key)
        if not verify:
            log.info("loading %s of %s WITHOUT checking chunk digests (verify=False)", describe_key(key), self._where)
        manifest = catalog.manifest(txn, key, self._where)
        names = self._select_components(manifest, keys)
        if regex is not None:
            return self._load_selected(txn, manifest, names, regex, verify)
        result = {}
        for name in names:
            node = manifest.component(name)
            if isinstance(node, ShardsNode):
                result[name] = self._iter_shards(step, name, node, verify)
            else:
                reader = self.blob_reader(txn, step, name, verify)
                result[name] = codec.decode(node, reader, "", allow_pickle=self._allow_pickle)
        return result

    def blob_reader(self, txn: ReadTxn, step: int, component: str, verify: bool):
        """``read_blob`` for the codec: fill ``out`` with a blob's chunks, each checked."""
        walker = PageWalker(txn, check_pages=verify)

        def read_blob(blob: Blob, out, path: str) -> None:
            context = {"step": step, "component": component, "path": path}
            self._chunks.read_blob(txn, walker, blob, out, verify=verify, pool=self._pool, context=context)

        return read_blob

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

    def _load_selected(self, txn: ReadTxn, manifest: Manifest, names, regex: str, verify: bool) -> dict:
        result, available = {}, []
        for name in names:
            node = manifest.component(name)
            reader = self.blob_reader(txn, manifest.step, name, verify)
            chosen = codec.select(node, regex)
            result[name] = {p: codec.decode(n, reader, p, allow_pickle=self._allow_pickle) for p, n in chosen}
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
            with self._backend.read() as txn:
                reader = self.blob_reader(txn, step, name, verify)
                value = codec.decode(shard, reader, str(index), allow_pickle=self._allow_pickle)
            yield value

"""Storage: the only package that touches the storage engines (and the only importer of ``lmdb``).

* :mod:`~castore.storage.base`: the :class:`Backend` / :class:`ReadTxn` / :class:`WriteTxn`
  contract every engine keeps;
* :mod:`~castore.storage.lmdb_engine` (the default, with ``lmdb_file`` and ``lock``) and
  :mod:`~castore.storage.memory` (``memory://name``): the engines;
* :mod:`~castore.storage.chunks`: the one chunk store through which every chunk and
  chunk-list page is read, written, sized and deleted, and the one walk from a blob to its
  chunk ids.
"""

from __future__ import annotations

import os

from .base import Backend, ReadTxn, WriteTxn
from .chunks import ChunkStore, PageWalker
from .lmdb_engine import LmdbBackend
from .memory import SCHEME as MEMORY_SCHEME
from .memory import MemoryBackend

__all__ = ["Backend", "ChunkStore", "LmdbBackend", "MemoryBackend", "PageWalker", "ReadTxn", "WriteTxn", "open_backend"]


def open_backend(
    path: str | os.PathLike,
    *,
    create: bool = True,
    readonly: bool = False,
    allow_network_fs: bool = False,
    lock_timeout: float | None = None,
) -> Backend:
    """The engine for ``path``: ``memory://name`` in memory, anything else an LMDB directory.

    Openers of one path in one process share one backend; pair each call with ``close()``.
    """
    text = os.fspath(path)
    if isinstance(text, str) and text.startswith(MEMORY_SCHEME):
        return MemoryBackend.open(
            text[len(MEMORY_SCHEME) :], create=create, readonly=readonly, lock_timeout=lock_timeout
        )
    return LmdbBackend.open(
        text, create=create, readonly=readonly, allow_network_fs=allow_network_fs, lock_timeout=lock_timeout
    )

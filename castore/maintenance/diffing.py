"""What changed between two steps, leaf by leaf and chunk by chunk (reads manifests and
chunk-list pages, never a chunk).

Two leaves at the same path are *the same* when their manifest nodes are equal: for a
chunked array that means the same dtype, shape and chunk ids, so equal content (ids are
BLAKE3 digests of the raw bytes).  For a changed chunked leaf, chunk ``i`` of B *changed*
when A's leaf has no chunk ``i`` or a different id there; its raw bytes are counted.  The
*new* bytes of B are the stored bytes of its chunks (and pages) that step A references
nowhere: what saving B after A had to write, whatever leaf held them before.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..format.chunker import chunk_count
from ..format.codec import leaf_nodes, node_nbytes
from ..format.ids import split_ids
from ..format.manifest import ArrayLeaf, ChunkedBlob, Manifest, Node, PagedBlob, TypedNode, iter_blobs
from ..format.schema import Table
from ..storage.base import ReadTxn
from ..storage.chunks import ChunkStore, PageWalker

ADDED, REMOVED, CHANGED = "added", "removed", "changed"


@dataclass(frozen=True, slots=True)
class LeafChange:
    """One leaf that differs between the steps."""

    path: str  #: ``component/leaf/path`` (for display: a component name may hold ``/``)
    component: str
    leaf: str  #: the path inside the component ("" for a component that is one leaf)
    change: str  #: ``added``, ``removed`` or ``changed``
    a: Node | None  #: its manifest node in A (None if added)
    b: Node | None  #: its manifest node in B (None if removed)
    chunks: int  #: chunks of B's leaf (0 for an inline or removed leaf)
    changed_chunks: int  #: of those, not at the same position in A's leaf
    changed_bytes: int  #: raw bytes of those chunks; a changed inline leaf counts its logical bytes


@dataclass(frozen=True, slots=True)
class StepDiff:
    """From step A to step B."""

    a: tuple[str, int]  #: (branch, step)
    b: tuple[str, int]
    changes: tuple[LeafChange, ...]  #: in B's leaf order, then the removed leaves in A's
    same_leaves: int  #: leaves equal in both
    new_bytes: int  #: stored bytes of B's chunks and pages that A does not reference
    new_chunks: int  #: how many those are

    @property
    def changed_chunks(self) -> int:
        return sum(c.changed_chunks for c in self.changes)

    @property
    def changed_bytes(self) -> int:
        return sum(c.changed_bytes for c in self.changes)


def _leaves(manifest: Manifest) -> dict[tuple[str, str], Node]:
    """Leaves by (component, path): component names may hold ``/``, so a joined string
    could name two leaves."""
    out: dict[tuple[str, str], Node] = {}
    for name, node in manifest.components:
        for path, leaf in leaf_nodes(node):
            out[name, path] = leaf
    return out


def _label(key: tuple[str, str]) -> str:
    return f"{key[0]}/{key[1]}" if key[1] else key[0]


def _chunked(node: Node | None):
    if isinstance(node, TypedNode):
        node = node.node
    if isinstance(node, ArrayLeaf) and isinstance(node.blob, (ChunkedBlob, PagedBlob)):
        return node.blob
    return None


def _ids(walker: PageWalker, blob) -> list[bytes]:
    return split_ids(walker.walk(blob).chunk_ids)


def _step_items(walker: PageWalker, manifest: Manifest) -> set:
    items: set = set()
    for _, node in manifest.components:
        for blob in iter_blobs(node):
            walk = walker.walk(blob)
            items.update((Table.PAGES, pid) for pid in walk.pages)
            items.update((Table.CHUNKS, cid) for cid in split_ids(walk.chunk_ids))
    return items


def diff(chunks: ChunkStore, txn: ReadTxn, a: tuple[str, int, Manifest], b: tuple[str, int, Manifest]) -> StepDiff:
    """Compare step A with step B, both read in the snapshot ``txn``."""
    walker = PageWalker(txn, check_pages=False)
    leaves_a, leaves_b = _leaves(a[2]), _leaves(b[2])
    changes, same = [], 0
    for path, node_b in leaves_b.items():
        node_a = leaves_a.get(path)
        if node_a == node_b:
            same += 1
            continue
        blob_b = _chunked(node_b)
        count = changed = changed_bytes = 0
        if blob_b is not None:
            blob_a = _chunked(node_a)
            ids_a = _ids(walker, blob_a) if blob_a is not None else []
            ids_b = _ids(walker, blob_b)
            count = chunk_count(blob_b.nbytes, blob_b.chunk_nbytes)
            for index, cid in enumerate(ids_b):
                if index >= len(ids_a) or ids_a[index] != cid or blob_a.chunk_nbytes != blob_b.chunk_nbytes:
                    changed += 1
                    changed_bytes += min(blob_b.chunk_nbytes, blob_b.nbytes - index * blob_b.chunk_nbytes)
        else:
            changed_bytes = node_nbytes(node_b)
        changes.append(
            LeafChange(
                _label(path),
                path[0],
                path[1],
                CHANGED if node_a is not None else ADDED,
                node_a,
                node_b,
                count,
                changed,
                changed_bytes,
            )
        )
    for path, node_a in leaves_a.items():
        if path not in leaves_b:
            changes.append(LeafChange(_label(path), path[0], path[1], REMOVED, node_a, None, 0, 0, 0))
    new_items = _step_items(walker, b[2]) - _step_items(walker, a[2])
    sizes = 0
    for table in (Table.CHUNKS, Table.PAGES):
        sizes += sum(chunks.sizes(txn, table, [cid for t, cid in new_items if t is table]).values())
    return StepDiff(a[:2], b[:2], tuple(changes), same, sizes, len(new_items))

"""Verify a store: every step of every branch, down to its chunks; report every problem.

What is checked, in one read transaction (a consistent snapshot; writers keep going):

* every manifest decodes and names its own step; its metrics record decodes;
* every chunk-list page is present, well formed and matches its id (always hashed);
* every chunk a step names is present with the length its blob implies, and its BLAKE3
  digest matches its id: all chunks, or a ``sample`` of them (a fraction, picked by a
  salted hash of the id so repeated partial runs cover different chunks);
* every tag names a step, and every trashed manifest (GC's input) decodes.

Each unique chunk and page is checked once however many steps share it; a damaged one is
then reported once per step, component and leaf path that references it, so the report
says exactly which steps would fail to load.  Cost: reading and hashing the checked bytes
(parallel on ``pool``), plus one pass over the manifests.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

from .. import catalog
from ..errors import CastoreError, CorruptDataError, UsageError
from ..format import codec
from ..format.chunker import chunk_count
from ..format.compression import is_encoded
from ..format.ids import ID_BYTES, short, split_ids
from ..format.keys import MAIN, branch_of, step_of
from ..format.manifest import decode_manifest, iter_blobs
from ..format.schema import Table
from ..storage.base import ReadTxn
from ..storage.chunks import PAGE_MISSING, ChunkStore, PageWalker

VERIFY_BATCH = 64  # chunks handed to the pool at once (bounds the memoryviews in flight)


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong in a store, and where."""

    kind: str  #: manifest, metrics, page-missing, page-corrupt, chunk-missing, chunk-corrupt, tag, trash, store
    detail: str
    branch: str | None = None
    step: int | None = None
    component: str | None = None
    path: str | None = None  #: leaf path within the component
    chunk: str | None = None  #: short hex id of the chunk or page

    def __str__(self) -> str:
        where = []
        if self.step is not None:
            where.append(f"step {self.step}" + ("" if self.branch == MAIN else f" of branch {self.branch}"))
        if self.component is not None:
            where.append(f"component {self.component!r}" + (f" leaf {self.path!r}" if self.path else ""))
        if self.chunk is not None:
            where.append(f"chunk {self.chunk}")
        return f"{self.kind}: {self.detail}" + (f" ({', '.join(where)})" if where else "")


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome of :func:`verify`."""

    problems: tuple[Problem, ...]
    steps: int  #: steps checked, over every branch
    chunks: int  #: unique chunks the steps reference (each checked present, with its length)
    hashed_chunks: int  #: of those, chunks whose digest was checked
    hashed_bytes: int
    sample: float  #: the fraction of chunks asked to be hashed (1.0: all)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def affected_steps(self) -> list[tuple[str | None, int]]:
        """``(branch, step)`` of every step that would not load intact."""
        return sorted({(p.branch, p.step) for p in self.problems if p.step is not None})


def check_sample(sample) -> float:
    if isinstance(sample, bool) or not isinstance(sample, (int, float)) or not 0 < sample <= 1:
        raise UsageError(f"sample must be a fraction in (0, 1], got {sample!r}")
    return float(sample)


def verify(
    chunks: ChunkStore, pool, *, sample: float = 1.0, seed: int | None = None, steps=None, progress=None
) -> VerifyReport:
    """Check the whole store (see the module docstring); never raises for damage it finds.

    ``steps``: ``(branch, step)`` pairs to check instead of every step.  ``progress(done,
    total)``: called as chunk bytes are hashed.
    """
    sample = check_sample(sample)
    salt = random.Random(seed).getrandbits(64)
    checker = _Checker(chunks, pool, sample, salt)
    checker.only = None if steps is None else {(str(b), int(s)) for b, s in steps}
    checker.progress = progress
    try:
        with chunks.backend.read() as txn:
            checker.run(txn)
    except CastoreError as exc:  # the engine itself could not read on: report what was found so far
        checker.problems.append(Problem("store", str(exc)))
    return VerifyReport(
        tuple(checker.problems),
        checker.steps,
        len(checker.lengths),
        checker.hashed_chunks,
        checker.hashed_bytes,
        sample,
    )


class _Checker:
    walker: PageWalker  #: set by run(), for its snapshot

    def __init__(self, chunks: ChunkStore, pool, sample: float, salt: int):
        self.chunks, self.pool, self.salt = chunks, pool, salt
        self.threshold = int(sample * (1 << 64))
        self.problems: list[Problem] = []
        self.steps = self.hashed_chunks = self.hashed_bytes = 0
        self.lengths: dict[bytes, int] = {}  # chunk id -> length its blobs imply
        self.bad_chunks: dict[bytes, str] = {}  # chunk id -> problem kind
        self.damaged = False  # some paged blob has an unusable page or a wrong chunk count
        self._scratch = threading.local()  # a decode buffer per pool thread
        self.only: set | None = None  # (branch, step) pairs to check; None: all
        self.progress = None  # progress(done bytes, total bytes), or None
        self._done = self._total = 0

    def run(self, txn: ReadTxn) -> None:
        self.walker = PageWalker(txn, check_pages=True)
        manifests = list(self._manifests(txn))
        for _, _, manifest in manifests:
            for _, node in manifest.components:
                for blob in iter_blobs(node):
                    self._note_blob(blob)
        self._check_chunks(txn)
        if self.bad_chunks or self.damaged:
            for branch, step, manifest in manifests:
                self._locate_damage(branch, step, manifest)
        self._check_tags(txn)
        self._check_trash(txn)
        self._check_counters(txn)

    def _manifests(self, txn: ReadTxn):
        """``(branch, step, manifest)`` of every decodable step; problems for the rest."""
        for key, raw in txn.scan(Table.STEPS):
            try:
                branch, step = branch_of(key), step_of(key)
            except CorruptDataError as exc:
                self.problems.append(Problem("manifest", str(exc)))
                continue
            if self.only is not None and (branch, step) not in self.only:
                continue
            self.steps += 1
            try:
                catalog.read_metrics(txn, bytes(key))
            except CorruptDataError as exc:
                self.problems.append(Problem("metrics", str(exc), branch, step))
            try:
                manifest = decode_manifest(raw)
            except CorruptDataError as exc:
                self.problems.append(Problem("manifest", str(exc), branch, step))
                continue
            if manifest.step != step:
                self.problems.append(Problem("manifest", f"manifest says step {manifest.step}", branch, step))
                continue
            yield branch, step, manifest

    def _note_blob(self, blob) -> None:
        walk = self.walker.walk(blob)
        if not walk.complete:
            self.damaged = True  # reported per leaf by _damage_in
            return
        stride = getattr(blob, "chunk_nbytes", 0)
        for index, cid in enumerate(split_ids(walk.chunk_ids)):
            self.lengths.setdefault(cid, min(stride, blob.nbytes - index * stride))

    def _check_counters(self, txn: ReadTxn) -> None:
        try:
            self.chunks.counters(txn)
        except CorruptDataError as exc:  # the next save recounts; stats() is wrong until then
            self.problems.append(Problem("store", str(exc)))

    def _check_chunks(self, txn: ReadTxn) -> None:
        group: list = []
        wanted = list(self.lengths.items())
        if self.progress is not None:
            self._total = sum(length for cid, length in wanted if self._sampled(cid))
            self.progress(0, self._total)
        for start in range(0, len(wanted), VERIFY_BATCH):
            part = wanted[start : start + VERIFY_BATCH]
            for (cid, length), view in zip(part, self.chunks.get_many(txn, [cid for cid, _ in part])):
                self._check_chunk(cid, length, view, group)
        self._hash(group)

    def _check_chunk(self, cid: bytes, length: int, view, group: list) -> None:
        if view is None:
            self.bad_chunks[cid] = "chunk-missing"
        elif len(view) != length and not is_encoded(view):
            self.bad_chunks[cid] = "chunk-corrupt"
        elif self._sampled(cid):
            group.append((cid, length, view))
            if len(group) == VERIFY_BATCH:
                self._hash(group)
                group.clear()

    def _sampled(self, cid: bytes) -> bool:
        return (int.from_bytes(cid[:8], "big") ^ self.salt) < self.threshold

    def _hash(self, group) -> None:
        """Decode (into a scratch buffer per thread) and hash each chunk of ``group``."""
        scratch = self._scratch

        def intact(item) -> bool:
            cid, length, view = item
            if not hasattr(scratch, "buffer"):
                scratch.buffer = bytearray()
            return self.chunks.intact(view, cid, length, scratch.buffer)

        for (cid, length, _), ok in zip(group, self.pool.map(intact, group)):
            self.hashed_chunks += 1
            self.hashed_bytes += length
            if not ok:
                self.bad_chunks[cid] = "chunk-corrupt"
        if self.progress is not None and group:
            self._done += sum(length for _, length, _ in group)
            self.progress(self._done, self._total)

    def _locate_damage(self, branch: str, step: int, manifest) -> None:
        """One problem per damaged chunk or page, per leaf of this step that references it."""
        for name, node in manifest.components:
            for path, leaf in codec.leaf_nodes(node):
                for blob in iter_blobs(leaf):
                    for kind, cid, detail in self._damage_in(blob):
                        self.problems.append(Problem(kind, detail, branch, step, name, path, short(cid)))

    def _damage_in(self, blob):
        walk = self.walker.walk(blob)
        if walk.damaged:
            for kind, pid in walk.damaged:
                kind = PAGE_MISSING if kind == PAGE_MISSING else "page-corrupt"
                yield (
                    kind,
                    pid,
                    "chunk-list page " + ("is missing" if kind == PAGE_MISSING else "does not match its id"),
                )
            return
        if walk.listed is not None:
            needed = chunk_count(blob.nbytes, blob.chunk_nbytes)
            yield (
                "manifest",
                blob.page_ids[:ID_BYTES],
                f"chunk-list pages list {walk.listed} chunks, the leaf needs {needed}",
            )
            return
        seen = set()
        for cid in split_ids(walk.chunk_ids):
            kind = self.bad_chunks.get(cid)
            if kind and cid not in seen:
                seen.add(cid)
                yield kind, cid, "chunk is missing" if kind == "chunk-missing" else "chunk bytes do not match its id"

    def _check_tags(self, txn: ReadTxn) -> None:
        for name, key in txn.scan(Table.TAGS):
            label = bytes(name).decode("utf-8", "replace")
            try:
                branch = branch_of(key)
            except CorruptDataError:
                self.problems.append(Problem("tag", f"tag {label!r} does not name a step"))
                continue
            if txn.get(Table.STEPS, bytes(key)) is None:
                self.problems.append(
                    Problem("tag", f"tag {label!r} names a step that does not exist", branch, step_of(key))
                )

    def _check_trash(self, txn: ReadTxn) -> None:
        for key, raw in txn.scan(Table.TRASH):
            try:
                decode_manifest(raw)
            except CorruptDataError as exc:
                self.problems.append(Problem("trash", f"trashed manifest {bytes(key).hex()[:24]}: {exc}"))

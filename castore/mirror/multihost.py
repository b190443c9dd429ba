"""Many hosts, one step: N ranks each upload their part of a step; it commits when all are there.

Each rank (process) keeps its own local store and opens it with
``Store(path, mirror=url, mirror_options=MirrorOptions(rank=r, world=N, attempt=...))``.  A
rank names its components disjointly from the others' (``agent/shard0``, ``replay/rank1``)
and saves as usual; its mirror then uploads, for each committed step S:

1. the values the bucket lacks, in packs, each before its index (as a single-host upload);
2. instead of the step record, its **part record** ``parts/<key hex>/<rank>`` (sealed msgpack:
   rank, world, attempt, its manifest and stepinfo bytes; :func:`~castore.format.bucket.encode_part`);
3. it lists ``parts/<key hex>/``; if the parts of **its attempt** from all N ranks are there,
   it merges them (:func:`merge_parts`: components in rank order, ``created`` the latest,
   ``logical_bytes`` the sum, metrics the union with the lowest rank's value winning) and
   writes the step record with :meth:`~castore.storage.objects.ObjectStore.put_if_absent`.

The merge is a pure function of the parts' bytes, so every rank that sees all N parts
writes the same record and whoever wins, the step is the same; a loser compares the record
it finds (equal: fine; different: :class:`~castore.errors.StepConflictError`).  The bucket is
strongly consistent, so the last rank to write its part lists all N: a step whose parts are
all written commits; if that last rank dies between its part and the step record (one
request), any rank waiting in :meth:`PartCommitter.wait_committed` finds every part and
commits the step itself.  A rank that dies
before its part leaves no visible step: readers (``Store(url, readonly=True)``, ``pull``)
see only step records.  Parts of a committed step are deleted by the rank that committed it;
bucket GC (:mod:`castore.mirror.bucket_gc`) keeps what live parts name, and deletes parts of
committed steps and parts older than a grace period whose step never committed.

**Attempts.**  A part names the *attempt* (one launch of the job: every rank of it passes
the same string, and a restart passes a new one: a scheduler's job id and restart count).
Without it, a restart would mix parts: if rank 1 died before its part of step 4, ranks 0
and 2 left theirs; after the restart rank 1 may write its new part of step 4 before ranks 0
and 2 rewrite theirs, list three parts and commit two stale shards with one fresh one.
Nothing in the bucket can tell a stale part from a slow rank's fresh one, so the ranks must
share a name for the launch; parts of other attempts are never merged (they are overwritten
by the rank's next part, or collected).  For the same reason a multi-host mirror does not
re-upload, when it opens, local steps the bucket lacks (their attempt is not known): a step
that had not committed when its attempt ended is abandoned, and the new attempt resumes from
the bucket's latest step (:meth:`~castore.mirror.Mirror.latest_committed`).

**Why the bucket and not a barrier.**  ``torch.distributed`` / ``jax.distributed`` barriers
need a rendezvous service that lives exactly as long as one launch; here the only shared
thing is the bucket the steps go to anyway.  The commit survives restarts (a rank may
finish its part after the others exited), needs no rank to be special, and the bucket is the
single source of truth of which steps exist: there is no second place (a coordinator's
memory, a ``latest`` file) to disagree with it.  A barrier after each save still helps to
bound how far ranks drift apart (and so how many parts wait in the bucket), but correctness
does not depend on one.
"""

from __future__ import annotations

import logging
import threading
import time

from ..errors import (
    CommitTimeoutError,
    ComponentCollisionError,
    CorruptDataError,
    RemoteNotFoundError,
    StepConflictError,
    UsageError,
)
from ..format import bucket as layout
from ..format.bucket import MAX_ATTEMPT, MAX_WORLD, PartObject
from ..format.keys import describe_key, step_of
from ..format.manifest import Manifest, decode_manifest, encode_manifest
from ..format.stepinfo import SaveTimes, decode_stepinfo, encode_stepinfo
from ..storage.bucket import Bucket

__all__ = ["COMMITTED", "JOINED", "PRESENT", "WAITING", "PartCommitter", "check_ranks", "classify_parts", "merge_parts"]

log = logging.getLogger("castore.mirror")

#: outcomes of :meth:`PartCommitter.publish`: this rank wrote the step record; another had,
#: with the same content; a record is there but the parts were gone to compare; parts missing
COMMITTED, JOINED, PRESENT, WAITING = "committed", "joined", "present", "waiting"
#: seconds after which bucket GC deletes a part whose step never committed
DEFAULT_PART_GRACE = 24 * 3600.0


def check_ranks(rank: int, world: int, attempt: str | None) -> None:
    """:class:`UsageError` unless ``rank`` / ``world`` / ``attempt`` describe one rank of a launch."""
    if isinstance(world, bool) or not isinstance(world, int) or not 1 <= world <= MAX_WORLD:
        raise UsageError(f"world must be an int in [1, {MAX_WORLD}], got {world!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise UsageError(f"rank must be an int in [0, world={world}), got {rank!r}")
    if world > 1 and (not isinstance(attempt, str) or not 0 < len(attempt) <= MAX_ATTEMPT):
        raise UsageError(
            f"a multi-host mirror (world={world}) needs attempt=: a non-empty str of at most {MAX_ATTEMPT} "
            "characters that every rank of this launch passes and a restart changes (e.g. the scheduler's "
            f"job id and restart count), got {attempt!r}"
        )


def merge_parts(key: bytes, parts: list[PartObject]) -> tuple[bytes, bytes]:
    """The sealed manifest and stepinfo record of step ``key`` made of ``parts`` (one per rank,
    any order): deterministic, so every rank computes the same bytes.

    Raises :class:`ComponentCollisionError` if two ranks saved a component of one name,
    :class:`CorruptDataError` for a part whose records are damaged or of another step.
    """
    parts = sorted(parts, key=lambda p: p.rank)
    step = step_of(key)
    manifests: list[Manifest] = []
    for part in parts:
        what = f"the manifest in rank {part.rank}'s part of {describe_key(key)}"
        manifest = decode_manifest(part.manifest)
        if manifest.step != step:
            raise CorruptDataError(f"{what} is of step {manifest.step}")
        manifests.append(manifest)
    owners: dict[str, list[int]] = {}
    for part, manifest in zip(parts, manifests):
        for name in manifest.names:
            owners.setdefault(name, []).append(part.rank)
    collisions = {name: ranks for name, ranks in owners.items() if len(ranks) > 1}
    if collisions:
        listed = "; ".join(f"{name!r} by ranks {', '.join(map(str, ranks))}" for name, ranks in collisions.items())
        raise ComponentCollisionError(
            f"{describe_key(key)}: ranks saved components of one name ({listed}); each rank must name "
            "its components apart from the others' (e.g. 'agent/shard0', 'replay/rank1'); the step is "
            "not committed",
            step=step,
            collisions=collisions,
        )
    infos = [decode_stepinfo(p.stepinfo, f"the stepinfo in rank {p.rank}'s part of {describe_key(key)}") for p in parts]
    created = max(m.created for m in manifests)
    merged = Manifest(
        step, created, sum(m.logical_bytes for m in manifests), tuple(c for m in manifests for c in m.components)
    )
    metrics: dict[str, float] = {}
    for info in infos:  # the lowest rank's value of a metric wins
        for name, value in info.metrics.items():
            metrics.setdefault(name, value)
    times = [i.save for i in infos]
    save = None
    if all(t is not None for t in times):
        save = SaveTimes(
            max(t.seconds for t in times if t is not None),
            max(t.blocked_seconds for t in times if t is not None),
            sum(t.written_bytes for t in times if t is not None),
        )
    return encode_manifest(merged), encode_stepinfo(created, metrics, save)


class PartCommitter:
    """One rank's side of multi-host steps on ``bucket`` (see the module docstring); thread-safe."""

    def __init__(self, bucket: Bucket, *, rank: int, world: int, attempt: str):
        check_ranks(rank, world, attempt)
        self.bucket, self.rank, self.world, self.attempt = bucket, rank, world, attempt
        self._lock = threading.Lock()
        #: ``{step key: outcome}`` of this rank's publishes (:data:`COMMITTED`, ...), for tests and tools
        self.outcomes: dict[bytes, str] = {}

    def publish(self, key: bytes, manifest: bytes, stepinfo: bytes) -> int:
        """Write this rank's part of step ``key``, then commit the step if every part is there;
        returns the bytes put.  Raises what :meth:`try_commit` raises and RemoteError."""
        data = layout.encode_part(
            PartObject(bytes(key), self.rank, self.world, self.attempt, time.time(), manifest, stepinfo)
        )
        self.bucket.objects.put(layout.part_object(key, self.rank), data)
        outcome = self.try_commit(key)
        with self._lock:
            self.outcomes[bytes(key)] = outcome
        log.debug("rank %d/%d: %s %s", self.rank, self.world, describe_key(key), outcome)
        return len(data)

    def parts(self, key: bytes) -> tuple[dict[int, PartObject], dict[int, str]]:
        """``({rank: part of this attempt}, {rank: attempt of a part of another attempt})`` of
        step ``key`` as listed now.  Raises CorruptDataError for a damaged part, and
        :class:`StepConflictError` for a part of this attempt that disagrees on the world."""
        mine: dict[int, PartObject] = {}
        others: dict[int, str] = {}
        for name, _ in self.bucket.objects.list(layout.part_folder(key)):
            try:
                found, rank = layout.part_of(name)
            except CorruptDataError:
                continue  # not a name castore writes: not a part
            if found != bytes(key):
                continue
            try:
                raw = self.bucket.objects.get(name)
            except RemoteNotFoundError:
                continue  # the step committed meanwhile and its parts went
            part = layout.decode_part(raw, key, rank, f"part {self.bucket.url}/{name}")
            if part.attempt != self.attempt:
                others[rank] = part.attempt
                continue
            if part.world != self.world:
                raise StepConflictError(
                    f"{describe_key(key)}: rank {rank}'s part of attempt {self.attempt!r} is of a world of "
                    f"{part.world} ranks, this rank's of {self.world}: every rank must pass the same world",
                    step=step_of(key),
                )
            mine[rank] = part
        return mine, others

    def try_commit(self, key: bytes) -> str:
        """Commit step ``key`` if the parts of this attempt from every rank are in the bucket.

        Returns an outcome (:data:`COMMITTED`, :data:`JOINED`, :data:`PRESENT`, :data:`WAITING`).
        Raises :class:`ComponentCollisionError`, :class:`StepConflictError` if the step is
        committed with other content, CorruptDataError for a damaged part, RemoteError.
        """
        name = layout.step_object(key)
        mine, _ = self.parts(key)
        if len(mine) < self.world:
            return PRESENT if self.bucket.objects.head(name) is not None else WAITING
        manifest, stepinfo = merge_parts(key, list(mine.values()))
        if self.bucket.put_step(key, manifest, stepinfo, if_absent=True):
            # the step record is the root from here on: the parts are garbage
            self.bucket.objects.delete([layout.part_object(key, r) for r in sorted(mine)])
            return COMMITTED
        record = self.bucket.get_step(key)
        if record is not None and record.manifest == manifest and record.stepinfo == stepinfo:
            return JOINED
        raise StepConflictError(
            f"{describe_key(key)} is committed in {self.bucket.url} with other content than the parts of "
            f"attempt {self.attempt!r} merge to: a committed step is never replaced; save later steps "
            "(resume from Mirror.latest_committed()) or delete the bucket's step first",
            step=step_of(key),
        )

    def wait_committed(self, key: bytes, timeout: float) -> None:
        """Return once step ``key``'s record is in the bucket; poll with backoff (at most 1 s).

        Raises :class:`CommitTimeoutError` (naming the ranks whose part of this attempt is
        missing) after ``timeout`` seconds, and at once :class:`ComponentCollisionError` if
        every part is there but they cannot merge.
        """
        name = layout.step_object(key)
        deadline = time.monotonic() + timeout
        delay = 0.05
        checked: tuple = ()
        while True:
            if self.bucket.objects.head(name) is not None:
                return
            listed = tuple(self.bucket.objects.list(layout.part_folder(key)))
            if len(listed) >= self.world and listed != checked:
                checked = listed
                mine, _ = self.parts(key)
                if len(mine) == self.world:
                    # every part is there: commit it ourselves (the rank that wrote the last part
                    # may have died before the step record); raises what keeps it from committing.
                    # No lock is needed: bucket GC keeps every value a pending part names.
                    if self.try_commit(key) != WAITING:
                        return
            left = deadline - time.monotonic()
            if left <= 0:
                mine, others = self.parts(key)
                missing = [r for r in range(self.world) if r not in mine]
                stale = f"; parts of other attempts: {others}" if others else ""
                raise CommitTimeoutError(
                    f"{describe_key(key)} did not commit in {self.bucket.url} within {timeout:g} s: the parts "
                    f"of ranks {missing} (attempt {self.attempt!r}) are missing{stale}"
                    if missing
                    else f"{describe_key(key)} did not commit in {self.bucket.url} within {timeout:g} s though "
                    "every part is there",
                    step=step_of(key),
                    missing=missing,
                )
            time.sleep(min(delay, left))
            delay = min(delay * 1.5, 1.0)


def classify_parts(
    bucket: Bucket, committed: set[bytes], *, grace: float, now: float | None = None
) -> tuple[list[PartObject], list[str]]:
    """``(live parts, part objects to delete)``: parts of committed steps and parts written more
    than ``grace`` seconds ago go; the rest are roots bucket GC must keep.

    Raises CorruptDataError for a damaged part (GC must see every root).
    """
    now = time.time() if now is None else now
    live: list[PartObject] = []
    doomed: list[str] = []
    for name, _ in bucket.objects.list(layout.PARTS):
        try:
            key, rank = layout.part_of(name)
        except CorruptDataError:
            continue  # not castore's: left alone
        if key in committed:
            doomed.append(name)
            continue
        try:
            raw = bucket.objects.get(name)
        except RemoteNotFoundError:
            continue
        part = layout.decode_part(raw, key, rank, f"part {bucket.url}/{name}")
        if now - part.written > grace:
            doomed.append(name)
        else:
            live.append(part)
    return live, doomed

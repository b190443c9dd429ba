"""Retention passes over one branch that cost what they delete, not what is kept.

A pass needs the :class:`~castore.maintenance.retention.StepInfo` of every step of the
branch.  :class:`Retainer` keeps them in memory as a
:class:`~castore.maintenance.retention.KeptIndex`, valid at one generation of the store:

* a pass inside the transaction that commits a new step uses the index if that
  transaction starts from the generation the index describes (``txn.generation - 1``:
  nobody else wrote since), and the step is an append: it decides the few candidates the
  new step can displace and deletes those;
* otherwise (another write came between: a tag, a delete, another ``Store`` of this
  process, another policy, a rollback or an overwrite) it reads every step's ``stepinfo`` record,
  a few dozen bytes each, and selects over all of them.  A step of an older store whose
  record lacks ``created`` takes it from its manifest.

A pass plans inside the transaction and changes nothing of its own; the index moves on
only in :meth:`Retainer.committed`, once the transaction committed (a write's ``fn`` may
be re-run, and a failed one commits nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import catalog
from ..format.keys import step_key
from ..format.manifest import decode_manifest
from ..storage.base import ReadTxn, WriteTxn
from .retention import Keep, KeptIndex, StepInfo


@dataclass(frozen=True, slots=True)
class Pass:
    """One planned retention pass, applied to the cache once its transaction committed."""

    base: KeptIndex | None  #: the index appended to (None: ``rebuilt`` replaces it)
    rebuilt: KeptIndex | None  #: a full pass's new index
    new: StepInfo | None  #: the step appended to ``base``
    doomed: tuple[int, ...]  #: the steps deleted
    generation: int  #: the generation the store is at once the pass committed


class Retainer:
    """Retention passes of ``branch`` of the store at ``path`` (see the module docstring)."""

    def __init__(self, branch: str, path: str):
        self._branch = branch
        self._path = path
        self._index: KeptIndex | None = None
        self._generation = -1  # the generation ``_index`` describes

    def in_commit(self, txn: WriteTxn, policy: Keep, new: StepInfo, *, moved: bool) -> Pass:
        """The pass in the transaction that put step ``new`` (its manifest and stepinfo);
        ``moved``: the transaction also moved or replaced steps.  Deletes in ``txn``."""
        index = self._index
        if not moved and index is not None and index.policy == policy and self._generation == txn.generation - 1:
            doomed = index.plan_append(new)
            if doomed is not None:
                self._delete(txn, doomed)
                return Pass(index, None, new, tuple(doomed), txn.generation)
        return self.full(txn, policy, wrote=True)

    def full(self, txn: WriteTxn, policy: Keep, *, wrote: bool = False) -> Pass:
        """A pass over every step of the branch, as ``txn`` shows it (``wrote``: ``txn``
        holds other writes).  Deletes in ``txn``."""
        untimed: list[int] = []
        rebuilt, doomed = KeptIndex.select(policy, step_infos(txn, self._branch, untimed).values())
        self._delete(txn, doomed)
        backfill = [step for step in untimed if step in rebuilt.infos]
        for step in backfill:  # so the next full pass need not decode their manifests again
            info = rebuilt.infos[step]
            catalog.put_stepinfo(txn, step_key(step, self._branch), info.created, info.metrics)
        # a write that changes nothing commits nothing: the store stays at the snapshot's generation
        generation = txn.generation if doomed or backfill or wrote else txn.generation - 1
        return Pass(None, rebuilt, None, tuple(doomed), generation)

    def _delete(self, txn: WriteTxn, doomed: list[int]) -> None:
        if doomed:
            catalog.delete_steps(txn, [step_key(step, self._branch) for step in doomed], self._path)

    def committed(self, done: Pass) -> None:
        """``done``'s transaction committed: the cache now describes the store after it."""
        if done.rebuilt is not None:
            self._index, self._generation = done.rebuilt, done.generation
        elif done.base is self._index and done.base is not None and done.new is not None:
            done.base.append(done.new, list(done.doomed))
            self._generation = done.generation
        else:  # the cache moved on meanwhile (cannot happen with one saver per store): start again
            self._index = None

    def unchanged(self, before: int, after: int) -> None:
        """The commits from generation ``before`` to ``after`` changed no step, stepinfo
        record or tag (a garbage collection with every other write held off)."""
        if self._generation == before:
            self._generation = after


def step_infos(txn: ReadTxn, branch: str, untimed: list[int] | None = None) -> dict[int, StepInfo]:
    """What retention needs to know of every step of ``branch``, from the stepinfo records.

    A step whose record lacks ``created`` (written before format 4) takes it from its
    manifest, which is decoded for that alone; such steps are appended to ``untimed``.
    """
    tagged = set(catalog.tags(txn).values())
    infos = {}
    for step, raw in catalog.branch_manifests(txn, branch):
        key = step_key(step, branch)
        record = catalog.read_stepinfo(txn, key)
        created = record.created
        if created is None:
            created = decode_manifest(raw).created
            if untimed is not None:
                untimed.append(step)
        infos[step] = StepInfo(step, created, record.metrics, key in tagged)
    return infos

"""The maintainer: what changes what is kept.  Retention, GC, compaction, accounting,
deletes, tags and branches, for one ``Store`` (one branch).

Everything that frees chunks runs *quiesced* (writer lock held, no save being captured,
none in flight) through the gate of every saver on the backend (``SharedGate``: another
``Store`` on the same path may be saving), and never frees ids a save may reuse (the
writer state's pins; see :mod:`castore.save.session`).

A save's cost must not grow with the steps kept, so after a commit:

* retention runs *inside* the transaction that commits the manifest
  (:meth:`Maintainer.retain_in_commit`), from the :class:`~castore.maintenance.retainer.Retainer`'s
  index of the kept steps: while nobody else wrote, a pass decides the few steps the new
  one can displace and deletes those, never reading the kept steps.  After another write
  (a tag, a GC, another ``Store`` of this process) the index is rebuilt from the
  ``stepinfo`` records, a few dozen bytes a step;
* garbage collection is amortized: it reads every kept manifest, so a save collects only
  once the trash and journal hold :data:`GC_MIN_ENTRIES` entries or :data:`GC_KEPT_SHARE`
  of the steps kept, whichever is more, or its saves wrote :data:`GC_WRITTEN_BYTES` since
  the last collection.  Freed space comes back a little later; nothing kept is ever freed
  and garbage is never lost (it stays findable in the trash and journal).  ``gc()``,
  ``retain()``, ``compact()`` and closing a store whose saves left garbage collect it all.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from typing import Protocol

from .. import catalog
from ..errors import StepNotFoundError, UsageError
from ..format.keys import branch_of, check_branch, check_step, step_key, step_of, tag_key
from ..format.schema import Table
from ..storage.base import Backend, WriteTxn
from ..storage.chunks import ChunkStore
from . import diffing
from . import gc as gc_
from . import usage as usage_
from .retainer import Pass, Retainer, step_infos
from .retention import Keep, StepInfo, policy_of

#: after a save, collect once the trash and journal hold at least this many entries...
GC_MIN_ENTRIES = 16
#: ... or this share of the steps kept (of every branch: a collection reads them all) ...
GC_KEPT_SHARE = 0.25
#: ... or once this store's saves wrote this many chunk bytes since the last collection
GC_WRITTEN_BYTES = 64 << 20


class SaveGate(Protocol):
    """What the maintainer needs of the saver (see :class:`castore.save.saver.Saver`)."""

    def quiesced(self) -> ContextManager[None]: ...
    def locked(self) -> ContextManager[None]: ...
    def quiet_after_commit(self) -> ContextManager[bool]: ...


class Maintainer:
    """Maintenance of one ``Store``: its ``branch`` of the store at ``path``."""

    def __init__(
        self,
        backend: Backend,
        chunks: ChunkStore,
        *,
        gate: SaveGate,
        pinned_ids: Callable[[], set],
        branch: str,
        path: str,
        keep: Keep | None,
    ):
        self._backend = backend
        self._chunks = chunks
        self._gate = gate
        self._pinned_ids = pinned_ids
        self._branch = branch
        self._path = path
        self.keep = keep
        self._retainer = Retainer(branch, path)
        self._written = 0  # chunk bytes this store's saves wrote since the last collection
        self._owes_gc = False  # a save left garbage for a later collection

    # -- retention and garbage collection ----------------------------------------------------

    def retain(self, keep=None) -> list[int]:
        policy = policy_of(keep) if keep is not None else self.keep
        if policy is None:
            raise UsageError("no retention policy: pass keep= here or to the Store")
        with self._gate.quiesced():
            done = self._backend.write(self._retainer.full, policy)
            self._retainer.committed(done)
            self._execute_gc(None)
            return list(done.doomed)

    def plan_retain(self, keep=None) -> list[int]:
        policy = policy_of(keep) if keep is not None else self.keep
        if policy is None:
            raise UsageError("no retention policy: pass keep= here or to the Store")
        with self._backend.read() as txn:
            infos = step_infos(txn, self._branch)
        kept = policy.select(list(infos.values()))
        return sorted(step for step in infos if step not in kept)

    def rollback(self, step: int) -> str | None:
        key = step_key(check_step(step), self._branch)
        with self._gate.quiesced():
            return self._backend.write(self._rollback, key, step)

    def _rollback(self, txn: WriteTxn, key: bytes, step: int) -> str | None:
        catalog.manifest_bytes(txn, key, self._path)  # raises StepNotFoundError
        return catalog.move_steps_after(txn, self._branch, step)

    def retain_in_commit(
        self, txn: WriteTxn, step: int, created: float, metrics: dict | None, moved: bool
    ) -> Pass | None:
        """Apply ``keep`` in the transaction that commits ``step`` of this branch.

        The saver calls it after putting the step's manifest and stepinfo record into
        ``txn``; ``moved`` says the transaction also moved or replaced steps (a rollback,
        an overwrite).  Returns what to hand to :meth:`after_commit` once the transaction
        committed.  Writes only through ``txn``, so it may be re-run with the transaction.
        """
        if self.keep is None:
            return None
        new = StepInfo(step, created, metrics or {}, False)  # a new step has no tag yet
        return self._retainer.in_commit(txn, self.keep, new, moved=moved)

    def after_commit(self, done: Pass | None, new_bytes: int) -> None:
        """After a save's commit: remember what retention left, collect if garbage is due.

        Collects only when nothing else is being saved (saves being captured or queued
        may reuse ids from baselines older than this commit); the last of them does it.
        """
        if done is not None:
            self._retainer.committed(done)
        if self.keep is None:
            return
        self._written += new_bytes
        with self._gate.quiet_after_commit() as quiet:
            if quiet and self._is_gc_due():
                self._execute_gc(None)

    def _is_gc_due(self) -> bool:
        with self._backend.read() as txn:
            pending = txn.count(Table.TRASH) + txn.count(Table.JOURNAL)
            kept = txn.count(Table.STEPS)
        self._owes_gc = pending > 0
        due = max(GC_MIN_ENTRIES, GC_KEPT_SHARE * kept)
        return self._owes_gc and (pending >= due or self._written >= GC_WRITTEN_BYTES)

    def close(self) -> None:
        """Collect the garbage this store's saves left for later (when this process is the
        writer and no save is in flight: the saver has waited for them)."""
        if not self._owes_gc or not self._backend.is_writer():
            return
        with self._gate.quiet_after_commit() as quiet:
            if quiet:
                self._execute_gc(None)

    def plan_gc(self, *, quiesce: bool = True, keep=None) -> gc_.GcPlan:
        """``quiesce=False`` for a read-only store (no save of its own to wait for);
        ``keep``: preview what retention with that policy and then GC would free."""
        doomed: frozenset[bytes] = frozenset()
        if keep is not None:
            doomed = frozenset(step_key(step, self._branch) for step in self.plan_retain(keep))
        if not quiesce:
            with self._backend.read() as txn:
                return gc_.plan(self._chunks, txn, self._pinned_ids(), doomed)
        with self._gate.quiesced():
            with self._backend.read() as txn:
                return gc_.plan(self._chunks, txn, self._pinned_ids(), doomed)

    def gc(self, plan: gc_.GcPlan | None = None, progress=None) -> gc_.GcPlan:
        with self._gate.quiesced():
            return self._execute_gc(plan, progress)

    def _plan_gc(self) -> gc_.GcPlan:
        with self._backend.read() as txn:
            return gc_.plan(self._chunks, txn, self._pinned_ids())

    def _execute_gc(self, plan: gc_.GcPlan | None, progress=None) -> gc_.GcPlan:
        self._backend.clear_stale_readers()  # a killed reader's slot would keep freed pages from reuse
        if plan is None or plan.generation != self._backend.generation() or plan.assumed_deleted:
            plan = self._plan_gc()
        if not plan.is_empty:
            # Other writes of this process are held off, so the retention index knows that
            # these commits changed no step, stepinfo record or tag (no rebuild after a GC).
            with self._backend.exclusive_writes():
                before = self._backend.generation()
                gc_.execute(self._backend, self._chunks, plan, progress)
                self._retainer.unchanged(before, self._backend.generation())
        self._written, self._owes_gc = 0, False
        return plan

    def compact(self) -> tuple[int, int]:
        with self._gate.quiesced():
            self._execute_gc(None)
            before = self._backend.file_bytes()
            self._backend.compact()
            self._retainer = Retainer(self._branch, self._path)  # compaction restarts the generations
            return before, self._backend.file_bytes()

    def accounting(self) -> list[gc_.StepAccount]:
        with self._backend.read() as txn:
            return [
                gc_.StepAccount(
                    s.step,
                    s.logical_bytes,
                    s.referenced_bytes,
                    s.unique_bytes,
                    s.referenced_bytes - s.unique_bytes,
                    s.branch,
                )
                for s in usage_.usage(self._chunks, txn).steps
            ]

    def usage(self) -> usage_.StoreUsage:
        with self._backend.read() as txn:
            return usage_.usage(self._chunks, txn)

    def diff(self, a: tuple, b: tuple) -> diffing.StepDiff:
        """``a``, ``b``: ``(step or tag or None, branch)``."""
        with self._backend.read() as txn:
            sides = []
            for step, branch in (a, b):
                key = catalog.locate(txn, step, branch, self._path)
                sides.append((branch_of(key), step_of(key), catalog.manifest(txn, key, self._path)))
            return diffing.diff(self._chunks, txn, sides[0], sides[1])

    def stats(self) -> gc_.StoreStats:
        with self._backend.read() as txn:
            return gc_.stats(self._chunks, txn, self._backend.file_bytes())

    def delete(self, steps: list[int]) -> None:
        keys = list(dict.fromkeys(step_key(check_step(step), self._branch) for step in steps))
        with self._gate.locked():
            self._backend.write(catalog.delete_steps, keys, self._path)

    # -- tags -------------------------------------------------------------------------------------

    def tag(self, name: str, step: int | str | None) -> int:
        key = tag_key(name)
        with self._gate.quiesced():
            return self._backend.write(self._put_tag, key, step)

    def _put_tag(self, txn: WriteTxn, key: bytes, step: int | str | None) -> int:
        target = catalog.locate(txn, step, self._branch, self._path)
        catalog.manifest_bytes(txn, target, self._path)  # raises StepNotFoundError
        txn.put(Table.TAGS, key, target)
        return step_of(target)

    def untag(self, name: str) -> None:
        key = tag_key(name)
        with self._gate.locked():
            self._backend.write(self._delete_tag, key, name)

    def _delete_tag(self, txn: WriteTxn, key: bytes, name: str) -> None:
        if not txn.delete(Table.TAGS, key):
            raise StepNotFoundError(f"no tag {name!r} in {self._path}")

    # -- branches -----------------------------------------------------------------------------------

    def fork(self, name: str, step: int | str | None) -> int:
        name = check_branch(name)
        with self._gate.quiesced():
            return self._backend.write(self._fork, name, step)

    def _fork(self, txn: WriteTxn, name: str, step) -> int:
        source = catalog.locate(txn, step, self._branch, self._path)
        catalog.manifest_bytes(txn, source, self._path)
        if catalog.latest_step(txn, name) is not None:
            raise UsageError(f"branch {name!r} exists in {self._path}; fork to a new name")
        catalog.copy_step(txn, source, step_key(step_of(source), name), is_move=False)
        return step_of(source)

    def delete_branch(self, name: str) -> list[int]:
        name = check_branch(name)
        if name == self._branch:
            raise UsageError(f"cannot delete branch {name!r}: this store is on it")
        with self._gate.locked():
            return self._backend.write(self._delete_branch, name)

    def _delete_branch(self, txn: WriteTxn, name: str) -> list[int]:
        steps = catalog.branch_steps(txn, name)
        if not steps:
            raise StepNotFoundError(f"no branch {name!r} in {self._path}")
        catalog.delete_steps(txn, [step_key(step, name) for step in steps], self._path)
        return steps

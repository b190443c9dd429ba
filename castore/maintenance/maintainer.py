"""The maintainer: what changes what is kept.  Retention, GC, compaction, accounting,
deletes, tags and branches, for one ``Store`` (one branch).

Everything that frees chunks runs *quiesced* (writer lock held, no save being captured,
none in flight) through the saver's gate, and never frees ids a save may reuse (the
writer state's pins; see :mod:`castore.save.session`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from typing import Protocol

from .. import catalog
from ..errors import StepNotFoundError, UsageError
from ..format.keys import check_branch, check_step, step_key, step_of, tag_key
from ..format.manifest import decode_manifest
from ..format.schema import Table
from ..storage.base import Backend, ReadTxn, WriteTxn
from ..storage.chunks import ChunkStore
from . import gc as gc_
from .retention import Keep, StepInfo, policy_of


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

    # -- retention and garbage collection ----------------------------------------------------

    def retain(self, keep=None) -> list[int]:
        policy = policy_of(keep) if keep is not None else self.keep
        if policy is None:
            raise UsageError("no retention policy: pass keep= here or to the Store")
        with self._gate.quiesced():
            doomed = self._delete_unkept(policy)
            self._execute_gc(None)
            return doomed

    def retain_after_commit(self) -> None:
        """Apply ``keep`` after a commit, unless a save is being captured or is queued."""
        if self.keep is None:
            return
        with self._gate.quiet_after_commit() as quiet:
            if quiet and self._delete_unkept(self.keep):
                self._execute_gc(None)

    def _delete_unkept(self, policy: Keep) -> list[int]:
        """Move the steps ``policy`` does not keep to the trash; returns them."""
        with self._backend.read() as txn:
            infos = step_infos(txn, self._branch)
        doomed = sorted({i.step for i in infos} - policy.select(infos))
        if doomed:
            keys = [step_key(step, self._branch) for step in doomed]
            self._backend.write(catalog.delete_steps, keys, self._path)
        return doomed

    def plan_gc(self) -> gc_.GcPlan:
        with self._gate.quiesced():
            return self._plan_gc()

    def gc(self, plan: gc_.GcPlan | None = None) -> gc_.GcPlan:
        with self._gate.quiesced():
            return self._execute_gc(plan)

    def _plan_gc(self) -> gc_.GcPlan:
        with self._backend.read() as txn:
            return gc_.plan(self._chunks, txn, self._pinned_ids())

    def _execute_gc(self, plan: gc_.GcPlan | None) -> gc_.GcPlan:
        self._backend.clear_stale_readers()  # a killed reader's slot would keep freed pages from reuse
        if plan is None or plan.generation != self._backend.generation():
            plan = self._plan_gc()
        if not plan.is_empty:
            gc_.execute(self._backend, self._chunks, plan)
        return plan

    def compact(self) -> tuple[int, int]:
        with self._gate.quiesced():
            self._execute_gc(None)
            before = self._backend.file_bytes()
            self._backend.compact()
            return before, self._backend.file_bytes()

    def accounting(self) -> list[gc_.StepAccount]:
        with self._backend.read() as txn:
            return gc_.account(self._chunks, txn)

    def stats(self) -> gc_.StoreStats:
        with self._backend.read() as txn:
            return gc_.stats(self._chunks, txn, self._backend.file_bytes())

    def delete(self, step: int) -> None:
        key = step_key(check_step(step), self._branch)
        with self._gate.locked():
            self._backend.write(catalog.delete_steps, [key], self._path)

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
        catalog.copy_step(txn, source, step_key(step_of(source), name))
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


def step_infos(txn: ReadTxn, branch: str) -> list[StepInfo]:
    """What retention needs to know of every step of ``branch``."""
    tagged = set(catalog.tags(txn).values())
    infos = []
    for step, raw in catalog.branch_manifests(txn, branch):
        key = step_key(step, branch)
        created = decode_manifest(raw).created
        infos.append(StepInfo(step, created, catalog.read_metrics(txn, key), key in tagged))
    return infos

"""The Store methods that change what is kept: retention, garbage collection, compaction,
accounting, tags and branches.

A mixin of :class:`~castore.store.Store`, split out to keep each module readable; it uses
the store's blob store, locks and step keys, and adds no state of its own.
"""

from __future__ import annotations

import contextlib

from . import catalog
from . import gc as gc_
from .errors import StepNotFoundError, UsageError
from .ids import split_ids
from .retention import Keep, policy_of

step_key, step_of, branch_of = catalog.step_key, catalog.step_of, catalog.branch_of
check_step = catalog.check_step


class Maintenance:
    """Retention, GC, compaction, accounting, tags and branches (mixed into Store)."""

    # -- retention and garbage collection ----------------------------------------------------

    @contextlib.contextmanager
    def _maintaining(self):
        """Writer lock held, no save being captured, none in flight: GC may run."""
        with self._save_lock:
            self._take_writer_lock()
            self.wait()
            yield

    def retain(self, keep=None) -> list[int]:
        """Delete the steps ``keep`` (default: the store's policy) does not keep, then collect.

        Returns the deleted steps.  The latest and tagged steps are always kept.
        """
        policy = policy_of(keep) if keep is not None else self.keep
        if policy is None:
            raise UsageError("no retention policy: pass keep= here or to the Store")
        with self._maintaining():
            doomed = self._delete_unkept(policy)
            self._execute_gc(None)
            return doomed

    def _retain_after_commit(self) -> None:
        """Apply ``keep`` after a commit, unless a save is being captured or is queued.

        Those may reuse ids (from baselines older than this commit) that GC would free; the
        commit of the last of them retains instead.
        """
        if self.keep is None or not self._save_lock.acquire(blocking=False):
            return
        try:
            if self._background is not None and self._background.in_flight() > 1:
                return
            if self._delete_unkept(self.keep):
                self._execute_gc(None)
        finally:
            self._save_lock.release()

    def _delete_unkept(self, policy: Keep) -> list[int]:
        """Move the steps ``policy`` does not keep to the trash; returns them."""
        with self._blobs.read() as txn:
            infos = catalog.step_infos(txn, self._blobs, self.branch)
        doomed = sorted({i.step for i in infos} - policy.select(infos))
        if doomed:
            self._blobs.write(self._delete_steps, [self._key(step) for step in doomed])
        return doomed

    def plan_gc(self) -> gc_.GcPlan:
        """What :meth:`gc` would free now: steps, chunks, pages, bytes (a dry run)."""
        with self._maintaining():
            return self._plan_gc()

    def gc(self, plan: gc_.GcPlan | None = None) -> gc_.GcPlan:
        """Free the chunks and pages no kept step references; returns what was freed.

        Crash-safe (a kill loses no chunk of a kept step; what is left is found by the next
        GC), never frees a chunk a save in this process may reuse, and readers keep
        working.  A ``plan`` from :meth:`plan_gc` is re-planned if the store changed since.
        """
        with self._maintaining():
            return self._execute_gc(plan)

    def _plan_gc(self) -> gc_.GcPlan:
        with self._blobs.read() as txn:
            return gc_.plan(self._blobs, txn, self._blobs.pinned_ids())

    def _execute_gc(self, plan: gc_.GcPlan | None) -> gc_.GcPlan:
        self._blobs.clear_stale_readers()  # a killed reader's slot would keep freed pages from reuse
        if plan is None or plan.generation != self._blobs.env.info()["last_txnid"]:
            plan = self._plan_gc()
        if not plan.is_empty:
            gc_.execute(self._blobs, plan)
        return plan

    def compact(self) -> tuple[int, int]:
        """Collect garbage, then rewrite the data file without free pages.

        Returns the disk bytes ``(before, after)``.  Needs the store to itself: raises
        :class:`StoreBusyError` if another process has it open, :class:`StoreLockedError` if
        another process writes it.  A kill at any instant leaves a loadable store.
        """
        with self._maintaining():
            self._execute_gc(None)
            before = self._blobs.file_bytes()
            self._blobs.compact()
            return before, self._blobs.file_bytes()

    def accounting(self) -> list[gc_.StepAccount]:
        """Per kept step: logical bytes, stored bytes it references, bytes only it references
        (what deleting it would free) and bytes it shares.  Reads manifests, not chunks."""
        self._check_open()
        with self._blobs.read() as txn:
            return gc_.account(self._blobs, txn)

    def pinned_ids(self, session) -> list[bytes]:
        """Chunk ids remembered by this store's baselines in ``session`` (GC keeps them)."""
        ids = []
        for baseline in list(self._baselines.values()):
            if baseline.owner is session:
                ids += split_ids(baseline.ids)
        return ids

    # -- tags and metrics ---------------------------------------------------------------------

    def tag(self, name: str, step: int | str | None = None) -> int:
        """Name ``step`` (default: latest); tagged steps survive retention. Returns the step."""
        key = catalog.tag_key(name)
        with self._maintaining():
            return self._blobs.write(self._put_tag, key, step)

    def _put_tag(self, txn, key: bytes, step: int | str | None) -> int:
        target = self._locate(txn, step)
        self._manifest_bytes(txn, target)  # raises StepNotFoundError
        txn.put(key, target, db=self._blobs.dbs["tags"])
        return step_of(target)

    def untag(self, name: str) -> None:
        key = catalog.tag_key(name)
        with self._save_lock:
            self._take_writer_lock()
            self._blobs.write(self._delete_tag, key, name)

    def _delete_tag(self, txn, key: bytes, name: str) -> None:
        if not txn.delete(key, db=self._blobs.dbs["tags"]):
            raise StepNotFoundError(f"no tag {name!r} in {self.path}")

    def tags(self) -> dict[str, int]:
        """``{tag: step}`` of the tags naming steps of this branch."""
        self._check_open()
        with self._blobs.read() as txn:
            tagged = catalog.tags(txn, self._blobs)
        return {name: step_of(key) for name, key in tagged.items() if branch_of(key) == self.branch}

    def metrics(self, step: int | str | None = None) -> dict:
        """The metrics recorded with a step (default: latest)."""
        self._check_open()
        with self._blobs.read() as txn:
            return catalog.read_metrics(txn, self._blobs, self._locate(txn, step))

    # -- branches -----------------------------------------------------------------------------------

    def branches(self) -> list[str]:
        """Branches holding steps (``main`` always), main first, then by name."""
        self._check_open()
        with self._blobs.read() as txn:
            return catalog.branch_names(txn, self._blobs)

    def continue_from(self, step: int) -> None:
        """Make the next save continue the lineage of ``step`` (of this branch).

        When that save commits, the branch's steps after ``step`` move to a new branch
        ``<branch>-abandoned-<step>`` in the same transaction (metrics and tags follow
        them), so the old future stays reachable but is not mixed into this one.
        ``Checkpoint.load`` calls this; a save that commits nothing keeps it pending.
        """
        self._continue_from = check_step(step)

    @property
    def continuing_from(self) -> int | None:
        """The step the next save continues from, if :meth:`continue_from` set one."""
        return self._continue_from

    def fork(self, name: str, step: int | str | None = None) -> int:
        """Start branch ``name`` at ``step`` (default: latest; a tag may name another branch).

        Writes no chunk: the new branch's first step shares the manifest (and metrics) of
        ``step``.  Open it with ``Store(path, branch=name)``.  Raises UsageError if the
        branch has steps already, StepNotFoundError.  Returns the step.
        """
        name = catalog.check_branch(name)
        with self._save_lock:
            self._take_writer_lock()
            self.wait()
            return self._blobs.write(self._fork, name, step)

    def _fork(self, txn, name: str, step) -> int:
        source = self._locate(txn, step)
        self._manifest_bytes(txn, source)
        if catalog.latest_step(txn, self._blobs, name) is not None:
            raise UsageError(f"branch {name!r} exists in {self.path}; fork to a new name")
        catalog.copy_step(txn, self._blobs, source, step_key(step_of(source), name))
        return step_of(source)

    def delete_branch(self, name: str) -> list[int]:
        """Delete every step of branch ``name``; returns them.  Chunks stay until :meth:`gc`.

        Raises UsageError for this store's own branch or if a tag names one of its steps,
        StepNotFoundError if the branch has no steps.
        """
        name = catalog.check_branch(name)
        if name == self.branch:
            raise UsageError(f"cannot delete branch {name!r}: this store is on it")
        with self._save_lock:
            self._take_writer_lock()
            return self._blobs.write(self._delete_branch, name)

    def _delete_branch(self, txn, name: str) -> list[int]:
        steps = list(catalog.branch_items(txn, self._blobs, name, values=False))
        if not steps:
            raise StepNotFoundError(f"no branch {name!r} in {self.path}")
        self._delete_steps(txn, [step_key(step, name) for step in steps])
        return steps

"""The elements-style facade: register components by attribute, save and load them.

``cp.agent = agent`` registers anything with ``save() -> state`` and ``load(state)``;
any other value is stored as it is and, after a load, the attribute holds the loaded
value.  ``save()`` may return a generator of shards; ``load`` then gets an iterator.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from .errors import SelectionError, UsageError
from .format import codec
from .save.background import SaveHandle
from .save.saver import SaveResult
from .store import Store
from .tracking import TrackedArray

__all__ = ["Checkpoint", "Counter", "Every"]

log = logging.getLogger(__name__)


def _is_component(value) -> bool:
    return callable(getattr(value, "save", None)) and callable(getattr(value, "load", None))


class Checkpoint:
    """Components registered as attributes, saved as steps of a :class:`Store`.

    ``Checkpoint(path)`` opens (or creates) the store at ``path``.  Keyword arguments go
    to :class:`Store`: ``keep`` (an int N keeps the last N steps, or ``castore.Keep(...)``),
    ``compression`` (``"auto"``, ``"none"``, ``"zstd:LEVEL"``), ``verify``, ``allow_pickle``,
    ``chunk_bytes``, ``readonly``, ``max_pending``,
    ``check_tracking``, ``branch`` (default ``"main"``: the line of steps this checkpoint
    saves to and lists).

    Rollback: after ``load(step=k)`` of a step before the branch's latest, the next save
    continues from k, and the steps after k move to branch ``<branch>-abandoned-<k>``
    when it commits (see :meth:`Store.continue_from`).
    """

    def __init__(self, path: str | os.PathLike, **store_options):
        object.__setattr__(self, "_components", {})
        object.__setattr__(self, "_store", Store(path, **store_options))
        object.__setattr__(self, "_options", store_options)
        object.__setattr__(self, "_last_submitted", None)
        object.__setattr__(self, "_submitted_head", False)  # _last_submitted will be the branch's latest

    # -- components as attributes ---------------------------------------------------------------

    def __setattr__(self, name: str, value) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        elif hasattr(type(self), name):
            raise UsageError(f"{name!r} is a Checkpoint method; register the component under another name")
        else:
            self._components[name] = value

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._components[name]
        except KeyError:
            raise AttributeError(f"no component {name!r} is registered on this Checkpoint") from None

    def __delattr__(self, name: str) -> None:
        if self._components.pop(name, None) is None:
            raise AttributeError(name)

    def __contains__(self, name: str) -> bool:
        return name in self._components

    @property
    def store(self) -> Store:
        return self._store

    @property
    def path(self) -> str:
        return self._store.path

    # -- saving -------------------------------------------------------------------------------------

    def save(
        self,
        step: int | None = None,
        *,
        keys=None,
        overwrite: bool = False,
        block: bool = True,
        metrics: dict | None = None,
    ) -> SaveResult | SaveHandle:
        """Save the registered components (or ``keys``) as one step.

        The step number is ``step`` if given, else ``int()`` of the state of a component
        named ``step``, else one past the latest step (counting saves still in flight).
        Saving the same state again under an existing step does nothing; different state
        under it needs ``overwrite=True``.

        With ``block=True`` (default) returns the :class:`SaveResult` once committed.  With
        ``block=False`` the state is captured (changed chunks copied) and a
        :class:`SaveHandle` returned at once; the step commits in the background.  At most
        ``max_pending`` (default 1) saves are in flight: a further save first waits for the
        oldest.  An error of a background save is raised by ``handle.result()``, or else by
        the next ``save``, ``wait`` or ``close``.

        ``metrics`` (``{name: number}``) are recorded with the step, for
        ``keep=castore.Keep(best=N, metric=name)``.  With ``keep``, steps the policy does
        not keep are deleted and their chunks freed after the commit.
        """
        names = self._names(keys)
        states = {name: self._state_of(name) for name in names}
        if step is None:
            step = self._step_number(states)
        if not block:
            continuing = self._store.continuing_from is not None
            handle = self._store.save_async(step, states, overwrite=overwrite, metrics=metrics)
            object.__setattr__(self, "_last_submitted", handle.step)
            object.__setattr__(self, "_submitted_head", continuing or self._submitted_head)
            return handle
        result = self._store.save(step, states, overwrite=overwrite, metrics=metrics)
        log.info(
            "saved step %d: %d new of %d logical bytes in %.3fs",
            result.step,
            result.new_bytes,
            result.logical_bytes,
            result.seconds,
        )
        return result

    def wait(self) -> None:
        """Wait for background saves; raise the first error no handle has shown yet."""
        self._store.wait()

    def _names(self, keys) -> list[str]:
        if keys is None:
            if not self._components:
                raise UsageError("no components are registered: assign some first (cp.agent = agent)")
            return list(self._components)
        keys = [keys] if isinstance(keys, str) else list(keys)
        unknown = [k for k in keys if k not in self._components]
        if unknown:
            raise UsageError(f"components {unknown} are not registered on this Checkpoint")
        return keys

    def _state_of(self, name: str):
        value = self._components[name]
        return value.save() if _is_component(value) else value

    def _step_number(self, states: dict) -> int:
        if "step" in states:
            state = states["step"]
            try:
                return int(state)
            except (TypeError, ValueError):
                raise UsageError(
                    f"the 'step' component saved {type(state).__name__}, not a number; pass save(step=...)"
                ) from None
        if self._store.continuing_from is not None:  # after a rollback: the loaded step's successor
            return self._store.continuing_from + 1
        latest = self._store.latest()
        if self._last_submitted is not None and self._store.in_flight():
            if self._submitted_head:  # a rollback save in flight: latest() still shows the old future
                return self._last_submitted + 1
            latest = self._last_submitted if latest is None else max(latest, self._last_submitted)
        else:
            object.__setattr__(self, "_submitted_head", False)
        return 0 if latest is None else latest + 1

    # -- loading ------------------------------------------------------------------------------------

    def load(
        self,
        path: str | os.PathLike | None = None,
        *,
        step: int | None = None,
        keys=None,
        regex: str | None = None,
        verify: bool | None = None,
    ) -> int:
        """Load a step (default: latest) into the registered components; returns the step.

        ``step`` is a number of this branch or a tag (of any branch).  ``path`` loads from
        another store.  ``keys`` picks components (default: every registered one).
        ``regex`` picks leaves by path (``re.match``); the rest keep their current values.
        Raises StepNotFoundError, SelectionError, IntegrityError.

        Loading every registered component of a step of this branch makes the next save
        continue from it: if it is not the branch's latest, the later steps move to an
        automatic branch when that save commits (nothing moves if no save follows).
        """
        if path is None or os.path.realpath(path) == os.path.realpath(self.path):
            self._store.wait(raise_errors=False)  # load what was saved; errors stay pending
            return self._load_from(self._store, step, keys, regex, verify)
        with Store(path, create=False, allow_pickle=self._options.get("allow_pickle", False)) as other:
            return self._load_from(other, step, keys, regex, verify)

    def _load_from(self, store: Store, step, keys, regex, verify) -> int:
        if keys is None:
            keys = list(self._components)
            if not keys:
                raise UsageError("no components are registered: assign some first, or pass keys=")
        keys = [keys] if isinstance(keys, str) else list(keys)
        branch, step = store.locate(step)  # latest, a tag, or the number itself
        into = None if regex is not None else self._targets(keys)
        data = store.load(step, keys=keys, regex=regex, verify=verify, branch=branch, into=into)
        if regex is not None:
            data = self._merge_selected(data, regex)
        for name, state in data.items():
            self._apply(name, state)
        if store is self._store and branch == store.branch and regex is None and set(keys) >= set(self._components):
            store.continue_from(step)
            object.__setattr__(self, "_submitted_head", False)
        log.info("loaded step %d of branch %s (%s) from %s", step, branch, ", ".join(data), store.path)
        return step

    def _targets(self, keys) -> dict | None:
        """Restore targets of the components that offer them (``load_targets()``)."""
        into = {}
        for name in keys:
            hook = getattr(self._components.get(name), "load_targets", None)
            if _is_component(self._components.get(name)) and callable(hook):
                target = hook()
                if target is not None:
                    into[name] = target
        return into or None

    def _apply(self, name: str, state) -> None:
        value = self._components.get(name)
        if _is_component(value):
            value.load(state)
        else:
            self._components[name] = state

    def _merge_selected(self, data: dict, regex: str) -> dict:
        """Merge each component's selected leaves into its current state, checking fit."""
        merged, problems = {}, []
        for name, selected in data.items():
            if name not in self._components:
                raise UsageError(f"regex loading needs a current state: register {name!r} first")
            current = self._state_of(name)
            if not isinstance(current, (dict, list, tuple)):
                raise UsageError(
                    f"regex loading of {name!r} needs a dict/list state, got {type(current).__name__} "
                    "(sharded components load whole: drop regex= or keys= it out)"
                )
            have = dict(codec.leaves(current))
            for path, value in selected.items():
                problem = _mismatch(path, have, value)
                if problem:
                    problems.append(f"{name}/{path}: {problem}")
            merged[name] = codec.replace_leaves(current, selected)
        if problems:
            raise SelectionError(f"regex {regex!r} selects leaves that do not fit: " + "; ".join(problems[:50]))
        return {name: state for name, state in merged.items() if data[name]}

    def load_or_save(self) -> int:
        """Load the latest step if the store has one, else save the current state as a step."""
        if self.exists():
            return self.load()
        return self.save().step

    # -- listing and lifecycle -------------------------------------------------------------------------

    def steps(self) -> list[int]:
        return self._store.steps()

    @property
    def branch(self) -> str:
        return self._store.branch

    def branches(self) -> list[str]:
        return self._store.branches()

    def fork(self, name: str, step: int | str | None = None) -> int:
        """Start branch ``name`` at ``step`` (default: latest) without writing chunks; returns
        the step.  Continue on it with ``Checkpoint(path, branch=name)``."""
        return self._store.fork(name, step)

    def delete_branch(self, name: str) -> list[int]:
        """Delete the steps of another branch (chunks are freed by the next GC)."""
        return self._store.delete_branch(name)

    def tag(self, name: str, step: int | None = None) -> int:
        """Name a step (default: latest); ``load(step=name)`` loads it, retention keeps it."""
        return self._store.tag(name, step)

    def untag(self, name: str) -> None:
        self._store.untag(name)

    def tags(self) -> dict[str, int]:
        return self._store.tags()

    def retain(self, keep=None) -> list[int]:
        """Apply ``keep`` (default: this Checkpoint's) now; returns the deleted steps."""
        return self._store.retain(keep)

    def plan_gc(self):
        """What :meth:`gc` would free (a dry run)."""
        return self._store.plan_gc()

    def gc(self, plan=None):
        """Free chunks no kept step references; returns what was freed."""
        return self._store.gc(plan)

    def latest(self) -> int | None:
        return self._store.latest()

    def exists(self, step: int | None = None) -> bool:
        """Whether the store has any step (or the given one)."""
        return self._store.latest() is not None if step is None else self._store.has_step(step)

    def close(self) -> None:
        """Wait for background saves, then close the store (raising a save error nobody saw)."""
        self._store.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _mismatch(path: str, have: dict, value) -> str | None:
    if path not in have:
        return "not in the current state"
    current = have[path]
    if isinstance(current, TrackedArray):
        current = np.asarray(current)
    if isinstance(current, np.ndarray) or isinstance(value, np.ndarray):
        cur_shape, cur_dtype = np.shape(current), getattr(current, "dtype", type(current).__name__)
        if not isinstance(value, np.ndarray) or value.shape != cur_shape or value.dtype != cur_dtype:
            new = (value.shape, value.dtype) if isinstance(value, np.ndarray) else type(value).__name__
            return f"stored {new} vs current {(cur_shape, cur_dtype)}"
    elif type(current) is not type(value):
        return f"stored {type(value).__name__} vs current {type(current).__name__}"
    return None


class Every:
    """``should_save = Every(steps=10_000)`` or ``Every(seconds=900)``: the save_every habit.

    Calling it with the current step returns True on the first call (unless
    ``initial=False``) and then each time the step has advanced by ``steps`` or
    ``seconds`` have passed since it last returned True; with both, whichever comes first.
    """

    def __init__(self, steps: int | None = None, seconds: float | None = None, *, initial: bool = True):
        if steps is None and seconds is None:
            raise UsageError("Every needs steps= or seconds=")
        if (steps is not None and steps < 0) or (seconds is not None and seconds < 0):
            raise UsageError("Every intervals must not be negative")
        self.steps, self.seconds, self.initial = steps, seconds, initial
        self._last_step: int | None = None
        self._last_time: float | None = None

    def __call__(self, step: int | None = None) -> bool:
        if self.steps and step is None:
            raise UsageError("Every(steps=...) must be called with the current step")
        now = time.monotonic()
        if self._last_time is None:
            self._last_time, self._last_step = now, None if step is None else int(step)
            return self.initial
        fire = False
        if self.steps and step is not None:  # not None: checked above
            step = int(step)
            if self._last_step is None:
                self._last_step = step
            elif step >= self._last_step + self.steps:
                self._last_step += self.steps * ((step - self._last_step) // self.steps)
                fire = True
        if self.seconds and now >= self._last_time + self.seconds:
            fire = True
        if fire:
            self._last_time = now
        return fire


class Counter:
    """A step counter component: ``int(counter)``, ``counter.increment()``, save/load."""

    def __init__(self, value: int = 0):
        self.value = int(value)

    def increment(self, amount: int = 1) -> None:
        self.value += amount

    def __int__(self) -> int:
        return self.value

    def __index__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"Counter({self.value})"

    def save(self) -> int:
        return self.value

    def load(self, value) -> None:
        self.value = int(value)

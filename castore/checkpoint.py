"""The elements-style facade: register components by attribute, save and load them.

``cp.agent = agent`` registers anything with ``save() -> state`` and ``load(state)``, or
``state_dict()`` and ``load_state_dict(state)`` (a torch module, optimizer or scheduler,
loaded in place); any other value is stored as it is and, after a load, the attribute
holds the loaded value.  ``save()`` may return a generator of shards; ``load`` then gets
an iterator.  The signature and habits are those of ``elements.Checkpoint`` (DreamerV3):
``Checkpoint(directory, keep=..., step=..., write=...)``, ``save(path, keys)``,
``load(path, keys)``, ``load_or_save()``, and :func:`load` for ``from_checkpoint``.

The module is past ~400 lines on purpose: it is the public facade users read, one
documented method per operation, and the component protocol, partial saves and regex
merges each need the others' state; the training loop's clocks live in ``castore.loop``.
"""

from __future__ import annotations

import collections
import logging
import os

import numpy as np

from .errors import SelectionError, StoreNotFoundError, UsageError
from .format import codec, frameworks
from .save.background import SaveHandle
from .save.saver import SaveResult
from .store import Store
from .tracking import TrackedArray

__all__ = ["Checkpoint", "load"]

log = logging.getLogger(__name__)


def _has(value, *names: str) -> bool:
    return all(callable(getattr(value, name, None)) for name in names)


def _is_component(value) -> bool:
    return _has(value, "save", "load") or _has(value, "state_dict", "load_state_dict")


def _save_state(value):
    return value.save() if _has(value, "save", "load") else value.state_dict()


def _load_state(value, state) -> None:
    if _has(value, "save", "load"):
        value.load(state)
        return
    metadata = getattr(value.state_dict(), "_metadata", None)  # a module's layer versions
    if metadata is not None and isinstance(state, dict):
        state = collections.OrderedDict(state)
        state._metadata = metadata
    value.load_state_dict(state)


def _restore_target(value):
    """Where a load can put a component's arrays: its ``load_targets()``, or the live
    tensors of a ``state_dict()`` (a torch module's parameters, filled in place)."""
    if _has(value, "save", "load"):
        hook = getattr(value, "load_targets", None)
        return hook() if callable(hook) else None
    return value.state_dict()


def _structure_of(tree):
    """A plain value as a restore target: its NamedTuple and dataclass types and jax
    shardings, but not its arrays: a load that fails half-way leaves the value as it was."""
    items = codec.children(tree)
    if items is None:
        torch = frameworks.torch_module()
        if isinstance(tree, (np.ndarray, TrackedArray)) or (torch is not None and isinstance(tree, torch.Tensor)):
            return None
        return tree
    return codec.rebuild(tree, [_structure_of(child) for _, child in items])


def _fspath(path) -> str:
    """``str``, ``os.PathLike`` and ``elements.Path`` alike."""
    try:
        return os.fspath(path)
    except TypeError:
        raise UsageError(f"a store path is a str or os.PathLike, got {type(path).__name__}") from None


class Checkpoint:
    """Components registered as attributes, saved as steps of a :class:`Store`.

    ``Checkpoint(directory)`` opens (or creates) the store at ``directory`` (a str, any
    ``os.PathLike``, an ``elements.Path``).  ``Checkpoint()`` has no store of its own:
    it loads from ``load(path)`` and saves only with ``save(path)``, as elements' does.
    ``step`` is where save numbers come from (an ``elements.Counter``, a
    :class:`Counter`, anything ``int()`` takes) unless ``save(step=...)`` says.  With
    ``write=False`` saves call every component's ``save()`` and write nothing, and the
    store is opened read-only if it exists (a non-zero host of a multi-host run).
    Unlike elements (``keep=1``), castore keeps every step unless ``keep`` says
    otherwise: its saves cost only what changed.  ``map_location`` places loaded torch
    tensors (see :meth:`Store.load`).

    Keyword arguments go to :class:`Store`: ``keep`` (an int N keeps the last N steps,
    or ``castore.Keep(...)``),
    ``compression`` (``"auto"``, ``"none"``, ``"zstd:LEVEL"``), ``verify``, ``allow_pickle``,
    ``chunk_bytes``, ``readonly``, ``max_pending``,
    ``check_tracking``, ``branch`` (default ``"main"``: the line of steps this checkpoint
    saves to and lists), ``mirror`` (``"s3://bucket/prefix"``: uploads in the background;
    ``load_or_save`` on an empty store resumes from the bucket) and ``mirror_options``.

    Rollback: after ``load(step=k)`` of a step before the branch's latest, the next save
    continues from k, and the steps after k move to branch ``<branch>-abandoned-<k>``
    when it commits (see :meth:`Store.continue_from`).
    """

    def __init__(
        self,
        directory: str | os.PathLike | None = None,
        keep=None,
        step=None,
        write: bool = True,
        *,
        map_location=None,
        **store_options,
    ):
        object.__setattr__(self, "_components", {})
        object.__setattr__(self, "_options", store_options)
        object.__setattr__(self, "_counter", step)
        object.__setattr__(self, "_write", bool(write))
        object.__setattr__(self, "_map_location", map_location)
        object.__setattr__(self, "_last_submitted", None)
        object.__setattr__(self, "_submitted_head", False)  # _last_submitted will be the branch's latest
        object.__setattr__(self, "_directory", None if directory is None else _fspath(directory))
        object.__setattr__(self, "_opened", None)
        if keep is not None:
            store_options["keep"] = keep
        if self._directory is not None and self._write:
            object.__setattr__(self, "_opened", Store(self._directory, **store_options))

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
        if name not in self._components:
            raise AttributeError(name)
        del self._components[name]

    def __contains__(self, name: str) -> bool:
        return name in self._components

    @property
    def _store(self) -> Store:
        """The store of this checkpoint; with ``write=False`` opened read-only when first
        needed (it may not exist yet)."""
        if self._opened is None:
            if self._directory is None:
                raise UsageError("this Checkpoint has no directory: pass load(path) / save(path), or Checkpoint(dir)")
            # a host that does not write does not upload either: its mirror= is for the writer's
            options = {k: v for k, v in self._options.items() if k not in ("mirror", "mirror_options")}
            options.update(readonly=True, create=False)
            object.__setattr__(self, "_opened", Store(self._directory, **options))
        return self._opened

    @property
    def store(self) -> Store:
        return self._store

    @property
    def path(self) -> str | None:
        return self._directory

    # -- saving -------------------------------------------------------------------------------------

    def save(
        self,
        path: str | os.PathLike | None = None,
        keys=None,
        *,
        step: int | None = None,
        overwrite: bool = False,
        block: bool = True,
        metrics: dict | None = None,
    ) -> SaveResult | SaveHandle | None:
        """Save the registered components (or ``keys``) as one step.

        ``path`` (a str or PathLike; an int is taken as ``step``) saves to the store there instead (created if missing) and changes
        nothing about this checkpoint's own.  With ``keys`` (a partial save) the other
        registered components are carried over from the branch's latest step, by
        reference, so every step holds the whole state and ``load_or_save()`` always
        resumes all of it; if the latest step lacks one of them (or there is none), the
        partial save is refused with :class:`UsageError`: save the whole state once first.

        The step number is ``step`` if given, else ``int()`` of the checkpoint's
        ``step=`` counter, else of the state of a component named ``step``, else one past
        the latest step (counting saves still in flight).
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
        if isinstance(path, int) and not isinstance(path, bool):  # save(7): castore 0.5's spelling
            if step is not None:
                raise UsageError("save(path, keys, step=...): pass the step number once")
            path, step = None, path
        names = self._names(keys)
        if keys is not None and "step" in self._components and "step" not in names:
            names.append("step")  # a partial save's step counter is the new one, never carried
        states = {name: self._state_of(name) for name in names}
        if not self._write:
            for state in states.values():  # iterate shard generators, as elements does
                if hasattr(state, "__next__"):
                    for _ in state:
                        pass
            return None
        if path is not None and not self._is_own(path):
            return self._save_elsewhere(path, names, states, step, overwrite, metrics)
        if step is None:
            step = self._step_number(states)
        carry = [name for name in self._components if name not in states]
        if carry:
            return self._save_partial(step, states, carry, overwrite, metrics, block)
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

    def _is_own(self, path) -> bool:
        """Whether ``path`` names this checkpoint's store, however it is spelled."""
        return self._directory is not None and os.path.realpath(_fspath(path)) == os.path.realpath(self._directory)

    def _save_elsewhere(self, path, names, states, step, overwrite, metrics) -> SaveResult:
        # another store: this checkpoint's retention and branch are its own, not that store's
        options = {k: v for k, v in self._options.items() if k not in ("keep", "branch")}
        with Store(path, **options) as other:
            if step is None:
                step = self._number_from(states)
                if step is None:
                    latest = other.latest()
                    step = 0 if latest is None else latest + 1
            return other.save(step, states, overwrite=overwrite, metrics=metrics)

    def _save_partial(self, step, states, carry, overwrite, metrics, block) -> SaveResult | SaveHandle:
        self._store.wait()  # the step carried from is committed, not in flight
        # after a rollback, the loaded step (its lineage), not the future about to move away
        source = self._store.continuing_from
        latest = self._store.latest() if source is None else source
        have = set(self._store.manifest(latest).names) if latest is not None else set()
        missing = [name for name in carry if name not in have]
        if missing:
            raise UsageError(
                f"a partial save (keys={list(states)}) carries the other components from the latest step, "
                f"which lacks {missing}: save the whole state once first (cp.save())"
            )
        continuing = self._store.continuing_from is not None
        handle = self._store.save_async(step, states, overwrite=overwrite, metrics=metrics, carry=(latest, carry))
        object.__setattr__(self, "_last_submitted", handle.step)
        object.__setattr__(self, "_submitted_head", continuing or self._submitted_head)
        return handle if not block else handle.result()

    def wait(self) -> None:
        """Wait for background saves; raise the first error no handle has shown yet."""
        if self._opened is not None:
            self._opened.wait()

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
        return _save_state(value) if _is_component(value) else value

    def _number_from(self, states: dict) -> int | None:
        """The step number the ``step=`` counter or a ``step`` component says, if any."""
        if self._counter is not None:
            state, what = self._counter, "the step= counter"
        elif "step" in self._components:
            state = states["step"] if "step" in states else self._state_of("step")
            what = "the 'step' component"
        else:
            return None
        try:
            return int(state)
        except (TypeError, ValueError):
            raise UsageError(f"{what} is {type(state).__name__}, not a number; pass save(step=...)") from None

    def _step_number(self, states: dict) -> int:
        number = self._number_from(states)
        if number is not None:
            return number
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
        keys=None,
        *,
        step: int | str | None = None,
        regex: str | None = None,
        verify: bool | None = None,
        map_location=None,
    ) -> int:
        """Load a step (default: latest) into the registered components; returns the step.

        ``step`` is a number of this branch or a tag (of any branch).  ``path`` loads from
        another store, opened read-only (it may be another run's, being written, or one
        you cannot write; nothing is created there).  ``keys`` picks components (default:
        every registered one); a name that is not registered raises
        :class:`UsageError` and registers nothing.  ``regex`` picks leaves by path
        (``re.match``); the rest keep their current values.  Raises StepNotFoundError,
        StoreNotFoundError, SelectionError, IntegrityError.

        Loading every registered component of a step of this branch makes the next save
        continue from it: if it is not the branch's latest, the later steps move to an
        automatic branch when that save commits (nothing moves if no save follows).
        """
        keys = self._load_keys(keys)
        map_location = self._map_location if map_location is None else map_location
        if path is None or self._is_own(path):
            store = self._store
            store.wait(raise_errors=False)  # load what was saved; errors stay pending
            return self._load_from(store, step, keys, regex, verify, map_location)
        with _open_to_read(path, self._options) as other:
            return self._load_from(other, step, keys, regex, verify, map_location)

    def _load_keys(self, keys) -> list[str]:
        if keys is None:
            keys = list(self._components)
            if not keys:
                raise UsageError("no components are registered: assign some first (cp.agent = agent)")
        keys = [keys] if isinstance(keys, str) else list(keys)
        unknown = [k for k in keys if k not in self._components]
        if unknown:
            raise UsageError(
                f"components {unknown} are not registered on this Checkpoint: register them first "
                f"(cp.{unknown[0]} = ...) or use castore.load(path, {{name: fn}})"
            )
        return keys

    def _load_from(self, store: Store, step, keys, regex, verify, map_location) -> int:
        branch, step = store.locate(step)  # latest, a tag, or the number itself
        into = None if regex is not None else self._targets(keys)
        data = store.load(
            step, keys=keys, regex=regex, verify=verify, branch=branch, into=into, map_location=map_location
        )
        if regex is not None:
            data = self._merge_selected(data, regex)
        for name, state in data.items():
            self._apply(name, state)
        if store is self._opened and branch == store.branch and regex is None and set(keys) >= set(self._components):
            if not store.readonly:
                store.continue_from(step)
            object.__setattr__(self, "_submitted_head", False)
        log.info("loaded step %d of branch %s (%s) from %s", step, branch, ", ".join(data), store.path)
        return step

    def _targets(self, keys) -> dict | None:
        """Restore targets: what components offer (``load_targets()``, a torch module's
        tensors), and the current value of plain values (its NamedTuple and dataclass
        types, its jax shardings, its arrays to fill)."""
        into = {}
        for name in keys:
            value = self._components[name]
            target = _restore_target(value) if _is_component(value) else _structure_of(value)
            if target is not None:
                into[name] = target
        return into or None

    def _apply(self, name: str, state) -> None:
        value = self._components[name]
        if _is_component(value):
            _load_state(value, state)
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

    def load_or_save(self) -> int | None:
        """Load the latest step if the store has one, else save the current state as a
        step; returns the step (None: a ``write=False`` save).

        With ``mirror=``, a store without a step first pulls the latest step of its branch
        from the mirror (fetching its chunks), so a run resumes on any machine from the
        bucket; a bucket without one leaves the save to happen as without a mirror.  A rank
        of a multi-host mirror (``MirrorOptions(world=N)``) resumes from the bucket's latest
        committed step (pulled if this rank's store lacks it; its later steps, which never
        committed, move to an abandoned branch at the next save), whatever its own latest is.
        """
        mirror = None if self._opened is None else self._opened.mirror
        if mirror is not None and mirror.parts is not None:  # a rank of a multi-host job
            latest = mirror.latest_committed()
            if latest is not None:  # resume where every rank committed, not at this rank's latest
                if not self._opened.has_step(latest):
                    self._opened.pull(latest)
                return self.load(step=latest)
        elif mirror is not None and not self.exists():
            self._opened.pull()
        if self.exists():
            return self.load()
        result = self.save()
        return None if result is None else result.step

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

    def exists(self, path: str | os.PathLike | int | None = None, *, step: int | None = None) -> bool:
        """Whether the store (or the store at ``path``) has any step, or ``step``."""
        if isinstance(path, int) and not isinstance(path, bool):
            path, step = None, path  # exists(step), the 0.5 spelling
        if path is not None:
            try:
                with _open_to_read(path, self._options) as other:
                    return other.latest() is not None if step is None else other.has_step(step)
            except StoreNotFoundError:
                return False
        if self._opened is None and self._directory is not None and not self._write:
            try:
                self._store  # noqa: B018 - opens it read-only if it exists
            except StoreNotFoundError:
                return False
        elif self._directory is None:
            return False
        return self._store.latest() is not None if step is None else self._store.has_step(step)

    def close(self) -> None:
        """Wait for background saves, then close the store (raising a save error nobody saw)."""
        if self._opened is not None:
            self._opened.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _mismatch(path: str, have: dict, value) -> str | None:
    """Why a stored leaf cannot replace the current one, or None.  Arrays of any kind
    (numpy, TrackedArray, torch, jax) must match in kind, shape and dtype."""
    if path not in have:
        return "not in the current state"
    current = have[path]
    if isinstance(current, TrackedArray):
        current = np.asarray(current)
    if _is_array(current) or _is_array(value):
        if not (_is_array(current) and _is_array(value)) or _array_kind(current) != _array_kind(value):
            return f"stored {_describe(value)} vs current {_describe(current)}"
        if tuple(value.shape) != tuple(current.shape) or str(value.dtype) != str(current.dtype):
            return f"stored {_describe(value)} vs current {_describe(current)}"
    elif type(current) is not type(value):
        return f"stored {type(value).__name__} vs current {type(current).__name__}"
    return None


def _is_array(value) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, np.generic)


def _array_kind(value) -> str:
    return "numpy" if isinstance(value, np.ndarray) else type(value).__module__.split(".")[0]


def _describe(value) -> str:
    if _is_array(value):
        return f"{_array_kind(value)} {tuple(value.shape)} {value.dtype}"
    return type(value).__name__


def _open_to_read(path, options: dict) -> Store:
    """Another store, read-only: it may be written meanwhile, or not be writable by us;
    nothing is created at ``path``."""
    keep = {k: v for k, v in options.items() if k in ("allow_pickle", "allow_network_fs", "verify", "workers")}
    return Store(_fspath(path), create=False, readonly=True, **keep)


def load(
    path: str | os.PathLike,
    fns: dict,
    *,
    step: int | str | None = None,
    verify: bool | None = None,
    map_location=None,
    allow_pickle: bool = False,
) -> int:
    """Load components of the store at ``path`` into functions: ``fns`` maps a component
    name to ``fn(state)`` (DreamerV3's ``from_checkpoint``:
    ``castore.load(path, {"agent": functools.partial(agent.load, regex=...)})``).

    The store is opened read-only; ``step`` is a number or a tag (default: the latest of
    branch main).  Returns the step.  Raises StoreNotFoundError, StepNotFoundError (a
    name the step lacks), IntegrityError.
    """
    if not isinstance(fns, dict) or not fns or not all(callable(fn) for fn in fns.values()):
        raise UsageError("castore.load(path, fns): fns is a non-empty dict {component name: fn(state)}")
    with _open_to_read(path, {"allow_pickle": allow_pickle}) as store:
        branch, number = store.locate(step)
        data = store.load(number, keys=list(fns), verify=verify, branch=branch, map_location=map_location)
        for name, fn in fns.items():
            fn(data[name])
    log.info("loaded step %d (%s) from %s", number, ", ".join(fns), path)
    return number

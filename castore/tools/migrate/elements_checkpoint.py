"""Import the complete steps of an ``elements.Checkpoint`` directory into a store.

The layout elements writes (``elements/checkpoint.py``)::

    directory/
      latest                          name of the newest complete folder (not read here)
      <timestamp>[-<step:012d>]/      timestamp: %Y%m%dT%H%M%S, then F and 6 digits of microseconds
        <name>.pkl                    one pickled component state
        <name>-0000.pkl, -0001, ...   the shards of a component whose save() yields them
        done                          empty; written last, so it marks the folder complete

A folder becomes the step of the number in its name.  Folders without one (DreamerV3
saves so: ``elements.Checkpoint(logdir / 'ckpt')``) are numbered 0, 1, 2, ... in
timestamp order of the complete ones; a directory holding both kinds is refused, since
the two numberings would collide.  ``step_key="step"`` numbers every folder by the int
its component ``step`` holds instead (DreamerV3's ``cp.step``; also what a
``castore.Checkpoint`` saves under).  Several complete folders of one step: the newest
is imported, the others are skipped.  Skipped, and listed with the reason: folders
without ``done`` (a save that did not finish), folders of other names, empty folders.

``<name>-NNNN.pkl`` files are shards of ``<name>`` when ``<name>-0000.pkl`` exists and
``<name>.pkl`` does not (elements' own rule when it loads); they are read in the order of
their numbers and must run 0, 1, 2, ... without a gap.

Reading a ``.pkl`` file unpickles it, which runs whatever code the file names: nothing is
read without ``allow_pickle=True``, and the classes the pickles name must be importable.
The store itself keeps no pickle: a value castore does not store natively raises
:class:`UnsupportedValueError` naming its leaf path and folder.  A step's save time is its
folder's timestamp (elements writes local time), so time-based retention (``Keep(interval=)``)
buckets imported steps as they were saved; a timestamp that is no date keeps the import's time.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ...errors import MigrationError, UsageError
from ...format.keys import MAX_STEP
from ...store import Store
from .target import open_target, save_step

__all__ = ["ElementsImport", "ImportedStep", "SkippedFolder", "import_elements"]

log = logging.getLogger("castore.migrate")

_FOLDER = re.compile(r"(?P<time>[0-9]{8}T[0-9]{6}(?:F[0-9]{6})?)(?:-(?P<step>[0-9]+))?")
_SHARD = re.compile(r"(?P<name>.+)-(?P<index>[0-9]{4,})\.pkl")
DONE = "done"


@dataclass(frozen=True, slots=True)
class ImportedStep:
    """One folder committed (or found committed already) as a step."""

    step: int
    folder: str  #: the folder's name inside the directory
    components: tuple[str, ...]  #: component names, sorted
    new_bytes: int  #: bytes the save added to the store
    unchanged: bool  #: the store held this step with this very state already (the save was a no-op)


@dataclass(frozen=True, slots=True)
class SkippedFolder:
    """A folder not imported, and why."""

    folder: str
    reason: str


@dataclass(frozen=True, slots=True)
class ElementsImport:
    """What :func:`import_elements` did, steps in ascending order."""

    store: str  #: the store's path
    branch: str  #: the branch the steps were saved to
    imported: tuple[ImportedStep, ...]
    skipped: tuple[SkippedFolder, ...]


@dataclass(frozen=True, slots=True)
class _Folder:
    """A complete folder: its components as ``{name: [file, ...]}`` (one file, or the shards)."""

    name: str
    time: str
    number: int | None
    files: dict[str, list[str]]
    is_sharded: dict[str, bool]


def _created(stamp: str) -> float | None:
    """The UNIX time of an elements folder timestamp (local time), if it is a date."""
    try:
        when = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SF%f" if "F" in stamp else "%Y%m%dT%H%M%S")
        return when.timestamp()
    except (ValueError, OverflowError, OSError):
        return None


def _unpickle(path: str):
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise MigrationError(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        return pickle.loads(data)
    except Exception as exc:  # unpickling runs arbitrary code: anything may come out of it
        raise MigrationError(
            path, f"cannot unpickle ({type(exc).__name__}: {exc}); the classes it names must be importable here"
        ) from None


def _components(path: str) -> tuple[dict[str, list[str]], dict[str, bool]]:
    """``{name: files}`` and ``{name: is sharded}`` of a folder's ``.pkl`` files."""
    try:
        names = sorted(n for n in os.listdir(path) if n.endswith(".pkl"))
    except OSError as exc:
        raise MigrationError(path, f"cannot list: {exc.strerror or exc}") from None
    present = set(names)
    files: dict[str, list[str]] = {}
    sharded: dict[str, bool] = {}
    shards: dict[str, dict[int, str]] = {}
    for name in names:
        match = _SHARD.fullmatch(name)
        if match and f"{match['name']}-0000.pkl" in present and f"{match['name']}.pkl" not in present:
            by_index = shards.setdefault(match["name"], {})
            if int(match["index"]) in by_index:  # "x-0001.pkl" beside "x-00001.pkl"
                raise MigrationError(os.path.join(path, name), f"is the same shard as {by_index[int(match['index'])]}")
            by_index[int(match["index"])] = name
        else:
            files[name.removesuffix(".pkl")] = [name]
            sharded[name.removesuffix(".pkl")] = False
    for component, by_index in shards.items():
        missing = sorted(set(range(len(by_index))) - set(by_index))
        if missing:
            raise MigrationError(
                os.path.join(path, f"{component}-{missing[0]:04d}.pkl"),
                f"missing: the shards of {component!r} do not run 0..{max(by_index)} without a gap",
            )
        files[component] = [by_index[i] for i in range(len(by_index))]
        sharded[component] = True
    return dict(sorted(files.items())), dict(sorted(sharded.items()))


def _scan(directory: str) -> tuple[list[_Folder], list[SkippedFolder]]:
    try:
        entries = sorted(e.name for e in os.scandir(directory) if e.is_dir())
    except FileNotFoundError:
        raise UsageError(f"{directory} does not exist: pass an elements.Checkpoint directory") from None
    except NotADirectoryError:
        raise UsageError(f"{directory} is not a directory: pass an elements.Checkpoint directory") from None
    except OSError as exc:
        raise MigrationError(directory, f"cannot list: {exc.strerror or exc}") from None
    folders, skipped = [], []
    for name in entries:
        match = _FOLDER.fullmatch(name)
        path = os.path.join(directory, name)
        if not match:
            skipped.append(SkippedFolder(name, "not a checkpoint folder name (<timestamp>[-<step>])"))
        elif not os.path.isfile(os.path.join(path, DONE)):
            skipped.append(SkippedFolder(name, "incomplete: no 'done' file (the save did not finish)"))
        else:
            files, sharded = _components(path)
            if not files:
                skipped.append(SkippedFolder(name, "holds no components"))
                continue
            number = int(match["step"]) if match["step"] is not None else None
            folders.append(_Folder(name, match["time"], number, files, sharded))
    return folders, skipped


def _step_of_component(directory: str, folder: _Folder, step_key: str) -> int:
    if step_key not in folder.files or folder.is_sharded[step_key]:
        raise MigrationError(
            os.path.join(directory, folder.name), f"has no component {step_key!r} (a {step_key}.pkl) to number it by"
        )
    path = os.path.join(directory, folder.name, folder.files[step_key][0])
    value = _unpickle(path)
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        step = int(value)
    except (TypeError, ValueError):
        raise MigrationError(path, f"holds a {type(value).__name__}, not a step number") from None
    if not 0 <= step <= MAX_STEP:
        raise MigrationError(path, f"holds step {step}, outside [0, 2**63)")
    return step


def _plan_steps(
    directory: str, folders: list[_Folder], step_key: str | None
) -> tuple[list[tuple[int, _Folder]], list[SkippedFolder]]:
    """``(step, folder)`` pairs to import, ascending, and the folders a newer one of the
    same step replaces."""
    if step_key is not None:
        numbered = [(_step_of_component(directory, f, step_key), f) for f in folders]
    else:
        with_step = [f for f in folders if f.number is not None]
        if with_step and len(with_step) < len(folders):
            without = next(f for f in folders if f.number is None)
            raise UsageError(
                f"{directory} mixes folders with a step number ({with_step[0].name}) and without "
                f"({without.name}), whose numbers would collide: pass step_key= (--step-key) to number "
                "them by a component, or rename the folders <timestamp>-<step:012d>"
            )
        by_time = sorted(folders, key=lambda f: f.time)
        numbered = [(f.number if f.number is not None else i, f) for i, f in enumerate(by_time)]
    newest: dict[int, _Folder] = {}
    replaced = []
    for step, folder in sorted(numbered, key=lambda pair: (pair[0], pair[1].time)):
        if step in newest:
            replaced.append(SkippedFolder(newest[step].name, f"step {step} is saved again by {folder.name}"))
        newest[step] = folder
    return sorted(newest.items()), replaced


def _tree(path: str, folder: _Folder) -> dict:
    """The folder's components: states unpickled, sharded ones as iterators of their shards."""
    return {
        name: _shards(path, files) if folder.is_sharded[name] else _unpickle(os.path.join(path, files[0]))
        for name, files in folder.files.items()
    }


def _shards(path: str, files: list[str]) -> Iterator:
    for name in files:  # one shard in memory at a time, as elements' own load does
        yield _unpickle(os.path.join(path, name))


def import_elements(
    directory: str | os.PathLike,
    store: str | os.PathLike | Store,
    *,
    allow_pickle: bool = False,
    step_key: str | None = None,
    branch: str | None = None,
    overwrite: bool = False,
    allow_network_fs: bool = False,
) -> ElementsImport:
    """Save every complete step of an ``elements.Checkpoint`` directory into ``store``.

    ``store`` is a path (the store is created if absent, and closed afterwards) or an open
    :class:`Store`.  Steps are saved in ascending order, each atomically; a step the store
    holds with the same state already is left as it is, so a re-run imports only what is
    new, as long as the numbering gives each folder the same step again: with unnumbered
    folders and elements' ``keep=1`` (DreamerV3's default) the one folder left is step 0 on
    every run, so pass ``step_key="step"`` there.  Numbering, skipping and sharding are as
    the module docstring says.

    Raises :class:`UsageError` without ``allow_pickle=True`` (reading the checkpoint
    unpickles its files, which runs code), for a missing directory, or one that mixes
    numbered and unnumbered folders; :class:`MigrationError` for a file that cannot be read
    or unpickled, or a gap in a component's shards; :class:`UnsupportedValueError` (with
    the leaf path) for a value castore does not store; :class:`StepExistsError` if the store
    holds a step with other content, unless ``overwrite``.  Steps committed before an error
    stay committed.
    """
    if not allow_pickle:
        raise UsageError(
            "reading an elements checkpoint unpickles its .pkl files, and unpickling runs whatever code "
            "they name: pass allow_pickle=True (castore import-elements --allow-pickle) if you trust them"
        )
    directory = os.fspath(directory)
    folders, skipped = _scan(directory)
    plan, replaced = _plan_steps(directory, folders, step_key)
    skipped = sorted(skipped + replaced, key=lambda s: s.folder)
    imported = []
    with open_target(store, branch, allow_network_fs) as target:
        for step, folder in plan:
            path = os.path.join(directory, folder.name)
            tree_of = functools.partial(_tree, path, folder)
            result = save_step(target, step, tree_of, overwrite=overwrite, source=path, created=_created(folder.time))
            unchanged = result.manifest_bytes == 0
            log.info("step %d from %s%s", step, path, " (stored already)" if unchanged else "")
            imported.append(ImportedStep(step, folder.name, tuple(folder.files), result.new_bytes, unchanged))
        for skip in skipped:
            log.info("skipped %s: %s", os.path.join(directory, skip.folder), skip.reason)
        return ElementsImport(target.path, target.branch, tuple(imported), tuple(skipped))

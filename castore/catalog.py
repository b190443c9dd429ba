"""The catalog: the config record, steps, branches, tags, the trash and stepinfo, as
functions of a storage transaction.

The store calls them inside its own transactions so that, e.g., a manifest leaves
``steps`` and enters ``trash`` atomically.  Key layouts are in :mod:`castore.format.keys`.
"""

from __future__ import annotations

import math
import time

from .errors import CorruptDataError, FormatError, StepNotFoundError, StoreNotFoundError, UsageError
from .format.chunker import DEFAULT_CHUNK_BYTES
from .format.config import CONFIG_KEY, StoreConfig, migrate, new_config, parse_config
from .format.keys import (
    BRANCH_MARK,
    MAIN,
    MAX_BRANCH_CHARS,
    branch_end,
    branch_of,
    branch_prefix,
    check_step,
    describe_key,
    in_branch,
    step_key,
    step_of,
    tag_key,
    trash_key,
)
from .format.manifest import Manifest, decode_manifest
from .format.schema import Table
from .format.stepinfo import SaveTimes, StepRecord, decode_stepinfo, encode_stepinfo
from .storage.base import Backend, ReadTxn, WriteTxn


def branch_steps(txn: ReadTxn, branch: str) -> list[int]:
    """The steps of one branch, ascending."""
    return [step_of(key) for key, _ in _branch_items(txn, branch)]


def branch_manifests(txn: ReadTxn, branch: str):
    """``(step, manifest bytes)`` of one branch, ascending."""
    for key, value in _branch_items(txn, branch):
        yield step_of(key), value


def _branch_items(txn: ReadTxn, branch: str):
    for key, value in txn.scan(Table.STEPS, branch_prefix(branch), branch_end(branch)):
        if in_branch(key, branch):
            yield key, value


def latest_step(txn: ReadTxn, branch: str) -> int | None:
    """The highest step of ``branch``, or None if it has none."""
    for key, _ in txn.scan(Table.STEPS, branch_prefix(branch), branch_end(branch), reverse=True):
        if in_branch(key, branch):
            return step_of(key)
    return None


def branch_names(txn: ReadTxn) -> list[str]:
    """Every branch with at least one step, and ``main`` always; one seek per branch."""
    names = [MAIN]
    start = BRANCH_MARK
    while True:
        found = next(txn.scan(Table.STEPS, start), None)
        if found is None:
            return names
        name = branch_of(found[0])
        names.append(name)
        start = branch_end(name)


def manifest_bytes(txn: ReadTxn, key: bytes, where: str):
    """The stored manifest of step key ``key``; raises :class:`StepNotFoundError`."""
    raw = txn.get(Table.STEPS, key)
    if raw is None:
        raise StepNotFoundError(f"{describe_key(key)} does not exist in {where}")
    return raw


def manifest(txn: ReadTxn, key: bytes, where: str) -> Manifest:
    """The decoded manifest of step key ``key``; checks it names its own step."""
    try:
        decoded = decode_manifest(manifest_bytes(txn, key, where))
    except CorruptDataError as exc:
        raise CorruptDataError(f"{describe_key(key)}: {exc}") from None
    if decoded.step != step_of(key):
        raise CorruptDataError(f"{describe_key(key)}: its manifest says step {decoded.step}")
    return decoded


def move_steps_after(txn: WriteTxn, branch: str, step: int) -> str | None:
    """Move the steps of ``branch`` after ``step`` (with metrics and tags) to a new branch.

    Returns the new branch's name, ``<branch>-abandoned-<step>`` (``-2``, ``-3``... if
    taken), or None if ``step`` is the branch's latest.  Used when a save continues a
    lineage from an earlier step: the abandoned future stays reachable.
    """
    later = [s for s in branch_steps(txn, branch) if s > step]
    if not later:
        return None
    taken = set(branch_names(txn))
    base = f"{branch}-abandoned-{step}"[: MAX_BRANCH_CHARS - 10]
    target = base
    for n in range(2, len(taken) + 3):
        if target not in taken:
            break
        target = f"{base}-{n}"
    retag = _tags_by_key(txn)
    for s in later:
        _move_step(txn, step_key(s, branch), step_key(s, target), retag)
    return target


def copy_step(txn: WriteTxn, source: bytes, target: bytes, *, is_move: bool = True) -> None:
    """Put the manifest (and metrics) of key ``source`` under ``target`` too: no chunk is written.

    A copy that is not a move (a fork) drops the record's save times: no save made it."""
    txn.put(Table.STEPS, target, bytes(manifest_bytes(txn, source, "the store")))
    info = txn.get(Table.STEPINFO, source)
    if info is None:
        return
    if not is_move:
        record = decode_stepinfo(info, f"metrics record of {describe_key(source)}")
        if record.save is not None and record.created is not None:
            txn.put(Table.STEPINFO, target, encode_stepinfo(record.created, record.metrics))
            return
    txn.put(Table.STEPINFO, target, bytes(info))


def _move_step(txn: WriteTxn, source: bytes, target: bytes, retag: dict) -> None:
    copy_step(txn, source, target)
    txn.delete(Table.STEPS, source)
    txn.delete(Table.STEPINFO, source)
    for name in retag.get(source, ()):
        txn.put(Table.TAGS, name, target)


def _tags_by_key(txn: ReadTxn) -> dict[bytes, list[bytes]]:
    out: dict[bytes, list[bytes]] = {}
    for name, key in txn.scan(Table.TAGS):
        out.setdefault(bytes(key), []).append(bytes(name))
    return out


def delete_steps(txn: WriteTxn, keys: list[bytes], where: str) -> None:
    """Move the manifests of ``keys`` to the trash (GC finds their chunks there).

    Raises :class:`StepNotFoundError`, and :class:`UsageError` for a tagged step.
    """
    tagged = {key: name for name, key in tags(txn).items()}
    for key in keys:
        raw = manifest_bytes(txn, key, where)
        if key in tagged:
            raise UsageError(f"{describe_key(key)} is tagged {tagged[key]!r}: untag it before deleting")
        trash_manifest(txn, key, raw)
        txn.delete(Table.STEPS, key)


def trash_manifest(txn: WriteTxn, key: bytes, raw) -> None:
    """Move the manifest of step key ``key`` to the trash, where GC finds its chunks.

    The caller deletes ``key`` from ``steps`` in the same transaction.
    """
    txn.put(Table.TRASH, trash_key(time.time_ns(), key), bytes(raw))
    txn.delete(Table.STEPINFO, key)


def put_stepinfo(
    txn: WriteTxn, key: bytes, created: float, metrics: dict | None, save: SaveTimes | None = None
) -> None:
    """Write the stepinfo record of step key ``key`` (every committed step has one)."""
    txn.put(Table.STEPINFO, key, encode_stepinfo(created, metrics, save))


def check_metrics(metrics) -> dict | None:
    """``{str: int or float}``; anything else is a UsageError."""
    if metrics is None:
        return None
    if not isinstance(metrics, dict) or not all(isinstance(k, str) for k in metrics):
        raise UsageError("metrics must be a dict of str -> number")
    out = {}
    for name, value in metrics.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (isinstance(value, float) and math.isnan(value))
        ):
            raise UsageError(f"metric {name!r} must be a number, got {value!r}")
        out[name] = float(value)
    return out


def read_stepinfo(txn: ReadTxn, key: bytes) -> StepRecord:
    """The stepinfo record of step key ``key``; ``created`` is None where the record lacks
    it (written before format 4) or is absent (format 2 and 3 wrote one only with metrics).
    Raises :class:`CorruptDataError` for a damaged record."""
    raw = txn.get(Table.STEPINFO, key)
    if raw is None:
        return StepRecord(None)
    return decode_stepinfo(raw, f"metrics record of step {step_of(key)}")


def read_metrics(txn: ReadTxn, key: bytes) -> dict:
    """The metrics saved with step key ``key`` (empty if none)."""
    return read_stepinfo(txn, key).metrics


def tags(txn: ReadTxn) -> dict[str, bytes]:
    """``{tag: step key}`` over every branch."""
    out = {}
    for key, value in txn.scan(Table.TAGS):
        branch_of(value)  # raises CorruptDataError for a value that is no step key
        out[bytes(key).decode("utf-8", "replace")] = bytes(value)
    return out


def find_tag(txn: ReadTxn, name: str, where: str) -> bytes:
    """The step key tag ``name`` names; raises StepNotFoundError."""
    value = txn.get(Table.TAGS, tag_key(name))
    if value is None:
        raise StepNotFoundError(f"no tag {name!r} in {where}; tags: {sorted(tags(txn)) or 'none'}")
    branch_of(value)
    return bytes(value)


def locate(txn: ReadTxn, step: int | str | None, branch: str, where: str) -> bytes:
    """The step key of a tag, a step number or None (the latest) of ``branch``."""
    if isinstance(step, str):
        return find_tag(txn, step, where)
    if step is not None:
        return step_key(check_step(step), branch)
    latest = latest_step(txn, branch)
    if latest is None:
        place = where if branch == MAIN else f"branch {branch!r} of {where}"
        raise StepNotFoundError(f"{place} has no steps yet")
    return step_key(latest, branch)


def open_config(
    backend: Backend, chunk_bytes: int | None, where: str, compression: str = "auto", *, create: bool = True
) -> StoreConfig:
    """The store's config, written first (with ``chunk_bytes``, or the default, and
    ``compression``) if the store is new and ``create``; :class:`UsageError` if
    ``chunk_bytes`` is given and differs from the store's, :class:`StoreNotFoundError` if
    there is no config to read and none may be written."""
    with backend.read() as txn:
        raw = txn.get(Table.META, CONFIG_KEY)
        config = None if raw is None else bytes(raw)
    if config is None:
        if backend.readonly or not create:
            with backend.read() as txn:
                if txn.count(Table.STEPS):
                    raise FormatError(f"{where} holds steps but no config record")
            raise StoreNotFoundError(
                f"no castore store at {where}: it holds no config record (a creation that did not "
                "finish?); open it with create=True to make a store there"
            )
        config = backend.write(_create_config, chunk_bytes or DEFAULT_CHUNK_BYTES, compression, where)
    parsed = parse_config(config, where)
    if chunk_bytes is not None and chunk_bytes != parsed.chunk_bytes:
        raise UsageError(
            f"store {where} was created with chunk_bytes={parsed.chunk_bytes}; "
            f"it cannot be opened with chunk_bytes={chunk_bytes} (omit the argument)"
        )
    return parsed


def _create_config(txn: WriteTxn, chunk_bytes: int, compression: str, where: str) -> bytes:
    existing = txn.get(Table.META, CONFIG_KEY)
    if existing is not None:  # another opener created it first
        return bytes(existing)
    if txn.count(Table.STEPS):
        raise FormatError(f"{where} holds steps but no config record")
    config = new_config(chunk_bytes, compression)
    txn.put(Table.META, CONFIG_KEY, config)
    return config


def migrate_config(txn: WriteTxn) -> None:
    """Bring the config record to the current format (see :func:`castore.format.config.migrate`)."""
    raw = txn.get(Table.META, CONFIG_KEY)
    if raw is None:
        raise FormatError("the store has no config record to migrate")
    current = migrate(bytes(raw))
    if current is not None:
        txn.put(Table.META, CONFIG_KEY, current)

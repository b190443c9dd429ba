"""Step bookkeeping besides manifests: step keys and branches, the trash, metrics, tags.

Functions of an open LMDB transaction; the store calls them inside its own transactions
so that, e.g., a manifest leaves ``steps`` and enters ``trash`` atomically.

Step keys (format 3): a step of the ``main`` branch is keyed by its 8-byte big-endian
number (first byte < 0x80, as in formats 1 and 2); a step of branch ``name`` by
``0xff + name + 0x00 + number``.  So each branch is one contiguous key range of the
``steps`` database, main first, and ``stepinfo`` and ``tags`` use the same keys.
"""

from __future__ import annotations

import math
import re
import time

import msgpack
import numpy as np

from .blobstore import BlobStore
from .errors import CorruptDataError, StepNotFoundError, UsageError
from .manifest import decode_manifest, seal, unpack_untrusted, unseal
from .retention import StepInfo

MAX_TAG_BYTES = 256
MAIN = "main"
MAX_BRANCH_CHARS = 200  # keys stay well within LMDB's 511 bytes
_BRANCH_MARK = b"\xff"
_BRANCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@=/-]*")


MAX_STEP = (1 << 63) - 1


def check_step(step) -> int:
    """A step number: an int (or numpy integer) in [0, 2**63)."""
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
        raise UsageError(f"step must be an int, got {type(step).__name__}")
    if not 0 <= int(step) <= MAX_STEP:
        raise UsageError(f"step must be in [0, 2**63), got {step}")
    return int(step)


def describe_key(key: bytes) -> str:
    """``step 5``, or ``step 5 of branch 'x'`` for a step of another branch than main."""
    branch = branch_of(key)
    return f"step {step_of(key)}" if branch == MAIN else f"step {step_of(key)} of branch {branch!r}"


def check_branch(name) -> str:
    """A branch name: letters, digits and ``._+@=/-``, starting with a letter or digit."""
    if not isinstance(name, str) or not _BRANCH_NAME.fullmatch(name) or len(name) > MAX_BRANCH_CHARS:
        raise UsageError(
            f"a branch name is 1-{MAX_BRANCH_CHARS} letters, digits or ._+@=/- starting with a "
            f"letter or digit; got {name!r}"
        )
    return name


def branch_prefix(branch: str) -> bytes:
    return b"" if branch == MAIN else _BRANCH_MARK + branch.encode() + b"\x00"


def step_key(step: int, branch: str = MAIN) -> bytes:
    return branch_prefix(branch) + step.to_bytes(8, "big")


def step_of(key) -> int:
    return int.from_bytes(key[-8:], "big")


def branch_of(key) -> str:
    key = bytes(key)
    if len(key) == 8 and key[0] < 0x80:
        return MAIN
    if len(key) < 11 or key[:1] != _BRANCH_MARK or key[-9] != 0:
        raise CorruptDataError(f"malformed step key {key[:40]!r}")
    try:
        return check_branch(key[1:-9].decode())
    except (UnicodeDecodeError, UsageError):
        raise CorruptDataError(f"malformed branch name in step key {key[:40]!r}") from None


def _in_branch(key, branch: str, prefix: bytes) -> bool:
    if branch == MAIN:
        return len(key) == 8 and key[0] < 0x80
    return bytes(key[: len(prefix)]) == prefix and len(key) == len(prefix) + 8


def branch_items(txn, blobs: BlobStore, branch: str, *, values: bool = True):
    """``(step, manifest bytes)`` (or steps alone) of one branch, ascending."""
    prefix = branch_prefix(branch)
    cursor = txn.cursor(db=blobs.dbs["steps"])
    if not cursor.set_range(prefix):
        return
    for key, value in cursor.iternext():
        if not _in_branch(key, branch, prefix):
            return
        yield (step_of(key), value) if values else step_of(key)


def latest_step(txn, blobs: BlobStore, branch: str) -> int | None:
    """The highest step of ``branch``, or None if it has none."""
    cursor = txn.cursor(db=blobs.dbs["steps"])
    end = _BRANCH_MARK if branch == MAIN else _BRANCH_MARK + branch.encode() + b"\x01"
    found = cursor.prev() if cursor.set_range(end) else cursor.last()
    if found and _in_branch(cursor.key(), branch, branch_prefix(branch)):
        return step_of(cursor.key())
    return None


def branch_names(txn, blobs: BlobStore) -> list[str]:
    """Every branch with at least one step, and ``main`` always; one seek per branch."""
    names = [MAIN]
    cursor = txn.cursor(db=blobs.dbs["steps"])
    found = cursor.set_range(_BRANCH_MARK)
    while found:
        name = branch_of(cursor.key())
        names.append(name)
        found = cursor.set_range(_BRANCH_MARK + name.encode() + b"\x01")
    return names


def move_steps_after(txn, blobs: BlobStore, branch: str, step: int) -> str | None:
    """Move the steps of ``branch`` after ``step`` (with metrics and tags) to a new branch.

    Returns the new branch's name, ``<branch>-abandoned-<step>`` (``-2``, ``-3``... if
    taken), or None if ``step`` is the branch's latest.  Used when a save continues a
    lineage from an earlier step: the abandoned future stays reachable.
    """
    later = [s for s in branch_items(txn, blobs, branch, values=False) if s > step]
    if not later:
        return None
    taken = set(branch_names(txn, blobs))
    base = f"{branch}-abandoned-{step}"[: MAX_BRANCH_CHARS - 10]
    target = base
    for n in range(2, len(taken) + 3):
        if target not in taken:
            break
        target = f"{base}-{n}"
    retag = _tags_by_key(txn, blobs)
    for s in later:
        _move_step(txn, blobs, step_key(s, branch), step_key(s, target), retag)
    return target


def copy_step(txn, blobs: BlobStore, source: bytes, target: bytes) -> None:
    """Put the manifest (and metrics) of key ``source`` under ``target`` too: no chunk is written."""
    raw = txn.get(source, db=blobs.dbs["steps"])
    txn.put(target, bytes(raw), db=blobs.dbs["steps"])
    info = txn.get(source, db=blobs.dbs["stepinfo"])
    if info is not None:
        txn.put(target, bytes(info), db=blobs.dbs["stepinfo"])


def _move_step(txn, blobs: BlobStore, source: bytes, target: bytes, retag: dict) -> None:
    copy_step(txn, blobs, source, target)
    txn.delete(source, db=blobs.dbs["steps"])
    txn.delete(source, db=blobs.dbs["stepinfo"])
    for name in retag.get(source, ()):
        txn.put(name, target, db=blobs.dbs["tags"])


def _tags_by_key(txn, blobs: BlobStore) -> dict[bytes, list[bytes]]:
    out: dict[bytes, list[bytes]] = {}
    for name, key in txn.cursor(db=blobs.dbs["tags"]).iternext():
        out.setdefault(bytes(key), []).append(bytes(name))
    return out


def trash_manifest(txn, blobs: BlobStore, key: bytes, raw) -> None:
    """Move the manifest of step key ``key`` to the trash, where GC finds its chunks.

    The caller deletes ``key`` from ``steps`` in the same transaction.
    """
    txn.put(time.time_ns().to_bytes(8, "big") + key, bytes(raw), db=blobs.dbs["trash"])
    txn.delete(key, db=blobs.dbs["stepinfo"])


def put_metrics(txn, blobs: BlobStore, key: bytes, metrics: dict | None) -> None:
    if metrics:
        txn.put(key, seal(msgpack.packb({"metrics": metrics}, use_bin_type=True)), db=blobs.dbs["stepinfo"])
    else:
        txn.delete(key, db=blobs.dbs["stepinfo"])


def check_metrics(metrics) -> dict | None:
    """``{str: int or float}``; anything else is a UsageError."""
    if metrics is None:
        return None
    if not isinstance(metrics, dict) or not all(isinstance(k, str) for k in metrics):
        raise UsageError("metrics must be a dict of str -> number")
    out = {}
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and math.isnan(value)):
            raise UsageError(f"metric {name!r} must be a number, got {value!r}")
        out[name] = float(value)
    return out


def read_metrics(txn, blobs: BlobStore, key: bytes) -> dict:
    db = blobs.dbs["stepinfo"]
    raw = None if db is None else txn.get(key, db=db)
    if raw is None:
        return {}
    try:
        record = unpack_untrusted(unseal(raw, f"metrics record of step {step_of(key)}"))
        metrics = record["metrics"]
        if not isinstance(metrics, dict):
            raise TypeError("metrics is not a map")
        return {str(k): float(v) for k, v in metrics.items()}
    except (msgpack.UnpackException, ValueError, TypeError, KeyError) as exc:
        raise CorruptDataError(f"step {step_of(key)}: metrics record is malformed: {exc}") from None


def tags(txn, blobs: BlobStore) -> dict[str, bytes]:
    """``{tag: step key}`` over every branch."""
    db = blobs.dbs["tags"]
    if db is None:
        return {}
    out = {}
    for key, value in txn.cursor(db=db).iternext():
        branch_of(value)  # raises CorruptDataError for a value that is no step key
        out[bytes(key).decode("utf-8", "replace")] = bytes(value)
    return out


def tag_key(name: str) -> bytes:
    if not isinstance(name, str) or not name or name.isdigit():
        raise UsageError(f"a tag is a non-empty str that is not a step number, got {name!r}")
    key = name.encode("utf-8")
    if len(key) > MAX_TAG_BYTES:
        raise UsageError(f"tag {name[:40]!r}... is longer than {MAX_TAG_BYTES} bytes")
    return key


def find_tag(txn, blobs: BlobStore, name: str) -> bytes:
    """The step key tag ``name`` names; raises StepNotFoundError."""
    db = blobs.dbs["tags"]
    value = None if db is None else txn.get(tag_key(name), db=db)
    if value is None:
        raise StepNotFoundError(f"no tag {name!r} in {blobs.path}; tags: {sorted(tags(txn, blobs)) or 'none'}")
    branch_of(value)
    return bytes(value)


def step_infos(txn, blobs: BlobStore, branch: str) -> list[StepInfo]:
    """What retention needs to know of every step of ``branch``."""
    tagged = set(tags(txn, blobs).values())
    infos = []
    for step, raw in branch_items(txn, blobs, branch):
        key = step_key(step, branch)
        created = decode_manifest(raw).created
        infos.append(StepInfo(step, created, read_metrics(txn, blobs, key), key in tagged))
    return infos

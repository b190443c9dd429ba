"""Step bookkeeping besides manifests: the trash, per-step metrics, tags (format 2).

Functions of an open LMDB transaction; the store calls them inside its own transactions
so that, e.g., a manifest leaves ``steps`` and enters ``trash`` atomically.
"""

from __future__ import annotations

import math
import time

import msgpack

from .blobstore import BlobStore
from .errors import CorruptDataError, UsageError
from .manifest import decode_manifest
from .retention import StepInfo

MAX_TAG_BYTES = 256


def step_key(step: int) -> bytes:
    return step.to_bytes(8, "big")


def step_of(key) -> int:
    return int.from_bytes(key, "big")


def trash_manifest(txn, blobs: BlobStore, step: int, raw) -> None:
    """Move a manifest that leaves ``steps`` to the trash, where GC finds its chunks."""
    key = time.time_ns().to_bytes(8, "big") + step_key(step)
    txn.put(key, bytes(raw), db=blobs.dbs["trash"])
    txn.delete(step_key(step), db=blobs.dbs["stepinfo"])


def put_metrics(txn, blobs: BlobStore, step: int, metrics: dict | None) -> None:
    if metrics:
        txn.put(step_key(step), msgpack.packb({"metrics": metrics}, use_bin_type=True), db=blobs.dbs["stepinfo"])
    else:
        txn.delete(step_key(step), db=blobs.dbs["stepinfo"])


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


def read_metrics(txn, blobs: BlobStore, step: int) -> dict:
    db = blobs.dbs["stepinfo"]
    raw = None if db is None else txn.get(step_key(step), db=db)
    if raw is None:
        return {}
    try:
        record = msgpack.unpackb(bytes(raw), raw=False, strict_map_key=True)
        metrics = record["metrics"]
        if not isinstance(metrics, dict):
            raise TypeError("metrics is not a map")
        return {str(k): float(v) for k, v in metrics.items()}
    except (msgpack.UnpackException, ValueError, TypeError, KeyError) as exc:
        raise CorruptDataError(f"step {step}: metrics record is malformed: {exc}") from None


def tags(txn, blobs: BlobStore) -> dict[str, int]:
    db = blobs.dbs["tags"]
    if db is None:
        return {}
    out = {}
    for key, value in txn.cursor(db=db).iternext():
        if len(value) != 8:
            raise CorruptDataError(f"tag {bytes(key)!r} does not name a step")
        out[bytes(key).decode("utf-8", "replace")] = step_of(value)
    return out


def tag_key(name: str) -> bytes:
    if not isinstance(name, str) or not name or name.isdigit():
        raise UsageError(f"a tag is a non-empty str that is not a step number, got {name!r}")
    key = name.encode("utf-8")
    if len(key) > MAX_TAG_BYTES:
        raise UsageError(f"tag {name[:40]!r}... is longer than {MAX_TAG_BYTES} bytes")
    return key


def step_infos(txn, blobs: BlobStore) -> list[StepInfo]:
    """What retention needs to know of every committed step."""
    tagged = set(tags(txn, blobs).values())
    infos = []
    for key, raw in txn.cursor(db=blobs.dbs["steps"]).iternext():
        step = step_of(key)
        created = decode_manifest(raw).created
        infos.append(StepInfo(step, created, read_metrics(txn, blobs, step), step in tagged))
    return infos

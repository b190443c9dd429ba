"""Stepinfo records: what retention needs of one step, beside its manifest (pure: no I/O).

Every step's key in ``stepinfo`` holds a sealed msgpack map ``{"created": float,
"metrics": {str: float}}`` (see ``docs/format.md``, *stepinfo records*), so a retention
pass reads a few dozen bytes per step instead of decoding its manifest.  Records written
before that hold only ``metrics`` (and steps saved without metrics have none at all): for
those ``created`` is None and a reader takes it from the manifest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import msgpack

from ..errors import CorruptDataError
from .sealing import seal, unpack_untrusted, unseal


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One decoded ``stepinfo`` record."""

    created: float | None  #: UNIX time of the save; None in a record that predates the field
    metrics: dict[str, float] = field(default_factory=dict)  #: ``save(metrics=...)``, or empty
    save: SaveTimes | None = None  #: how the save went; None where not recorded (before 0.7)


@dataclass(frozen=True, slots=True)
class SaveTimes:
    """How long a step's save took and what it wrote, as its commit measured them."""

    seconds: float  #: from the call to ``save`` to the commit
    blocked_seconds: float  #: of those, the caller was blocked (all of them for a blocking save)
    written_bytes: int  #: stored bytes of the chunks and pages the save added


def encode_stepinfo(created: float, metrics: dict | None, save: SaveTimes | None = None) -> bytes:
    """The sealed record of a step saved at ``created`` with ``metrics`` (checked already).

    ``metrics`` is always present (an empty map when none were given), so a reader of the
    metrics-only records of formats 2 and 3 reads these too.  ``save`` adds the optional
    ``save`` field, which readers that predate it ignore.
    """
    body: dict = {"created": float(created), "metrics": dict(metrics or {})}
    if save is not None:
        body["save"] = [float(save.seconds), float(save.blocked_seconds), int(save.written_bytes)]
    return seal(msgpack.packb(body, use_bin_type=True))


def decode_stepinfo(raw, what: str) -> StepRecord:
    """A record as :func:`encode_stepinfo` (or formats 2 and 3) wrote it; ``what`` names it
    in errors.  Raises :class:`CorruptDataError` for a damaged or malformed record."""
    try:
        record = unpack_untrusted(unseal(raw, what))
        if not isinstance(record, dict):
            raise TypeError("not a map")
        metrics = record["metrics"]
        if not isinstance(metrics, dict):
            raise TypeError("metrics is not a map")
        created = record.get("created")
        if created is not None:
            if isinstance(created, bool) or not isinstance(created, (int, float)) or not math.isfinite(created):
                raise TypeError(f"created is {created!r}, not a finite number")
            created = float(created)
        return StepRecord(created, {str(k): float(v) for k, v in metrics.items()}, _save_times(record.get("save")))
    except (msgpack.UnpackException, ValueError, TypeError, KeyError, OverflowError) as exc:
        raise CorruptDataError(f"{what} is malformed: {exc}") from None


def _save_times(field) -> SaveTimes | None:
    if field is None:
        return None
    if not isinstance(field, list) or len(field) != 3:
        raise TypeError("save is not [seconds, blocked seconds, written bytes]")
    seconds, blocked, written = field
    for value in (seconds, blocked):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise TypeError(f"save time {value!r} is not a finite number >= 0")
    if isinstance(written, bool) or not isinstance(written, int) or written < 0:
        raise TypeError(f"save written bytes {written!r} is not an int >= 0")
    return SaveTimes(float(seconds), float(blocked), written)

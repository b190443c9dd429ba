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


def encode_stepinfo(created: float, metrics: dict | None) -> bytes:
    """The sealed record of a step saved at ``created`` with ``metrics`` (checked already).

    ``metrics`` is always present (an empty map when none were given), so a reader of the
    metrics-only records of formats 2 and 3 reads these too.
    """
    body = {"created": float(created), "metrics": dict(metrics or {})}
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
        return StepRecord(created, {str(k): float(v) for k, v in metrics.items()})
    except (msgpack.UnpackException, ValueError, TypeError, KeyError, OverflowError) as exc:
        raise CorruptDataError(f"{what} is malformed: {exc}") from None

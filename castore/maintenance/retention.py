"""Retention policies: which steps to keep (pure; the store deletes the rest).

``Keep(last=3, every=100_000, interval=3600, best=2, metric="return", mode="max")`` keeps
the union of what each rule keeps, plus every tagged step, plus the latest step.  An int
``keep=N`` means ``Keep(last=N)``, the elements habit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UsageError


@dataclass(frozen=True, slots=True)
class StepInfo:
    """What a policy may look at for one committed step."""

    step: int
    created: float  #: UNIX time of the save
    metrics: dict  #: ``{name: number}`` recorded with ``save(metrics=...)``
    tagged: bool


@dataclass(frozen=True, slots=True)
class Keep:
    """Keep the union of: the ``last`` N steps (by step number); the first step of every
    ``every`` steps (step numbers ``0..every-1``, ``every..2*every-1``, ...); the first step
    saved in each ``interval`` seconds; the ``best`` N steps by ``metric`` (``mode`` "max"
    or "min"; steps without the metric do not compete).  Tagged steps and the latest step
    are always kept.  A rule left at None keeps nothing by itself.
    """

    last: int | None = None
    every: int | None = None
    interval: float | None = None
    best: int | None = None
    metric: str | None = None
    mode: str = "max"

    def __post_init__(self):
        for name in ("last", "every", "best"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"Keep({name}=...) must be a positive int, got {value!r}")
        if self.interval is not None and not (isinstance(self.interval, (int, float)) and self.interval > 0):
            raise UsageError(f"Keep(interval=...) must be positive seconds, got {self.interval!r}")
        if (self.best is None) != (self.metric is None):
            raise UsageError("Keep(best=N) needs metric='name' and the other way round")
        if self.mode not in ("max", "min"):
            raise UsageError(f"Keep(mode=...) is 'max' or 'min', not {self.mode!r}")

    def select(self, steps: list[StepInfo]) -> set[int]:
        """The step numbers to keep among ``steps``."""
        if not steps:
            return set()
        ordered = sorted(steps, key=lambda s: s.step)
        keep = {ordered[-1].step} | {s.step for s in ordered if s.tagged}
        if self.last:
            keep |= {s.step for s in ordered[-self.last :]}
        if self.every:
            keep |= _first_per_bucket(ordered, lambda s: s.step // self.every)
        if self.interval:
            by_time = sorted(ordered, key=lambda s: (s.created, s.step))
            interval: float = self.interval
            keep |= _first_per_bucket(by_time, lambda s: math.floor(s.created / interval))
        if self.best:
            values = {s.step: _number(s.metrics.get(self.metric)) for s in ordered}
            scores = {step: value for step, value in values.items() if value is not None}
            sign = -1 if self.mode == "max" else 1
            ranked = sorted(scores, key=lambda step: (sign * scores[step], -step))
            keep |= set(ranked[: self.best])
        return keep


def policy_of(keep) -> Keep | None:
    """``None`` (keep everything), an int N (the last N) or a :class:`Keep`."""
    if keep is None or isinstance(keep, Keep):
        return keep
    if isinstance(keep, int) and not isinstance(keep, bool) and keep >= 1:
        return Keep(last=keep)
    raise UsageError(f"keep must be None, a positive int or castore.Keep(...), got {keep!r}")


def _first_per_bucket(ordered: list[StepInfo], bucket) -> set[int]:
    seen, keep = set(), set()
    for info in ordered:
        key = bucket(info)
        if key not in seen:
            seen.add(key)
            keep.add(info.step)
    return keep


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)

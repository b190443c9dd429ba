"""Retention policies: which steps to keep (pure; the store deletes the rest).

``Keep(last=3, every=100_000, interval=3600, best=2, metric="return", mode="max")`` keeps
the union of what each rule keeps, plus every tagged step, plus the latest step.  An int
``keep=N`` means ``Keep(last=N)``, the elements habit.

:class:`KeptIndex` makes the pass after each save cost what that save can change, not
the number of steps kept: see its docstring for why a few candidates suffice.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
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


class KeptIndex:
    """The steps a policy kept, indexed so that the pass after a save looks at the few
    steps that save can displace instead of all of them (pure; not thread-safe).

    Built from a *fixed point* of ``policy`` (what :meth:`Keep.select` kept: selecting
    again keeps all of it, since every rule keeps what it kept when only unkept steps go).
    When a step ``n`` is *appended* (a higher number than every kept step; for
    ``interval``, also no earlier time, with the times of the kept steps in step order),
    a kept step ``x`` keeps every reason it had, except in three cases: ``x`` was the
    latest, ``x`` was the oldest of the ``last`` window, or ``x`` was the ``best``-th by
    the metric (``n`` may outrank it).  The first of a block of ``every`` steps or of an
    ``interval`` stays first, since ``n`` comes after it; tags do not change.  So
    :meth:`plan_append` decides those at most three candidates, each with a bisection,
    exactly as :meth:`Keep.select` would decide them; anything else returns None (the
    caller selects over every step).  ``tests/test_retention.py`` checks the equivalence
    with Hypothesis.
    """

    def __init__(self, policy: Keep, kept: Iterable[StepInfo]):
        self.policy = policy
        ordered = sorted(kept, key=lambda s: s.step)
        self.infos: dict[int, StepInfo] = {s.step: s for s in ordered}  #: step -> info, ascending
        self._steps = [s.step for s in ordered]  # ascending
        keys = (self._rank_key(s) for s in ordered)
        self._ranked = sorted(key for key in keys if key is not None)  # best first
        self._monotone = all(a.created <= b.created for a, b in zip(ordered, ordered[1:]))  # times in step order

    @classmethod
    def select(cls, policy: Keep, infos: Iterable[StepInfo]) -> tuple[KeptIndex, list[int]]:
        """A full pass: the index of what ``policy`` keeps among ``infos``, and the rest."""
        infos = list(infos)
        keep = policy.select(infos)
        return cls(policy, (s for s in infos if s.step in keep)), sorted(s.step for s in infos if s.step not in keep)

    def plan_append(self, new: StepInfo) -> list[int] | None:
        """The kept steps to delete once untagged step ``new`` is added, or None if ``new``
        is no append (see the class docstring).  Changes nothing (see :meth:`append`)."""
        policy, steps = self.policy, self._steps
        if new.tagged or (steps and new.step <= steps[-1]):
            return None
        if policy.interval and steps and not (self._monotone and new.created >= self.infos[steps[-1]].created):
            return None
        candidates = set(steps[-1:])
        if policy.last and len(steps) >= policy.last:
            candidates.add(steps[-policy.last])
        if policy.best and len(self._ranked) >= policy.best:
            candidates.add(-self._ranked[policy.best - 1][1])
        new_key = self._rank_key(new)
        return sorted(step for step in candidates if not self._is_kept_after_append(step, new_key))

    def append(self, new: StepInfo, doomed: list[int]) -> None:
        """Record that ``new`` was added and ``doomed`` (from :meth:`plan_append`) deleted."""
        steps = self._steps
        if steps and new.created < self.infos[steps[-1]].created:
            self._monotone = False
        for step in doomed:
            info = self.infos.pop(step)
            del steps[bisect.bisect_left(steps, step)]
            key = self._rank_key(info)
            if key is not None:
                del self._ranked[bisect.bisect_left(self._ranked, key)]
        self.infos[new.step] = new
        steps.append(new.step)
        key = self._rank_key(new)
        if key is not None:
            bisect.insort(self._ranked, key)

    def _is_kept_after_append(self, step: int, new_key: tuple[float, int] | None) -> bool:
        """Whether :meth:`Keep.select` keeps ``step`` among the kept steps plus the new one."""
        policy, steps, info = self.policy, self._steps, self.infos[step]
        if info.tagged:
            return True
        index = bisect.bisect_left(steps, step)  # the same with the new step: it comes last
        if policy.last and index >= len(steps) + 1 - policy.last:
            return True
        if policy.every and steps[bisect.bisect_left(steps, step // policy.every * policy.every)] == step:
            return True  # the first of its block
        if policy.interval:  # times follow step order: first of its interval if its predecessor is not in it
            bucket = math.floor(info.created / policy.interval)
            if index == 0 or math.floor(self.infos[steps[index - 1]].created / policy.interval) != bucket:
                return True
        key = self._rank_key(info)
        if policy.best and key is not None:
            rank = bisect.bisect_left(self._ranked, key) + (new_key is not None and new_key < key)
            if rank < policy.best:
                return True
        return False

    def _rank_key(self, info: StepInfo) -> tuple[float, int] | None:
        """Where ``info`` ranks for ``best`` (lower is better), as :meth:`Keep.select` sorts."""
        if not self.policy.best:
            return None
        value = _number(info.metrics.get(self.policy.metric))
        if value is None:
            return None
        return (-value if self.policy.mode == "max" else value, -info.step)

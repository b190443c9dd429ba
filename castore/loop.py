"""The small clocks of a training loop: :class:`Every` (when to save) and :class:`Counter`
(the step, a checkpoint component), as DreamerV3 uses ``elements.when.Every`` and
``elements.Counter``.  Pure: no I/O."""

from __future__ import annotations

import time

from .errors import UsageError

__all__ = ["Counter", "Every"]


class Every:
    """``should_save = Every(10_000)`` (steps) or ``Every(seconds=900)``: the save_every habit.

    As ``elements.when.Every``: with ``steps``, it fires when the step reaches the next
    multiple of ``steps`` (whatever the step it is called with first: 0, 120, 210, 300,
    ... for ``Every(100)`` called every 30 steps); a negative interval fires on every
    call and 0 never.  The first call fires if ``initial`` and the run is fresh (step 0),
    but not at a step past 0: after a resume the next save comes at the next multiple,
    not right after the load.  With ``seconds``, it fires on the first call (if
    ``initial``) and then when that much time has passed since it last fired; with both,
    whichever comes first.
    """

    def __init__(self, steps: int | None = None, seconds: float | None = None, *, initial: bool = True):
        if steps is None and seconds is None:
            raise UsageError("Every needs steps= or seconds=")
        if seconds is not None and seconds < 0:
            raise UsageError("Every(seconds=...) must not be negative")
        self.steps, self.seconds, self.initial = steps, seconds, initial
        self._prev: int | None = None  # the multiple of steps it last fired at (or started from)
        self._last_time: float | None = None

    def __call__(self, step: int | None = None) -> bool:
        if self.steps is not None and self.seconds is None and self.steps < 0:
            return True
        if self.steps and step is None:
            raise UsageError("Every(steps=...) must be called with the current step")
        now = time.monotonic()
        first = self._last_time is None
        fire = False
        if self.steps and step is not None and self.steps > 0:
            step = int(step)
            if self._prev is None:
                self._prev = step - step % self.steps
                fire = self.initial and step == 0
            elif step >= self._prev + self.steps:
                self._prev += self.steps  # one interval per call, catching up as elements does
                fire = True
        if self.seconds is not None:
            if first:
                fire = fire or (self.initial and (not self.steps or step == 0 or self.steps < 0))
            elif now >= self._last_time + self.seconds:  # type: ignore[operator]
                fire = True
        if first or fire:
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

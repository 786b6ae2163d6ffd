"""How long a verification will take, measured on its first run.

Twice: early, from the rate of the first few training steps of the first run, extrapolated to every
step of every run (training only: the audits come on top); then, when the first run has been trained
and audited, from its whole duration times the runs still to come. The clock is passed in, so the
arithmetic is testable without timing anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

Say = Callable[[str], None]
MIN_STEPS = 5  # steps measured before the early estimate


def duration(seconds: float) -> str:
    """``4.2 s``, ``42 s``, ``3.5 min``, ``1.2 h``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class Estimator:
    """Call ``run_started(i)``, ``steps_done(step)`` as training goes, ``run_finished(i)``."""

    runs: int
    steps: int | None  # per run; None when unknown (the early estimate is then skipped)
    say: Say
    clock: Callable[[], float] = time.monotonic
    said: list[str] = field(default_factory=list, init=False)
    _run: int = field(default=-1, init=False)
    _run_start: float = field(default=0.0, init=False)
    _mark: tuple[int, float] | None = field(default=None, init=False)
    _early_done: bool = field(default=False, init=False)
    _spread_said: bool = field(default=False, init=False)

    def run_started(self, index: int) -> None:
        self._run, self._run_start, self._mark = index, self.clock(), None

    def steps_done(self, step: int) -> None:
        """``step`` steps of the current run are done (any origin: only differences are used)."""
        if self._run != 0 or self._early_done or self.steps is None:
            return
        now = self.clock()
        if self._mark is None:
            self._mark = (step, now)  # the first step carries start-up costs: measure from here
            return
        first, then = self._mark
        if step - first < MIN_STEPS:
            return
        rate = (now - then) / (step - first)
        self._early_done = True
        self._say(f"estimate: about {duration(rate * self.steps * self.runs)} of training for {self.runs} run(s) x "
                  f"{self.steps} steps ({rate:.3g} s/step over {step - first} steps of the first run; audits come "
                  "on top)")  # fmt: skip

    def run_finished(self, index: int) -> None:
        if index != 0 or self.runs < 2:
            return
        took = self.clock() - self._run_start
        self._say(f"run 1 of {self.runs} took {duration(took)} (trained and audited): about "
                  f"{duration(took * (self.runs - 1))} left for the other {self.runs - 1}")

    def spread_run_finished(self, elapsed: float, *, workers: int) -> None:
        """A run of a spread over ``workers`` processes finished, ``elapsed`` seconds after the spread
        began: the first one says how long the runs still to start will take, ``workers`` at a time."""
        if self._spread_said or self.runs <= workers:
            return
        self._spread_said = True
        rounds = -(-(self.runs - workers) // workers)
        self._say(f"the first of {self.runs} runs took {duration(elapsed)} (trained and audited, {workers} at a "
                  f"time): about {duration(elapsed * rounds)} left for the other {self.runs - 1}")

    def _say(self, text: str) -> None:
        self.said.append(text)
        self.say(text)


__all__ = ["MIN_STEPS", "Estimator", "duration"]

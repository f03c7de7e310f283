"""The time budget (``train.max_minutes``): how many iterations a run does, planned once.

The rule, which keeps the learning-rate schedule monotone:

1. A budgeted run starts on the configured ``train.max_iters`` and measures its speed over a
   window of at least ``calibration_steps`` steps and ``calibration_share`` of the budget (the
   first step of the process, which pays for allocations, is timed but not used). The speed is
   the mean step of the window's second half: the first steps of a run are slower than the rest
   (oneDNN chooses kernels for each new input shape, the allocator and caches warm up), and a
   plan fitted on them ends the run minutes early (a 10-minute run measured 0.26 s/step on steps
   2-11 and 0.19 s/step over the run).
2. It then fixes ``max_iters`` **once**, to the iterations the time left allows at that speed
   (``margin`` of it), and never to more than ``train.max_iters``: the configured count is the
   most a run does, the budget only ever shortens it. From then on the schedule is a function of
   the iteration alone, and since the count only went down, the schedule's progress
   (``iteration / max_iters``) only ever goes forward: the learning rate never moves backwards.
3. The run still ends on time: when the time spent reaches the budget before ``max_iters``, the
   run stops there (:meth:`TimeBudget.stop_at`), a time stop that cuts the schedule short rather
   than re-planning it; a run that turns out faster than measured ends at ``max_iters`` early.

``max_iters``, the time spent and whether the plan is fixed travel in every checkpoint, so a
resumed run continues the same plan with the budget left; one resumed before its plan was fixed
measures again. Time is read from an injected ``clock`` (``time.perf_counter`` unless a test gives
a fake one) and counts the training steps only (evaluation and checkpoint writing excluded), plus
whatever was spent before (``spent``: the backbone warm-up, an interrupted run's steps).
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

__all__ = ["TimeBudget"]


def _same(value: float) -> float:
    return value


class TimeBudget:
    """The run's length, fitted once to ``minutes`` of training (``minutes <= 0``: no budget).

    ``agree(value)`` returns the value every process uses (rank 0's; the identity in one process):
    the fitted count and the time stop are decided once for all processes.
    """

    def __init__(self, minutes: float, max_iters: int, *, spent: float = 0.0, fitted: bool = False,
                 calibration_steps: int = 10, calibration_share: float = 0.03, margin: float = 0.98,
                 clock: Callable[[], float] = time.perf_counter, agree: Callable[[float], float] = _same) -> None:
        self.seconds = max(0.0, minutes * 60.0)
        self.max_iters = int(max_iters)
        self.spent = float(spent)
        self.fitted = fitted or self.seconds == 0       # nothing to fit without a budget
        self.calibration_steps, self.margin = calibration_steps, margin
        self.calibration_seconds = calibration_share * self.seconds
        self.clock, self.agree = clock, agree
        self._step_seconds: list[float] = []              # this process's steps, the first one included

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Count the block (one training step) as training time."""
        start = self.clock()
        yield
        seconds = self.clock() - start
        self.spent += seconds
        self._step_seconds.append(seconds)

    def fit(self, iteration: int) -> str | None:
        """After ``iteration`` steps: fix ``max_iters`` if the calibration window is full and it is
        not fixed yet; returns the line that says so, else None."""
        window = self._step_seconds[1:]
        if (self.fitted or len(window) < self.calibration_steps or sum(window) < self.calibration_seconds
                or iteration >= self.max_iters):
            return None
        steady = window[len(window) // 2:]
        per_step = sum(steady) / len(steady)
        fits = iteration + int((self.seconds - self.spent) / per_step * self.margin)
        self.max_iters = int(self.agree(min(self.max_iters, max(iteration + 1, fits))))
        self.fitted = True
        capped = " (train.max_iters ends the run first)" if fits > self.max_iters else ""
        return (f"time budget {self.seconds / 60:g} min: {per_step:.2f} s/iteration -> "
                f"{self.max_iters} iterations{capped}")

    def out_of_time(self) -> bool:
        """True once the training time spent reaches the budget (the same answer on every process)."""
        return self.seconds > 0 and bool(self.agree(float(self.spent >= self.seconds)))

    def stop_at(self, iteration: int) -> None:
        """A time stop: the run ends at ``iteration``, its schedule cut short there."""
        self.max_iters = iteration

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the plan (``max_iters`` and ``elapsed`` under their old names)."""
        return {"max_iters": self.max_iters, "elapsed": self.spent, "plan_fitted": self.fitted}

"""The time budget (``train.max_minutes``): how many iterations a run does, and a schedule that
never moves backwards.

The rule:

1. A budgeted run starts on the configured ``train.max_iters`` (a cap: the budget only ever
   shortens a run) and measures its speed over a window of at least ``calibration_steps`` steps
   and ``calibration_share`` of the budget (the first step of the process, which pays for
   allocations, is timed but not used). The speed is the mean step of the window's second half:
   the first steps of a run are slower than the rest (oneDNN chooses kernels for each new input
   shape, the allocator and caches warm up), and a plan fitted on them ends the run minutes early
   (a 10-minute run measured 0.26 s/step on steps 2-11 and 0.19 s/step over the run).
2. It then plans ``max_iters``: the iterations the time left allows at that speed (``margin`` of
   it), never more than the cap.
3. Speeds drift after that (some detectors' steps keep getting faster for minutes), so the plan
   is made again when the time spent or the schedule's progress passes each of ``REPLAN_AT``
   (time catches a run that slowed down, progress one that sped up), from the mean step since the
   previous plan, once at least ``calibration_steps`` steps were taken.
4. The schedule is a function of the plan's **progress**, which each plan continues from where it
   stands: a plan made at iteration ``a`` with progress ``p`` gives
   ``p + (1 - p) * (i - a) / (max_iters - a)`` at iteration ``i``. Progress is continuous and only
   goes forward, so the learning rate never jumps and never moves backwards, and it reaches 1
   (the end of a cosine) at the planned end.
5. The run still ends on time: when the time spent reaches the budget before ``max_iters``, the
   run stops there (:meth:`TimeBudget.stop_at`), a time stop that cuts the schedule short; a run
   that turns out faster than planned ends at ``max_iters`` early.

The plan (``max_iters``, the progress anchor, the plans made), the time spent and whether the
first plan is made travel in every checkpoint, so a resumed run continues the same plan with the
budget left; one resumed before its first plan measures again. Time is read from an injected
``clock`` (``time.perf_counter`` unless a test gives a fake one) and counts the training steps only
(evaluation and checkpoint writing excluded), plus whatever was spent before (``spent``: the
backbone warm-up, an interrupted run's steps).
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

__all__ = ["TimeBudget", "REPLAN_AT"]

REPLAN_AT = (0.25, 0.5, 0.75)      # shares of the budget after which the plan is made again


def _same(value: float) -> float:
    return value


class TimeBudget:
    """The run's length, planned to ``minutes`` of training (``minutes <= 0``: no budget, the run
    does ``max_iters``).

    ``max_iters`` is the cap (``train.max_iters``); ``plan`` is a checkpoint's :meth:`state_dict` to
    continue. ``agree(value)`` returns the value every process uses (rank 0's; the identity in one
    process): the plans and the time stop are decided once for all processes.
    """

    def __init__(self, minutes: float, max_iters: int, *, plan: dict | None = None,
                 calibration_steps: int = 10, calibration_share: float = 0.03, margin: float = 0.98,
                 clock: Callable[[], float] = time.perf_counter, agree: Callable[[float], float] = _same) -> None:
        self.seconds = max(0.0, minutes * 60.0)
        self.cap = self.max_iters = int(max_iters)
        self.spent = 0.0
        self.fitted = self.seconds == 0                   # nothing to plan without a budget
        self.anchor: tuple[int, float] = (0, 0.0)         # (iteration, progress) where the current plan starts
        self.replans = 0                                  # how many of REPLAN_AT are behind
        if plan is not None:
            self.max_iters, self.spent = int(plan["max_iters"]), float(plan.get("elapsed", 0.0))
            self.fitted = self.fitted or plan.get("plan_fitted", True)
            self.anchor = tuple(plan.get("plan_anchor", (0, 0.0)))
            # a checkpoint from before re-planning keeps its single plan
            self.replans = int(plan.get("plan_replans", len(REPLAN_AT)))
        self.calibration_steps, self.margin = calibration_steps, margin
        self.calibration_seconds = calibration_share * self.seconds
        self.clock, self.agree = clock, agree
        self._step_seconds: list[float] = []              # this process's steps, the first one included
        self._since = 1                                   # the steps of the current plan's window start here

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Count the block (one training step) as training time."""
        start = self.clock()
        yield
        seconds = self.clock() - start
        self.spent += seconds
        self._step_seconds.append(seconds)

    def progress(self, iteration: int) -> float:
        """The schedule's progress at ``iteration``: from 0 to 1 at ``max_iters``, continuous across plans."""
        start, done = self.anchor
        return min(1.0, done + (1.0 - done) * max(0, iteration - start) / max(1, self.max_iters - start))

    def fit(self, iteration: int) -> str | None:
        """After ``iteration`` steps: make the first plan once its calibration window is full, or a new
        one when the time spent or the progress passed the next of ``REPLAN_AT``; returns the line that
        says so (None when nothing changed). Every decision is rank 0's: the conditions that are the
        same on every process (step counts, the plans made) are checked first, and only then is rank
        0's reading of the clock asked for, by every process at the same step."""
        window = self._step_seconds[self._since:]
        if (self.seconds == 0 or iteration >= self.max_iters or len(window) < self.calibration_steps
                or (self.fitted and self.replans >= len(REPLAN_AT))):
            return None
        if not self.fitted:
            if not self.agree(float(sum(window) >= self.calibration_seconds)):
                return None
            steady = window[len(window) // 2:]
            what = f"time budget {self.seconds / 60:g} min"
        else:
            if int(self.agree(self._passed(iteration))) <= self.replans:
                return None
            steady = window
            what = (f"time budget re-planned at iteration {iteration} ({self.spent / self.seconds:.0%} of the "
                    f"time, {self.progress(iteration):.0%} of the schedule)")
        per_step = sum(steady) / len(steady)
        fits = iteration + int((self.seconds - self.spent) / per_step * self.margin)
        planned = int(self.agree(min(self.cap, max(iteration + 1, fits))))
        changed = not self.fitted or planned != self.max_iters
        if changed:             # an unchanged plan keeps its anchor: the same LRs to the last bit
            self.anchor = (iteration, self.progress(iteration))
        self.max_iters, self.fitted = planned, True
        self.replans, self._since = int(self.agree(self._passed(iteration))), len(self._step_seconds)
        if not changed:
            return None
        capped = " (train.max_iters ends the run first)" if fits > self.max_iters else ""
        return f"{what}: {per_step:.2f} s/iteration -> {self.max_iters} iterations{capped}"

    def _passed(self, iteration: int) -> int:
        """How many of ``REPLAN_AT`` the time spent or the progress at ``iteration`` has passed."""
        done = max(self.spent / self.seconds, self.progress(iteration))
        return sum(done >= share for share in REPLAN_AT)

    def out_of_time(self) -> bool:
        """True once the training time spent reaches the budget (the same answer on every process)."""
        return self.seconds > 0 and bool(self.agree(float(self.spent >= self.seconds)))

    def stop_at(self, iteration: int) -> None:
        """A time stop: the run ends at ``iteration``, its schedule cut short there."""
        self.max_iters = iteration

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the plan (``max_iters`` and ``elapsed`` under their old names)."""
        return {"max_iters": self.max_iters, "elapsed": self.spent, "plan_fitted": self.fitted,
                "plan_anchor": list(self.anchor), "plan_replans": self.replans}

"""``metrics.jsonl``: a run's log, one JSON record a line.

A training record averages the losses over the steps since the previous one (the *window*)::

    {"iteration": 40, "lr": 0.01, "loss_cls": 0.61, "loss_box": 0.32, "images_per_s": 21.5,
     "epoch": 3.2, "skipped_steps": 0, "loss": 0.93}

an evaluation record holds the COCO numbers: ``{"iteration": 40, "eval": {"AP": ..., ...}}``. A
skipped step's NaN loss is written as ``null`` (strict JSON readers refuse NaN). A resumed run
first drops the records after its checkpoint's iteration: the interrupted run logged them, but
their steps were lost with it and are logged again.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

__all__ = ["MetricsLog", "json_safe", "scalars"]


def json_safe(record: dict) -> dict:
    """NaN/inf as null: strict JSON readers refuse NaN."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def scalars(metrics: dict) -> dict:
    """The numbers of an evaluation's result (per-class tables and the like left out)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


class MetricsLog:
    """The windowed loss averages of a run and the file they go to (written only when ``write``:
    rank 0; every process keeps the averages). ``clock`` times the window for ``images_per_s``."""

    def __init__(self, path: Path, write: bool = True, clock: Callable[[], float] = time.perf_counter) -> None:
        self.path, self.write, self.clock = Path(path), write, clock
        self._sums: dict[str, float] = {}
        self._steps = self._images = 0
        self._start = clock()

    def start(self, resumed_at: int | None = None) -> None:
        """A fresh run empties the file; a run resumed at an iteration forgets the records after it."""
        if not self.write:
            return
        if resumed_at is None:
            self.path.write_text("")
        elif self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if _iteration_of(line) <= resumed_at]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._start = self.clock()

    def add(self, losses: dict[str, float], images: int) -> None:
        """One step's losses (by name) and its images (all processes together)."""
        for name, value in losses.items():
            self._sums[name] = self._sums.get(name, 0.0) + value
        self._steps += 1
        self._images += images

    def close_window(self, iteration: int, lr: float, epoch: float, skipped_steps: int) -> dict:
        """The record of the window ending at ``iteration``, written out; the next window starts."""
        seconds = max(self.clock() - self._start, 1e-9)
        record = {"iteration": iteration, "lr": lr,
                  **{f"loss_{k}": v / max(1, self._steps) for k, v in self._sums.items()},
                  "images_per_s": self._images / seconds, "epoch": epoch, "skipped_steps": skipped_steps}
        record["loss"] = sum(v for k, v in record.items() if k.startswith("loss_"))
        self._append(record)
        self._sums, self._steps, self._images, self._start = {}, 0, 0, self.clock()
        return record

    def evaluation(self, iteration: int, metrics: dict) -> None:
        self._append({"iteration": iteration, "eval": scalars(metrics)})

    def _append(self, record: dict) -> None:
        if self.write:
            with open(self.path, "a") as f:
                f.write(json.dumps(json_safe(record)) + "\n")


def _iteration_of(line: str) -> float:
    """The iteration of a record; infinite for a line cut short by a kill (never kept)."""
    try:
        return int(json.loads(line)["iteration"])
    except (ValueError, KeyError, TypeError):
        return math.inf

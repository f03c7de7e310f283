"""The progress of a run on stderr: a ``tqdm`` bar on a terminal, plain periodic lines otherwise
(CI, log files), each ``[####----] done/total eta MM:SS text``."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from tqdm import tqdm

__all__ = ["ProgressDisplay", "say_to_stderr"]


def say_to_stderr(message: str) -> None:
    """A message line on stderr that leaves a progress bar intact (the bar is redrawn below it)."""
    tqdm.write(message, file=sys.stderr)
    sys.stderr.flush()


class ProgressDisplay:
    """Iterations done out of ``total`` with a text (the latest losses); ``enabled=False`` shows nothing."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled, self.total, self.initial = enabled, total, initial
        self.start = time.perf_counter()
        self.bar = None
        if enabled and self.stream.isatty():
            self.bar = tqdm(total=total, initial=initial, file=self.stream, dynamic_ncols=True, unit="it")

    def set_total(self, total: int) -> None:
        """The run's length changed (fitted to a time budget, or a time stop)."""
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def update(self, done: int, text: str) -> None:
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.refresh()
        elif self.enabled:
            self.stream.write(self.line(done, text, time.perf_counter() - self.start) + "\n")
            self.stream.flush()

    def line(self, done: int, text: str, seconds: float) -> str:
        """The plain line after ``seconds`` of this process (the ETA from its own rate)."""
        rate = (done - self.initial) / seconds if seconds > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else math.inf
        filled = min(24, int(24 * done / max(1, self.total)))
        eta_text = time.strftime("%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        return f"[{'#' * filled}{'-' * (24 - filled)}] {done}/{self.total} eta {eta_text} {text}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

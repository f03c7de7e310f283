"""What a finished run leaves for a person to look at: loss/LR curves, drawn predictions (ground truth
beside detections) and ``report.html``. ``finish`` looks each up here when it is called, so that a
test leaves the pictures out by replacing them in one place."""

from __future__ import annotations

from ..run_report import plot_curves, write_run_report
from ..visualize import draw_detections, draw_predictions

__all__ = ["plot_curves", "draw_detections", "draw_predictions", "write_run_report"]

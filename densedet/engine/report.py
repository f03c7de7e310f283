"""What a finished run leaves for a person to look at: loss/LR curves and drawn predictions."""

from __future__ import annotations

import json
from pathlib import Path

from ..visualize import draw_detections, draw_predictions

__all__ = ["plot_curves", "draw_detections", "draw_predictions"]


def plot_curves(jsonl: str | Path, out_png: str | Path) -> None:
    """Loss terms and learning rate against iteration, from ``metrics.jsonl``."""
    from matplotlib.figure import Figure
    rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval" in r]
    if not train_rows:
        return
    fig = Figure(figsize=(11, 3.6))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    its = [r["iteration"] for r in train_rows]
    for key in sorted({k for r in train_rows for k in r if k.startswith("loss")}):
        ax1.plot(its, [r.get(key, float("nan")) for r in train_rows], label=key)
    ax1.set_xlabel("iteration"), ax1.set_title("training loss"), ax1.legend(fontsize=7)
    ax2.plot(its, [r["lr"] for r in train_rows])
    ax2.set_xlabel("iteration"), ax2.set_title("learning rate")
    if evals:
        ax3.plot([r["iteration"] for r in evals], [r["eval"]["AP"] for r in evals], "o-", label="AP")
        ax3.plot([r["iteration"] for r in evals], [r["eval"]["AP50"] for r in evals], "o-", label="AP50")
        ax3.legend(fontsize=7)
    ax3.set_xlabel("iteration"), ax3.set_title("validation")
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)

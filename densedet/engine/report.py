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
    # a validation panel only when the run evaluated during training: no empty frames
    fig = Figure(figsize=(11 if evals else 7.5, 3.6))
    axes = fig.subplots(1, 3 if evals else 2)
    its = [r["iteration"] for r in train_rows]
    for key in sorted({k for r in train_rows for k in r if k.startswith("loss")}):
        axes[0].plot(its, [r.get(key, float("nan")) for r in train_rows], label=key)
    axes[0].set_xlabel("iteration"), axes[0].set_title("training loss"), axes[0].legend(fontsize=7)
    axes[1].plot(its, [r["lr"] for r in train_rows])
    axes[1].set_xlabel("iteration"), axes[1].set_title("learning rate")
    if evals:
        for key in ("AP", "AP50"):
            axes[2].plot([r["iteration"] for r in evals], [r["eval"][key] for r in evals], "o-", label=key)
        axes[2].legend(fontsize=7)
        axes[2].set_xlabel("iteration"), axes[2].set_title("validation")
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)

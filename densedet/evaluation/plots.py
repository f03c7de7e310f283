"""Precision-recall curve plots (PNG) from ``evaluate_coco`` / ``evaluate_voc`` results."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from .coco import coco_pr_curves

__all__ = ["plot_pr_curves", "plot_pr_grid"]

Curves = dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]

_RECALL_GRID = np.linspace(0.0, 1.0, 101)


def _curves_from(metrics_or_eval_state: Any) -> Curves:
    if isinstance(metrics_or_eval_state, dict):
        if "curves" not in metrics_or_eval_state:
            raise ValueError("plot_pr_curves needs the 'curves' entry that evaluate_coco / evaluate_voc return")
        return metrics_or_eval_state["curves"]
    if hasattr(metrics_or_eval_state, "eval") and "precision" in getattr(metrics_or_eval_state, "eval", {}):
        return coco_pr_curves(metrics_or_eval_state)
    raise TypeError(
        f"plot_pr_curves takes a metrics dict or an accumulated COCOeval, got {type(metrics_or_eval_state).__name__}"
    )


def _on_grid(recall: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Interpolated precision (101,) at recall 0, 0.01, ..., 1: best precision at any recall >= r, else 0.

    COCO curves already sit on this grid and are returned unchanged.
    """
    if recall.shape == _RECALL_GRID.shape and np.allclose(recall, _RECALL_GRID):
        return precision
    if recall.size == 0:
        return np.zeros_like(_RECALL_GRID)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, _RECALL_GRID, side="left")
    out = np.zeros_like(_RECALL_GRID)
    inside = idx < len(recall)
    out[inside] = envelope[idx[inside]]
    return out


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "class"


def plot_pr_curves(metrics_or_eval_state: Any, out_dir: str | os.PathLike) -> list[Path]:
    """Write one precision-recall PNG per class and one overall (mean over classes) PNG.

    Args:
        metrics_or_eval_state: the dict from ``evaluate_coco`` / ``evaluate_voc`` (its
            ``curves`` entry: COCO precision at 101 recall thresholds for IoU 0.50 and 0.75, area
            all, largest cap; VOC per-detection precision/recall), or an accumulated ``COCOeval``.
        out_dir: folder to write into (created if missing).

    Returns:
        Paths written: ``pr_<class>.png`` per class with ground truth, then ``pr_overall.png``.
        The overall curve averages each class's interpolated precision on the 101-point recall grid.
    """
    curves = _curves_from(metrics_or_eval_state)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    used_stems: set[str] = set()
    overall: dict[str, list[np.ndarray]] = {}
    for name, per_iou in curves.items():
        fig, ax = _new_figure()
        for label, (recall, precision) in per_iou.items():
            recall = np.asarray(recall, dtype=np.float64)
            precision = np.asarray(precision, dtype=np.float64)
            ax.plot(recall, precision, label=label)
            overall.setdefault(label, []).append(_on_grid(recall, precision))
        _finish(ax, f"precision-recall: {name}")
        stem = _file_stem(name)
        while stem in used_stems:  # two names that sanitise alike must not overwrite each other
            stem += "_"
        used_stems.add(stem)
        path = out / f"pr_{stem}.png"
        fig.savefig(path, dpi=80)
        paths.append(path)

    fig, ax = _new_figure()
    for label, grids in overall.items():
        ax.plot(_RECALL_GRID, np.mean(grids, axis=0), label=f"{label} (mean of {len(grids)} classes)")
    _finish(ax, "precision-recall: all classes")
    path = out / "pr_overall.png"
    fig.savefig(path, dpi=80)
    paths.append(path)
    return paths


def plot_pr_grid(metrics_or_eval_state: Any, out_png: str | os.PathLike, columns: int = 5) -> Path:
    """One PNG of small precision-recall panels, one per class (``columns`` a row), for a report page:
    the same curves as :func:`plot_pr_curves`, in one picture whatever the number of classes. The
    panels share their axes (ticks on the outer ones only: drawing tick labels is most of the cost)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = _curves_from(metrics_or_eval_state)
    columns = max(1, min(columns, len(curves)))
    rows = max(1, -(-len(curves) // columns))
    fig = Figure(figsize=(2.2 * columns + 0.6, 1.9 * rows + 0.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)
    for ax in axes.flat[len(curves):]:
        ax.set_visible(False)
    for ax, (name, per_iou) in zip(axes.flat, curves.items()):
        for label, (recall, precision) in per_iou.items():
            ax.plot(np.asarray(recall), np.asarray(precision), label=label, lw=1.2)
        ax.set_title(name, fontsize=9, pad=2)
    axes[0, 0].set_xlim(0.0, 1.0)
    axes[0, 0].set_ylim(0.0, 1.02)
    axes[0, 0].set_xticks([0, 0.5, 1], ["0", ".5", "1"])
    axes[0, 0].set_yticks([0, 0.5, 1], ["0", ".5", "1"])
    if curves:
        axes[0, 0].legend(fontsize=6, loc="lower left")
    else:
        fig.text(0.5, 0.5, "no class has ground truth", ha="center")
    fig.supxlabel("recall", fontsize=9)
    fig.supylabel("precision", fontsize=9)
    fig.subplots_adjust(left=0.6 / fig.get_figwidth() + 0.04, right=0.98, bottom=0.5 / fig.get_figheight() + 0.04,
                        top=1 - 0.3 / fig.get_figheight(), wspace=0.12, hspace=0.3)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=72)
    return out


def _new_figure() -> tuple[Any, Any]:
    """A figure on the Agg canvas: no pyplot, so no global backend switch and nothing to close."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _finish(ax: Any, title: str) -> None:
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left")

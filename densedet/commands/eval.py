"""Evaluate an existing COCO-format results file, without a model (``densedet eval`` calls this)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from densedet.evaluation.coco import evaluate_coco, format_table
from densedet.evaluation.voc import evaluate_voc_from_coco, format_voc_table

__all__ = ["eval_results_main", "METRICS"]

METRICS = ("coco", "voc07", "voc10")


def _json_number(value: float) -> float | None:
    # JSON has no NaN; a VOC class without ground truth is written as null.
    return None if isinstance(value, float) and math.isnan(value) else float(value)


def eval_results_main(
    results: str | os.PathLike,
    annotations: str | os.PathLike,
    metric: str = "coco",
    out: str | os.PathLike | None = None,
    max_dets: Sequence[int] = (1, 10, 100),
    plot_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate a COCO results JSON against a COCO annotation JSON, print the table, save the numbers.

    Args:
        results: path of ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``.
        annotations: path of the COCO ground truth.
        metric: "coco" (pycocotools AP/AR), "voc07" (11-point AP at IoU 0.5) or "voc10" (area AP).
        out: if given, the numbers are written there as JSON.
        max_dets: detection caps per image for "coco" (ignored by VOC, which keeps every detection).
        plot_dir: if given, precision-recall PNGs are written there.

    Returns:
        The JSON-ready numbers: for "coco" ``AP, AP50, AP75, APs, APm, APl, AR<caps>, ARs, ARm,
        ARl`` and ``per_class``; for VOC ``mAP`` and ``per_class`` (null for classes without GT).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric == "coco":
        metrics = evaluate_coco(results, annotations, max_dets=max_dets)
        print(format_table(metrics))
        numbers = {k: v for k, v in metrics.items() if k not in ("per_class", "curves")}
    else:
        metrics = evaluate_voc_from_coco(results, annotations, use_07_metric=(metric == "voc07"))
        print(format_voc_table(metrics))
        numbers = {"mAP": metrics["mAP"]}
    summary: dict[str, Any] = {k: _json_number(v) for k, v in numbers.items()}
    summary["per_class"] = {name: _json_number(v) for name, v in metrics["per_class"].items()}
    if out is not None:
        out_path = Path(out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {out_path}")
    if plot_dir is not None:
        from densedet.evaluation.plots import plot_pr_curves

        paths = plot_pr_curves(metrics, plot_dir)
        print(f"wrote {len(paths)} precision-recall plots to {plot_dir}")
    return summary

"""Evaluation: COCO (official pycocotools), Pascal VOC AP, precision-recall plots.

(``densedet eval`` on a results file is :func:`densedet.commands.eval.eval_results_main`.)
"""

from densedet.evaluation.coco import (
    coco_pr_curves,
    detections_to_coco,
    evaluate_coco,
    format_table,
    load_coco_annotations,
    load_coco_results,
    summarize_coco_eval,
)
from densedet.evaluation.plots import plot_pr_curves
from densedet.evaluation.voc import evaluate_voc, evaluate_voc_from_coco, format_voc_table, voc_ap

__all__ = [
    "coco_pr_curves",
    "detections_to_coco",
    "evaluate_coco",
    "evaluate_voc",
    "evaluate_voc_from_coco",
    "format_table",
    "format_voc_table",
    "load_coco_annotations",
    "load_coco_results",
    "plot_pr_curves",
    "summarize_coco_eval",
    "voc_ap",
]

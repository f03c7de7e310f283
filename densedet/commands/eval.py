"""``densedet eval``: COCO / VOC metrics of a checkpoint on its config's data (:func:`run`), or of an
existing COCO-format results file without a model (:func:`eval_results_main`)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config, ConfigError, apply_overrides
from ..data import DetectionData, align_classes, to_coco_dict
from ..device import default_device, resolve_precision
from ..engine.checkpoint import model_from_checkpoint
from ..engine.data import load_split
from ..engine.evaluate import eval_tiles, predict_dataset
from ..engine.metrics_log import scalars
from ..errors import UsageError
from ..evaluation import (evaluate_coco, evaluate_voc_from_coco, format_table, format_voc_table,
                          plot_pr_curves)
from ..run_report import write_report
from ..tta import tta_from_config
from . import require_folder

__all__ = ["add_parser", "run", "eval_checkpoint", "eval_results_main", "METRICS"]

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
    strict: bool = False,
) -> dict[str, Any]:
    """Evaluate a COCO results JSON against a COCO annotation JSON, print the table, save the numbers.

    Args:
        results: path of ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``.
        annotations: path of the COCO ground truth.
        metric: "coco" (pycocotools AP/AR), "voc07" (11-point AP at IoU 0.5) or "voc10" (area AP).
        out: if given, the numbers are written there as JSON.
        max_dets: detection caps per image for "coco" (ignored by VOC, which keeps every detection).
        plot_dir: if given, precision-recall PNGs are written there.
        strict: refuse ground-truth boxes of zero/negative size or with NaN/inf coordinates
            instead of leaving them out (counted and logged).

    Returns:
        The JSON-ready numbers: for "coco" ``AP, AP50, AP75, APs, APm, APl, AR<caps>, ARs, ARm,
        ARl`` and ``per_class``; for VOC ``mAP`` and ``per_class`` (null for classes without GT).
    """
    if metric not in METRICS:
        raise UsageError(f"--metric must be one of {METRICS}, got {metric!r}")
    if metric == "coco":
        metrics = evaluate_coco(results, annotations, max_dets=max_dets, strict=strict)
        print(format_table(metrics))
        numbers = {k: v for k, v in metrics.items() if k not in ("per_class", "curves")}
    else:
        metrics = evaluate_voc_from_coco(results, annotations, use_07_metric=(metric == "voc07"), strict=strict)
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
        paths = plot_pr_curves(metrics, plot_dir)
        print(f"wrote {len(paths)} precision-recall plots to {plot_dir}")
    return summary


# -- a checkpoint -----------------------------------------------------------------------------------

def _model_and_config(args: argparse.Namespace) -> tuple[nn.Module, Config]:
    """The checkpoint's model and config, ``model.*`` overrides applied to the model, not only to the config."""
    if getattr(args, "backend", "torch") != "torch":
        return _deployed_model_and_config(args)
    model, cfg, _ = model_from_checkpoint(args.weights)
    cfg = apply_overrides(cfg, args.overrides)
    model_keys = [o.split("=", 1)[0].strip()[len("model."):] for o in args.overrides
                  if o.strip().startswith("model.")]
    if model_keys:  # model.* overrides (score_thresh, min_size, ...) must reach the model, not only cfg
        model, _, _ = model_from_checkpoint(args.weights, **{k: getattr(cfg.model, k) for k in model_keys})
    return model, cfg


def _deployed_model_and_config(args: argparse.Namespace) -> tuple[nn.Module, Config]:
    """An exported model (``--backend onnxruntime|openvino``) and the config its sidecar carries."""
    from ..config import from_dict, upgrade_config_dict
    from ..deploy import load_deployed, read_sidecar
    meta = read_sidecar(args.weights)
    if "config" not in meta:
        raise UsageError(f"--backend {args.backend}: {args.weights} has no training config in its sidecar; "
                         "export it from a checkpoint with densedet export")
    cfg = apply_overrides(from_dict(Config, upgrade_config_dict(meta["config"])), args.overrides)
    if any(o.strip().startswith("model.") for o in args.overrides):
        raise UsageError(f"--backend {args.backend}: model.* overrides need the torch backend (the exported "
                         "graph is fixed; re-export with densedet export)")
    return load_deployed(args.weights, args.backend), cfg


def _split_for(cfg: Config, args: argparse.Namespace, class_names: list[str] | None) -> DetectionData:
    """The split to evaluate on, its labels matched by name to the model's ``class_names`` (when the
    checkpoint has them); its class count must be the model's."""
    data = load_split(cfg.data, args.split)
    if class_names:
        data = align_classes(data, class_names)
    if data.num_classes != cfg.model.num_classes:
        raise ConfigError(f"model.num_classes of {args.weights} is {cfg.model.num_classes} but the {args.split} data "
                          f"has {data.num_classes} classes ({', '.join(data.class_names[:12])})")
    return data


def _write_metrics(metrics: dict[str, Any], results: list[dict], out: str) -> None:
    """``out``: the numbers as JSON (curves and raw arrays left out); ``<out stem>_detections.json`` beside it."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(
        {k: v for k, v in metrics.items() if k not in ("curves", "precision", "recall")}, indent=2, default=float))
    Path(out).with_name(Path(out).stem + "_detections.json").write_text(json.dumps(results))


def eval_checkpoint(args: argparse.Namespace) -> int:
    """``densedet eval --weights CKPT``: predict the split (with the config's TTA), print the table."""
    model, cfg = _model_and_config(args)
    deployed = getattr(args, "backend", "torch") != "torch"    # an exported model: CPU, its own precision
    device = torch.device("cpu") if deployed else default_device()
    dtype = None if deployed else resolve_precision(args.precision, device)
    model.to(device)
    data = _split_for(cfg, args, getattr(model, "class_names", None))
    tta = None if deployed else tta_from_config(cfg.test)
    if tta is not None:
        print(f"test-time augmentation (test.tta_*): {tta.describe()}; test.tta_scales=[] evaluates single-scale",
              file=sys.stderr)
    results = predict_dataset(model, data, cfg.test.batch_size, device, dtype, tta=tta, tiles=eval_tiles(cfg.data))
    gt = to_coco_dict(data)
    if args.metric == "coco":
        metrics = evaluate_coco(results, gt, max_dets=tuple(args.max_dets))
        print(format_table(metrics))
    else:
        metrics = evaluate_voc_from_coco(results, gt, use_07_metric=args.metric == "voc07")
        print(format_voc_table(metrics))
    if args.plot_dir:
        plot_pr_curves(metrics, args.plot_dir)
    if args.out:
        _write_metrics(metrics, results, args.out)
    if args.report:
        summary = {**scalars(metrics), "per_class": metrics["per_class"]} if args.metric == "coco" else None
        what = f"{args.weights} on the {args.split} split, {tta.describe() if tta is not None else 'single scale'}"
        path = write_report(args.report, cfg, data, results, summary, command=sys.argv,
                            run_dir=Path(args.weights).parent, detections=what)
        print(f"wrote {path}")
    return 0


# -- the command ------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    """``densedet eval``: a results file (``--results``) or a checkpoint (``--weights``); the exit code."""
    if min(args.max_dets) < 1 or len(set(args.max_dets)) != len(args.max_dets):
        raise UsageError(f"--max-dets: three distinct positive counts, got {' '.join(map(str, args.max_dets))}")
    if args.results:
        if not args.annotations:
            raise UsageError("--results: needs --annotations A.json (the COCO ground truth to evaluate against)")
        if args.report:
            raise UsageError("--report: needs --weights CKPT (the page shows the model's detections on its images)")
        eval_results_main(args.results, args.annotations, metric=args.metric, out=args.out,
                          max_dets=tuple(args.max_dets), plot_dir=args.plot_dir, strict=args.strict)
        return 0
    if not args.weights:
        raise UsageError("needs --weights CKPT (evaluate a model) or --results R.json --annotations A.json")
    require_folder(args.report, "--report", "report.html and report/")
    return eval_checkpoint(args)


def add_parser(subparsers: Any) -> None:
    """Register ``densedet eval``."""
    p = subparsers.add_parser(
        "eval", help="COCO / VOC metrics of a checkpoint or of a results file",
        description="Evaluate a checkpoint on its config's validation split (--weights), or an "
        "existing COCO results file against COCO annotations without a model (--results, "
        "--annotations). A checkpoint whose config sets test.tta_scales is evaluated with that "
        "test-time augmentation (override test.tta_scales=[] for single scale). Prints the table; "
        "--out writes the numbers as JSON.")
    p.add_argument("overrides", nargs="*", help="config overrides for --weights, e.g. data.val=other.json")
    p.add_argument("--weights", help="a densedet checkpoint")
    p.add_argument("--results", help="a COCO results JSON to evaluate without a model")
    p.add_argument("--annotations", help="COCO annotations JSON (with --results)")
    p.add_argument("--metric", choices=list(METRICS), default="coco")
    p.add_argument("--max-dets", type=int, nargs=3, default=[1, 10, 100], metavar=("D1", "D2", "D3"),
                   help="COCO maxDets (default 1 10 100; the last one caps AP too)")
    p.add_argument("--split", choices=["train", "val", "tune"], default="val",
                   help="tune: the digit scenes held out for choosing test-time settings (data.num_tune)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--backend", choices=["torch", "onnxruntime", "openvino"], default="torch",
                   help="onnxruntime / openvino: --weights is a file written by densedet export (its sidecar "
                        "carries the config); single scale on the CPU, no TTA (pip install 'densedet[deploy]')")
    p.add_argument("--out", help="write metrics JSON here")
    p.add_argument("--plot-dir", help="write precision-recall curves (PNG) here")
    p.add_argument("--report", metavar="DIR",
                   help="with --weights: write DIR/report.html (metrics, curves, confusion matrix, errors, a gallery "
                        "worst first, the data and anchor analysis, the config) and its pictures in DIR/report/")
    p.add_argument("--strict", action="store_true",
                   help="with --results: refuse ground-truth boxes of zero/negative size or NaN/inf coordinates "
                        "(default: leave them out of the evaluation, counted in a warning)")
    p.set_defaults(func=run)

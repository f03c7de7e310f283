"""The end of a run: final evaluation, ``model_final.pt``, ``metrics.json`` and the pictures.

The final weights (the weight average when the run keeps one) are evaluated single-scale and,
when ``test.tta_scales`` is set, with test-time augmentation too: ``metrics.json`` then reports
the TTA numbers and keeps the plain ones under ``single_scale``; ``model_best.pt`` is chosen on
the single-scale AP, as the periodic evaluations are. Curves and drawn predictions are a
convenience: a failure there is reported and never loses a finished run.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import Config
from ..data import DetectionData
from ..evaluation import format_table
from ..tta import tta_from_config
from . import report
from .checkpointing import Checkpointer
from .evaluate import eval_tiles, evaluate_model
from .metrics_log import scalars

__all__ = ["RunTotals", "finish_run"]


@dataclass
class RunTotals:
    """What the training loop leaves for the report."""

    iterations: int
    max_iters: int
    train_seconds: float         # the warm-up and earlier (resumed) runs included
    images: int                  # samples drawn, all processes together
    skipped_steps: int
    best_ap: float               # of the periodic evaluations; -1 without any
    pretrain: dict               # the warm-up's statistics; {} without one

    @property
    def detect_seconds(self) -> float:
        return self.train_seconds - self.pretrain.get("seconds", 0.0)

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.detect_seconds, 1e-9)

    def done_line(self) -> str:
        detecting = f" ({self.detect_seconds / 60:.1f} detecting)" if self.pretrain else ""
        return (f"training done: {self.iterations} iterations, {self.train_seconds / 60:.1f} min of training"
                f"{detecting}, {self.images_per_s:.1f} images/s, {self.skipped_steps} skipped steps")


def finish_run(cfg: Config, model: nn.Module, val_data: DetectionData, device: torch.device,
               dtype: torch.dtype | None, totals: RunTotals, checkpoints: Checkpointer, is_main: bool,
               say: Callable[[str], None]) -> dict:
    """Evaluate the final ``model`` (every process takes part), then on rank 0 write model_final.pt
    (and model_best.pt when it beats the periodic evaluations), metrics.json and the pictures.
    Returns the summary written to metrics.json (``{}`` on the other processes)."""
    say(totals.done_line())
    evaluate = functools.partial(evaluate_model, model, val_data, cfg.test.batch_size, device, dtype,
                                 cfg.test.max_dets, tiles=eval_tiles(cfg.data))
    metrics = single = evaluate()
    from .tune import choose_test_time     # test.tta_choose: the TTA chosen on the tune split (engine/tune.py)
    cfg = choose_test_time(cfg, model, device, dtype, say)
    tta = tta_from_config(cfg.test)
    if tta is not None:     # the reported numbers are then the TTA ones; the best checkpoint is chosen single-scale
        say(f"single scale: AP {single['AP']:.3f}, AP50 {single['AP50']:.3f}; now with test-time augmentation "
            f"({tta.describe()})")
        metrics = evaluate(tta=tta)
    if not is_main:
        return {}
    checkpoints.save_final(model, totals.iterations, totals.max_iters, scalars(metrics),
                           best=single["AP"] > totals.best_ap)
    summary = {**scalars(metrics), "per_class": metrics.get("per_class", {}), "iterations": totals.iterations,
               "train_minutes": totals.train_seconds / 60, "images_per_s": totals.images_per_s,
               "skipped_steps": totals.skipped_steps, "precision": str(dtype or "fp32")}
    if tta is not None:
        summary["tta"] = {"scales": list(tta.scales), "flip": tta.flip, "rotate": tta.rotate, "merge": tta.merge}
        summary["single_scale"] = scalars(single)
    if totals.pretrain:
        summary["pretrain"] = totals.pretrain
    out = checkpoints.final_path.parent
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    say(format_table(metrics))
    _draw(cfg, model, val_data, device, out, say)
    try:
        report.write_run_report(cfg, model, val_data, device, dtype, out, say)
    except Exception as err:  # noqa: BLE001 - the page is a convenience too; never lose a finished run to it
        say(f"(could not write report.html: {err})")
    say(f"run folder: {out} (model_final.pt, model_best.pt, metrics.json, metrics.jsonl, curves.png, predictions/, "
        f"report.html)")
    return summary


def _draw(cfg: Config, model: nn.Module, val_data: DetectionData, device: torch.device, out: Path,
          say: Callable[[str], None]) -> None:
    """curves.png and predictions/ (``report``'s functions, looked up on the module when called), each
    on its own: a failure in one is reported and loses neither the other nor the run."""
    try:
        report.plot_curves(out / "metrics.jsonl", out / "curves.png")
    except Exception as err:  # noqa: BLE001 - plots are a convenience; never lose a finished run to them
        say(f"(could not draw plots: {err})")
    try:
        report.draw_predictions(model, val_data, out / "predictions", cfg.test.num_vis, device)
    except Exception as err:  # noqa: BLE001 - as above
        say(f"(could not draw predictions: {err})")

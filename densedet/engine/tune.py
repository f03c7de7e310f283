"""Choosing the test-time augmentation after training, on the held-out ``tune`` split (``test.tta_choose``).

The rule: evaluate the trained model single-scale and with each candidate set (:func:`candidate_sets`)
on the tune images (a slice of the training annotations left out of training, ``data.tune_fraction``;
never the validation images, whose numbers are the run's result); keep the set with the highest AP
if it beats single scale by more than the resolution of AP on the tune split (``1 / N`` for its N
scored objects: one detection more or less moves AP by about that much), and no TTA at all otherwise.
When the winner is a scale set and the mirror alone beat single scale too, the scale set with the
mirror added is also tried, and kept if it beats the winner by the same margin.

The choice is written to the run folder's ``config.yaml`` (``test.tta_scales`` / ``tta_flip`` /
``tta_rotate`` / ``tta_merge``, so ``densedet eval`` applies it) and to ``tta_choice.json``, which
``densedet train`` adds to ``metrics.json`` as ``tta_choice``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..config import Config, save_config
from ..tta import TTAConfig, model_input_size
from .data import load_split
from .evaluate import eval_tiles, evaluate_model

__all__ = ["candidate_sets", "choose_tta", "choose_test_time", "record_choice", "CHOICE_FILE"]

CHOICE_FILE = "tta_choice.json"
# Scale sets relative to the model's own input size: a mild and a wide up-scaling (small objects gain
# most from larger inputs: the demo's TTA section), and one that also looks at a smaller scale.
SCALE_SETS = ((1.0, 1.2), (1.0, 1.1, 1.2, 1.3, 1.4), (0.8, 1.0, 1.2))


def candidate_sets(base: int, flip: bool, multiple: int = 32, rotate: bool = False) -> list[TTAConfig]:
    """The sets tried: :data:`SCALE_SETS` around ``base``, merged by box voting (1.0 is ``base`` itself, the
    model's own scale; the others are rounded to ``multiple``); the mirror alone when the model was trained
    with flips (``flip``), and the quarter turns (with their mirrors) when it was trained with them (``rotate``)."""
    out = []
    if flip:
        out.append(TTAConfig(scales=(base,), flip=True, merge="vote"))
    if rotate:
        out.append(TTAConfig(scales=(base,), flip=flip, rotate=True, merge="vote"))
    for ratios in SCALE_SETS:
        scales = tuple(dict.fromkeys(base if r == 1.0 else max(multiple, int(round(base * r / multiple)) * multiple)
                                     for r in ratios))
        out.append(TTAConfig(scales=scales, flip=False, merge="vote"))
    return out


def choose_tta(evaluate: Callable[[TTAConfig | None], dict], candidates: list[TTAConfig],
               metric: str = "AP", margin: float = 0.0) -> tuple[TTAConfig | None, list[dict]]:
    """The candidate whose ``evaluate(tta)[metric]`` is highest if it beats ``evaluate(None)`` (single
    scale) by more than ``margin``, else None; then, when that is a scale set and the mirror alone (one
    scale) beat single scale by more than ``margin`` too, the scale set with the mirror added, if that
    beats the first choice by more than ``margin``.
    Returns the choice and the table of every evaluation (``{"tta", metric}`` rows)."""
    single = float(evaluate(None)[metric])
    rows = [{"tta": "single scale", metric: single}]

    def score(candidate: TTAConfig) -> float:
        value = float(evaluate(candidate)[metric])
        rows.append({"tta": candidate.describe(), metric: value})
        return value
    scored = [(candidate, score(candidate)) for candidate in candidates]
    best, best_value = None, single + margin
    for candidate, value in scored:
        if value > best_value:
            best, best_value = candidate, value
    # the mirror doubles a scale set's passes; the turns would multiply them by eight, so they stay a set alone
    mirror_helped = any(c.flip and not c.rotate and len(c.scales) == 1 and v > single + margin for c, v in scored)
    if best is not None and len(best.scales) > 1 and not best.flip and mirror_helped:
        both = dataclasses.replace(best, flip=True)
        if score(both) > best_value + margin:
            best = both
    return best, rows


def choose_test_time(cfg: Config, model: nn.Module, device: torch.device, dtype: torch.dtype | None,
                     say: Callable[[str], None]) -> Config:
    """``cfg`` with ``test.tta_*`` chosen on the tune split when ``test.tta_choose`` is set (else ``cfg``).
    Every process evaluates (the evaluation is shared); rank 0 writes ``config.yaml`` and ``tta_choice.json``."""
    if not cfg.test.tta_choose:
        return cfg
    tune = load_split(cfg.data, "tune")
    base = model_input_size(model)
    multiple = 64 if cfg.model.arch == "refinedet" else 32

    def evaluate(tta: TTAConfig | None) -> dict:
        return evaluate_model(model, tune, cfg.test.batch_size, device, dtype, cfg.test.max_dets, tta=tta,
                              tiles=eval_tiles(cfg.data))

    objects = sum(int((~r.iscrowd).sum()) for r in tune.records)
    margin = 1.0 / max(1, objects)
    mirrored = cfg.data.hflip_prob > 0 and cfg.data.hflip_keeps_class    # the mirror only where it was taught
    chosen, rows = choose_tta(evaluate, candidate_sets(base, mirrored, multiple, cfg.data.rotate90), margin=margin)
    say(f"test-time augmentation chosen on {len(tune.records)} tune images ({objects} objects: a set must beat "
        f"single scale by more than 1/{objects} = {margin:.4f} AP): "
        f"{chosen.describe() if chosen else 'none (no set beats single scale by that)'}")
    for row in rows:
        say(f"  tune AP {row['AP']:.4f}  {row['tta']}")
    out = copy.deepcopy(cfg)
    out.test.tta_scales = list(chosen.scales) if chosen else []
    out.test.tta_flip = bool(chosen.flip) if chosen else False
    out.test.tta_rotate = bool(chosen.rotate) if chosen else False
    out.test.tta_merge = chosen.merge if chosen else cfg.test.tta_merge
    if not dist.is_initialized() or dist.get_rank() == 0:
        run = Path(cfg.train.output_dir)
        save_config(out, run / "config.yaml")
        record = {"chosen": {"scales": out.test.tta_scales, "flip": out.test.tta_flip,
                             "rotate": out.test.tta_rotate, "merge": out.test.tta_merge}
                  if chosen else None, "tune_images": len(tune.records), "tune_objects": objects,
                  "margin": margin, "evaluations": rows}
        (run / CHOICE_FILE).write_text(json.dumps(record, indent=2))
    return out


def record_choice(run_dir: str | Path, summary: dict) -> dict:
    """Add the run's ``tta_choice.json`` (when it has one) to ``metrics.json`` and to ``summary``, as ``tta_choice``.
    An empty ``summary`` (what ``train`` returns on processes other than rank 0) is left alone, and the files too:
    rank 0 alone writes them, and may be writing them now."""
    if not summary:
        return summary
    run = Path(run_dir)
    choice, metrics = run / CHOICE_FILE, run / "metrics.json"
    if not choice.is_file() or not metrics.is_file():
        return summary
    record = json.loads(choice.read_text())
    written = json.loads(metrics.read_text())
    written["tta_choice"] = record
    metrics.write_text(json.dumps(written, indent=2))
    return {**summary, "tta_choice": record}

"""The paper's data arguments, measured on your dataset and your anchors (``densedet analyze``).

Lin et al. (2017) build RetinaNet on two observations about dense detection (seed 001):

1. **Class imbalance.** A one-stage detector scores ~100k anchors per image, of which only a few
   are foreground: foreground : background is about 1 : 1000 (section 3). Here: foreground,
   ignored and background anchors per image under the configured matcher.
2. **Anchor coverage.** An anchor is foreground only at IoU >= 0.5 with a ground-truth box, so a
   box whose best anchor stays below 0.5 "corresponds to no anchor" (kept only by the low-quality
   rule, if it is on). Here: the fraction of boxes whose best anchor IoU is below the foreground
   and the background thresholds, by box size, and what other anchor settings would achieve.

Boxes are measured where the anchors see them: after the model's own resize (its preprocessor in
eval mode: ``min_size[-1]`` / ``max_size``, as for a ``scale_as`` image if set, or ``fixed_size``),
computed from the record's width/height without decoding pixels. Each image is padded on its own, as
the preprocessor pads a batch of it alone (in a training batch, padding to the largest image adds
background anchors only).

:func:`analyze` returns the numbers as a dict; the ``densedet analyze`` command
(:mod:`densedet.commands.analyze`) prints a summary and writes ``analysis.json`` and PNG plots
(``box_sizes.png``, ``coverage_by_size.png``, ``imbalance_per_image.png``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .boxes import box_iou
from .config import Config, ConfigError, ModelConfig, with_model_options
from .data import DetectionData, record_size
from .engine.data import load_split  # re-exported: analysis needs the same splits as training
from .matching import BACKGROUND, IGNORE, PaddedTargets, pad_targets
from .models import build_from_config
from .models.base import DenseDetector

__all__ = ["load_split", "dataset_statistics", "resized_image_size", "AnchorSetup", "anchor_setup",
           "prepare_images", "PreparedImage", "anchor_statistics", "coverage", "default_candidates",
           "candidate_coverage", "analyze", "SIZE_BINS"]

# Box size bins (sqrt of area, in resized-image pixels). 32 and 96 are COCO's small/medium/large
# edges; the powers of two match the anchor octaves (32 · 2^k at P3..P7).
SIZE_BINS: tuple[float, ...] = (0.0, 16.0, 32.0, 64.0, 96.0, 128.0, 256.0, 512.0, math.inf)


# -- data ----------------------------------------------------------------------------------------

def _quantiles(values: np.ndarray, qs: Sequence[float] = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)) -> dict[str, float]:
    if values.size == 0:
        return {}
    return {f"p{int(round(q * 100))}": float(np.quantile(values, q)) for q in qs}


def dataset_statistics(data: DetectionData) -> dict[str, Any]:
    """Counts and distributions of one split, in original image pixels.

    Returns a JSON-ready dict: ``images``, ``images_without_boxes``, ``boxes``, ``crowd_boxes``,
    ``boxes_per_image`` (mean and quantiles), ``box_size`` (sqrt(area) quantiles),
    ``aspect_ratio`` (h/w quantiles), ``class_counts`` (by class name, crowd boxes excluded) and
    ``image_sizes`` (the five most common (h, w)).
    """
    per_image = np.array([len(r) for r in data.records], dtype=np.int64)
    boxes = [r.boxes[~r.iscrowd] for r in data.records]
    all_boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)
    w = (all_boxes[:, 2] - all_boxes[:, 0]).astype(np.float64)
    h = (all_boxes[:, 3] - all_boxes[:, 1]).astype(np.float64)
    labels = np.concatenate([r.labels[~r.iscrowd] for r in data.records]) if data.records else np.zeros(0, np.int64)
    counts = np.bincount(labels, minlength=data.num_classes) if labels.size else np.zeros(data.num_classes, np.int64)
    sizes: dict[tuple[int, int], int] = {}
    for r in data.records:
        if r.height is not None and r.width is not None:
            sizes[(int(r.height), int(r.width))] = sizes.get((int(r.height), int(r.width)), 0) + 1
    common = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
    return {
        "source": data.source,
        "images": len(data.records),
        "images_without_boxes": int((per_image == 0).sum()),
        "boxes": int(per_image.sum()),
        "crowd_boxes": int(sum(int(r.iscrowd.sum()) for r in data.records)),
        "boxes_per_image": {"mean": float(per_image.mean()) if per_image.size else 0.0,
                            **_quantiles(per_image.astype(np.float64))},
        "box_size": _quantiles(np.sqrt(w * h)),
        "aspect_ratio": _quantiles(h / np.maximum(w, 1e-12)),
        "class_counts": {name: int(c) for name, c in zip(data.class_names, counts.tolist())},
        "image_sizes": [{"height": hh, "width": ww, "images": n} for (hh, ww), n in common],
    }


# -- the model's view: resize, anchors, matching ---------------------------------------------------

def resized_image_size(preprocessor, height: int, width: int) -> tuple[int, int]:
    """The size an ``ImagePreprocessor`` in eval mode resizes an ``height x width`` image to
    (the preprocessor's own arithmetic, so it agrees to the pixel without touching image data)."""
    return preprocessor.resized_size(height, width)


@dataclass
class AnchorSetup:
    """What the analysis needs from a model.

    ``anchors(padded_hw) -> [A, 4]``; ``match(anchors [A, 4], PaddedTargets) -> [B, A]`` matched
    box index, ``BACKGROUND`` (-1) or ``IGNORE`` (-2); thresholds for the coverage numbers;
    ``anchor_sizes`` per level (for the plots).
    """

    preprocessor: Any
    anchors: Callable[[tuple[int, int]], Tensor]
    match: Callable[[Tensor, PaddedTargets], Tensor]
    fg_iou_thresh: float
    bg_iou_thresh: float
    anchor_sizes: list[list[float]]
    aspect_ratios: list[float]


def anchor_setup(model: DenseDetector, model_cfg: ModelConfig | None = None) -> AnchorSetup:
    """Adapt a built model through its :class:`~densedet.models.base.DenseDetector` interface:
    ``preprocessor``, ``anchors``, ``match`` and ``anchor_spec``.

    Feature map sizes follow from the padded size (:meth:`DenseDetector.grid_sizes`), checked
    against ``dense_forward`` in the tests.
    """
    spec = model.anchor_spec()
    return AnchorSetup(model.preprocessor, model.anchors_for_size, model.match, spec.fg_iou_thresh,
                       spec.bg_iou_thresh, spec.sizes, spec.aspect_ratios)


@dataclass
class PreparedImage:
    """One image as the model sees it: ``boxes [G, 4]`` (resized pixels, crowd excluded),
    ``crowd [C, 4]``, ``resized (h, w)`` and ``padded (Hp, Wp)``."""

    image_id: int
    resized: tuple[int, int]
    padded: tuple[int, int]
    boxes: Tensor
    crowd: Tensor


def prepare_images(data: DetectionData, preprocessor, indices: Sequence[int] | None = None) -> list[PreparedImage]:
    """Resize each record's boxes by the preprocessor's rule and compute its padded size."""
    out = []
    for i in (range(len(data.records)) if indices is None else indices):
        record = data.records[i]
        h, w = record_size(record, data.source)
        nh, nw = resized_image_size(preprocessor, h, w)
        ratio = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=torch.float32)
        boxes = torch.from_numpy(record.boxes).float() * ratio
        crowd = torch.from_numpy(record.iscrowd)
        out.append(PreparedImage(record.image_id, (nh, nw), preprocessor.padded_size(nh, nw), boxes[~crowd],
                                 boxes[crowd]))
    return out


def _box_sizes(boxes: Tensor) -> Tensor:
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
    return (wh[:, 0] * wh[:, 1]).sqrt()


def _bin_index(sizes: np.ndarray, bins: Sequence[float]) -> np.ndarray:
    """Bin i holds ``bins[i] <= size < bins[i+1]``."""
    return np.clip(np.searchsorted(np.asarray(bins), sizes, side="right") - 1, 0, len(bins) - 2)


def _bin_names(bins: Sequence[float]) -> list[str]:
    return [f"{lo:g}-{hi:g}" if math.isfinite(hi) else f">={lo:g}" for lo, hi in zip(bins[:-1], bins[1:])]


def _best_iou(boxes: Tensor, anchors: Tensor) -> Tensor:
    """``[G]`` highest IoU of each box with any anchor (0 when there are no anchors)."""
    if boxes.shape[0] == 0 or anchors.shape[0] == 0:
        return torch.zeros(boxes.shape[0])
    return box_iou(boxes, anchors).max(dim=1).values


def coverage(best_iou: np.ndarray, sizes: np.ndarray, fg_iou_thresh: float, bg_iou_thresh: float,
             bins: Sequence[float] = SIZE_BINS) -> dict[str, Any]:
    """Fractions of boxes whose best anchor IoU is below the fg / bg thresholds, overall and by size bin.

    ``best_iou [G]``, ``sizes [G]`` (sqrt area). A bin without boxes reports ``None`` fractions.
    """
    idx = _bin_index(sizes, bins)
    by_size = []
    for b, name in enumerate(_bin_names(bins)):
        m = idx == b
        n = int(m.sum())
        by_size.append({"bin": name, "boxes": n,
                        "below_fg": float((best_iou[m] < fg_iou_thresh).mean()) if n else None,
                        "below_bg": float((best_iou[m] < bg_iou_thresh).mean()) if n else None,
                        "mean_best_iou": float(best_iou[m].mean()) if n else None})
    n = int(best_iou.size)
    return {"boxes": n,
            "below_fg": float((best_iou < fg_iou_thresh).mean()) if n else None,
            "below_bg": float((best_iou < bg_iou_thresh).mean()) if n else None,
            "mean_best_iou": float(best_iou.mean()) if n else None,
            "by_size": by_size}


def anchor_statistics(setup: AnchorSetup, images: Sequence[PreparedImage],
                      bins: Sequence[float] = SIZE_BINS) -> dict[str, Any]:
    """Imbalance and coverage of the model's anchors on prepared images.

    Per image: ``anchors``, ``foreground``, ``ignored``, ``background`` counts under the model's
    matcher (low-quality matches included, as in training). Per box (crowd excluded):
    ``best_iou`` with any anchor, whether any anchor was assigned to it (``assigned``), and how
    many (``anchors_per_box``). Returns totals, per-image lists and :func:`coverage` by size.
    """
    fg, ign, bg, total, num_boxes = [], [], [], [], []
    best, sizes, assigned, per_box = [], [], [], []
    for im in images:
        anchors = setup.anchors(im.padded)
        targets = [{"boxes": torch.cat([im.boxes, im.crowd]),
                    "labels": torch.zeros(len(im.boxes) + len(im.crowd), dtype=torch.long),
                    "iscrowd": torch.cat([torch.zeros(len(im.boxes), dtype=torch.bool),
                                          torch.ones(len(im.crowd), dtype=torch.bool)])}]
        matched = setup.match(anchors, pad_targets(targets))[0]                    # [A]
        fg.append(int((matched >= 0).sum()))
        ign.append(int((matched == IGNORE).sum()))
        bg.append(int((matched == BACKGROUND).sum()))
        total.append(int(anchors.shape[0]))
        num_boxes.append(int(len(im.boxes)))
        if len(im.boxes):
            best.append(_best_iou(im.boxes, anchors))
            sizes.append(_box_sizes(im.boxes))
            hits = torch.bincount(matched[matched >= 0], minlength=len(im.boxes) + len(im.crowd))[: len(im.boxes)]
            per_box.append(hits)
            assigned.append(hits > 0)
    best_np = torch.cat(best).numpy().astype(np.float64) if best else np.zeros(0)
    sizes_np = torch.cat(sizes).numpy().astype(np.float64) if sizes else np.zeros(0)
    assigned_np = torch.cat(assigned).numpy() if assigned else np.zeros(0, bool)
    per_box_np = torch.cat(per_box).numpy() if per_box else np.zeros(0, np.int64)
    fg_a, bg_a = np.array(fg), np.array(bg)
    cov = coverage(best_np, sizes_np, setup.fg_iou_thresh, setup.bg_iou_thresh, bins)
    idx = _bin_index(sizes_np, bins)
    for b, entry in enumerate(cov["by_size"]):
        m = idx == b
        entry["not_assigned"] = float((~assigned_np[m]).mean()) if m.any() else None
    return {
        "images": len(images),
        "fg_iou_thresh": setup.fg_iou_thresh,
        "bg_iou_thresh": setup.bg_iou_thresh,
        "anchors_per_image_mean": float(np.mean(total)) if total else 0.0,
        "foreground_per_image_mean": float(fg_a.mean()) if fg else 0.0,
        "ignored_per_image_mean": float(np.mean(ign)) if ign else 0.0,
        "background_per_image_mean": float(bg_a.mean()) if bg else 0.0,
        # Σ background / Σ foreground over the images: the paper's "1 : 1000" read as one number.
        "background_per_foreground": float(bg_a.sum() / fg_a.sum()) if fg and fg_a.sum() > 0 else None,
        "images_without_foreground": int((fg_a == 0).sum()) if fg else 0,
        "boxes": int(best_np.size),
        "boxes_not_assigned": float((~assigned_np).mean()) if assigned_np.size else None,
        "anchors_per_box_mean": float(per_box_np.mean()) if per_box_np.size else None,
        "coverage": cov,
        "per_image": {"image_id": [im.image_id for im in images], "boxes": num_boxes, "anchors": total,
                      "foreground": fg, "ignored": ign, "background": bg},
        "_box_sizes": sizes_np,   # for the plots; dropped from the JSON
    }


# -- what other anchors would cover --------------------------------------------------------------

def default_candidates(model_cfg: ModelConfig, box_aspect_ratios: np.ndarray | None = None
                       ) -> dict[str, dict[str, Any]]:
    """Anchor settings worth comparing, as :class:`ModelConfig` overrides (RetinaNet only).

    - ``sizes x0.5``: every base size halved — one smaller octave at the bottom (16 px at P3),
      one lost at the top; the "smaller base size" remedy for small boxes.
    - ``sizes x0.75``: a milder shift.
    - ``4 scales/octave``: denser scales (the paper's Table 1c tried 1–4; saturates at 2–3).
    - ``ratios 1:3..3:1``: five aspect ratios (h/w) 1/3, 1/2, 1, 2, 3.
    - ``ratios from data``: the 10th, 50th and 90th percentiles of the boxes' h/w.
    """
    levels = range(model_cfg.retinanet.min_level, model_cfg.retinanet.max_level + 1)
    base = model_cfg.anchor_sizes or [4.0 * 2 ** l for l in levels]
    candidates = {
        "sizes x0.5": {"anchor_sizes": [0.5 * b for b in base]},
        "sizes x0.75": {"anchor_sizes": [0.75 * b for b in base]},
        "4 scales/octave": {"scales_per_octave": 4},
        "ratios 1:3..3:1": {"aspect_ratios": [1 / 3, 0.5, 1.0, 2.0, 3.0]},
    }
    if box_aspect_ratios is not None and box_aspect_ratios.size >= 3:
        qs = np.quantile(box_aspect_ratios, [0.1, 0.5, 0.9])
        ratios = sorted({round(float(q), 2) for q in qs if q > 0})
        if ratios:
            candidates["ratios from data"] = {"aspect_ratios": ratios}
    return candidates


def candidate_coverage(model_cfg: ModelConfig, candidates: dict[str, dict[str, Any]],
                       images: Sequence[PreparedImage], bins: Sequence[float] = SIZE_BINS,
                       build: Callable[[ModelConfig], torch.nn.Module] | None = None) -> dict[str, Any]:
    """Coverage (:func:`coverage`) each candidate's anchors achieve on the same prepared boxes.

    Each candidate is ``model_cfg`` with its overrides; the model is built with ``build``
    (default ``densedet.models.build_from_config``) so that the anchors are exactly the ones
    training would use. Also reports anchors per location and per image (the cost: the
    classification head grows with A·K).
    """
    build = build or build_from_config
    out = {}
    for name, overrides in candidates.items():
        try:
            cfg = with_model_options(model_cfg, **overrides)
            setup = anchor_setup(build(cfg), cfg)
        except (ValueError, ConfigError, TypeError) as err:
            out[name] = {"overrides": overrides, "error": str(err)}
            continue
        best, sizes, total = [], [], []
        for im in images:
            anchors = setup.anchors(im.padded)
            total.append(int(anchors.shape[0]))
            if len(im.boxes):
                best.append(_best_iou(im.boxes, anchors))
                sizes.append(_box_sizes(im.boxes))
        best_np = torch.cat(best).numpy().astype(np.float64) if best else np.zeros(0)
        sizes_np = torch.cat(sizes).numpy().astype(np.float64) if sizes else np.zeros(0)
        out[name] = {"overrides": overrides,
                     "anchors_per_location": len(setup.anchor_sizes[0]) * len(setup.aspect_ratios),
                     "anchors_per_image_mean": float(np.mean(total)) if total else 0.0,
                     "coverage": coverage(best_np, sizes_np, setup.fg_iou_thresh, setup.bg_iou_thresh, bins)}
    return out


# -- the whole analysis ---------------------------------------------------------------------------

def _subset(n: int, max_images: int) -> list[int]:
    """Evenly spaced indices (deterministic), all of them when ``max_images <= 0`` or ``>= n``."""
    if max_images <= 0 or max_images >= n:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, max_images).round().astype(int).tolist()))


def analyze(cfg: Config, split: str = "train", max_images: int = 1000, candidates: bool = True,
            data: DetectionData | None = None, bins: Sequence[float] = SIZE_BINS, log=print,
            max_pixels: float = 0.0) -> dict[str, Any]:
    """Dataset statistics, anchor imbalance/coverage and candidate anchors for ``cfg``.

    The dataset comes from ``cfg.data`` (:func:`load_split`) unless ``data`` is given; the model
    from ``cfg.model``. Anchor statistics use at most ``max_images`` evenly spaced images
    (``<= 0``: all), and, with ``max_pixels`` > 0, no more of them than hold about that many input
    pixels as the model sees them (at least one): matching costs anchors x boxes, and a large photo
    has a hundred times a small image's anchors. Dataset statistics always use all the images.
    """
    data = data if data is not None else load_split(cfg.data, split)
    result: dict[str, Any] = {"split": split, "dataset": dataset_statistics(data)}
    model = build_from_config(cfg.model)
    setup = anchor_setup(model, cfg.model)
    indices = _subset(len(data.records), max_images)
    images = prepare_images(data, setup.preprocessor, indices)
    pixels = [im.padded[0] * im.padded[1] for im in images]
    if max_pixels > 0 and sum(pixels) > max_pixels:
        indices = _subset(len(data.records), max(1, int(max_pixels / np.mean(pixels))))
        images = prepare_images(data, setup.preprocessor, indices)
    log(f"analysing anchors on {len(indices)} of {len(data.records)} images")
    stats = anchor_statistics(setup, images, bins)
    result["anchors"] = {"sizes": [[round(s, 2) for s in lv] for lv in setup.anchor_sizes],
                         "aspect_ratios": setup.aspect_ratios, **stats}
    if candidates and cfg.model.arch == "retinanet":
        boxes = torch.cat([im.boxes for im in images]) if images else torch.zeros(0, 4)
        wh = (boxes[:, 2:] - boxes[:, :2]).numpy().astype(np.float64)
        ratios = wh[:, 1] / np.maximum(wh[:, 0], 1e-12) if len(wh) else np.zeros(0)
        result["candidates"] = {
            "current": {"overrides": {}, "anchors_per_location": len(setup.anchor_sizes[0]) * len(setup.aspect_ratios),
                        "anchors_per_image_mean": stats["anchors_per_image_mean"], "coverage": stats["coverage"]},
            **candidate_coverage(cfg.model, default_candidates(cfg.model, ratios), images, bins, build_from_config)}
    return result

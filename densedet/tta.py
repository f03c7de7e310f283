"""Test-time augmentation: RefineDet's multi-scale + flip test, usable by every densedet model.

Each *pass* runs the image (and, with ``flip``, its horizontal mirror) at one *scale*; the boxes
are mapped back to the original pixels, only those in the size range that scale sees well are
kept, and the boxes of all passes are merged (class-wise NMS, box voting, or Soft-NMS). Follows
the authors' Caffe script (``test/lib/fast_rcnn/test_functions.py``, ``multi_scale_test_net_320``)
and SPEC "Test-time augmentation".

What a *scale* means depends on how the model sizes its input (its ``preprocessor``):

* warp models (``preprocessor.fixed_size`` set, e.g. RefineDet 320): the image is warped to
  ``scale x scale`` (for a non-square ``fixed_size`` the shorter side becomes ``scale`` and the
  aspect of ``fixed_size`` is kept);
* resize models (RetinaNet): the image's shorter side is resized to ``scale`` and the longer side
  capped at ``max_size * scale / min_size`` (the model's own cap, scaled alike).

Anchors follow the model's own rule for every input size (``model.anchors`` is computed from the
batch size), so nothing is reused from the native size.

The model API used is :class:`~densedet.models.base.DenseDetector`'s: ``model.preprocessor``,
``model.dense_forward(batch)`` and ``model.postprocess(outputs, anchors, image_sizes)``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from .boxes import batched_nms, box_voting, soft_nms
from .config import TTA_MERGE_METHODS
from .engine.checkpoint import model_from_checkpoint

__all__ = ["TTAConfig", "REFINEDET320_SCALES", "FLIP_ONLY", "TURNS", "refinedet_tta", "tta_from_config",
           "tta_preset", "tta_inference",
           "apply_soft_nms", "merge_detections", "size_range_mask", "detect_resized", "model_input_size",
           "pass_preprocessor", "MERGE_METHODS"]

MERGE_METHODS = TTA_MERGE_METHODS
SizeRange = tuple[float | None, float | None]


@dataclass(frozen=True)
class TTAConfig:
    """Which passes to run and how to merge them.

    Args:
        scales: input size of each pass (see the module docstring for warp vs resize models);
            ``0`` means the model's own input size.
        flip: also run the horizontal mirror of every scale.
        rotate: also run the three quarter turns of every pass (and of its mirror): the eight
            symmetries of the square with ``flip``, for models trained on them (``data.rotate90``).
        ranges: per scale ``(min_px, max_px)``, either ``None`` for no bound. A box (original
            pixels) is kept from that scale when its **longer** side is ``> min_px`` and its
            **shorter** side is ``< max_px`` (``size_rule="sides"``, the authors' script: a
            down-scaled pass drops only boxes small in both directions, an up-scaled pass only
            boxes large in both, so thin objects survive where one side is in range), or when
            ``sqrt(w * h)`` lies strictly between the bounds (``size_rule="sqrt_area"``).
            ``None``: every scale keeps every box.
        merge: ``nms`` (class-wise greedy NMS), ``vote`` (box voting: score-weighted mean box of
            each group with IoU >= ``iou_threshold``, the group's max score), ``soft_vote`` (vote,
            and every grouped box re-emitted with score x (1 - IoU)), ``soft_nms_linear`` /
            ``soft_nms_gaussian`` (Soft-NMS, Gaussian with ``sigma``).
        iou_threshold: grouping / suppression IoU (0.45, RefineDet's ``bbox_vote``).
        detections_per_img: boxes kept per image after merging (100: what COCO AP counts).
        score_thresh: soft voting and Soft-NMS drop boxes whose new score is below this (0.01,
            RefineDet's ``confidence_threshold``).
        sigma: Gaussian Soft-NMS width (0.5, Bodla et al.).
    """

    scales: tuple[int, ...] = (0,)
    flip: bool = True
    rotate: bool = False
    ranges: tuple[SizeRange, ...] | None = None
    merge: str = "vote"
    iou_threshold: float = 0.45
    detections_per_img: int = 100
    score_thresh: float = 0.01
    sigma: float = 0.5
    size_rule: Literal["sides", "sqrt_area"] = "sides"

    def __post_init__(self) -> None:
        # lists are accepted and stored as tuples so a preset cannot be changed in place
        object.__setattr__(self, "scales", tuple(int(s) for s in self.scales))
        if self.ranges is not None:
            object.__setattr__(self, "ranges", tuple((lo, hi) for lo, hi in self.ranges))
        if not self.scales:
            raise ValueError("TTAConfig.scales: need at least one scale")
        if any(s < 0 for s in self.scales):
            raise ValueError(f"TTAConfig.scales: sizes must be >= 0 (0 = the model's own), got {self.scales}")
        if self.ranges is not None and len(self.ranges) != len(self.scales):
            raise ValueError(f"TTAConfig.ranges: {len(self.ranges)} ranges for {len(self.scales)} scales")
        if self.merge not in MERGE_METHODS:
            raise ValueError(f"TTAConfig.merge: must be one of {', '.join(MERGE_METHODS)}, got {self.merge!r}")
        if self.size_rule not in ("sides", "sqrt_area"):
            raise ValueError(f"TTAConfig.size_rule: must be 'sides' or 'sqrt_area', got {self.size_rule!r}")
        if not 0.0 <= self.iou_threshold <= 1.0:
            raise ValueError(f"TTAConfig.iou_threshold: must be in [0, 1], got {self.iou_threshold}")
        if self.detections_per_img < 1:
            raise ValueError(f"TTAConfig.detections_per_img: must be >= 1, got {self.detections_per_img}")

    def describe(self) -> str:
        """One line for logs: ``scales [320, 384], flip, merged by vote``."""
        views = (", flip" if self.flip else "") + (", quarter turns" if self.rotate else "")
        return f"scales {list(self.scales)}{views}, merged by {self.merge}"

    def views(self) -> list[tuple[bool, int]]:
        """The (mirrored, quarter turns) of each pass at one scale, the plain image first."""
        return [(flipped, turns) for flipped in ((False, True) if self.flip else (False,))
                for turns in (range(4) if self.rotate else (0,))]

    def range_of(self, i: int) -> SizeRange:
        return (None, None) if self.ranges is None else self.ranges[i]


# The authors' multi-scale test for RefineDet320 (test_functions.py, multi_scale_test_net_320):
# 320, 0.6x keeps boxes larger than 32 px, 1.2/1.4/1.6/1.8/2.2x keep boxes smaller than
# 160/128/96/64/32 px, each with its flip, merged by bbox_vote (VOC). The script's extra
# aspect-preserving 320x192 pass (im_detect_ratio) is left out: it is not a scale of a square warp.
REFINEDET320_SCALES = TTAConfig(
    scales=(320, 192, 384, 448, 512, 576, 704), flip=True,
    ranges=((None, None), (32, None), (None, 160), (None, 128), (None, 96), (None, 64), (None, 32)),
    merge="vote", iou_threshold=0.45)

# The model's own size and its mirror, merged by voting.
FLIP_ONLY = TTAConfig(scales=(0,), flip=True, merge="vote")

# The model's own size in the eight symmetries of the square (images seen from above), merged by voting.
TURNS = TTAConfig(scales=(0,), flip=True, rotate=True, merge="vote")

_REFINEDET_RATIOS = (1.0, 0.6, 1.2, 1.4, 1.6, 1.8, 2.2)


def refinedet_tta(base_size: int, multiple: int = 64, merge: str = "vote") -> TTAConfig:
    """RefineDet's scale set relative to ``base_size`` (the model's own input size).

    Scales are ``base_size x (1, 0.6, 1.2, 1.4, 1.6, 1.8, 2.2)`` rounded to a multiple of
    ``multiple`` (RefineDet needs multiples of 64), size bounds scaled by ``base_size / 320``;
    ``refinedet_tta(320) == REFINEDET320_SCALES``.
    """
    factor = base_size / 320.0
    scales = tuple(max(multiple, int(round(base_size * r / multiple)) * multiple) for r in _REFINEDET_RATIOS)
    ranges = tuple((None if lo is None else lo * factor, None if hi is None else hi * factor)
                   for lo, hi in REFINEDET320_SCALES.ranges)
    return replace(REFINEDET320_SCALES, scales=scales, ranges=ranges, merge=merge)


def tta_from_config(test) -> TTAConfig | None:
    """The TTA a config's ``test`` section asks for (``tta_scales``, ``tta_flip``, ``tta_rotate``,
    ``tta_merge``), or None."""
    if not test.tta_scales:
        return None
    return TTAConfig(scales=tuple(test.tta_scales), flip=test.tta_flip, rotate=test.tta_rotate, merge=test.tta_merge)


def tta_preset(name: str, model: nn.Module | None = None) -> TTAConfig | None:
    """A named TTA setting: ``none`` (None), ``flip``, ``turns`` (the eight symmetries of the square),
    ``refinedet320`` (the SPEC set, absolute sizes for a 320 model), ``refinedet`` (the same ratios
    around ``model``'s own input size)."""
    if name == "none":
        return None
    if name == "flip":
        return FLIP_ONLY
    if name == "turns":
        return TURNS
    if name == "refinedet320":
        return REFINEDET320_SCALES
    if name == "refinedet":
        if model is None:
            raise ValueError("tta preset 'refinedet' needs the model (its input size is the base scale)")
        return refinedet_tta(model_input_size(model))
    raise ValueError(f"unknown TTA preset {name!r}; choose none, flip, turns, refinedet320 or refinedet")


# -- one pass -------------------------------------------------------------------------------------

def model_input_size(model: nn.Module) -> int:
    """The model's own scale: the shorter side of ``fixed_size`` for warp models, else ``min_size``."""
    t = model.preprocessor
    return int(min(t.fixed_size)) if t.fixed_size is not None else int(t.min_size[-1])


def pass_preprocessor(transform: nn.Module, scale: int) -> nn.Module:
    """A copy of ``transform`` that sizes images for ``scale`` (0: unchanged); the model's own is untouched."""
    if scale == 0:
        return transform
    t = copy.copy(transform)  # shallow: shares the mean/std buffers, owns its size attributes
    if transform.fixed_size is not None:
        fh, fw = transform.fixed_size
        factor = scale / min(fh, fw)
        t.fixed_size = (int(round(fh * factor)), int(round(fw * factor)))
    else:
        t.min_size = (int(scale),)
        t.max_size = int(round(transform.max_size * scale / transform.min_size[-1]))
    return t


def detect_resized(model: nn.Module, batch: Tensor, image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
    """Run the dense model on a preprocessed ``batch [B, 3, Hp, Wp]``; boxes in resized-image pixels."""
    outputs, anchors = model.dense_forward(batch)
    return model.postprocess(outputs, anchors, image_sizes)


def _view(image: Tensor, flipped: bool, turns: int) -> Tensor:
    """The image mirrored (if ``flipped``), then turned ``turns`` quarter turns counter-clockwise."""
    image = image.flip(-1) if flipped else image
    return image.rot90(turns, (-2, -1)) if turns else image


def _map_back(boxes: Tensor, resized: tuple[int, int], original: tuple[int, int], flipped: bool,
              turns: int = 0) -> Tensor:
    """Boxes ``[N, 4]`` in the resized view (:func:`_view`) of an image → its original pixels.

    Scale: multiply by the view's size / resized per axis (the factors the preprocessor used, from
    the sizes it produced, computed as ``ImagePreprocessor.postprocess`` does so a plain pass is
    bit-identical to ``model(images)``). Each quarter turn undone: a view ``h`` high maps
    ``(x1, y1, x2, y2)`` to ``(h - y2, x1, h - y1, x2)``. Flip: ``x1 = W - x2``, ``x2 = W - x1``.
    """
    (h, w), (oh, ow) = resized, original
    vh, vw = (ow, oh) if turns % 2 else (oh, ow)
    if (h, w) != (vh, vw):
        ratio = torch.tensor([vw / w, vh / h, vw / w, vh / h], dtype=torch.float32, device=boxes.device)
        boxes = boxes * ratio
    for _ in range(turns):
        boxes = torch.stack([vh - boxes[:, 3], boxes[:, 0], vh - boxes[:, 1], boxes[:, 2]], dim=1)
        vh, vw = vw, vh
    if flipped:
        boxes = torch.stack([ow - boxes[:, 2], boxes[:, 1], ow - boxes[:, 0], boxes[:, 3]], dim=1)
    return boxes


def size_range_mask(boxes: Tensor, size_range: SizeRange, rule: str = "sides") -> Tensor:
    """``[N]`` bool: boxes ``[N, 4]`` whose size lies in ``(min_px, max_px)`` (see :class:`TTAConfig`)."""
    lo, hi = size_range
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    if rule == "sides":
        big, small = torch.maximum(w, h), torch.minimum(w, h)
    else:
        big = small = torch.sqrt((w * h).clamp(min=0))
    keep = torch.ones(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    if lo is not None:
        keep &= big > lo
    if hi is not None:
        keep &= small < hi
    return keep


# -- merging --------------------------------------------------------------------------------------

def merge_detections(boxes: Tensor, scores: Tensor, labels: Tensor, method: str, iou_threshold: float = 0.45,
                     detections_per_img: int | None = None, score_thresh: float = 0.01,
                     sigma: float = 0.5) -> dict[str, Tensor]:
    """Merge one image's pooled boxes ``[N, 4]``, scores ``[N]``, labels ``[N]`` class-wise.

    Returns ``{"boxes", "scores", "labels"}`` by decreasing score, at most ``detections_per_img``.
    """
    if method == "nms":
        keep = batched_nms(boxes, scores, labels, iou_threshold)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    elif method in ("vote", "soft_vote"):
        boxes, scores, labels = box_voting(boxes, scores, labels, iou_threshold, soft=method == "soft_vote",
                                           soft_score_threshold=score_thresh)
    elif method in ("soft_nms_linear", "soft_nms_gaussian"):
        keep, new_scores = soft_nms(boxes, scores, labels, iou_threshold, sigma, method.rsplit("_", 1)[1],
                                    score_threshold=score_thresh)
        boxes, scores, labels = boxes[keep], new_scores.to(scores.dtype), labels[keep]
    else:
        raise ValueError(f"merge method must be one of {', '.join(MERGE_METHODS)}, got {method!r}")
    if detections_per_img is not None:
        boxes, scores, labels = boxes[:detections_per_img], scores[:detections_per_img], labels[:detections_per_img]
    return {"boxes": boxes, "scores": scores, "labels": labels}


def apply_soft_nms(detections: list[dict[str, Tensor]] | dict[str, Tensor], method: str = "linear",
                   sigma: float = 0.5, iou_threshold: float = 0.3, score_threshold: float = 0.001,
                   detections_per_img: int | None = None) -> list[dict[str, Tensor]] | dict[str, Tensor]:
    """Soft-NMS as post-processing of a model's output (one dict or a list, one per image).

    Rescores each image's boxes class-wise (``linear``: x (1 - IoU) above ``iou_threshold``;
    ``gaussian``: x exp(-IoU² / sigma)) and drops those below ``score_threshold``. Defaults are the
    paper's (N_t 0.3, sigma 0.5) and RefineDet's COCO single-scale test (linear). Since the model
    already ran hard NMS, this only lowers scores of boxes that survived it.
    """
    if isinstance(detections, dict):
        return apply_soft_nms([detections], method, sigma, iou_threshold, score_threshold, detections_per_img)[0]
    if method not in ("linear", "gaussian"):
        raise ValueError(f"soft-NMS method must be 'linear' or 'gaussian', got {method!r}")
    return [merge_detections(d["boxes"], d["scores"], d["labels"], f"soft_nms_{method}", iou_threshold,
                             detections_per_img, score_threshold, sigma) for d in detections]


# -- the whole procedure --------------------------------------------------------------------------

def _as_float_images(images: Sequence[Tensor]) -> list[Tensor]:
    out = []
    for i, image in enumerate(images):
        if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image {i}: expected a [3, H, W] tensor, got "
                             f"{tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__}")
        out.append(image.float() / 255.0 if image.dtype == torch.uint8 else image)
    return out


def tta_inference(model: nn.Module | str | Path, images: Sequence[Tensor], cfg: TTAConfig) -> list[dict[str, Tensor]]:
    """Detect with test-time augmentation.

    Args:
        model: an eval-mode densedet model, or a checkpoint path (loaded with
            :func:`~densedet.engine.checkpoint.model_from_checkpoint`).
        images: ``[3, H_i, W_i]`` float in [0, 1] (uint8 is divided by 255).
        cfg: the passes and the merge.

    Returns:
        per image ``{"boxes": [D, 4] (x1, y1, x2, y2, original pixels), "scores": [D],
        "labels": [D]}``, ``D <= cfg.detections_per_img``, by decreasing score.

    For each scale one batch holds the images and their views (``cfg.flip``: mirrors; ``cfg.rotate``:
    quarter turns); each pass
    keeps the model's own per-pass post-processing (score threshold, NMS, per-image cap), as
    RefineDet's script merges the outputs of its ``DetectionOutput`` layer.
    """
    if isinstance(model, (str, Path)):
        model = model_from_checkpoint(model)[0]
    if model.training:
        raise ValueError("tta_inference needs the model in eval mode (call model.eval())")
    images = _as_float_images(images)
    if not images:
        return []
    n = len(images)
    original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    transform = model.preprocessor
    pooled: list[list[dict[str, Tensor]]] = [[] for _ in range(n)]
    with torch.inference_mode():
        for i, scale in enumerate(cfg.scales):
            views = cfg.views()
            batch_images = [_view(im, flipped, turns) for flipped, turns in views for im in images]
            batch, image_sizes, _ = pass_preprocessor(transform, scale)(batch_images)
            dets = detect_resized(model, batch, image_sizes)
            for j, det in enumerate(dets):
                k, (flipped, turns) = j % n, views[j // n]
                boxes = _map_back(det["boxes"].float(), image_sizes[j], original_sizes[k], flipped, turns)
                keep = size_range_mask(boxes, cfg.range_of(i), cfg.size_rule)
                pooled[k].append({"boxes": boxes[keep], "scores": det["scores"][keep].float(),
                                  "labels": det["labels"][keep]})
        results = []
        for parts in pooled:
            boxes = torch.cat([p["boxes"] for p in parts])
            scores = torch.cat([p["scores"] for p in parts])
            labels = torch.cat([p["labels"] for p in parts])
            results.append(merge_detections(boxes, scores, labels, cfg.merge, cfg.iou_threshold,
                                            cfg.detections_per_img, cfg.score_thresh, cfg.sigma))
    return results

"""Every setting of a training run derived from the data, each by a rule you can state (``densedet train --data``).

:func:`derive` turns the statistics of a training set (:class:`DataSummary`: image sizes, box
sizes, shapes and classes, in original pixels) into config values, each with the reason it was
chosen (:class:`Derived`). Every rule is a plain function of those statistics, so the tests pin each
on a small hand-made set without training. The rules (``docs/own-data.md`` explains each):

- **classes**: the annotations' class names and count.
- **holdout**: without a validation file, 10% of the training images (at least 1, at most
  ``MAX_VAL_IMAGES``) are the validation split; with at least ``MIN_TUNE_IMAGES`` images, another 10%
  (at most ``MAX_TUNE_IMAGES``) are a ``tune`` split on
  which the test-time scales are chosen after training (never on the validation images). Each held-out
  split takes an image with objects and training keeps one: with too few such images the command asks
  for ``--val``, or makes no tune split. With fewer
  images, each photo large against its objects (a band of 10% of its longer side holds two of the
  largest) gives up such a band at its far end instead, for each held-out split, behind a gap as wide
  as the largest objects (:func:`~densedet.data.split.split_by_region`); a tune band only when the
  bands would hold at least ``MIN_TUNE_OBJECTS`` whole objects.
- **input scale**: the model sees the evaluation images (val, or train when val is carved out) at
  their own size: shorter side to their median shorter side, longer side capped at their largest
  longer side; so one size of evaluation image is never resized. When the 2nd percentile of box
  size (sqrt area) is below ``MIN_OBJECT_PX``, everything is upscaled to bring it there (at most
  ``MAX_UPSCALE``): an anchor grid of stride 8 cannot reach IoU 0.5 with smaller boxes. When even
  the small objects are large, everything is shrunk, until that percentile is ``SHRINK_OBJECT_PX``
  (the paper's smallest anchor) or the shorter side ``SHRINK_IMAGE_PX`` (SSD's and RefineDet320's
  input), whichever comes first: large objects in large photos otherwise cost whole images of
  millions of pixels per step and outgrow the largest anchors.
- **tiles**: a training image more than ``TILE_ABOVE`` times the evaluation images' longer side is
  cut into tiles of that side (overlap: the 98th percentile of the boxes' longer sides, so nearly
  every object is whole in some tile), each resized as an evaluation image: large photos are tiled,
  never downscaled.
- **RefineDet's warp**: RefineDet warps every image (or tile) to its square input, so it sees objects
  at input / side. When warping the largest evaluation image whole would shrink it, every image
  larger than ``input / scale`` (``scale``: the input-scale rule's, 1 or up to ``MAX_UPSCALE`` for small
  objects) is cut into tiles of that side, in training and evaluation, each warped to the input.
  Large objects (the rule's scale below 1) are warped whole (or in the tiles above) and shrunk, as
  the warp always did; images the warp does not shrink stay whole. When the objects keep one size in
  images of several sizes (:func:`size_view`), every image or tile is resized by the factor of a full
  one and padded to the input (``model.scale_as``), not warped: a warp would enlarge a small image's
  objects.
- **anchors**: aspect ratios 1:2, 1:1, 2:1 (the paper's) plus 1:4 / 4:1 (and so on) where at least
  5% of the boxes are more elongated than the geometric midpoint; base size 2 or 4 x the stride
  (4: the paper's), whichever lets more boxes reach an anchor at IoU 0.5 (ties: 4); pyramid levels
  from the lowest to the highest level that is some box's best (within RetinaNet's P3..P5 / P5..P7
  limits), so no level has anchors that match nothing.
- **training windows**: when the largest objects (98th percentile of the longer side, in model
  pixels) fit in a window of at most ``WINDOW_SHARE`` of the image's shorter side, training runs on
  object-centred windows at the image's scale (``data.crop_sizes``): the largest window holds that
  object with 10% margin (rounded up to 32 px), and windows of 0.6x and 0.4x of it (at least
  ``MIN_WINDOW`` px) bring more small objects per step. Training then runs at one scale. When
  images of several sizes are each resized to one shorter side (:func:`size_view`'s ``follow``), the
  windows are sized in model pixels and each is cut at that size over its image's own factor
  (``data.crop_model_pixels``).
- **batch and head**: a batch holds about ``BATCH_PIXELS`` input pixels (the demo's measured
  8 windows of 160 px), 2 to 32 images; for budgets up to ``SHORT_BUDGET_MIN`` minutes the FPN and
  head are the demo's lighter 128 channels and 2 GroupNorm convolutions, beyond it the paper's
  256 and 4.
- **from random weights**: the demo's measured recipe: trainable BatchNorm, a GroupNorm head,
  AdamW 2e-3 with cosine decay, focal gamma 1 for budgets up to ``SHORT_BUDGET_MIN`` minutes (2,
  the paper's, beyond), class cross-entropy 0.5 with two classes or more, and (any ResNet trunk,
  RetinaNet's or RefineDet's) a box-crop
  warm-up of the trunk for 15% of the budget at 3x the rate, then the stem and layer1 frozen. With
  one class the warm-up adds background crops as a second class (``train.pretrain_background``).
- **from pretrained weights** (``--weights``): an ImageNet trunk gets the paper's fine-tuning
  (frozen BatchNorm, stem and res2 frozen, SGD 0.01 per 16 images, focal gamma 2); a detection
  checkpoint keeps its own model settings and trains at a tenth of that rate.
- **flips**: horizontal flips with probability 0.5 unless ``--no-flip``; with several classes (RetinaNet)
  a mirrored window teaches its boxes and no class (a mirror may change the class).
- **detections per image**: at least 100 (COCO's count), 1.5x the most boxes of an evaluation image.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import Config, from_dict, to_dict, validate
from .data import DetectionData, record_size
from .data.split import region_layout
from .data.transforms import shortest_edge_factor
from .errors import UsageError
from .models import PRESETS

__all__ = ["DataSummary", "Derived", "RecipeOptions", "derive", "base_config", "recipe_config", "format_table", "parse_model_name",
           "grid_best_iou", "choose_ratios", "choose_anchors", "input_scale", "size_view", "object_scale", "classes",
           "load_shrink", "tiling", "refinedet_tiles", "training_windows", "batch_size_for", "holdout", "region_holdout", "optimisation", "augmentation", "detection_selection"]

MIN_OBJECT_PX = 12.0        # boxes smaller than this (sqrt area) are upscaled to it
MAX_UPSCALE = 2.0
SHRINK_OBJECT_PX = 32.0     # large objects are shrunk, the smallest (p2) down to the paper's smallest anchor
SHRINK_IMAGE_PX = 320       # and the images' shorter side no further than SSD's and RefineDet320's input
TILE_ABOVE = 1.5            # a training image this much larger than the evaluation images is tiled
WINDOW_SHARE = 0.6          # windows only when the largest object fits in this share of the image
MIN_WINDOW = 64
BATCH_PIXELS = 8 * 160 * 160
SHORT_BUDGET_MIN = 60.0
MIN_TUNE_IMAGES = 10
MIN_TUNE_OBJECTS = 100      # a tune band with fewer whole objects cannot tell test-time sets apart (AP moves by 1/N)
HOLDOUT_SHARE = 0.1
MAX_VAL_IMAGES = 1000       # a held-out split's images, at most: beyond, they leave training and lengthen the evaluation
MAX_TUNE_IMAGES = 250
IOU = 0.5                   # the paper's foreground IoU: coverage is measured at it
LOW_COVERAGE = 0.5          # anchors reaching fewer of the boxes than this are said so, plainly
RETINANET_LEVELS = (3, 4, 5, 6, 7)
REFINEDET_LEVELS = (3, 4, 5, 6)


# -- the data, as the rules see it ----------------------------------------------------------------

@dataclass
class DataSummary:
    """The statistics the rules read, in original pixels. ``boxes [N, 4]`` (x1, y1, x2, y2, non-crowd),
    ``box_image [N]`` (index into ``image_hw``), ``image_hw [I, 2]`` training images' (h, w),
    ``eval_hw [J, 2]`` and ``eval_boxes [J]``: the evaluation images' sizes and box counts."""

    class_names: list[str]
    image_hw: np.ndarray
    boxes: np.ndarray
    box_image: np.ndarray
    labels: np.ndarray
    eval_hw: np.ndarray
    eval_boxes: np.ndarray
    images_without_boxes: int = 0

    @classmethod
    def from_data(cls, train: DetectionData, evaluation: DetectionData | None = None) -> "DataSummary":
        """From the training split and the split evaluated on (``None``: the training split)."""
        hw = np.array([record_size(r, train.source) for r in train.records], dtype=np.float64).reshape(-1, 2)
        boxes, owner, labels = [], [], []
        for i, r in enumerate(train.records):
            keep = ~r.iscrowd
            boxes.append(r.boxes[keep])
            labels.append(r.labels[keep])
            owner.append(np.full(int(keep.sum()), i))
        ev = evaluation or train
        return cls(list(train.class_names), hw,
                   np.concatenate(boxes).astype(np.float64) if boxes else np.zeros((0, 4)),
                   np.concatenate(owner).astype(np.int64) if owner else np.zeros(0, np.int64),
                   np.concatenate(labels) if labels else np.zeros(0, np.int64),
                   np.array([record_size(r, ev.source) for r in ev.records], dtype=np.float64).reshape(-1, 2),
                   np.array([int((~r.iscrowd).sum()) for r in ev.records]),
                   sum(1 for r in train.records if len(r) == 0))

    @property
    def box_sizes(self) -> np.ndarray:
        wh = self.boxes[:, 2:] - self.boxes[:, :2]
        return np.sqrt(wh[:, 0] * wh[:, 1])


@dataclass
class Derived:
    """One derived setting: config ``key`` (``model.anchor_sizes``), its ``value`` and the ``reason``."""

    key: str
    value: Any
    reason: str


@dataclass
class RecipeOptions:
    """What the command line adds to the data: the model, the time budget, the starting weights."""

    model: str = "retinanet_r18_fpn"
    minutes: float = 10.0
    weights: str | None = None
    weights_kind: str | None = None     # None (random) | imagenet | detection
    flip: bool = True
    top_down: bool = False              # images seen from above: quarter turns too (--top-down)
    has_val: bool = False


# -- models by name -------------------------------------------------------------------------------

_BACKBONES = {"r18": "resnet18", "r34": "resnet34", "r50": "resnet50", "r101": "resnet101", "vgg16": "vgg16"}


def parse_model_name(name: str) -> tuple[str, str, int]:
    """``retinanet_r18_fpn`` → (retinanet, resnet18, 0); ``refinedet320_vgg16`` → (refinedet, vgg16, 320).
    RetinaNet: r18/r34/r50/r101; RefineDet: 320 or 512 with vgg16, r18, r34, r50 or r101."""
    parts = name.lower().split("_")
    if parts[0] == "retinanet" and len(parts) in (2, 3) and parts[1] in _BACKBONES and parts[1] != "vgg16" \
            and parts[2:] in ([], ["fpn"]):
        return "retinanet", _BACKBONES[parts[1]], 0
    if parts[0] in ("refinedet320", "refinedet512") and len(parts) == 2 and parts[1] in _BACKBONES:
        return "refinedet", _BACKBONES[parts[1]], int(parts[0][len("refinedet"):])
    raise UsageError(f"--model {name!r}: expected retinanet_r18_fpn, retinanet_r34_fpn, retinanet_r50_fpn, "
                     f"retinanet_r101_fpn, or refinedet320_/refinedet512_ with vgg16, r18, r34, r50 or r101 "
                     f"(e.g. refinedet320_r18)")


# -- the rules ------------------------------------------------------------------------------------

def _require_boxes(s: DataSummary) -> None:
    if not len(s.boxes):
        raise UsageError("the training annotations hold no boxes: nothing to learn from")


def holdout(s: DataSummary, has_val: bool) -> list[Derived]:
    """Validation and tune slices of the training images (see the module docstring); ``s``: all the
    training images, ``s.eval_hw`` the validation file's when ``has_val``."""
    _require_boxes(s)
    num_images = len(s.image_hw)
    if num_images < MIN_TUNE_IMAGES:
        by_region = region_holdout(s, has_val)
        if by_region:
            return by_region
    out = []
    # each held-out split takes an image with objects (AP is not measured on none), and training keeps one
    with_objects = len(np.unique(s.box_image))
    if has_val:
        out.append(Derived("data.val_fraction", 0.0, "a validation file is given: it is the validation split"))
    else:
        if num_images < 3:
            raise UsageError(f"only {num_images} training image(s), none large enough against its objects to give up "
                             f"a band: too few to hold out a validation split; give one with --val")
        if with_objects < 2:
            raise UsageError(f"only {with_objects} training image(s) with objects: too few to hold out a validation "
                             f"split with objects and keep one to train on; give one with --val")
        n = min(max(1, round(HOLDOUT_SHARE * num_images)), MAX_VAL_IMAGES)
        out.append(Derived("data.val_fraction", HOLDOUT_SHARE,
                           f"no --val: {n} of {num_images} training images (10%, at most {MAX_VAL_IMAGES}, by "
                           f"image, seeded) are held out to validate" + (", images with and without objects in "
                                                                       "proportion" if s.images_without_boxes else "")))
        out.append(Derived("data.val_max_images", MAX_VAL_IMAGES,
                           "a larger validation split would take images from training, and time after it"))
    if num_images >= MIN_TUNE_IMAGES and with_objects < (2 if has_val else 3):
        out += [Derived("data.tune_fraction", 0.0, f"{with_objects} training image(s) with objects: none spared to "
                        f"choose test-time scales on"),
                Derived("test.tta_choose", False, "no tune split: single-scale evaluation")]
    elif num_images >= MIN_TUNE_IMAGES:
        n = min(max(1, round(HOLDOUT_SHARE * num_images)), MAX_TUNE_IMAGES)
        out += [Derived("data.tune_fraction", HOLDOUT_SHARE,
                        f"{n} more training images held out as the tune split: the test-time scales are chosen "
                        f"there, never on the validation images"),
                Derived("data.tune_max_images", MAX_TUNE_IMAGES,
                        f"every test-time set tried is a pass over the tune images after training (up to ~30 "
                        f"passes in all); {MAX_TUNE_IMAGES} images resolve AP to 1/{MAX_TUNE_IMAGES} or finer"),
                Derived("test.tta_choose", True, "after training, keep the TTA set that beats single scale on "
                        "the tune split, or none")]
    else:
        out += [Derived("data.tune_fraction", 0.0, f"{num_images} training images (< {MIN_TUNE_IMAGES}): none "
                        f"spared to choose test-time scales on"),
                Derived("test.tta_choose", False, "no tune split: single-scale evaluation")]
    return out


def region_holdout(s: DataSummary, has_val: bool) -> list[Derived] | None:
    """Few images (< ``MIN_TUNE_IMAGES``): hold out a band at the end of each photo that is large
    against its objects (:func:`~densedet.data.split.region_layout`) rather than whole photos; a tune
    band only when it would hold at least ``MIN_TUNE_OBJECTS`` whole objects. None when there is
    nothing to hold out that way (no photo large enough, or only a tune band too small to tell)."""
    if not len(s.boxes):
        return None
    sides = s.boxes[:, 2:] - s.boxes[:, :2]
    gap = int(math.ceil(np.percentile(sides.max(axis=1), 98)))
    val = 0.0 if has_val else HOLDOUT_SHARE
    layouts = [region_layout(int(h), int(w), val, HOLDOUT_SHARE, gap) for h, w in s.image_hw]
    shared = sum(layout is not None for layout in layouts)
    if not shared:
        return None
    in_tune = sum(int(_inside(s.boxes[s.box_image == i], layout["tune"]).sum())
                  for i, layout in enumerate(layouts) if layout is not None)
    tune = HOLDOUT_SHARE if in_tune >= MIN_TUNE_OBJECTS else 0.0
    if not tune and has_val:
        return None
    piece = int(s.eval_hw.max()) if has_val else 0
    what = {(True, True): "the tune split", (False, True): "the validation split, and the 10% before it the tune split",
            (False, False): "the validation split"}[(has_val, bool(tune))]
    rows = [Derived("data.holdout", "region", f"{len(s.image_hw)} training images (< {MIN_TUNE_IMAGES}), {shared} "
                    f"of them large against their objects: the last 10% of each such photo's longer side is {what} "
                    f"(the rest of the photos is trained on)"),
            Derived("data.holdout_gap", gap, "p98 of the boxes' longer sides: no pixel of a held-out object is "
                    "trained on"),
            Derived("data.holdout_piece", piece, "held-out bands cut into pieces as long as the validation images"
                    if has_val else "held-out bands cut into about square pieces"),
            Derived("data.val_fraction", val, "a validation file is given: it is the validation split" if has_val
                    else "no --val: the last band of each large photo validates")]
    if tune:
        return rows + [
            Derived("data.tune_fraction", tune, f"a tune band holds {in_tune} whole objects (>= {MIN_TUNE_OBJECTS}): "
                    f"the test-time scales are chosen there, never on the validation images"),
            Derived("test.tta_choose", True, "after training, keep the TTA set that beats single scale on the tune "
                    "split, or none")]
    return rows + [
        Derived("data.tune_fraction", 0.0, f"a tune band would hold {in_tune} whole objects (< {MIN_TUNE_OBJECTS}): "
                f"too few to tell test-time sets apart, trained on instead"),
        Derived("test.tta_choose", False, "no tune split: single-scale evaluation")]


def _inside(boxes: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    """``[N]`` bool: the boxes wholly inside ``rect`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = rect
    return (boxes[:, 0] >= x0) & (boxes[:, 1] >= y0) & (boxes[:, 2] <= x1) & (boxes[:, 3] <= y1)


def object_scale(p2: float, short: float) -> float:
    """RetinaNet's input-scale rule for box sizes' 2nd percentile ``p2`` and the evaluation images' median
    shorter side ``short``: > 1 upscales small objects to ``MIN_OBJECT_PX`` (at most ``MAX_UPSCALE``), < 1
    shrinks large ones (to ``SHRINK_OBJECT_PX`` or the shorter side to ``SHRINK_IMAGE_PX``), else 1."""
    if p2 < MIN_OBJECT_PX:
        return min(MAX_UPSCALE, MIN_OBJECT_PX / p2) if p2 > 0 else MAX_UPSCALE
    return min(1.0, max(SHRINK_OBJECT_PX / p2, SHRINK_IMAGE_PX / short))


def size_view(s: DataSummary, short: float) -> tuple[str, str]:
    """How the objects' sizes in pixels relate to their images' sizes, and why: ``same`` when the training
    images have one shorter side (nothing to tell); ``follow`` when the objects' sizes follow their
    images' (photos of one kind of scene taken at several resolutions: each image is best resized to the
    common shorter side ``short``); ``own`` when they do not (crops of one survey, fields of one microscope,
    pages scanned at one DPI: every image is best kept at one scale). Decided by the view in which the
    training boxes' sizes vary less, from their 10th to their 90th percentile: as they are, or with each
    image resized to ``short``."""
    image_short = s.image_hw.min(axis=1)
    if s.box_sizes.size == 0 or np.allclose(image_short, image_short[0]):
        return "same", ""
    as_they_are = np.log(s.box_sizes)
    resized = as_they_are + np.log(short / image_short[s.box_image])

    def spread(x: np.ndarray) -> float:
        lo, hi = np.percentile(x, [10, 90])
        return float(hi - lo)

    own, common = spread(as_they_are), spread(resized)
    why = (f"training images of shorter sides {image_short.min():.0f}-{image_short.max():.0f} px; box sizes "
           f"p10-p90 vary {math.exp(own):.1f}x as they are, {math.exp(common):.1f}x with each image resized to "
           f"a shorter side of {short:.0f} px")
    return ("own" if own < common else "follow"), why


def input_scale(s: DataSummary) -> tuple[float, int, int, str, list[Derived]]:
    """``(scale, min_size, max_size, view, derived)`` for a resizing model (RetinaNet); ``scale`` multiplies
    the evaluation images' sizes (> 1: small objects upscaled, < 1: large objects shrunk), ``view`` is
    :func:`size_view`'s. Objects that do not follow their images' sizes (``own``), and training images of
    one size large enough to be tiled, are seen at one scale: every image is resized by ``scale`` alone
    (``model.scale_as``), large ones tiled (:func:`tiling`);
    objects that do (``follow``) are measured, and seen, with each image resized to one shorter side."""
    short = float(np.median(s.eval_hw.min(axis=1)))
    long_ = float(s.eval_hw.max(axis=1).max())
    view, spreads = size_view(s, short)
    tiled = view == "same" and bool((s.image_hw.max(axis=1) > TILE_ABOVE * long_).any())
    if tiled:
        # a square tile (tiling) resized by its own size takes another factor than a non-square evaluation
        # image: 0.75x for an 800 px tile against 1x for an 800x600 image
        view = "own"
    sizes = s.box_sizes
    if view == "follow":
        sizes = sizes * short / s.image_hw.min(axis=1)[s.box_image]
    p2 = float(np.percentile(sizes, 2)) if sizes.size else MIN_OBJECT_PX
    uniform = len({tuple(hw) for hw in s.eval_hw.astype(int).tolist()}) == 1
    what = (f"the evaluation images are all {int(s.eval_hw[0, 1])}x{int(s.eval_hw[0, 0])}" if uniform else
            f"evaluation images: median shorter side {short:.0f}, largest longer side {long_:.0f} px")
    seen = " at that shorter side" if view == "follow" else ""
    scale = object_scale(p2, short)
    if p2 < MIN_OBJECT_PX:
        why = (f"box sizes p2 {p2:.1f} px{seen} < {MIN_OBJECT_PX:g}: upscaled {scale:.2f}x so small objects reach "
               f"the anchors")
    elif scale < 1:
        why = (f"box sizes p2 {p2:.0f} px{seen}: shrunk {scale:.2f}x, the small objects to {scale * p2:.0f} px "
               f"(>= {SHRINK_OBJECT_PX:g}) and the shorter side to {scale * short:.0f} px (>= {SHRINK_IMAGE_PX}): "
               f"large objects need no more pixels, and whole large photos would cost many per step")
    else:
        # object_scale keeps 1 only where one of these holds
        small = [f"the small objects are {p2:.0f} px (<= {SHRINK_OBJECT_PX:g})"] if p2 <= SHRINK_OBJECT_PX else []
        small += [f"the shorter side is {short:.0f} px (<= {SHRINK_IMAGE_PX})"] if short <= SHRINK_IMAGE_PX else []
        why = f"box sizes p2 {p2:.1f} px{seen}: native scale, not shrunk: {' and '.join(small)}"
    if view == "own":
        side = int(round(scale * short))
        return scale, side, side, view, [
            Derived("model.min_size", side, f"{what}; {why}"),
            Derived("model.max_size", side, "with model.scale_as: the size whose factor every image takes"),
            Derived("model.scale_as", [int(round(short))] * 2,
                    f"training images are tiled: every tile and image is resized by one factor ({scale:.2f}x), "
                    f"so a square tile sees its objects at the evaluation images' scale" if tiled else
                    f"{spreads}: the objects' sizes do not follow their images', so every image is resized by "
                    f"one factor ({scale:.2f}x), not each to one shorter side")]
    min_size, max_size = int(round(scale * short)), int(round(scale * long_))
    rows = [Derived("model.min_size", min_size, f"{what}; {why}"),
            Derived("model.max_size", max_size, "the largest evaluation image, at the same scale" if scale != 1
                    else "the largest evaluation image is not shrunk")]
    if view == "follow":
        rows.append(Derived("model.scale_as", None, f"{spreads}: the objects' sizes follow their images', so each "
                            f"image is resized to one shorter side, a large one too (not tiled)"))
    return scale, min_size, max_size, view, rows


def classes(s: DataSummary) -> Derived:
    """The class count, with the names and the box and image counts as its reason, and the classes that
    no training box has (kept: the annotations name them, and the class count stays theirs)."""
    k = len(s.class_names)
    unused = [name for i, name in enumerate(s.class_names) if not (s.labels == i).any()]
    none = (f"; no training boxes: {', '.join(unused[:8])}{'…' if len(unused) > 8 else ''} (kept as classes, "
            f"never learnt)") if unused else ""
    return Derived("model.num_classes", k, f"classes in the annotations: {', '.join(s.class_names[:8])}"
                   f"{'…' if k > 8 else ''}; {len(s.boxes)} boxes in {len(s.image_hw)} images "
                   f"({s.images_without_boxes} without boxes, kept as negatives){none}")


def load_shrink(s: DataSummary, tiled: np.ndarray, scale: float = 1.0, warp: int = 0) -> list[Derived]:
    """``data.shrink_at_load`` when the model shrinks whole (untiled) training images: RetinaNet's input
    ``scale`` below 1, or RefineDet's square ``warp`` smaller than some image on both sides."""
    if tiled.any():
        return []
    if warp:
        if not (s.image_hw > warp).all(axis=1).any():
            return []
        return [Derived("data.shrink_at_load", True, f"training images over the {warp} px warp are warped once, "
                        "when loaded, not augmented at full size at every step")]
    if scale >= 1:
        return []
    return [Derived("data.shrink_at_load", True, "the training images are shrunk once, when loaded, not augmented "
                    "and resized at full size at every step")]


def _tile_overlap(s: DataSummary, tile: int) -> Derived:
    """The tiles' overlap: the 98th percentile of the boxes' longer sides (at least 32 px, at most half a
    tile), so nearly every object is whole in some tile."""
    sides = s.boxes[:, 2:] - s.boxes[:, :2]
    big = float(np.percentile(sides.max(axis=1), 98)) if len(sides) else 0.0
    return Derived("data.tile_overlap", int(min(tile // 2, max(32, math.ceil(big)))),
                   f"p98 of the boxes' longer sides {big:.0f} px: such objects are whole in some tile")


def tiling(s: DataSummary, scale: float = 1.0, warp: int = 0, whole: bool = False
           ) -> tuple[np.ndarray, list[Derived]]:
    """Which training images are tiled (``[I]`` bool) and the tile settings. For the reason: ``scale``,
    RetinaNet's input scale (a tile is resized as an evaluation image); ``warp``, RefineDet's input side
    (a tile of side t is warped to it: ``warp / t``). ``whole``: the objects' sizes follow their images'
    (:func:`size_view`), so a large image is resized as the others are, not tiled."""
    ref_long = float(s.eval_hw.max(axis=1).max())
    ref = (int(np.median(s.eval_hw[:, 0])), int(np.median(s.eval_hw[:, 1])))
    tiled = s.image_hw.max(axis=1) > TILE_ABOVE * ref_long
    if whole and tiled.any():
        return np.zeros_like(tiled), [Derived("data.tile_size", 0, f"{int(tiled.sum())} training image(s) over "
                                              f"{TILE_ABOVE}x the evaluation images' longer side, whole: their "
                                              f"objects are as much larger, and are resized with them")]
    if not tiled.any():
        return tiled, [Derived("data.tile_size", 0, f"no training image is over {TILE_ABOVE}x the evaluation "
                               f"images' longer side ({ref_long:.0f} px): whole images")]
    tile = int(round(ref_long))
    if warp:
        scale = warp / max(ref)
        seen = f", each warped to {warp} x {warp} as an evaluation image: {scale:.2f}x" + (
            ", never downscaled" if scale >= 1 else ", the objects are large")
    else:
        seen = ", never downscaled" if scale >= 1 else (f", shrunk {scale:.2f}x as the evaluation images are: the "
                                                        f"objects are large")
    return tiled, [
        Derived("data.tile_size", tile, f"{int(tiled.sum())} training image(s) over {TILE_ABOVE}x the evaluation "
                f"images' longer side: cut into {tile} px tiles{seen}"),
        _tile_overlap(s, tile),
        Derived("data.tile_scale_as", [ref[0], ref[1]], "each tile is resized as an evaluation image is, so objects "
                "keep their test-time scale")]


def refinedet_tiles(s: DataSummary, size: int) -> tuple[float, float, int]:
    """RefineDet warps every image (or tile) to ``size`` x ``size``: it sees objects at ``size / side``.
    Returns ``(target, warp, tile)``: the scale RetinaNet's rule picks (:func:`object_scale`: 1, or up to
    2x for small objects, below 1 for large ones), the warp of the largest evaluation image whole
    (``size / its longer side``), and the tile side ``size / target`` at which the model sees objects at
    ``target`` when that warp would shrink them below it, in training and evaluation; 0 for no such
    tiles: the warp shrinks nothing, or the objects are large (target < 1), shrunk by the warp as ever."""
    p2 = float(np.percentile(s.box_sizes, 2)) if len(s.boxes) else MIN_OBJECT_PX
    target = object_scale(p2, float(np.median(s.eval_hw.min(axis=1))))
    warp = size / float(s.eval_hw.max())
    if target < 1 or warp >= 1:
        return target, warp, 0
    return target, warp, int(round(size / target))


def _refinedet_tile_rows(s: DataSummary, size: int, tile: int, warp: float) -> tuple[np.ndarray, list[Derived]]:
    """The rows of RefineDet's tiles of side ``tile`` (:func:`refinedet_tiles`), each warped to ``size``."""
    p2 = float(np.percentile(s.box_sizes, 2))
    seen = size / tile
    why = (f"box sizes p2 {p2:.1f} px; warped whole, the evaluation images ({s.eval_hw.max():.0f} px) would be "
           f"shrunk {warp:.2f}x: images over {tile} px, in training and evaluation, are cut into {tile} px tiles, "
           f"each warped to {size} x {size}: objects at {seen:.2f}x, " +
           ("never downscaled" if p2 >= MIN_OBJECT_PX else f"small objects upscaled to {seen * p2:.0f} px"))
    return s.image_hw.max(axis=1) > tile, [
        Derived("data.tile_size", tile, why),
        _tile_overlap(s, tile),
        Derived("data.tile_scale_as", None, f"each tile is warped to {size} x {size}, in training as in evaluation")]


def _refinedet_input(s: DataSummary, model: str, size: int) -> tuple[np.ndarray, list[Derived]]:
    """RefineDet's image size, tiles, warp at load and padding; and the factors ``[I, 2]`` (sy, sx) by
    which it sees each training image's objects (the warp of the image, or of its tiles)."""
    view, spreads = size_view(s, float(np.median(s.eval_hw.min(axis=1))))
    target, warp, tile = refinedet_tiles(s, size)
    p2 = float(np.percentile(s.box_sizes, 2))
    if tile and view != "follow":
        tiled, tile_rows = _refinedet_tile_rows(s, size, tile, warp)
        sides = [(tile, tile) if t else hw for hw, t in zip(s.image_hw.tolist(), tiled.tolist())]
        note, load_rows = "", []
    else:
        tiled, tile_rows = tiling(s, warp=size, whole=view == "follow")
        ref = tile_rows[-1].value if tiled.any() else None
        sides = [ref if t else hw for hw, t in zip(s.image_hw.tolist(), tiled.tolist())]
        load_rows = load_shrink(s, tiled, warp=size)
        note = f"; the evaluation images ({s.eval_hw.max():.0f} px) at {warp:.2f}x"
        if view == "follow":
            note += (f"; {spreads}: the objects' sizes follow their images', and warping each image whole brings "
                     f"them to one size (not tiled)")
        elif target < 1 and warp < 1:
            note += (f" (box sizes p2 {p2:.0f} px: large objects, which the warp shrinks; RetinaNet's rule would "
                     f"shrink them {target:.2f}x)")
        elif target > warp:
            note += (f" (box sizes p2 {p2:.1f} px < {MIN_OBJECT_PX:g} px would want {target:.2f}x; the warp shrinks "
                     f"nothing, and images are only cut into tiles when it would)")
    pad_rows = []
    if view == "own" and not load_rows:
        # a warp would enlarge a smaller image's objects: every image (or tile) takes the factor of a
        # full one, and is padded to the input
        side = tile or int(round(float(s.eval_hw.max())))
        sides = [(side, side)] * len(sides)
        pad_rows = [Derived("model.scale_as", [side, side], f"{spreads}: the objects keep one size in images of "
                            f"several sizes, so every image (or tile) is resized {size / side:.2f}x, as a {side} px "
                            f"one is warped, and padded to {size} x {size}, not warped")]
    elif view == "own":
        note += (f"; {spreads}: the objects keep one size in images of several sizes, which the warp spreads "
                 f"apart (RetinaNet keeps them at one scale: --model retinanet_r18_fpn)")
    factors = np.array([(size / h, size / w) for h, w in sides]).reshape(-1, 2)
    return factors, [Derived("model.refinedet.image_size", size, f"--model {model}: every image (or tile) is "
                             f"{'padded' if pad_rows else 'warped'} to {size} x {size}{note}")
                     ] + pad_rows + tile_rows + load_rows


def choose_ratios(box_wh: np.ndarray) -> tuple[list[float], str]:
    """Aspect ratios h/w: the paper's 1/2, 1, 2, and 2^k (2^-k) for k >= 2 while at least 5% of the boxes'
    h/w exceed 2^(k-0.5) (fall below 2^-(k-0.5))."""
    ratios = [0.5, 1.0, 2.0]
    if len(box_wh) == 0:
        return ratios, "no boxes: the paper's ratios"
    r = box_wh[:, 1] / np.maximum(box_wh[:, 0], 1e-9)
    hi, lo = float(np.percentile(r, 95)), float(np.percentile(r, 5))
    k = 2
    while hi > 2 ** (k - 0.5) and k <= 5:
        ratios.append(float(2 ** k))
        k += 1
    k = 2
    while lo < 2 ** -(k - 0.5) and k <= 5:
        ratios.insert(0, float(2 ** -k))
        k += 1
    why = f"box h/w p5 {lo:.2f}, p95 {hi:.2f}"
    return ratios, why + ("" if len(ratios) == 3 else ": ratios beyond 1:2 added for the elongated boxes")


def grid_best_iou(boxes: np.ndarray, sizes: list[list[float]], ratios: list[float], strides: list[int],
                  offset: float) -> tuple[np.ndarray, np.ndarray]:
    """Best IoU of each box ``[N, 4]`` (model pixels) with any anchor of a dense grid, and the level
    (index into ``strides``) of that anchor. ``sizes[l]`` the anchor sizes (sqrt area) of level l,
    ``ratios`` h/w, anchors centred at ``(k + offset) * stride``. The best anchor of a shape sits at
    one of the four grid points around the box centre, so only those are compared."""
    if len(boxes) == 0:
        return np.zeros(0), np.zeros(0, np.int64)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    best = np.zeros((len(boxes), len(strides)))
    for level, (stride, level_sizes) in enumerate(zip(strides, sizes)):
        shapes = np.array([(size / math.sqrt(r), size * math.sqrt(r)) for r in ratios for size in level_sizes])
        kx, ky = np.floor(cx / stride - offset), np.floor(cy / stride - offset)
        for dx in (0, 1):
            for dy in (0, 1):
                ax, ay = (kx + dx + offset) * stride, (ky + dy + offset) * stride
                iw = (np.minimum(cx[:, None] + bw[:, None] / 2, ax[:, None] + shapes[None, :, 0] / 2)
                      - np.maximum(cx[:, None] - bw[:, None] / 2, ax[:, None] - shapes[None, :, 0] / 2)).clip(0)
                ih = (np.minimum(cy[:, None] + bh[:, None] / 2, ay[:, None] + shapes[None, :, 1] / 2)
                      - np.maximum(cy[:, None] - bh[:, None] / 2, ay[:, None] - shapes[None, :, 1] / 2)).clip(0)
                inter = iw * ih
                union = (bw * bh)[:, None] + (shapes[:, 0] * shapes[:, 1])[None, :] - inter
                best[:, level] = np.maximum(best[:, level], (inter / union).max(axis=1))
    return best.max(axis=1), best.argmax(axis=1)


def _retinanet_sizes(base: float, levels: list[int], scales: int = 3) -> list[list[float]]:
    return [[base * 2 ** l * 2 ** (k / scales) for k in range(scales)] for l in levels]


def choose_anchors(boxes: np.ndarray, arch: str, ratios: list[float]) -> tuple[dict[str, Any], list[Derived]]:
    """Anchor base sizes and levels for ``boxes [N, 4]`` in model pixels (see the module docstring).
    Returns the settings (``anchor_sizes``, ``min_level``, ``max_level``, ``coverage``) and the derived rows."""
    sizes = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])) if len(boxes) else np.zeros(0)
    if arch == "retinanet":
        levels, offset = list(RETINANET_LEVELS), 0.0
        grid = lambda k, lv: _retinanet_sizes(k, lv)                        # noqa: E731
    else:
        levels, offset = list(REFINEDET_LEVELS), 0.5
        grid = lambda k, lv: [[k * 2 ** l] for l in lv]                     # noqa: E731
    trials = {}
    for k in (4.0, 2.0):                                   # 4 first: the paper's wins ties
        iou, level = grid_best_iou(boxes, grid(k, levels), ratios, [2 ** l for l in levels], offset)
        trials[k] = (float((iou >= IOU).mean()) if len(iou) else 1.0, level)
    k = max(trials, key=lambda key: trials[key][0])
    used = sorted({levels[i] for i in trials[k][1].tolist()}) or [levels[0]]
    if arch == "retinanet":
        lo, hi = min(max(used[0], 3), 5), max(min(used[-1], 7), 5)
        final = list(range(lo, hi + 1))
    else:
        final = levels                                     # RefineDet's four sources are fixed
    iou, _ = grid_best_iou(boxes, grid(k, final), ratios, [2 ** l for l in final], offset)
    coverage = float((iou >= IOU).mean()) if len(iou) else 1.0
    base = [k * 2 ** l for l in final]
    p2, p98 = (float(np.percentile(sizes, 2)), float(np.percentile(sizes, 98))) if sizes.size else (0.0, 0.0)
    why = (f"{base[0]:g}-{base[-1]:g} px on P{final[0]}-P{final[-1]}: p2/p98 of box sizes {p2:.0f}/{p98:.0f} px; "
           f"{100 * coverage:.1f}% of boxes have an anchor at IoU >= {IOU} ({k:g}x stride covers "
           f"{100 * trials[k][0]:.1f}%, {6 - k:g}x {100 * trials[6 - k][0]:.1f}%)")
    if coverage < LOW_COVERAGE:
        why += _low_coverage(sizes, iou, base[0], coverage, arch)
    rows = [Derived("model.anchor_sizes", base, why)]
    if arch == "retinanet":
        rows += [Derived("model.retinanet.min_level", final[0], "lowest level some box is best matched on "
                         "(P3..P5)"),
                 Derived("model.retinanet.max_level", final[-1], "highest level some box is best matched on "
                         "(P5..P7): no level whose anchors match nothing")]
    return {"anchor_sizes": base, "min_level": final[0], "max_level": final[-1], "coverage": coverage}, rows


def _low_coverage(sizes: np.ndarray, iou: np.ndarray, smallest: float, coverage: float, arch: str) -> str:
    """The plain warning for anchors that reach under ``LOW_COVERAGE`` of the boxes at IoU 0.5: the
    others are matched only to their single best anchor, below the foreground IoU (a poor match)."""
    missed = sizes[iou < IOU]
    small = missed.size and float(np.median(missed)) < smallest
    note = f"; only {100 * coverage:.0f}% of boxes reach an anchor"
    if arch != "retinanet" and small:
        return note + ": objects this small need RetinaNet (--model retinanet_r18_fpn)"
    return note + ": the others only get their single best anchor, below that IoU"


def training_windows(max_side_px: float, median_px: float, image_short_px: float, scale: float
                     ) -> tuple[list[int], str]:
    """Object-centred window sides (original pixels) for the largest objects' longer side ``max_side_px``
    (p98), the median box size, the image's (or tile's) shorter side, all in model pixels; [] for whole images."""
    largest = max(MIN_WINDOW, 32 * math.ceil(1.1 * max_side_px / 32))
    if largest > WINDOW_SHARE * image_short_px:
        return [], (f"the largest objects ({max_side_px:.0f} px) need a {largest} px window, over "
                    f"{WINDOW_SHARE:.0%} of the {image_short_px:.0f} px image: whole images")
    floor = max(MIN_WINDOW, 32 * math.ceil(2 * median_px / 32))
    model_px = sorted({largest} | {w for w in (32 * round(f * largest / 32) for f in (0.6, 0.4)) if w >= floor})
    windows = sorted({max(16, int(round(w / scale))) for w in model_px})
    original = "" if scale == 1 else f" ({windows} px of the original images, cut before the {scale:.2f}x resize)"
    return windows, (f"objects are small against the {image_short_px:.0f} px image: windows of {model_px} px{original} "
                     f"centred on objects (the largest holds the p98 object, {max_side_px:.0f} px, with margin)")


def batch_size_for(pixels_per_image: float) -> int:
    """Images (or largest windows) per batch: about ``BATCH_PIXELS`` input pixels, 2 to 32."""
    return int(min(32, max(2, round(BATCH_PIXELS / max(pixels_per_image, 1.0)))))


def optimisation(o: RecipeOptions, arch: str, backbone: str, num_classes: int, batch: int) -> list[Derived]:
    """Norms, optimiser, loss settings and warm-up for the starting point (random, ImageNet, detection);
    the box-crop warm-up goes with a ResNet trunk, whichever the family."""
    short = o.minutes <= SHORT_BUDGET_MIN
    rows = [Derived("train.max_minutes", o.minutes, "the time budget (--minutes) decides the step count"),
            Derived("train.max_iters", 1_000_000, "a cap only: the budget sets the steps")]
    if o.weights_kind is None:
        lr = 0.002 if arch == "retinanet" else 0.001
        rows += [
            Derived("model.norm", "bn", "random weights: trainable BatchNorm (FrozenBN cannot learn)"),
            Derived("model.frozen_stages", 0, "random weights: every stage learns"),
            Derived("solver.optimizer", "adamw", "from scratch AdamW moves much faster than SGD over a few hundred "
                    "steps (the demo's measurements)"),
            Derived("solver.lr", lr, "the demo's measured rate for " + arch),
            Derived("solver.weight_decay", 1e-4, "the paper's"),
            Derived("solver.schedule", "cosine", "decays to zero at the budget's end"),
            Derived("solver.warmup_iters", 20, "a short linear warm-up"),
            Derived("solver.warmup_factor", 0.01, "from 1% of the rate"),
            Derived("solver.clip_grad_norm", 10.0, "guards the first steps from random weights")]
        if arch == "retinanet":
            rows += [Derived("model.retinanet.focal_gamma", 1.0 if short else 2.0,
                             f"budget {o.minutes:g} min " + ("<= 60: gamma 1 beat the paper's 2 from scratch"
                                                             if short else "> 60: the paper's 2")),
                     Derived("model.retinanet.class_ce_weight", 0.5 if num_classes > 1 else 0.0,
                             "teaches the classes apart early (demo)" if num_classes > 1
                             else "one class: nothing to tell apart")]
        if backbone.startswith("resnet"):
            warm = round(0.15 * o.minutes, 4)
            rows += [Derived("train.pretrain_minutes", warm, "15% of the budget teaches the trunk the objects on "
                             "box crops first (the demo's warm-up on the host it was tuned on; "
                             "a shorter one measured worse)"),
                     Derived("train.pretrain_lr", 3 * lr, "the warm-up at 3x the detection rate (demo)"),
                     Derived("train.pretrain_freeze_stages", 2, "stem and layer1 keep the warm-up's filters; "
                             "detection skips their backward"),
                     Derived("train.pretrain_background", -1.0,
                             "one class: half the warm-up crops are background, as a second class, else it "
                             "learns nothing" if num_classes == 1 else
                             "several classes: the crops' classes are the task (auto)")]
        return rows
    scale = batch / 16
    lr = (0.01 if o.weights_kind == "imagenet" else 0.001) * scale
    if o.weights_kind == "imagenet":
        rows += [Derived("model.pretrained_backbone", o.weights, "ImageNet trunk weights (--weights)"),
                 Derived("model.norm", "frozen_bn", "pretrained statistics stay (the paper's fine-tuning)"),
                 Derived("model.frozen_stages", 2, "stem and res2 frozen (the paper's)")]
    rows += [Derived("solver.optimizer", "sgd", "the paper's SGD with momentum 0.9 from pretrained weights"),
             Derived("solver.lr", round(lr, 6), ("0.01" if o.weights_kind == "imagenet" else
                                                 "0.001 (a tenth: the weights already detect)") +
                     f" per 16 images, x {batch}/16"),
             Derived("solver.weight_decay", 1e-4, "the paper's"),
             Derived("solver.schedule", "cosine", "the budget sets the steps: decay to zero at its end"),
             Derived("solver.warmup_iters", 100, "linear warm-up (the paper's, shortened)"),
             Derived("solver.warmup_factor", 0.001, "the paper's")]
    if arch == "retinanet" and o.weights_kind == "imagenet":
        rows.append(Derived("model.retinanet.focal_gamma", 2.0, "the paper's, made for ImageNet starts"))
    return rows


def augmentation(o: RecipeOptions, num_classes: int, arch: str) -> list[Derived]:
    """Flips (unless ``--no-flip``), what a mirrored window teaches, and photometric distortion (tree
    crowns at another site: AP50 0.10 -> 0.26; digit scenes unchanged)."""
    rows = [Derived("data.hflip_prob", 0.5 if o.flip else 0.0,
                    "horizontal flips (off with --no-flip)" if o.flip else "--no-flip")]
    # RefineDet keeps Caffe's mirror: teaching its ODM no class on mirrored objects, or only "an
    # object" (-log(1 - p_background)), each cost it 0.05 AP on the digits (own-data-measurements.md).
    if o.flip and arch == "retinanet":
        several = num_classes > 1
        rows.append(Derived("data.hflip_keeps_class", not several,
                            "several classes: a mirror keeps every box but may change the class (a mirrored 2 "
                            "is no digit), so mirrored windows teach boxes, not classes" if several else
                            "one class: a mirrored object is still an object of it"))
    return rows + [
        Derived("data.rotate90", o.top_down, "--top-down: quarter turns too, any direction can be up"
                if o.top_down else "images taken from the side have an up (--top-down for aerial and the like)"),
        Derived("data.photometric", True, "random brightness, contrast, saturation and hue (SSD's): "
                "light and colour differ between photos, sites and cameras")]


def detection_selection(s: DataSummary) -> list[Derived]:
    """How many detections an image keeps, and how their boxes are chosen."""
    most = int(s.eval_boxes.max()) if s.eval_boxes.size else 0
    dets = max(100, int(math.ceil(1.5 * most)))
    return [Derived("model.detections_per_img", dets, f"1.5x the most boxes in an evaluation image ({most}), "
                    f"at least COCO's 100"),
            Derived("test.max_dets", [1, 10, dets], "AP counts up to that many detections"),
            Derived("model.box_vote", True, "each detection NMS keeps takes the score-weighted mean box of the "
                    "candidates overlapping it (box voting): better boxes, the same detections and scores")]


# -- the whole recipe -----------------------------------------------------------------------------

def _model_boxes(s: DataSummary, scale_of_image: np.ndarray) -> np.ndarray:
    """Boxes in model pixels: each scaled by its image's factors ``[I, 2]`` (sy, sx)."""
    f = scale_of_image[s.box_image]
    return s.boxes * np.stack([f[:, 1], f[:, 0], f[:, 1], f[:, 0]], axis=1)


def _retinanet_input(s: DataSummary) -> tuple[np.ndarray, dict[str, Any], list[Derived]]:
    """RetinaNet's input scale, tiles and shrink at load; the factors ``[I, 2]`` (sy, sx) by which it sees
    each training image's objects, and what the windows rule reads (``up``, ``min_size``, ``tiled``,
    ``ref``: the tiles' resize-as size, ``follow``: images resized each to one shorter side, ``at_load``)."""
    up, min_size, max_size, size_rule, scale_rows = input_scale(s)
    follow, one_scale = size_rule == "follow", size_rule == "own"
    tiled, tile_rows = tiling(s, scale=up, whole=follow)
    ref = tile_rows[-1].value if tiled.any() else None
    factors = np.array([up if one_scale else shortest_edge_factor(*(ref if t else hw), min_size, max_size)
                        for hw, t in zip(s.image_hw.tolist(), tiled.tolist())]).repeat(2).reshape(-1, 2)
    # with one scale the model would scale a shrunk image again; following, large images are shrunk
    load_rows = [] if one_scale else load_shrink(s, tiled, scale=min(up, float(factors.min())) if follow else up)
    view = {"up": up, "min_size": min_size, "tiled": tiled, "ref": ref, "follow": follow,
            "at_load": bool(load_rows)}          # shrunk once when loaded: training pixels are model pixels
    return factors, view, scale_rows + [
        Derived("model.size_divisible", 32, "C5's stride: P6/P7 come from stride-2 convs")] + tile_rows + load_rows


def _retinanet_windows(s: DataSummary, boxes: np.ndarray, factors: np.ndarray, view: dict[str, Any]
                       ) -> tuple[list[Derived], float]:
    """RetinaNet's training windows (and their one training scale) for ``boxes`` in model pixels, and the
    input pixels of one training item."""
    tiled, ref, up, follow = view["tiled"], view["ref"], view["up"], view["follow"]
    sides = boxes[:, 2:] - boxes[:, :2]
    image_px = float(np.median(np.minimum(*(factors * s.image_hw).T))) if not tiled.any() else \
        float(min(ref) * factors[tiled][0, 0])
    # model pixels per training-image pixel; following, each image has its own: windows in model pixels
    train_scale = 1.0 if view["at_load"] or follow else up
    windows, why = training_windows(float(np.percentile(sides.max(axis=1), 98)),
                                    float(np.median(np.sqrt(sides[:, 0] * sides[:, 1]))), image_px, train_scale)
    rows = [Derived("data.crop_sizes", windows, why)]
    if windows and follow:
        rows.append(Derived("data.crop_model_pixels", True, "each image is resized by its own factor: a window is "
                            "cut at its side / that factor, so every window reaches the model at its size"))
    if windows:
        rows.append(Derived("data.train_min_sizes", [view["min_size"]], "one training scale: a smaller one would "
                            "pad the windows"))
        pixels = (max(windows) * train_scale) ** 2
    elif tiled.any():
        pixels = float((np.array(ref) * factors[tiled][0]).prod())
    else:
        pixels = float(np.median((factors * s.image_hw).prod(axis=1)))
    return rows, pixels


def derive(s: DataSummary, o: RecipeOptions, held_out: list[Derived] | tuple = ()) -> list[Derived]:
    """Every derived setting for the data ``s`` (the images trained on) and options ``o``, in the order
    they are printed; ``held_out``: the :func:`holdout` rows, decided on all the training images."""
    arch, backbone, rd_size = parse_model_name(o.model)
    _require_boxes(s)
    k = len(s.class_names)
    rows = [Derived("model.arch", arch, f"--model {o.model}"), Derived("model.backbone", backbone, f"--model {o.model}"),
            classes(s)] + list(held_out)
    ratios, ratio_why = choose_ratios(s.boxes[:, 2:] - s.boxes[:, :2])
    if arch == "retinanet":
        factors, view, input_rows = _retinanet_input(s)
    else:
        factors, input_rows = _refinedet_input(s, o.model, rd_size)
    rows += input_rows
    boxes = _model_boxes(s, factors)
    # RefineDet's are w/h in Caffe's order (1, 2, 1/2, then wider pairs): its default warns on any other
    stored_ratios = ratios if arch == "retinanet" else sorted((1.0 / r for r in ratios),
                                                              key=lambda r: (abs(math.log(r)), r < 1))
    rows.append(Derived("model.aspect_ratios", stored_ratios, ratio_why +
                        ("" if arch == "retinanet" else " (RefineDet's are w/h)")))
    _, anchor_rows = choose_anchors(boxes, arch, ratios)
    rows += anchor_rows
    if arch == "retinanet":
        window_rows, pixels = _retinanet_windows(s, boxes, factors, view)
        rows += window_rows
    else:
        pixels = float(rd_size ** 2)
        rows.append(Derived("data.augment", "basic", "flips only: SSD's zoom-out and crop shrink small objects"))
    batch = batch_size_for(pixels)
    rows.append(Derived("train.batch_size", batch, f"about {BATCH_PIXELS / 1e6:.2f} Mpx per batch (the demo's "
                        f"8 x 160 px windows), {pixels ** 0.5:.0f} px per item"))
    eval_px = float(np.median(s.eval_hw.prod(axis=1))) * view["up"] ** 2 if arch == "retinanet" else float(rd_size ** 2)
    rows.append(Derived("test.batch_size", batch_size_for(eval_px / 4), "evaluation images per batch: about 4x a "
                        "training batch's pixels (no gradients kept)"))
    if o.weights_kind != "detection":
        short = o.minutes <= SHORT_BUDGET_MIN
        if arch == "retinanet":
            rows += [Derived("model.retinanet.fpn_channels", 128 if short else 256,
                             f"budget {o.minutes:g} min: " + ("<= 60, a lighter FPN and head fit more steps (demo)"
                                                              if short else "> 60, the paper's width")),
                     Derived("model.retinanet.head_convs", 2 if short else 4, "as the width"),
                     Derived("model.retinanet.head_norm", "gn" if o.weights_kind is None else "none",
                             "GroupNorm head from random weights (demo)" if o.weights_kind is None
                             else "the paper's head")]
        else:
            rows.append(Derived("model.refinedet.tcb_channels", 128 if short else 256,
                                f"budget {o.minutes:g} min: " + ("a lighter TCB" if short else "the paper's width")))
    rows += optimisation(o, arch, backbone, k, batch)
    rows += augmentation(o, k, arch) + detection_selection(s)
    return rows


# -- into a config --------------------------------------------------------------------------------

def base_config(model: str) -> Config:
    """The starting config of ``--model``: the family's preset (RetinaNet's paper settings; RefineDet's
    Caffe settings: ratios, box variances, DetectionOutput thresholds), the derived values go on top."""
    arch, backbone, size = parse_model_name(model)
    preset = PRESETS["retinanet_r18_fpn" if arch == "retinanet" else f"refinedet{size}_vgg16"]
    cfg = Config(model=copy.deepcopy(preset))
    cfg.model.backbone = backbone
    return cfg


def recipe_config(rows: list[Derived], base: Config) -> Config:
    """``base`` with the derived values set, checked as a loaded config is."""
    tree = to_dict(base)
    for row in rows:
        node = tree
        *parents, leaf = row.key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = row.value
    out = from_dict(Config, tree)
    validate(out)
    return out


def format_table(rows: list[Derived]) -> str:
    """The derived values and their reasons, one per line."""
    width = max(len(r.key) for r in rows)
    lines = [f"{'setting':<{width}}  {'value':<22} reason"]
    for r in rows:
        value = str(r.value)
        if len(value) > 22:
            lines.append(f"{r.key:<{width}}  {value}")
            lines.append(f"{'':<{width}}  {'':<22} {r.reason}")
        else:
            lines.append(f"{r.key:<{width}}  {value:<22} {r.reason}")
    return "\n".join(lines)

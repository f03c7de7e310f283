"""Where a detector's errors are: a confusion matrix at IoU 0.5, the kind and size of every error, the
AP each kind costs, and which images show the most of them.

Everything here works on plain per-image arrays (:class:`ImageResult`: ground truth and detections,
boxes ``(x1, y1, x2, y2)`` pixels), so it is tested on hand-placed boxes and fed by
:func:`image_results` from a split and COCO results.

**Kinds** (at IoU 0.5, each detection scoring ``>= score_thresh``, taken in falling score order; the
ground truth of an image matched once, as COCO matches):

- *true positive*: IoU >= 0.5 with a still-unmatched object of its class (the best such one);
- *duplicate*: IoU >= 0.5 with an object of its class, all of them already matched;
- *wrong class*: IoU >= 0.5 with an object of another class;
- *poor localisation*: IoU 0.1-0.5 with an object of its class;
- *background*: none of the above (a wrong class at a poor place included);
- *missed*: an object no true positive matched and no wrong-class or poorly placed detection points at.

**What each kind costs** is measured as TIDE does (Bolya et al., ECCV 2020, section 2.3): fix that one
kind with an oracle, recompute AP50, and report the gain. Duplicates and background detections are
removed; a wrong-class detection takes the class of its object, and a poorly placed one its object's
box, so either becomes a true positive unless its object is already matched (then it is removed, as
the duplicate it would be); missed objects are removed from the ground truth. The fixes keep the
scores, so the ranking the AP reads is the detector's own.

Crowd boxes are left out of the ground truth, and detections lying mostly inside one (intersection
over the detection's area >= 0.5) are left out too, as COCO ignores them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = ["ImageResult", "KINDS", "SIZES", "image_results", "classify", "confusion_matrix",
           "average_precision", "error_breakdown", "images_worst_first"]

KINDS = ("missed", "wrong class", "background", "poor localisation", "duplicate")
SIZES = ("small", "medium", "large")           # COCO's: area < 32², < 96², the rest
FG_IOU, BG_IOU = 0.5, 0.1                      # TIDE's foreground and background thresholds
_TP = "true positive"


@dataclass
class ImageResult:
    """One image's ground truth ``gt_boxes [G, 4]``, ``gt_labels [G]`` and detections ``boxes [D, 4]``,
    ``scores [D]``, ``labels [D]`` (contiguous labels, boxes ``x1, y1, x2, y2`` pixels); ``region``: the
    rectangle of ``file_name`` the image is, when it is part of a photo (:class:`~densedet.data.ImageRecord`)."""

    image_id: int
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    file_name: str = ""
    region: tuple[int, int, int, int] | None = None

    @staticmethod
    def make(image_id: int, gt_boxes, gt_labels, boxes, scores, labels, file_name: str = "",
             region: tuple[int, int, int, int] | None = None) -> "ImageResult":
        """An :class:`ImageResult` from any array-likes (lists included), with the dtypes fixed."""
        return ImageResult(int(image_id), np.asarray(gt_boxes, np.float64).reshape(-1, 4),
                           np.asarray(gt_labels, np.int64).reshape(-1), np.asarray(boxes, np.float64).reshape(-1, 4),
                           np.asarray(scores, np.float64).reshape(-1), np.asarray(labels, np.int64).reshape(-1),
                           file_name, None if region is None else tuple(int(v) for v in region))


@dataclass
class Matched:
    """:func:`classify`'s answer for one image: ``kind[d]`` of each detection kept (scores ``>= score_thresh``,
    in falling score order: ``order[d]`` is its index in the image's detections), ``target[d]`` the
    object it points at (-1 for background), and ``matched[g]`` whether a true positive took object g."""

    order: np.ndarray
    kind: list[str]
    target: np.ndarray
    matched: np.ndarray
    missed: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[len(a), len(b)]`` IoU of two box sets."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def _size_of(boxes: np.ndarray) -> np.ndarray:
    """COCO size index (0 small, 1 medium, 2 large) of each box, by area."""
    area = (boxes[:, 2:] - boxes[:, :2]).clip(0).prod(-1)
    return np.digitize(area, [32.0 ** 2, 96.0 ** 2])


def _on_crowd(boxes: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """``[D]`` whether each box lies mostly (half its area or more) inside one of the ``crowd`` boxes."""
    if len(crowd) == 0 or len(boxes) == 0:
        return np.zeros(len(boxes), bool)
    lt = np.maximum(boxes[:, None, :2], crowd[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], crowd[None, :, 2:])
    inside = np.clip(rb - lt, 0, None).prod(-1) / np.maximum((boxes[:, 2:] - boxes[:, :2]).prod(-1), 1e-12)[:, None]
    return inside.max(1) >= 0.5


def image_results(data, results: Sequence[dict]) -> list[ImageResult]:
    """:class:`ImageResult` per record of a :class:`~densedet.data.DetectionData`, from COCO results
    (``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``, as ``predict_dataset`` makes)."""
    category_ids = data.category_ids or list(range(1, data.num_classes + 1))
    label_of = {c: i for i, c in enumerate(category_ids)}
    by_image: dict[int, list[dict]] = {}
    for r in results:
        by_image.setdefault(int(r["image_id"]), []).append(r)
    out = []
    for rec in data.records:
        crowd = np.asarray(rec.iscrowd, bool)
        gt_boxes = np.asarray(rec.boxes, np.float64).reshape(-1, 4)
        dets = by_image.get(int(rec.image_id), [])
        xywh = np.array([d["bbox"] for d in dets], np.float64).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        scores = np.array([d["score"] for d in dets], np.float64)
        labels = np.array([label_of[d["category_id"]] for d in dets], np.int64)
        keep = ~_on_crowd(boxes, gt_boxes[crowd])      # detections on a crowd region are neither right nor wrong
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        out.append(ImageResult.make(rec.image_id, gt_boxes[~crowd], np.asarray(rec.labels)[~crowd], boxes, scores,
                                    labels, str(rec.file_name), rec.region))
    return out


def classify(image: ImageResult, score_thresh: float = 0.0) -> Matched:
    """The kind of each detection of ``image`` scoring ``>= score_thresh`` and the objects missed
    (the rules in the module's docstring)."""
    order = np.argsort(-image.scores, kind="stable")
    order = order[image.scores[order] >= score_thresh]
    iou = _iou(image.boxes[order], image.gt_boxes)                           # [D, G]
    same = image.labels[order][:, None] == image.gt_labels[None, :]
    matched = np.zeros(len(image.gt_boxes), bool)
    kinds, targets = [], np.full(len(order), -1, np.int64)
    for d in range(len(order)):
        free = (iou[d] >= FG_IOU) & same[d] & ~matched
        if free.any():
            g = int(np.where(free, iou[d], -1.0).argmax())
            matched[g], targets[d] = True, g
            kinds.append(_TP)
            continue
        for kind, candidates in (("duplicate", (iou[d] >= FG_IOU) & same[d]),
                                 ("wrong class", (iou[d] >= FG_IOU) & ~same[d]),
                                 ("poor localisation", (iou[d] >= BG_IOU) & same[d])):
            if candidates.any():
                kinds.append(kind)
                targets[d] = int(np.where(candidates, iou[d], -1.0).argmax())
                break
        else:
            kinds.append("background")
    pointed = np.zeros(len(image.gt_boxes), bool)
    for kind, g in zip(kinds, targets):
        if kind in ("wrong class", "poor localisation"):
            pointed[g] = True
    return Matched(order, kinds, targets, matched, ~matched & ~pointed)


def confusion_matrix(images: Sequence[ImageResult], num_classes: int, score_thresh: float = 0.3,
                     iou_thresh: float = 0.5) -> np.ndarray:
    """``[K + 1, K + 1]`` counts: row = the object's class, column = the detection's class, the last
    row and column background.

    Detections scoring ``>= score_thresh`` are matched greedily in falling score order, each to the
    unmatched object it overlaps most at IoU ``>= iou_thresh`` whatever the classes; a matched pair
    counts at ``[object class, detection class]``, an object left unmatched at ``[class, K]`` (missed)
    and a detection left unmatched at ``[K, class]`` (background). ``[K, K]`` stays 0.
    """
    k = num_classes
    matrix = np.zeros((k + 1, k + 1), np.int64)
    for image in images:
        order = np.argsort(-image.scores, kind="stable")
        order = order[image.scores[order] >= score_thresh]
        iou = _iou(image.boxes[order], image.gt_boxes)
        taken = np.zeros(len(image.gt_boxes), bool)
        for d, det in enumerate(order):
            free = (iou[d] >= iou_thresh) & ~taken
            if free.any():
                g = int(np.where(free, iou[d], -1.0).argmax())
                taken[g] = True
                matrix[image.gt_labels[g], image.labels[det]] += 1
            else:
                matrix[k, image.labels[det]] += 1
        np.add.at(matrix, (image.gt_labels[~taken], k), 1)
    return matrix


def average_precision(scores: np.ndarray, labels: np.ndarray, true: np.ndarray, num_objects: np.ndarray) -> float:
    """Mean over classes with objects of COCO's 101-point interpolated AP.

    ``scores [N]``, ``labels [N]``, ``true [N]`` (true positive or not) describe every detection of
    the split; ``num_objects [K]`` counts the objects of each class. Precision at recall r is the
    best precision at any recall >= r (COCO's envelope), read at r = 0, 0.01, ..., 1.
    """
    grid = np.linspace(0.0, 1.0, 101)
    aps = []
    for c in np.flatnonzero(num_objects > 0):
        mine = labels == c
        order = np.argsort(-scores[mine], kind="mergesort")
        tp = np.cumsum(true[mine][order])
        fp = np.cumsum(~true[mine][order])
        recall = tp / num_objects[c]
        precision = tp / np.maximum(tp + fp, 1e-12)
        envelope = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
        idx = np.searchsorted(recall, grid, side="left")
        inside = idx < len(recall)
        at = np.zeros_like(grid)
        at[inside] = envelope[idx[inside]]
        aps.append(at.mean())
    return float(np.mean(aps)) if aps else 0.0


def _scored(images: Sequence[ImageResult], matches: Sequence[Matched], num_classes: int, fix: str | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(scores, labels, true, num_objects) of every kept detection, with one kind of error fixed
    (the oracle of the module's docstring) or none."""
    scores, labels, true = [], [], []
    num_objects = np.zeros(num_classes, np.int64)
    for image, m in zip(images, matches):
        counted = ~m.missed if fix == "missed" else np.ones(len(image.gt_boxes), bool)
        np.add.at(num_objects, image.gt_labels[counted], 1)
        taken = m.matched.copy()
        for d, kind in enumerate(m.kind):
            det, label, is_true = m.order[d], image.labels[m.order[d]], kind == _TP
            if kind == fix and kind in ("duplicate", "background"):
                continue
            if kind == fix and kind in ("wrong class", "poor localisation"):
                g = m.target[d]
                if taken[g]:
                    continue                       # its object is matched already: it would be a duplicate
                taken[g], label, is_true = True, image.gt_labels[g], True
            scores.append(image.scores[det])
            labels.append(label)
            true.append(is_true)
    return (np.asarray(scores, np.float64), np.asarray(labels, np.int64), np.asarray(true, bool), num_objects)


def error_breakdown(images: Sequence[ImageResult], num_classes: int, score_thresh: float = 0.0) -> dict:
    """The errors of ``images`` by kind and by object size, and the AP50 each kind costs.

    Returns ``{"ap50": AP50 of the detections kept, "ap50_gain": {kind: AP50 with that kind fixed
    minus AP50}, "counts": {kind: n}, "by_size": {kind: {size: n}}, "true_positives": n, "objects": n,
    "per_image": [{"image_id", "errors", "missed", "false_positives", "objects", "recall"}]}``.
    A detection's size is its object's (its own for background), COCO's small / medium / large by area.
    """
    matches = [classify(image, score_thresh) for image in images]
    base = average_precision(*_scored(images, matches, num_classes))
    counts = {kind: 0 for kind in KINDS}
    by_size = {kind: {size: 0 for size in SIZES} for kind in KINDS}
    per_image = []
    true_positives = objects = 0
    for image, m in zip(images, matches):
        gt_size = _size_of(image.gt_boxes)
        own_size = _size_of(image.boxes[m.order])
        for d, kind in enumerate(m.kind):
            if kind == _TP:
                true_positives += 1
                continue
            counts[kind] += 1
            by_size[kind][SIZES[own_size[d] if kind == "background" else gt_size[m.target[d]]]] += 1
        for g in np.flatnonzero(m.missed):
            counts["missed"] += 1
            by_size["missed"][SIZES[gt_size[g]]] += 1
        false_positives = sum(kind != _TP for kind in m.kind)
        objects += len(image.gt_boxes)
        per_image.append({"image_id": image.image_id, "errors": int(m.missed.sum()) + false_positives,
                          "missed": int((~m.matched).sum()), "false_positives": false_positives,
                          "objects": len(image.gt_boxes),
                          "recall": float(m.matched.mean()) if len(image.gt_boxes) else 1.0})
    gains = {kind: average_precision(*_scored(images, matches, num_classes, kind)) - base for kind in KINDS}
    return {"ap50": base, "ap50_gain": gains, "counts": counts, "by_size": by_size, "score_thresh": score_thresh,
            "true_positives": true_positives, "objects": objects, "per_image": per_image}


def images_worst_first(per_image: Sequence[dict]) -> list[int]:
    """Indices into ``per_image`` (:func:`error_breakdown`'s) from the worst image to the best: most
    errors first, then lowest recall, then more objects; ties keep the split's order."""
    return sorted(range(len(per_image)),
                  key=lambda i: (-per_image[i]["errors"], per_image[i]["recall"], -per_image[i]["objects"], i))

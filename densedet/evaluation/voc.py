"""Pascal VOC box evaluation: per-class AP (VOC2007 11-point or VOC2010+ area) and their mean.

Rules (the VOC devkit's, with SPEC's continuous boxes):
- Per class, detections of the whole dataset are taken in descending score order (stable on ties)
  and each is matched to the ground-truth box of its image with the largest IoU. IoU >= the
  threshold (0.5) and that GT is "difficult": the detection is ignored (neither TP nor FP).
  Otherwise the first detection to reach a GT is a TP and any later one on the same GT an FP.
  IoU below the threshold: FP.
- Difficult GTs do not count in the number of positives.
- IoU uses continuous coordinates: area = (x2 - x1) * (y2 - y1), no "+1 pixel" (SPEC), so numbers
  can differ slightly from the original devkit on the same boxes.
- A class with no (non-difficult) ground truth has AP nan, as in the devkit, and is left out of
  the mean. mAP is nan only if no class has ground truth.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from densedet.evaluation._format import format_per_class_table
from densedet.evaluation.coco import (_check_results_match_gt, _source, _to_numpy, load_coco_annotations,
                                      load_coco_results)

__all__ = ["voc_ap", "evaluate_voc", "evaluate_voc_from_coco", "format_voc_table"]


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False) -> float:
    """Average precision of one class from its precision/recall points (in detection order).

    Args:
        recall: (D,) cumulative recall after each detection (non-decreasing).
        precision: (D,) cumulative precision after each detection.
        use_07_metric: True: VOC2007's 11-point mean, over t in {0, 0.1, ..., 1}, of the highest
            precision at recall >= t (0 if recall never reaches t). False: VOC2010+ area under the
            precision envelope (precision made non-increasing from the right), summed over the
            recall steps.

    Returns:
        AP in [0, 1]; 0 for an empty curve.
    """
    recall = np.asarray(recall, dtype=np.float64).reshape(-1)
    precision = np.asarray(precision, dtype=np.float64).reshape(-1)
    if recall.shape != precision.shape:
        raise ValueError(f"recall {recall.shape} and precision {precision.shape} must have the same length")
    if use_07_metric:
        total = 0.0
        # i / 10 rather than 0.1 * i: 0.1 * 3 = 0.30000000000000004 would reject a recall of exactly 0.3.
        for t in np.arange(11) / 10.0:
            reached = precision[recall >= t]
            total += float(reached.max()) if reached.size else 0.0
        return total / 11.0
    # Sentinels: the curve starts at recall 0 and ends at recall 1 with precision 0.
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # envelope: best precision at any higher recall
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU (N, M) of boxes a (N, 4) and b (M, 4), (x1, y1, x2, y2), continuous coordinates."""
    area_a = (a[:, 2] - a[:, 0]).clip(min=0) * (a[:, 3] - a[:, 1]).clip(min=0)
    area_b = (b[:, 2] - b[:, 0]).clip(min=0) * (b[:, 3] - b[:, 1]).clip(min=0)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clip(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _image_arrays(entry: dict[str, Any], where: str, keys: Sequence[str]) -> list[np.ndarray]:
    for key in keys:
        if key not in entry:
            raise ValueError(f"{where} has no '{key}' entry")
    return [_to_numpy(entry[key]) for key in keys]


def _check_labels(labels: np.ndarray, where: str, num_classes: int) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{where} has a label outside 0..{num_classes - 1}: {sorted(set(labels.tolist()))}")


def _read_detections(det: dict[str, Any], i: int, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """boxes (N, 4) float64, scores (N,), labels (N,) int64 of ``detections[i]``, checked."""
    boxes, scores, labels = _image_arrays(det, f"detections[{i}]", ("boxes", "scores", "labels"))
    boxes = boxes.astype(np.float64).reshape(-1, 4)
    scores = scores.astype(np.float64).reshape(-1)
    labels = labels.astype(np.int64).reshape(-1)
    if not (len(boxes) == len(scores) == len(labels)):
        raise ValueError(f"detections[{i}]: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels must agree")
    _check_labels(labels, f"detections[{i}]", num_classes)
    return boxes, scores, labels


def _read_ground_truth(gt: dict[str, Any], i: int, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """boxes (M, 4) float64, labels (M,) int64, difficult (M,) bool of ``ground_truths[i]``, checked."""
    boxes, labels = _image_arrays(gt, f"ground_truths[{i}]", ("boxes", "labels"))
    boxes = boxes.astype(np.float64).reshape(-1, 4)
    labels = labels.astype(np.int64).reshape(-1)
    if gt.get("difficult") is not None:
        difficult = _to_numpy(gt["difficult"]).astype(bool).reshape(-1)
    else:
        difficult = np.zeros(len(boxes), dtype=bool)
    if not (len(boxes) == len(labels) == len(difficult)):
        raise ValueError(
            f"ground_truths[{i}]: {len(boxes)} boxes, {len(labels)} labels, {len(difficult)} difficult flags must agree"
        )
    _check_labels(labels, f"ground_truths[{i}]", num_classes)
    return boxes, labels, difficult


def _match_image(
    det_boxes: np.ndarray, gt_boxes: np.ndarray, gt_difficult: np.ndarray, iou_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching of one image's detections (already in descending score order) for one class.

    Returns tp (D,) and ignored (D,) booleans; a detection that is neither is an FP.
    """
    tp = np.zeros(len(det_boxes), dtype=bool)
    ignored = np.zeros(len(det_boxes), dtype=bool)
    if len(gt_boxes) == 0:
        return tp, ignored
    iou = _box_iou(det_boxes, gt_boxes)
    best_gt = iou.argmax(axis=1)
    best_iou = iou[np.arange(len(det_boxes)), best_gt]
    taken = np.zeros(len(gt_boxes), dtype=bool)
    for d in np.flatnonzero(best_iou >= iou_threshold).tolist():
        g = best_gt[d]
        if gt_difficult[g]:
            ignored[d] = True
        elif not taken[g]:
            tp[d] = True
            taken[g] = True
    return tp, ignored


def _match_class(
    det_img: np.ndarray,
    det_boxes: np.ndarray,
    gt_img: np.ndarray,
    gt_boxes: np.ndarray,
    gt_difficult: np.ndarray,
    iou_threshold: float,
) -> tuple[np.ndarray, np.ndarray]:
    """TP (D,) and ignored (D,) flags of one class's detections, given in descending score order.

    A detection competes only with detections of its own image for a GT, so matching image by
    image (keeping the global score order inside each image) equals the devkit's dataset-wide loop.
    """
    tp = np.zeros(len(det_img), dtype=bool)
    ignored = np.zeros(len(det_img), dtype=bool)
    if len(det_img) == 0 or len(gt_img) == 0:
        return tp, ignored
    gt_order = np.argsort(gt_img, kind="stable")
    gt_img_sorted = gt_img[gt_order]
    by_image = np.argsort(det_img, kind="stable")  # positions grouped by image, score order kept
    bounds = np.flatnonzero(np.diff(det_img[by_image])) + 1
    for positions in np.split(by_image, bounds):
        img = det_img[positions[0]]
        lo, hi = np.searchsorted(gt_img_sorted, [img, img + 1])
        if lo == hi:
            continue  # no GT of this class here: all FPs
        gts = gt_order[lo:hi]
        tp[positions], ignored[positions] = _match_image(
            det_boxes[positions], gt_boxes[gts], gt_difficult[gts], iou_threshold
        )
    return tp, ignored


def evaluate_voc(
    detections: Sequence[dict[str, Any]],
    ground_truths: Sequence[dict[str, Any]],
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    iou_threshold: float = 0.5,
    use_07_metric: bool = False,
) -> dict[str, Any]:
    """Pascal VOC per-class AP and mAP.

    Args:
        detections: one dict per image: ``boxes`` (N, 4) as (x1, y1, x2, y2), ``scores`` (N,),
            ``labels`` (N,) in 0..K-1 (tensors or arrays).
        ground_truths: one dict per image, same order: ``boxes`` (M, 4), ``labels`` (M,) and
            optionally ``difficult`` (M,) booleans (default all False).
        num_classes: K; or give ``class_names`` (K names; default names are "0".."K-1").
        iou_threshold: a detection matches a GT at IoU >= this.
        use_07_metric: VOC2007 11-point AP instead of the VOC2010+ area.

    Returns:
        ``{"mAP": float, "per_class": {name: AP (nan without GT)}, "precision": {name: (D,)},
        "recall": {name: (D,)}, "num_positives": {name: int}, "curves": {name: {"IoU=0.50":
        (recall, precision)}}}``; precision/recall are per detection of that class in descending
        score order, ignored (difficult) detections removed.
    """
    names = _class_names(num_classes, class_names)
    if len(detections) != len(ground_truths):
        raise ValueError(f"{len(detections)} detection dicts but {len(ground_truths)} ground-truth dicts")
    dets = _flatten([_read_detections(det, i, len(names)) for i, det in enumerate(detections)])
    gts = _flatten([_read_ground_truth(gt, i, len(names)) for i, gt in enumerate(ground_truths)])
    det_img, det_boxes, det_scores, det_labels = dets
    gt_img, gt_boxes, gt_labels, gt_difficult = gts

    per_class: dict[str, float] = {}
    precisions: dict[str, np.ndarray] = {}
    recalls: dict[str, np.ndarray] = {}
    positives: dict[str, int] = {}
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for c, name in enumerate(names):
        gt_sel = gt_labels == c
        npos = int(np.count_nonzero(~gt_difficult[gt_sel]))
        det_sel = np.flatnonzero(det_labels == c)
        order = det_sel[np.argsort(-det_scores[det_sel], kind="stable")]
        tp, ignored = _match_class(det_img[order], det_boxes[order], gt_img[gt_sel], gt_boxes[gt_sel],
                                   gt_difficult[gt_sel], iou_threshold)
        kept_tp = tp[~ignored]
        tp_cum = np.cumsum(kept_tp).astype(np.float64)
        fp_cum = np.cumsum(~kept_tp).astype(np.float64)
        precision = tp_cum / np.maximum(tp_cum + fp_cum, 1.0)  # every kept detection is TP or FP
        recall = tp_cum / npos if npos > 0 else np.full(len(tp_cum), np.nan)
        precisions[name], recalls[name], positives[name] = precision, recall, npos
        if npos > 0:
            per_class[name] = voc_ap(recall, precision, use_07_metric)
            curves[name] = {f"IoU={iou_threshold:.2f}": (recall, precision)}
        else:
            per_class[name] = float("nan")

    defined = [ap for ap in per_class.values() if not np.isnan(ap)]
    return {
        "mAP": float(np.mean(defined)) if defined else float("nan"),
        "per_class": per_class,
        "precision": precisions,
        "recall": recalls,
        "num_positives": positives,
        "curves": curves,
    }


def _class_names(num_classes: int | None, class_names: Sequence[str] | None) -> list[str]:
    """The K class names: given (distinct, agreeing with ``num_classes``), or "0".."K-1"."""
    if class_names is None:
        if num_classes is None:
            raise ValueError("evaluate_voc needs num_classes or class_names")
        return [str(c) for c in range(num_classes)]
    if num_classes is not None and num_classes != len(class_names):
        raise ValueError(f"num_classes={num_classes} but {len(class_names)} class_names")
    names = [str(n) for n in class_names]
    if len(set(names)) != len(names):
        raise ValueError(f"class_names must be distinct, got {names}")
    return names


def _flatten(per_image: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...]:
    """Every image's (boxes [N, 4], a [N], b [N]) as dataset-wide arrays, led by the image index
    of each row: ``(image [ΣN], boxes [ΣN, 4], a [ΣN], b [ΣN])``."""
    if not per_image:
        return np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0), np.zeros(0)
    image = np.concatenate([np.full(len(p[0]), i, np.int64) for i, p in enumerate(per_image)])
    columns = [np.concatenate([p[k] for p in per_image]) for k in range(3)]
    return (image, *columns)


def evaluate_voc_from_coco(
    results: list | str | os.PathLike,
    annotations: dict | str | os.PathLike,
    use_07_metric: bool = False,
    iou_threshold: float = 0.5,
    strict: bool = False,
) -> dict[str, Any]:
    """``evaluate_voc`` on COCO-format files (results list and ground truth, dicts or JSON paths).

    Categories in ascending id order become the classes (named by their ``name`` field). A GT is
    difficult if its ``difficult`` (or else ``ignore``) field is true, or if it is a crowd box
    (``iscrowd``): matching a crowd region should neither reward nor punish a detector.
    """
    dataset = load_coco_annotations(annotations, strict=strict)
    records = load_coco_results(results)
    _check_results_match_gt(records, dataset, _source(results, "results"), _source(annotations, "annotations"))
    cat_ids = sorted(cat["id"] for cat in dataset["categories"])
    label_of = {cid: k for k, cid in enumerate(cat_ids)}
    name_of = {cat["id"]: str(cat.get("name", cat["id"])) for cat in dataset["categories"]}
    names = [name_of[c] for c in cat_ids]
    if len(set(names)) != len(names):
        names = [f"{name_of[c]} (id {c})" for c in cat_ids]
    index_of = {img["id"]: i for i, img in enumerate(dataset["images"])}

    n = len(index_of)
    gt_lists: list[dict[str, list]] = [{"boxes": [], "labels": [], "difficult": []} for _ in range(n)]
    for ann in dataset["annotations"]:
        if ann["image_id"] not in index_of:
            raise ValueError(f"annotation id {ann.get('id')} refers to image id {ann['image_id']} not in 'images'")
        if ann["category_id"] not in label_of:
            raise ValueError(f"annotation id {ann.get('id')} has category id {ann['category_id']} not in 'categories'")
        x, y, w, h = (float(v) for v in ann["bbox"])
        flag = ann["difficult"] if "difficult" in ann else ann.get("ignore", False)
        entry = gt_lists[index_of[ann["image_id"]]]
        entry["boxes"].append([x, y, x + w, y + h])
        entry["labels"].append(label_of[ann["category_id"]])
        entry["difficult"].append(bool(flag) or bool(ann.get("iscrowd", 0)))
    det_lists: list[dict[str, list]] = [{"boxes": [], "scores": [], "labels": []} for _ in range(n)]
    for rec in records:
        x, y, w, h = rec["bbox"]
        entry = det_lists[index_of[rec["image_id"]]]
        entry["boxes"].append([x, y, x + w, y + h])
        entry["scores"].append(rec["score"])
        entry["labels"].append(label_of[rec["category_id"]])

    def as_arrays(d: dict[str, list]) -> dict[str, np.ndarray]:
        arrays = {k: np.asarray(v) for k, v in d.items()}
        arrays["boxes"] = np.asarray(d["boxes"], dtype=np.float64).reshape(-1, 4)
        return arrays

    return evaluate_voc(
        [as_arrays(d) for d in det_lists],
        [as_arrays(g) for g in gt_lists],
        class_names=names,
        iou_threshold=iou_threshold,
        use_07_metric=use_07_metric,
    )


def format_voc_table(metrics: dict[str, Any]) -> str:
    """mAP and the per-class AP table (classes without ground truth shown as "-")."""
    return f"mAP = {100.0 * metrics['mAP']:.2f}\n" + format_per_class_table(metrics["per_class"], value_name="AP")

"""COCO box evaluation: the official ``pycocotools`` COCOeval with a configurable detection cap.

``evaluate_coco`` runs ``COCOeval`` (iouType ``bbox``) unchanged for the matching and the
precision/recall accumulation, then reads the 12 summary numbers from ``eval['precision']`` and
``eval['recall']`` itself. Why not ``COCOeval.summarize``: it looks up AP at ``maxDets == 100``
literally and the others at ``maxDets[0..2]``, so any cap other than 100 silently gives AP = -1.
Here every AP-type number uses the largest cap and the AR names follow the caps
(``max_dets=(1, 10, 300)`` gives ``AR1, AR10, AR300``). For the default caps the numbers are
identical to ``COCOeval.stats`` (same slices, same reduction order).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from densedet.data.coco import read_json
from densedet.data.records import DataReport, DatasetError
from densedet.evaluation._format import format_per_class_table

_log = logging.getLogger(__name__)

__all__ = [
    "evaluate_coco",
    "format_table",
    "detections_to_coco",
    "load_coco_annotations",
    "load_coco_results",
    "coco_pr_curves",
    "summarize_coco_eval",
]

AREA_NAMES = ("all", "small", "medium", "large")
_AREA_SUFFIX = {"small": "s", "medium": "m", "large": "l"}


# --------------------------------------------------------------------------- loading and checks
# The same care as the training readers (densedet.data.coco): files are read with the same error
# messages (missing, binary, empty, truncated JSON), every record is checked where it enters, and a
# bad value raises DatasetError naming the file and the record rather than reaching pycocotools.

def _source(obj: Any, default: str) -> str:
    return str(obj) if isinstance(obj, (str, os.PathLike)) else default


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_id(value: Any) -> bool:
    """COCO ids are integers (some converters write strings); never floats, bools, lists or null."""
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, str)


def _numbers(value: Any, count: int) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == count and all(_is_number(v) for v in value)


def _ids(entries: Any, kind: str, source: str) -> set:
    """The ids of ``images`` or ``categories`` entries: objects with an ``id``, no duplicates."""
    seen: set = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DatasetError(f"{source}: {kind}[{i}] is {type(entry).__name__}, expected an object")
        if "id" not in entry:
            raise DatasetError(f"{source}: {kind}[{i}] has no 'id' field")
        if not _is_id(entry["id"]):
            raise DatasetError(f"{source}: {kind}[{i}]: 'id' must be an integer, got {entry['id']!r}")
        if entry["id"] in seen:
            raise DatasetError(f"{source}: duplicate {kind[:-1] if kind != 'categories' else 'category'} "
                               f"id {entry['id']!r} ({kind}[{i}])")
        seen.add(entry["id"])
    return seen


def load_coco_annotations(annotations: dict | str | os.PathLike, strict: bool = False,
                          report: DataReport | None = None) -> dict:
    """Load and check a COCO ground-truth dict (or JSON file); return a copy safe to hand to pycocotools.

    Checked as the training reader checks it: a JSON object with the lists ``images``,
    ``annotations`` and ``categories``; image, category and annotation ids distinct; every
    annotation names a known image and category and has a ``bbox`` of 4 numbers. A box with zero or
    negative width or height, or a NaN/inf coordinate, cannot be matched: it is left out of the
    evaluation and counted in ``report`` (logged as a warning), or refused with ``strict=True``.
    Every problem raises :class:`~densedet.data.DatasetError` naming the file and the record.

    pycocotools writes ``ignore`` into every GT annotation during evaluation, so each annotation
    is copied (shallowly) to leave the caller's dict untouched. Missing ``iscrowd`` defaults to 0,
    missing ``area`` to the box area ``w * h`` and a missing ``id`` to one not used by the file.
    """
    source = _source(annotations, "annotations dict")
    doc = read_json(source, "annotation file") if isinstance(annotations, (str, os.PathLike)) else annotations
    if not isinstance(doc, dict):
        raise DatasetError(f"{source}: a COCO annotation file must hold a JSON object with 'images', "
                           f"'annotations' and 'categories', got a JSON {type(doc).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in doc:
            raise DatasetError(f"{source}: missing the top-level field '{key}'")
        if not isinstance(doc[key], list):
            raise DatasetError(f"{source}: '{key}' must be a list, got {type(doc[key]).__name__}")
    image_ids = _ids(doc["images"], "images", source)
    category_ids = _ids(doc["categories"], "categories", source)
    report = report if report is not None else DataReport(source=f"ground truth {source}")
    given_ids = [a["id"] for a in doc["annotations"] if isinstance(a, dict) and _is_id(a.get("id"))]
    next_id = max([a for a in given_ids if isinstance(a, int)], default=0) + 1
    seen_ids: set = set()
    anns = []
    for i, ann in enumerate(doc["annotations"]):
        where = _checked_annotation(ann, i, source, image_ids, category_ids, seen_ids)
        bbox = ann["bbox"]
        if not all(math.isfinite(v) for v in bbox):
            report.note("dropped_nonfinite", f"{where} (image id {ann['image_id']}): bbox {bbox!r} has a "
                        f"NaN or infinite coordinate", strict)
            continue
        if bbox[2] <= 0 or bbox[3] <= 0:
            report.note("dropped_degenerate", f"{where} (image id {ann['image_id']}): bbox {bbox!r} has zero "
                        f"or negative width or height", strict)
            continue
        ann = dict(ann)
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(bbox[2]) * float(bbox[3]))
        if "id" not in ann:
            while next_id in seen_ids or next_id in given_ids:
                next_id += 1
            ann["id"] = next_id
            seen_ids.add(next_id)
        anns.append(ann)
    report.boxes += len(anns)
    report.images += len(image_ids)
    if report.dropped:
        _log.warning(f"{source}: left {report.dropped} ground-truth box(es) out of the evaluation: "
                     f"{report.dropped_degenerate} with zero/negative width or height, {report.dropped_nonfinite} "
                     f"with NaN/inf coordinates (--strict refuses them); e.g. {report.examples[0]}")
    dataset = dict(doc)
    dataset["annotations"] = anns
    return dataset


def _checked_annotation(ann: Any, i: int, source: str, image_ids: set, category_ids: set, seen_ids: set) -> str:
    """Refuse a ground-truth annotation that is not an object, repeats an id, lacks a field, names an
    unknown image or category, or has a ``bbox`` / ``area`` that is not numbers; returns where it is
    (for messages) and records its id in ``seen_ids``."""
    where = f"{source}: annotations[{i}]"
    if not isinstance(ann, dict):
        raise DatasetError(f"{where} is {type(ann).__name__}, expected an object")
    if "id" in ann:
        where = f"{source}: annotation id {ann['id']!r} (annotations[{i}])"
        if not _is_id(ann["id"]):
            raise DatasetError(f"{where}: 'id' must be an integer")
        if ann["id"] in seen_ids:
            raise DatasetError(f"{where}: duplicate annotation id")
        seen_ids.add(ann["id"])
    for key in ("image_id", "category_id", "bbox"):
        if key not in ann:
            raise DatasetError(f"{where} has no '{key}' field")
    if not _is_id(ann["image_id"]) or ann["image_id"] not in image_ids:
        raise DatasetError(f"{where}: refers to image id {ann['image_id']!r}, which is not in 'images'")
    if not _is_id(ann["category_id"]) or ann["category_id"] not in category_ids:
        raise DatasetError(f"{where}: unknown category id {ann['category_id']!r} "
                           f"(known: {sorted(category_ids, key=str)[:20]})")
    if not _numbers(ann["bbox"], 4):
        raise DatasetError(f"{where}: 'bbox' must be a list of 4 numbers [x, y, w, h], got {ann['bbox']!r}")
    if "area" in ann and not (_is_number(ann["area"]) and math.isfinite(ann["area"])):
        raise DatasetError(f"{where}: 'area' must be a finite number, got {ann['area']!r}")
    return where


def load_coco_results(results: list | str | os.PathLike) -> list[dict]:
    """Load and check a COCO results list (or JSON file) as fresh records ``{image_id, category_id, bbox, score}``.

    Each record must be an object whose ``bbox`` is 4 finite numbers ``[x, y, w, h]`` with ``w, h
    >= 0``, whose ``score`` is a finite number and whose ids are integers; otherwise
    :class:`~densedet.data.DatasetError` names the file and the record. (Whether the ids exist in the
    ground truth is checked by :func:`_check_results_match_gt`.) Copies are made because
    ``COCO.loadRes`` adds fields to every record it is given.
    """
    source = _source(results, "results list")
    if isinstance(results, (str, os.PathLike)):
        results = read_json(source, "results file")
    if not isinstance(results, list):
        raise DatasetError(f"{source}: COCO results must be a JSON list of detections "
                           f"[{{image_id, category_id, bbox, score}}, ...], got a JSON {type(results).__name__}")
    records = []
    for i, det in enumerate(results):
        if not isinstance(det, dict):
            raise DatasetError(f"{source}: record #{i} is {type(det).__name__}, expected an object")
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in det:
                raise DatasetError(f"{source}: record #{i} has no '{key}' field")
        for key in ("image_id", "category_id"):
            if not _is_id(det[key]):
                raise DatasetError(f"{source}: record #{i}: '{key}' must be an integer, got {det[key]!r}")
        bbox = det["bbox"]
        if not _numbers(bbox, 4):
            raise DatasetError(f"{source}: record #{i} has bbox {bbox!r}, expected 4 numbers [x, y, w, h]")
        if not all(math.isfinite(v) for v in bbox):
            raise DatasetError(f"{source}: record #{i} has bbox {bbox!r} with a NaN or infinite coordinate")
        if bbox[2] < 0 or bbox[3] < 0:
            raise DatasetError(f"{source}: record #{i} has bbox {bbox!r} with a negative width or height "
                               f"(COCO boxes are [x, y, w, h], not [x1, y1, x2, y2])")
        score = det["score"]
        if not _is_number(score) or not math.isfinite(score):
            raise DatasetError(f"{source}: record #{i} has score {score!r}, expected a finite number")
        records.append({"image_id": det["image_id"], "category_id": det["category_id"],
                        "bbox": [float(v) for v in bbox], "score": float(score)})
    return records


def _check_results_match_gt(records: list[dict], dataset: dict, source: str = "results",
                            gt_source: str = "the ground truth") -> None:
    """Raise if results name images or categories the ground truth does not have.

    pycocotools only asserts "Results do not correspond to current coco set" for images and
    silently drops unknown categories (usually a label/category-id mapping bug).
    """
    image_ids = {img["id"] for img in dataset["images"]}
    category_ids = {cat["id"] for cat in dataset["categories"]}
    bad_images = sorted({r["image_id"] for r in records} - image_ids, key=str)
    if bad_images:
        first = next(i for i, r in enumerate(records) if r["image_id"] == bad_images[0])
        raise DatasetError(
            f"{source}: results name {len(bad_images)} image id(s) not in the ground truth ({gt_source}), "
            f"e.g. {bad_images[:5]} (first at record #{first}); were the results made for another annotation file?"
        )
    bad_cats = sorted({r["category_id"] for r in records} - category_ids, key=str)
    if bad_cats:
        first = next(i for i, r in enumerate(records) if r["category_id"] == bad_cats[0])
        raise DatasetError(
            f"{source}: results use category id(s) {bad_cats[:5]} not in the ground-truth categories "
            f"{sorted(category_ids, key=str)[:10]} of {gt_source} (first at record #{first}); contiguous labels "
            f"must be mapped back to category ids (see detections_to_coco)"
        )


def _check_max_dets(max_dets: Sequence[int]) -> list[int]:
    caps = sorted(int(m) for m in max_dets)
    if not caps or caps[0] < 1 or len(set(caps)) != len(caps):
        raise ValueError(f"max_dets must be distinct positive integers, got {tuple(max_dets)!r}")
    return caps


def _class_names(dataset: dict, cat_ids: list[int], class_names: Sequence[str] | None) -> list[str]:
    """Names for ``cat_ids`` (sorted category ids); duplicates get their id appended to stay distinct."""
    if class_names is not None:
        if len(class_names) != len(cat_ids):
            raise ValueError(
                f"class_names has {len(class_names)} names but the ground truth has {len(cat_ids)} categories"
            )
        names = [str(n) for n in class_names]
    else:
        by_id = {cat["id"]: str(cat.get("name", cat["id"])) for cat in dataset["categories"]}
        names = [by_id[c] for c in cat_ids]
    counts = {n: names.count(n) for n in names}
    return [f"{n} (id {c})" if counts[n] > 1 else n for n, c in zip(names, cat_ids)]


# --------------------------------------------------------------------------- evaluation
def evaluate_coco(
    results: list | str | os.PathLike,
    annotations: dict | str | os.PathLike,
    max_dets: Sequence[int] = (1, 10, 100),
    class_names: Sequence[str] | None = None,
    verbose: bool = False,
    strict: bool = False,
) -> dict[str, Any]:
    """COCO box AP/AR of a results list against ground truth, with the official pycocotools code.

    Args:
        results: COCO results ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``
            or the path of such a JSON file. May be empty (every defined number is then 0).
        annotations: COCO ground truth (dict with ``images``, ``annotations``, ``categories``)
            or its JSON path.
        max_dets: caps on detections per image (COCOeval ``params.maxDets``). AP-type numbers and
            ARs/m/l use the largest; there is one ``AR<cap>`` per cap.
        class_names: names of the categories in ascending category-id order (default: the
            ``name`` fields of the ground truth).
        verbose: let pycocotools print its progress and print the table.
        strict: refuse ground-truth boxes of zero/negative size or with NaN/inf coordinates
            (by default they are left out, counted and logged; see :func:`load_coco_annotations`).

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}``
        (AR names follow ``max_dets``) as floats in [0, 1], -1 where pycocotools leaves a number
        undefined (no GT in that area range); ``"per_class"``: {name: AP at IoU 0.50:0.95, area
        all, largest cap, -1 for a category without GT}; ``"curves"``: {name: {"IoU=0.50":
        (recall thresholds (101,), precision (101,)), "IoU=0.75": ...}} for ``plot_pr_curves``.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dataset = load_coco_annotations(annotations, strict=strict)
    records = load_coco_results(results)
    caps = _check_max_dets(max_dets)
    _check_results_match_gt(records, dataset, _source(results, "results"), _source(annotations, "annotations"))

    # pycocotools prints progress on stdout; silence it unless asked.
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        if records:
            coco_dt = coco_gt.loadRes(records)
        else:
            # loadRes indexes anns[0]; an empty detection set is a valid (all-miss) answer.
            coco_dt = COCO()
            coco_dt.dataset = {"images": dataset["images"], "categories": dataset["categories"], "annotations": []}
            coco_dt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.params.maxDets = caps
        coco_eval.evaluate()
        coco_eval.accumulate()

    metrics: dict[str, Any] = summarize_coco_eval(coco_eval)
    names = _class_names(dataset, list(coco_eval.params.catIds), class_names)
    metrics["per_class"] = _per_class_ap(coco_eval, names)
    metrics["curves"] = coco_pr_curves(coco_eval, names)
    if verbose:
        print(format_table(metrics))
    return metrics


def _mean_defined(values: np.ndarray) -> float:
    """Mean over entries > -1 (-1 marks "undefined" in COCOeval), or -1 if there are none."""
    defined = values[values > -1]
    return float(np.mean(defined)) if defined.size else -1.0


def summarize_coco_eval(coco_eval: Any) -> dict[str, float]:
    """The 12 COCO summary numbers from an accumulated ``COCOeval``, for any ``params.maxDets``.

    Mirrors ``COCOeval.summarize`` (same array slices and reduction, so identical values for the
    default caps) except that AP-type numbers use the largest cap instead of a literal 100.
    """
    params = coco_eval.params
    precision = coco_eval.eval["precision"]  # (T iou, R recall thresholds, K classes, A areas, M caps)
    recall = coco_eval.eval["recall"]  # (T, K, A, M)
    caps = list(params.maxDets)
    area_index = {name: list(params.areaRngLbl).index(name) for name in AREA_NAMES}
    last = len(caps) - 1

    def ap(iou: float | None = None, area: str = "all") -> float:
        s = precision[:, :, :, area_index[area], last]
        if iou is not None:
            s = s[np.where(params.iouThrs == iou)[0]]
        return _mean_defined(s)

    def ar(cap_index: int, area: str = "all") -> float:
        return _mean_defined(recall[:, :, area_index[area], cap_index])

    stats = {"AP": ap(), "AP50": ap(0.5), "AP75": ap(0.75)}
    for area in ("small", "medium", "large"):
        stats["AP" + _AREA_SUFFIX[area]] = ap(area=area)
    for i, cap in enumerate(caps):
        stats[f"AR{cap}"] = ar(i)
    for area in ("small", "medium", "large"):
        stats["AR" + _AREA_SUFFIX[area]] = ar(last, area)
    return stats


def _per_class_ap(coco_eval: Any, names: list[str]) -> dict[str, float]:
    precision = coco_eval.eval["precision"]
    return {name: _mean_defined(precision[:, :, k, 0, -1]) for k, name in enumerate(names)}


Curves = dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]


def coco_pr_curves(coco_eval: Any, names: Sequence[str] | None = None) -> Curves:
    """Per-class precision at COCO's 101 recall thresholds, IoU 0.50 and 0.75, area all, largest cap.

    Returns ``{name: {"IoU=0.50": (recall (101,), precision (101,)), "IoU=0.75": ...}}``;
    categories without ground truth (precision -1) are left out.
    """
    params = coco_eval.params
    precision = coco_eval.eval["precision"]
    if names is None:
        names = [str(c) for c in params.catIds]
    recall_thresholds = np.asarray(params.recThrs, dtype=np.float64)
    curves: Curves = {}
    for k, name in enumerate(names):
        per_iou = {}
        for iou in (0.5, 0.75):
            t = np.where(params.iouThrs == iou)[0]
            if t.size == 0:
                continue
            p = precision[t[0], :, k, 0, -1]
            if np.all(p > -1):
                per_iou[f"IoU={iou:.2f}"] = (recall_thresholds.copy(), p.astype(np.float64))
        if per_iou:
            curves[name] = per_iou
    return curves


# --------------------------------------------------------------------------- printing
_DESCRIPTIONS = {
    "AP": ("0.50:0.95", "all"),
    "AP50": ("0.50", "all"),
    "AP75": ("0.75", "all"),
    "APs": ("0.50:0.95", "small"),
    "APm": ("0.50:0.95", "medium"),
    "APl": ("0.50:0.95", "large"),
    "ARs": ("0.50:0.95", "small"),
    "ARm": ("0.50:0.95", "medium"),
    "ARl": ("0.50:0.95", "large"),
}


def format_table(metrics: dict[str, Any]) -> str:
    """The 12 COCO numbers (one line each, as pycocotools prints them) and a per-class AP table."""
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    caps = [int(k[2:]) for k in numbers if k.startswith("AR") and k[2:].isdigit()]
    largest = max(caps) if caps else 100
    lines = []
    for name, value in numbers.items():
        if name.startswith("AR") and name[2:].isdigit():
            iou, area, cap = "0.50:0.95", "all", int(name[2:])
        elif name in _DESCRIPTIONS:
            (iou, area), cap = _DESCRIPTIONS[name], largest
        else:
            lines.append(f" {name:<6} = {value:0.3f}")
            continue
        kind = "Average Precision  (AP)" if name.startswith("AP") else "Average Recall     (AR)"
        lines.append(f" {name:<6} {kind} @[ IoU={iou:<9} | area={area:>6s} | maxDets={cap:>3d} ] = {value:0.3f}")
    per_class = metrics.get("per_class")
    if per_class:
        lines.append("")
        lines.append(format_per_class_table(per_class, value_name="AP", percent=False))
    return "\n".join(lines)


# --------------------------------------------------------------------------- conversion
def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def detections_to_coco(
    detections: Sequence[dict[str, Any]],
    image_ids: Sequence[int],
    category_ids: Sequence[int] | None = None,
) -> list[dict]:
    """Model outputs to COCO results records.

    Args:
        detections: one dict per image with ``boxes`` (N, 4) as (x1, y1, x2, y2) in original
            image pixels, ``scores`` (N,) and ``labels`` (N,) contiguous in 0..K-1
            (tensors or arrays).
        image_ids: the COCO image id of each entry of ``detections``.
        category_ids: ``category_ids[label]`` is the COCO category id of a label; None means
            ``label + 1`` (categories numbered 1..K).

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]`` with plain Python numbers.
    """
    if len(detections) != len(image_ids):
        raise ValueError(f"got {len(detections)} detection dicts but {len(image_ids)} image ids")
    records = []
    for i, (det, image_id) in enumerate(zip(detections, image_ids)):
        for key in ("boxes", "scores", "labels"):
            if key not in det:
                raise ValueError(f"detections[{i}] has no '{key}' entry")
        boxes = _to_numpy(det["boxes"]).astype(np.float64).reshape(-1, 4)
        scores = _to_numpy(det["scores"]).astype(np.float64).reshape(-1)
        labels = _to_numpy(det["labels"]).astype(np.int64).reshape(-1)
        if not (len(boxes) == len(scores) == len(labels)):
            raise ValueError(
                f"detections[{i}]: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels must agree"
            )
        if category_ids is None:
            cats = labels + 1
        else:
            bad = labels[(labels < 0) | (labels >= len(category_ids))]
            if len(bad):
                raise ValueError(
                    f"detections[{i}] has label {int(bad[0])} outside 0..{len(category_ids) - 1} (len(category_ids))"
                )
            cats = np.asarray(category_ids, dtype=np.int64)[labels]
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        for box, score, cat in zip(xywh.tolist(), scores.tolist(), cats.tolist()):
            records.append({"image_id": int(image_id), "category_id": int(cat), "bbox": box, "score": score})
    return records

"""COCO json annotations: reading into `DetectionData` and writing back.

COCO boxes are [x, y, w, h] in continuous pixel coordinates; we store (x, y, x + w, y + h).
Categories are sorted by id and mapped to contiguous labels 0..K-1; `category_ids` maps back.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from .records import DataReport, DatasetError, DetectionData, make_record


def read_json(path: str, what: str = "annotation file") -> Any:
    """A JSON file's content; `DatasetError` naming the file when it is missing, unreadable, not
    UTF-8 text (a binary file), empty, or malformed JSON (with the error position: a truncated file)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DatasetError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a directory, not a {what}") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not a JSON {what}: not UTF-8 text, a binary file? ({e})") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    if not text.strip():
        raise DatasetError(f"{path}: empty {what} (no JSON in it)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        cut = " (the file ends early: truncated?)" if e.pos >= len(text.rstrip()) else ""
        raise DatasetError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: "
                           f"{e.msg}{cut}") from None
    except RecursionError:
        raise DatasetError(f"{path}: JSON nested too deeply to read") from None


def _require(obj: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DatasetError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")


def _optional_size(value: Any, where: str, key: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0 \
            or not math.isfinite(value):
        raise DatasetError(f"{where}: '{key}' must be a positive number, got {value!r}")
    return int(value)


def load_coco(json_path: str, image_root: str, strict: bool = False) -> DetectionData:
    """Read a COCO detection json.

    Every image is kept, images without annotations as negatives; `iscrowd` annotations are kept
    with iscrowd=True (the matcher ignores them). A file without an "annotations" key (a COCO
    test-set info file) gives images without boxes. Raises `DatasetError` for malformed JSON
    (with the error position), missing keys, duplicate image or category ids, two images with the
    same file name (after normalising the path), annotations whose
    image or category does not exist (naming the annotation id), and bad bbox values. Box repairs
    (clipping, dropping degenerate / outside / NaN boxes) follow `records.sanitize_boxes` and
    are counted in the returned data's `report`.
    """
    json_path = str(json_path)
    doc = read_json(json_path)
    _require(doc, ("images", "categories"), json_path)
    annotations = doc.get("annotations", [])
    for key, value in (("images", doc["images"]), ("categories", doc["categories"]),
                       ("annotations", annotations)):
        if not isinstance(value, list):
            raise DatasetError(f"{json_path}: '{key}' must be a list, got {type(value).__name__}")
    categories = _read_categories(doc["categories"], json_path)
    category_ids = sorted(categories)                         # sorted by id -> contiguous labels
    label_of = {cid: label for label, cid in enumerate(category_ids)}
    images = _read_images(doc["images"], json_path)
    per_image = _annotations_per_image(annotations, images, label_of, json_path)

    report = DataReport(source=f"coco {json_path}")
    records = []
    for image_id, (img, height, width) in images.items():
        anns = per_image[image_id]
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                  a["bbox"][1] + a["bbox"][3]] for a, _ in anns]
        records.append(make_record(
            file_name=os.path.join(str(image_root), img["file_name"]), image_id=image_id,
            height=height, width=width, boxes=boxes,
            labels=[label_of[a["category_id"]] for a, _ in anns],
            iscrowd=[bool(a.get("iscrowd", 0)) for a, _ in anns],
            difficult=[False] * len(anns),
            box_names=[where + f" (image id {image_id})" for _, where in anns],
            report=report, strict=strict))
    return DetectionData(records=records, class_names=[categories[c] for c in category_ids],
                         category_ids=category_ids, source=json_path, report=report)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_categories(categories: list, json_path: str) -> dict[int, str]:
    """``{category id: name}``; ids must be distinct integers."""
    out = {}
    for i, cat in enumerate(categories):
        _require(cat, ("id", "name"), f"{json_path}: categories[{i}]")
        if not _is_int(cat["id"]):
            raise DatasetError(f"{json_path}: categories[{i}]: category ids must be integers, got {cat['id']!r}")
        if cat["id"] in out:
            raise DatasetError(f"{json_path}: duplicate category id {cat['id']}")
        out[cat["id"]] = str(cat["name"])
    return out


def _read_images(images: list, json_path: str) -> dict[int, tuple[dict, int | None, int | None]]:
    """``{image id: (entry, height, width)}``; ids must be distinct integers, file names non-empty
    and distinct after ``os.path.normpath`` (``a/x.jpg`` and ``a/./x.jpg`` are one picture: listed
    twice, its boxes would be split between two records, and a random split could put it in both
    training and validation)."""
    out = {}
    id_of_name: dict[str, int] = {}
    for i, img in enumerate(images):
        _require(img, ("id", "file_name"), f"{json_path}: images[{i}]")
        where = f"{json_path}: image id {img['id']!r}"
        if not _is_int(img["id"]):
            raise DatasetError(f"{where}: image ids must be integers (images[{i}])")
        if img["id"] in out:
            raise DatasetError(f"{where}: duplicate image id (images[{i}])")
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            raise DatasetError(f"{where}: 'file_name' must be a non-empty string, got {img['file_name']!r}")
        name = os.path.normpath(img["file_name"])
        if name in id_of_name:
            raise _listed_twice(out[id_of_name[name]][0], img, json_path)
        id_of_name[name] = img["id"]
        out[img["id"]] = (img, _optional_size(img.get("height"), where, "height"),
                          _optional_size(img.get("width"), where, "width"))
    return out


def _listed_twice(first: dict, second: dict, json_path: str) -> DatasetError:
    """The error for two ``images`` entries naming one file (each spelling shown when they differ)."""
    a, b = first["file_name"], second["file_name"]
    spellings = "" if a == b else f" (as {a!r} and {b!r})"
    return DatasetError(f"{json_path}: images {first['id']} and {second['id']} both name "
                        f"{os.path.normpath(a)}{spellings}; an image must be listed once (merge their "
                        f"annotations under one id)")


def _annotations_per_image(annotations: list, images: dict, label_of: dict, json_path: str
                           ) -> dict[Any, list[tuple[dict, str]]]:
    """Each image's ``(annotation, where)`` pairs, every annotation checked: integer ids that exist,
    and a ``bbox`` of 4 numbers (its values are repaired or refused later, by ``make_record``)."""
    per_image: dict[Any, list] = {image_id: [] for image_id in images}
    for i, ann in enumerate(annotations):
        name = f"annotation id {ann['id']}" if isinstance(ann, dict) and "id" in ann else f"annotations[{i}]"
        where = f"{json_path}: {name}"
        _require(ann, ("image_id", "category_id", "bbox"), where)
        for key in ("image_id", "category_id"):
            if not _is_int(ann[key]):
                raise DatasetError(f"{where}: '{key}' must be an integer, got {ann[key]!r}")
        if ann["image_id"] not in images:
            raise DatasetError(f"{where}: refers to image id {ann['image_id']!r}, which is not in 'images'")
        if ann["category_id"] not in label_of:
            raise DatasetError(f"{where}: unknown category id {ann['category_id']!r} "
                               f"(known: {sorted(label_of)})")
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            raise DatasetError(f"{where}: 'bbox' must be a list of 4 numbers [x, y, w, h], got {bbox!r}")
        per_image[ann["image_id"]].append((ann, where))
    return per_image


def to_coco_dict(data: DetectionData, image_root: str | None = None) -> dict:
    """COCO ground-truth dict for `data` (e.g. to evaluate VOC/CSV data with pycocotools).

    File names are written relative to `image_root` when given. Annotation `area` is the box area
    (w * h) and ids count from 1. Difficult boxes are written with iscrowd=0 and an extra
    "difficult": 1 key (pycocotools ignores it).
    """
    images, annotations = [], []
    for record in data.records:
        file_name = record.file_name
        if image_root is not None:
            file_name = os.path.relpath(file_name, str(image_root))
        image = {"id": record.image_id, "file_name": file_name}
        if record.height is not None and record.width is not None:
            image.update(height=record.height, width=record.width)
        images.append(image)
        for box, label, crowd, difficult in zip(record.boxes.tolist(), record.labels.tolist(),
                                                record.iscrowd.tolist(),
                                                record.difficult.tolist()):
            x1, y1, x2, y2 = box
            ann = {"id": len(annotations) + 1, "image_id": record.image_id,
                   "category_id": data.category_id(label), "bbox": [x1, y1, x2 - x1, y2 - y1],
                   "area": (x2 - x1) * (y2 - y1), "iscrowd": int(crowd)}
            if difficult:
                ann["difficult"] = 1
            annotations.append(ann)
    categories = [{"id": data.category_id(label), "name": name}
                  for label, name in enumerate(data.class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def save_coco(data: DetectionData, json_path: str, image_root: str | None = None) -> None:
    """Write `to_coco_dict(data, image_root)` to `json_path`."""
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(to_coco_dict(data, image_root), f)

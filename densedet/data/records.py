"""The in-memory form every reader produces, and the rules for repairing bad boxes.

A reader (COCO json, Pascal VOC xml, CSV) turns a file into a `DetectionData`: one `ImageRecord`
per image, boxes in continuous pixel coordinates (x1, y1, x2, y2) with labels 0..K-1. Everything
after the reader (datasets, transforms, evaluation) sees only this form.

Documented repairs, applied by `sanitize_boxes` and counted in a `DataReport`:

- a box partly outside the image is clipped to it;
- a box wholly outside the image is dropped;
- a box with zero or negative width or height (before or after clipping) is dropped;
- a box with a NaN or infinite coordinate is dropped.

With `strict=True` every one of these raises a `DatasetError` instead.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import DensedetError


class DatasetError(DensedetError, ValueError):
    """Bad annotation or image input. The message names the file, the record and what is wrong."""


@dataclass
class ImageRecord:
    """One image and its annotations.

    `file_name` is the path the image is read from (readers join it with the image root).
    `height`/`width` are None when the annotation file does not give them; the dataset then takes
    them from the decoded image. Arrays: boxes [N, 4] float32 (x1, y1, x2, y2, continuous pixel
    coordinates), labels [N] int64 in 0..K-1, iscrowd [N] bool, difficult [N] bool.
    `region` (x0, y0, x1, y1), when set, is the part of the file this record stands for (a held-out
    band of a large photo, :func:`~densedet.data.split.split_by_region`): its size, boxes and pixels
    (:func:`~densedet.data.load_record_image`) are that rectangle's. `resize` (height, width), when
    set, is the size its pixels are resized to when loaded (after `region`); `height`, `width` and
    the boxes are then that size's (``data.shrink_at_load``).
    """

    file_name: str
    image_id: int
    height: int | None
    width: int | None
    boxes: np.ndarray
    labels: np.ndarray
    iscrowd: np.ndarray | None = None
    difficult: np.ndarray | None = None
    region: tuple[int, int, int, int] | None = None
    resize: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        # Normalise dtypes/shapes once here so that code downstream never has to guess.
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        n = len(self.boxes)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(n)
        self.iscrowd = (np.zeros(n, bool) if self.iscrowd is None
                        else np.asarray(self.iscrowd, dtype=bool).reshape(n))
        self.difficult = (np.zeros(n, bool) if self.difficult is None
                          else np.asarray(self.difficult, dtype=bool).reshape(n))

    def __len__(self) -> int:
        return len(self.boxes)


_INTEGER = re.compile(r"[+-]?[0-9]+")


def sorted_class_names(names: Iterable[str]) -> list[str]:
    """Class names found in the data, in label order: numerically when every name is an integer
    ("1", "2", "10", not the text order "1", "10", "2"), else as text. Shared by the CSV and VOC readers."""
    names = set(names)
    if names and all(_INTEGER.fullmatch(n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))   # "7" and "07" both stay, in a fixed order
    return sorted(names)


# The DataReport counters of what a reader repaired or dropped (the rest count what it kept).
REPAIR_COUNTERS = ("clipped", "dropped_degenerate", "dropped_outside", "dropped_nonfinite")


@dataclass
class DataReport:
    """Counts of what a reader repaired or skipped, printable at the start of training."""

    source: str = ""
    images: int = 0
    negative_images: int = 0  # images kept with no boxes at all
    boxes: int = 0  # boxes kept (after repairs)
    crowd_boxes: int = 0
    difficult_boxes: int = 0
    clipped: int = 0
    dropped_degenerate: int = 0
    dropped_outside: int = 0
    dropped_nonfinite: int = 0
    examples: list[str] = field(default_factory=list)
    max_examples: int = 5

    @property
    def dropped(self) -> int:
        return self.dropped_degenerate + self.dropped_outside + self.dropped_nonfinite

    def note(self, counter: str, message: str, strict: bool) -> None:
        """Count one repair/skip under `counter`; in strict mode raise it as a DatasetError."""
        if strict:
            raise DatasetError(message + " (strict mode: repairs are errors)")
        setattr(self, counter, getattr(self, counter) + 1)
        if len(self.examples) < self.max_examples:
            self.examples.append(message)

    def count_record(self, record: ImageRecord) -> None:
        self.images += 1
        self.boxes += len(record)
        self.negative_images += int(len(record) == 0)
        self.crowd_boxes += int(record.iscrowd.sum())
        self.difficult_boxes += int(record.difficult.sum())

    def summary(self) -> str:
        lines = [
            f"{self.source}: {self.images} images ({self.negative_images} without boxes), "
            f"{self.boxes} boxes ({self.crowd_boxes} crowd, {self.difficult_boxes} difficult)",
            f"  repaired in the annotation file: {self.clipped} boxes clipped to the image",
            f"  dropped from it: {self.dropped_degenerate} with zero/negative width or height, "
            f"{self.dropped_outside} wholly outside the image, "
            f"{self.dropped_nonfinite} with NaN/inf coordinates",
        ]
        lines += [f"  e.g. {m}" for m in self.examples]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


@dataclass
class DetectionData:
    """A whole annotated split: records plus the class list.

    `category_ids[label]` is the original COCO category id of a contiguous label (needed to write
    COCO results); None means the ids are label + 1.
    """

    records: list[ImageRecord]
    class_names: list[str]
    category_ids: list[int] | None
    source: str
    report: DataReport = field(default_factory=DataReport)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.records)

    def category_id(self, label: int) -> int:
        """The COCO category id written for a contiguous label."""
        return self.category_ids[label] if self.category_ids is not None else label + 1


def sanitize_boxes(boxes: np.ndarray, height: int | None, width: int | None,
                   box_names: list[str], report: DataReport, strict: bool) -> np.ndarray:
    """Apply the documented repairs to one image's boxes.

    boxes: [N, 4] float (x1, y1, x2, y2); box_names[i] says where box i came from (file and
    record), used in messages. Clipping is skipped when the image size is unknown. Modifies
    `boxes` in place (clipping) and returns the boolean keep mask [N].
    """
    keep = np.ones(len(boxes), dtype=bool)
    for i, box in enumerate(boxes):
        name = box_names[i]
        if not np.isfinite(box).all():
            report.note("dropped_nonfinite", f"{name}: non-finite box coordinates {box.tolist()}",
                        strict)
            keep[i] = False
            continue
        x1, y1, x2, y2 = box
        if x2 <= x1 or y2 <= y1:
            report.note("dropped_degenerate",
                        f"{name}: box {box.tolist()} has zero or negative width or height", strict)
            keep[i] = False
            continue
        if height is None or width is None:
            continue
        if x1 >= width or y1 >= height or x2 <= 0 or y2 <= 0:
            report.note("dropped_outside", f"{name}: box {box.tolist()} lies wholly outside the "
                        f"{width}x{height} image", strict)
            keep[i] = False
            continue
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            report.note("clipped", f"{name}: box {box.tolist()} clipped to the {width}x{height} image",
                        strict)
            box[[0, 2]] = np.clip(box[[0, 2]], 0, width)
            box[[1, 3]] = np.clip(box[[1, 3]], 0, height)
    return keep


def make_record(file_name: str, image_id: int, height: int | None, width: int | None,
                boxes: list | np.ndarray, labels: list, iscrowd: list, difficult: list,
                box_names: list[str], report: DataReport, strict: bool) -> ImageRecord:
    """Build a record from raw per-box lists, applying `sanitize_boxes` and counting it."""
    # Checked as stored: a value beyond float32's range becomes inf (dropped as non-finite), a side
    # below its resolution becomes zero (dropped as degenerate), rather than passing a float64 check.
    with np.errstate(over="ignore"):
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).astype(np.float32)
    keep = sanitize_boxes(boxes, height, width, box_names, report, strict)
    record = ImageRecord(
        file_name=file_name, image_id=image_id, height=height, width=width,
        boxes=boxes[keep], labels=np.asarray(labels, dtype=np.int64).reshape(-1)[keep],
        iscrowd=np.asarray(iscrowd, dtype=bool).reshape(-1)[keep],
        difficult=np.asarray(difficult, dtype=bool).reshape(-1)[keep])
    report.count_record(record)
    return record


def align_classes(data: DetectionData, class_names: Sequence[str]) -> DetectionData:
    """``data`` with its labels renumbered to ``class_names``' order, matched by name.

    A validation file may list the training classes in another order (COCO categories with other
    ids), in another format, or lack some of them: its labels must still mean what the model's
    labels mean. A COCO file keeps its own category ids for the names it has (results are written
    with them); a training class it lacks gets an unused id: with no ground truth of its own it has
    no AP, and its detections count for no other class. A class of ``data`` that
    ``class_names`` lacks is an error naming ``data.source``: no model of these classes detects it.
    """
    names = [str(name) for name in class_names]
    if list(data.class_names) == names:
        return data
    unknown = [name for name in data.class_names if name not in names]
    if unknown:
        shown = ", ".join(map(repr, unknown[:10])) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise DatasetError(f"{data.source}: classes {shown} are not among the {len(names)} training classes "
                           f"({', '.join(names[:10])}{', …' if len(names) > 10 else ''})")
    label_map = np.array([names.index(name) for name in data.class_names], dtype=np.int64)
    records = [replace(record, labels=label_map[record.labels]) for record in data.records]
    category_ids = None
    if data.category_ids is not None:
        own = dict(zip(data.class_names, data.category_ids))
        spare = itertools.count(max(data.category_ids, default=0) + 1)
        category_ids = [own[name] if name in own else next(spare) for name in names]
    return replace(data, records=records, class_names=names, category_ids=category_ids)

"""Held-out slices of one annotated set: a validation split and a ``tune`` split.

When no validation file is given, ``densedet train --data`` carves one out of the training
annotations, and a ``tune`` slice besides, on which the test-time scales are chosen after training
(never on the validation images, whose numbers are then reported).

- :func:`split_by_image`: whole images, drawn by a seeded permutation of the images' order, so no
  image, and no object of it, is in two splits, and the same seed gives the same split on every machine.
- :func:`split_by_region`: for a few large photos (two orthophotos hold hundreds of objects, and
  holding one of them out would halve the training set), a band at the end of each photo's longer
  side is held out instead, with a gap as wide as the largest objects between it and the part that
  is trained on: no pixel of a held-out object is ever trained on.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .dataset import record_target
from .images import record_size
from .records import REPAIR_COUNTERS, DataReport, DatasetError, DetectionData, ImageRecord
from .transforms import crop_target

__all__ = ["holdout_counts", "split_by_image", "region_layout", "split_by_region"]

SPLIT_SALT = 7_919          # the split's generator is seeded by (seed, this), not by the training seed alone


def holdout_counts(num_images: int, val_fraction: float, tune_fraction: float, val_max: int = 0,
                   tune_max: int = 0) -> tuple[int, int]:
    """Images held out for val and tune: ``max(1, round(fraction x N))`` each when the fraction is > 0,
    else 0, and at most ``val_max`` / ``tune_max`` where those are > 0. At least one image must be left
    to train on (``DatasetError`` otherwise)."""
    def count(fraction: float, cap: int) -> int:
        n = max(1, round(fraction * num_images)) if fraction > 0 else 0
        return min(n, cap) if cap > 0 else n
    val, tune = count(val_fraction, val_max), count(tune_fraction, tune_max)
    if val + tune >= num_images:
        raise DatasetError(f"{num_images} images cannot give {val} validation and {tune} tune images and still "
                           f"leave one to train on; give a validation file (--val) or more images")
    return val, tune


def split_by_image(data: DetectionData, val_fraction: float, tune_fraction: float, seed: int,
                   val_max: int = 0, tune_max: int = 0) -> dict[str, DetectionData]:
    """``{"train", "val", "tune"}``: disjoint subsets of ``data``'s images (:func:`holdout_counts` of
    them held out), each keeping the class list; a split with no image is absent. Records keep their
    order within a split.

    Images with objects and images without are held out in proportion (:func:`_with_objects`), so a
    set that is mostly empty frames still validates on some objects; the seeded order is the same
    either way, so a set whose every image has objects splits as a plain draw would."""
    n = len(data.records)
    n_val, n_tune = holdout_counts(n, val_fraction, tune_fraction, val_max, tune_max)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * SPLIT_SALT + 1)).tolist()
    has_objects = [bool((~data.records[i].iscrowd).any()) for i in order]
    objects = [i for i, has in zip(order, has_objects) if has]
    empty = [i for i, has in zip(order, has_objects) if not has]
    v_obj, t_obj = _with_objects(len(objects), len(empty), n_val, n_tune)
    v_emp, t_emp = n_val - v_obj, n_tune - t_obj
    parts = {"val": objects[:v_obj] + empty[:v_emp],
             "tune": objects[v_obj:v_obj + t_obj] + empty[v_emp:v_emp + t_emp],
             "train": objects[v_obj + t_obj:] + empty[v_emp + t_emp:]}
    return {name: _part(data, [data.records[i] for i in sorted(indices)],
                        f"{name}: {len(indices)} of {n} images, seed {seed}")
            for name, indices in parts.items() if indices}


def _with_objects(objects: int, empty: int, n_val: int, n_tune: int) -> tuple[int, int]:
    """How many of the ``n_val`` and ``n_tune`` held-out images are drawn from the ``objects`` images that
    have some: their share of the set, rounded, and at least one per split, while one is left to train on;
    the rest come from the ``empty`` ones, and where these run short, from the images with objects."""
    n = objects + empty
    v, t = (min(k, objects, max(1, round(k * objects / n))) if k and objects else 0 for k in (n_val, n_tune))
    while v + t >= objects > 0 and v + t > 0:       # training keeps an image with objects
        if t:
            t -= 1
        else:
            v -= 1
    short = (n_val - v) + (n_tune - t) - empty      # too few empty images for the rest: objects make it up
    if short > 0:
        more = min(short, n_tune - t)
        t, v = t + more, v + short - more
    return v, t


def _part(data: DetectionData, records: list[ImageRecord], what: str) -> DetectionData:
    """``data`` with ``records`` only, its source naming the part (``what``) and its report recounted; the
    reader's repairs, counted over the whole annotation file, are kept (they are not lost by a split)."""
    repairs = {name: getattr(data.report, name) for name in REPAIR_COUNTERS}
    report = DataReport(source=f"{data.source} ({what})", examples=list(data.report.examples), **repairs)
    for record in records:
        report.count_record(record)
    return dataclasses.replace(data, records=records, source=report.source, report=report)


# -- by region ------------------------------------------------------------------------------------

Rect = tuple[int, int, int, int]


def region_layout(height: int, width: int, val_fraction: float, tune_fraction: float, gap: int
                  ) -> dict[str, Rect] | None:
    """Where the parts of one ``height x width`` photo lie: ``{"train", "tune", "val"}`` rectangles
    ``(x0, y0, x1, y1)`` (a part is absent when its fraction is 0).

    Along the longer side: the training part first, then ``gap`` pixels that no split uses, then the
    tune band, then the val band at the far end; each band ``ceil(fraction x longer side)`` thick and
    as long as the shorter side. None when a band would be thinner than ``2 x gap`` (the photo is too
    small against its objects to share) or the training part thinner than that.
    """
    longer = max(height, width)
    bands = {name: math.ceil(f * longer) for name, f in (("tune", tune_fraction), ("val", val_fraction)) if f > 0}
    if not bands or min(bands.values()) < max(1, 2 * gap):
        return None
    end = longer - sum(bands.values()) - gap
    if end < max(1, 2 * gap):
        return None
    spans, start = {"train": (0, end)}, end + gap
    for name, thickness in bands.items():
        spans[name] = (start, start + thickness)
        start += thickness
    along_height = height >= width
    return {name: (0, a, width, b) if along_height else (a, 0, b, height) for name, (a, b) in spans.items()}


def _pieces(rect: Rect, piece: int) -> list[Rect]:
    """``rect`` (a band) cut across its length into parts about ``piece`` long (0: as long as the band
    is thick, so about square)."""
    x0, y0, x1, y1 = rect
    along_x = x1 - x0 >= y1 - y0
    length, thickness = ((x1 - x0), (y1 - y0)) if along_x else ((y1 - y0), (x1 - x0))
    n = max(1, round(length / (piece or thickness)))
    cuts = [round(i * length / n) for i in range(n + 1)]
    return [(x0 + a, y0, x0 + b, y1) if along_x else (x0, y0 + a, x1, y0 + b) for a, b in zip(cuts, cuts[1:])]


def _region_record(record: ImageRecord, rect: Rect, image_id: int, held_out: bool) -> ImageRecord:
    """The part ``rect`` of ``record``'s photo as a record of its own, boxes in its coordinates
    (:func:`~densedet.data.transforms.crop_target`). Training part: boxes kept when half of them is
    inside, as tiles keep them. Held-out part: every box wholly inside is scored; a box cut by the
    border is kept clipped as a crowd region, on which detections count neither way."""
    height, width = record_size(record)
    target = crop_target(record_target(record, height, width), *rect,
                         min_visibility=1.0 if held_out else 0.5, ignore_partial=held_out)
    x0, y0, x1, y1 = rect
    ox, oy = (record.region or (0, 0))[:2]
    return ImageRecord(record.file_name, image_id, y1 - y0, x1 - x0, target["boxes"].numpy(),
                       target["labels"].numpy(), target["iscrowd"].numpy(), target["difficult"].numpy(),
                       region=(ox + x0, oy + y0, ox + x1, oy + y1))


def split_by_region(data: DetectionData, val_fraction: float, tune_fraction: float, gap: int, piece: int = 0
                    ) -> dict[str, DetectionData]:
    """``{"train", "val", "tune"}`` of a few large photos: each photo that :func:`region_layout` can
    share gives a training part and held-out bands, cut into pieces about ``piece`` long (to look like
    the evaluation images; 0: about square); the others are trained on whole. Parts are
    records with a ``region`` and new image ids. A :class:`DatasetError` when no photo can be shared."""
    parts: dict[str, list[ImageRecord]] = {"train": [], "val": [], "tune": []}
    next_id = 1 + max((r.image_id for r in data.records), default=0)   # never the id of a whole photo
    shared = 0
    for record in data.records:
        layout = region_layout(*record_size(record, data.source), val_fraction, tune_fraction, gap)
        if layout is None:
            parts["train"].append(record)
            continue
        shared += 1
        for name, rect in layout.items():
            for part in ([rect] if name == "train" else _pieces(rect, piece)):
                parts[name].append(_region_record(record, part, next_id, held_out=name != "train"))
                next_id += 1
    if not shared:
        raise DatasetError(f"{data.source}: no image is large enough against its objects (a band of "
                           f"{max(val_fraction, tune_fraction):.0%} of its longer side at least {2 * gap} px) to "
                           f"hold part of it out; give a validation file (--val)")
    def counted(n: int, one: str, many: str) -> str:
        return f"{n} {one if n == 1 else many}"

    return {name: _part(data, records, f"{name}: " + (counted(len(records), "image or part", "images and parts")
                                                      if name == "train" else counted(len(records), "part", "parts"))
                        + f" of {counted(len(data.records), 'image', 'images')}, by region")
            for name, records in parts.items() if records}

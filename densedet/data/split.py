"""Held-out slices of one annotated set, by image: a validation split and a ``tune`` split.

When no validation file is given, ``densedet train --data`` carves one out of the training
annotations, and a ``tune`` slice besides, on which the test-time scales are chosen after training
(never on the validation images, whose numbers are then reported). Both are drawn by image, so no
image, and no object of it, is in two splits; the draw is a seeded permutation of the images'
order, so the same seed gives the same split on every machine.
"""

from __future__ import annotations

import dataclasses

import torch

from .records import DataReport, DatasetError, DetectionData

__all__ = ["holdout_counts", "split_by_image"]

SPLIT_SALT = 7_919          # the split's generator is seeded by (seed, this), not by the training seed alone


def holdout_counts(num_images: int, val_fraction: float, tune_fraction: float) -> tuple[int, int]:
    """Images held out for val and tune: ``max(1, round(fraction x N))`` each when the fraction is > 0,
    else 0. At least one image must be left to train on (``DatasetError`` otherwise)."""
    val = max(1, round(val_fraction * num_images)) if val_fraction > 0 else 0
    tune = max(1, round(tune_fraction * num_images)) if tune_fraction > 0 else 0
    if val + tune >= num_images:
        raise DatasetError(f"{num_images} images cannot give {val} validation and {tune} tune images and still "
                           f"leave one to train on; give a validation file (--val) or more images")
    return val, tune


def split_by_image(data: DetectionData, val_fraction: float, tune_fraction: float, seed: int
                   ) -> dict[str, DetectionData]:
    """``{"train", "val", "tune"}``: disjoint subsets of ``data``'s images (:func:`holdout_counts` of
    them held out), each keeping the class list; a split with no image is absent. Records keep their
    order within a split."""
    n = len(data.records)
    n_val, n_tune = holdout_counts(n, val_fraction, tune_fraction)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * SPLIT_SALT + 1)).tolist()
    parts = {"val": sorted(order[:n_val]), "tune": sorted(order[n_val:n_val + n_tune]),
             "train": sorted(order[n_val + n_tune:])}
    out = {}
    for name, indices in parts.items():
        if not indices:
            continue
        records = [data.records[i] for i in indices]
        report = DataReport(source=f"{data.source} ({name}: {len(records)} of {n} images, seed {seed})")
        for record in records:
            report.count_record(record)
        out[name] = dataclasses.replace(data, records=records, source=report.source, report=report)
    return out

"""Detection on large images, tile by tile: :func:`detect_tiled` cuts every image larger than the
tile size into overlapping tiles (:func:`~densedet.data.transforms.tile_grid`), runs the detector over
the tiles of several images in shared batches, and merges each image's tiles (:func:`merge_tiles`).
:class:`~densedet.predict.Predictor` and evaluation (``data.tile_size``) both go through it, so a
photo is scored as it is predicted."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .boxes import batched_nms, box_area
from .data.transforms import tile_grid

__all__ = ["detect_tiled", "merge_tiles", "batches_of_one_size"]

Window = tuple[int, int, int, int]


def detect_tiled(detect: Callable[[list[Tensor]], list[dict[str, Tensor]]], images: Sequence[Tensor],
                 tile_size: int, tile_overlap: int, batch_size: int, nms_thresh: float = 0.5
                 ) -> list[dict[str, Tensor]]:
    """``detect`` (a list of ``[3, h, w]`` crops → their detections) over ``images``: an image larger
    than ``tile_size`` on a side (``tile_size`` > 0) is cut into tiles overlapping by ``tile_overlap``,
    whose boxes are shifted back and merged (:func:`merge_tiles`, class-wise NMS at ``nms_thresh``);
    other images go whole. Every (image, tile) is one item of at most ``batch_size`` per call, and a
    call holds items of one size: the model pads a batch to its largest item, and a small image padded
    with a large one's flat border scores worse than alone (on mixed 160-640 px images, AP 0.131
    against 0.297 for one model: docs/own-data-measurements.md)."""
    def windows(height: int, width: int) -> list[Window]:
        if tile_size and (height > tile_size or width > tile_size):
            return tile_grid(height, width, tile_size, tile_overlap)
        return [(0, 0, width, height)]

    work = [(i, w) for i, image in enumerate(images) for w in windows(*image.shape[-2:])]
    per_image: list[list[tuple[dict, Window]]] = [[] for _ in images]
    for chunk in batches_of_one_size(work, [(y1 - y0, x1 - x0) for _, (x0, y0, x1, y1) in work], batch_size):
        crops = [images[i][:, y0:y1, x0:x1] for i, (x0, y0, x1, y1) in chunk]
        for (i, window), det in zip(chunk, detect(crops)):
            per_image[i].append((det, window))
    return [parts[0][0] if len(parts) == 1 else
            merge_tiles([d for d, _ in parts], [w for _, w in parts], tuple(image.shape[-2:]), iou_threshold=nms_thresh)
            for image, parts in zip(images, per_image)]


def batches_of_one_size(items: Sequence, sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list]:
    """``items`` in batches of at most ``batch_size``, each of items of one size (``sizes[k]`` is item k's),
    sizes in the order they first occur and items in their order within a size."""
    by_size: dict[tuple[int, int], list] = {}
    for item, size in zip(items, sizes):
        by_size.setdefault(tuple(size), []).append(item)
    return [group[k:k + batch_size] for group in by_size.values() for k in range(0, len(group), batch_size)]


def merge_tiles(detections: Sequence[dict[str, Tensor]], windows: Sequence[tuple[int, int, int, int]],
                image_size: tuple[int, int], iou_threshold: float = 0.5, contain_threshold: float = 0.8,
                border_tolerance: float = 2.0) -> dict[str, Tensor]:
    """Merge per-tile detections into one image's detections.

    Args:
        detections: per tile ``{"boxes": [D_t, 4] (tile pixels), "scores", "labels"}``.
        windows: per tile ``(x0, y0, x1, y1)`` in the image (``densedet.data.tile_grid``).
        image_size: ``(H, W)`` of the whole image.
        iou_threshold: class-wise NMS across tiles (duplicates of an object seen whole twice).
        contain_threshold: a box touching an inner tile border (within ``border_tolerance`` px,
            on a side where the tile does not end at the image border) is the visible part of a
            cut object; it is removed when a larger box of the same class from another tile
            covers at least this fraction of its area, so an object split by a border is reported
            once. (An object larger than the tile overlap is seen whole by no tile; its parts stay.)

    Returns:
        ``{"boxes": [D, 4] (image pixels), "scores", "labels"}`` by decreasing score.
    """
    height, width = image_size
    parts_boxes, parts_tile, parts_cut = [], [], []
    for t, (det, (x0, y0, x1, y1)) in enumerate(zip(detections, windows)):
        boxes = det["boxes"].float()
        boxes = boxes + torch.tensor([x0, y0, x0, y0], dtype=torch.float32, device=boxes.device)
        tol = border_tolerance
        # a side counts only where the tile ends inside the image (x0 > 0 ...), not at its border
        cut = ((x0 > 0) & (boxes[:, 0] - x0 <= tol)) | ((x1 < width) & (x1 - boxes[:, 2] <= tol))
        cut |= ((y0 > 0) & (boxes[:, 1] - y0 <= tol)) | ((y1 < height) & (y1 - boxes[:, 3] <= tol))
        parts_boxes.append(boxes)
        parts_tile.append(torch.full((boxes.shape[0],), t, dtype=torch.int64, device=boxes.device))
        parts_cut.append(cut)
    boxes = torch.cat(parts_boxes)
    scores = torch.cat([d["scores"].float() for d in detections])
    labels = torch.cat([d["labels"] for d in detections])
    tile = torch.cat(parts_tile)
    cut = torch.cat(parts_cut)
    keep = torch.ones_like(cut)
    cut_idx = cut.nonzero().squeeze(1)
    if cut_idx.numel():
        c = boxes[cut_idx]                                                          # [C, 4]
        lt = torch.maximum(c[:, None, :2], boxes[None, :, :2])
        rb = torch.minimum(c[:, None, 2:], boxes[None, :, 2:])
        inter = (rb - lt).clamp(min=0).prod(-1)                                     # [C, N]
        area = box_area(boxes)
        covered = ((inter >= contain_threshold * area[cut_idx, None]) & (area[None, :] > area[cut_idx, None])
                   & (labels[None, :] == labels[cut_idx, None]) & (tile[None, :] != tile[cut_idx, None]))
        keep[cut_idx[covered.any(1)]] = False
    idx = keep.nonzero().squeeze(1)
    kept = idx[batched_nms(boxes[idx], scores[idx], labels[idx], iou_threshold)]
    return {"boxes": boxes[kept], "scores": scores[kept], "labels": labels[kept]}

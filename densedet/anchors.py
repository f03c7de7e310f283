"""Anchor generation for dense detectors.

Order of the flattened anchors (the order head outputs are flattened in, see
``models/retinanet.py``): level, then row y, then column x, then the A cell anchors of a position.
Cell anchors are **ratio-major**: for each aspect ratio (h/w) in order, each size in order — the
same order as torchvision and mmdetection (detectron2 is size-major; convert weights accordingly).

For a size s and ratio r (= h/w) the cell anchor is w = s / sqrt(r), h = s * sqrt(r), centred on
(x * stride + offset * stride, y * stride + offset * stride). RetinaNet uses offset 0 (detectron2's
RetinaNet config, mmdet, torchvision); RefineDet/SSD use 0.5.

Strides are fixed per level (8, 16, …, 128), never inferred from the padded image size — except in
the torchvision-compatible preset (``stride_mode="inferred"``), which reproduces torchvision's
``padded_size // feature_size`` so its checkpoints give its detections.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["AnchorGenerator", "retinanet_anchor_sizes"]


def retinanet_anchor_sizes(base_sizes: Sequence[float] = (32, 64, 128, 256, 512),
                           scales_per_octave: int = 3, integer: bool = False) -> list[list[float]]:
    """Sizes per level: ``base · 2^(k/scales_per_octave)``, k = 0..n-1 (paper: 32, 40.32, 50.80 at P3).

    ``integer=True`` truncates to int as torchvision does (32, 40, 50).
    """
    sizes = []
    for base in base_sizes:
        level = [base * 2 ** (k / scales_per_octave) for k in range(scales_per_octave)]
        sizes.append([float(int(s)) for s in level] if integer else level)
    return sizes


class AnchorGenerator(nn.Module):
    """Anchors for every position of every pyramid level.

    Args:
        sizes: per level, the anchor sizes (square-root of the area).
        aspect_ratios: per level (or one list for all levels), ratios h/w.
        strides: per level, the fixed stride in input pixels.
        offset: centre offset in units of stride (0 for RetinaNet, 0.5 for SSD/RefineDet).
        round_cell_anchors: round the cell half-extents to integers (torchvision's behaviour).
        stride_mode: ``"fixed"`` (use ``strides``) or ``"inferred"`` (torchvision: padded // feature).

    ``forward(image_size (Hp, Wp), feature_sizes [(H_l, W_l)]) -> list of [H_l·W_l·A, 4]`` (x1, y1,
    x2, y2) per level, cached per shape. Each anchor is computed in float64 and rounded to float32
    once (RefineDet's Caffe ``PriorBox`` values for sqrt(2)-sized anchors; integer and rounded cell
    anchors are exact either way).
    """

    def __init__(self, sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[float] | Sequence[Sequence[float]],
                 strides: Sequence[int], offset: float = 0.0, round_cell_anchors: bool = False,
                 stride_mode: str = "fixed") -> None:
        super().__init__()
        if aspect_ratios and not isinstance(aspect_ratios[0], (list, tuple)):
            aspect_ratios = [list(aspect_ratios)] * len(sizes)
        if not (len(sizes) == len(aspect_ratios) == len(strides)):
            raise ValueError(f"anchor sizes ({len(sizes)} levels), aspect_ratios ({len(aspect_ratios)}) and "
                             f"strides ({len(strides)}) must have one entry per pyramid level")
        counts = {len(s) * len(r) for s, r in zip(sizes, aspect_ratios)}
        if len(counts) != 1:
            raise ValueError("every level must have the same number of anchors per position "
                             "(the head's weights are shared across levels)")
        if stride_mode not in ("fixed", "inferred"):
            raise ValueError(f"stride_mode must be 'fixed' or 'inferred', got {stride_mode!r}")
        self.sizes = [list(map(float, s)) for s in sizes]
        self.aspect_ratios = [list(map(float, r)) for r in aspect_ratios]
        self.strides = [int(s) for s in strides]
        self.offset = float(offset)
        self.round_cell_anchors = round_cell_anchors
        self.stride_mode = stride_mode
        self.num_anchors_per_location = counts.pop()
        self.cell_anchors = [self._cell_anchors(s, r) for s, r in zip(self.sizes, self.aspect_ratios)]
        self._cache: dict[tuple, list[Tensor]] = {}

    def _cell_anchors(self, sizes: list[float], ratios: list[float]) -> Tensor:
        s = torch.tensor(sizes, dtype=torch.float64)
        r = torch.tensor(ratios, dtype=torch.float64)
        h_ratio = r.sqrt()
        w_ratio = 1.0 / h_ratio
        ws = (w_ratio[:, None] * s[None, :]).reshape(-1)   # ratio-major
        hs = (h_ratio[:, None] * s[None, :]).reshape(-1)
        cell = torch.stack([-ws, -hs, ws, hs], dim=1) / 2
        if self.round_cell_anchors:
            cell = cell.to(torch.float32).round().to(torch.float64)
        return cell

    def strides_for(self, image_size: Sequence[int], feature_sizes: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
        """(stride_y, stride_x) per level."""
        if self.stride_mode == "inferred":
            return [(image_size[0] // h, image_size[1] // w) for h, w in feature_sizes]
        return [(s, s) for s in self.strides]

    def grid_anchors(self, image_size: Sequence[int], feature_sizes: Sequence[Sequence[int]],
                     device: torch.device | str = "cpu") -> list[Tensor]:
        """Per level ``[H_l·W_l·A, 4]`` anchors, order (y, x, a)."""
        if len(feature_sizes) != len(self.cell_anchors):
            raise ValueError(f"the model produced {len(feature_sizes)} feature levels but the anchor generator "
                             f"has {len(self.cell_anchors)} (anchor sizes/strides must have one entry per level)")
        out = []
        for (h, w), (sy, sx), cell in zip(feature_sizes, self.strides_for(image_size, feature_sizes),
                                          self.cell_anchors):
            ys = (torch.arange(h, dtype=torch.float64) + self.offset) * sy
            xs = (torch.arange(w, dtype=torch.float64) + self.offset) * sx
            cy, cx = torch.meshgrid(ys, xs, indexing="ij")
            centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)
            out.append((centres + cell.view(1, -1, 4)).reshape(-1, 4).to(device=device, dtype=torch.float32))
        return out

    def forward(self, image_size: Sequence[int], feature_sizes: Sequence[Sequence[int]],
                device: torch.device | str = "cpu") -> list[Tensor]:
        key = (tuple(image_size), tuple(map(tuple, feature_sizes)), str(device))
        anchors = self._cache.get(key)
        if anchors is None:
            anchors = self.grid_anchors(image_size, feature_sizes, device)
            if len(self._cache) > 32:
                self._cache.clear()
            self._cache[key] = anchors
        return anchors

    def num_anchors(self, feature_sizes: Sequence[Sequence[int]]) -> int:
        return sum(h * w for h, w in feature_sizes) * self.num_anchors_per_location

    def __repr__(self) -> str:
        sizes = [[round(s, 2) for s in lv] for lv in self.sizes]
        return (f"AnchorGenerator(sizes={sizes}, aspect_ratios={self.aspect_ratios[0]}, strides={self.strides}, "
                f"offset={self.offset}, stride_mode={self.stride_mode!r})")


def feature_size(size: int, stride: int) -> int:
    """Side of a level's map for an input side, with 3x3/s2 pad-1 convs down the pyramid: ceil(size/stride)."""
    return math.ceil(size / stride)

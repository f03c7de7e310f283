"""Geometric transforms that move boxes with the pixels, and tiling of large images.

A transform is a callable `(image, target) -> (image, target)`: image a float tensor [3, H, W] in
[0, 1], target the dict the dataset produces (boxes [N, 4] x1, y1, x2, y2 in continuous pixel
coordinates). `orig_size` is left untouched: the model maps its detections from the transformed
image size back to `orig_size`. Randomness comes from torch's global generator, so
`torch.manual_seed` and DataLoader worker seeding make runs repeatable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Target = dict
Transform = Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(map(repr, self.transforms)) + ")"


class RandomHorizontalFlip:
    """Mirror the image with probability p; boxes map to x1' = W - x2, x2' = W - x1.

    A mirror keeps every box exactly, but not always the class: a mirrored 2 is no digit, a
    mirrored "b" is a "d". With ``keeps_class=False`` a mirrored image's target says so
    (``target["class_unknown"] = True``): RetinaNet's loss then teaches its boxes and nothing about
    its classes.
    """

    def __init__(self, p: float = 0.5, keeps_class: bool = True):
        self.p, self.keeps_class = p, keeps_class

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if torch.rand(()).item() >= self.p:
            return image, target
        width = image.shape[-1]
        target = dict(target)
        boxes = target["boxes"]
        target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1],
                                       width - boxes[:, 0], boxes[:, 3]], dim=1)
        if not self.keeps_class:
            target["class_unknown"] = True
        return image.flip(-1), target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p}" + ("" if self.keeps_class else ", keeps_class=False") + ")"


def turn_boxes(boxes: torch.Tensor, width: float) -> torch.Tensor:
    """Boxes ``[N, 4]`` of an image ``width`` wide after a quarter turn counter-clockwise: (x, y) → (y, W - x)."""
    return torch.stack([boxes[:, 1], width - boxes[:, 2], boxes[:, 3], width - boxes[:, 0]], dim=1)


class RandomRotate90:
    """Rotate by a random multiple of 90 degrees (counter-clockwise, each with probability 1/4).

    For images seen from above (aerial, satellite, microscopy), where no direction is "up": with
    :class:`RandomHorizontalFlip` it draws from all eight symmetries of the square. Each turn
    moves the boxes by :func:`turn_boxes` and swaps the image's height and width.
    """

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        turns = int(torch.randint(4, ()).item())
        if turns == 0:
            return image, target
        boxes, width, height = target["boxes"], image.shape[-1], image.shape[-2]
        for _ in range(turns):
            boxes, width, height = turn_boxes(boxes, width), height, width
        target = dict(target)
        target["boxes"] = boxes
        return image.rot90(turns, (-2, -1)), target

    def __repr__(self) -> str:
        return "RandomRotate90()"


def resize(image: torch.Tensor, target: Target | None, height: int, width: int
           ) -> tuple[torch.Tensor, Target | None]:
    """Resize image [3, H, W] to [3, height, width] (bilinear, antialiased when shrinking).

    Boxes are multiplied by the exact pixel scale factors width / W and height / H, so they stay
    aligned with the resampled pixels (pixel edges map to pixel edges with align_corners=False).
    """
    old_h, old_w = image.shape[-2:]
    if (old_h, old_w) != (height, width):
        image = F.interpolate(image[None], size=(height, width), mode="bilinear",
                              align_corners=False, antialias=True)[0].clamp_(0.0, 1.0)
    if target is not None:
        target = dict(target)
        scale = torch.tensor([width / old_w, height / old_h, width / old_w, height / old_h],
                             dtype=target["boxes"].dtype)
        target["boxes"] = target["boxes"] * scale
    return image, target


def shortest_edge_factor(height: int, width: int, min_size: int, max_size: int) -> float:
    """The factor that brings an image's shorter side to ``min_size`` with its longer side at most
    ``max_size``: the detectron2 / RetinaNet input rule (the model's preprocessor applies it)."""
    return min(min_size / min(height, width), max_size / max(height, width))


class ResizeShortestEdge:
    """Resize so the shorter side is one of `min_sizes` (chosen at random per call) while the
    longer side stays <= max_size — the detectron2/RetinaNet input rule. Several min_sizes give
    multi-scale training (e.g. (640, 672, ..., 800)); one gives the fixed test-time size.
    """

    def __init__(self, min_sizes: int | Sequence[int], max_size: int):
        self.min_sizes = (min_sizes,) if isinstance(min_sizes, int) else tuple(min_sizes)
        if not self.min_sizes:
            raise ValueError("ResizeShortestEdge needs at least one min size")
        self.max_size = max_size

    def output_size(self, height: int, width: int, min_size: int) -> tuple[int, int]:
        scale = shortest_edge_factor(height, width, min_size, self.max_size)
        return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        index = int(torch.randint(len(self.min_sizes), ()).item()) if len(self.min_sizes) > 1 \
            else 0
        height, width = self.output_size(*image.shape[-2:], self.min_sizes[index])
        return resize(image, target, height, width)

    def __repr__(self) -> str:
        return f"ResizeShortestEdge(min_sizes={self.min_sizes}, max_size={self.max_size})"


class ResizeFixed:
    """Warp to a fixed size: an int gives a square, a tuple is (height, width) — the SSD/RefineDet
    input (320x320, 512x512). The aspect ratio is not kept."""

    def __init__(self, size: int | tuple[int, int]):
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        return resize(image, target, *self.size)

    def __repr__(self) -> str:
        return f"ResizeFixed(size={self.size})"


def tile_starts(length: int, tile_size: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering [0, length): stride tile_size - overlap, the last tile
    shifted back to end exactly at the border (so it may overlap its neighbour more)."""
    if tile_size <= 0 or not 0 <= overlap < tile_size:
        raise ValueError(f"need tile_size > 0 and 0 <= overlap < tile_size, got tile_size="
                         f"{tile_size}, overlap={overlap}")
    if length <= tile_size:
        return [0]
    stride = tile_size - overlap
    count = math.ceil((length - tile_size) / stride) + 1
    return [min(i * stride, length - tile_size) for i in range(count)]


def tile_grid(height: int, width: int, tile_size: int, overlap: int
              ) -> list[tuple[int, int, int, int]]:
    """Tiles (x0, y0, x1, y1) covering a height x width image, row-major."""
    return [(x0, y0, min(x0 + tile_size, width), min(y0 + tile_size, height))
            for y0 in tile_starts(height, tile_size, overlap)
            for x0 in tile_starts(width, tile_size, overlap)]


def crop_target(target: Target, x0: int, y0: int, x1: int, y1: int,
                min_visibility: float = 0.5, ignore_partial: bool = False) -> Target:
    """Boxes of `target` seen through the window (x0, y0, x1, y1), in window coordinates.

    Boxes are clipped to the window; a box keeping less than `min_visibility` of its area inside
    is dropped (so is one with no area inside) or, with `ignore_partial`, kept as a crowd box:
    the matcher then ignores anchors over the cut object instead of calling them background.
    Per-box fields (labels, iscrowd, difficult) are filtered alike; orig_size becomes the window
    size and tile_origin records (x0, y0).
    """
    boxes = target["boxes"]
    clipped = torch.stack([boxes[:, 0].clamp(x0, x1), boxes[:, 1].clamp(y0, y1),
                           boxes[:, 2].clamp(x0, x1), boxes[:, 3].clamp(y0, y1)], dim=1)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    visible = inside >= min_visibility * area
    keep = (inside > 0) & (visible | ignore_partial)
    out = dict(target)
    out["boxes"] = clipped[keep] - torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
    for key in ("labels", "iscrowd", "difficult"):
        if key in target:
            out[key] = target[key][keep]
    if ignore_partial:
        crowd = target["iscrowd"] if "iscrowd" in target else torch.zeros(len(boxes), dtype=torch.bool)
        out["iscrowd"] = (crowd | ~visible)[keep]
    out["orig_size"] = (y1 - y0, x1 - x0)
    out["tile_origin"] = (x0, y0)
    return out


class RandomObjectCrop:
    """Cut a ``size x size`` window out of the image at the image's own scale (object-centric
    random crop): the window holds one randomly chosen object whole, at a uniformly random
    position among those that do (anywhere, in an image without objects). The object is drawn
    among those that fit in the window, or among all when none does.

    Training on windows instead of whole images buys more, cheaper steps from the same compute;
    centring on an object keeps the foreground share at least that of whole images. Boxes cut
    by the window keep their clipped box when ``min_visibility`` of their area is inside, and
    become crowd boxes (ignored by the matcher) otherwise, so that part of a digit is neither
    taught as a whole object nor as background. ``target["resize_as"]`` records the source size:
    the model's preprocessor scales the window as it would have scaled the whole image, so
    objects keep the size they have at test time.

    ``model_size=(min_size, max_size)``: ``size`` is in the model's input pixels, and each image's
    window is cut at ``size / f``, ``f`` the factor the model resizes that image by (shorter side to
    ``min_size``, longer side at most ``max_size``). For images of several sizes, each resized to one
    shorter side: every window then reaches the model at ``size`` px, whatever its image's size.
    """

    def __init__(self, size: int, min_visibility: float = 0.7, model_size: tuple[int, int] | None = None):
        if size <= 0 or not 0.0 < min_visibility <= 1.0:
            raise ValueError(f"need size > 0 and 0 < min_visibility <= 1, got {size}, {min_visibility}")
        self.size, self.min_visibility = int(size), float(min_visibility)
        self.model_size = tuple(int(s) for s in model_size) if model_size else None

    def side_in(self, height: int, width: int) -> int:
        """The window's side in the pixels of an image whose model input is that of a ``height x width`` image."""
        if self.model_size is None:
            return self.size
        return max(16, int(round(self.size / shortest_edge_factor(height, width, *self.model_size))))

    @staticmethod
    def _start(lo: float, hi: float, window: int, length: int) -> int:
        """A random window start in [0, length - window] keeping [lo, hi] inside when it fits."""
        first, last = max(0, math.ceil(hi) - window), min(math.floor(lo), length - window)
        if first > last:  # the object is larger than the window: any start that overlaps it
            first, last = max(0, min(first, last)), min(length - window, max(first, last))
        last = max(first, last)
        return first + int(torch.randint(last - first + 1, ()).item())

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        height, width = image.shape[-2:]
        resize_as = target.get("resize_as", (height, width))
        side = self.side_in(*resize_as)
        ch, cw = min(side, height), min(side, width)
        boxes = target["boxes"]
        objects = torch.arange(len(boxes))
        if "iscrowd" in target:
            objects = objects[~target["iscrowd"]]
        if len(objects):
            extent = boxes[objects, 2:] - boxes[objects, :2]
            fits = objects[(extent[:, 0] <= cw) & (extent[:, 1] <= ch)]
            objects = fits if len(fits) else objects
            x1, y1, x2, y2 = boxes[int(objects[torch.randint(len(objects), ())])].tolist()
            x0, y0 = self._start(x1, x2, cw, width), self._start(y1, y2, ch, height)
        else:
            x0 = int(torch.randint(width - cw + 1, ()).item())
            y0 = int(torch.randint(height - ch + 1, ()).item())
        out = crop_target(target, x0, y0, x0 + cw, y0 + ch, self.min_visibility, ignore_partial=True)
        out["resize_as"] = resize_as
        return image[:, y0:y0 + ch, x0:x0 + cw], out

    def __repr__(self) -> str:
        model = f", model_size={self.model_size}" if self.model_size else ""
        return f"RandomObjectCrop(size={self.size}, min_visibility={self.min_visibility}{model})"


def tile_image(image: torch.Tensor, target: Target | None, tile_size: int, overlap: int,
               min_visibility: float = 0.5
               ) -> list[tuple[torch.Tensor, Target | None, tuple[int, int]]]:
    """Cut image [3, H, W] into overlapping tiles of at most tile_size x tile_size covering it.

    Returns [(tile [3, h, w], tile target or None, (x0, y0))], row-major; add (x0, y0) to a
    tile's boxes to get image coordinates. Tiles are views of `image` (no copy). Boxes follow
    `crop_target` (clipped to the tile, dropped below `min_visibility` of their area).
    """
    height, width = image.shape[-2:]
    tiles = []
    for x0, y0, x1, y1 in tile_grid(height, width, tile_size, overlap):
        crop = image[:, y0:y1, x0:x1]
        tile_target = None if target is None else crop_target(target, x0, y0, x1, y1,
                                                               min_visibility)
        tiles.append((crop, tile_target, (x0, y0)))
    return tiles

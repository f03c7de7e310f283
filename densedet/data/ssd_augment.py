"""SSD data augmentation, as RefineDet trains with it (the authors' Caffe ``annotated_data_layer``).

Order (reference/refinedet.md §9.1): photometric distortion → zoom out (expand) → IoU-constrained
random crop (seven samplers pooled) → warp resize → horizontal flip. Each transform is a callable
``(image, target) -> (image, target)`` with ``image`` a float tensor ``[3, H, W]`` in [0, 1] and
``target`` a dict with ``boxes [N, 4]`` (x1, y1, x2, y2, continuous pixels) and per-box fields
(``labels``, ``iscrowd``, ``difficult``) that are filtered alongside the boxes.

Randomness: every transform draws from ``generator`` (a ``torch.Generator``) when one is given, so a
seeded generator makes the pipeline reproducible; with ``None`` it uses torch's global generator,
which DataLoader seeds differently in each worker (a generator object would be copied into every
worker and repeat the same draws there).

Caffe values are converted from its 0–255 BGR images to [0, 1] RGB: brightness delta 32 → 32/255;
hue delta 18 in OpenCV's 0–180 hue units → 0.1 of the hue circle (Caffe saturates the uint8 hue,
we wrap it, which is what a hue rotation means).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..boxes import box_iou

__all__ = [
    "PhotometricDistort",
    "Expand",
    "CropSampler",
    "CAFFE_SAMPLERS",
    "RandomIoUCrop",
    "sample_crop",
    "RandomMirror",
    "WarpResize",
    "SSDAugmentation",
    "rgb_to_hsv",
    "hsv_to_rgb",
]

Target = dict
PER_BOX_KEYS = ("boxes", "labels", "iscrowd", "difficult", "area")


def _rand(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * _rand(generator)


def _keep_boxes(target: Target, keep: Tensor, boxes: Tensor) -> Target:
    """A copy of ``target`` with new ``boxes`` and every per-box field filtered by ``keep``."""
    out = dict(target)
    for key in PER_BOX_KEYS[1:]:
        if key in target and isinstance(target[key], Tensor):
            out[key] = target[key][keep]
    out["boxes"] = boxes
    return out


# ----------------------------------------------------------------------------------------------
# Photometric distortion
# ----------------------------------------------------------------------------------------------


def rgb_to_hsv(image: Tensor) -> Tensor:
    """``[3, H, W]`` RGB in [0, 1] → HSV, all three channels in [0, 1] (hue as a fraction of 360°)."""
    r, g, b = image.unbind(0)
    value, argmax = image.max(dim=0)
    chroma = value - image.min(dim=0).values
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(argmax == 0, ((g - b) / safe) % 6,
                      torch.where(argmax == 1, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue))
    saturation = torch.where(value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)),
                             torch.zeros_like(value))
    return torch.stack((hue, saturation, value))


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    hue, saturation, value = hsv.unbind(0)
    # f(n) = V - V S max(0, min(k, 4 - k, 1)), k = (n + 6 H) mod 6, for n = 5, 3, 1 (R, G, B)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (n + hue * 6) % 6
        channels.append(value - value * saturation * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(channels)


class PhotometricDistort:
    """SSD's random photometric distortion (Caffe ``distort_param``).

    Brightness (p 0.5, add U(±brightness_delta)) first; then with p 0.5 the order contrast →
    saturation → hue, else saturation → hue → contrast; each of those applied with p 0.5:
    contrast multiplies by U(contrast_range), saturation multiplies HSV S by U(saturation_range),
    hue adds U(±hue_delta) (fraction of the circle). Finally, with ``channel_swap_prob``, a random
    permutation of the channels (ssd.pytorch's ``RandomLightingNoise``; Caffe's
    ``random_order_prob`` is 0, so the default is off). Values are clipped to [0, 1] after each
    step, as Caffe's uint8 arithmetic saturates.
    """

    def __init__(self, brightness_delta: float = 32 / 255, contrast_range: tuple[float, float] = (0.5, 1.5),
                 saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: float = 18 / 180,
                 prob: float = 0.5, channel_swap_prob: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta
        self.prob = prob
        self.channel_swap_prob = channel_swap_prob
        self.generator = generator

    def _maybe(self) -> bool:
        return _rand(self.generator) < self.prob

    def brightness(self, image: Tensor) -> Tensor:
        return (image + _uniform(-self.brightness_delta, self.brightness_delta, self.generator)).clamp(0, 1)

    def contrast(self, image: Tensor) -> Tensor:
        # Caffe/ssd.pytorch scale the pixel values (no mean subtraction)
        return (image * _uniform(*self.contrast_range, self.generator)).clamp(0, 1)

    def saturation(self, image: Tensor) -> Tensor:
        hsv = rgb_to_hsv(image)
        hsv[1] = (hsv[1] * _uniform(*self.saturation_range, self.generator)).clamp(0, 1)
        return hsv_to_rgb(hsv).clamp(0, 1)

    def hue(self, image: Tensor) -> Tensor:
        hsv = rgb_to_hsv(image)
        hsv[0] = (hsv[0] + _uniform(-self.hue_delta, self.hue_delta, self.generator)) % 1.0
        return hsv_to_rgb(hsv).clamp(0, 1)

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        if self._maybe():
            image = self.brightness(image)
        contrast_first = _rand(self.generator) < 0.5
        steps = ((self.contrast, self.saturation, self.hue) if contrast_first
                 else (self.saturation, self.hue, self.contrast))
        for step in steps:
            if self._maybe():
                image = step(image)
        if self.channel_swap_prob > 0 and _rand(self.generator) < self.channel_swap_prob:
            image = image[torch.randperm(3, generator=self.generator)]
        return image, target


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------


class Expand:
    """Zoom out: with probability ``prob`` place the image at a random offset on a canvas
    ``ratio`` times larger, ``ratio ~ U(1, max_ratio)``, filled with ``mean`` (Caffe
    ``expand_param``: p 0.5, max 4). Makes objects smaller, for the small-object levels."""

    def __init__(self, mean: Sequence[float], max_ratio: float = 4.0, prob: float = 0.5,
                 generator: torch.Generator | None = None) -> None:
        self.mean = tuple(float(m) for m in mean)
        self.max_ratio = max_ratio
        self.prob = prob
        self.generator = generator

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        if _rand(self.generator) >= self.prob:
            return image, target
        _, height, width = image.shape
        ratio = _uniform(1.0, self.max_ratio, self.generator)
        out_h, out_w = int(height * ratio), int(width * ratio)
        top = int(math.floor(_uniform(0, out_h - height, self.generator)))
        left = int(math.floor(_uniform(0, out_w - width, self.generator)))
        canvas = torch.tensor(self.mean, dtype=image.dtype, device=image.device).view(3, 1, 1).repeat(1, out_h, out_w)
        canvas[:, top:top + height, left:left + width] = image
        shift = torch.tensor([left, top, left, top], dtype=target["boxes"].dtype, device=target["boxes"].device)
        return canvas, {**target, "boxes": target["boxes"] + shift}


@dataclass(frozen=True)
class CropSampler:
    """One Caffe ``batch_sampler``: crop side ``scale ~ U(min_scale, max_scale)`` of the image side,
    aspect ratio (w / h, relative) ``~ U(min_aspect, max_aspect)``; a crop is accepted if some box has
    ``min_iou <= IoU(crop, box) <= max_iou`` (unset bounds are not checked; with neither set any
    crop is accepted). ``max_trials`` attempts, the first accepted crop is the sampler's sample."""

    min_scale: float = 1.0
    max_scale: float = 1.0
    min_aspect: float = 1.0
    max_aspect: float = 1.0
    min_iou: float | None = None
    max_iou: float | None = None
    max_trials: int = 1


# The seven samplers of SSD/RefineDet's Caffe scripts: the whole image, then crops of 0.3–1 of the
# side with aspect 1/2–2 needing some box at IoU >= 0.1, 0.3, 0.5, 0.7, 0.9, and one needing only
# some box at IoU <= 1 (i.e. any crop, given the image has a box).
CAFFE_SAMPLERS: tuple[CropSampler, ...] = (
    CropSampler(),
    *(CropSampler(0.3, 1.0, 0.5, 2.0, min_iou=t, max_trials=50) for t in (0.1, 0.3, 0.5, 0.7, 0.9)),
    CropSampler(0.3, 1.0, 0.5, 2.0, max_iou=1.0, max_trials=50),
)


def sample_crop(sampler: CropSampler, height: int, width: int, boxes: Tensor,
                generator: torch.Generator | None = None) -> tuple[int, int, int, int] | None:
    """The crop ``(x0, y0, x1, y1)`` (integer pixels) ``sampler`` yields for an image, or None.

    Caffe ``SampleBBox``: the aspect ratio is clamped to ``[scale^2, 1 / scale^2]`` so the crop fits
    in the image, ``w = scale sqrt(aspect)``, ``h = scale / sqrt(aspect)`` (fractions of the side),
    offsets uniform. The IoU constraint is checked on the integer crop that is actually cut. All
    ``max_trials`` trials are drawn at once and the first that satisfies the constraint is
    returned (the same distribution as Caffe's loop, without a Python loop over trials).
    """
    draws = torch.rand(sampler.max_trials, 4, generator=generator, dtype=torch.float64)
    scale = sampler.min_scale + (sampler.max_scale - sampler.min_scale) * draws[:, 0]
    aspect = sampler.min_aspect + (sampler.max_aspect - sampler.min_aspect) * draws[:, 1]
    aspect = torch.minimum(torch.maximum(aspect, scale ** 2), 1 / scale ** 2)
    crop_w, crop_h = scale * aspect.sqrt(), scale / aspect.sqrt()
    x0 = ((1 - crop_w).clamp(min=0) * draws[:, 2] * width).floor()
    y0 = ((1 - crop_h).clamp(min=0) * draws[:, 3] * height).floor()
    x1 = torch.clamp(x0 + (crop_w * width).floor().clamp(min=1), max=width)
    y1 = torch.clamp(y0 + (crop_h * height).floor().clamp(min=1), max=height)
    crops = torch.stack((x0, y0, x1, y1), dim=1)  # [T, 4]
    if sampler.min_iou is None and sampler.max_iou is None:
        ok = torch.ones(sampler.max_trials, dtype=torch.bool)
    elif boxes.shape[0] == 0:
        return None  # a constrained sampler needs a box to satisfy
    else:
        iou = box_iou(crops, boxes.to(torch.float64))  # [T, N]
        ok_pairs = torch.ones_like(iou, dtype=torch.bool)
        if sampler.min_iou is not None:
            ok_pairs &= iou >= sampler.min_iou
        if sampler.max_iou is not None:
            ok_pairs &= iou <= sampler.max_iou
        ok = ok_pairs.any(dim=1)
    if not bool(ok.any()):
        return None
    first = int(ok.long().argmax())
    return tuple(int(v) for v in crops[first].tolist())


class RandomIoUCrop:
    """SSD's batch-sampler crop: every sampler proposes (at most) one crop, one of the proposals is
    chosen uniformly (Caffe ``GenerateBatchSamples`` + a random index, so the whole image competes
    on equal terms with the six constrained crops). Boxes whose centre lies inside the crop are kept
    (``emit_constraint: CENTER``), clipped to it and shifted; the others are dropped with their fields.
    """

    def __init__(self, samplers: Sequence[CropSampler] = CAFFE_SAMPLERS,
                 generator: torch.Generator | None = None) -> None:
        self.samplers = tuple(samplers)
        self.generator = generator

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        _, height, width = image.shape
        boxes = target["boxes"]
        crops = [c for s in self.samplers if (c := sample_crop(s, height, width, boxes, self.generator)) is not None]
        if not crops:
            return image, target
        x0, y0, x1, y1 = crops[int(torch.randint(len(crops), (), generator=self.generator))]
        if (x0, y0, x1, y1) == (0, 0, width, height):
            return image, target
        cx = (boxes[:, 0] + boxes[:, 2]) / 2
        cy = (boxes[:, 1] + boxes[:, 3]) / 2
        keep = (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)
        kept = boxes[keep]
        new_boxes = torch.stack((kept[:, 0].clamp(x0, x1) - x0, kept[:, 1].clamp(y0, y1) - y0,
                                 kept[:, 2].clamp(x0, x1) - x0, kept[:, 3].clamp(y0, y1) - y0), dim=1)
        return image[:, y0:y1, x0:x1], _keep_boxes(target, keep, new_boxes)


class RandomMirror:
    """Horizontal flip with probability ``prob``: ``x1' = W - x2``, ``x2' = W - x1``."""

    def __init__(self, prob: float = 0.5, generator: torch.Generator | None = None) -> None:
        self.prob = prob
        self.generator = generator

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        if _rand(self.generator) >= self.prob:
            return image, target
        width = image.shape[-1]
        b = target["boxes"]
        return image.flip(-1), {**target, "boxes": torch.stack((width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]), 1)}


class WarpResize:
    """Warp to ``size x size`` (aspect ratio not kept) with an interpolation drawn from
    ``interpolations`` (Caffe draws among linear, area, nearest, cubic, Lanczos; torch has no
    Lanczos). Boxes scale by the exact factors ``size / W``, ``size / H``; every mode samples at
    pixel centres (``align_corners=False``, ``nearest-exact``), so boxes stay on their pixels."""

    def __init__(self, size: int | tuple[int, int],
                 interpolations: Sequence[str] = ("bilinear", "area", "nearest-exact", "bicubic"),
                 generator: torch.Generator | None = None) -> None:
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.interpolations = tuple(interpolations)
        self.generator = generator

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        _, height, width = image.shape
        mode = self.interpolations[int(torch.randint(len(self.interpolations), (), generator=self.generator))]
        kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
        out = F.interpolate(image[None], size=self.size, mode=mode, **kwargs)[0].clamp(0, 1)
        out_h, out_w = self.size
        scale = torch.tensor([out_w / width, out_h / height, out_w / width, out_h / height],
                             dtype=target["boxes"].dtype, device=target["boxes"].device)
        return out, {**target, "boxes": target["boxes"] * scale}


class SSDAugmentation:
    """The full SSD/RefineDet training augmentation for a ``size`` x ``size`` model.

    Args:
        size: output side (320, 512).
        mean: RGB fill of the zoom-out canvas, in [0, 1] (the normalisation mean, so the padding
            becomes 0 after normalisation, as Caffe's mean-filled canvas does).
        photometric: include :class:`PhotometricDistort`.
        generator: shared by every step; None uses torch's global generator.
        channel_swap_prob, max_expand_ratio, samplers, interpolations: forwarded to the steps.
    """

    def __init__(self, size: int = 320, mean: Sequence[float] = (0.485, 0.456, 0.406), photometric: bool = True,
                 channel_swap_prob: float = 0.0, max_expand_ratio: float = 4.0,
                 samplers: Sequence[CropSampler] = CAFFE_SAMPLERS,
                 interpolations: Sequence[str] = ("bilinear", "area", "nearest-exact", "bicubic"),
                 generator: torch.Generator | None = None) -> None:
        steps: list[Callable[[Tensor, Target], tuple[Tensor, Target]]] = []
        if photometric:
            steps.append(PhotometricDistort(channel_swap_prob=channel_swap_prob, generator=generator))
        steps += [
            Expand(mean, max_expand_ratio, generator=generator),
            RandomIoUCrop(samplers, generator=generator),
            WarpResize(size, interpolations, generator=generator),
            RandomMirror(generator=generator),
        ]
        self.steps = steps

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"SSDAugmentation expects an image [3, H, W], got {tuple(image.shape)}")
        boxes = target.get("boxes")
        if boxes is None or boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError("SSDAugmentation expects target['boxes'] of shape [N, 4]")
        for step in self.steps:
            image, target = step(image, target)
        return image, target

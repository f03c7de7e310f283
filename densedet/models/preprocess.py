"""Image batching shared by every densedet model: normalise, resize, pad; and the way back.

Order of operations follows torchvision's ``GeneralizedRCNNTransform`` (normalise, then resize with
bilinear interpolation, then zero-pad the normalised image to a multiple of ``size_divisible``), so
the torchvision-compatible preset sees bit-identical input. Boxes returned by a model are mapped
back to each image's original pixels by :meth:`ImagePreprocessor.postprocess`.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ImagePreprocessor", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _scaled_side(side: int, scale: float) -> int:
    """``floor(side * scale)`` as ``F.interpolate(recompute_scale_factor=True)`` computes it, but
    never 0: an image 4000 px wide and 30 px high, capped at 96 px, keeps a 1 px high strip."""
    return max(1, int(math.floor(side * scale)))


class ImagePreprocessor(nn.Module):
    """Turn a list of images into one padded, normalised batch.

    Args:
        min_size: target shorter side (a tuple picks one at random per image in training, as
            torchvision does; detectron2's 640–800 multi-scale training).
        max_size: cap on the longer side.
        mean, std: per-channel normalisation of RGB in [0, 1].
        size_divisible: pad height and width up to a multiple of this.
        fixed_size: ``(h, w)`` warps every image to exactly that size (RefineDet, square demo input);
            ``min_size``/``max_size`` are then unused.
        scale_as: ``(h, w)``: every image is resized by the factor an ``h x w`` image would get, so
            all keep one scale (objects whose size in pixels does not follow their image's size);
            None: each image by its own size. With ``fixed_size``: every image is resized by the one
            factor that fits an ``h x w`` image into ``fixed_size`` and padded to ``fixed_size``, not
            warped (RefineDet on images, or tiles, of several sizes whose objects keep one size).

    ``forward(images: list[[3, H_i, W_i]], targets=None, min_size=None) -> (batch [B, 3, Hp, Wp],
    image_sizes, targets)`` where ``image_sizes[i] = (h_i, w_i)`` is the resized size (the valid
    region of the padded batch) and targets' boxes are scaled by the same factors. ``min_size``, in
    training, is this batch's shorter side (multi-scale training with one size per *batch*, chosen
    by the trainer from ``data.train_min_sizes``): no padding to the largest image of the batch, so
    a smaller draw really costs fewer FLOPs.
    """

    def __init__(self, min_size: int | Sequence[int] = 800, max_size: int = 1333,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 size_divisible: int = 128, fixed_size: Sequence[int] | None = None,
                 scale_as: Sequence[int] | None = None) -> None:
        super().__init__()
        self.min_size = tuple(min_size) if isinstance(min_size, (list, tuple)) else (int(min_size),)
        self.max_size = int(max_size)
        self.size_divisible = int(size_divisible)
        self.fixed_size = tuple(int(s) for s in fixed_size) if fixed_size else None
        self.scale_as = tuple(int(s) for s in scale_as) if scale_as else None
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1), persistent=False)

    def _scale_for(self, h: int, w: int, target: int | None = None) -> tuple[float, float] | None:
        """Scale factors (sy, sx), or None when the image keeps its size. ``target``: this
        batch's shorter side (multi-scale training); otherwise drawn from / set by ``min_size``.
        With ``scale_as`` the factor is that of a ``scale_as``-sized image, whatever ``h x w``."""
        if self.fixed_size is not None:
            fh, fw = self.fixed_size
            if self.scale_as is not None:
                scale = min(fh / self.scale_as[0], fw / self.scale_as[1])
                return None if scale == 1.0 else (scale, scale)
            return None if (h, w) == (fh, fw) else (fh / h, fw / w)
        if target is None:
            target = random.choice(self.min_size) if self.training else self.min_size[-1]
        if self.scale_as is not None:
            h, w = self.scale_as
        # Python-float (double) arithmetic, as torchvision's eager path: 320 / 400 must give exactly
        # 0.8 so that interpolate's floor(400 * 0.8) is 320 (float32 gives 0.79999995 -> 319).
        scale = min(target / min(h, w), self.max_size / max(h, w))
        return None if scale == 1.0 else (scale, scale)

    @property
    def warps(self) -> bool:
        """Whether every image is warped to ``fixed_size`` (not resized by one factor and padded)."""
        return self.fixed_size is not None and self.scale_as is None

    def resized_size(self, h: int, w: int) -> tuple[int, int]:
        """The (height, width) an ``h x w`` image gets in eval mode, without touching pixels:
        ``floor(side * scale)``, as ``F.interpolate(recompute_scale_factor=True)`` computes it."""
        if self.warps:
            return self.fixed_size[0], self.fixed_size[1]
        was_training = self.training
        self.training = False
        scale = self._scale_for(h, w)
        self.training = was_training
        if scale is None:
            return h, w
        return _scaled_side(h, scale[0]), _scaled_side(w, scale[1])

    def resize(self, image: Tensor, target: dict | None, size: int | None = None) -> tuple[Tensor, dict | None]:
        """Resize one image (and its target's boxes). A target holding ``resize_as: (H, W)`` (a
        training crop, see ``data.transforms.RandomObjectCrop``) is scaled by the factors an
        ``H x W`` image would get, so that its objects keep their test-time size."""
        h, w = image.shape[-2:]
        as_crop = target is not None and "resize_as" in target
        scale = self._scale_for(*target["resize_as"], size) if as_crop else self._scale_for(h, w, size)
        if scale is None:
            return image, target
        if self.warps and not as_crop:
            image = F.interpolate(image[None], size=self.fixed_size, mode="bilinear", align_corners=False)[0]
        elif math.floor(h * scale[0]) >= 1 and math.floor(w * scale[1]) >= 1:
            image = F.interpolate(image[None], scale_factor=scale, mode="bilinear",
                                  recompute_scale_factor=True, align_corners=False)[0]
        else:  # an extreme aspect ratio (4000 x 30): the short side would round to 0 px; keep 1 px
            size = (_scaled_side(h, scale[0]), _scaled_side(w, scale[1]))
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        if target is not None and "boxes" in target:
            nh, nw = image.shape[-2:]
            ratio = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=torch.float32)
            target = {**target, "boxes": target["boxes"] * ratio.to(target["boxes"].device)}
        return image, target

    def forward(self, images: list[Tensor], targets: list[dict] | None = None, min_size: int | None = None
                ) -> tuple[Tensor, list[tuple[int, int]], list[dict] | None]:
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError("images must be a non-empty list of [3, H, W] tensors")
        out_images, out_targets = [], [] if targets is not None else None
        size = int(min_size) if min_size is not None and self.training and self.fixed_size is None else None
        for i, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"image {i} has shape {tuple(image.shape)}; expected [3, H, W]")
            image = (image.float() - self.mean) / self.std
            image, target = self.resize(image, targets[i] if targets is not None else None, size)
            out_images.append(image)
            if out_targets is not None:
                out_targets.append(target)
        image_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in out_images]
        return self.pad(out_images), image_sizes, out_targets

    def padded_size(self, h: int, w: int) -> tuple[int, int]:
        """The size a batch whose largest resized image is ``h x w`` is padded to: rounded up to
        ``size_divisible``, and at least ``fixed_size`` when images are padded to it rather than
        warped (``scale_as`` with ``fixed_size``)."""
        d = self.size_divisible
        hp, wp = int(math.ceil(h / d) * d), int(math.ceil(w / d) * d)
        if self.fixed_size is not None and not self.warps:
            hp, wp = max(hp, self.fixed_size[0]), max(wp, self.fixed_size[1])
        return hp, wp

    def pad(self, images: list[Tensor]) -> Tensor:
        """Zero-pad (after normalising: the mean colour) bottom and right to :meth:`padded_size`."""
        hp, wp = self.padded_size(max(im.shape[-2] for im in images), max(im.shape[-1] for im in images))
        if all(im.shape[-2:] == (hp, wp) for im in images):
            return torch.stack(images)
        batch = images[0].new_zeros((len(images), 3, hp, wp))
        for b, im in zip(batch, images):
            b[:, : im.shape[-2], : im.shape[-1]].copy_(im)
        return batch

    @staticmethod
    def postprocess(detections: list[dict], image_sizes: list[tuple[int, int]],
                    original_sizes: list[tuple[int, int]]) -> list[dict]:
        """Scale each image's ``boxes`` from the resized size back to its original size."""
        for det, (h, w), (oh, ow) in zip(detections, image_sizes, original_sizes):
            if (h, w) != (oh, ow):
                ratio = torch.tensor([ow / w, oh / h, ow / w, oh / h], dtype=torch.float32)
                det["boxes"] = det["boxes"] * ratio.to(det["boxes"].device)
        return detections

"""torch Datasets over `DetectionData`: whole images, or tiles of large images.

An item is `(image FloatTensor[3, H, W] in [0, 1], target)` with target
`{"boxes": FloatTensor[N, 4], "labels": LongTensor[N], "iscrowd": BoolTensor[N],
"difficult": BoolTensor[N], "image_id": int, "orig_size": (h, w)}` — torchvision's convention;
the model batches and pads itself, so `collate` just makes lists.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import image_size, load_image, load_record_image
from .records import DatasetError, DetectionData, ImageRecord
from .transforms import Target, crop_target, tile_grid


def collate(batch: list[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """[(image, target), ...] -> ([images], [targets]); images may differ in size."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets


def record_target(record: ImageRecord, height: int, width: int) -> Target:
    """The target dict of a record whose decoded image is height x width.

    When the annotation gave no size, boxes are clipped to the decoded image and those left
    without area dropped here (the readers could not do it). A size that disagrees with the
    decoded image is an error: the boxes would not line up with the pixels.
    """
    boxes, keep = record.boxes, np.ones(len(record), dtype=bool)
    if record.height is None or record.width is None:
        boxes = boxes.copy()
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    elif (record.height, record.width) != (height, width):
        raise DatasetError(
            f"{record.file_name}: image id {record.image_id}: annotation says {record.width}x"
            f"{record.height} (w x h) but the image decodes to {width}x{height} (after EXIF "
            f"rotation); boxes would not match the pixels")
    return {
        "boxes": torch.from_numpy(boxes[keep].astype(np.float32)),
        "labels": torch.from_numpy(record.labels[keep].copy()),
        "iscrowd": torch.from_numpy(record.iscrowd[keep].copy()),
        "difficult": torch.from_numpy(record.difficult[keep].copy()),
        "image_id": int(record.image_id),
        "orig_size": (height, width),
    }


class DetectionDataset(Dataset):
    """Images and targets of a `DetectionData`, optionally transformed.

    cache_images=True keeps each decoded image as a uint8 tensor after its first use (3 bytes
    per pixel), so that many epochs over a small set do not decode files again. With DataLoader
    workers each worker fills its own cache unless `preload()` is called before the loader is
    created (forked workers then share the decoded images).
    """

    def __init__(self, data: DetectionData,
                 transforms: Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]
                 | None = None, cache_images: bool = False):
        self.data = data
        self.transforms = transforms
        self.cache_images = cache_images
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.data.records)

    def load_uint8(self, index: int) -> torch.Tensor:
        """Decoded image `index` as uint8 [3, H, W], from the cache when enabled."""
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        image = load_record_image(self.data.records[index])
        if self.cache_images:
            self._cache[index] = image
        return image

    def preload(self) -> None:
        """Decode every image into the cache now (turns caching on)."""
        self.cache_images = True
        for index in range(len(self)):
            self.load_uint8(index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image = self.load_uint8(index).float().div_(255.0)
        target = record_target(self.data.records[index], *image.shape[-2:])
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


class TiledDataset(Dataset):
    """Overlapping tiles of (large) images as training items, e.g. deepforest's 2299x2472 photos.

    Every image is covered by tiles of at most tile_size x tile_size (`transforms.tile_grid`);
    item i is one tile with its boxes in tile coordinates (`transforms.crop_target`: clipped,
    dropped below `min_visibility` of their area) and target["tile_origin"] = (x0, y0).
    skip_empty=True leaves out tiles without boxes. Image sizes come from the records, or from
    the image headers when the annotation did not give them. ``scale_as = (h, w)`` marks every
    tile's target with ``resize_as`` (as ``RandomObjectCrop`` does): the model's preprocessor then
    resizes a tile as it would an ``h x w`` image, so objects keep the scale of such images (the
    evaluation images) instead of the tile's being resized to the model's input size.
    """

    def __init__(self, data: DetectionData, tile_size: int, overlap: int,
                 transforms: Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]
                 | None = None, min_visibility: float = 0.5, cache_images: bool = False,
                 skip_empty: bool = False, scale_as: tuple[int, int] | None = None):
        self.images = DetectionDataset(data, transforms=None, cache_images=cache_images)
        self.scale_as = tuple(scale_as) if scale_as else None
        self.transforms = transforms
        self.min_visibility = min_visibility
        self.tiles: list[tuple[int, tuple[int, int, int, int]]] = []
        for index, record in enumerate(data.records):
            if record.height is not None and record.width is not None:
                height, width = record.height, record.width
            else:
                size = image_size(record.file_name)
                if size is None:
                    load_image(record.file_name)  # raises the DatasetError naming the file
                    raise DatasetError(f"{record.file_name}: cannot read the image size")
                height, width = size
            target = record_target(record, height, width) if skip_empty else None
            for window in tile_grid(height, width, tile_size, overlap):
                if skip_empty and len(crop_target(target, *window, min_visibility)["boxes"]) == 0:
                    continue
                self.tiles.append((index, window))

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image_index, (x0, y0, x1, y1) = self.tiles[index]
        full = self.images.load_uint8(image_index)
        # Crop before converting to float: a whole 2472x2299 photo in fp32 is 68 MB per item.
        image = full[:, y0:y1, x0:x1].float().div_(255.0)
        target = record_target(self.images.data.records[image_index], *full.shape[-2:])
        target = crop_target(target, x0, y0, x1, y1, self.min_visibility)
        if self.scale_as is not None:
            target["resize_as"] = self.scale_as
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

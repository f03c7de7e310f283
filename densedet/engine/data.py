"""From a :class:`DataConfig` to datasets and batches.

The batch stream is a pure function of (seed, iteration): sample k of the run is
``permutation(seed, epoch = k // N)[k % N]``, and every process takes its slice of each batch.
A resumed run therefore sees exactly the batches an uninterrupted run would, with no sampler state.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import random

import numpy as np
import torch

from ..config import Config, ConfigError, DataConfig
from ..data.ssd_augment import PhotometricDistort, SSDAugmentation
from ..data import (Compose, DetectionData, DetectionDataset, RandomHorizontalFlip, RandomObjectCrop, RandomRotate90,
                    ResizeShortestEdge, TiledDataset, DatasetError, align_classes, load_coco, load_csv, load_voc,
                    image_size, load_image, make_digit_scenes, record_size, record_target)
from ..data.images import missing_image_hint
from ..data.split import split_by_image, split_by_region

__all__ = ["load_split", "carve", "build_train_dataset", "check_image_files", "shrink_to_input", "BatchStream"]


def resolve_path(path: str) -> str:
    """``pkg://PACKAGE/sub/path`` → that path inside an installed package (found without importing
    it), so a config can name data shipped in a registry package; other paths pass unchanged."""
    if not path or not path.startswith("pkg://"):
        return path
    package, _, rest = path[len("pkg://"):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{path}: package {package!r} is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], rest)


def resolve_paths(spec: str, key: str) -> list[str]:
    """A comma-separated list of paths or glob patterns (each may be ``pkg://``), all of which must exist."""
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        item = resolve_path(item)
        matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        if not matches or not all(os.path.exists(m) for m in matches):
            raise DatasetError(f"{item}: annotation path not found ({key})")
        out += matches
    return out


def load_split(data: DataConfig, split: str = "train") -> DetectionData:
    """Read the ``train``, ``val`` or ``tune`` split a :class:`DataConfig` describes; an empty split is an error
    naming its source (training on nothing would otherwise fail far later)."""
    loaded = _load_split(data, split)
    if not loaded.records:
        raise DatasetError(f"{loaded.source}: the {split} split has no images (data.{split})")
    return loaded


def _load_split(data: DataConfig, split: str = "train") -> DetectionData:
    """Read the ``train``, ``val`` or ``tune`` split a :class:`DataConfig` describes.

    With ``data.val_fraction`` (and no ``data.val``) or ``data.tune_fraction``, those splits are
    held out of ``data.train`` (:func:`carve`), and the train split is what is left.

    ``coco``/``csv``/``voc`` read ``data.<split>`` (annotation file, or folder of VOC XML) with
    images under ``data.<split>_images`` (default: next to the annotations); ``digits`` generates
    (or reuses) the digit scenes under ``data.root`` and reads their COCO json.
    """
    if split not in ("train", "val", "tune"):
        raise ValueError(f"split must be 'train', 'val' or 'tune', got {split!r}")
    if data.format == "digits":
        if split == "tune" and data.num_tune <= 0:
            raise ConfigError("data.num_tune: the tune split needs num_tune > 0")
        paths = make_digit_scenes(data.root, num_train=data.num_train, num_val=data.num_val, seed=data.seed,
                                  num_tune=data.num_tune)
        return load_coco(paths[f"{split}_json"], paths[f"{split}_images"], strict=data.strict)
    if data.val_fraction > 0 and data.val:
        raise ConfigError(f"data.val_fraction ({data.val_fraction}) carves the validation split out of data.train, "
                          f"but data.val is given too ({data.val}); set one of them")
    carved = {"val": data.val_fraction > 0, "tune": data.tune_fraction > 0}
    if split == "train" and any(carved.values()) or carved.get(split):
        return carve(data, _read(data, "train"))[split]
    if split == "tune":
        raise ConfigError(f"no tune split: set data.tune_fraction to hold out part of data.train (data.format "
                          f"{data.format!r}); evaluate another annotation file with data.val=FILE")
    return _read(data, split)


def carve(data: DataConfig, train: DetectionData) -> dict[str, DetectionData]:
    """``{"train", "val", "tune"}`` of the training annotations, as ``data.holdout`` says: whole images
    (:func:`~densedet.data.split.split_by_image`, seeded by ``data.seed``) or bands of large photos
    (:func:`~densedet.data.split.split_by_region`)."""
    if data.holdout == "region":
        return split_by_region(train, data.val_fraction, data.tune_fraction, data.holdout_gap, data.holdout_piece)
    return split_by_image(train, data.val_fraction, data.tune_fraction, data.seed, data.val_max_images,
                          data.tune_max_images)


def _read(data: DataConfig, split: str) -> DetectionData:
    """The annotation file(s) ``data.<split>`` names, read by the reader of its format (``data.format``,
    or ``data.val_format`` for a validation file of another format). With ``data.class_names`` a
    COCO file's categories are matched to them by name (:func:`~densedet.data.align_classes`)."""
    path = getattr(data, split)
    images = resolve_path(getattr(data, f"{split}_images")) or None
    kind = data.val_format if split == "val" and data.val_format else data.format
    if not path:
        raise ConfigError(f"data.{split}: no annotation path given (data.format is {data.format!r})")
    paths = resolve_paths(path, f"data.{split}")
    if kind == "voc" and (len(paths) > 1 or os.path.isfile(paths[0])):
        return load_voc(paths, image_dir=images, class_names=data.class_names, strict=data.strict)
    path = paths[0]
    if len(paths) > 1:
        raise ConfigError(f"data.{split}: {kind} takes one annotation file, got {len(paths)}")
    if kind == "coco":
        coco = load_coco(path, images if images is not None else os.path.dirname(path), strict=data.strict)
        return coco if data.class_names is None else align_classes(coco, data.class_names)
    if kind == "csv":
        return load_csv(path, image_root=images, class_names=data.class_names, strict=data.strict)
    if kind == "voc":
        return load_voc(path, image_dir=images, class_names=data.class_names, strict=data.strict)
    raise ConfigError(f"data.format: must be coco, voc, csv or digits, got {kind!r}")


def check_image_files(data: DetectionData) -> None:
    """Every image of ``data`` can be opened and, where the annotations give its size, has that size;
    from the files' headers alone. A :class:`DatasetError` names the first one that fails."""
    for record in data.records:
        if not os.path.isfile(record.file_name):
            raise DatasetError(f"{record.file_name}: image file not found (image id {record.image_id} of "
                               f"{data.source}){missing_image_hint(record.file_name, data.source)}")
        # a header PIL cannot read: decoding raises the error that says why
        size = image_size(record.file_name) or tuple(load_image(record.file_name).shape[-2:])
        if record.region is None and record.resize is None and record.height is not None:
            record_target(record, *size)        # raises when the annotated size is not the file's


def shrink_to_input(data: DetectionData, min_size: int, max_size: int,
                    fixed_size: int | None = None) -> DetectionData:
    """``data`` with each image that the model's resize (shorter side ``min_size``, longer side at most
    ``max_size``; or a warp to ``fixed_size`` squared, RefineDet's) would shrink resized to that size
    when it is loaded, its boxes with it; the model's own resize then leaves it as it is. Large photos
    are decoded and shrunk once (into the image cache), not augmented and resized at full size at every
    step (``data.shrink_at_load``)."""
    resize = ResizeShortestEdge(min_size, max_size)
    records = []
    for record in data.records:
        height, width = record_size(record, data.source)
        if record.region is None and record.height is not None:
            height, width = image_size(record.file_name) or (height, width)
        new_h, new_w = (fixed_size, fixed_size) if fixed_size else resize.output_size(height, width, min_size)
        if new_h > height or new_w > width or (new_h, new_w) == (height, width):
            records.append(record)
            continue
        # boxes clipped when the size came from the file; a size the file disagrees with is an error
        target = record_target(record, height, width)
        scale = np.array([new_w / width, new_h / height] * 2, dtype=np.float32)
        records.append(dataclasses.replace(record, height=new_h, width=new_w, boxes=target["boxes"].numpy() * scale,
                                           labels=target["labels"].numpy(), iscrowd=target["iscrowd"].numpy(),
                                           difficult=target["difficult"].numpy(), resize=(new_h, new_w)))
    return dataclasses.replace(data, records=records)


def build_train_dataset(cfg: Config, data: DetectionData):
    """The training dataset with its augmentation (flip, windows, photometric, multi-scale; SSD's for RefineDet;
    quarter turns); with ``data.shrink_at_load``, over the training images shrunk to the model's input."""
    d = cfg.data
    if d.shrink_at_load:
        warp = cfg.model.refinedet.image_size if cfg.model.arch == "refinedet" else None
        data = shrink_to_input(data, cfg.model.min_size, cfg.model.max_size, warp)
    transforms = []
    if d.augment == "ssd":
        transforms.append(SSDAugmentation(cfg.model.refinedet.image_size))
    else:
        # Multi-scale training (data.train_min_sizes) happens in the model's preprocessor, one size
        # per batch (see the trainer): resizing here would be undone by the model's own resize.
        if d.hflip_prob > 0:
            transforms.append(RandomHorizontalFlip(d.hflip_prob, d.hflip_keeps_class))
        if d.crop_size > 0 or d.crop_sizes:
            # With data.crop_sizes the stream sets the window size of each batch (BatchStream).
            model_size = (cfg.model.min_size, cfg.model.max_size) if d.crop_model_pixels else None
            transforms.append(RandomObjectCrop(d.crop_size or max(d.crop_sizes), d.crop_min_visibility, model_size))
        if d.photometric:
            transforms.append(PhotometricDistort())     # after the crop: on the window's pixels only
    if d.rotate90:
        transforms.append(RandomRotate90())                 # last: square windows and SSD's warp keep their size
    transform = Compose(transforms) if transforms else None
    if d.tile_size > 0:
        return TiledDataset(data, d.tile_size, d.tile_overlap, transforms=transform,
                            cache_images=d.cache_images, skip_empty=False,
                            scale_as=tuple(d.tile_scale_as) if d.tile_scale_as else None)
    dataset = DetectionDataset(data, transforms=transform, cache_images=d.cache_images)
    if d.cache_images:
        dataset.preload()
    return dataset


class BatchStream:
    """Deterministic batches: ``stream.batch(iteration)`` → (images, targets) of this process.

    Augmentations draw from torch's global RNG, which is re-seeded from (seed, k) before sample k,
    so augmentation too is a function of the sample's position in the run alone.

    ``crop_sizes`` (data.crop_sizes): each batch draws one window size for the dataset's
    :class:`RandomObjectCrop`, a function of the iteration alone, and holds ``batch_size`` windows
    of the largest size or proportionally more of a smaller one (``batch_size x (largest / size)^2``,
    rounded to a multiple of the number of processes), so every batch carries about the same pixels.
    Small windows then come many to a step, each centred on a small object that fits in it.
    """

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 crop_sizes=()) -> None:
        if batch_size % world_size:
            raise ConfigError(f"train.batch_size ({batch_size}) must be divisible by the number of processes "
                              f"({world_size})")
        if len(dataset) == 0:
            raise ConfigError("the training set is empty")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self._perm_epoch, self._perm = -1, None
        self.crop_sizes = sorted({int(s) for s in crop_sizes})
        self._window, self._count, self._starts = None, {}, [0]
        if self.crop_sizes:
            self._window = _object_crop(dataset)
            largest = self.crop_sizes[-1]
            self._count = {s: max(1, round(batch_size * (largest / s) ** 2 / world_size)) * world_size
                           for s in self.crop_sizes}

    def _index(self, k: int) -> int:
        n = len(self.dataset)
        epoch = k // n
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(n, generator=g), epoch
        return int(self._perm[k % n])

    def sample(self, k: int) -> tuple[torch.Tensor, dict]:
        """Sample k of the run; the RNGs are seeded from k, so the result does not depend on the
        number of processes or on where a run was resumed. The augmentations draw on the CPU, so only
        its generator is seeded (``torch.manual_seed`` would also queue a seed for every accelerator
        and format a stack trace for each, on every sample)."""
        torch.default_generator.manual_seed(self.seed * 1_000_033 + k)
        random.seed(self.seed * 1_000_033 + k)
        return self.dataset[self._index(k)]

    def crop_size(self, iteration: int) -> int | None:
        """The window size of iteration's batch (None without ``crop_sizes``)."""
        if not self.crop_sizes:
            return None
        return self._per_batch_choice(iteration, self.crop_sizes, salt=1_000_039)

    def size_of(self, iteration: int) -> int:
        """How many samples iteration's batch holds, over all processes."""
        return self._count[self.crop_size(iteration)] if self.crop_sizes else self.batch_size

    def first_sample(self, iteration: int) -> int:
        """The run-wide index of iteration's first sample (= samples drawn before it)."""
        if not self.crop_sizes:
            return iteration * self.batch_size
        while len(self._starts) <= iteration:  # batch sizes vary: a running sum, extended on demand
            self._starts.append(self._starts[-1] + self.size_of(len(self._starts) - 1))
        return self._starts[iteration]

    def batch(self, iteration: int) -> tuple[list[torch.Tensor], list[dict]]:
        if self._window is not None:
            self._window.size = self.crop_size(iteration)
        per_rank = self.size_of(iteration) // self.world_size
        start = self.first_sample(iteration) + self.rank * per_rank
        samples = [self.sample(k) for k in range(start, start + per_rank)]
        return [s[0] for s in samples], [s[1] for s in samples]

    def min_size(self, iteration: int, sizes) -> int:
        """The shorter side of iteration's batch under multi-scale training: the same on every
        process and however the run was interrupted."""
        return int(self._per_batch_choice(iteration, list(sizes), salt=1_000_037))

    def _per_batch_choice(self, iteration: int, options: list, salt: int):
        """One of ``options`` for iteration's batch, seeded from (seed, salt, iteration) alone, so every
        process and every resumed run draws the same; each per-batch draw has its own salt."""
        return random.Random(self.seed * salt + iteration).choice(options)

    def epoch_of(self, iteration: int) -> float:
        return self.first_sample(iteration) / len(self.dataset)


def _object_crop(dataset) -> RandomObjectCrop:
    """The :class:`RandomObjectCrop` among a training dataset's transforms (data.crop_sizes sets its size)."""
    transforms = dataset.transforms
    found = [t for t in getattr(transforms, "transforms", [transforms]) if isinstance(t, RandomObjectCrop)]
    if not found:
        raise ConfigError("data.crop_sizes: the training transforms have no object crop to size")
    return found[0]

"""Backbone warm-up on the training set's own boxes: classify object crops before detecting.

Training a detector from random weights spends its first steps learning what the objects look like
from a handful of positive anchors per image. A crop of each annotated box, resized to a few dozen
pixels, teaches the same thing far more cheaply: a 64 px crop costs ~1/25 of a 320 px image and
is a whole labelled example. ``train.pretrain_minutes`` (or ``train.pretrain_iters``) spends that
part of the training budget on it before the detection loop starts, then hands the trunk to the
detector; the classifier layers are thrown away. ``train.pretrain_freeze_stages`` then keeps the
trunk's first stages as the warm-up left them (the trainer freezes them; detection skips their
backward pass).

A batch: ``batch_size`` boxes drawn at random (non-crowd), each cut out as a square window
``context`` times the box's longer side (drawn from [1.1, 1.6]), its centre shifted by up to 10%
of that side, resampled to one side length per batch drawn from ``crop_sizes``
(``train.pretrain_crop_sizes``, default ``CROP_SIZES``) and normalised as the model's preprocessor
does. Loss: cross-entropy of a linear classifier on the global average of every trunk output
(deep supervision: C3 and C4 learn the classes too, not only C5).

Background crops (``background`` > 0, ``train.pretrain_background``): that share of each batch is
square windows placed away from every box, labelled as one extra class (index K). With one class
this is what makes the warm-up a task at all: classifying every crop as the only class has loss 0
from the first step and teaches nothing; object against background is what a one-class detector
must tell apart. The default (``-1``, auto) uses a share of 0.5 with one class and none with
several, where the classes already give the task (the demo's measured recipe). A background
window takes the side of a randomly drawn box's window (so it has the objects' scale) and a
uniformly random position, redrawn up to ``BACKGROUND_TRIES`` times while it overlaps a box at
IoU >= ``BACKGROUND_MAX_IOU``; images without boxes are background anywhere. AdamW at ``train.pretrain_lr``
(or ``solver.lr``), 20 warm-up steps, cosine to zero over the planned iterations. Every random
draw comes from a generator seeded by (seed, iteration), so a fixed ``iterations`` run is
repeatable.

With ``train.pretrain_augment`` the crops see what the detection windows see (:class:`CropAugment`):
the flips, quarter turns and photometric distortion that ``data.hflip_prob``, ``data.rotate90`` and
``data.photometric`` give the detector. It is off by default: it was meant to keep the stages frozen
after the warm-up from learning one photo's orientation and colours, and on the tree crowns it did
not lift the other site, nor the digits (docs/own-data-measurements.md).
"""

from __future__ import annotations

import collections
import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..boxes import box_iou
from ..config import Config
from ..data import DetectionDataset, record_size
from ..data.records import DetectionData
from ..data.ssd_augment import PhotometricDistort
from ..device import autocast as autocast_context
from ..device import fused_adam_ok
from .distributed import broadcast_state, value_of_rank0

__all__ = ["box_items", "crop_boxes", "crop_batch", "CropAugment", "background_windows", "background_share",
           "CropClassifier", "pretrain_backbone", "warm_up_trunk", "CROP_SIZES"]

CROP_SIZES = (32, 48, 64, 96)
CONTEXT = (1.1, 1.6)
SHIFT = 0.1
WARMUP_ITERS = 20
ACCURACY_WINDOW = 10
BACKGROUND_TRIES = 10
BACKGROUND_MAX_IOU = 0.1
AUTO_BACKGROUND_SHARE = 0.5     # with one class: half object crops, half background


def background_share(setting: float, num_classes: int) -> float:
    """The share of background crops: ``setting`` when >= 0, else (auto) 0.5 with one class and 0 with
    several (see the module docstring for why)."""
    if setting >= 0:
        return float(setting)
    return AUTO_BACKGROUND_SHARE if num_classes == 1 else 0.0


def box_items(data: DetectionData) -> tuple[Tensor, Tensor, Tensor]:
    """Every non-crowd box of ``data``: image indices [N], boxes [N, 4] float32, labels [N]."""
    counts = [len(r.boxes) for r in data.records]
    if not sum(counts):
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    image_of = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    boxes = torch.from_numpy(np.concatenate([r.boxes for r in data.records])).float()
    labels = torch.from_numpy(np.concatenate([r.labels for r in data.records])).long()
    keep = ~torch.from_numpy(np.concatenate([r.iscrowd for r in data.records]).astype(bool))
    return image_of[keep], boxes[keep], labels[keep]


def crop_boxes(image: Tensor, boxes: Tensor, size: int, context: Tensor, shift: Tensor) -> Tensor:
    """Square windows around ``boxes`` of one image, resampled to ``size x size`` (bilinear).

    image float [3, H, W]; boxes [N, 4]; context [N] (window side / box's longer side); shift
    [N, 2] (centre offset as a fraction of the longer side). Outside the image is zero.
    Returns [N, 3, size, size].
    """
    height, width = image.shape[-2:]
    side = (boxes[:, 2:] - boxes[:, :2]).max(dim=1).values
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2 + shift * side[:, None]
    window = side * context
    theta = torch.zeros(len(boxes), 2, 3)
    # affine_grid maps output [-1, 1] to input [-1, 1] (align_corners=False: pixel edges).
    theta[:, 0, 0], theta[:, 1, 1] = window / width, window / height
    theta[:, 0, 2], theta[:, 1, 2] = 2 * centre[:, 0] / width - 1, 2 * centre[:, 1] / height - 1
    grid = F.affine_grid(theta, [len(boxes), 3, size, size], align_corners=False)
    return F.grid_sample(image.expand(len(boxes), -1, -1, -1), grid, mode="bilinear",
                         padding_mode="zeros", align_corners=False)


class CropClassifier(nn.Module):
    """A trunk with a linear classifier on the global average of each of its outputs; ``forward``
    gives their logits, the last one C5's."""

    def __init__(self, trunk: nn.Module, channels: list[int], num_classes: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(nn.Linear(c, num_classes) for c in channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        return [head(f.mean((2, 3))) for head, f in zip(self.heads, self.trunk(x))]


def background_windows(g: torch.Generator, count: int, data: DetectionData, sides: Tensor) -> tuple[Tensor, Tensor]:
    """``count`` square windows away from every box: image indices [count] and windows [count, 4]
    (x1, y1, x2, y2, image pixels), every draw from ``g``. ``sides`` [M] are window sides to draw
    from (the object windows' sides, so background crops have the objects' scale). A window is
    redrawn up to ``BACKGROUND_TRIES`` times while its IoU with some box is >= ``BACKGROUND_MAX_IOU``
    (the last draw is kept: in a crowded image it is the best there is)."""
    images = torch.randint(len(data.records), (count,), generator=g)
    windows = torch.zeros(count, 4)
    for n, i in enumerate(images.tolist()):
        record = data.records[i]
        height, width = record_size(record, data.source)
        boxes = torch.from_numpy(record.boxes).float()
        for _ in range(BACKGROUND_TRIES):
            side = float(sides[int(torch.randint(len(sides), (), generator=g))])
            side = min(side, float(height), float(width))
            x0 = float(torch.rand((), generator=g)) * (width - side)
            y0 = float(torch.rand((), generator=g)) * (height - side)
            windows[n] = torch.tensor([x0, y0, x0 + side, y0 + side])
            if not len(boxes) or float(box_iou(windows[n:n + 1], boxes).max()) < BACKGROUND_MAX_IOU:
                break
    return images, windows


@dataclass(frozen=True)
class CropAugment:
    """The augmentation of warm-up crops: a mirror with probability ``hflip_prob``, a random quarter
    turn (``rotate90``), SSD's photometric distortion (``photometric``); each crop draws its own."""

    hflip_prob: float = 0.0
    rotate90: bool = False
    photometric: bool = False

    @classmethod
    def of(cls, cfg: Config) -> "CropAugment":
        """The detection windows' augmentation (``cfg.data``), or none without ``train.pretrain_augment``."""
        d = cfg.data
        if not cfg.train.pretrain_augment:
            return cls()
        if d.augment == "ssd":                  # SSD's pipeline: its photometric distortion and mirror (p 0.5)
            return cls(0.5, d.rotate90, True)
        # a crop's class is its label: a mirror that may change the class has no label to give it
        return cls(d.hflip_prob if d.hflip_keeps_class else 0.0, d.rotate90, d.photometric)

    def __call__(self, g: torch.Generator, crops: Tensor) -> Tensor:
        """``crops`` [N, 3, S, S] in [0, 1], augmented, every draw from ``g``."""
        if self.hflip_prob > 0:
            mirror = torch.rand(len(crops), generator=g) < self.hflip_prob
            crops = torch.where(mirror[:, None, None, None], crops.flip(-1), crops)
        if self.rotate90:
            turns = torch.randint(4, (len(crops),), generator=g)
            crops = crops.clone()
            for k in (1, 2, 3):                 # one batched turn per angle, not one per crop
                crops[turns == k] = crops[turns == k].rot90(k, (-2, -1))
        if self.photometric:
            distort = PhotometricDistort(generator=g)
            crops = torch.stack([distort(c, None)[0] for c in crops])
        return crops


def crop_batch(g: torch.Generator, items: tuple[Tensor, Tensor, Tensor], load_image: Callable[[int], Tensor],
               batch_size: int, crop_sizes: tuple[int, ...], data: DetectionData | None = None,
               background: float = 0.0, augment: CropAugment = CropAugment()) -> tuple[Tensor, Tensor]:
    """One step's crops in [0, 1] and their labels, every draw from ``g``; ``items`` is :func:`box_items`'.
    With ``background`` > 0 that share of the batch is background windows of ``data`` labelled
    ``data.num_classes``. ``augment`` transforms the crops, background ones too."""
    image_of, box_of, label_of = items
    n_bg = int(round(batch_size * background)) if data is not None else 0
    n_obj = batch_size - n_bg
    picks = torch.randint(len(image_of), (n_obj,), generator=g)
    size = crop_sizes[int(torch.randint(len(crop_sizes), (), generator=g))]
    context = torch.empty(n_obj).uniform_(*CONTEXT, generator=g)
    shift = torch.empty(n_obj, 2).uniform_(-SHIFT, SHIFT, generator=g)
    images, boxes, labels = image_of[picks], box_of[picks], label_of[picks]
    if n_bg:
        sides = (box_of[:, 2:] - box_of[:, :2]).max(dim=1).values * sum(CONTEXT) / 2
        bg_images, bg_windows = background_windows(g, n_bg, data, sides)
        images, boxes = torch.cat([images, bg_images]), torch.cat([boxes, bg_windows])
        labels = torch.cat([labels, torch.full((n_bg,), data.num_classes, dtype=torch.long)])
        context = torch.cat([context, torch.ones(n_bg)])          # the window itself: no context, no shift
        shift = torch.cat([shift, torch.zeros(n_bg, 2)])
    order = torch.argsort(images, stable=True)                    # the crops of one image together
    images, boxes, labels, context, shift = images[order], boxes[order], labels[order], context[order], shift[order]
    ids, counts = torch.unique_consecutive(images, return_counts=True)
    counts = counts.tolist()
    crops = [crop_boxes(load_image(i).float().div_(255.0), b, size, c, d)
             for i, b, c, d in zip(ids.tolist(), boxes.split(counts), context.split(counts), shift.split(counts))]
    return augment(g, torch.cat(crops)), labels


def pretrain_backbone(trunk: nn.Module, load_image: Callable[[int], Tensor], data: DetectionData,
                      mean: Tensor, std: Tensor, lr: float, weight_decay: float, batch_size: int = 64,
                      crop_sizes: tuple[int, ...] = CROP_SIZES, minutes: float = 0.0, iterations: int = 0,
                      seed: int = 0, channels_last: bool = True, background: float = -1.0,
                      device: torch.device | None = None, autocast: Callable = contextlib.nullcontext,
                      log: Callable[[str], None] = lambda _: None,
                      clock: Callable[[], float] = time.perf_counter,
                      classifier: CropClassifier | None = None, augment: CropAugment = CropAugment()) -> dict:
    """Train ``trunk`` (a module returning a list of feature maps with ``out_channels``) to classify
    the crops of ``data``'s boxes, for ``iterations`` steps or, when 0, for ``minutes``.
    ``load_image(i)`` gives image i as uint8 [3, H, W]; ``autocast()`` is the precision context;
    ``clock`` (seconds) times the run and the ``minutes`` budget. ``background``: the share of
    background crops (:func:`background_share`; -1 auto). ``classifier``: the :class:`CropClassifier`
    on ``trunk`` to train, for a caller that uses it afterwards (default: a new one, thrown away).
    ``augment``: the crops' augmentation (:class:`CropAugment`; default none).
    Returns statistics of the run: iterations, seconds, crops_per_s, loss (last step), accuracy (C5
    classifier, last ``ACCURACY_WINDOW`` steps, on the training crops), boxes, background (the share),
    chance_loss (the cross-entropy of guessing by the label frequencies, for comparison)."""
    image_of, box_of, label_of = box_items(data)
    if not len(image_of):
        raise ValueError("train.pretrain_minutes: the training set has no (non-crowd) boxes to classify")
    if iterations <= 0 and minutes <= 0:
        raise ValueError("pretrain_backbone needs iterations > 0 or minutes > 0")
    device = device or torch.device("cpu")
    share = background_share(background, data.num_classes)
    if not 0.0 <= share < 1.0:
        raise ValueError(f"train.pretrain_background: the share of background crops must be in [0, 1), got {share}")
    outputs = data.num_classes + (1 if share > 0 else 0)
    if classifier is not None and (classifier.trunk is not trunk or classifier.heads[0].out_features != outputs):
        raise ValueError(f"classifier: needs a CropClassifier on this trunk with {outputs} outputs")
    model = (classifier or CropClassifier(trunk, list(trunk.out_channels), outputs)).to(device)
    model.train()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused_adam_ok(params))
    mean, std = mean.reshape(3, 1, 1).cpu(), std.reshape(3, 1, 1).cpu()
    planned = iterations if iterations > 0 else None
    budget = minutes * 60.0
    start = clock()
    recent: collections.deque = collections.deque(maxlen=ACCURACY_WINDOW)   # (hits, crops) of the last steps
    iteration = 0
    loss_value = accuracy = float("nan")
    while (iteration < planned) if planned is not None else (clock() - start < budget):
        # Cosine over the planned steps, or over the time budget (crop sizes, and so step times,
        # differ from step to step: a step count fitted from the first steps would miss the budget).
        progress = iteration / planned if planned is not None else (clock() - start) / budget
        g = torch.Generator().manual_seed(seed * 1_000_039 + iteration)
        batch, labels = crop_batch(g, (image_of, box_of, label_of), load_image, batch_size, crop_sizes,
                                   data, share, augment)
        batch = ((batch - mean) / std).to(device)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device)

        factor = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if iteration < WARMUP_ITERS:
            factor *= 0.01 + 0.99 * iteration / WARMUP_ITERS
        for group in optimizer.param_groups:
            group["lr"] = lr * factor
        with autocast():
            logits = model(batch)
        loss = sum(F.cross_entropy(o.float(), labels) for o in logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach()) / len(logits)
        recent.append((int((logits[-1].detach().argmax(1) == labels).sum()), len(labels)))
        accuracy = sum(h for h, _ in recent) / sum(n for _, n in recent)
        iteration += 1
        if iteration % 50 == 0:
            log(f"  warm-up {iteration}{f'/{planned}' if planned else ''}: loss {loss_value:.3f}, "
                f"accuracy {accuracy:.3f}")
    seconds = clock() - start
    log(f"backbone warm-up on box crops done: {len(image_of)} boxes, {iteration} steps of {batch_size} crops in "
        f"{seconds / 60:.1f} min ({iteration * batch_size / seconds:.0f} crops/s), accuracy {accuracy:.3f}")
    return {"iterations": iteration, "seconds": seconds, "crops_per_s": iteration * batch_size / seconds,
            "loss": loss_value, "accuracy": accuracy, "boxes": len(image_of), "background": share,
            "chance_loss": _chance_loss(label_of, data.num_classes, share)}


def _chance_loss(labels: Tensor, num_classes: int, share: float) -> float:
    """Cross-entropy of predicting the label frequencies alone (what a classifier that learnt nothing
    scores): the entropy of the crops' label distribution (0 with one class and no background)."""
    freq = torch.bincount(labels, minlength=num_classes).double()
    p = torch.cat([freq / freq.sum() * (1 - share), torch.tensor([share], dtype=torch.float64)])
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def warm_up_trunk(model: nn.Module, dataset, data: DetectionData, cfg: Config, device: torch.device,
                  dtype: torch.dtype | None, rank: int = 0, log: Callable[[str], None] = lambda _: None,
                  clock: Callable[[], float] = time.perf_counter) -> dict:
    """The warm-up of a detector's trunk (``model.trunk``) as ``cfg.train.pretrain_*`` sets it, before
    detection. Rank 0 trains; with several processes the others wait and receive the trunk's weights
    and statistics from it. ``dataset`` is the training dataset (its images are reused when it caches
    them); ``clock`` is the run's time source. Returns :func:`pretrain_backbone`'s statistics
    (``seconds`` rank 0's on every process)."""
    trunk, t = model.trunk, cfg.train
    stats: dict = {}
    if rank == 0:
        images = dataset if isinstance(dataset, DetectionDataset) else DetectionDataset(
            data, cache_images=cfg.data.cache_images)
        # images.data: the records its pixels match (shrunk with them under data.shrink_at_load)
        stats = pretrain_backbone(trunk, images.load_uint8, images.data, model.preprocessor.mean,
                                  model.preprocessor.std, t.pretrain_lr or cfg.solver.lr, cfg.solver.weight_decay,
                                  t.pretrain_batch_size,
                                  crop_sizes=tuple(t.pretrain_crop_sizes), minutes=t.pretrain_minutes,
                                  iterations=t.pretrain_iters, seed=t.seed, channels_last=t.channels_last,
                                  background=t.pretrain_background, augment=CropAugment.of(cfg),
                                  device=device, autocast=lambda: autocast_context(device, dtype), log=log,
                                  clock=clock)
    broadcast_state(trunk)
    return {**stats, "seconds": float(value_of_rank0(stats.get("seconds", 0.0), device, torch.float64))}

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
(deep supervision: C3 and C4 learn the classes too, not only C5). AdamW at ``train.pretrain_lr``
(or ``solver.lr``), 20 warm-up steps, cosine to zero over the planned iterations. Every random
draw comes from a generator seeded by (seed, iteration), so a fixed ``iterations`` run is
repeatable.
"""

from __future__ import annotations

import collections
import contextlib
import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config
from ..data import DetectionDataset
from ..data.records import DetectionData
from ..device import autocast as autocast_context
from ..device import fused_adam_ok
from .distributed import broadcast_state, value_of_rank0

__all__ = ["box_items", "crop_boxes", "pretrain_backbone", "warm_up_trunk", "CROP_SIZES"]

CROP_SIZES = (32, 48, 64, 96)
CONTEXT = (1.1, 1.6)
SHIFT = 0.1
WARMUP_ITERS = 20
ACCURACY_WINDOW = 10


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


class _CropClassifier(nn.Module):
    def __init__(self, trunk: nn.Module, channels: list[int], num_classes: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(nn.Linear(c, num_classes) for c in channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        return [head(f.mean((2, 3))) for head, f in zip(self.heads, self.trunk(x))]


def _crop_batch(g: torch.Generator, items: tuple[Tensor, Tensor, Tensor], load_image: Callable[[int], Tensor],
                batch_size: int, crop_sizes: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """One step's crops in [0, 1] and their labels, every draw from ``g``; ``items`` is :func:`box_items`'."""
    image_of, box_of, label_of = items
    picks = torch.randint(len(image_of), (batch_size,), generator=g)
    size = crop_sizes[int(torch.randint(len(crop_sizes), (), generator=g))]
    context = torch.empty(batch_size).uniform_(*CONTEXT, generator=g)
    shift = torch.empty(batch_size, 2).uniform_(-SHIFT, SHIFT, generator=g)
    picks = picks[torch.argsort(image_of[picks], stable=True)]      # the crops of one image together
    ids, counts = torch.unique_consecutive(image_of[picks], return_counts=True)
    counts = counts.tolist()
    crops = [crop_boxes(load_image(i).float().div_(255.0), box_of[p], size, c, d)
             for i, p, c, d in zip(ids.tolist(), picks.split(counts), context.split(counts), shift.split(counts))]
    return torch.cat(crops), label_of[picks]


def pretrain_backbone(trunk: nn.Module, load_image: Callable[[int], Tensor], data: DetectionData,
                      mean: Tensor, std: Tensor, lr: float, weight_decay: float, batch_size: int = 64,
                      crop_sizes: tuple[int, ...] = CROP_SIZES, minutes: float = 0.0, iterations: int = 0,
                      seed: int = 0, channels_last: bool = True,
                      device: torch.device | None = None, autocast: Callable = contextlib.nullcontext,
                      log: Callable[[str], None] = lambda _: None,
                      clock: Callable[[], float] = time.perf_counter) -> dict:
    """Train ``trunk`` (a module returning a list of feature maps with ``out_channels``) to classify
    the crops of ``data``'s boxes, for ``iterations`` steps or, when 0, for ``minutes``.
    ``load_image(i)`` gives image i as uint8 [3, H, W]; ``autocast()`` is the precision context;
    ``clock`` (seconds) times the run and the ``minutes`` budget.
    Returns statistics of the run: iterations, seconds, crops_per_s, loss (last step), accuracy (C5
    classifier, last ``ACCURACY_WINDOW`` steps, on the training crops), boxes."""
    image_of, box_of, label_of = box_items(data)
    if not len(image_of):
        raise ValueError("train.pretrain_minutes: the training set has no (non-crowd) boxes to classify")
    if iterations <= 0 and minutes <= 0:
        raise ValueError("pretrain_backbone needs iterations > 0 or minutes > 0")
    device = device or torch.device("cpu")
    model = _CropClassifier(trunk, list(trunk.out_channels), data.num_classes).to(device)
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
        batch, labels = _crop_batch(g, (image_of, box_of, label_of), load_image, batch_size, crop_sizes)
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
            "loss": loss_value, "accuracy": accuracy, "boxes": len(image_of)}


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
        stats = pretrain_backbone(trunk, images.load_uint8, data, model.preprocessor.mean, model.preprocessor.std,
                                  t.pretrain_lr or cfg.solver.lr, cfg.solver.weight_decay, t.pretrain_batch_size,
                                  crop_sizes=tuple(t.pretrain_crop_sizes), minutes=t.pretrain_minutes,
                                  iterations=t.pretrain_iters, seed=t.seed, channels_last=t.channels_last,
                                  device=device, autocast=lambda: autocast_context(device, dtype), log=log,
                                  clock=clock)
    broadcast_state(trunk)
    return {**stats, "seconds": float(value_of_rank0(stats.get("seconds", 0.0), device, torch.float64))}

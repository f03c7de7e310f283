"""The skeleton every densedet detector shares (detectron2's ``DenseDetector`` idea).

One call, top to bottom in :meth:`DenseDetector.forward`::

    images ─ preprocessor (normalise, resize, pad) ─ features ─ head_outputs ─┬─ losses      (train)
                                                        anchors (per level) ──┴─ decode ─ select_detections
                                                                                  ─ original pixels (eval)

A family (RetinaNet, RefineDet) implements only what differs: :meth:`features`,
:meth:`head_outputs`, :meth:`anchors`, :meth:`match`, :meth:`losses` and :meth:`decode`, with the
same names and shapes in both. Target checks, the forward flow and the batched selection (class-wise
NMS, then the best ``detections_per_img`` of each image) are written here once; TTA, export,
analysis, benchmarks and the predictor use nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from ..boxes import batched_nms, box_iou, clip_boxes
from ..matching import PaddedTargets
from .preprocess import ImagePreprocessor

__all__ = ["DenseDetector", "Candidates", "AnchorSpec", "select_detections", "best_per_image", "vote_boxes",
           "top_count",
           "check_targets"]


class Candidates(NamedTuple):
    """Decoded detections before NMS, dense over the batch.

    ``boxes [B, N, 4]`` (x1, y1, x2, y2, resized-image pixels), ``scores [B, N]``,
    ``labels [B, N]`` (int64, 0..K-1) and ``keep [B, N]`` (bool: above the score threshold).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    keep: Tensor


@dataclass
class AnchorSpec:
    """What the anchor analysis needs to know of a model's anchors and matching.

    ``sizes[l]``: the anchor sizes of level l; ``aspect_ratios`` (h / w); ``strides[l]``;
    anchors at IoU >= ``fg_iou_thresh`` are foreground, below ``bg_iou_thresh`` background.
    """

    sizes: list[list[float]]
    aspect_ratios: list[float]
    strides: list[int]
    fg_iou_thresh: float
    bg_iou_thresh: float


def check_targets(targets: list[dict], num_images: int, num_classes: int) -> None:
    """Reject targets the loss cannot use, naming the image: readers repair or drop them earlier."""
    if len(targets) != num_images:
        raise ValueError(f"got {num_images} images but {len(targets)} targets")
    for i, t in enumerate(targets):
        boxes, labels = t.get("boxes"), t.get("labels")
        name = f"target {i}" + (f" (image_id {t['image_id']})" if t.get("image_id") is not None else "")
        if boxes is None or labels is None:
            raise ValueError(f"{name}: needs 'boxes' and 'labels'")
        if boxes.dim() != 2 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:1]:
            raise ValueError(f"{name}: boxes must have shape [N, 4] and labels [N], got "
                             f"{tuple(boxes.shape)} and {tuple(labels.shape)}")
        if boxes.numel() == 0:
            continue
        if not torch.isfinite(boxes).all():
            raise ValueError(f"{name}: boxes contain NaN or inf")
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(f"{name}: labels must lie in [0, {num_classes}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        bad = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if bad.any():
            j = int(bad.nonzero()[0])
            raise ValueError(f"{name}: box {j} {boxes[j].tolist()} has zero or negative width/height")


def top_count(limit: int, available: int | Tensor) -> int | Tensor:
    """``min(limit, available)``: how many a top-k over ``available`` entries takes. While tracing,
    ``available`` is a graph value (a traced shape), and so is the result: an exported graph whose
    input size is dynamic takes as many as each input offers, where a Python ``min`` would bake in
    the count of the example it was traced with."""
    if torch.jit.is_tracing() and isinstance(available, Tensor):
        return torch.clamp(available, max=limit)
    return min(limit, int(available))


def best_per_image(image_idx: Tensor, candidate_idx: Tensor, scores: Tensor, limit: int
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """The ``limit`` best NMS survivors of each image, as dense tensors.

    Survivor j is candidate ``candidate_idx[j]`` of image ``image_idx[j]``; ``scores [B, N]``.
    Returns ``(scores, candidate indices, valid)``, each ``[B, min(limit, N)]``, by decreasing
    score, ties by lower candidate index (a stable sort here; ONNX ``TopK``'s rule in an export).
    Written once for the eager path and the exported graph.
    """
    kept = torch.full_like(scores, -1.0)
    kept[image_idx, candidate_idx] = scores[image_idx, candidate_idx]
    limit = top_count(limit, scores.shape[1])
    if torch.jit.is_tracing():      # exports as ONNX TopK, which orders ties by lower index
        top_scores, top_idx = kept.topk(limit, dim=1)
    else:                           # torch.topk does not promise an order for ties; a stable sort does
        top_scores, top_idx = torch.sort(kept, dim=1, descending=True, stable=True)
        top_scores, top_idx = top_scores[:, :limit], top_idx[:, :limit]
    return top_scores, top_idx, top_scores >= 0


def vote_boxes(kept: Tensor, kept_labels: Tensor, candidates: Candidates, iou_threshold: float) -> Tensor:
    """Box voting (Gidaris & Komodakis 2015): each kept detection's box becomes the score-weighted
    mean of the candidates of its image and class that overlap it at IoU ``>= iou_threshold``
    (itself among them). Its score and label stay; NMS chose which detections are kept.

    Args:
        kept: ``[B, D, 4]`` the detections NMS kept; kept_labels ``[B, D]``.
        candidates: the :class:`Candidates` NMS chose from (``[B, N]`` each).

    Returns:
        ``[B, D, 4]``; a box no candidate votes for (a padded slot) stays as it is.
    """
    boxes, scores, labels, keep = candidates
    votes = (box_iou(kept, boxes) >= iou_threshold) & (kept_labels.unsqueeze(-1) == labels.unsqueeze(1))
    weights = torch.where(votes & keep.unsqueeze(1), scores.float().unsqueeze(1), torch.zeros((), device=scores.device))
    total = weights.sum(-1, keepdim=True)
    mean = torch.bmm(weights, boxes.float()) / total.clamp(min=1e-12)
    return torch.where(total > 0, mean, kept.float()).to(kept.dtype)


def select_detections(candidates: Candidates, image_sizes: Tensor, nms_thresh: float,
                      detections_per_img: int, box_vote: bool = False) -> list[dict[str, Tensor]]:
    """Class-wise NMS within each image, the ``detections_per_img`` best per image, clipped.

    One NMS call covers the whole batch: the group id (image, label) keeps images and classes
    apart. Boxes are clipped to ``image_sizes [B, 2]`` (h, w) after NMS, as Caffe's
    ``DetectionOutput`` does; a family that clips before NMS (torchvision's RetinaNet) does it in
    its :meth:`~DenseDetector.decode`, and clipping twice changes nothing. ``box_vote``: each kept
    box is replaced by its :func:`vote_boxes` mean before clipping.

    Returns per image ``{"boxes": [D, 4], "scores": [D], "labels": [D]}`` by decreasing score.
    """
    boxes, scores, labels, keep = candidates
    image_idx, candidate_idx = keep.nonzero(as_tuple=True)
    num_labels = int(labels.max()) + 1 if labels.numel() else 1
    group = image_idx * num_labels + labels[image_idx, candidate_idx]
    survivors = batched_nms(boxes[image_idx, candidate_idx], scores[image_idx, candidate_idx], group, nms_thresh)
    top_scores, top_idx, valid = best_per_image(image_idx[survivors], candidate_idx[survivors], scores,
                                                detections_per_img)
    top_boxes = boxes.gather(1, top_idx.unsqueeze(-1).expand(-1, -1, 4))
    top_labels = labels.gather(1, top_idx)
    if box_vote:
        top_boxes = vote_boxes(top_boxes, top_labels, candidates, nms_thresh)
    top_boxes = clip_boxes(top_boxes, image_sizes.unsqueeze(1))
    counts = valid.sum(1).tolist()
    return [{"boxes": b[:n], "scores": s[:n], "labels": c[:n]}
            for b, s, c, n in zip(top_boxes, top_scores, top_labels, counts)]


class DenseDetector(nn.Module):
    """A one-stage detector: the flow shared by every family.

    ``model(images)`` in eval mode: ``images`` a list of ``[3, H, W]`` float tensors in [0, 1];
    returns per image ``{"boxes": [D, 4] (x1, y1, x2, y2, original pixels), "scores": [D],
    "labels": [D] (0..K-1)}``. In train mode ``model(images, targets)`` with ``{"boxes": [N, 4],
    "labels": [N]}`` targets in the same pixels returns the family's scalar losses by name.
    ``min_size`` sets this batch's shorter side in training (multi-scale, one size per batch).

    Args:
        num_classes: foreground classes K.
        preprocessor: normalise, resize and pad (:class:`ImagePreprocessor`).
        score_thresh, topk_candidates, nms_thresh, detections_per_img: inference settings
            (the family's :meth:`decode` applies the first two, :func:`select_detections` the others).
    """

    arch: str = ""
    #: Detection on a CPU with gradients off runs the network in channels_last, the layout oneDNN's
    #: convolutions are fastest in (``benchmarks/vs_torchvision.py``); the weights may stay NCHW.
    inference_channels_last: bool = True
    #: Each detection NMS keeps takes the score-weighted mean box of the candidates of its class
    #: overlapping it at IoU >= ``nms_thresh``, itself among them (:func:`vote_boxes`). Off in both
    #: papers; ``model.box_vote`` sets it (:func:`~densedet.models.build_from_config`).
    box_vote: bool = False

    def __init__(self, num_classes: int, preprocessor: ImagePreprocessor, *, score_thresh: float,
                 topk_candidates: int, nms_thresh: float, detections_per_img: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes counts foreground classes and must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.preprocessor = preprocessor
        self.score_thresh, self.topk_candidates = score_thresh, topk_candidates
        self.nms_thresh, self.detections_per_img = nms_thresh, detections_per_img

    # -- what a family implements ------------------------------------------------------------
    def features(self, batch: Tensor) -> list[Tensor]:
        """Normalised, padded ``batch [B, 3, Hp, Wp]`` → feature maps ``[B, C_l, H_l, W_l]``, finest first."""
        raise NotImplementedError

    def head_outputs(self, features: list[Tensor]) -> dict[str, Tensor]:
        """Feature maps → named dense predictions, each ``[B, ΣHWA, C]`` in (level, y, x, anchor) order."""
        raise NotImplementedError

    def anchors(self, image_size: tuple[int, int], feature_sizes: Sequence[tuple[int, int]],
                device: torch.device | str = "cpu") -> list[Tensor]:
        """Per level ``[H_l·W_l·A, 4]`` anchors (pixels of the padded batch), in the heads' order."""
        raise NotImplementedError

    def match(self, anchors: Tensor, targets: PaddedTargets) -> Tensor:
        """``[B, A]`` matched GT index per anchor: ``>= 0`` foreground, -1 background, -2 ignored."""
        raise NotImplementedError

    def losses(self, outputs: dict[str, Tensor], anchors: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        """The family's scalar losses for a batch (targets in batch pixels)."""
        raise NotImplementedError

    def decode(self, outputs: dict[str, Tensor], anchors: list[Tensor], image_sizes: Tensor) -> Candidates:
        """Scores, score threshold, top-k and box decoding; ``image_sizes [B, 2]`` (h, w). Export-friendly:
        fixed shapes, no data-dependent Python."""
        raise NotImplementedError

    def anchor_spec(self) -> AnchorSpec:
        raise NotImplementedError

    @property
    def trunk(self) -> nn.Module:
        """The classification trunk inside the backbone (what an ImageNet checkpoint or the box-crop
        warm-up trains)."""
        raise NotImplementedError

    # -- the shared flow ---------------------------------------------------------------------
    def forward(self, images: list[Tensor], targets: list[dict] | None = None, *, min_size: int | None = None):
        if self.training and targets is None:
            raise ValueError("in training mode the model needs targets; call model.eval() for detection")
        if targets is not None:
            check_targets(targets, len(images), self.num_classes)
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        batch, image_sizes, targets = self.preprocessor(images, targets, min_size=min_size)
        outputs, anchors = self.dense_forward(batch)
        if self.training:
            return self.losses(outputs, anchors, targets)
        detections = self.postprocess(outputs, anchors, image_sizes)
        return self.preprocessor.postprocess(detections, image_sizes, original_sizes)

    def dense_forward(self, batch: Tensor) -> tuple[dict[str, Tensor], list[Tensor]]:
        """``batch [B, 3, Hp, Wp]`` → (:meth:`head_outputs`, per-level :meth:`anchors`)."""
        features = self.features(self.network_layout(batch))
        sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
        return self.head_outputs(features), self.anchors(tuple(batch.shape[-2:]), sizes, batch.device)

    def network_layout(self, batch: Tensor) -> Tensor:
        """``batch`` in the memory layout the network runs fastest in: channels_last for detection on
        a CPU with gradients off (:attr:`inference_channels_last`), as it is otherwise."""
        if (self.inference_channels_last and not self.training and not torch.is_grad_enabled()
                and batch.device.type == "cpu" and not torch.jit.is_tracing()):
            return batch.contiguous(memory_format=torch.channels_last)
        return batch

    def grid_sizes(self, image_size: tuple[int, int]) -> list[tuple[int, int]]:
        """Feature map sizes for a padded input, without running the network: every stride-2
        step ("same" padding) gives ``ceil(side / 2)``, so level l has ``ceil(side / stride_l)`` cells."""
        return [(math.ceil(image_size[0] / s), math.ceil(image_size[1] / s)) for s in self.anchor_spec().strides]

    def anchors_for_size(self, image_size: tuple[int, int], device: torch.device | str = "cpu") -> Tensor:
        """``[A, 4]``: every anchor of a padded input of ``image_size``, levels concatenated."""
        return torch.cat(self.anchors(tuple(image_size), self.grid_sizes(image_size), device))

    @torch.no_grad()
    def postprocess(self, outputs: dict[str, Tensor], anchors: list[Tensor],
                    image_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """:meth:`decode` then :func:`select_detections`; boxes in resized-image pixels."""
        sizes = torch.tensor(image_sizes, dtype=torch.float32, device=anchors[0].device).view(-1, 2)
        return select_detections(self.decode(outputs, anchors, sizes), sizes, self.nms_thresh,
                                 self.detections_per_img, self.box_vote)

    def freeze_trunk(self, stages: int) -> None:
        """Freeze the trunk's first ``stages`` stages (stem = 1), as ``model.frozen_stages`` does."""
        self.trunk.freeze(stages)
        self.train(self.training)

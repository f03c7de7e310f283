"""RefineDet (Zhang et al., "Single-Shot Refinement Neural Network for Object Detection", CVPR 2018).

One training step, top to bottom (:meth:`RefineDet.forward`):

1. ``ImagePreprocessor`` warps every image to ``image_size`` x ``image_size`` (320 or 512) and
   normalises it.
2. The backbone (fc-reduced VGG16 or ResNet-101 + res6) gives four source levels at strides
   8, 16, 32, 64.
3. The **ARM** (anchor refinement module) predicts, per anchor, background/object logits and box
   offsets from the sources.
4. The **TCB** (transfer connection block) turns the sources into a top-down pyramid P3–P6 of
   256 channels; the **ODM** (object detection module) predicts ``num_classes + 1`` logits
   (index 0 = background) and box offsets from it.
5. Anchors (:func:`refinedet_anchors`): one size 4x the stride, ratios 1, 2, 1/2, not clipped.
6. ARM matches the raw anchors; ODM matches the ARM-refined anchors (:func:`match_anchors`, the
   Caffe greedy bipartite + per-prediction rule), and regresses relative to them.
7. Each module's loss (:func:`multibox_loss`): softmax CE over positives and 3:1 hard-mined
   negatives + smooth-L1 on positives, divided by its own positive count. Easy negatives of the ARM
   (object probability < 0.01) are dropped from the ODM's negative pool.

Where the authors' Caffe code and the popular PyTorch port (luuuyi/RefineDet.PyTorch) disagree we
follow Caffe (SPEC "RefineDet", reference/refinedet.md §12): the ODM filter removes easy
*negatives* (not positives), anchors are not clipped, the bipartite step is the global greedy one,
negatives are capped per image, and the normaliser is ``max(1, positives)``.

Anchor / prediction order everywhere: (level, y, x, anchor), anchors of a location in the order
ratio 1, 2, 1/2 (Caffe ``PriorBox`` with ``flip``, permute NCHW → NHWC then flatten).
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.resnet import Bottleneck, ResNet, make_norm
from ..backbones.vgg import VGG16, load_torchvision_vgg16
from ..boxes import BoxCoder, batched_nms, box_iou, clip_boxes
from ..matching import pad_targets
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocessor

__all__ = [
    "RefineDet",
    "RefineDetHead",
    "TransferConnectionBlock",
    "RefineDetResNet",
    "refinedet_anchors",
    "match_anchors",
    "hard_negative_mining",
    "multibox_loss",
    "refinedet320_vgg16",
    "refinedet512_vgg16",
    "refinedet320_r101",
    "refinedet512_r101",
    "build_refinedet",
]

# Input sides must be multiples of the coarsest stride: the TCB's 2x2/s2 deconvolution exactly
# doubles P_{l+1}, which must then equal the size of source l.
SIZE_MULTIPLE = 64

logger = logging.getLogger(__name__)


def check_input_size(height: int, width: int) -> None:
    """Raise ``ValueError`` unless both sides are positive multiples of 64."""
    if height <= 0 or width <= 0 or height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
        raise ValueError(
            f"RefineDet input size {height}x{width} (HxW) is not a multiple of {SIZE_MULTIPLE}: the "
            f"TCB upsamples each level 2x, so every side must be divisible by the stride-64 level "
            f"(e.g. 320 or 512)"
        )


# ----------------------------------------------------------------------------------------------
# Anchors
# ----------------------------------------------------------------------------------------------


def refinedet_anchors(
    image_size: tuple[int, int],
    strides: Sequence[int] = (8, 16, 32, 64),
    sizes: Sequence[float] = (32, 64, 128, 256),
    aspect_ratios: Sequence[float] = (1.0, 2.0, 0.5),
    device: torch.device | str | None = None,
) -> Tensor:
    """RefineDet's anchors for an input of ``image_size = (H, W)`` pixels.

    At level l (stride s_l, size a_l) the anchor of cell (y, x) with ratio r = w / h is centred at
    ``((x + 0.5) s_l, (y + 0.5) s_l)`` with ``w = a_l sqrt(r)``, ``h = a_l / sqrt(r)`` (Caffe
    ``PriorBox``: ``min_size`` 4x the stride, ``aspect_ratio: 2, flip: true``, offset 0.5). Anchors
    are not clipped to the image (Caffe ``clip: false``; the PyTorch port's clipping changes the
    256 px anchors at 320).

    Returns:
        ``[A, 4]`` float32 (x1, y1, x2, y2) in pixels, ``A = sum_l (H/s_l)(W/s_l) len(aspect_ratios)``
        (6,375 at 320x320, 16,320 at 512x512), ordered (level, y, x, ratio).
    """
    height, width = int(image_size[0]), int(image_size[1])
    per_level = []
    for stride, size in zip(strides, sizes):
        # float64 so sqrt(2)-sized anchors round once, at the final cast
        ratios = torch.tensor(aspect_ratios, dtype=torch.float64, device=device)
        half_w = 0.5 * size * ratios.sqrt()
        half_h = 0.5 * size / ratios.sqrt()
        cx = (torch.arange(width // stride, dtype=torch.float64, device=device) + 0.5) * stride
        cy = (torch.arange(height // stride, dtype=torch.float64, device=device) + 0.5) * stride
        cy, cx = torch.meshgrid(cy, cx, indexing="ij")  # [h, w]: row-major = (y, x) order
        cx = cx[..., None]
        cy = cy[..., None]
        boxes = torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)  # [h, w, r, 4]
        per_level.append(boxes.reshape(-1, 4))
    return torch.cat(per_level).to(torch.float32)


# ----------------------------------------------------------------------------------------------
# Network parts
# ----------------------------------------------------------------------------------------------


def _caffe_xavier_(module: nn.Module) -> None:
    """Caffe's ``xavier`` filler (U(±sqrt(3 / fan_in)), bias 0), used for RefineDet's new layers."""
    nn.init.kaiming_uniform_(module.weight, nonlinearity="linear")
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def _gaussian_(module: nn.Module, std: float = 0.01) -> None:
    """N(0, std) with bias 0: Caffe's filler for the BatchNorm-ed layers of the ResNet model."""
    nn.init.normal_(module.weight, std=std)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def _conv_norm(cin: int, cout: int, norm: str) -> list[nn.Module]:
    """3x3 conv (+ norm): with a norm the conv has no bias (Caffe ``ConvBNLayer``)."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none")
    return [conv] if norm == "none" else [conv, make_norm(norm, cout)]


class TransferConnectionBlock(nn.Module):
    """The TCB: a top-down pyramid P3–P6 from RefineDet's four source levels.

    Top level:   ``P6 = ReLU(conv(ReLU(conv(ReLU(conv(src6))))))``.
    Other levels: ``Pl = ReLU(conv(ReLU(conv(ReLU(conv(src_l))) + deconv(P_{l+1}))))`` with a 2x2
    stride-2 deconvolution (the released code; the paper's figure draws 4x4). All convs are
    3x3, ``channels`` wide (256). ``norm="bn"`` inserts BatchNorm after every conv and the deconv,
    as the Caffe ResNet-101 model does; the VGG16 model has none.

    ``forward(features: list of [B, C_l, H_l, W_l]) -> list of [B, channels, H_l, W_l]``.
    """

    def __init__(self, in_channels: Sequence[int], channels: int = 256, norm: str = "none") -> None:
        super().__init__()
        # lateral: ReLU(conv) -> conv, no final ReLU (it comes after the sum with the upsampled level)
        self.lateral = nn.ModuleList(
            nn.Sequential(*_conv_norm(c, channels, norm), nn.ReLU(inplace=True), *_conv_norm(channels, channels, norm))
            for c in in_channels
        )
        self.upsample = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(channels, channels, 2, stride=2, bias=norm == "none"),
                          *([] if norm == "none" else [make_norm(norm, channels)]))
            for _ in in_channels[:-1]
        )
        self.output = nn.ModuleList(
            nn.Sequential(*_conv_norm(channels, channels, norm), nn.ReLU(inplace=True)) for _ in in_channels
        )
        init = _caffe_xavier_ if norm == "none" else _gaussian_
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                init(m)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        top = len(features) - 1
        p = self.output[top](F.relu(self.lateral[top](features[top])))
        pyramid = [p]
        for level in range(top - 1, -1, -1):
            p = self.output[level](F.relu(self.lateral[level](features[level]) + self.upsample[level](p)))
            pyramid.append(p)
        return pyramid[::-1]


def _bottleneck_block(cin: int, planes: int, norm: str) -> Bottleneck:
    """Caffe ``ResBody(planes, planes, 4 planes, stride 1, use_branch1=True)`` with N(0, 0.01) init."""
    downsample = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, bias=False), make_norm(norm, planes * 4))
    block = Bottleneck(cin, planes, 1, downsample, lambda c: make_norm(norm, c))
    for m in block.modules():
        if isinstance(m, nn.Conv2d):
            _gaussian_(m)
    return block


class RefineDetHead(nn.Module):
    """Per-level prediction convs shared by the ARM and the ODM.

    Each level has its own 3x3 box conv (``num_anchors * 4``) and class conv
    (``num_anchors * num_outputs``): the levels differ in channels, so nothing is shared across
    levels (as in Caffe). With ``block_planes`` a bottleneck residual block (``4 * block_planes``
    output channels) precedes both convs of a level: the Caffe ResNet-101 model's
    ``inter_layer_depth`` (256 → 1024 channels), not used for VGG16.

    ``forward(features) -> (deltas [B, sum_l H_l W_l A, 4], logits [B, sum_l H_l W_l A, num_outputs])``
    in (level, y, x, anchor) order.
    """

    def __init__(self, in_channels: Sequence[int], num_anchors: int, num_outputs: int,
                 block_planes: int | None = None, norm: str = "bn") -> None:
        super().__init__()
        self.num_anchors = num_anchors
        self.num_outputs = num_outputs
        if block_planes is None:
            self.blocks = nn.ModuleList(nn.Identity() for _ in in_channels)
            head_in = list(in_channels)
        else:
            self.blocks = nn.ModuleList(_bottleneck_block(c, block_planes, norm) for c in in_channels)
            head_in = [block_planes * Bottleneck.expansion] * len(in_channels)
        self.box_convs = nn.ModuleList(nn.Conv2d(c, num_anchors * 4, 3, padding=1) for c in head_in)
        self.cls_convs = nn.ModuleList(nn.Conv2d(c, num_anchors * num_outputs, 3, padding=1) for c in head_in)
        for conv in [*self.box_convs, *self.cls_convs]:
            _caffe_xavier_(conv)

    @staticmethod
    def _flatten(x: Tensor, k: int) -> Tensor:
        # [B, A*k, H, W] -> [B, H, W, A*k] -> [B, H*W*A, k]: channel a*k + j is anchor a, value j
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, k)

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        deltas, logits = [], []
        for x, block, box_conv, cls_conv in zip(features, self.blocks, self.box_convs, self.cls_convs):
            x = block(x)
            deltas.append(self._flatten(box_conv(x), 4))
            logits.append(self._flatten(cls_conv(x), self.num_outputs))
        return torch.cat(deltas, dim=1), torch.cat(logits, dim=1)


class RefineDetResNet(nn.Module):
    """ResNet res3–res5 plus RefineDet's extra ``res6``: one bottleneck 128-128-512, stride 2.

    res6 follows Caffe ``ResBody('6', 128, 128, 512, stride=2, use_branch1=True)`` with BatchNorm
    and N(0, 0.01) weights (paper: "zero-mean Gaussian with standard deviation 0.01 for the extra
    residual block"); torchvision-style blocks put the stride on the 3x3 conv rather than Caffe's 1x1.

    ``forward(x) -> [res3 (s8), res4 (s16), res5 (s32), res6 (s64)]``.
    """

    def __init__(self, depth: int = 101, norm: str = "frozen_bn", frozen_stages: int = 2,
                 extra_norm: str = "bn") -> None:
        super().__init__()
        self.body = ResNet(depth, norm=norm, frozen_stages=frozen_stages, out_features=("res3", "res4", "res5"))
        cin = self.body.out_channels[-1]
        downsample = nn.Sequential(nn.Conv2d(cin, 512, 1, stride=2, bias=False), make_norm(extra_norm, 512))
        self.res6 = Bottleneck(cin, 128, 2, downsample, lambda c: make_norm(extra_norm, c))
        for m in self.res6.modules():
            if isinstance(m, nn.Conv2d):
                _gaussian_(m)
        self.out_channels = [*self.body.out_channels, 512]
        self.strides = [8, 16, 32, 64]

    def forward(self, x: Tensor) -> list[Tensor]:
        features = self.body(x)
        return [*features, self.res6(features[-1])]


# ----------------------------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------------------------


def _sortable_key(iou: Tensor) -> Tensor:
    """int64 keys ordering ``iou [..., A]`` by value, ties by *lower* anchor index first.

    Non-negative float32 bit patterns read as int32 sort like the values (masked rows hold -1,
    whose keys are negative and never usable); the low
    32 bits hold ``A - 1 - index``. So ``topk``/``argmax`` on the keys reproduce Caffe's scan order
    (first anchor wins a tie) exactly, which a float tie-break epsilon could not guarantee.
    """
    num_anchors = iou.shape[-1]
    bits = iou.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    index = torch.arange(num_anchors, device=iou.device, dtype=torch.int64)
    return (bits << 32) | (num_anchors - 1 - index)


def _top_candidates(iou: Tensor, k: int) -> Tensor:
    """The ``k`` best anchors of every GT as :func:`_sortable_key` keys, ``[B, G, k]``, descending.

    A float ``topk`` breaks ties arbitrarily; that matters only for a GT whose usable IoU
    (> 1e-6) ties across the k-th place (e.g. a large box containing many equal anchors). Those
    rows alone are redone with keys over all anchors.
    """
    num_anchors = iou.shape[-1]
    values, index = iou.topk(min(k + 1, num_anchors), dim=-1)
    bits = values[..., :k].to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    keys = (bits << 32) | (num_anchors - 1 - index[..., :k])
    if k < num_anchors:
        tied = (values[..., k] == values[..., k - 1]) & (values[..., k] > 1e-6)  # [B, G]
        if bool(tied.any()):
            keys[tied] = _sortable_key(iou[tied]).topk(k, dim=-1).values
    # within the k, equal IoUs must still be ordered by anchor index
    return keys.sort(dim=-1, descending=True).values


def match_anchors(anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor, iou_threshold: float = 0.5) -> Tensor:
    """Caffe ``MatchBBox`` (``match_type: PER_PREDICTION``), batched over images.

    1. Bipartite step: repeatedly take the globally largest IoU among (free anchor, unmatched GT)
       pairs with IoU > 1e-6 and match them, until every GT has an anchor. So two GTs wanting the
       same anchor are resolved in favour of the larger IoU and the other takes its best *free*
       anchor; ties go to the lower anchor index, then the lower GT index (Caffe's scan order).
    2. Per-prediction step: every other anchor takes the GT of largest IoU if that IoU is
       ``>= iou_threshold`` (ties: lower GT index).

    Vectorised over the batch: a GT can only be pushed off its first ``G - 1`` choices, so its best
    free anchor is always among its top ``G`` anchors; the greedy loop then runs ``<= G`` steps on
    a ``[B, G, G]`` candidate tensor, each step matching one pair in every image.

    Args:
        anchors: ``[A, 4]`` shared, or ``[B, A, 4]`` per image (the ODM's refined anchors).
        gt_boxes: ``[B, G, 4]`` padded ground truth.
        gt_valid: ``[B, G]`` bool, False for padding (and crowd boxes).

    Returns:
        ``[B, A]`` long: the matched GT index, or -1 for a negative anchor.
    """
    bsz, num_gt = gt_valid.shape
    if anchors.dim() == 2:
        anchors = anchors.unsqueeze(0).expand(bsz, -1, -1)
    num_anchors = anchors.shape[1]
    device = anchors.device
    matched = torch.full((bsz, num_anchors), -1, dtype=torch.int64, device=device)
    if num_gt == 0 or num_anchors == 0:
        return matched
    iou = box_iou(gt_boxes, anchors)  # [B, G, A] fp32
    iou[~gt_valid] = -1.0  # padding and crowd rows: never usable (the keys of negatives sort last)

    k = min(num_gt, num_anchors)
    cand_key = _top_candidates(iou, k)                           # [B, G, k], distinct keys
    cand_anchor = num_anchors - 1 - (cand_key & 0xFFFFFFFF)      # [B, G, k]
    cand_iou = (cand_key >> 32).to(torch.int32).view(torch.float32)
    taken = torch.zeros((bsz, num_anchors), dtype=torch.bool, device=device)
    gt_free = gt_valid.clone()
    batch_index = torch.arange(bsz, device=device)
    for _ in range(num_gt):
        anchor_free = ~taken.gather(1, cand_anchor.flatten(1)).view_as(cand_anchor)
        usable = gt_free.unsqueeze(-1) & anchor_free & (cand_iou > 1e-6)
        key = torch.where(usable, cand_key, torch.full_like(cand_key, -1)).flatten(1)  # [B, G*k]
        best = key.argmax(dim=1)  # equal keys only for the same anchor: first = lower GT index
        found = key.gather(1, best[:, None])[:, 0] >= 0
        if not bool(found.any()):
            break
        b = batch_index[found]
        gt = best[found] // k
        anchor = cand_anchor.flatten(1)[b, best[found]]
        matched[b, anchor] = gt
        taken[b, anchor] = True
        gt_free[b, gt] = False

    best_gt = iou.argmax(dim=1)  # [B, A], first maximum = lower GT index
    best_iou = iou.gather(1, best_gt[:, None, :])[:, 0]
    per_prediction = ~taken & (best_iou >= iou_threshold)
    return torch.where(per_prediction, best_gt, matched)


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------


def hard_negative_mining(background_loss: Tensor, positive: Tensor, negative_pool: Tensor,
                         neg_pos_ratio: float = 3.0) -> Tensor:
    """SSD's ``MAX_NEGATIVE`` mining, per image, vectorised over the batch.

    Image i keeps the ``min(floor(neg_pos_ratio * P_i), |pool_i|)`` pool anchors with the largest
    background loss, ``P_i`` its positive count (an image without positives contributes none).

    Args:
        background_loss: ``[B, A]`` CE of each anchor against the background class.
        positive: ``[B, A]`` bool.
        negative_pool: ``[B, A]`` bool, anchors allowed to be negatives.

    Returns:
        ``[B, A]`` bool, the mined negatives.
    """
    num_pos = positive.sum(dim=1)
    num_neg = torch.minimum((num_pos.float() * neg_pos_ratio).floor().long(), negative_pool.sum(dim=1))
    loss = torch.where(negative_pool, background_loss.detach(), torch.full_like(background_loss, -math.inf))
    order = loss.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return negative_pool & (rank < num_neg[:, None])


def multibox_loss(pred_deltas: Tensor, pred_logits: Tensor, target_labels: Tensor, target_deltas: Tensor,
                  negative_pool: Tensor, neg_pos_ratio: float = 3.0) -> tuple[Tensor, Tensor]:
    """SSD MultiBox loss of one RefineDet module (Caffe ``MultiBoxLoss``, ``normalization: VALID``).

    ``cls = sum_{pos ∪ mined neg} CE`` and ``box = sum_pos smooth_L1_{beta=1}(pred - target)``, each
    divided by ``max(1, number of positives in the batch)``; negatives are mined 3:1 per image from
    ``negative_pool`` by their CE against background. Computed in fp32. The positives are counted
    in this process only: Caffe normalises per GPU and averages the GPUs' gradients, which is what
    DistributedDataParallel does with this loss.

    Args:
        pred_deltas: ``[B, A, 4]``.
        pred_logits: ``[B, A, C]``, index 0 = background.
        target_labels: ``[B, A]`` long, 0 = negative, ``c >= 1`` = positive of class c.
        target_deltas: ``[P, 4]`` encoded targets of the positives, in ``target_labels > 0`` order.
        negative_pool: ``[B, A]`` bool, negatives allowed to be mined.

    Returns:
        ``(cls_loss, box_loss)`` scalars.
    """
    positive = target_labels > 0
    log_probs = F.log_softmax(pred_logits.float(), dim=-1)
    negative = hard_negative_mining(-log_probs[..., 0], positive, negative_pool & ~positive, neg_pos_ratio)
    selected = positive | negative
    ce = -log_probs.gather(-1, target_labels.unsqueeze(-1)).squeeze(-1)
    normalizer = positive.sum().clamp(min=1).float()
    cls_loss = ce[selected].sum() / normalizer
    box_loss = F.smooth_l1_loss(pred_deltas[positive].float(), target_deltas.float(), beta=1.0,
                                reduction="sum") / normalizer
    return cls_loss, box_loss


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class RefineDet(nn.Module):
    """RefineDet detector (torchvision detection API).

    ``model(images)`` in eval mode, images a list of ``[3, H_i, W_i]`` float tensors in [0, 1],
    returns per image ``{"boxes": [N, 4] (x1, y1, x2, y2, original pixels), "scores": [N],
    "labels": [N] in 0..num_classes-1}``. ``model(images, targets)`` in train mode, targets
    ``{"boxes": [N, 4], "labels": [N]}`` in the same pixels, returns the scalar losses
    ``arm_cls``, ``arm_box``, ``odm_cls``, ``odm_box`` (the total is their sum, weight 1 each).

    Args:
        num_classes: foreground classes K. The ODM predicts K + 1 logits, **index 0 = background**;
            output labels are the foreground index (ODM index - 1).
        backbone: module returning four levels at strides 8, 16, 32, 64 with an ``out_channels``
            list; default the fc-reduced :class:`~densedet.backbones.vgg.VGG16`.
        tcb, arm_head, odm_head: default :class:`TransferConnectionBlock` (``tcb_channels``) and
            :class:`RefineDetHead` s (3 anchors; 2 and K + 1 outputs).
        preprocessor: default warps to ``image_size`` with ImageNet mean/std.
        image_size: input side (int, or (H, W)); multiples of 64.
        anchor_sizes, anchor_strides, aspect_ratios: see :func:`refinedet_anchors`.
        box_coder: default centre-size with variances (0.1, 0.1, 0.2, 0.2).
        iou_threshold: per-prediction matching threshold (0.5).
        neg_pos_ratio: hard negative mining ratio (3).
        objectness_threshold: ARM object probability below which an anchor is an easy negative:
            removed from the ODM's negative pool in training, its scores zeroed at test (0.01, i.e.
            the paper's theta = 0.99 on the background probability).
        score_thresh, topk_candidates, nms_thresh, detections_per_img: inference (Caffe
            ``DetectionOutput``: 0.01, 1000 per class, 0.45, 500; the paper's text: 400 / 200).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: nn.Module | None = None,
        tcb: nn.Module | None = None,
        arm_head: nn.Module | None = None,
        odm_head: nn.Module | None = None,
        preprocessor: ImagePreprocessor | None = None,
        image_size: int | tuple[int, int] = 320,
        tcb_channels: int = 256,
        anchor_sizes: Sequence[float] = (32, 64, 128, 256),
        anchor_strides: Sequence[int] = (8, 16, 32, 64),
        aspect_ratios: Sequence[float] = (1.0, 2.0, 0.5),
        box_coder: BoxCoder | None = None,
        iou_threshold: float = 0.5,
        neg_pos_ratio: float = 3.0,
        objectness_threshold: float = 0.01,
        score_thresh: float = 0.01,
        topk_candidates: int = 1000,
        nms_thresh: float = 0.45,
        detections_per_img: int = 500,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes counts foreground classes and must be >= 1, got {num_classes}")
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        check_input_size(*size)
        if len(anchor_sizes) != len(anchor_strides):
            raise ValueError(f"anchor_sizes {tuple(anchor_sizes)} and anchor_strides {tuple(anchor_strides)} "
                             "must have one entry per level")
        self.num_classes = num_classes
        self.image_size = size
        self.backbone = backbone if backbone is not None else VGG16()
        in_channels = list(self.backbone.out_channels)
        num_anchors = len(aspect_ratios)
        self.arm_head = arm_head if arm_head is not None else RefineDetHead(in_channels, num_anchors, 2)
        self.tcb = tcb if tcb is not None else TransferConnectionBlock(in_channels, tcb_channels)
        self.odm_head = odm_head if odm_head is not None else RefineDetHead(
            [tcb_channels] * len(in_channels), num_anchors, num_classes + 1)
        self.preprocessor = preprocessor if preprocessor is not None else ImagePreprocessor(
            mean=IMAGENET_MEAN, std=IMAGENET_STD, size_divisible=SIZE_MULTIPLE, fixed_size=size)
        self.anchor_sizes = tuple(float(s) for s in anchor_sizes)
        self.anchor_strides = tuple(int(s) for s in anchor_strides)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        self.box_coder = box_coder if box_coder is not None else BoxCoder.from_variances((0.1, 0.1, 0.2, 0.2))
        self.iou_threshold = iou_threshold
        self.neg_pos_ratio = neg_pos_ratio
        self.objectness_threshold = objectness_threshold
        self.score_thresh = score_thresh
        self.topk_candidates = topk_candidates
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img

    # -- anchors and heads ------------------------------------------------------------------------

    def anchors(self, image_size: tuple[int, int], device: torch.device | str | None = None) -> Tensor:
        """``[A, 4]`` anchors (pixels, (level, y, x, ratio) order) for a batch of size ``(H, W)``."""
        check_input_size(int(image_size[0]), int(image_size[1]))
        return refinedet_anchors(image_size, self.anchor_strides, self.anchor_sizes, self.aspect_ratios, device)

    def head_outputs(self, batch: Tensor) -> dict[str, Tensor]:
        """Run backbone, ARM, TCB and ODM on a normalised batch ``[B, 3, H, W]``.

        Returns ``arm_deltas [B, A, 4]``, ``arm_logits [B, A, 2]`` (index 1 = object),
        ``odm_deltas [B, A, 4]``, ``odm_logits [B, A, K + 1]`` (index 0 = background).
        """
        check_input_size(int(batch.shape[-2]), int(batch.shape[-1]))
        sources = self.backbone(batch)
        arm_deltas, arm_logits = self.arm_head(sources)
        odm_deltas, odm_logits = self.odm_head(self.tcb(sources))
        return {"arm_deltas": arm_deltas, "arm_logits": arm_logits,
                "odm_deltas": odm_deltas, "odm_logits": odm_logits}

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        """Losses (train mode, with targets) or detections (eval mode); see the class docstring."""
        if self.training and targets is None:
            raise ValueError("RefineDet in training mode needs targets; call model.eval() for detection")
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        if targets is not None:
            _check_targets(targets, len(images), self.num_classes)
        batch, image_sizes, targets = self.preprocessor(images, targets)
        outputs = self.head_outputs(batch)
        anchors = self.anchors(tuple(batch.shape[-2:]), device=batch.device)
        if self.training:
            return self.compute_loss(outputs, anchors, targets)
        detections = self.postprocess_detections(outputs, anchors, image_sizes)
        return self.preprocessor.postprocess(detections, image_sizes, original_sizes)

    # -- training ---------------------------------------------------------------------------------

    def compute_loss(self, outputs: dict[str, Tensor], anchors: Tensor, targets: list[dict]) -> dict[str, Tensor]:
        """The four RefineDet losses for a batch.

        Args:
            outputs: :meth:`head_outputs` of the batch.
            anchors: ``[A, 4]``.
            targets: per image ``{"boxes": [N_i, 4], "labels": [N_i]}`` in batch pixels; crowd
                boxes (``iscrowd``) are never matched.
        """
        device = anchors.device
        gt = pad_targets(targets, device)
        arm_deltas, arm_logits = outputs["arm_deltas"], outputs["arm_logits"]
        bsz = arm_deltas.shape[0]

        # ARM: class-agnostic, raw anchors.
        arm_matched = match_anchors(anchors, gt.boxes, gt.valid, self.iou_threshold)
        arm_positive = arm_matched >= 0
        arm_labels = arm_positive.long()
        batch_anchors = anchors.unsqueeze(0).expand(bsz, -1, -1)
        arm_targets = self.box_coder.encode(_gather_boxes(gt.boxes, arm_matched)[arm_positive],
                                            batch_anchors[arm_positive])
        arm_cls, arm_box = multibox_loss(arm_deltas, arm_logits, arm_labels, arm_targets,
                                         ~arm_positive, self.neg_pos_ratio)

        # ODM: matched against and regressed from the ARM-refined anchors; no gradient into the ARM.
        refined = self.box_coder.decode(arm_deltas.detach(), anchors)  # [B, A, 4]
        odm_matched = match_anchors(refined, gt.boxes, gt.valid, self.iou_threshold)
        odm_positive = odm_matched >= 0
        odm_labels = torch.where(odm_positive, gt.labels.gather(1, odm_matched.clamp(min=0)) + 1,
                                 torch.zeros_like(odm_matched))
        odm_targets = self.box_coder.encode(_gather_boxes(gt.boxes, odm_matched)[odm_positive],
                                            refined[odm_positive])
        # Negative anchor filtering (Caffe MineHardExamples with objectness_score): easy ARM
        # negatives cannot be mined as ODM negatives; ODM positives always count.
        arm_object = F.softmax(arm_logits.detach().float(), dim=-1)[..., 1]
        odm_pool = ~odm_positive & (arm_object >= self.objectness_threshold)
        odm_cls, odm_box = multibox_loss(outputs["odm_deltas"], outputs["odm_logits"], odm_labels, odm_targets,
                                         odm_pool, self.neg_pos_ratio)
        return {"arm_cls": arm_cls, "arm_box": arm_box, "odm_cls": odm_cls, "odm_box": odm_box}

    # -- inference --------------------------------------------------------------------------------

    def decode_predictions(self, outputs: dict[str, Tensor], anchors: Tensor) -> tuple[Tensor, Tensor]:
        """Two-step cascaded decoding and ARM filtering, on batched tensors (export friendly).

        The ARM offsets refine the anchors, the ODM offsets are applied to the refined anchors
        (Caffe ``CasRegDecodeBBoxesAll``, no clipping); class probabilities are the ODM softmax
        without the background column, zeroed where the ARM object probability is below
        ``objectness_threshold``.

        Returns:
            ``boxes [B, A, 4]`` (fp32, batch pixels) and ``scores [B, A, K]``.
        """
        refined = self.box_coder.decode(outputs["arm_deltas"], anchors)
        boxes = self.box_coder.decode(outputs["odm_deltas"], refined)
        arm_object = F.softmax(outputs["arm_logits"].float(), dim=-1)[..., 1:2]
        scores = F.softmax(outputs["odm_logits"].float(), dim=-1)[..., 1:]
        scores = torch.where(arm_object >= self.objectness_threshold, scores, torch.zeros_like(scores))
        return boxes, scores

    def select_detections(self, boxes: Tensor, scores: Tensor, image_sizes: Sequence[tuple[int, int]]) -> list[dict]:
        """Per class: score > ``score_thresh``, best ``topk_candidates``, NMS at ``nms_thresh``; then the
        best ``detections_per_img`` per image, clipped to the image.

        Vectorised over the batch: one class-wise NMS over all (image, class) groups at once.

        Args:
            boxes: ``[B, A, 4]``; scores: ``[B, A, K]``; image_sizes: ``(h, w)`` per image.

        Returns:
            per image ``{"boxes": [N, 4], "scores": [N], "labels": [N]}`` by decreasing score.
        """
        bsz, num_anchors, num_classes = scores.shape
        k = min(self.topk_candidates, num_anchors)
        top_scores, top_anchor = scores.transpose(1, 2).topk(k, dim=2)  # [B, K, k]
        img, cls, slot = torch.nonzero(top_scores > self.score_thresh, as_tuple=True)
        cand_scores = top_scores[img, cls, slot]
        cand_boxes = boxes[img, top_anchor[img, cls, slot]]
        keep = batched_nms(cand_boxes, cand_scores, img * num_classes + cls, self.nms_thresh)
        # keep is by decreasing score; a stable sort by image keeps that order inside each image
        keep = keep[torch.sort(img[keep], stable=True).indices]
        counts = torch.bincount(img[keep], minlength=bsz)
        starts = counts.cumsum(0) - counts
        rank = torch.arange(keep.numel(), device=keep.device) - starts[img[keep]]
        keep = keep[rank < self.detections_per_img]
        sizes = torch.tensor(image_sizes, dtype=torch.float32, device=boxes.device).view(-1, 2)
        out_boxes = clip_boxes(cand_boxes[keep], sizes[img[keep]])
        per_image = torch.bincount(img[keep], minlength=bsz).tolist()
        return [
            {"boxes": b, "scores": s, "labels": c}
            for b, s, c in zip(out_boxes.split(per_image), cand_scores[keep].split(per_image),
                               cls[keep].split(per_image))
        ]

    def postprocess_detections(self, outputs: dict[str, Tensor], anchors: Tensor,
                               image_sizes: Sequence[tuple[int, int]]) -> list[dict]:
        """:meth:`decode_predictions` then :meth:`select_detections` (boxes in batch pixels)."""
        boxes, scores = self.decode_predictions(outputs, anchors)
        return self.select_detections(boxes, scores, image_sizes)


def _gather_boxes(gt_boxes: Tensor, matched: Tensor) -> Tensor:
    """``gt_boxes [B, G, 4]`` indexed by ``matched [B, A]`` (negatives read GT 0) → ``[B, A, 4]``."""
    index = matched.clamp(min=0).unsqueeze(-1).expand(-1, -1, 4)
    return gt_boxes.gather(1, index)


def _check_targets(targets: list[dict], num_images: int, num_classes: int) -> None:
    """Reject targets that would silently corrupt the loss (wrong shapes, labels, empty boxes)."""
    if len(targets) != num_images:
        raise ValueError(f"got {num_images} images but {len(targets)} targets")
    for i, t in enumerate(targets):
        boxes, labels = t.get("boxes"), t.get("labels")
        if boxes is None or labels is None:
            raise ValueError(f"target {i}: needs 'boxes' and 'labels'")
        if boxes.dim() != 2 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:1]:
            raise ValueError(f"target {i}: boxes must be [N, 4] and labels [N], got "
                             f"{tuple(boxes.shape)} and {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"target {i}: labels must lie in [0, {num_classes}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        if boxes.numel() and not bool(((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()):
            raise ValueError(f"target {i}: boxes need x2 > x1 and y2 > y1 (a degenerate box cannot be encoded)")


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------


def _refinedet_vgg16(num_classes: int, default_size: int, backbone_weights: str | None, **overrides) -> RefineDet:
    backbone = overrides.pop("backbone", None)
    if backbone is None:
        backbone = VGG16()
        if backbone_weights is not None:
            load_torchvision_vgg16(backbone, backbone_weights)
    return RefineDet(num_classes, backbone=backbone, image_size=overrides.pop("image_size", default_size), **overrides)


def refinedet320_vgg16(num_classes: int, backbone_weights: str | None = None, **overrides) -> RefineDet:
    """RefineDet320 with the fc-reduced VGG16 (VOC07 mAP 80.0, COCO AP 29.4 in the paper).

    ``backbone_weights``: a torchvision ImageNet VGG16 state-dict file, converted by
    :func:`~densedet.backbones.vgg.convert_torchvision_vgg16`. ``overrides`` go to :class:`RefineDet`.
    """
    return _refinedet_vgg16(num_classes, 320, backbone_weights, **overrides)


def refinedet512_vgg16(num_classes: int, backbone_weights: str | None = None, **overrides) -> RefineDet:
    """RefineDet512 with VGG16 (same pixel anchor sizes as 320; VOC07 81.8, COCO 33.0)."""
    return _refinedet_vgg16(num_classes, 512, backbone_weights, **overrides)


def _refinedet_r101(num_classes: int, default_size: int, backbone_weights: str | None, backbone_norm: str,
                    frozen_stages: int, **overrides) -> RefineDet:
    backbone = overrides.pop("backbone", None)
    if backbone is None:
        backbone = RefineDetResNet(101, norm=backbone_norm, frozen_stages=frozen_stages)
        if backbone_weights is not None:
            from ..backbones.resnet import load_torchvision_resnet

            load_torchvision_resnet(backbone.body, backbone_weights)
    in_channels = list(backbone.out_channels)
    channels = overrides.pop("tcb_channels", 256)
    # The Caffe ResNet-101 model (reference §1.2): BatchNorm in the TCB, and a bottleneck block
    # (-> 1024 channels) before every ARM and ODM prediction conv.
    num_anchors = len(overrides.get("aspect_ratios", (1.0, 2.0, 0.5)))
    if "tcb" not in overrides:
        overrides["tcb"] = TransferConnectionBlock(in_channels, channels, norm="bn")
    if "arm_head" not in overrides:
        overrides["arm_head"] = RefineDetHead(in_channels, num_anchors, 2, block_planes=256, norm="bn")
    if "odm_head" not in overrides:
        overrides["odm_head"] = RefineDetHead([channels] * len(in_channels), num_anchors, num_classes + 1,
                                              block_planes=256, norm="bn")
    return RefineDet(num_classes, backbone=backbone, tcb_channels=channels,
                     image_size=overrides.pop("image_size", default_size), **overrides)


def refinedet320_r101(num_classes: int, backbone_weights: str | None = None, backbone_norm: str = "frozen_bn",
                      frozen_stages: int = 2, **overrides) -> RefineDet:
    """RefineDet320 with ResNet-101 + res6 (COCO AP 32.0).

    ``backbone_weights``: a torchvision ImageNet ResNet-101 state-dict file. ``backbone_norm``:
    ``frozen_bn`` for pretrained weights, ``bn``/``gn`` from scratch (SPEC). The TCB and the
    head blocks use trainable BatchNorm as in Caffe.
    """
    return _refinedet_r101(num_classes, 320, backbone_weights, backbone_norm, frozen_stages, **overrides)


def refinedet512_r101(num_classes: int, backbone_weights: str | None = None, backbone_norm: str = "frozen_bn",
                      frozen_stages: int = 2, **overrides) -> RefineDet:
    """RefineDet512 with ResNet-101 + res6 (COCO AP 36.4)."""
    return _refinedet_r101(num_classes, 512, backbone_weights, backbone_norm, frozen_stages, **overrides)


def build_refinedet(cfg) -> RefineDet:
    """Build a :class:`RefineDet` from a :class:`~densedet.config.ModelConfig` (``arch: refinedet``).

    Fields used: ``backbone`` (``vgg16`` or ``resnet{18,34,50,101}``), ``num_classes``,
    ``pretrained_backbone``, ``norm`` / ``frozen_stages`` (ResNet only; ``auto`` as RetinaNet),
    ``refinedet_size``, ``fpn_channels`` (TCB width), ``anchor_sizes`` (None: 32, 64, 128, 256),
    ``aspect_ratios``, ``bbox_reg_weights`` (RefineDet's variances are weights 10, 10, 5, 5),
    ``fg_iou_thresh``, ``negpos_ratio``, ``arm_filter_thresh``, ``score_thresh``,
    ``topk_candidates``, ``nms_thresh``, ``detections_per_img``, ``fixed_size`` (None: the square
    ``refinedet_size``), ``image_mean``, ``image_std``, ``size_divisible``.
    """
    size = int(cfg.refinedet_size)
    fixed = tuple(cfg.fixed_size) if cfg.fixed_size else (size, size)
    for field, value, caffe in (("aspect_ratios", cfg.aspect_ratios, [1.0, 2.0, 0.5]),
                                ("bbox_reg_weights", cfg.bbox_reg_weights, [10.0, 10.0, 5.0, 5.0])):
        if [float(v) for v in value] != caffe:
            # the ModelConfig defaults are RetinaNet's; a RefineDet config should set these
            logger.warning("RefineDet model.%s = %s differs from the Caffe model's %s", field, list(value), caffe)
    preprocessor = ImagePreprocessor(fixed[0], max(fixed), cfg.image_mean, cfg.image_std,
                                     max(SIZE_MULTIPLE, int(cfg.size_divisible)), fixed)
    options = dict(
        image_size=fixed, tcb_channels=cfg.fpn_channels, preprocessor=preprocessor,
        anchor_sizes=tuple(cfg.anchor_sizes) if cfg.anchor_sizes else (32.0, 64.0, 128.0, 256.0),
        aspect_ratios=tuple(cfg.aspect_ratios), box_coder=BoxCoder(tuple(cfg.bbox_reg_weights)),
        iou_threshold=cfg.fg_iou_thresh, neg_pos_ratio=float(cfg.negpos_ratio),
        objectness_threshold=cfg.arm_filter_thresh, score_thresh=cfg.score_thresh,
        topk_candidates=cfg.topk_candidates, nms_thresh=cfg.nms_thresh, detections_per_img=cfg.detections_per_img)
    if cfg.backbone == "vgg16":
        return _refinedet_vgg16(cfg.num_classes, size, cfg.pretrained_backbone, **options)
    if cfg.backbone.startswith("resnet") and cfg.backbone[len("resnet"):].isdigit():
        from .retinanet import resolve_norm

        norm, frozen = resolve_norm(cfg)
        backbone = RefineDetResNet(int(cfg.backbone[len("resnet"):]), norm=norm, frozen_stages=frozen)
        if cfg.pretrained_backbone:
            from ..backbones.resnet import load_torchvision_resnet

            load_torchvision_resnet(backbone.body, cfg.pretrained_backbone)
        return _refinedet_r101(cfg.num_classes, size, None, norm, frozen, backbone=backbone, **options)
    raise ValueError(f"model.backbone: RefineDet supports vgg16 and resnet18/34/50/101, got {cfg.backbone!r}")

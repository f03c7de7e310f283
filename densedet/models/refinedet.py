"""RefineDet (Zhang et al., "Single-Shot Refinement Neural Network for Object Detection", CVPR 2018).

One training step, top to bottom (:meth:`RefineDet.forward`):

1. ``ImagePreprocessor`` warps every image to ``image_size`` x ``image_size`` (320 or 512) and
   normalises it (with ``model.scale_as``: resizes it by one factor and pads it to that size).
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

from ..anchors import AnchorGenerator
from ..backbones.folding import ConvNorm
from ..backbones.resnet import Bottleneck, ResNet, load_torchvision_resnet, make_norm
from ..backbones.vgg import VGG16, load_torchvision_vgg16
from ..boxes import BoxCoder
from ..config import ConfigError
from ..matching import PaddedTargets, match_anchors, pad_targets
from .base import AnchorSpec, Candidates, DenseDetector, top_count
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocessor
from .retinanet import resolve_norm

__all__ = [
    "RefineDet",
    "RefineDetHead",
    "TransferConnectionBlock",
    "RefineDetResNet",
    "refinedet_anchor_generator",
    "refinedet_anchors",
    "hard_negative_mining",
    "multibox_loss",
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


def refinedet_anchor_generator(
    strides: Sequence[int] = (8, 16, 32, 64),
    sizes: Sequence[float] = (32, 64, 128, 256),
    aspect_ratios: Sequence[float] = (1.0, 2.0, 0.5),
) -> AnchorGenerator:
    """RefineDet's anchors as an :class:`~densedet.anchors.AnchorGenerator`.

    At level l (stride s_l, size a_l) the anchor of cell (y, x) with ratio r = w / h is centred at
    ``((x + 0.5) s_l, (y + 0.5) s_l)`` with ``w = a_l sqrt(r)``, ``h = a_l / sqrt(r)`` (Caffe
    ``PriorBox``: ``min_size`` 4x the stride, ``aspect_ratio: 2, flip: true``, offset 0.5). Anchors
    are not clipped to the image (Caffe ``clip: false``; the PyTorch port's clipping changes the
    256 px anchors at 320). The generator takes ratios as h / w, hence the inversion; the order of
    a cell's anchors stays Caffe's (1, 2, 1/2 as w / h).
    """
    return AnchorGenerator([[float(a)] for a in sizes], [1.0 / float(r) for r in aspect_ratios], strides,
                           offset=0.5)


def refinedet_anchors(image_size: tuple[int, int], strides: Sequence[int] = (8, 16, 32, 64),
                      sizes: Sequence[float] = (32, 64, 128, 256),
                      aspect_ratios: Sequence[float] = (1.0, 2.0, 0.5)) -> Tensor:
    """``[A, 4]`` anchors for an ``image_size = (H, W)`` input, ordered (level, y, x, ratio):
    6,375 at 320x320, 16,320 at 512x512 (see :func:`refinedet_anchor_generator`)."""
    height, width = int(image_size[0]), int(image_size[1])
    return torch.cat(refinedet_anchor_generator(strides, sizes, aspect_ratios)(
        (height, width), [(height // s, width // s) for s in strides]))


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
    downsample = ConvNorm(nn.Conv2d(cin, planes * 4, 1, bias=False), make_norm(norm, planes * 4))
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

    ``forward(features) -> (logits [B, sum_l H_l W_l A, num_outputs], deltas [B, sum_l H_l W_l A, 4])``
    in (level, y, x, anchor) order (RetinaNet's head returns the same pair).
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
        return torch.cat(logits, dim=1), torch.cat(deltas, dim=1)


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
        downsample = ConvNorm(nn.Conv2d(cin, 512, 1, stride=2, bias=False), make_norm(extra_norm, 512))
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


class RefineDet(DenseDetector):
    """RefineDet detector. The flow is :class:`~densedet.models.base.DenseDetector`'s; the losses
    are ``arm_cls``, ``arm_box``, ``odm_cls``, ``odm_box`` (the total is their sum, weight 1 each).

    Args:
        num_classes: foreground classes K. The ODM predicts K + 1 logits, **index 0 = background**;
            output labels are the foreground index (ODM index - 1).
        backbone: module returning four levels at strides 8, 16, 32, 64 with an ``out_channels``
            list; default the fc-reduced :class:`~densedet.backbones.vgg.VGG16`.
        tcb, arm_head, odm_head: default :class:`TransferConnectionBlock` (``tcb_channels``) and
            :class:`RefineDetHead` s (3 anchors; 2 and K + 1 outputs).
        preprocessor: default warps to ``image_size`` with ImageNet mean/std.
        image_size: input side (int, or (H, W)); multiples of 64.
        anchor_sizes, anchor_strides, aspect_ratios: see :func:`refinedet_anchor_generator`.
        box_coder: default centre-size with variances (0.1, 0.1, 0.2, 0.2).
        iou_threshold: per-prediction matching threshold (0.5).
        neg_pos_ratio: hard negative mining ratio (3).
        objectness_threshold: ARM object probability below which an anchor is an easy negative:
            removed from the ODM's negative pool in training, its scores zeroed at test (0.01, i.e.
            the paper's theta = 0.99 on the background probability).
        score_thresh, topk_candidates, nms_thresh, detections_per_img: inference (Caffe
            ``DetectionOutput``: 0.01, 1000 per class, 0.45, 500; the paper's text: 400 / 200).
    """

    arch = "refinedet"

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
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        check_input_size(*size)
        if len(anchor_sizes) != len(anchor_strides):
            raise ValueError(f"anchor_sizes {tuple(anchor_sizes)} and anchor_strides {tuple(anchor_strides)} "
                             "must have one entry per level")
        super().__init__(num_classes, preprocessor if preprocessor is not None else ImagePreprocessor(
                             mean=IMAGENET_MEAN, std=IMAGENET_STD, size_divisible=SIZE_MULTIPLE, fixed_size=size),
                         score_thresh=score_thresh, topk_candidates=topk_candidates, nms_thresh=nms_thresh,
                         detections_per_img=detections_per_img)
        self.backbone = backbone if backbone is not None else VGG16()
        in_channels = list(self.backbone.out_channels)
        num_anchors = len(aspect_ratios)
        self.arm_head = arm_head if arm_head is not None else RefineDetHead(in_channels, num_anchors, 2)
        self.tcb = tcb if tcb is not None else TransferConnectionBlock(in_channels, tcb_channels)
        self.odm_head = odm_head if odm_head is not None else RefineDetHead(
            [tcb_channels] * len(in_channels), num_anchors, num_classes + 1)
        self.image_size = size
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)     # w / h, Caffe's convention
        self.anchor_generator = refinedet_anchor_generator(anchor_strides, anchor_sizes, aspect_ratios)
        self.box_coder = box_coder if box_coder is not None else BoxCoder.from_variances((0.1, 0.1, 0.2, 0.2))
        self.iou_threshold = iou_threshold
        self.neg_pos_ratio = neg_pos_ratio
        self.objectness_threshold = objectness_threshold

    # -- the parts --------------------------------------------------------------------------------

    def features(self, batch: Tensor) -> list[Tensor]:
        """The backbone's four source levels (strides 8, 16, 32, 64)."""
        check_input_size(int(batch.shape[-2]), int(batch.shape[-1]))
        return self.backbone(batch)

    def head_outputs(self, features: list[Tensor]) -> dict[str, Tensor]:
        """ARM on the sources, TCB, ODM on the pyramid.

        Returns ``arm_logits [B, A, 2]`` (index 1 = object), ``arm_deltas [B, A, 4]``,
        ``odm_logits [B, A, K + 1]`` (index 0 = background), ``odm_deltas [B, A, 4]``.
        """
        arm_logits, arm_deltas = self.arm_head(features)
        odm_logits, odm_deltas = self.odm_head(self.tcb(features))
        return {"arm_logits": arm_logits, "arm_deltas": arm_deltas,
                "odm_logits": odm_logits, "odm_deltas": odm_deltas}

    def anchors(self, image_size: tuple[int, int], feature_sizes, device: torch.device | str = "cpu") -> list[Tensor]:
        """Per level ``[H_l W_l 3, 4]`` (pixels, (y, x, ratio) order) for a batch of size ``(H, W)``."""
        check_input_size(int(image_size[0]), int(image_size[1]))
        return self.anchor_generator(image_size, feature_sizes, device)

    def match(self, anchors: Tensor, targets: PaddedTargets) -> Tensor:
        return match_anchors(anchors, targets.boxes, targets.valid, self.iou_threshold)

    def anchor_spec(self) -> AnchorSpec:
        gen = self.anchor_generator
        return AnchorSpec(gen.sizes, gen.aspect_ratios[0], gen.strides, self.iou_threshold, self.iou_threshold)

    @property
    def trunk(self) -> nn.Module:
        return getattr(self.backbone, "body", self.backbone)

    # -- training ---------------------------------------------------------------------------------

    def losses(self, outputs: dict[str, Tensor], anchors: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        """The four RefineDet losses for a batch.

        Args:
            outputs: :meth:`head_outputs` of the batch.
            anchors: per level ``[A_l, 4]``.
            targets: per image ``{"boxes": [N_i, 4], "labels": [N_i]}`` in batch pixels; crowd
                boxes (``iscrowd``) are never matched.
        """
        anchors = torch.cat(anchors)
        gt = pad_targets(targets, anchors.device)
        arm_deltas, arm_logits = outputs["arm_deltas"], outputs["arm_logits"]
        bsz = arm_deltas.shape[0]

        # ARM: class-agnostic, raw anchors.
        arm_matched = self.match(anchors, gt)
        arm_positive = arm_matched >= 0
        arm_labels = arm_positive.long()
        batch_anchors = anchors.unsqueeze(0).expand(bsz, -1, -1)
        arm_targets = self.box_coder.encode(_gather_boxes(gt.boxes, arm_matched)[arm_positive],
                                            batch_anchors[arm_positive])
        arm_cls, arm_box = multibox_loss(arm_deltas, arm_logits, arm_labels, arm_targets,
                                         ~arm_positive, self.neg_pos_ratio)

        # ODM: matched against and regressed from the ARM-refined anchors; no gradient into the ARM.
        refined = self.box_coder.decode(arm_deltas.detach(), anchors)  # [B, A, 4]
        odm_matched = self.match(refined, gt)
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

    def decode_scores(self, outputs: dict[str, Tensor], anchors: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Two-step cascaded decoding and ARM filtering.

        The ARM offsets refine the anchors, the ODM offsets are applied to the refined anchors
        (Caffe ``CasRegDecodeBBoxesAll``, no clipping); class probabilities are the ODM softmax
        without the background column, zeroed where the ARM object probability is below
        ``objectness_threshold``.

        Returns:
            ``boxes [B, A, 4]`` (fp32, batch pixels) and ``scores [B, A, K]``.
        """
        refined = self.box_coder.decode(outputs["arm_deltas"], torch.cat(anchors))
        boxes = self.box_coder.decode(outputs["odm_deltas"], refined)
        arm_object = F.softmax(outputs["arm_logits"].float(), dim=-1)[..., 1:2]
        scores = F.softmax(outputs["odm_logits"].float(), dim=-1)[..., 1:]
        scores = torch.where(arm_object >= self.objectness_threshold, scores, torch.zeros_like(scores))
        return boxes, scores

    def decode(self, outputs: dict[str, Tensor], anchors: list[Tensor], image_sizes: Tensor) -> Candidates:
        """:meth:`decode_scores`, then :meth:`candidates_per_class`."""
        return self.candidates_per_class(*self.decode_scores(outputs, anchors))

    def candidates_per_class(self, boxes: Tensor, scores: Tensor) -> Candidates:
        """Per class (Caffe ``DetectionOutput``): the best ``topk_candidates`` anchors, those above
        ``score_thresh``. Boxes stay unclipped until after NMS, as in Caffe.

        ``boxes [B, A, 4]``, ``scores [B, A, K]`` → candidates ordered (class, rank), ``[B, K·k]``.
        """
        bsz, num_anchors, num_classes = scores.shape
        top_scores, top_anchor = scores.transpose(1, 2).topk(top_count(self.topk_candidates, num_anchors), dim=2)
        top_anchor = top_anchor.flatten(1)                                               # [B, K·k]
        labels = torch.arange(num_classes, device=scores.device).repeat_interleave(top_scores.shape[2])
        top_scores = top_scores.flatten(1)
        return Candidates(boxes.gather(1, top_anchor.unsqueeze(-1).expand(-1, -1, 4)), top_scores,
                          labels.expand(bsz, -1), top_scores > self.score_thresh)


def _gather_boxes(gt_boxes: Tensor, matched: Tensor) -> Tensor:
    """``gt_boxes [B, G, 4]`` indexed by ``matched [B, A]`` (negatives read GT 0) → ``[B, A, 4]``."""
    index = matched.clamp(min=0).unsqueeze(-1).expand(-1, -1, 4)
    return gt_boxes.gather(1, index)


# ----------------------------------------------------------------------------------------------
# Building from a config
# ----------------------------------------------------------------------------------------------

CAFFE_ASPECT_RATIOS = [1.0, 2.0, 0.5]
CAFFE_BBOX_REG_WEIGHTS = [10.0, 10.0, 5.0, 5.0]      # the variances 0.1, 0.1, 0.2, 0.2 as weights


def _resnet_parts(cfg, num_anchors: int) -> dict[str, nn.Module]:
    """ResNet + res6 with the Caffe ResNet-101 model's extras (reference §1.2): BatchNorm in the TCB,
    and a bottleneck block (→ 1024 channels) before every ARM and ODM prediction conv."""
    norm, frozen = resolve_norm(cfg)
    backbone = RefineDetResNet(int(cfg.backbone[len("resnet"):]), norm=norm, frozen_stages=frozen)
    if cfg.pretrained_backbone:
        load_torchvision_resnet(backbone.body, cfg.pretrained_backbone)
    in_channels = list(backbone.out_channels)
    width = cfg.refinedet.tcb_channels
    return {"backbone": backbone,
            "tcb": TransferConnectionBlock(in_channels, width, norm="bn"),
            "arm_head": RefineDetHead(in_channels, num_anchors, 2, block_planes=256, norm="bn"),
            "odm_head": RefineDetHead([width] * len(in_channels), num_anchors, cfg.num_classes + 1,
                                      block_planes=256, norm="bn")}


def build_refinedet(cfg) -> RefineDet:
    """Build a :class:`RefineDet` from a :class:`~densedet.config.ModelConfig` (``arch: refinedet``).

    Fields used: ``backbone`` (``vgg16`` or ``resnet{18,34,50,101}``), ``num_classes``,
    ``pretrained_backbone``, ``norm`` / ``frozen_stages`` (ResNet only; ``auto`` as RetinaNet),
    ``anchor_sizes`` (None: 32, 64, 128, 256), ``aspect_ratios``, ``bbox_reg_weights`` (RefineDet's
    variances are weights 10, 10, 5, 5), the inference settings, ``image_mean`` / ``image_std`` /
    ``size_divisible``, ``scale_as`` (pad, not warp), and ``cfg.refinedet`` (image size, TCB width,
    matching, mining, ARM filter), whose names are the constructor's.
    """
    rd = cfg.refinedet
    for field, value, caffe in (("aspect_ratios", cfg.aspect_ratios, CAFFE_ASPECT_RATIOS),
                                ("bbox_reg_weights", cfg.bbox_reg_weights, CAFFE_BBOX_REG_WEIGHTS)):
        if [float(v) for v in value] != caffe:
            # the ModelConfig defaults are RetinaNet's; a RefineDet config should set these
            logger.warning("RefineDet model.%s = %s differs from the Caffe model's %s", field, list(value), caffe)
    if cfg.backbone == "vgg16":
        backbone = VGG16()
        if cfg.pretrained_backbone:
            load_torchvision_vgg16(backbone, cfg.pretrained_backbone)
        parts = {"backbone": backbone}
    elif cfg.backbone.startswith("resnet") and cfg.backbone[len("resnet"):].isdigit():
        parts = _resnet_parts(cfg, len(cfg.aspect_ratios))
    else:
        raise ConfigError(f"model.backbone: RefineDet supports vgg16 and resnet18/34/50/101, got {cfg.backbone!r}")
    size = (rd.image_size, rd.image_size)
    preprocessor = ImagePreprocessor(rd.image_size, rd.image_size, cfg.image_mean, cfg.image_std,
                                     max(SIZE_MULTIPLE, int(cfg.size_divisible)), size, cfg.scale_as)
    return RefineDet(
        cfg.num_classes, **parts, preprocessor=preprocessor, image_size=size, tcb_channels=rd.tcb_channels,
        anchor_sizes=tuple(cfg.anchor_sizes) if cfg.anchor_sizes else (32.0, 64.0, 128.0, 256.0),
        aspect_ratios=tuple(cfg.aspect_ratios), box_coder=BoxCoder(tuple(cfg.bbox_reg_weights)),
        iou_threshold=rd.iou_threshold, neg_pos_ratio=rd.neg_pos_ratio,
        objectness_threshold=rd.objectness_threshold, score_thresh=cfg.score_thresh,
        topk_candidates=cfg.topk_candidates, nms_thresh=cfg.nms_thresh, detections_per_img=cfg.detections_per_img)

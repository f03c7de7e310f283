"""RetinaNet (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017).

One training step, top to bottom (the flow is :meth:`DenseDetector.forward`, the parts are here):
images → :class:`ImagePreprocessor` (normalise, resize, pad) → backbone + FPN (P3–P7) →
:class:`RetinaNetHead` (class logits ``[B, ΣHWA, K]``, box deltas ``[B, ΣHWA, 4]``) →
:class:`AnchorGenerator` (per level ``[HWA, 4]``, same order) → :class:`Matcher` (``[B, ΣHWA]``) →
focal loss + box loss, both divided by the batch's foreground count.
Every step is batched over images; the only Python loops run over the pyramid levels.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ablation_losses import ABLATION_LOSSES, GHMC
from ..anchors import AnchorGenerator, retinanet_anchor_sizes
from ..backbones.resnet import ResNet, load_torchvision_resnet, make_norm
from ..boxes import BoxCoder, clip_boxes
from ..config import ConfigError, ModelConfig
from ..losses import box_regression_loss, focal_loss_sum, foreground_normalizer
from ..matching import Matcher, PaddedTargets, class_unknown, pad_targets
from ..necks.fpn import FPN, BackboneWithFPN
from .base import AnchorSpec, Candidates, DenseDetector, top_count
from .preprocess import ImagePreprocessor

__all__ = ["RetinaNet", "RetinaNetHead", "build_retinanet", "resolve_norm", "best_above"]

logger = logging.getLogger("densedet")


def _tower(in_channels: int, channels: int, num_convs: int, norm: str) -> nn.Sequential:
    layers = []
    for i in range(num_convs):
        block: list[nn.Module] = [nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1,
                                            bias=norm == "none")]
        if norm != "none":
            block.append(make_norm(norm, channels))
        block.append(nn.ReLU(inplace=True))
        layers.append(nn.Sequential(*block))
    return nn.Sequential(*layers)


def _flatten_level(x: Tensor, width: int) -> Tensor:
    """``[B, A·width, H, W]`` → ``[B, H·W·A, width]`` (order y, x, a — the anchors' order)."""
    b, _, h, w = x.shape
    return x.view(b, -1, width, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, width)


class RetinaNetClassificationHead(nn.Module):
    """4 × (3x3 conv + ReLU) then a 3x3 conv to A·K logits, shared across levels.

    Initialisation (paper, section 4.1): N(0, 0.01) weights, zero bias, and the last bias set to
    −log((1 − π)/π) so every anchor starts with foreground probability π = 0.01 — without it the
    loss of the ~100k easy negatives swamps the first iterations.
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4,
                 channels: int = 256, norm: str = "none", prior_prob: float = 0.01) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv = _tower(in_channels, channels, num_convs, norm)
        self.cls_logits = nn.Conv2d(channels, num_anchors * num_classes, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: list[Tensor]) -> Tensor:
        return torch.cat([_flatten_level(self.cls_logits(self.conv(f)), self.num_classes) for f in features], 1)


class RetinaNetRegressionHead(nn.Module):
    """4 × (3x3 conv + ReLU) then a 3x3 conv to A·4 deltas, shared across levels."""

    def __init__(self, in_channels: int, num_anchors: int, num_convs: int = 4, channels: int = 256,
                 norm: str = "none") -> None:
        super().__init__()
        self.conv = _tower(in_channels, channels, num_convs, norm)
        self.bbox_reg = nn.Conv2d(channels, num_anchors * 4, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, features: list[Tensor]) -> Tensor:
        return torch.cat([_flatten_level(self.bbox_reg(self.conv(f)), 4) for f in features], 1)


class RetinaNetHead(nn.Module):
    """Classification and box subnets; ``forward(features) -> (logits [B, ΣHWA, K], deltas [B, ΣHWA, 4])``."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4,
                 channels: int = 256, norm: str = "none", prior_prob: float = 0.01) -> None:
        super().__init__()
        self.classification_head = RetinaNetClassificationHead(in_channels, num_anchors, num_classes, num_convs,
                                                               channels, norm, prior_prob)
        self.regression_head = RetinaNetRegressionHead(in_channels, num_anchors, num_convs, channels, norm)

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        return self.classification_head(features), self.regression_head(features)


class RetinaNet(DenseDetector):
    """A RetinaNet assembled from its parts (any part left out is built from the defaults).

    The flow (preprocess → features → heads → anchors → losses | decode → select) is
    :class:`~densedet.models.base.DenseDetector`'s; this class fills in the FPN features, the two
    subnets, the anchor grid, the IoU matcher, the focal and box losses and the per-level decoding.
    Losses: ``{"cls", "box"}`` (and ``"cls_ce"`` with ``class_ce_weight > 0``).
    """

    arch = "retinanet"

    def __init__(self, backbone: nn.Module, num_classes: int, anchor_generator: AnchorGenerator,
                 head: RetinaNetHead | None = None, preprocessor: ImagePreprocessor | None = None,
                 matcher: Matcher | None = None, box_coder: BoxCoder | None = None, *,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, box_loss: str = "l1",
                 smooth_l1_beta: float = 0.0, cls_loss: str = "focal", class_ce_weight: float = 0.0,
                 score_thresh: float = 0.05, topk_candidates: int = 1000, nms_thresh: float = 0.5,
                 detections_per_img: int = 100, loss_normalizer: str = "batch") -> None:
        super().__init__(num_classes, preprocessor or ImagePreprocessor(), score_thresh=score_thresh,
                         topk_candidates=topk_candidates, nms_thresh=nms_thresh,
                         detections_per_img=detections_per_img)
        self.backbone = backbone
        self.anchor_generator = anchor_generator
        self.head = head or RetinaNetHead(backbone.out_channels, anchor_generator.num_anchors_per_location,
                                          num_classes)
        self.matcher = matcher or Matcher()
        self.box_coder = box_coder or BoxCoder()
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.cls_loss, self.box_loss, self.smooth_l1_beta = cls_loss, box_loss, smooth_l1_beta
        self.class_ce_weight = class_ce_weight
        if cls_loss != "focal" and cls_loss not in ABLATION_LOSSES:
            raise ValueError(f"unknown classification loss {cls_loss!r}; expected focal or "
                             f"{', '.join(ABLATION_LOSSES)}")
        if loss_normalizer not in ("batch", "per_image"):
            raise ConfigError(f"model.retinanet.loss_normalizer must be batch or per_image, got {loss_normalizer!r}")
        if loss_normalizer == "per_image" and (cls_loss != "focal" or class_ce_weight > 0):
            raise ConfigError("model.retinanet.loss_normalizer per_image (torchvision's) goes with the focal loss "
                              "alone: cls_loss focal, class_ce_weight 0")
        # The paper divides the batch's loss by the batch's foreground count ("batch"); torchvision
        # divides each image's by its own and averages the images ("per_image").
        self.loss_normalizer = loss_normalizer
        # GHM-C keeps a running gradient density: one per model, so one per training run.
        self.ghmc = GHMC() if cls_loss == "ghmc" else None
        head_a = self.head.classification_head.cls_logits.out_channels // num_classes
        if head_a != anchor_generator.num_anchors_per_location:
            raise ValueError(f"the head predicts {head_a} anchors per position but the anchor generator makes "
                             f"{anchor_generator.num_anchors_per_location} (sizes x aspect_ratios)")

    # -- the parts -------------------------------------------------------------------------
    def features(self, batch: Tensor) -> list[Tensor]:
        """P3–P7 (or the configured levels) of the backbone + FPN."""
        return self.backbone(batch)

    def head_outputs(self, features: list[Tensor]) -> dict[str, Tensor]:
        """``{"cls_logits": [B, ΣHWA, K], "bbox_deltas": [B, ΣHWA, 4]}``."""
        logits, deltas = self.head(features)
        return {"cls_logits": logits, "bbox_deltas": deltas}

    def anchors(self, image_size: tuple[int, int], feature_sizes, device: torch.device | str = "cpu") -> list[Tensor]:
        return self.anchor_generator(image_size, feature_sizes, device)

    def match(self, anchors: Tensor, targets: PaddedTargets) -> Tensor:
        return self.matcher(anchors, targets).matched_idxs

    def anchor_spec(self) -> AnchorSpec:
        gen = self.anchor_generator
        return AnchorSpec(gen.sizes, gen.aspect_ratios[0], gen.strides, self.matcher.fg_iou_thresh,
                          self.matcher.bg_iou_thresh)

    @property
    def trunk(self) -> nn.Module:
        return self.backbone.body

    # -- training -------------------------------------------------------------------------
    def losses(self, outputs: dict[str, Tensor], anchors: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        """Focal loss over non-ignored anchors and box loss over foreground anchors, both divided by
        the batch's foreground count (the paper's normaliser), or per image (``loss_normalizer``)."""
        logits, deltas = outputs["cls_logits"], outputs["bbox_deltas"]
        anchors = torch.cat(anchors)                                            # [A, 4]
        gt = pad_targets(targets, logits.device)
        matched_idxs = self.match(anchors, gt)                                  # [B, A]
        foreground = matched_idxs >= 0
        # An image whose classes are unknown (a mirror that may change them: data.hflip_keeps_class)
        # teaches its boxes, and its anchors on objects teach no class, neither right nor wrong.
        class_known = ~(foreground & class_unknown(targets, logits.device).unsqueeze(1))
        valid = (matched_idxs != -2) & class_known
        safe_idxs = matched_idxs.clamp(min=0)
        gt_labels = torch.gather(gt.labels, 1, safe_idxs)                      # [B, A]
        gt_boxes = torch.gather(gt.boxes, 1, safe_idxs.unsqueeze(-1).expand(-1, -1, 4))
        if self.loss_normalizer == "per_image":
            return self._per_image_losses(logits, deltas, anchors, gt_labels, gt_boxes, foreground, valid)
        normalizer = foreground_normalizer(foreground.sum())
        if self.cls_loss == "focal":
            # fused: no one-hot targets, no copy of the valid anchors, gradient in the same pass
            labels = torch.where(foreground, gt_labels, -1)
            loss_cls = focal_loss_sum(logits, labels, valid, self.focal_alpha, self.focal_gamma) / normalizer
        else:
            cls_targets = torch.zeros_like(logits, dtype=torch.float32)
            cls_targets[foreground, gt_labels[foreground]] = 1.0
            loss_cls = self.classification_loss(logits[valid], cls_targets[valid], len(targets)) / normalizer
        anchors_fg = anchors.unsqueeze(0).expand_as(deltas)[foreground]
        loss_box = box_regression_loss(self.box_loss, deltas[foreground], gt_boxes[foreground], anchors_fg,
                                       self.box_coder, self.smooth_l1_beta) / normalizer
        losses = {"cls": loss_cls, "box": loss_box}
        if self.class_ce_weight > 0:
            # Not in the paper: the sigmoid focal loss scores each class on its own, so early in training
            # a digit lights up several classes at once. Cross-entropy over the K logits of the
            # foreground anchors ranks the true class above the others directly.
            known = foreground & class_known
            ce = F.cross_entropy(logits[known].float(), gt_labels[known], reduction="sum")
            losses["cls_ce"] = self.class_ce_weight * ce / normalizer
        return losses

    def _per_image_losses(self, logits: Tensor, deltas: Tensor, anchors: Tensor, gt_labels: Tensor,
                          gt_boxes: Tensor, foreground: Tensor, valid: Tensor) -> dict[str, Tensor]:
        """torchvision's normalisation (``loss_normalizer="per_image"``): each image's focal and box
        sums divided by that image's own foreground count (at least 1), then the mean over images.
        An image without boxes thus weighs its background loss by 1, not by the batch's count. A
        Python loop over images, as torchvision's: a compatibility mode, not the default path."""
        labels = torch.where(foreground, gt_labels, -1)
        cls, box = [], []
        for i in range(logits.shape[0]):
            fg = foreground[i]
            count = fg.sum().clamp(min=1).float()
            cls.append(focal_loss_sum(logits[i:i + 1], labels[i:i + 1], valid[i:i + 1], self.focal_alpha,
                                      self.focal_gamma) / count)
            box.append(box_regression_loss(self.box_loss, deltas[i][fg], gt_boxes[i][fg], anchors[fg],
                                           self.box_coder, self.smooth_l1_beta) / count)
        return {"cls": torch.stack(cls).mean(), "box": torch.stack(box).mean()}

    def classification_loss(self, logits: Tensor, targets: Tensor, num_images: int) -> Tensor:
        """Summed ablation loss (``model.cls_loss`` other than focal, which :meth:`losses` fuses)
        over non-ignored anchors, ``[V, K]`` each."""
        extra = {"ghmc": self.ghmc} if self.ghmc is not None else {}
        return ABLATION_LOSSES[self.cls_loss](logits, targets, alpha=self.focal_alpha, gamma=self.focal_gamma,
                                              num_images=num_images, **extra)

    # -- inference ------------------------------------------------------------------------
    def decode(self, outputs: dict[str, Tensor], anchors: list[Tensor], image_sizes: Tensor) -> Candidates:
        """Per level: sigmoid scores, those > ``score_thresh``, the best ``topk_candidates`` of them
        over anchors x classes, decoded and clipped to the image (torchvision's order: clip before NMS)."""
        logits, deltas = outputs["cls_logits"], outputs["bbox_deltas"]
        k = logits.shape[-1]
        level_sizes = [a.shape[0] for a in anchors]      # traced shapes in an export of dynamic size
        all_boxes, all_scores, all_labels = [], [], []
        for lg, dl, an in zip(logits.split(level_sizes, 1), deltas.split(level_sizes, 1), anchors):
            scores = torch.sigmoid(lg.float()).flatten(1)                                # [B, n·K]
            top_scores, top_idxs = best_above(scores, self.score_thresh, self.topk_candidates)
            anchor_idxs = torch.div(top_idxs, k, rounding_mode="floor")
            boxes = self.box_coder.decode(torch.gather(dl, 1, anchor_idxs.unsqueeze(-1).expand(-1, -1, 4)),
                                          an[anchor_idxs])
            all_boxes.append(clip_boxes(boxes, image_sizes.unsqueeze(1)))
            all_scores.append(top_scores)
            all_labels.append(top_idxs - anchor_idxs * k)
        scores = torch.cat(all_scores, 1)
        return Candidates(torch.cat(all_boxes, 1), scores, torch.cat(all_labels, 1), scores > self.score_thresh)


def best_above(scores: Tensor, thresh: float, k: int) -> tuple[Tensor, Tensor]:
    """The best ``k`` entries above ``thresh`` of each row of ``scores [B, M]``: ``(scores, column
    indices)``, each ``[B, k']``, slots past a row's count holding score -1.

    Thresholds before it sorts, as torchvision does per image: a level's scores above 0.05 are
    usually a few hundred of millions, and a top-k over all of them costs ~10x the rest of the
    post-processing. Only when some row keeps more than ``k`` does a top-k run, over the survivors
    alone. The columns come in score order after a top-k, in column order otherwise; the selection
    that follows sorts by score either way. An exported graph (tracing) takes the fixed-shape top-k
    over the thresholded scores.
    """
    if torch.jit.is_tracing():
        masked = torch.where(scores > thresh, scores, torch.full_like(scores, -1.0))
        return masked.topk(top_count(k, scores.shape[1]), dim=1)
    above = scores > thresh
    counts = above.sum(1)
    most = int(counts.max()) if counts.numel() else 0
    rows, cols = above.nonzero(as_tuple=True)                     # row-major: columns ascend per row
    slots = torch.arange(rows.numel(), device=scores.device) - (counts.cumsum(0) - counts)[rows]
    top_scores = scores.new_full((scores.shape[0], most), -1.0)
    top_idxs = torch.zeros((scores.shape[0], most), dtype=torch.int64, device=scores.device)
    top_scores[rows, slots] = scores[rows, cols]
    top_idxs[rows, slots] = cols
    if most > k:                                                  # a top-k over the survivors only
        top_scores, best = top_scores.topk(k, dim=1)
        top_idxs = top_idxs.gather(1, best)
    return top_scores, top_idxs


# -- building from a config -------------------------------------------------------------------

def resolve_norm(cfg: ModelConfig) -> tuple[str, int]:
    """(norm, frozen_stages) after applying ``auto``; logged, since it decides whether training from
    scratch can work at all (SPEC: FrozenBN from random init reached AP 0.07, trainable BN 0.36)."""
    pretrained = bool(cfg.pretrained_backbone)
    norm = cfg.norm if cfg.norm != "auto" else ("frozen_bn" if pretrained else "bn")
    frozen = cfg.frozen_stages if cfg.frozen_stages >= 0 else (2 if pretrained else 0)
    if cfg.norm == "auto":
        logger.info("backbone norm: %s, frozen stages: %d (%s)", norm, frozen,
                    "ImageNet weights given" if pretrained else "no pretrained weights: training from scratch "
                    "needs trainable normalisation")
    return norm, frozen


def build_retinanet(cfg: ModelConfig) -> RetinaNet:
    """Build a :class:`RetinaNet` from a :class:`ModelConfig` (its shared fields and ``cfg.retinanet``)."""
    r = cfg.retinanet
    if not cfg.backbone.startswith("resnet"):
        raise ConfigError(f"model.backbone: RetinaNet supports resnet18/34/50/101, got {cfg.backbone!r}")
    if not 3 <= r.min_level <= 5 <= r.max_level <= 7:
        raise ConfigError(f"model.retinanet.min_level/max_level must satisfy 3 <= min_level <= 5 <= max_level <= 7; "
                          f"got {r.min_level}, {r.max_level}")
    norm, frozen = resolve_norm(cfg)
    body = ResNet(int(cfg.backbone[len("resnet"):]), norm=norm, frozen_stages=frozen,
                  out_features=[f"res{l}" for l in range(r.min_level, 6)], norm_eps=cfg.frozen_bn_eps)
    if cfg.pretrained_backbone:
        load_torchvision_resnet(body, cfg.pretrained_backbone)
    fpn = FPN(body.out_channels, r.fpn_channels, extra_levels=r.max_level - 5, p6_from=r.p6_from, norm=r.fpn_norm)
    strides = [2 ** l for l in range(r.min_level, r.max_level + 1)]
    base = cfg.anchor_sizes or [4.0 * s for s in strides]
    if len(base) != len(strides):
        raise ConfigError(f"model.anchor_sizes has {len(base)} entries for {len(strides)} levels "
                          f"P{r.min_level}-P{r.max_level}")
    anchor_generator = AnchorGenerator(
        retinanet_anchor_sizes(base, r.scales_per_octave, integer=r.anchor_integer_sizes),
        cfg.aspect_ratios, strides, offset=r.anchor_offset,
        round_cell_anchors=r.round_cell_anchors, stride_mode=r.stride_mode)
    head = RetinaNetHead(r.fpn_channels, anchor_generator.num_anchors_per_location, cfg.num_classes,
                         r.head_convs, r.head_channels or r.fpn_channels, r.head_norm, r.prior_prob)
    preprocessor = ImagePreprocessor(cfg.min_size, cfg.max_size, cfg.image_mean, cfg.image_std,
                                     cfg.size_divisible, cfg.fixed_size, cfg.scale_as)
    return RetinaNet(BackboneWithFPN(body, fpn), cfg.num_classes, anchor_generator, head, preprocessor,
                     Matcher(r.fg_iou_thresh, r.bg_iou_thresh, r.allow_low_quality_matches),
                     BoxCoder(tuple(cfg.bbox_reg_weights)),
                     focal_alpha=r.focal_alpha, focal_gamma=r.focal_gamma, box_loss=r.box_loss,
                     smooth_l1_beta=r.smooth_l1_beta, cls_loss=r.cls_loss, class_ce_weight=r.class_ce_weight,
                     score_thresh=cfg.score_thresh, topk_candidates=cfg.topk_candidates, nms_thresh=cfg.nms_thresh,
                     detections_per_img=cfg.detections_per_img, loss_normalizer=r.loss_normalizer)

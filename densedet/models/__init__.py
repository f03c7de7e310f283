"""Model presets and :func:`build_model`.

A preset is a named :class:`~densedet.config.ModelConfig` (plain data, one registry for both
families); ``build_model(name, **overrides)`` replaces fields of that config (checked by type)
and builds the model. Every model is a :class:`~densedet.models.base.DenseDetector`.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from ..config import Config, ConfigError, ModelConfig, validate, with_model_options
from ..serialization import load_tensors
from .base import DenseDetector
from .refinedet import RefineDet, build_refinedet
from .retinanet import RetinaNet, build_retinanet

__all__ = ["PRESETS", "build_model", "build_from_config", "list_models", "load_weights", "load_state_dict_checked",
           "DenseDetector", "RetinaNet", "RefineDet"]


def _retinanet(depth: int, **options: Any) -> ModelConfig:
    return with_model_options(ModelConfig(arch="retinanet", backbone=f"resnet{depth}"), **options)


def _refinedet(size: int, backbone: str) -> ModelConfig:
    """The Caffe models (reference code): VOC's 20 classes, a square input warped to ``size``,
    ratios 1, 2, 1/2, variances 0.1/0.2, and Caffe's DetectionOutput settings."""
    return with_model_options(
        ModelConfig(arch="refinedet", backbone=backbone), num_classes=20, image_size=size, size_divisible=64,
        score_thresh=0.01, nms_thresh=0.45, topk_candidates=1000, detections_per_img=500,
        aspect_ratios=[1.0, 2.0, 0.5], bbox_reg_weights=[10.0, 10.0, 5.0, 5.0])


PRESETS: dict[str, ModelConfig] = {
    # Canonical RetinaNet (paper; detectron2 and mmdetection agree): P6 from C5, float anchors,
    # fixed strides, 100 detections, pad to a multiple of 128 so P3..P7 grids align.
    "retinanet_r18_fpn": _retinanet(18),
    "retinanet_r34_fpn": _retinanet(34),
    "retinanet_r50_fpn": _retinanet(50),
    "retinanet_r101_fpn": _retinanet(101),
    # torchvision's retinanet_resnet50_fpn (v1), so its COCO checkpoint loads and gives its detections.
    # Differences from the canonical preset, each one torchvision's choice:
    #   p6_from="p5"              LastLevelP6P7(256, 256) takes P6 from P5, not C5
    #   anchor_integer_sizes      sizes int()-truncated: 32, 40, 50 (not 40.32, 50.80)
    #   round_cell_anchors        cell half-extents rounded to integers
    #   stride_mode="inferred"    strides = padded size // feature size (61 / 114 px at P6 / P7 for 800x1216)
    #   num_classes=91            COCO ids used directly as channels; channel 0 is an unused "background"
    #   detections_per_img=300    torchvision's default (COCO AP counts only 100)
    #   size_divisible=32         pad to a multiple of 32 (not 128)
    #   norm="frozen_bn"          the published weights are a FrozenBN model ...
    #   frozen_bn_eps=0.0         ... run with eps 0 (torchvision's overwrite_eps for COCO_V1)
    #   loss_normalizer=per_image each image's loss over its own foreground count, then the mean
    "retinanet_r50_fpn_torchvision": _retinanet(
        50, num_classes=91, p6_from="p5", anchor_integer_sizes=True, round_cell_anchors=True,
        stride_mode="inferred", detections_per_img=300, size_divisible=32, norm="frozen_bn", frozen_stages=2,
        frozen_bn_eps=0.0, loss_normalizer="per_image"),
    # RefineDet (Zhang et al. 2018): VOC07 mAP 80.0 / 81.8 (VGG16, 320 / 512), COCO AP 32.0 / 36.4 (ResNet-101).
    "refinedet320_vgg16": _refinedet(320, "vgg16"),
    "refinedet512_vgg16": _refinedet(512, "vgg16"),
    "refinedet320_r101": _refinedet(320, "resnet101"),
    "refinedet512_r101": _refinedet(512, "resnet101"),
}

BUILDERS = {"retinanet": build_retinanet, "refinedet": build_refinedet}


def list_models() -> list[str]:
    return sorted(PRESETS)


def build_from_config(cfg: ModelConfig) -> DenseDetector:
    """Build the model a :class:`ModelConfig` describes."""
    if cfg.arch not in BUILDERS:
        raise ConfigError(f"model.arch: unknown architecture {cfg.arch!r} ({', '.join(BUILDERS)})")
    model = BUILDERS[cfg.arch](cfg)
    model.box_vote = cfg.box_vote
    return model


def build_model(name: str, num_classes: int | None = None, weights: str | None = None,
                **overrides: Any) -> DenseDetector:
    """Build a preset by name, e.g. ``build_model("retinanet_r50_fpn", num_classes=20, min_size=512)``.

    Overrides are :class:`ModelConfig` fields or the family's own (``focal_gamma=1.0`` for RetinaNet,
    ``neg_pos_ratio=2`` for RefineDet; see :func:`~densedet.config.with_model_options`); one the
    preset's family does not have is refused. ``weights``
    is a path to a state-dict file — torchvision's (plain state dict) or a densedet checkpoint —
    loaded with ``strict=True`` and ``weights_only=True`` (no code from the file runs).
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    cfg = with_model_options(PRESETS[name], **overrides)
    validate(Config(model=cfg))     # refuses the other family's options too
    model = build_from_config(cfg)
    model.config = cfg
    if weights:
        load_weights(model, weights)
    return model


def load_weights(model: nn.Module, path: str) -> None:
    """Load model weights from ``path`` strictly; a mismatch lists the offending keys."""
    state = load_tensors(path, "weights file")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    load_state_dict_checked(model, state, path)


_LEGACY_HEAD_KEY = re.compile(r"^(head\.(?:classification|regression)_head\.conv)\.(\d+)\.(weight|bias)$")


def _upgrade_legacy_keys(state: dict, own: dict) -> dict:
    """torchvision's first RetinaNet checkpoints name the head towers ``conv.0, conv.2, conv.4, conv.6``
    (conv, ReLU, conv, …); the current layout (ours) is ``conv.0.0, conv.1.0, …``. Rename when needed."""
    out = {}
    for key, value in state.items():
        m = _LEGACY_HEAD_KEY.match(key)
        if m and key not in own and int(m.group(2)) % 2 == 0:
            new = f"{m.group(1)}.{int(m.group(2)) // 2}.0.{m.group(3)}"
            if new in own:
                key = new
        out[key] = value
    return out


def load_state_dict_checked(model: nn.Module, state: dict, source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists missing, unexpected and mis-shaped keys."""
    path = source
    own = model.state_dict()
    state = _upgrade_legacy_keys(state, own)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    # A BatchNorm checkpoint's num_batches_tracked is harmless for a FrozenBN model.
    unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
    if missing or unexpected or shape:
        lines = [f"{path}: weights do not fit this model"]
        if shape:
            lines.append("shape mismatch: " + ", ".join(
                f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in shape[:10]))
        if missing:
            lines.append(f"missing ({len(missing)}): " + ", ".join(missing[:10]))
        if unexpected:
            lines.append(f"unexpected ({len(unexpected)}): " + ", ".join(unexpected[:10]))
        raise ValueError("\n  ".join(lines))
    state = {k: v for k, v in state.items() if k in own}
    model.load_state_dict(state, strict=True)

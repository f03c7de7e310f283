"""RefineDet presets, registered into ``densedet.models.PRESETS`` (model code: ``models/refinedet.py``)."""

from __future__ import annotations

from ..config import ModelConfig
from . import PRESETS

__all__ = ["build_refinedet_from_config"]

for _size in (320, 512):
    for _bb in ("vgg16", "r101"):
        PRESETS.setdefault(f"refinedet{_size}_{_bb}", ModelConfig(
            arch="refinedet", backbone="vgg16" if _bb == "vgg16" else "resnet101", num_classes=20,
            refinedet_size=_size, fixed_size=[_size, _size], min_size=_size, max_size=_size,
            size_divisible=64, score_thresh=0.01, nms_thresh=0.45, topk_candidates=1000,
            detections_per_img=500, aspect_ratios=[1.0, 2.0, 0.5], bbox_reg_weights=[10.0, 10.0, 5.0, 5.0],
            min_level=3, max_level=6))


def build_refinedet_from_config(cfg: ModelConfig):
    from . import refinedet  # written alongside; imported lazily
    return refinedet.build_refinedet(cfg)

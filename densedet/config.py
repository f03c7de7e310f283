"""Typed configuration: dataclasses that round-trip to YAML.

A run is described by :class:`Config` (model, data, solver, train, test). Presets are named
:class:`ModelConfig` instances (``densedet.models.PRESETS``), not subclasses. Every value is checked
against its declared type where it enters — the YAML loader or a ``key.sub=value`` override — and
an unknown key or a wrong type raises :class:`ConfigError` naming the key (and the file).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

__all__ = ["ConfigError", "ModelConfig", "DataConfig", "SolverConfig", "TrainConfig", "TestConfig",
           "Config", "load_config", "save_config", "apply_overrides", "from_dict", "to_dict"]


# How test-time augmentation merges its passes (densedet.tta.merge_detections implements each).
TTA_MERGE_METHODS = ("nms", "vote", "soft_vote", "soft_nms_linear", "soft_nms_gaussian")


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or impossible; the message names the key."""


@dataclass
class ModelConfig:
    """Everything needed to build a model. Names follow torchvision's RetinaNet arguments where
    one exists (``min_size``, ``max_size``, ``score_thresh``, ``nms_thresh``, ``detections_per_img``,
    ``topk_candidates``, ``fg_iou_thresh``, ``bg_iou_thresh``)."""

    arch: str = "retinanet"                 # retinanet | refinedet
    backbone: str = "resnet50"              # resnet18/34/50/101 | vgg16
    num_classes: int = 80
    pretrained_backbone: str | None = None  # path to a torchvision ImageNet state-dict file
    norm: str = "auto"                      # auto | frozen_bn | bn | gn ; auto: frozen_bn iff pretrained
    frozen_stages: int = -1                 # -1 auto: 2 (stem + res2) iff pretrained, else 0
    frozen_bn_eps: float = 1e-5             # torchvision's COCO RetinaNet runs with 0.0 (overwrite_eps)
    # FPN and levels
    fpn_channels: int = 256
    fpn_norm: str = "none"
    p6_from: str = "c5"                     # c5 (paper) | p5 (torchvision v1)
    min_level: int = 3
    max_level: int = 7
    # anchors
    anchor_sizes: list[float] | None = None  # base size per level; None: 4 * stride (32 .. 512)
    scales_per_octave: int = 3
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    anchor_integer_sizes: bool = False      # torchvision truncates 40.32 -> 40
    round_cell_anchors: bool = False        # torchvision rounds half-extents
    stride_mode: str = "fixed"              # fixed | inferred (torchvision)
    anchor_offset: float = 0.0
    # head
    head_convs: int = 4
    head_channels: int | None = None        # None: fpn_channels
    head_norm: str = "none"                 # none | gn | bn
    prior_prob: float = 0.01
    # training targets and losses
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.4
    allow_low_quality_matches: bool = True
    cls_loss: str = "focal"
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    class_ce_weight: float = 0.0            # > 0 adds softmax cross-entropy over the K logits at foreground anchors
    box_loss: str = "l1"                    # l1 | smooth_l1 | giou
    smooth_l1_beta: float = 0.0
    bbox_reg_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    # inference
    score_thresh: float = 0.05
    topk_candidates: int = 1000
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    # input
    min_size: int | list[int] = 800
    max_size: int = 1333
    size_divisible: int = 128
    fixed_size: list[int] | None = None
    image_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    image_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # RefineDet
    refinedet_size: int = 320
    arm_filter_thresh: float = 0.01
    negpos_ratio: int = 3


@dataclass
class DataConfig:
    format: str = "coco"                    # coco | voc | csv | digits
    train: str = ""                         # annotation file (coco/csv) or folder of XML (voc)
    train_images: str = ""
    val: str = ""
    val_images: str = ""
    class_names: list[str] | None = None
    root: str = "data_cache/digits"         # digits: where scenes are generated
    num_train: int = 500
    num_val: int = 100
    num_tune: int = 100                     # digits: held-out scenes (val's digit pool, other scenes) for choosing
                                            # test-time settings without touching val (--split tune)
    seed: int = 0
    strict: bool = False                    # turn every skipped/repaired record into an error
    hflip_prob: float = 0.5
    train_min_sizes: list[int] | None = None  # multi-scale training, one shorter side per batch; None: model.min_size
    augment: str = "basic"                  # basic (flip, multi-scale) | ssd (RefineDet)
    crop_size: int = 0                      # >0: train on object-centred crop_size windows at the image's scale
    crop_sizes: list[int] = field(default_factory=list)  # instead of crop_size: one window size per batch, of
                                            # batch_size x (largest / size)^2 windows (same pixels per batch)
    crop_min_visibility: float = 0.7        # a box cut by the window below this visible share is ignored
    tile_size: int = 0                      # >0: train on overlapping tiles of large images
    tile_overlap: int = 64
    cache_images: bool = True
    workers: int = 0


@dataclass
class SolverConfig:
    optimizer: str = "sgd"                  # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0          # applied to norm and bias parameters
    schedule: str = "multistep"             # multistep | cosine
    steps: list[int] = field(default_factory=lambda: [60000, 80000])
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    clip_grad_norm: float = 0.0             # 0: off
    min_lr_factor: float = 0.0              # cosine floor


@dataclass
class TrainConfig:
    batch_size: int = 16                    # images per iteration, all processes together
    max_iters: int = 90000
    max_minutes: float = 0.0                # >0: stop after this much training time (the schedule is stretched to it)
    precision: str = "auto"                 # auto | fp32 | bf16
    channels_last: bool = True
    gemm_weight_grad: bool = True           # CPU fp32: the weight gradient of wide convolutions (in x out >= 128 x 256:
                                            # ResNet's layer3-4) as one GEMM, not oneDNN's (densedet/conv_grad.py)
    eval_period: int = 0                    # iterations; 0: only at the end
    checkpoint_period: int = 1000
    log_period: int = 20
    seed: int = 0
    deterministic: bool = False
    output_dir: str = "runs/exp"
    ema_decay: float = 0.0                  # >0: keep a moving average of the weights (e.g. 0.999), evaluated and saved
    max_bad_steps: int = 5                  # consecutive non-finite steps before the run stops
    pretrain_minutes: float = 0.0           # >0: first teach the backbone to classify box crops this long (within max_minutes)
    pretrain_iters: int = 0                 # >0: that warm-up for a fixed number of steps instead
    pretrain_batch_size: int = 64           # crops per warm-up step
    pretrain_crop_sizes: list[int] = field(default_factory=lambda: [32, 48, 64, 96])  # crop side, one drawn per step
    pretrain_lr: float = 0.0                # AdamW learning rate of the warm-up; 0: solver.lr
    pretrain_freeze_stages: int = 0         # >0: after the warm-up, freeze these stages as model.frozen_stages does


@dataclass
class TestConfig:
    max_dets: list[int] = field(default_factory=lambda: [1, 10, 100])
    batch_size: int = 8
    num_vis: int = 6
    tta_scales: list[int] = field(default_factory=list)  # test-time augmentation of the final evaluation and of
                                            # `densedet eval`: one pass per input size (shorter side); [] = none
    tta_flip: bool = False                  # also each pass's horizontal mirror
    tta_merge: str = "vote"                 # nms | vote | soft_vote | soft_nms_linear | soft_nms_gaussian


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    test: TestConfig = field(default_factory=TestConfig)


# --- conversion -----------------------------------------------------------------------------

def to_dict(obj: Any) -> Any:
    """A dataclass (tree) as plain dicts/lists, ready for YAML or a checkpoint."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where ``1e-4`` (no dot) is a string; read it as the float it means."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected None, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a dict, checking every key and type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(prefix + k for k in unknown)} (valid: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``key.sub=value`` strings (values parsed as YAML: ``lr=0.02``, ``steps=[10,20]``)."""
    tree = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = tree
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"unknown key {'.'.join(parts[: i + 1])} in override {item!r}")
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ConfigError(f"unknown key {key} in override {item!r}")
        try:
            node[parts[-1]] = _load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {err}") from None
    out = from_dict(Config, tree)
    validate(out)
    return out


def validate(cfg: Config) -> None:
    """Impossible values, caught before any work starts."""
    checks = [
        (cfg.solver.lr > 0, "solver.lr", f"must be > 0, got {cfg.solver.lr}"),
        (cfg.train.batch_size > 0, "train.batch_size", f"must be > 0, got {cfg.train.batch_size}"),
        (cfg.train.max_iters > 0, "train.max_iters", f"must be > 0, got {cfg.train.max_iters}"),
        (cfg.model.num_classes > 0, "model.num_classes", f"must be > 0, got {cfg.model.num_classes}"),
        (0 <= cfg.model.bg_iou_thresh <= cfg.model.fg_iou_thresh <= 1, "model.bg_iou_thresh",
         f"need 0 <= bg_iou_thresh <= fg_iou_thresh <= 1, got {cfg.model.bg_iou_thresh}, {cfg.model.fg_iou_thresh}"),
        (cfg.train.precision in ("auto", "fp32", "bf16"), "train.precision",
         f"must be auto, fp32 or bf16, got {cfg.train.precision!r}"),
        (cfg.solver.optimizer in ("sgd", "adamw"), "solver.optimizer", f"must be sgd or adamw, got {cfg.solver.optimizer!r}"),
        (cfg.solver.schedule in ("multistep", "cosine"), "solver.schedule",
         f"must be multistep or cosine, got {cfg.solver.schedule!r}"),
        (cfg.data.format in ("coco", "voc", "csv", "digits"), "data.format",
         f"must be coco, voc, csv or digits, got {cfg.data.format!r}"),
    ]
    m = cfg.model
    if m.anchor_sizes is not None and m.arch == "retinanet":
        checks.append((len(m.anchor_sizes) == m.max_level - m.min_level + 1, "model.anchor_sizes",
                       f"has {len(m.anchor_sizes)} entries but levels P{m.min_level}-P{m.max_level} need "
                       f"{m.max_level - m.min_level + 1}"))
    if cfg.data.train_min_sizes is not None:
        checks.append((len(cfg.data.train_min_sizes) > 0 and all(s > 0 for s in cfg.data.train_min_sizes),
                       "data.train_min_sizes", f"must be a non-empty list of positive sizes, got {cfg.data.train_min_sizes}"))
        checks.append((m.arch != "refinedet" and cfg.data.augment != "ssd", "data.train_min_sizes",
                       "RefineDet / SSD augmentation train at the model's fixed size; leave it empty"))
    checks.append((m.class_ce_weight >= 0, "model.class_ce_weight", f"must be >= 0, got {m.class_ce_weight}"))
    checks.append((m.class_ce_weight == 0 or m.arch == "retinanet", "model.class_ce_weight",
                   "is a RetinaNet option (RefineDet's ODM already uses a softmax)"))
    checks.append((0 <= cfg.train.ema_decay < 1, "train.ema_decay", f"must be in [0, 1), got {cfg.train.ema_decay}"))
    checks.append((cfg.train.pretrain_minutes >= 0 and cfg.train.pretrain_iters >= 0, "train.pretrain_minutes",
                   "pretrain_minutes and pretrain_iters must be >= 0"))
    checks.append((cfg.train.pretrain_batch_size > 0, "train.pretrain_batch_size",
                   f"must be > 0, got {cfg.train.pretrain_batch_size}"))
    crop_sizes = cfg.train.pretrain_crop_sizes
    checks.append((len(crop_sizes) > 0 and all(s >= 16 for s in crop_sizes), "train.pretrain_crop_sizes",
                   f"must be a non-empty list of sizes >= 16, got {crop_sizes}"))
    checks.append((0 <= cfg.train.pretrain_freeze_stages <= 5, "train.pretrain_freeze_stages",
                   f"must be in 0..5, got {cfg.train.pretrain_freeze_stages}"))
    checks.append((cfg.train.pretrain_lr >= 0, "train.pretrain_lr", f"must be >= 0, got {cfg.train.pretrain_lr}"))
    if cfg.train.pretrain_minutes > 0 or cfg.train.pretrain_iters > 0:
        checks.append((m.arch == "retinanet", "train.pretrain_minutes",
                       "the box-crop warm-up is implemented for RetinaNet's ResNet trunk only"))
        checks.append((cfg.train.max_minutes <= 0 or cfg.train.pretrain_minutes < cfg.train.max_minutes,
                       "train.pretrain_minutes", f"({cfg.train.pretrain_minutes}) must leave part of "
                       f"train.max_minutes ({cfg.train.max_minutes}) for detection"))
    checks.append((cfg.data.crop_size >= 0, "data.crop_size", f"must be >= 0, got {cfg.data.crop_size}"))
    checks.append((all(s >= 32 for s in cfg.test.tta_scales), "test.tta_scales",
                   f"must be input sizes >= 32, got {cfg.test.tta_scales}"))
    checks.append((cfg.test.tta_merge in TTA_MERGE_METHODS, "test.tta_merge",
                   f"must be one of {', '.join(TTA_MERGE_METHODS)}, got {cfg.test.tta_merge!r}"))
    crops = cfg.data.crop_sizes
    checks.append((all(s >= 16 for s in crops), "data.crop_sizes", f"must be sizes >= 16, got {crops}"))
    checks.append((not (crops and cfg.data.crop_size), "data.crop_sizes",
                   f"replaces data.crop_size; set one of them, got crop_size {cfg.data.crop_size} and {crops}"))
    checks.append((cfg.data.num_tune >= 0, "data.num_tune", f"must be >= 0, got {cfg.data.num_tune}"))
    checks.append((0 < cfg.data.crop_min_visibility <= 1, "data.crop_min_visibility",
                   f"must be in (0, 1], got {cfg.data.crop_min_visibility}"))
    if cfg.data.crop_size or crops:
        checks.append((m.arch != "refinedet" and cfg.data.augment != "ssd", "data.crop_size",
                       "SSD augmentation (RefineDet) has its own random crop; leave it 0"))
    if m.arch == "refinedet":
        checks.append((m.refinedet_size % 64 == 0, "model.refinedet_size",
                       f"must be a multiple of 64 (RefineDet's TCB upsamples by 2 three times), got {m.refinedet_size}"))
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"{key}: {msg}")


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (keys not given keep their defaults) and apply overrides."""
    path = Path(path)
    try:
        data = _load_yaml(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    try:
        cfg = from_dict(Config, data)
        validate(cfg)
        return apply_overrides(cfg, overrides or [])
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

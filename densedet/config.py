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
from importlib.resources import files
from pathlib import Path
from typing import Any, Union

import yaml

from .errors import DensedetError

__all__ = ["ConfigError", "ModelConfig", "RetinaNetConfig", "RefineDetConfig", "DataConfig", "SolverConfig",
           "TrainConfig", "TestConfig", "Config", "find_config", "load_config", "save_config", "apply_overrides",
           "with_model_options", "upgrade_config_dict", "from_dict", "to_dict"]


# How test-time augmentation merges its passes (densedet.tta.merge_detections implements each).
TTA_MERGE_METHODS = ("nms", "vote", "soft_vote", "soft_nms_linear", "soft_nms_gaussian")


class ConfigError(DensedetError, ValueError):
    """A configuration value is unknown, of the wrong type or impossible; the message names the key."""


@dataclass(slots=True)
class RetinaNetConfig:
    """RetinaNet's own settings (``model.retinanet``). Names follow torchvision's RetinaNet arguments
    where one exists (``fg_iou_thresh``, ``bg_iou_thresh``), else RetinaNet's constructor's."""

    # FPN and levels
    fpn_channels: int = 256
    fpn_norm: str = "none"
    p6_from: str = "c5"                     # c5 (paper) | p5 (torchvision v1)
    min_level: int = 3
    max_level: int = 7
    # anchors (sizes and ratios are model.anchor_sizes / model.aspect_ratios)
    scales_per_octave: int = 3
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
    cls_loss: str = "focal"                 # focal | balanced_ce | ohem | ohem_topk | ghmc
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    class_ce_weight: float = 0.0            # > 0 adds softmax cross-entropy over the K logits at foreground anchors
    box_loss: str = "l1"                    # l1 | smooth_l1 | giou
    smooth_l1_beta: float = 0.0
    loss_normalizer: str = "batch"          # batch: / the batch's foreground count (paper) | per_image (torchvision)


@dataclass(slots=True)
class RefineDetConfig:
    """RefineDet's own settings (``model.refinedet``), named as RefineDet's constructor arguments."""

    image_size: int = 320                   # every image is warped to image_size x image_size (a multiple of 64)
    tcb_channels: int = 256
    iou_threshold: float = 0.5              # per-prediction matching threshold
    neg_pos_ratio: float = 3.0              # hard negative mining
    objectness_threshold: float = 0.01      # ARM object probability below which an anchor is an easy negative


@dataclass(slots=True)
class ModelConfig:
    """Everything needed to build a model: the settings every densedet detector shares, and each
    family's own under ``retinanet`` / ``refinedet`` (only the one ``arch`` names is used). Names
    follow torchvision's RetinaNet arguments where one exists (``min_size``, ``max_size``,
    ``score_thresh``, ``nms_thresh``, ``detections_per_img``, ``topk_candidates``)."""

    arch: str = "retinanet"                 # retinanet | refinedet
    backbone: str = "resnet50"              # resnet18/34/50/101 | vgg16
    num_classes: int = 80
    pretrained_backbone: str | None = None  # path to a torchvision ImageNet state-dict file
    norm: str = "auto"                      # auto | frozen_bn | bn | gn ; auto: frozen_bn iff pretrained
    frozen_stages: int = -1                 # -1 auto: 2 (stem + res2) iff pretrained, else 0
    frozen_bn_eps: float = 1e-5             # torchvision's COCO RetinaNet runs with 0.0 (overwrite_eps)
    # anchors and box coding
    anchor_sizes: list[float] | None = None  # base size per level; None: 4 * stride
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    bbox_reg_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    # inference
    score_thresh: float = 0.05
    topk_candidates: int = 1000
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    box_vote: bool = False                  # each kept detection takes the score-weighted mean box of the
                                            # candidates overlapping it at IoU >= nms_thresh (box voting)
    # input (RefineDet warps to refinedet.image_size and uses only the mean, the std and scale_as)
    min_size: int | list[int] = 800
    max_size: int = 1333
    size_divisible: int = 128
    fixed_size: list[int] | None = None
    scale_as: list[int] | None = None       # [h, w]: every image resized by the factor an h x w image gets
                                            # (one scale for all); None: each image by its own size.
                                            # RefineDet: resized by the factor that warps an h x w image,
                                            # then padded to refinedet.image_size, not warped
    image_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    image_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # each family's own
    retinanet: RetinaNetConfig = field(default_factory=RetinaNetConfig)
    refinedet: RefineDetConfig = field(default_factory=RefineDetConfig)


# Keys of the flat model config before the split by family: where each one lives now.
MOVED_MODEL_KEYS = {
    **{name: f"retinanet.{name}" for name in (f.name for f in dataclasses.fields(RetinaNetConfig))},
    "refinedet_size": "refinedet.image_size",
    "negpos_ratio": "refinedet.neg_pos_ratio",
    "arm_filter_thresh": "refinedet.objectness_threshold",
}


# Where each family read the flat keys before the split: flat name -> its field in the family's part.
_FLAT_KEYS = {"retinanet": {f.name: f.name for f in dataclasses.fields(RetinaNetConfig)},
              "refinedet": {"refinedet_size": "image_size", "fpn_channels": "tcb_channels",
                            "fg_iou_thresh": "iou_threshold", "negpos_ratio": "neg_pos_ratio",
                            "arm_filter_thresh": "objectness_threshold"}}


def upgrade_config_dict(tree: dict) -> dict:
    """A config dict written before the model config was split by family (a checkpoint of an older
    densedet), with each moved model key in its new place; a current one comes back unchanged.
    Keys the model's family did not read are dropped, and so are RefineDet's resize settings,
    which it never applied."""
    model = dict(tree.get("model") or {})
    flat = {key: model.pop(key) for key in list(model) if key in MOVED_MODEL_KEYS}
    if not flat:
        return tree
    family = model.get("arch", "retinanet")
    if family in _FLAT_KEYS:
        table = _FLAT_KEYS[family]
        model[family] = {**model.get(family, {}), **{table[k]: v for k, v in flat.items() if k in table}}
    if family == "refinedet":
        for key in ("min_size", "max_size", "fixed_size"):
            model.pop(key, None)
    return {**tree, "model": model}


def with_model_options(cfg: ModelConfig, **options: Any) -> ModelConfig:
    """A copy of ``cfg`` with model options replaced, each checked by type. A family's option may be
    given by its own name (``focal_gamma=1.0``, ``neg_pos_ratio=2``) as to the model's constructor:
    the names of the shared settings and of the two families' are distinct."""
    families = {"retinanet": RetinaNetConfig, "refinedet": RefineDetConfig}
    shared = {f.name for f in dataclasses.fields(ModelConfig)} - set(families)
    own = {name: family for family, cls in families.items() for name in (f.name for f in dataclasses.fields(cls))}
    updates: dict[str, dict[str, Any]] = {family: {} for family in families}
    top: dict[str, Any] = {}
    for key, value in options.items():
        value = list(value) if isinstance(value, tuple) else value
        if key in shared:
            top[key] = _coerce(value, typing.get_type_hints(ModelConfig)[key], f"model.{key}")
        elif key in own:
            family = own[key]
            hint = typing.get_type_hints(families[family])[key]
            updates[family][key] = _coerce(value, hint, f"model.{family}.{key}")
        else:
            moved = f" (now {MOVED_MODEL_KEYS[key]})" if key in MOVED_MODEL_KEYS else ""
            raise ConfigError(f"unknown model option {key!r}{moved}; valid options: "
                              f"{', '.join(sorted(shared | set(own)))}")
    for family, changes in updates.items():
        if changes:
            top[family] = dataclasses.replace(getattr(cfg, family), **changes)
    return dataclasses.replace(cfg, **top)


@dataclass
class DataConfig:
    format: str = "coco"                    # coco | voc | csv | digits
    train: str = ""                         # annotation file (coco/csv) or folder of XML (voc)
    train_images: str = ""
    val: str = ""
    val_images: str = ""
    val_format: str = ""                    # the val file's format when it differs from data.format's (coco | voc | csv)
    val_fraction: float = 0.0               # >0 and no data.val: the val split is this share of data.train's images
                                            # (at least 1), drawn by image with data.seed and left out of training
    tune_fraction: float = 0.0              # >0: a tune split of this share of data.train's images (at least 1), also
                                            # left out of training, on which test.tta_choose picks the test-time scales
    val_max_images: int = 0                 # >0: at most this many images in the carved val split
    tune_max_images: int = 0                # >0: at most this many in the tune split
    holdout: str = "image"                  # how val/tune are carved: image (whole images) | region (a band at the end
                                            # of each large photo, the fractions of its longer side; few photos)
    holdout_gap: int = 0                    # region: pixels between a training part and a held-out band, dropped
    holdout_piece: int = 0                  # region: held-out bands cut into pieces about this long (0: about square)
    class_names: list[str] | None = None
    root: str = "data_cache/digits"         # digits: where scenes are generated
    num_train: int = 500
    num_val: int = 100
    num_tune: int = 100                     # digits: held-out scenes (val's digit pool, other scenes) for choosing
                                            # test-time settings without touching val (--split tune)
    seed: int = 0
    strict: bool = False                    # turn every skipped/repaired record into an error
    hflip_prob: float = 0.5
    hflip_keeps_class: bool = True          # False: a mirrored window teaches its objects' boxes, not their classes
                                            # (RetinaNet), for data whose mirror image may be another class
    rotate90: bool = False                  # random quarter turns (images seen from above: aerial, microscopy)
    photometric: bool = False               # basic augment: SSD's random brightness, contrast, saturation and hue
    shrink_at_load: bool = False            # training images the model would shrink are shrunk once, when loaded
    train_min_sizes: list[int] | None = None  # multi-scale training, one shorter side per batch; None: model.min_size
    augment: str = "basic"                  # basic (flip, multi-scale) | ssd (RefineDet)
    crop_size: int = 0                      # >0: train on object-centred crop_size windows at the image's scale
    crop_sizes: list[int] = field(default_factory=list)  # instead of crop_size: one window size per batch, of
                                            # batch_size x (largest / size)^2 windows (same pixels per batch)
    crop_model_pixels: bool = False         # crop sizes are in model input pixels: each image's window is cut at
                                            # size / the factor the model resizes that image by
    crop_min_visibility: float = 0.7        # a box cut by the window below this visible share is ignored
    tile_size: int = 0                      # >0: train on overlapping tiles of large images
    tile_overlap: int = 64
    tile_scale_as: list[int] | None = None  # [h, w]: tiles are resized as an h x w image would be (the evaluation
                                            # images' size), so their objects keep the scale they have at test time
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
    max_minutes: float = 0.0                # >0: fit the run to this much training time; max_iters stays the cap
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
    pretrain_augment: bool = False          # the warm-up crops get data's flips, quarter turns and photometric distortion
    pretrain_background: float = -1.0       # share of warm-up crops taken away from boxes, as one extra class;
                                            # -1 auto: 0.5 with one class (else the warm-up has nothing to learn), 0 else


@dataclass
class TestConfig:
    max_dets: list[int] = field(default_factory=lambda: [1, 10, 100])
    batch_size: int = 8
    num_vis: int = 6
    tta_scales: list[int] = field(default_factory=list)  # test-time augmentation of the final evaluation and of
                                            # `densedet eval`: one pass per input size (shorter side); [] = none
    tta_flip: bool = False                  # also each pass's horizontal mirror
    tta_rotate: bool = False                # also each pass's quarter turns (models trained with data.rotate90)
    tta_merge: str = "vote"                 # nms | vote | soft_vote | soft_nms_linear | soft_nms_gaussian
    tta_choose: bool = False                # after training, choose tta_scales / tta_flip on the tune split
                                            # (data.tune_fraction) among candidate sets; [] when none beats single scale


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
    if cls is ModelConfig:
        for key in unknown:
            if key in MOVED_MODEL_KEYS:
                raise ConfigError(f"{prefix}{key} is now {prefix}{MOVED_MODEL_KEYS[key]} (the model config "
                                  f"is split by family)")
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
            if len(parts) == 2 and parts[0] == "model" and parts[1] in MOVED_MODEL_KEYS:
                raise ConfigError(f"{key} is now model.{MOVED_MODEL_KEYS[parts[1]]} (the model config is split "
                                  f"by family) in override {item!r}")
            raise ConfigError(f"unknown key {key} in override {item!r}")
        try:
            node[parts[-1]] = _load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {err}") from None
    out = from_dict(Config, tree)
    validate(out)
    return out


Check = tuple[bool, str, str]           # (holds, key, what must hold)


def validate(cfg: Config) -> None:
    """Impossible values, caught before any work starts."""
    checks = [
        (cfg.solver.lr > 0, "solver.lr", f"must be > 0, got {cfg.solver.lr}"),
        (cfg.solver.optimizer in ("sgd", "adamw"), "solver.optimizer",
         f"must be sgd or adamw, got {cfg.solver.optimizer!r}"),
        (cfg.solver.schedule in ("multistep", "cosine"), "solver.schedule",
         f"must be multistep or cosine, got {cfg.solver.schedule!r}"),
        (all(s >= 32 for s in cfg.test.tta_scales), "test.tta_scales",
         f"must be input sizes >= 32, got {cfg.test.tta_scales}"),
        (cfg.test.tta_merge in TTA_MERGE_METHODS, "test.tta_merge",
         f"must be one of {', '.join(TTA_MERGE_METHODS)}, got {cfg.test.tta_merge!r}"),
        *_model_checks(cfg.model), *_train_checks(cfg), *_data_checks(cfg),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"{key}: {msg}")


def _model_checks(m: ModelConfig) -> list[Check]:
    checks: list[Check] = [
        (m.arch in ("retinanet", "refinedet"), "model.arch", f"must be retinanet or refinedet, got {m.arch!r}"),
        (m.num_classes > 0, "model.num_classes", f"must be > 0, got {m.num_classes}"),
        (0 <= m.score_thresh <= 1, "model.score_thresh", f"must be a score in [0, 1], got {m.score_thresh}"),
        (0 < m.nms_thresh <= 1, "model.nms_thresh", f"must be an IoU in (0, 1], got {m.nms_thresh}"),
    ]
    other = {"retinanet": "refinedet", "refinedet": "retinanet"}.get(m.arch)
    if other is not None:
        checks.append((getattr(m, other) == type(getattr(m, other))(), f"model.{other}",
                       f"is set, but model.arch is {m.arch}: a {m.arch} model would ignore it"))
    if m.arch == "retinanet":
        r = m.retinanet
        checks.append((0 <= r.bg_iou_thresh <= r.fg_iou_thresh <= 1, "model.retinanet.bg_iou_thresh",
                       f"need 0 <= bg_iou_thresh <= fg_iou_thresh <= 1, got {r.bg_iou_thresh}, {r.fg_iou_thresh}"))
        checks.append((m.scale_as is None or (len(m.scale_as) == 2 and min(m.scale_as) > 0), "model.scale_as",
                       f"must be [height, width], got {m.scale_as}"))
        checks.append((r.focal_gamma >= 0, "model.retinanet.focal_gamma", f"must be >= 0, got {r.focal_gamma}"))
        checks.append((r.focal_alpha <= 1, "model.retinanet.focal_alpha",
                       f"must be in [0, 1] (or negative: no weighting), got {r.focal_alpha}"))
        checks.append((r.class_ce_weight >= 0, "model.retinanet.class_ce_weight",
                       f"must be >= 0, got {r.class_ce_weight}"))
        checks.append((r.loss_normalizer in ("batch", "per_image"), "model.retinanet.loss_normalizer",
                       f"must be batch (the paper's) or per_image (torchvision's), got {r.loss_normalizer!r}"))
        if m.anchor_sizes is not None:
            checks.append((len(m.anchor_sizes) == r.max_level - r.min_level + 1, "model.anchor_sizes",
                           f"has {len(m.anchor_sizes)} entries but levels P{r.min_level}-P{r.max_level} need "
                           f"{r.max_level - r.min_level + 1}"))
        return checks
    size = m.refinedet.image_size
    checks.append((size > 0 and size % 64 == 0, "model.refinedet.image_size",
                   f"must be a multiple of 64 (RefineDet's TCB upsamples by 2 three times), got {size}"))
    # RefineDet warps every image to image_size (or, with scale_as, pads it there): RetinaNet's resize
    # settings cannot apply
    default = ModelConfig()
    for key, allowed in (("min_size", (default.min_size, size)), ("max_size", (default.max_size, size)),
                         ("fixed_size", (default.fixed_size, [size, size]))):
        checks.append((getattr(m, key) in allowed, f"model.{key}",
                       f"RefineDet warps every image to model.refinedet.image_size ({size}); set that instead "
                       f"of {key} (got {getattr(m, key)})"))
    return checks


def _train_checks(cfg: Config) -> list[Check]:
    t, m = cfg.train, cfg.model
    checks: list[Check] = [
        (t.batch_size > 0, "train.batch_size", f"must be > 0, got {t.batch_size}"),
        (t.max_iters > 0, "train.max_iters", f"must be > 0, got {t.max_iters}"),
        (t.max_minutes >= 0, "train.max_minutes", f"must be >= 0 (0: no time budget), got {t.max_minutes}"),
        (t.precision in ("auto", "fp32", "bf16"), "train.precision",
         f"must be auto, fp32 or bf16, got {t.precision!r}"),
        (0 <= t.ema_decay < 1, "train.ema_decay", f"must be in [0, 1), got {t.ema_decay}"),
        (t.pretrain_minutes >= 0 and t.pretrain_iters >= 0, "train.pretrain_minutes",
         "pretrain_minutes and pretrain_iters must be >= 0"),
        (t.pretrain_batch_size > 0, "train.pretrain_batch_size", f"must be > 0, got {t.pretrain_batch_size}"),
        (len(t.pretrain_crop_sizes) > 0 and all(s >= 16 for s in t.pretrain_crop_sizes), "train.pretrain_crop_sizes",
         f"must be a non-empty list of sizes >= 16, got {t.pretrain_crop_sizes}"),
        (0 <= t.pretrain_freeze_stages <= 5, "train.pretrain_freeze_stages",
         f"must be in 0..5, got {t.pretrain_freeze_stages}"),
        (t.pretrain_lr >= 0, "train.pretrain_lr", f"must be >= 0, got {t.pretrain_lr}"),
        (t.pretrain_background == -1 or 0 <= t.pretrain_background < 1, "train.pretrain_background",
         f"must be -1 (auto) or a share in [0, 1), got {t.pretrain_background}"),
    ]
    if t.pretrain_minutes > 0 or t.pretrain_iters > 0:
        checks.append((m.backbone.startswith("resnet"), "train.pretrain_minutes",
                       f"the box-crop warm-up needs a ResNet trunk, model.backbone is {m.backbone}"))
        checks.append((t.max_minutes <= 0 or t.pretrain_minutes < t.max_minutes, "train.pretrain_minutes",
                       f"({t.pretrain_minutes}) must leave part of train.max_minutes ({t.max_minutes}) for detection"))
    return checks


def _data_checks(cfg: Config) -> list[Check]:
    d, ssd = cfg.data, cfg.model.arch == "refinedet" or cfg.data.augment == "ssd"
    checks: list[Check] = [
        (d.format in ("coco", "voc", "csv", "digits"), "data.format",
         f"must be coco, voc, csv or digits, got {d.format!r}"),
        (d.val_format in ("", "coco", "voc", "csv"), "data.val_format",
         f"must be empty (data.format's), coco, voc or csv, got {d.val_format!r}"),
        (d.crop_size >= 0, "data.crop_size", f"must be >= 0, got {d.crop_size}"),
        (all(s >= 16 for s in d.crop_sizes), "data.crop_sizes", f"must be sizes >= 16, got {d.crop_sizes}"),
        (not (d.crop_sizes and d.crop_size), "data.crop_sizes",
         f"replaces data.crop_size; set one of them, got crop_size {d.crop_size} and {d.crop_sizes}"),
        (d.num_tune >= 0, "data.num_tune", f"must be >= 0, got {d.num_tune}"),
        (0 < d.crop_min_visibility <= 1, "data.crop_min_visibility", f"must be in (0, 1], got {d.crop_min_visibility}"),
        (d.val_max_images >= 0 and d.tune_max_images >= 0, "data.val_max_images",
         f"val_max_images and tune_max_images must be >= 0 (0: no cap), got {d.val_max_images} and "
         f"{d.tune_max_images}"),
        (0 <= d.val_fraction < 1 and 0 <= d.tune_fraction < 1 and d.val_fraction + d.tune_fraction < 1,
         "data.val_fraction", f"val_fraction and tune_fraction must be shares in [0, 1) leaving images to train on, "
         f"got {d.val_fraction} and {d.tune_fraction}"),
        (d.holdout in ("image", "region"), "data.holdout", f"must be image or region, got {d.holdout!r}"),
        (d.hflip_keeps_class or cfg.model.arch == "retinanet", "data.hflip_keeps_class",
         "false applies to RetinaNet's loss only (RefineDet's mirrored windows keep their classes, as in Caffe)"),
        (d.holdout_gap >= 0 and d.holdout_piece >= 0, "data.holdout_gap",
         f"holdout_gap and holdout_piece must be >= 0, got {d.holdout_gap} and {d.holdout_piece}"),
        (d.tile_scale_as is None or (len(d.tile_scale_as) == 2 and min(d.tile_scale_as) > 0), "data.tile_scale_as",
         f"must be [height, width], got {d.tile_scale_as}"),
        (not cfg.test.tta_choose or d.tune_fraction > 0 or (d.format == "digits" and d.num_tune > 0),
         "test.tta_choose", "needs a tune split to choose on: data.tune_fraction > 0 (or digits' data.num_tune)"),
    ]
    if d.train_min_sizes is not None:
        checks.append((len(d.train_min_sizes) > 0 and all(s > 0 for s in d.train_min_sizes), "data.train_min_sizes",
                       f"must be a non-empty list of positive sizes, got {d.train_min_sizes}"))
        checks.append((not ssd, "data.train_min_sizes",
                       "RefineDet / SSD augmentation train at the model's fixed size; leave it empty"))
    if d.crop_size or d.crop_sizes:
        checks.append((not ssd, "data.crop_size", "SSD augmentation (RefineDet) has its own random crop; leave it 0"))
    if d.crop_model_pixels:
        checks.append((bool(d.crop_size or d.crop_sizes) and cfg.model.scale_as is None, "data.crop_model_pixels",
                       "sizes windows (data.crop_sizes) for images resized each by its own size: needs windows and "
                       "no model.scale_as (one factor for every image: windows in image pixels do the same)"))
    if d.shrink_at_load:
        one_scale = not d.train_min_sizes or max(d.train_min_sizes) <= cfg.model.min_size
        checks.append((d.augment != "ssd" and d.tile_size == 0 and one_scale, "data.shrink_at_load",
                       "shrinks to the model's input size: needs no tiles (data.tile_size 0), no training scale "
                       "above model.min_size and not SSD's augmentation (its crops zoom into the full image)"))
        checks.append((cfg.model.scale_as is None, "data.shrink_at_load",
                       "with model.scale_as the model scales every image by one factor, a shrunk one too: "
                       "it would be shrunk twice"))
    return checks


def find_config(name: str) -> Path:
    """A config path as given, else a config shipped in the package (``densedet/configs``) by name,
    with or without ``.yaml`` (``configs/NAME.yaml`` too, so the checkout's paths work anywhere).
    The error lists the shipped names."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = files("densedet") / "configs"
    stem = path.name if path.parts[:-1] == ("configs",) else name
    for candidate in (shipped / stem, shipped / f"{stem}.yaml"):
        if candidate.is_file():
            return Path(str(candidate))
    names = sorted(p.name[:-len(".yaml")] for p in shipped.iterdir() if p.name.endswith(".yaml")) \
        if shipped.is_dir() else []
    raise FileNotFoundError(f"config {name!r} not found: neither a file nor a config shipped with densedet "
                            f"(available: {', '.join(names) or 'none'})")


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (keys not given keep their defaults) and apply overrides."""
    path = Path(path)
    try:
        data = _load_yaml(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a YAML config: not UTF-8 text, a binary file? ({err})") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    try:
        cfg = from_dict(Config, data)
        validate(cfg)
        return apply_overrides(cfg, overrides or [])
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

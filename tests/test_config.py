"""Typed configs: YAML round trip, overrides, and errors that name the key."""

from __future__ import annotations

import dataclasses
import re
import types
import typing

import pytest
import yaml

from densedet.config import (Config, ConfigError, ModelConfig, apply_overrides, from_dict, load_config, save_config,
                             to_dict, validate)


def test_yaml_round_trip_of_a_changed_config(tmp_path):
    cfg = Config()
    cfg.model.backbone = "resnet18"
    cfg.model.anchor_sizes = [16.0, 32.0, 64.0, 128.0]
    cfg.model.retinanet.max_level = 6
    cfg.model.fixed_size = [320, 320]
    cfg.model.min_size = [640, 672, 704]
    cfg.solver.lr = 0.005
    cfg.solver.steps = [10, 20]
    cfg.data.class_names = ["Tree"]
    cfg.train.output_dir = str(tmp_path / "run")
    path = tmp_path / "c.yaml"
    save_config(cfg, path)
    back = load_config(path)
    assert back == cfg
    assert to_dict(back) == yaml.safe_load(path.read_text())


def test_partial_yaml_keeps_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("solver:\n  lr: 0.02\nmodel:\n  num_classes: 3\n")
    cfg = load_config(path)
    assert cfg.solver.lr == 0.02 and cfg.model.num_classes == 3
    assert cfg.solver.momentum == 0.9 and cfg.model.backbone == "resnet50"


def test_override_solver_lr():
    cfg = apply_overrides(Config(), ["solver.lr=0.02"])
    assert cfg.solver.lr == 0.02 and isinstance(cfg.solver.lr, float)
    cfg = apply_overrides(Config(), ["solver.steps=[10,20]", "model.fixed_size=[256,256]", "train.batch_size=4"])
    assert cfg.solver.steps == [10, 20] and cfg.model.fixed_size == [256, 256] and cfg.train.batch_size == 4


def test_override_ints_are_accepted_for_floats():
    assert apply_overrides(Config(), ["solver.lr=1"]).solver.lr == 1.0


def test_load_config_applies_overrides_after_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("solver:\n  lr: 0.02\n")
    assert load_config(path, ["solver.lr=0.5"]).solver.lr == 0.5


@pytest.mark.parametrize("override,key", [
    ("solver.lrr=0.1", "solver.lrr"),
    ("solvr.lr=0.1", "solvr"),
    ("model.anchor_size=[1]", "model.anchor_size"),
])
def test_unknown_override_key_is_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        apply_overrides(Config(), [override])


def test_unknown_yaml_key_is_named_with_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  backbone: resnet18\n  fpn_chanels: 64\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "model.fpn_chanels" in str(err.value) and "bad.yaml" in str(err.value)


@pytest.mark.parametrize("override,key", [
    ("train.batch_size=abc", "train.batch_size"),
    ("train.batch_size=2.5", "train.batch_size"),
    ("solver.lr=fast", "solver.lr"),
    ("model.anchor_sizes=[32, big]", r"model\.anchor_sizes"),
    ("train.channels_last=3", "train.channels_last"),
])
def test_wrong_type_is_named(override, key):
    with pytest.raises(ConfigError, match=key):
        apply_overrides(Config(), [override])


def test_exponent_without_a_dot_is_a_float_on_the_command_line_and_in_yaml(tmp_path):
    """PyYAML follows YAML 1.1, where 1e-4 (no dot) is a string; a float field takes it as 1e-4."""
    cfg = apply_overrides(Config(), ["solver.lr=2e-3", "solver.weight_decay=.5E-4", "train.ema_decay=1e-9"])
    assert (cfg.solver.lr, cfg.solver.weight_decay, cfg.train.ema_decay) == (2e-3, 5e-5, 1e-9)
    path = tmp_path / "c.yaml"
    path.write_text("solver:\n  lr: 1e-2\n")
    assert load_config(path).solver.lr == 0.01
    with pytest.raises(ConfigError, match=r"train\.batch_size"):       # not where an int is expected
        apply_overrides(Config(), ["train.batch_size=1e3"])


def test_wrong_type_in_yaml_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("solver:\n  steps: 100\n")
    with pytest.raises(ConfigError, match=r"solver\.steps"):
        load_config(path)


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides(Config(), ["solver.lr"])


@pytest.mark.parametrize("override,key", [
    ("solver.lr=-0.01", "solver.lr"),
    ("solver.lr=0", "solver.lr"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.max_iters=-5", "train.max_iters"),
    ("train.max_minutes=-1", "train.max_minutes"),
    ("model.num_classes=0", "model.num_classes"),
    ("model.anchor_sizes=[32,64]", "model.anchor_sizes"),
    ("model.retinanet.bg_iou_thresh=0.6", "model.retinanet.bg_iou_thresh"),
    ("solver.optimizer=adam", "solver.optimizer"),
    ("data.crop_size=-1", "data.crop_size"),
    ("data.crop_min_visibility=1.5", "data.crop_min_visibility"),
    ("data.num_tune=-1", "data.num_tune"),
    ("model.arch=refinedet data.crop_size=160", "data.crop_size"),
    ("data.crop_size=160 data.crop_sizes=[64,160]", "data.crop_sizes"),
    ("data.crop_sizes=[8,64]", "data.crop_sizes"),
    ("test.tta_scales=[320,8]", "test.tta_scales"),
    ("test.tta_merge=mean", "test.tta_merge"),
    ("model.retinanet.class_ce_weight=-0.5", "model.retinanet.class_ce_weight"),
    ("model.arch=refinedet model.retinanet.class_ce_weight=0.5", "model.retinanet"),
    ("model.refinedet.neg_pos_ratio=2", "model.refinedet"),
    ("model.arch=refinedet model.min_size=300", "model.min_size"),
    ("model.arch=yolo", "model.arch"),
    ("model.retinanet.loss_normalizer=per_batch", "model.retinanet.loss_normalizer"),
    ("train.pretrain_lr=-0.001", "train.pretrain_lr"),
    ("train.pretrain_freeze_stages=6", "train.pretrain_freeze_stages"),
    ("train.pretrain_crop_sizes=[]", "train.pretrain_crop_sizes"),
    ("train.pretrain_crop_sizes=[8,64]", "train.pretrain_crop_sizes"),
    ("train.ema_decay=1.0", "train.ema_decay"),
    ("train.ema_decay=-0.5", "train.ema_decay"),
])
def test_impossible_values_are_rejected_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        apply_overrides(Config(), override.split())


def test_anchor_sizes_count_must_match_the_levels():
    cfg = Config()
    cfg.model.retinanet.max_level = 6
    cfg.model.anchor_sizes = [16.0, 32.0, 64.0, 128.0]
    validate(cfg)                                   # P3-P6: 4 levels
    cfg.model.anchor_sizes = [16.0, 32.0, 64.0, 128.0, 256.0]
    with pytest.raises(ConfigError, match=r"model\.anchor_sizes.*5 entries.*P3-P6 need 4"):
        validate(cfg)


def test_refinedet_image_size_must_be_a_multiple_of_64():
    cfg = Config()
    cfg.model.arch = "refinedet"
    cfg.model.refinedet.image_size = 512
    validate(cfg)
    cfg.model.refinedet.image_size = 300
    with pytest.raises(ConfigError, match=r"model\.refinedet\.image_size.*multiple of 64.*300"):
        validate(cfg)


def test_mirrored_windows_without_classes_are_retinanets_only():
    cfg = Config()
    cfg.data.hflip_keeps_class = False
    validate(cfg)                                   # RetinaNet's loss honours the mark
    cfg.model.arch = "refinedet"
    with pytest.raises(ConfigError, match=r"data\.hflip_keeps_class.*RetinaNet's loss only"):
        validate(cfg)


@pytest.mark.parametrize("old,new", [("focal_gamma", "model.retinanet.focal_gamma"),
                                     ("negpos_ratio", "model.refinedet.neg_pos_ratio"),
                                     ("arm_filter_thresh", "model.refinedet.objectness_threshold"),
                                     ("refinedet_size", "model.refinedet.image_size")])
def test_a_key_of_the_flat_model_config_names_its_new_place(tmp_path, old, new):
    path = tmp_path / "old.yaml"
    path.write_text(f"model:\n  {old}: 1\n")
    message = re.escape(f"model.{old} is now {new}")
    with pytest.raises(ConfigError, match=re.escape(str(path)) + ": " + message):
        load_config(path)
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), [f"model.{old}=1"])


def test_an_old_checkpoint_config_is_upgraded_to_the_split():
    from densedet.config import upgrade_config_dict
    tree = to_dict(Config())
    flat = {**{k: v for k, v in tree["model"].items() if k not in ("retinanet", "refinedet")},
            "focal_gamma": 1.0, "head_convs": 2, "max_level": 6, "negpos_ratio": 3}
    cfg = from_dict(Config, upgrade_config_dict({**tree, "model": flat}))
    assert (cfg.model.retinanet.focal_gamma, cfg.model.retinanet.head_convs, cfg.model.retinanet.max_level) == \
        (1.0, 2, 6)
    refine = {**flat, "arch": "refinedet", "fpn_channels": 128, "fg_iou_thresh": 0.6, "refinedet_size": 512,
              "arm_filter_thresh": 0.02, "min_size": 512, "max_size": 512, "fixed_size": [512, 512]}
    cfg = from_dict(Config, upgrade_config_dict({**tree, "model": refine}))
    validate(cfg)
    assert cfg.model.refinedet == dataclasses.replace(cfg.model.refinedet, image_size=512, tcb_channels=128,
                                                      iou_threshold=0.6, objectness_threshold=0.02)
    assert upgrade_config_dict(tree) is tree


def test_from_dict_checks_nested_types_and_builds_dataclasses():
    cfg = from_dict(Config, {"model": {"fixed_size": [320, 320]}, "solver": {"lr": 0.1}})
    assert isinstance(cfg.model, ModelConfig) and cfg.model.fixed_size == [320, 320]
    with pytest.raises(ConfigError, match="model: expected a mapping"):
        from_dict(Config, {"model": [1, 2]})


def _other_value(value, hint):
    """A value of type ``hint`` other than ``value``."""
    if dataclasses.is_dataclass(value):
        return _changed(value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + (1 if isinstance(value, int) else 0.5)
    if isinstance(value, str):
        return value + "_x"
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    arms = [a for a in (typing.get_args(hint) if union else [hint]) if a is not type(None)]
    lists = [a for a in arms if typing.get_origin(a) is list]
    if lists:                                         # a list (or None where a list may stand)
        return [{int: 7, float: 0.5, str: "a"}[typing.get_args(lists[0])[0]]] + list(value or [])
    return {str: "x", int: 3, float: 0.5}[arms[0]]    # None where a scalar may stand


def _changed(obj):
    """``obj`` (a dataclass) with a value other than its default in every field, nested ones too."""
    hints = typing.get_type_hints(type(obj))
    return dataclasses.replace(obj, **{f.name: _other_value(getattr(obj, f.name), hints[f.name])
                                       for f in dataclasses.fields(obj)})


@pytest.mark.parametrize("section", [f.name for f in dataclasses.fields(Config)])
def test_every_field_survives_a_yaml_round_trip(section):
    # Every field (the list comes from the dataclasses) with a non-default value: nothing is lost or re-typed.
    cfg = dataclasses.replace(Config(), **{section: _changed(getattr(Config(), section))})
    assert all(getattr(getattr(cfg, section), f.name) != getattr(getattr(Config(), section), f.name)
               for f in dataclasses.fields(getattr(cfg, section)))
    back = from_dict(Config, yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    assert back == cfg


def test_missing_and_invalid_yaml_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)

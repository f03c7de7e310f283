"""``densedet train`` (a YAML config with overrides, or ``--data`` alone) and ``densedet demo`` (the digit-scene main job).

``densedet train --data TRAIN [--val VAL] [--minutes N] [--weights W] [--model NAME] [--no-flip]
[--top-down] [--images DIR]`` needs no config: it reads the annotations (COCO json, Pascal VOC xml
folder or glob, or CSV; the format is detected), derives every setting from them
(:mod:`densedet.recipe`), prints each value with its reason, writes the config to the run folder
(``densedet train RUN/config.yaml`` reruns it) and trains. ``key.sub=value`` overrides apply on top
of the derived values.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..analysis import dataset_statistics
from ..config import ModelConfig, apply_overrides, find_config, from_dict, load_config, save_config, upgrade_config_dict
from ..data import DetectionData, align_classes, load_coco, load_csv, load_voc
from ..data.formats import detect_format
from ..data.images import image_folder_beside
from ..engine.data import carve, check_image_files, resolve_paths
from ..engine.trainer import train
from ..engine.tune import record_choice
from ..errors import UsageError
from ..recipe import (DataSummary, RecipeOptions, base_config, derive, format_table, holdout, parse_model_name,
                      recipe_config)
from ..serialization import load_tensors
from . import require_folder

__all__ = ["add_parser", "run_train", "run_demo"]

# The columns of the demo's closing table (COCO metrics of the validation scenes).
DEMO_METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"]

# Under torchrun every process meets the same bad input: a process other than rank 0 waits this long before
# it reports its error, and torchrun, seeing rank 0 fail, stops it first (one message, not one a process).
# An error of that process alone is still reported, this much later.
OTHER_RANKS_REPORT_AFTER_S = 5.0


def _reported_by_rank0(verb: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(verb)
    def run(args: argparse.Namespace) -> int:
        try:
            return verb(args)
        except Exception:
            if int(os.environ.get("RANK", "0") or 0) > 0:
                time.sleep(OTHER_RANKS_REPORT_AFTER_S)
            raise
    return run


@_reported_by_rank0
def run_train(args: argparse.Namespace) -> int:
    """``densedet train``: returns the exit code."""
    if args.config and "=" in args.config and not os.path.exists(args.config):
        # `densedet train --data X key=value`: argparse hands the first override to the optional CONFIG
        args.overrides, args.config = [args.config, *args.overrides], None
    require_folder(args.output_dir, "--output-dir", "the run: checkpoints, metrics, report")
    if args.data:
        return _train_from_data(args)
    if not args.config and args.resume and args.output_dir and os.path.isfile(os.path.join(args.output_dir, "config.yaml")):
        args.config = os.path.join(args.output_dir, "config.yaml")      # a run folder resumes with its own config
    if not args.config:
        raise UsageError("give a config (densedet train CONFIG) or the training annotations (densedet train --data FILE)")
    for flag in ("val", "images", "model", "minutes"):
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag} goes with --data (a config names its data and model itself)")
    if args.no_flip:
        raise UsageError("--no-flip goes with --data (with a config: data.hflip_prob=0)")
    if args.top_down:
        raise UsageError("--top-down goes with --data (with a config: data.rotate90=true)")
    cfg = load_config(find_config(args.config), args.overrides)
    if args.output_dir:
        cfg.train.output_dir = args.output_dir
    summary = train(cfg, resume=args.resume, init_weights=args.weights)
    record_choice(cfg.train.output_dir, summary)
    return 0


# -- densedet train --data ------------------------------------------------------------------------

# Model settings derived from the data that a detection checkpoint's weights do not fix.
DETECTION_CHECKPOINT_KEEPS = ("model.min_size", "model.max_size", "model.scale_as", "model.detections_per_img")


def read_annotations(spec: str, images: str | None, class_names: list[str] | None = None
                     ) -> tuple[DetectionData, str, list[str], str]:
    """Read an annotation path (COCO json, CSV file, VOC xml file / folder / glob / comma list), format
    detected. Image paths are relative to ``images``, else to the annotation file's folder, else to a
    folder named as the file beside it, else to a JPEGImages/ or images/ folder beside the annotations'
    folder (Pascal VOC's layout). Returns the data, the format, the resolved paths and the image folder
    used ("" for the default: beside the annotations)."""
    paths = resolve_paths(spec, "--data")
    kind = detect_format(paths)

    def read(folder: str | None) -> DetectionData:
        if kind == "coco":
            return load_coco(paths[0], folder if folder is not None else os.path.dirname(paths[0]))
        if kind == "csv":
            return load_csv(paths[0], image_root=folder, class_names=class_names)
        return load_voc(paths if len(paths) > 1 else paths[0], image_dir=folder, class_names=class_names)

    data = read(images)
    if images is None:
        images = _images_elsewhere(data, kind, paths[0])
        if images:
            data = read(images)
    return data, kind, paths, images or ""


def _images_elsewhere(data: DetectionData, kind: str, path: str) -> str | None:
    """The folder that holds the first image when it is not where the annotations put it by default:
    one named as the annotation file beside it (``train.json`` and ``train/``, as densedet's digit
    scenes are written; not for VOC), or a JPEGImages/ or images/ folder beside the annotations' folder
    (Pascal VOC's ``Annotations/`` and ``JPEGImages/``)."""
    if not data.records or os.path.exists(data.records[0].file_name):
        return None
    base = path if os.path.isdir(path) else os.path.dirname(path)
    first = os.path.relpath(data.records[0].file_name, base)
    named = os.path.splitext(path)[0]
    if kind != "voc" and os.path.isfile(os.path.join(named, first)):
        return named
    return image_folder_beside(first, path)


def weights_kind(path: str) -> str:
    """``imagenet`` (a trunk's state dict: torchvision ResNet / VGG keys) or ``detection`` (a densedet
    checkpoint or a whole detector's state dict), from the file's keys."""
    state = load_tensors(path, "weights file")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        return "detection"
    keys = list(state) if isinstance(state, dict) else []
    if any(k.startswith(("backbone.", "head.", "arm.", "odm.", "tcb")) for k in keys):
        return "detection"
    if any(k.startswith(("layer1.", "conv1.", "features.")) for k in keys):
        return "imagenet"
    raise UsageError(f"{path}: neither an ImageNet trunk (torchvision ResNet/VGG keys) nor a detection "
                     f"checkpoint (keys such as {', '.join(keys[:3]) or 'none'})")


def _train_from_data(args: argparse.Namespace) -> int:
    """Derive the config from ``--data`` (:mod:`densedet.recipe`), print and save it, then train."""
    if args.config:
        raise UsageError(f"give either a config ({args.config}) or --data, not both")
    if args.minutes is not None and not args.minutes > 0:
        raise UsageError(f"--minutes {args.minutes:g}: the training time budget must be more than 0 minutes")
    train_data, kind, paths, train_images = read_annotations(args.data, args.images)
    val_data = None
    if args.val:
        val_data, val_kind, val_paths, val_images = read_annotations(args.val, args.images)
        val_data = align_classes(val_data, train_data.class_names)     # matched by name, in the training order
        if not any((~r.iscrowd).any() for r in val_data.records):
            raise UsageError(f"{args.val}: the validation annotations hold no objects ({len(val_data.records)} "
                             f"images, none with a box that is not a crowd region), so AP cannot be measured on "
                             f"them; give a validation set with annotated objects, or leave --val out to hold "
                             f"out 10% of --data's images")
    # Before any rule reads them: an annotated size the file disagrees with (an EXIF turn, say) would
    # derive settings from wrong sizes and report sound boxes as lying outside their images.
    for data in (train_data, val_data):
        if data is not None:
            check_image_files(data)
    kind_of_weights = weights_kind(args.weights) if args.weights else None
    options = RecipeOptions(model=args.model or "retinanet_r18_fpn", minutes=10.0 if args.minutes is None else args.minutes,
                            weights=args.weights, weights_kind=kind_of_weights, flip=not args.no_flip,
                            top_down=args.top_down, has_val=val_data is not None)
    base = base_config(options.model)
    if kind_of_weights == "detection":
        base.model = _checkpoint_model(args.weights, base)
        _check_checkpoint_fits(args, base.model, len(train_data.class_names))
        base.model.scale_as = None          # how images are resized follows the new data (derived below)
    # the held-out splits are decided on all the training images; the other rules see the images trained on
    try:
        held_out = holdout(DataSummary.from_data(train_data, val_data), val_data is not None)
    except UsageError as err:           # too few images to hold any out: name the file
        raise UsageError(f"{args.data}: {err}") from None
    split_config = dataclasses.replace(base.data, **{r.key[len("data."):]: r.value for r in held_out
                                                    if r.key.startswith("data.")})
    parts = carve(split_config, train_data)
    rows = derive(DataSummary.from_data(parts["train"], val_data or parts.get("val")), options, held_out)
    if kind_of_weights == "detection":     # the checkpoint's architecture and anchors are tied to its weights
        rows = [r for r in rows if not r.key.startswith("model.") or r.key in DETECTION_CHECKPOINT_KEEPS]
    cfg = recipe_config(rows, base)
    cfg.data.format = kind
    cfg.data.train = ",".join(paths)
    cfg.data.train_images = train_images
    if val_data is not None:
        cfg.data.val, cfg.data.val_images = ",".join(val_paths), val_images
        cfg.data.val_format = val_kind if val_kind != kind else ""
    if kind != "coco":
        cfg.data.class_names = list(train_data.class_names)
    cfg.train.output_dir = args.output_dir or cfg.train.output_dir
    cfg = apply_overrides(cfg, args.overrides)
    out = Path(cfg.train.output_dir)
    if int(os.environ.get("RANK", "0")) == 0:       # under torchrun every process derives; one says and writes
        _say_and_write(args, cfg, rows, kind, train_data, parts["train"], out)
    summary = train(cfg, resume=args.resume,
                    init_weights=args.weights if kind_of_weights == "detection" else None)
    record_choice(out, summary)
    return 0


def _say_and_write(args: argparse.Namespace, cfg, rows, kind: str, train_data: DetectionData,
                   trained: DetectionData, out: Path) -> None:
    """The derived table on stderr, and the run folder's config.yaml, derived.txt and data_statistics.json."""
    print(f"densedet train --data {args.data}: {kind} annotations, {len(train_data.records)} images; "
          f"settings derived from the data:", file=sys.stderr)
    print(format_table(rows), file=sys.stderr)
    if args.overrides:
        print(f"overrides on top: {' '.join(args.overrides)}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    (out / "derived.txt").write_text(format_table(rows) + "\n")
    # the statistics behind the rules, as `densedet analyze` reports them
    (out / "data_statistics.json").write_text(json.dumps(dataset_statistics(trained), indent=1))
    print(f"config written to {out / 'config.yaml'} (rerun: densedet train {out / 'config.yaml'})", file=sys.stderr)


def _check_checkpoint_fits(args: argparse.Namespace, model: ModelConfig, num_classes: int) -> None:
    """A detection checkpoint's architecture and class count are tied to its weights: ``--model``
    cannot name another, and the data must have as many classes."""
    if args.model:
        size = model.refinedet.image_size if model.arch == "refinedet" else 0
        if parse_model_name(args.model) != (model.arch, model.backbone, size):
            raise UsageError(f"{args.weights}: a {model.arch}{size or ''} {model.backbone} detector; --model {args.model} "
                             f"names another (leave --model out to fine-tune this one)")
    if num_classes != model.num_classes:
        raise UsageError(f"{args.weights}: a detector of {model.num_classes} classes; the data has {num_classes} "
                         f"(fine-tune from an ImageNet trunk instead)")


def _checkpoint_model(path: str, base):
    """The model config a densedet detection checkpoint was trained with (its architecture and anchors
    are tied to the weights), or ``base``'s when the file holds weights alone."""
    state = load_tensors(path, "weights file")
    saved = state.get("config") if isinstance(state, dict) else None
    if isinstance(saved, dict) and "model" in saved:
        return from_dict(ModelConfig, upgrade_config_dict(saved)["model"], "model.")
    return base.model


def _print_demo_table(metrics: dict[str, Any]) -> None:
    """The demo's Markdown table: one row per evaluation (single scale, and TTA when the config has it)."""
    rows = [("single scale", metrics["single_scale"])] if "single_scale" in metrics else []
    tta = metrics.get("tta")
    rows.append((f"TTA {'/'.join(map(str, tta['scales']))} {tta['merge']}" if tta else "single scale", metrics))
    print("\n| evaluation | " + " | ".join(DEMO_METRICS) + " | train min | img/s |")
    print("|" + "---|" * (len(DEMO_METRICS) + 3))
    for name, numbers in rows:
        print(f"| {name} | " + " | ".join(f"{numbers[k]:.3f}" for k in DEMO_METRICS) +
              f" | {metrics['train_minutes']:.1f} | {metrics['images_per_s']:.1f} |")


@_reported_by_rank0
def run_demo(args: argparse.Namespace) -> int:
    """``densedet demo``: train on the digit scenes for the time budget, evaluate, print the table."""
    overrides = list(args.overrides)
    if args.minutes is not None:
        if not args.minutes > 0:        # 0 would mean no budget: the demo's 100000 steps
            raise UsageError(f"--minutes {args.minutes:g}: the training time budget must be more than 0 minutes")
        overrides.append(f"train.max_minutes={args.minutes}")
    cfg = load_config(find_config(args.config), overrides)
    if args.output_dir:
        cfg.train.output_dir = args.output_dir
    require_folder(cfg.train.output_dir, "--output-dir" if args.output_dir else "train.output_dir",
                   "the run: checkpoints, metrics, report")
    m = cfg.model
    family = (f"RetinaNet {m.backbone}-FPN" if m.arch == "retinanet"
              else f"RefineDet{m.refinedet.image_size} {m.backbone}")
    print(f"densedet demo: {cfg.data.num_train} training / {cfg.data.num_val} validation digit scenes in "
          f"{cfg.data.root}; {family} for {cfg.train.max_minutes:g} minutes; "
          f"run folder {cfg.train.output_dir}", file=sys.stderr)
    metrics = train(cfg, resume=args.resume)
    _print_demo_table(metrics)
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``densedet demo`` and ``densedet train``."""
    p = subparsers.add_parser(
        "demo", help="the main job: generate digit scenes, train RetinaNet R18-FPN, evaluate",
        description="Generate 500 training and 100 validation scenes of real MNIST digits (no "
        "download), train RetinaNet ResNet-18-FPN for a fixed time budget on this machine, evaluate "
        "COCO AP on the validation scenes and print a table. The run folder holds the checkpoints, "
        "metrics.json, metrics.jsonl, curves.png and drawn predictions.")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    p.add_argument("--config", default="demo_digits.yaml", help="config (default: configs/demo_digits.yaml)")
    p.add_argument("--minutes", type=float, help="training time budget in minutes (default from the config: 10)")
    p.add_argument("--output-dir", help="run folder (default from the config)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo run")
    p.set_defaults(func=run_demo)

    p = subparsers.add_parser(
        "train", help="train a model from a YAML config, or from annotations alone (--data)",
        description="Train from a YAML config with key.sub=value overrides, or from annotations alone: "
        "--data TRAIN derives every setting from the data (printed with the reason for each, written to "
        "the run folder's config.yaml) and trains. Several processes: "
        "torchrun --nproc_per_node N -m densedet train CONFIG.")
    p.add_argument("config", nargs="?", help="YAML config file, or a name in configs/ (not with --data)")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value, e.g. solver.lr=0.02")
    p.add_argument("--data", help="training annotations: a COCO json, a Pascal VOC folder / xml glob, or a CSV "
                   "(image_path,x1,y1,x2,y2,label); no config needed")
    p.add_argument("--val", help="validation annotations (default: 10%% of --data's images, held out)")
    p.add_argument("--images", help="folder the annotations' image names are relative to (default: the "
                   "annotation file's folder)")
    p.add_argument("--minutes", type=float, help="with --data: training time budget in minutes (default 10)")
    p.add_argument("--model", help="with --data: retinanet_r18_fpn (default), retinanet_r34_fpn / r50 / r101, or "
                   "refinedet320_r18, refinedet320_vgg16, refinedet512_...")
    p.add_argument("--no-flip", action="store_true", help="with --data: no horizontal flips (objects whose mirror "
                   "is another thing: digits, text)")
    p.add_argument("--top-down", action="store_true", help="with --data: images seen from above (aerial, satellite, "
                   "microscopy): also train on quarter turns")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last.pt exactly where it stopped "
                   "(without a config: with OUTPUT_DIR/config.yaml)")
    p.add_argument("--weights", help="initialise the model from a checkpoint or state dict (fine-tuning); with "
                   "--data: an ImageNet trunk or a detection checkpoint, and the fine-tuning recipe")
    p.add_argument("--output-dir", help="run folder (overrides train.output_dir)")
    p.set_defaults(func=run_train)

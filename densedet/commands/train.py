"""``densedet train`` (a YAML config with overrides) and ``densedet demo`` (the digit-scene main job)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..config import find_config, load_config
from ..engine.trainer import train

__all__ = ["add_parser", "run_train", "run_demo"]

# The columns of the demo's closing table (COCO metrics of the validation scenes).
DEMO_METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"]


def run_train(args: argparse.Namespace) -> int:
    """``densedet train``: returns the exit code."""
    cfg = load_config(find_config(args.config), args.overrides)
    if args.output_dir:
        cfg.train.output_dir = args.output_dir
    train(cfg, resume=args.resume, init_weights=args.weights)
    return 0


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


def run_demo(args: argparse.Namespace) -> int:
    """``densedet demo``: train on the digit scenes for the time budget, evaluate, print the table."""
    overrides = list(args.overrides)
    if args.minutes is not None:
        overrides.append(f"train.max_minutes={args.minutes}")
    cfg = load_config(find_config(args.config), overrides)
    if args.output_dir:
        cfg.train.output_dir = args.output_dir
    print(f"densedet demo: {cfg.data.num_train} training / {cfg.data.num_val} validation digit scenes in "
          f"{cfg.data.root}; RetinaNet {cfg.model.backbone}-FPN for {cfg.train.max_minutes:g} minutes; "
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
        "train", help="train a model from a YAML config",
        description="Train from a YAML config with key.sub=value overrides. Several processes: "
        "torchrun --nproc_per_node N -m densedet train CONFIG.")
    p.add_argument("config", help="YAML config file, or a name in configs/")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value, e.g. solver.lr=0.02")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last.pt exactly where it stopped")
    p.add_argument("--weights", help="initialise the model from a checkpoint or state dict (fine-tuning)")
    p.add_argument("--output-dir", help="run folder (overrides train.output_dir)")
    p.set_defaults(func=run_train)

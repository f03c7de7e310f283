"""The ``densedet`` command.

    densedet demo                       generate the digit scenes, train, evaluate (the main job)
    densedet train CONFIG [k=v ...]     train from a YAML config (torchrun for several processes)
    densedet eval  ...                  COCO/VOC metrics of a checkpoint, or of a results file
    densedet predict / export / bench / analyze / ablate   (see each --help)
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

__all__ = ["main", "find_config"]

# Modules that register further verbs through ``add_parser(subparsers)``.
_VERB_MODULES = ["densedet.predict", "densedet.export", "densedet.commands.bench", "densedet.analysis",
                 "densedet.commands.ablate"]


def find_config(name: str) -> Path:
    """A config path as given, else a config shipped in the package (``densedet/configs``) by name,
    with or without ``.yaml`` (``configs/NAME.yaml`` too, so the checkout's paths work anywhere).
    The error lists the shipped names."""
    path = Path(name)
    if path.is_file():
        return path
    from importlib.resources import files
    shipped = files("densedet") / "configs"
    stem = path.name if path.parts[:-1] == ("configs",) else name
    for candidate in (shipped / stem, shipped / f"{stem}.yaml"):
        if candidate.is_file():
            return Path(str(candidate))
    names = sorted(p.name[:-len(".yaml")] for p in shipped.iterdir() if p.name.endswith(".yaml")) \
        if shipped.is_dir() else []
    raise FileNotFoundError(f"config {name!r} not found: neither a file nor a config shipped with densedet "
                            f"(available: {', '.join(names) or 'none'})")


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine.trainer import train
    cfg = load_config(find_config(args.config), args.overrides)
    if args.output_dir:
        cfg.train.output_dir = args.output_dir
    train(cfg, resume=args.resume, init_weights=args.weights)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine.trainer import train
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
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"]
    rows = [("single scale", metrics["single_scale"])] if "single_scale" in metrics else []
    tta = metrics.get("tta")
    rows.append((f"TTA {'/'.join(map(str, tta['scales']))} {tta['merge']}" if tta else "single scale", metrics))
    print("\n| evaluation | " + " | ".join(keys) + " | train min | img/s |")
    print("|" + "---|" * (len(keys) + 3))
    for name, numbers in rows:
        print(f"| {name} | " + " | ".join(f"{numbers[k]:.3f}" for k in keys) +
              f" | {metrics['train_minutes']:.1f} | {metrics['images_per_s']:.1f} |")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    max_dets = tuple(args.max_dets)
    if args.results:
        if not args.annotations:
            raise SystemExit("densedet eval --results needs --annotations")
        from .commands.eval import eval_results_main
        eval_results_main(args.results, args.annotations, metric=args.metric, out=args.out, max_dets=max_dets,
                          plot_dir=args.plot_dir)
        return 0
    if not args.weights:
        raise SystemExit("densedet eval needs --weights CKPT (evaluate a model) or --results R.json --annotations A.json")
    from .config import apply_overrides
    from .device import default_device, resolve_precision
    from .engine.checkpoint import model_from_checkpoint
    from .engine.data import load_split
    from .engine.evaluate import predict_dataset
    from .tta import tta_from_config
    from .data import to_coco_dict
    from .evaluation import evaluate_coco, evaluate_voc_from_coco, format_table, format_voc_table, plot_pr_curves
    model, cfg, _ = model_from_checkpoint(args.weights)
    cfg = apply_overrides(cfg, args.overrides)
    model_keys = [o.split("=", 1)[0].strip()[len("model."):] for o in args.overrides
                  if o.strip().startswith("model.")]
    if model_keys:  # model.* overrides (score_thresh, min_size, ...) must reach the model, not only cfg
        model, _, _ = model_from_checkpoint(args.weights, **{k: getattr(cfg.model, k) for k in model_keys})
    device = default_device()
    dtype = resolve_precision(args.precision, device)
    model.to(device)
    data = load_split(cfg.data, args.split)
    if data.num_classes != cfg.model.num_classes:
        from .config import ConfigError
        raise ConfigError(f"model.num_classes of {args.weights} is {cfg.model.num_classes} but the {args.split} data "
                          f"has {data.num_classes} classes ({', '.join(data.class_names[:12])})")
    tta = tta_from_config(cfg.test)
    if tta is not None:
        print(f"test-time augmentation (test.tta_*): {tta.describe()}; test.tta_scales=[] evaluates single-scale",
              file=sys.stderr)
    results = predict_dataset(model, data, cfg.test.batch_size, device, dtype, tta=tta)
    gt = to_coco_dict(data)
    if args.metric == "coco":
        metrics = evaluate_coco(results, gt, max_dets=max_dets, class_names=data.class_names)
        print(format_table(metrics))
    else:
        metrics = evaluate_voc_from_coco(results, gt, use_07_metric=args.metric == "voc07")
        print(format_voc_table(metrics))
    if args.plot_dir:
        plot_pr_curves(metrics, args.plot_dir)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(
            {k: v for k, v in metrics.items() if k not in ("curves", "precision", "recall")}, indent=2, default=float))
        Path(args.out).with_name(Path(args.out).stem + "_detections.json").write_text(json.dumps(results))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="densedet", description="One-stage dense object detection "
                                     "(RetinaNet, RefineDet): train, evaluate, predict, export, benchmark.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="the main job: generate digit scenes, train RetinaNet R18-FPN, evaluate",
                       description="Generate 500 training and 100 validation scenes of real MNIST digits (no "
                       "download), train RetinaNet ResNet-18-FPN for a fixed time budget on this machine, evaluate "
                       "COCO AP on the validation scenes and print a table. The run folder holds the checkpoints, "
                       "metrics.json, metrics.jsonl, curves.png and drawn predictions.")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    p.add_argument("--config", default="demo_digits.yaml", help="config (default: configs/demo_digits.yaml)")
    p.add_argument("--minutes", type=float, help="training time budget in minutes (default from the config: 10)")
    p.add_argument("--output-dir", help="run folder (default from the config)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo run")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("train", help="train a model from a YAML config",
                       description="Train from a YAML config with key.sub=value overrides. Several processes: "
                       "torchrun --nproc_per_node N -m densedet train CONFIG.")
    p.add_argument("config", help="YAML config file, or a name in configs/")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value, e.g. solver.lr=0.02")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last.pt exactly where it stopped")
    p.add_argument("--weights", help="initialise the model from a checkpoint or state dict (fine-tuning)")
    p.add_argument("--output-dir", help="run folder (overrides train.output_dir)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="COCO / VOC metrics of a checkpoint or of a results file",
                       description="Evaluate a checkpoint on its config's validation split (--weights), or an "
                       "existing COCO results file against COCO annotations without a model (--results, "
                       "--annotations). A checkpoint whose config sets test.tta_scales is evaluated with that "
                       "test-time augmentation (override test.tta_scales=[] for single scale). Prints the table; "
                       "--out writes the numbers as JSON.")
    p.add_argument("overrides", nargs="*", help="config overrides for --weights, e.g. data.val=other.json")
    p.add_argument("--weights", help="a densedet checkpoint")
    p.add_argument("--results", help="a COCO results JSON to evaluate without a model")
    p.add_argument("--annotations", help="COCO annotations JSON (with --results)")
    p.add_argument("--metric", choices=["coco", "voc07", "voc10"], default="coco")
    p.add_argument("--max-dets", type=int, nargs=3, default=[1, 10, 100], metavar=("D1", "D2", "D3"),
                   help="COCO maxDets (default 1 10 100; the last one caps AP too)")
    p.add_argument("--split", choices=["train", "val", "tune"], default="val",
                   help="tune: the digit scenes held out for choosing test-time settings (data.num_tune)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--out", help="write metrics JSON here")
    p.add_argument("--plot-dir", help="write precision-recall curves (PNG) here")
    p.set_defaults(func=_cmd_eval)

    for name in _VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:   # a verb whose module is not part of this install
                continue
            raise
        module.add_parser(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line; ``key.sub=value`` overrides may also follow options
    (``densedet train cfg.yaml --weights w.pt solver.lr=0.01``), which plain argparse refuses."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides or []) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = parse_args(argv)
    from .config import ConfigError
    from .data import DatasetError
    from .engine.checkpoint import CheckpointError
    try:
        return int(args.func(args) or 0)
    except (ConfigError, DatasetError, CheckpointError, FileNotFoundError) as err:
        print(f"densedet {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

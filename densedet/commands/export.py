"""``densedet export``: a checkpoint to ONNX or OpenVINO, fp32 or int8, with post-processing inside
(:func:`densedet.deploy.export_deployable`; plain ONNX is :func:`densedet.export.export_onnx`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..config import apply_overrides, to_dict
from ..engine.checkpoint import model_from_checkpoint
from ..errors import UsageError
from ..export import sidecar_path

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register ``densedet export --weights CKPT --format onnx|openvino --out FILE [--int8 --calib-images N]``."""
    p = subparsers.add_parser("export", help="export a checkpoint to ONNX or OpenVINO, fp32 or int8 "
                                             "(post-processing included)",
                              description="Export a densedet checkpoint with decoding, NMS and top-k inside the "
                                          "graph, plus a JSON sidecar, for densedet predict/eval --backend "
                                          "onnxruntime|openvino and densedet.onnx_runner. --int8 quantizes the "
                                          "network body (post-training static, calibrated on training images of "
                                          "the checkpoint's config; config overrides such as data.root=... "
                                          "change where they are read). Needs pip install 'densedet[deploy]'.")
    p.add_argument("overrides", nargs="*", help="config overrides for the calibration data, e.g. data.train=x.json")
    p.add_argument("--weights", required=True, help="densedet checkpoint (.pt)")
    p.add_argument("--format", default="onnx", choices=["onnx", "openvino"],
                   help="onnx (runs with onnxruntime) or openvino (IR .xml + .bin)")
    p.add_argument("--out", required=True,
                   help="output file: model.onnx, or model.xml for openvino (sidecar: <file>.json)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="the largest input (a model that resizes each image by its own size takes any size up "
                        "to it; default: max_size padded to size_divisible), or with --fixed-size the one input "
                        "size (default: min_size padded); a model with a fixed size (RefineDet) keeps its own (another is "
                        "refused)")
    p.add_argument("--fixed-size", action="store_true",
                   help="one fixed input size: every image is fitted into it and padded to it (default: height "
                        "and width are dynamic wherever the model allows, so images are not padded beyond "
                        "size_divisible, as in PyTorch)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--score-thresh", type=float, default=None, help="override the checkpoint's score threshold")
    p.add_argument("--static-batch", action="store_true", help="fix the batch axis to --batch-size")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--int8", action="store_true", help="quantize the network body to int8 (post-processing stays fp32)")
    p.add_argument("--calib-images", type=int, default=100, help="calibration images for --int8 (100)")
    p.add_argument("--calib-split", choices=["train", "val", "tune"], default="train",
                   help="the config split the calibration images come from (train)")
    p.add_argument("--reduce-range", choices=["auto", "on", "off"], default="auto",
                   help="onnx --int8: 7-bit weights, for CPUs without VNNI (auto: on unless this CPU has "
                        "AVX512-VNNI/AVX-VNNI/AMX; say 'on' when exporting for an AVX2-only CPU)")
    p.add_argument("--nncf-preset", choices=["performance", "mixed"], default="performance",
                   help="openvino --int8: NNCF's preset (performance: symmetric activations; mixed: asymmetric)")
    p.add_argument("--fp32-head-outputs", action="store_true",
                   help="--int8: keep the heads' last convolutions (logits, box deltas) in fp32 "
                        "(default: int8 like the rest of the body; the post-processing is fp32 either way)")
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    if args.opset < 11:
        raise UsageError(f"--opset: must be >= 11, got {args.opset}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.size is not None and min(args.size) < 1:
        raise UsageError(f"--size: H and W must be positive, got {args.size[0]} {args.size[1]}")
    if args.score_thresh is not None and not 0 <= args.score_thresh <= 1:
        raise UsageError(f"--score-thresh: must be a score in [0, 1], got {args.score_thresh:g}")
    if args.int8 and args.calib_images < 1:
        raise UsageError(f"--calib-images: must be >= 1, got {args.calib_images}")
    suffix = ".xml" if args.format == "openvino" else ".onnx"
    if not args.out.lower().endswith(suffix):
        raise UsageError(f"--out: a --format {args.format} export is written as a {suffix} file, got {args.out}")
    if args.overrides and not args.int8:
        raise UsageError(f"config overrides ({' '.join(args.overrides)}) only choose --int8 calibration data")


def run(args: argparse.Namespace) -> int:
    """``densedet export``: returns the exit code."""
    from ..deploy import calibration_images, export_deployable
    _check_args(args)
    overrides = {} if args.score_thresh is None else {"score_thresh": args.score_thresh}
    model, cfg, ckpt = model_from_checkpoint(args.weights, **overrides)
    fixed = model.preprocessor.fixed_size
    if args.size is not None and fixed and tuple(args.size) != tuple(fixed):
        raise UsageError(f"--size {args.size[0]} {args.size[1]}: {args.weights} is a model of one input size, "
                         f"{fixed[0]}x{fixed[1]}, which its weights and anchors were trained at; leave --size out")
    divisor = model.preprocessor.size_divisible
    if args.size is not None and (args.size[0] % divisor or args.size[1] % divisor):
        raise UsageError(f"--size: {args.size[0]} {args.size[1]} must be multiples of the model's size_divisible "
                         f"({divisor}) in {args.weights}, e.g. {-(-args.size[0] // divisor) * divisor} "
                         f"{-(-args.size[1] // divisor) * divisor}")
    calibration = None
    if args.int8:
        from ..engine.data import load_split
        data_cfg = apply_overrides(cfg, args.overrides).data
        calibration = calibration_images(load_split(data_cfg, args.calib_split), args.calib_images)
    # the config travels in the sidecar, so `densedet eval --backend` finds the evaluation data
    extra = {"config": to_dict(cfg), "category_ids": ckpt.get("category_ids")}
    out = export_deployable(model, args.out, fmt=args.format, image_size=args.size, int8=args.int8,
                            calibration=calibration, batch_size=args.batch_size, opset=args.opset,
                            dynamic_batch=not args.static_batch, dynamic_size=False if args.fixed_size else None,
                            class_names=ckpt.get("class_names"),
                            sidecar_extra=extra,
                            reduce_range={"auto": None, "on": True, "off": False}[args.reduce_range],
                            quantize_head_outputs=not args.fp32_head_outputs, nncf_preset=args.nncf_preset)
    side = json.loads(sidecar_path(out).read_text())
    files = (out, out.with_suffix(".bin")) if args.format == "openvino" else (out,)
    size_mb = sum(f.stat().st_size for f in files if f.is_file()) / 1e6
    size = "{}x{}".format(*side["input_size"])
    size = f"any size up to {size}" if side["dynamic_size"] else size
    print(f"wrote {out} ({size_mb:.1f} MB, {side['precision']}) and {sidecar_path(out)}: {side['arch']}, input "
          f"{size} ({side['resize']}), {len(side['class_names'])} classes")
    return 0

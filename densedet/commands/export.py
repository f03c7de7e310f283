"""``densedet export``: a checkpoint to ONNX with post-processing inside (:func:`densedet.export.export_onnx`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..engine.checkpoint import model_from_checkpoint
from ..errors import UsageError
from ..export import export_onnx, sidecar_path

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register ``densedet export --weights CKPT --format onnx --out model.onnx [--size H W]``."""
    p = subparsers.add_parser("export", help="export a checkpoint to ONNX (post-processing included)",
                              description="Export a densedet checkpoint to ONNX with decoding, NMS and top-k "
                                          "inside the graph, plus a JSON sidecar for densedet.onnx_runner.")
    p.add_argument("--weights", required=True, help="densedet checkpoint (.pt)")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format (only onnx)")
    p.add_argument("--out", required=True, help="output file, e.g. model.onnx (sidecar: model.onnx.json)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="fixed input size (default: the model's fixed size, else min_size padded to size_divisible)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--score-thresh", type=float, default=None, help="override the checkpoint's score threshold")
    p.add_argument("--static-batch", action="store_true", help="fix the batch axis to --batch-size")
    p.add_argument("--batch-size", type=int, default=1)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``densedet export``: returns the exit code."""
    if args.opset < 11:
        raise UsageError(f"--opset: must be >= 11, got {args.opset}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.size is not None and min(args.size) < 1:
        raise UsageError(f"--size: H and W must be positive, got {args.size[0]} {args.size[1]}")
    overrides = {} if args.score_thresh is None else {"score_thresh": args.score_thresh}
    model, _, _ = model_from_checkpoint(args.weights, **overrides)
    divisor = model.preprocessor.size_divisible
    if args.size is not None and (args.size[0] % divisor or args.size[1] % divisor):
        raise UsageError(f"--size: {args.size[0]} {args.size[1]} must be multiples of the model's size_divisible "
                         f"({divisor}) in {args.weights}, e.g. {-(-args.size[0] // divisor) * divisor} "
                         f"{-(-args.size[1] // divisor) * divisor}")
    out = export_onnx(model, args.out, image_size=args.size, batch_size=args.batch_size, opset=args.opset,
                      dynamic_batch=not args.static_batch)
    side = json.loads(sidecar_path(out).read_text())
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) and {sidecar_path(out)}: {side['arch']}, input "
          f"{side['input_size'][0]}x{side['input_size'][1]} ({side['resize']}), {len(side['class_names'])} classes")
    return 0

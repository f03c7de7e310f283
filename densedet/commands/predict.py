"""``densedet predict``: a checkpoint on image files, folders and globs; COCO results and annotated images.

The detecting is :class:`densedet.predict.Predictor`, the drawing :func:`densedet.visualize.draw_detections`.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, TextIO

import torch
from tqdm import tqdm

from ..data import load_image
from ..errors import UsageError
from ..evaluation import detections_to_coco
from ..predict import Predictor
from ..tta import MERGE_METHODS, tta_preset
from ..visualize import draw_detections
from . import require_folder

__all__ = ["add_parser", "run", "expand_inputs", "progress_bar", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """Image files from paths, folders (their images, sorted, not recursive) and globs, in the given
    order without duplicates. Raises ``FileNotFoundError`` naming an input that matches nothing."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise FileNotFoundError(f"{item}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        elif path.is_file():
            found = [path]
        elif glob.has_magic(item):
            found = [Path(p) for p in sorted(glob.glob(item, recursive=True))
                     if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_EXTENSIONS]
            if not found:
                raise FileNotFoundError(f"{item}: pattern matches no image files")
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
        files.extend(found)
    seen: set[Path] = set()
    unique = [p for p in files if not (p.resolve() in seen or seen.add(p.resolve()))]
    if not unique:
        raise FileNotFoundError("no input images given")
    return unique


def progress_bar(total: int, desc: str = "predict", stream: TextIO | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on ``stream`` (default stderr), drawn only when that stream is a terminal: a log
    file or a pipe gets no bar lines."""
    stream = stream if stream is not None else sys.stderr
    is_terminal = bool(getattr(stream, "isatty", lambda: False)())
    return tqdm(total=total, desc=desc, unit="img", file=stream, disable=not is_terminal, **kwargs)


def add_parser(subparsers: Any) -> None:
    """Register ``densedet predict``."""
    p = subparsers.add_parser(
        "predict", help="detect objects in images; write COCO results JSON and annotated images",
        description="Run a checkpoint on images, folders or globs. Writes OUT/detections.json (COCO results: "
                    "image ids 1..N in input order, listed with their files in OUT/images.json; category ids "
                    "from the checkpoint) and one annotated PNG per image. The drawing threshold only changes "
                    "the pictures, not what is saved.")
    p.add_argument("inputs", nargs="+", help="image files, folders or glob patterns (quoted)")
    p.add_argument("--weights", required=True,
                   help="densedet checkpoint (.pt), or with --backend onnxruntime|openvino a file written by "
                        "densedet export (.onnx / .xml, its .json sidecar beside it)")
    p.add_argument("--backend", choices=["torch", "onnxruntime", "openvino"], default="torch",
                   help="torch (default): the checkpoint in PyTorch; onnxruntime / openvino: an exported model "
                        "on the CPU (pip install 'densedet[deploy]')")
    p.add_argument("--threads", type=int, default=None,
                   help="--backend onnxruntime|openvino: runtime threads (default: torch's thread count)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--score-thresh", type=float, default=None,
                   help="model score threshold for saved detections (default: the checkpoint's)")
    p.add_argument("--score-thresh-draw", type=float, default=0.3, help="draw boxes scoring at least this (0.3)")
    p.add_argument("--tta", default="none", choices=["none", "flip", "turns", "refinedet320", "refinedet"],
                   help="test-time augmentation: flip = image + mirror; turns = the eight symmetries of the square "
                        "(models trained with --top-down); refinedet320 = RefineDet's 7 scales for a "
                        "320 model (SPEC); refinedet = the same ratios around the model's own input size")
    p.add_argument("--tta-merge", choices=list(MERGE_METHODS), default=None,
                   help="how TTA passes are merged (default: vote)")
    p.add_argument("--tile", type=int, default=None, metavar="SIZE",
                   help="cut images larger than SIZE px into overlapping SIZE x SIZE tiles (0: off; default: the "
                        "tiles the model was trained on, data.tile_size, else off). The model resizes each tile as "
                        "an image of that size: a SIZE near the training images' size keeps objects at their "
                        "training scale")
    p.add_argument("--tile-overlap", type=int, default=None,
                   help="tile overlap in pixels (default: the training tiles' data.tile_overlap, else 128)")
    p.add_argument("--batch-size", type=int, default=4, help="images or tiles per forward pass (4)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 only on CUDA or CPUs with AMX/AVX512-BF16, else fp32")
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    for name, value in (("--score-thresh", args.score_thresh), ("--score-thresh-draw", args.score_thresh_draw)):
        if value is not None and not 0 <= value <= 1:
            raise UsageError(f"{name}: must be a score in [0, 1], got {value:g}")
    require_folder(args.out, "--out", "detections.json, images.json and the annotated images")
    if args.tile is not None and args.tile < 0:
        raise UsageError(f"--tile: must be >= 0 (0: no tiles), got {args.tile}")
    overlap = 128 if args.tile_overlap is None else args.tile_overlap
    if args.tile and not 0 <= overlap < args.tile:
        raise UsageError(f"--tile-overlap: need 0 <= --tile-overlap < --tile, got --tile {args.tile} "
                         f"--tile-overlap {overlap}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.backend != "torch" and args.tta != "none":
        raise UsageError(f"--tta {args.tta}: test-time augmentation needs --backend torch, not {args.backend}")
    if args.backend != "torch" and args.device not in (None, "cpu"):
        raise UsageError(f"--device {args.device}: --backend {args.backend} runs on the CPU")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads: must be >= 1, got {args.threads}")


def _predictor(args: argparse.Namespace) -> Predictor:
    if args.backend != "torch":
        return Predictor(args.weights, score_thresh=args.score_thresh, tile_size=args.tile,
                         tile_overlap=args.tile_overlap, batch_size=args.batch_size, backend=args.backend,
                         threads=args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UsageError(f"--device {device}: not a device name (cpu, cuda, cuda:1 ...)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this PyTorch sees no CUDA device; use --device cpu") from None
    predictor = Predictor.from_checkpoint(args.weights, device=device, score_thresh=args.score_thresh,
                                          tile_size=args.tile, tile_overlap=args.tile_overlap,
                                          batch_size=args.batch_size, precision=args.precision)
    tta = tta_preset(args.tta, predictor.model)
    if tta is not None and args.tta_merge:
        tta = replace(tta, merge=args.tta_merge)
    predictor.tta = tta
    return predictor


def _predict_files(predictor: Predictor, files: list[Path], args: argparse.Namespace,
                   out: Path) -> tuple[list[dict], list[dict]]:
    """Detect, draw and save batch by batch: (COCO results, one record per image for images.json)."""
    results: list[dict] = []
    image_records: list[dict] = []
    used_names: set[str] = set()
    with progress_bar(len(files)) as bar:
        for start in range(0, len(files), args.batch_size):
            chunk = files[start:start + args.batch_size]
            images = [load_image(str(f)) for f in chunk]
            for k, (path, image, det) in enumerate(zip(chunk, images, predictor(images))):
                image_id = start + k + 1
                results.extend(detections_to_coco([det], [image_id], predictor.category_ids))
                name = f"{path.stem}.png" if f"{path.stem}.png" not in used_names else f"{path.stem}_{image_id}.png"
                used_names.add(name)
                draw_detections(image, det, predictor.class_names, args.score_thresh_draw).save(out / name)
                image_records.append({"id": image_id, "file_name": str(path), "height": int(image.shape[-2]),
                                      "width": int(image.shape[-1]), "annotated": name,
                                      "detections": int(len(det["scores"]))})
            bar.update(len(chunk))
    return results, image_records


def run(args: argparse.Namespace) -> int:
    """``densedet predict``: returns the exit code."""
    _check_args(args)
    files = expand_inputs(args.inputs)
    predictor = _predictor(args)      # --tile-overlap against the training tiles: Predictor's UsageError
    if args.tile is None and predictor.tile_size:
        print(f"tiles as trained: {predictor.tile_size} px (data.tile_size), overlap {predictor.tile_overlap} px; "
              f"--tile 0 turns tiling off", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, image_records = _predict_files(predictor, files, args, out)
    (out / "detections.json").write_text(json.dumps(results))
    (out / "images.json").write_text(json.dumps(image_records, indent=1))
    drawn = sum(1 for r in results if r["score"] >= args.score_thresh_draw)
    print(f"{len(results)} detections ({drawn} drawn at score >= {args.score_thresh_draw:g}) in {len(files)} images: "
          f"{out / 'detections.json'}, annotated images in {out}")
    return 0

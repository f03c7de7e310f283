"""An export whose input size follows each image (``densedet export``'s default for RetinaNet)
against one of fixed size (``--fixed-size``): AP on a checkpoint's validation images and the time
per image, in one run.

    python benchmarks/dynamic_export.py --weights RUN/model_final.pt [data.val=...] [--fixed-size H W]

Accuracy: COCO AP of torch fp32 and of onnxruntime (and OpenVINO, where installed) with each
export, every model scored as ``densedet eval --backend`` scores it (``predict_dataset``, batches of
images of one size). Speed: each validation image (up to ``--images``) detected alone, batch 1,
by torch fp32 and by onnxruntime with each export, taking turns in each of ``--rounds`` rounds
(a round's mean per image; the median over rounds and their range), each shown as a ratio
to the fixed-size export measured in the same run. The fixed size defaults to the smallest square
that holds every validation image as the model resizes it (what ``--size`` would have to be for a
fixed-size export to run them without shrinking any). Timings need an otherwise idle machine.
Not in CI.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from densedet.config import apply_overrides, to_dict
from densedet.data import load_record_image, to_coco_dict
from densedet.deploy import MissingExtraError, export_deployable, load_deployed
from densedet.engine.checkpoint import model_from_checkpoint
from densedet.engine.data import load_split
from densedet.engine.evaluate import predict_dataset
from densedet.evaluation import evaluate_coco


def _fixed_side(model, images) -> int:
    """The smallest square, in multiples of ``size_divisible``, holding every image as resized."""
    pre, d = model.preprocessor, model.preprocessor.size_divisible
    side = max(max(pre.resized_size(int(im.shape[-2]), int(im.shape[-1]))) for im in images)
    return int(math.ceil(side / d) * d)


def _time_per_image(detectors: dict, images: list, rounds: int) -> dict[str, list[float]]:
    """Milliseconds per image of each detector in every round (a round's mean over the images).
    Within a round each detector runs every image in turn, after a pause of half a second: a
    runtime's threads keep spinning for a while after a call and would slow whichever detector
    runs next."""
    per_round = {name: [] for name in detectors}
    with torch.inference_mode():
        for detector in detectors.values():             # warm-up: one call at each image size
            for size in {tuple(im.shape[-2:]) for im in images}:
                detector([next(im for im in images if tuple(im.shape[-2:]) == size)])
        for _ in range(rounds):
            for name, detector in detectors.items():
                time.sleep(0.5)
                times = []
                for image in images:
                    start = time.perf_counter()
                    detector([image])
                    times.append(time.perf_counter() - start)
                per_round[name].append(1000 * statistics.fmean(times))
    return per_round


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.val=x.json")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--fixed-size", type=int, nargs=2, metavar=("H", "W"), default=None)
    parser.add_argument("--images", type=int, default=30, help="validation images timed (the first N)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    model, cfg, ckpt = model_from_checkpoint(args.weights)
    cfg = apply_overrides(cfg, args.overrides)
    model.eval()
    data = load_split(cfg.data, "val")
    images = [load_record_image(r).float() / 255 for r in data.records]
    fixed = tuple(args.fixed_size) if args.fixed_size else (_fixed_side(model, images),) * 2
    extra = {"config": to_dict(cfg), "category_ids": ckpt.get("category_ids")}
    sizes = sorted({tuple(int(s) for s in im.shape[-2:]) for im in images})
    print(f"{args.weights}: {len(images)} validation images of {len(sizes)} sizes ({sizes[0]} .. {sizes[-1]}); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    with tempfile.TemporaryDirectory(prefix="densedet-dyn-") as tmp:
        detectors = {"torch fp32": model}
        for name, dynamic, fmt, suffix in (("ort fixed", False, "onnx", ".onnx"), ("ort dynamic", True, "onnx", ".onnx"),
                                           ("ov dynamic", True, "openvino", ".xml")):
            try:
                path = export_deployable(model, Path(tmp) / f"{name.replace(' ', '_')}{suffix}", fmt=fmt,
                                         image_size=fixed if not dynamic else None, dynamic_size=dynamic,
                                         sidecar_extra=extra)
            except MissingExtraError as err:
                print(f"{name}: skipped ({err})")
                continue
            detectors[name] = load_deployed(path)
        gt = to_coco_dict(data)
        max_dets = tuple(cfg.test.max_dets)
        print(f"\nfixed-size export: {fixed[0]}x{fixed[1]}; dynamic: any size up to "
              f"{'x'.join(map(str, detectors['ort dynamic'].meta['input_size']))}")
        print("| model | AP | AP50 |\n|---|---|---|")
        for name, detector in detectors.items():
            stats = evaluate_coco(predict_dataset(detector, data, cfg.test.batch_size, "cpu", None), gt,
                                  max_dets=max_dets)
            print(f"| {name} | {stats['AP']:.3f} | {stats['AP50']:.3f} |", flush=True)
        timed = {name: d for name, d in detectors.items() if name != "ov dynamic"}   # its AP only
        ms = _time_per_image(timed, images[:args.images], args.rounds)
        base = statistics.median(ms["ort fixed"])
        print(f"\n{min(args.images, len(images))} images, batch 1, {args.rounds} rounds (ms per image: a round's "
              "mean; the median over rounds and their range)")
        print("| model | ms / image | range over rounds | speed vs ort fixed |\n|---|---|---|---|")
        for name, values in ms.items():
            value = statistics.median(values)
            print(f"| {name} | {value:.1f} | {min(values):.1f}-{max(values):.1f} | {base / value:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""int8 accuracy on a CPU without VNNI (AVX2 only), emulated: does the int16 saturation of AVX2's
``vpmaddubsw`` cost AP, and does ONNX Runtime's ``reduce_range`` (7-bit weights) prevent it?

On AVX2 without VNNI, a u8 x s8 dot product is computed by ``vpmaddubsw``, which adds pairs of
products into int16 and saturates there; VNNI and AMX accumulate in int32. This machine has VNNI,
so its int8 numbers cannot show the effect. QEMU's user-mode emulator (``apt-get install
qemu-user``; QEMU 7.2 emulates AVX2, and no AVX-512, VNNI or AMX) runs the same Python and the
same runtimes with the CPU they see through CPUID limited to AVX2, so the runtimes pick their AVX2
kernels. Two steps:

    python benchmarks/int8_avx2.py export --weights runs/demo/model_final.pt --out /tmp/int8_avx2 --images 40
    qemu-x86_64 -cpu max .venv/bin/python benchmarks/int8_avx2.py score --out /tmp/int8_avx2

``export`` (natively): the int8 models (ONNX Runtime with and without ``reduce_range``, OpenVINO by
NNCF) calibrated on 100 training images, and each runtime's fp32 model; the AP of torch fp32 and of
each of them on the first ``--images`` validation images here, written to ``OUT/native.json``.
``score`` (emulated; ``--only NAME ...`` for some): the AP of each model on the same images, beside
the native ones. The emulator is slow (one
call takes seconds), so this is for accuracy only, never for speed. Not in CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from densedet.config import to_dict
from densedet.data import to_coco_dict
from densedet.deploy import calibration_images, export_deployable, load_deployed
from densedet.engine.checkpoint import model_from_checkpoint
from densedet.engine.data import load_split
from densedet.engine.evaluate import predict_dataset
from densedet.evaluation import evaluate_coco

# name: (backend, format, int8, reduce_range); reduce_range only applies to ONNX Runtime's int8. The
# fp32 models tell a runtime's int8 arithmetic apart from the rest of its kernels under the emulator.
VARIANTS = {"ort_fp32": ("onnxruntime", "onnx", False, None), "ort_int8": ("onnxruntime", "onnx", True, False),
            "ort_int8_reduce_range": ("onnxruntime", "onnx", True, True),
            "ov_fp32": ("openvino", "openvino", False, None), "ov_int8": ("openvino", "openvino", True, None)}


def _split(weights: str, count: int):
    model, cfg, ckpt = model_from_checkpoint(weights)
    val = load_split(cfg.data, "val")
    return model, cfg, ckpt, dataclasses.replace(val, records=val.records[:count])


def _ap(detector, data, cfg) -> float:
    results = predict_dataset(detector, data, cfg.test.batch_size, "cpu", None)
    return float(evaluate_coco(results, to_coco_dict(data), max_dets=tuple(cfg.test.max_dets))["AP"])


def _path(out: Path, name: str) -> Path:
    return out / f"{name}.{'xml' if VARIANTS[name][1] == 'openvino' else 'onnx'}"


def export(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, cfg, ckpt, data = _split(args.weights, args.images)
    calibration = calibration_images(load_split(cfg.data, "train"), args.calib_images)
    extra = {"config": to_dict(cfg), "category_ids": ckpt.get("category_ids")}
    native = {"weights": args.weights, "images": args.images, "torch_fp32": _ap(model, data, cfg)}
    for name, (backend, fmt, int8, reduce_range) in VARIANTS.items():
        export_deployable(model, _path(out, name), fmt=fmt, int8=int8, calibration=calibration if int8 else None,
                          reduce_range=reduce_range, sidecar_extra=extra)
        native[name] = _ap(load_deployed(_path(out, name), backend), data, cfg)
        print(f"{name}: native AP {native[name]:.4f}", flush=True)
    (out / "native.json").write_text(json.dumps(native, indent=1))
    print(f"torch fp32 AP {native['torch_fp32']:.4f} on {args.images} validation images; wrote {out / 'native.json'}")


def score(args: argparse.Namespace) -> None:
    out = Path(args.out)
    native = json.loads((out / "native.json").read_text())
    _, cfg, _, data = _split(native["weights"], native["images"])
    print(f"CPU as this process sees it: torch capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{native['images']} validation images of {native['weights']}; torch fp32 AP (native) "
          f"{native['torch_fp32']:.4f}\n")
    print("| model | AP here | AP native (VNNI) | here - torch fp32 |\n|---|---|---|---|")
    for name, (backend, *_) in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        try:
            here = f"{_ap(load_deployed(_path(out, name), backend), data, cfg):.4f}"
            change = f"{float(here) - native['torch_fp32']:+.4f}"
        except ValueError as err:          # outputs that are not detections (labels outside the classes)
            here, change = f"invalid output: {err}", ""
        print(f"| {name} | {here} | {native[name]:.4f} | {change} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    e = sub.add_parser("export", help="natively: int8 models and their AP here")
    e.add_argument("--weights", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--images", type=int, default=40, help="validation images scored (the first N)")
    e.add_argument("--calib-images", type=int, default=100)
    s = sub.add_parser("score", help="under the emulator: the same models' AP")
    s.add_argument("--out", required=True)
    s.add_argument("--only", nargs="+", choices=list(VARIANTS), help="score these models only")
    args = parser.parse_args(argv)
    (export if args.step == "export" else score)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

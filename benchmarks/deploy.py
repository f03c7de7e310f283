"""CPU deploy backends (densedet.deploy): accuracy of each backend in fp32 and int8 against PyTorch
fp32, and speed at RetinaNet R50-FPN 512x512 batch 1 against torchvision's default, in one run.

Accuracy (single scale, no TTA; each exported model evaluated with ``predict_dataset`` as
``densedet eval --backend`` does):
  digits   the demo's validation scenes (config and data from the ``--digits`` checkpoint, e.g.
           runs/demo/model_final.pt of ``make demo``), COCO AP
  trees    deepforest's tree-crown evaluation photo OSBS_029 (``--trees``: a checkpoint trained
           with ``deepforest_trees.yaml``), COCO AP
  int8 calibrates on ``--calib-images`` training images of the checkpoint's config (default 100);
  ``int8`` quantizes the whole network body, ``int8h32`` keeps the heads' last convolutions fp32.
  Target: int8 AP at most 0.01 below torch fp32 on the digits; fp32 backends equal torch's AP.

Speed: one 512x512 image, batch 1, ``torch.get_num_threads()`` threads for every runtime (or
``--threads``). The baseline is torchvision's ``retinanet_resnet50_fpn(weights=None,
weights_backbone=None).eval()`` called under ``torch.inference_mode()`` (resizing to 512 as
``benchmarks/vs_torchvision.py`` sets it up, with the same seeded weights); densedet's
``retinanet_r50_fpn_torchvision`` preset loads those weights and is exported to each backend, so
every row computes the same detector. Without torchvision the baseline is densedet's own torch
fp32 (``dd_torch``). Modes alternate within each of ``--rounds`` rounds; each round times
``--iters`` calls after one warm-up call (median); the table shows the median over rounds and each
mode's speed-up over the baseline. Target: int8 >= 2.5x torchvision fp32.

torchvision cannot live next to densedet's CPU torch, so the speed baseline runs from the
throwaway venv of vs_torchvision.py (torch 2.14.1 + torchvision 0.29.1), after::

    /tmp/tvenv/bin/pip install --no-deps -e /work/main          # (done there already)
    /tmp/tvenv/bin/pip install pyyaml pycocotools matplotlib tqdm jinja2   # densedet's own (done already)
    /tmp/tvenv/bin/pip install onnx==1.23.2 onnxruntime==1.32.0 openvino==2026.4.1 nncf==3.4.0   # none pulls torch
    /tmp/tvenv/bin/python benchmarks/deploy.py --digits runs/demo/model_final.pt --trees runs/trees/model_final.pt

(``--skip-accuracy`` / ``--skip-speed`` run one half; ``.venv/bin/python benchmarks/deploy.py``
works too, with the densedet torch baseline.) Not in CI. Timings need an otherwise idle machine.

Recorded accuracy (December 2026, this project's Xeon with VNNI; the ``make demo`` checkpoint,
100 validation scenes, single scale, 100 calibration images; AP):
  torch fp32 0.5530; onnxruntime fp32 0.5530; openvino fp32 0.5530
  onnxruntime int8, MinMax, per-channel, whole body (default)     0.5511  (-0.0019)
    ... reduce_range on (what an AVX2-only CPU gets)              0.5506  (-0.0024)
    ... heads' last convs fp32 (--fp32-head-outputs)              0.5489  (-0.0041)
    ... heads' last convs fp32, reduce_range on                   0.5508  (-0.0022)
  openvino int8, NNCF performance preset, fast bias correction    0.5488  (-0.0042)
    ... heads' last convs fp32                                    0.5512  (-0.0018)
    ... mixed preset                                              0.5497  (-0.0033)
  Every variant stays within the 0.01 target; ORT's Percentile / Entropy calibration could not be
  tried (its histogram collector fails on the post-processing's data-dependent shapes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_torchvision import calibrate_scores, cpu_line, densedet_model, images, torchvision_model  # noqa: E402

from densedet.deploy import MissingExtraError, calibration_images, export_deployable, load_deployed  # noqa: E402
from densedet.deploy.common import require  # noqa: E402
from densedet.deploy.quantize import cpu_has_vnni  # noqa: E402

# (backend, format, precision): "int8" quantizes the whole body (the default of densedet export --int8),
# "int8h32" keeps the heads' last convolutions fp32 (densedet export --int8 --fp32-head-outputs)
VARIANTS = [("onnxruntime", "onnx", "fp32"), ("onnxruntime", "onnx", "int8"), ("onnxruntime", "onnx", "int8h32"),
            ("openvino", "openvino", "fp32"), ("openvino", "openvino", "int8"), ("openvino", "openvino", "int8h32")]


def _name(backend: str, precision: str) -> str:
    return f"{'ort' if backend == 'onnxruntime' else 'ov'}_{precision}"


def _export(model, tmp: Path, backend: str, fmt: str, precision: str, calibration, image_size=None, extra=None):
    path = tmp / f"{_name(backend, precision)}.{'xml' if fmt == 'openvino' else 'onnx'}"
    int8 = precision != "fp32"
    export_deployable(model, path, fmt=fmt, image_size=image_size, int8=int8,
                      calibration=calibration if int8 else None, sidecar_extra=extra,
                      quantize_head_outputs=precision != "int8h32")
    return path


# -- accuracy -----------------------------------------------------------------------------------------

def accuracy(label: str, checkpoint: str, calib_images: int, tmp: Path) -> None:
    """AP of torch fp32 and of each backend in fp32 / int8 on the checkpoint's validation split."""
    from densedet.config import to_dict
    from densedet.data import to_coco_dict
    from densedet.engine.checkpoint import model_from_checkpoint
    from densedet.engine.data import load_split
    from densedet.engine.evaluate import predict_dataset
    from densedet.evaluation import evaluate_coco
    model, cfg, ckpt = model_from_checkpoint(checkpoint)
    data = load_split(cfg.data, "val")
    gt = to_coco_dict(data)
    max_dets = tuple(cfg.test.max_dets)

    def ap(detector) -> float:
        results = predict_dataset(detector, data, cfg.test.batch_size, "cpu", None)
        return float(evaluate_coco(results, gt, max_dets=max_dets)["AP"])

    reference = ap(model)
    print(f"\n{label}: {checkpoint}, {len(data)} validation images, single scale; torch fp32 AP {reference:.4f}")
    calibration = calibration_images(load_split(cfg.data, "train"), calib_images)
    extra = {"config": to_dict(cfg), "category_ids": ckpt.get("category_ids")}
    print(f"  {'backend':<11s} {'AP':>7s} {'vs torch':>9s}")
    for backend, fmt, precision in VARIANTS:
        path = _export(model, tmp / label, backend, fmt, precision, calibration, extra=extra)
        value = ap(load_deployed(path, backend))
        print(f"  {_name(backend, precision):<11s} {value:7.4f} {value - reference:+9.4f}", flush=True)


# -- speed --------------------------------------------------------------------------------------------

def _timed(call, iters: int) -> float:
    call()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _seeded_densedet_r50():
    """Without torchvision: the same preset with weights seeded the way vs_torchvision seeds them."""
    from densedet.models import build_model
    torch.manual_seed(0)
    model = build_model("retinanet_r50_fpn_torchvision", min_size=512, max_size=512)
    return calibrate_scores(model.eval(), images(512, 512, 1))


def speed(rounds: int, iters: int, tmp: Path) -> None:
    try:
        import torchvision
        tv = torchvision_model(50, 512, 512)
        dd = densedet_model(50, 512, 512, tv.state_dict())
        baseline = "tv_fp32"
        print(f"\nspeed: torch {torch.__version__}, torchvision {torchvision.__version__}")
    except ImportError:
        tv, dd = None, _seeded_densedet_r50()
        baseline = "dd_torch"
        print(f"\nspeed: torch {torch.__version__}; torchvision not importable: baseline densedet torch fp32")
    print(f"CPU: {cpu_line()}; {torch.get_num_threads()} threads; VNNI: {cpu_has_vnni()}")
    inputs = images(512, 512, 1)
    calibration = images(512, 512, 8)
    modes = {}
    if tv is not None:
        modes["tv_fp32"] = tv
    modes["dd_torch"] = dd
    for backend, fmt, precision in VARIANTS:
        path = _export(dd, tmp / "speed", backend, fmt, precision, calibration, image_size=(512, 512))
        modes[_name(backend, precision)] = load_deployed(path, backend)
    with torch.inference_mode():
        counts = {name: len(model(inputs)[0]["scores"]) for name, model in modes.items()}
    print("detections per mode: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    times = {name: [] for name in modes}
    for r in range(rounds):
        for name, model in modes.items():
            with torch.inference_mode():
                times[name].append(_timed(lambda: model(inputs), iters))
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f} ms" for k, v in times.items()), flush=True)
    base = statistics.median(times[baseline])
    print(f"\nR50-FPN 512x512 batch 1, median of {rounds} rounds x {iters} calls")
    print(f"  {'mode':<11s} {'ms':>8s} {'speed-up vs ' + baseline:>20s}")
    for name, values in times.items():
        ms = statistics.median(values)
        print(f"  {name:<11s} {ms:8.1f} {base / ms:19.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--digits", help="a checkpoint trained on the digit scenes (demo_digits)")
    parser.add_argument("--trees", help="a checkpoint trained with deepforest_trees.yaml")
    parser.add_argument("--calib-images", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=5, help="timed calls per mode and round (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch (and so every runtime's) threads")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args(argv)
    try:
        for module in ("onnx", "onnxruntime", "openvino", "nncf"):
            require(module, "benchmarks/deploy.py")
    except MissingExtraError as err:
        print(err, file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="densedet-deploy-bench-") as tmp:
        if not args.skip_accuracy:
            for label, ckpt in (("digits", args.digits), ("trees", args.trees)):
                if ckpt:
                    accuracy(label, ckpt, args.calib_images, Path(tmp))
                else:
                    print(f"\n{label}: no checkpoint given (--{label}), skipped")
        if not args.skip_speed:
            speed(args.rounds, args.iters, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())

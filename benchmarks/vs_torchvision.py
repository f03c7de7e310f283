"""densedet against torchvision's RetinaNet, same weights, same torch, each mode its own process.

torchvision cannot live next to densedet's CPU torch, so this runs from a throwaway venv that has
both (never the project's; not in CI)::

    python3 -m venv /tmp/tvenv
    /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 pillow numpy
    /tmp/tvenv/bin/pip install --no-deps -e . && /tmp/tvenv/bin/pip install pyyaml pycocotools matplotlib tqdm
    /tmp/tvenv/bin/python benchmarks/vs_torchvision.py [--rounds 3] [--iters 3] [--rows r50_512 ...]

On a GPU (``--device cuda``; any environment with torch and torchvision built for CUDA, such as the
one ``benchmarks/gpu_check.sh`` runs in) the same modes run on the GPU, each call timed between two
``torch.cuda.synchronize()``; bf16 is autocast on CUDA, and the rows default to 800x1216 at batch 1
and 8.

For each row, torchvision's model is built as a user builds it
(``retinanet_resnet50_fpn(weights=None, weights_backbone=None)``, which has BatchNorm2d in eval
mode; R18 through torchvision's own ``_resnet_fpn_extractor`` with the same P6/P7), given seeded
non-trivial norm statistics, and its state dict is loaded strictly into densedet's
``retinanet_r50_fpn_torchvision`` preset (``backbone=resnet18`` for the R18 row). Both resize
to the row's input size. The classification layer is rescaled so that a dense but realistic number
of candidates pass the 0.05 threshold (the post-processing then does real work; the table prints
how many detections each image gets). Before timing, densedet's default detections are checked against
torchvision's (scores within 1e-4).

Modes (each timed in a fresh process, the modes alternating, ``--rounds`` rounds, median):
  tv          torchvision default: ``model.eval()``, ``torch.inference_mode()``
  tv_best     torchvision + channels_last (model and input), ``inference_mode``
  dd          densedet default: ``model.eval()``, ``inference_mode`` (folded norms, thresholded top-k)
  dd_nchw     (with --layout) densedet's default with the network in NCHW, what channels_last buys
  dd_best     densedet's best fp32 CPU path: ``optimize_for_inference`` (folded, channels_last)
and where this CPU multiplies bf16 natively (AMX / AVX512-BF16; ``densedet.device``), or on CUDA:
  tv_bf16     tv_best under bf16 autocast
  dd_bf16     dd_best under bf16 autocast (densedet's ``precision: auto`` choice on this CPU)
Ratios: dd / tv, dd_best / tv_best, dd_bf16 / tv_bf16 (and each against tv).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROWS = {   # name: (trunk depth, height, width, batch)
    "r50_512_b1": (50, 512, 512, 1),
    "r18_320_b8": (18, 320, 320, 8),
    "r50_800x1216_b1": (50, 800, 1216, 1),
    "r50_800x1216_b8": (50, 800, 1216, 8),
}
CPU_ROWS = ["r50_512_b1", "r18_320_b8", "r50_800x1216_b1"]
GPU_ROWS = ["r50_800x1216_b1", "r50_800x1216_b8"]
CLS_MEAN = -6.0          # mean classification logit (sigmoid 0.0025); 0.11% of the scores pass 0.05
THREADS = int(os.environ.get("BENCH_THREADS", "2"))


def torchvision_model(depth: int, height: int, width: int):
    """torchvision's RetinaNet as a user builds it, with seeded weights and statistics."""
    from torchvision.models import resnet18
    from torchvision.models.detection import RetinaNet, retinanet_resnet50_fpn
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    torch.manual_seed(0)
    if depth == 50:
        model = retinanet_resnet50_fpn(weights=None, weights_backbone=None)
    else:
        trunk = _resnet_fpn_extractor(resnet18(weights=None), 5, returned_layers=[2, 3, 4],
                                      extra_blocks=LastLevelP6P7(256, 256))
        model = RetinaNet(trunk, 91)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    model.transform.min_size, model.transform.max_size = (min(height, width),), max(height, width)
    return calibrate_scores(model.eval(), images(height, width, 1))


def calibrate_scores(model, sample: list[torch.Tensor]):
    """Rescale the classification layer so that its logits on ``sample`` are N(CLS_MEAN, 1): at
    P3 of a 512 px image ~4,000 of 3.4M scores pass 0.05 (the top-k of 1000 then runs), a dense load
    like a trained model's, with no ties (random weights otherwise saturate or never pass)."""
    cls = model.head.classification_head.cls_logits
    seen = []
    hook = cls.register_forward_hook(lambda mod, inp, out: seen.append(out - mod.bias.view(1, -1, 1, 1)))
    with torch.inference_mode():
        model(sample)
    hook.remove()
    z = torch.cat([t.flatten() for t in seen])
    with torch.no_grad():
        cls.weight.div_(float(z.std()))
        cls.bias.fill_(CLS_MEAN - float(z.mean() / z.std()))
    return model


def densedet_model(depth: int, height: int, width: int, state_dict: dict):
    from densedet.models import build_model
    options = {} if depth == 50 else {"backbone": "resnet18"}
    model = build_model("retinanet_r50_fpn_torchvision", **options)
    model.load_state_dict({k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")},
                          strict=True)
    model.preprocessor.min_size, model.preprocessor.max_size = (min(height, width),), max(height, width)
    return model.eval()


def _batch_to_channels_last(module, inputs, output):
    output[0].tensors = output[0].tensors.contiguous(memory_format=torch.channels_last)
    return output


def images(height: int, width: int, batch: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.rand(3, height, width, generator=gen) for _ in range(batch)]


def worker(row: str, mode: str, weights: str, iters: int, warmup: int, profile: bool = False,
           device: str = "cpu") -> dict:
    """Build one mode's model, make ``warmup`` untimed calls, time ``iters`` calls; the median in ms."""
    from densedet.device import autocast, cpu_has_fast_bf16
    from densedet.export import optimize_for_inference
    torch.set_num_threads(THREADS)
    dev = torch.device(device)
    depth, height, width, batch = ROWS[row]
    if mode.startswith("tv"):
        model = torchvision_model(depth, height, width)
        if mode != "tv":   # channels_last weights, and the batched images too (the transform batches them)
            model = model.to(memory_format=torch.channels_last)
            model.transform.register_forward_hook(_batch_to_channels_last)
    else:
        model = densedet_model(depth, height, width, torch.load(weights, weights_only=True))
        model.inference_channels_last = mode != "dd_nchw"
        if mode not in ("dd", "dd_nchw"):
            model = optimize_for_inference(model, inplace=True)
    bf16 = mode.endswith("bf16")
    assert not bf16 or dev.type == "cuda" or cpu_has_fast_bf16()
    model = model.to(dev)
    inputs = [image.to(dev) for image in images(height, width, batch)]

    def call():
        with torch.inference_mode(), autocast(dev, torch.bfloat16 if bf16 else None):
            return model(inputs)

    def sync():   # CUDA runs asynchronously: a call has ended when the GPU has
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    for _ in range(warmup):   # oneDNN / cuDNN create their kernels per shape and dtype on the first calls
        out = call()
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    result = {"ms": 1000 * statistics.median(times), "detections": [len(o["boxes"]) for o in out]}
    if profile:   # one more warm call under torch.profiler: how much of it the convolutions take
        with torch.profiler.profile() as prof:
            call()
        events = prof.key_averages()
        result["total_ms"] = sum(e.self_cpu_time_total for e in events) / 1000
        result["conv_ms"] = sum(e.self_cpu_time_total for e in events if "conv" in e.key) / 1000
    return result


def check_same_detections(row: str, weights: str) -> str:
    """densedet's default against torchvision's default on two of the row's images: how many of
    torchvision's detections densedet has too (same label, IoU >= 0.99), and the largest score
    difference between the sorted score lists (random weights make many near-ties, so the order
    of equal scores may differ)."""
    from densedet.boxes import box_iou
    depth, height, width, batch = ROWS[row]
    tv = torchvision_model(depth, height, width)
    dd = densedet_model(depth, height, width, torch.load(weights, weights_only=True))
    inputs = images(height, width, min(batch, 2))
    with torch.inference_mode():
        a, b = tv(inputs), dd(inputs)
    found = total = 0
    worst = 0.0
    for x, y in zip(a, b):
        total += len(x["boxes"])
        if len(x["boxes"]) and len(y["boxes"]):
            same = (box_iou(x["boxes"], y["boxes"]) >= 0.99) & (x["labels"][:, None] == y["labels"][None])
            found += int(same.any(1).sum())
            n = min(len(x["scores"]), len(y["scores"]))
            worst = max(worst, float((x["scores"][:n] - y["scores"][:n]).abs().max()))
    return (f"{found} of torchvision's {total} detections found by densedet (same label, IoU >= 0.99); "
            f"sorted scores differ by at most {worst:.1e}")


def cpu_line() -> str:
    model = ""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
    return f"{model or platform.processor()}; flags: {' '.join(f for f in wanted if f in flags) or 'none of ' + ', '.join(wanted)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS),
                        help=f"default: {' '.join(CPU_ROWS)}; with --device cuda: {' '.join(GPU_ROWS)}")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=3, help="timed calls per process (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per process first")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one warm call per process: the convolutions' share of its time")
    parser.add_argument("--layout", action="store_true", help="also time densedet's default in NCHW")
    parser.add_argument("--worker", nargs=3, metavar=("ROW", "MODE", "WEIGHTS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.iters, max(1, args.warmup), args.profile, args.device)))
        return 0
    import torchvision
    from densedet.device import cpu_has_fast_bf16
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch sees no CUDA device")
    rows = args.rows or (GPU_ROWS if gpu else CPU_ROWS)
    modes = (["tv", "dd"] + (["dd_nchw"] if args.layout else []) + ["tv_best", "dd_best"] +
             (["tv_bf16", "dd_bf16"] if gpu or cpu_has_fast_bf16() else []))
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {THREADS} threads")
    print(f"CPU: {cpu_line()}")
    if gpu:
        print(f"GPU: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    print(f"modes: {', '.join(modes)}; {args.rounds} rounds, each mode a fresh process, {args.warmup} "
          f"untimed calls then the median of {args.iters} per process, median over rounds\n")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            depth, height, width, batch = ROWS[row]
            weights = str(Path(tmp) / f"{row}.pt")
            torch.save(torchvision_model(depth, height, width).state_dict(), weights)
            print(f"{row}: {check_same_detections(row, weights)}", flush=True)
            times = {m: [] for m in modes}
            shares = {m: [] for m in modes}
            detections = None
            for _ in range(args.rounds):
                for mode in modes:
                    out = subprocess.run([sys.executable, __file__, "--worker", row, mode, weights,
                                          "--iters", str(args.iters), "--warmup", str(args.warmup),
                                          "--device", args.device]
                                         + (["--profile"] if args.profile else []),
                                         capture_output=True, text=True)
                    if out.returncode != 0:
                        raise SystemExit(f"{row} {mode} failed:\n{out.stderr[-3000:]}")
                    result = json.loads(out.stdout.strip().splitlines()[-1])
                    times[mode].append(result["ms"])
                    if "conv_ms" in result:
                        shares[mode].append((result["conv_ms"], result["total_ms"]))
                    detections = detections or result["detections"]
            results[row] = ({m: statistics.median(v) for m, v in times.items()}, detections)
            for mode, pairs in shares.items():
                if pairs:
                    conv, total = (statistics.median(x) for x in zip(*pairs))
                    print(f"  {row} {mode}: convolutions {conv:.0f} of {total:.0f} ms profiled "
                          f"({100 * conv / total:.0f}%)", flush=True)
    pairs = [("dd", "tv"), ("dd_best", "tv_best")] + ([("dd_bf16", "tv_bf16")] if "dd_bf16" in modes else [])
    print("\n| row | detections/img | " + " | ".join(f"{m} ms" for m in modes) + " | " +
          " | ".join(f"{b} / {a}" for a, b in [(d, t) for d, t in pairs]) + " | dd_best vs tv |")
    print("|" + "---|" * (2 + len(modes) + len(pairs) + 1))
    for row, (ms, detections) in results.items():
        ratios = [ms[t] / ms[d] for d, t in pairs]
        print(f"| {row} | {statistics.median(detections):.0f} | " + " | ".join(f"{ms[m]:.0f}" for m in modes) +
              " | " + " | ".join(f"{r:.2f}x" for r in ratios) + f" | {ms['tv'] / ms['dd_best']:.2f}x |")
    print("\n(x: torchvision's time over densedet's; above 1 densedet is faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

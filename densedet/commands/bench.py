"""``densedet bench``: how fast densedet runs here, each number next to a baseline from the same run.

Suites (``--suite``):

* ``infer``  end-to-end ``model(images)`` latency and throughput. densedet's fast path
  (``inference_mode`` + channels_last + bf16 autocast only where bf16 is native: AMX/AVX512-BF16
  CPUs or CUDA — :func:`densedet.device.resolve_precision`) against the same weights in fp32
  eager under ``no_grad`` with contiguous (NCHW) tensors, and torchvision's RetinaNet when
  importable. The network's conv/linear FLOPs (counted by forward hooks, 2 per multiply-add)
  divided by the fast latency give the achieved GFLOP/s.
* ``peak``   fp32 and bf16 matmul GFLOP/s measured in the same run: the ceiling for the above.
* ``train``  one training step split into forward, loss and backward (+ optimizer step), fast path
  (channels_last, autocast where native) against fp32 NCHW.
* ``post``   post-processing under a dense load (five levels × 1000 candidates above threshold,
  80 classes): densedet's batched post-processing against a per-image loop (torchvision's shape).
* ``loss``   the focal loss of a training step (forward + backward): the fused
  :func:`~densedet.losses.focal_loss_sum` against the unfused one-hot + autograd path.
* ``match``  anchor matching (120k anchors × 100 boxes): the batched :class:`~densedet.matching.Matcher`
  against a per-image loop of the same rule.
* ``memory`` peak resident memory of inference and of a training step, one fresh subprocess per
  measurement (see :func:`measure_peak_memory` for why).
* ``fast``   candidate CPU fast paths for fp32 inference (conv-BN folding, ``torch.jit`` freeze,
  ``torch.compile``) on the network alone; decides what :func:`densedet.export.optimize_for_inference`
  does. Not part of ``all`` (compilation takes minutes on two cores).

Timings are medians over repeats (the machine may be shared: the load average at start and end is
printed with the tables). ``--quick`` uses few sizes and repeats (about two minutes on two idle
cores); the full run takes much longer. ``--out results.md`` / ``results.json`` writes the tables.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..boxes import BoxCoder, batched_nms, box_iou, clip_boxes
from ..device import autocast, flush_denormals, resolve_precision
from ..errors import UsageError
from ..export import fuse_conv_bn, optimize_for_inference
from ..losses import focal_loss_sum, sigmoid_focal_loss
from ..matching import Matcher, pad_targets
from ..models import PRESETS, build_model
from ..models.retinanet import RetinaNet

__all__ = ["BenchSettings", "QUICK", "FULL", "Table", "run_suites", "count_flops", "time_call", "time_interleaved",
           "timed_train_step",
           "measure_peak_memory", "write_results", "add_parser", "main", "SUITES"]

SUITES = ("infer", "peak", "train", "post", "match", "loss", "memory", "fast")
DEFAULT_SUITES = ("infer", "peak", "train", "post", "match", "loss", "memory")
PROGRESS = False          # the CLI turns on per-row progress lines on stderr


# ----------------------------------------------------------------------------------------------
# Settings and tables
# ----------------------------------------------------------------------------------------------

@dataclass
class BenchSettings:
    """What each suite measures. ``model_overrides`` apply to every built model (tests shrink them)."""

    infer_models: list[str] = field(default_factory=lambda: ["retinanet_r18_fpn", "retinanet_r50_fpn",
                                                             "refinedet320_vgg16", "refinedet512_vgg16"])
    infer_sizes: list[int] = field(default_factory=lambda: [320, 512, 800])
    infer_batches: list[int] = field(default_factory=lambda: [1, 8])
    train_models: list[str] = field(default_factory=lambda: ["retinanet_r18_fpn", "retinanet_r50_fpn"])
    train_sizes: list[int] = field(default_factory=lambda: [320, 512])
    train_batches: list[int] = field(default_factory=lambda: [4, 8])
    post_batches: list[int] = field(default_factory=lambda: [1, 8])
    post_levels: int = 5
    post_candidates: int = 1000
    post_classes: int = 80
    match_anchors: int = 120_000
    match_boxes: int = 100
    match_batches: list[int] = field(default_factory=lambda: [1, 8])
    loss_size: int = 512                   # focal loss over the anchors of a size x size image
    loss_batches: list[int] = field(default_factory=lambda: [4, 8])
    peak_sizes: dict[str, int] = field(default_factory=lambda: {"fp32": 2048, "bf16": 512})
    memory_models: list[str] = field(default_factory=lambda: ["retinanet_r18_fpn", "retinanet_r50_fpn"])
    memory_size: int = 512
    memory_batches: dict[str, int] = field(default_factory=lambda: {"infer": 1, "train": 4})
    fast_models: list[str] = field(default_factory=lambda: ["retinanet_r18_fpn", "retinanet_r50_fpn"])
    fast_size: int = 512
    fast_variants: list[str] = field(default_factory=lambda: ["eager", "channels_last", "folded", "jit", "compile"])
    repeat: int = 7
    warmup: int = 1
    model_overrides: dict[str, Any] = field(default_factory=dict)
    torchvision: bool = True


FULL = BenchSettings()
QUICK = BenchSettings(
    infer_models=["retinanet_r18_fpn"], infer_sizes=[320], infer_batches=[1],
    train_models=["retinanet_r18_fpn"], train_sizes=[256], train_batches=[2],
    post_batches=[1], match_batches=[1], loss_batches=[2], peak_sizes={"fp32": 1024, "bf16": 256},
    memory_models=["retinanet_r18_fpn"], memory_size=320, memory_batches={"infer": 1, "train": 2},
    fast_models=["retinanet_r18_fpn"], fast_size=320, repeat=3, warmup=1)


@dataclass
class Table:
    """One result table: ``rows`` are lists aligned with ``columns``."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: list[Any]) -> None:
        """Append a row and show it on stderr at once (a long run shows progress, and a killed
        run leaves its measured rows behind)."""
        self.rows.append(row)
        if PROGRESS:
            print(f"  [{self.title}] " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row),
                  file=sys.stderr, flush=True)

    def markdown(self) -> str:
        fmt = lambda v: f"{v:.3g}" if isinstance(v, float) and abs(v) < 100 else (  # noqa: E731
            f"{v:.0f}" if isinstance(v, float) else str(v))
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in self.rows]
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], repeat: int, warmup: int = 1, device: torch.device | None = None) -> list[float]:
    """Seconds per call of ``fn`` for ``repeat`` calls after ``warmup`` untimed ones."""
    device = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def time_interleaved(fns: dict[str, Callable[[], Any]], repeat: int, warmup: int = 1,
                     device: torch.device | None = None) -> dict[str, list[float]]:
    """Like :func:`time_call` for several candidates, taking turns: round r times every candidate
    once. On a shared machine the load drifts over minutes; interleaving exposes every candidate
    to the same drift, so their medians stay comparable (back-to-back blocks do not)."""
    device = device or torch.device("cpu")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def timed_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images, targets) -> float:
    """Seconds of one training step on CPU: the model's loss dict summed, zero_grad, backward, step."""
    start = time.perf_counter()
    loss = sum(model(images, targets).values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def _median_ms(times: Sequence[float]) -> float:
    return 1000.0 * statistics.median(times)


def count_flops(model: nn.Module, run: Callable[[], Any]) -> int:
    """FLOPs of the Conv2d / ConvTranspose2d / Linear layers during ``run()`` (2 per multiply-add).

    Forward hooks see each call's output shape, so shared heads applied to five levels are counted
    five times. Elementwise ops, norms and post-processing are not counted (a few % of a detector).
    """
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += 2 * output.numel() * k
        elif isinstance(module, nn.ConvTranspose2d):
            k = module.out_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += 2 * inputs[0].numel() * k
        elif isinstance(module, nn.Linear):
            total += 2 * output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return total


def _precision(device: torch.device) -> torch.dtype | None:
    return resolve_precision("auto", device)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return autocast(device, dtype)


def _load_average() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _build(name: str, settings: BenchSettings, size: int | None = None, device: torch.device | None = None,
           **extra: Any) -> nn.Module:
    """A preset with random weights at a fixed square input size (no resize inside the timing)."""
    overrides = dict(settings.model_overrides)
    overrides.update(extra)
    if size is not None and PRESETS[name].arch == "retinanet":   # RefineDet presets carry their size
        overrides.update(fixed_size=[size, size], min_size=size, max_size=size)
    model = build_model(name, **overrides)
    return model.to(device or torch.device("cpu"))


def _images(batch: int, size: int, device: torch.device, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size, size, generator=g).to(device) for _ in range(batch)]


# ----------------------------------------------------------------------------------------------
# Suites
# ----------------------------------------------------------------------------------------------

def bench_peak(settings: BenchSettings, device: torch.device) -> Table:
    """Square matmul GFLOP/s in fp32 and bf16."""
    table = Table("Matmul peak (same run)", ["dtype", "n", "ms", "GFLOP/s"])
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        n = settings.peak_sizes[name]
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        times = time_call(lambda: a @ b, max(3, settings.repeat), settings.warmup, device)
        ms = _median_ms(times)
        table.add([name, n, ms, 2 * n ** 3 / (ms / 1000) / 1e9])
    table.notes.append("bf16 is emulated (and ~100x slower) on CPUs without AMX / AVX512-BF16; "
                       f"this CPU: fast bf16 = {_precision(torch.device('cpu')) is not None}")
    return table


def _torchvision_model(num_classes: int, size: int):
    try:
        # optional comparison: torchvision is not a densedet dependency (never installed into the venv)
        from torchvision.models.detection import retinanet_resnet50_fpn
    except Exception:  # noqa: BLE001 - not installed
        return None
    return retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes,
                                  min_size=size, max_size=size).eval()


def bench_inference(settings: BenchSettings, device: torch.device) -> Table:
    """End-to-end ``model(images)``: fp32 NCHW ``no_grad`` baseline vs densedet's fast path."""
    dtype = _precision(device)
    fast_name = ("optimize_for_inference (conv-BN folded, channels_last) + inference_mode" +
                 (f" + {dtype} autocast" if dtype else " (fp32)"))
    table = Table("Inference latency and throughput",
                  ["model", "size", "batch", "GFLOP/img", "baseline ms", "fast ms", "speedup", "fast img/s",
                   "fast GFLOP/s", "torchvision ms"])
    table.notes += [f"baseline: fp32, NCHW, torch.no_grad; fast: {fast_name}",
                    "latency = median over repeats of model(list of images) incl. pre/post-processing; "
                    "random weights, so post-processing sees few candidates (see the post suite); RefineDet "
                    "with score_thresh 0.3 for that reason",
                    "GFLOP/s = counted conv/linear FLOPs / fast latency"]
    tv_note = False
    for name in settings.infer_models:
        preset = PRESETS[name]
        if preset.arch == "refinedet" and preset.refinedet.image_size not in settings.infer_sizes:
            table.notes.append(f"{name}: not measured: it runs at {preset.refinedet.image_size} px only, not at "
                               f"the sizes asked for ({' '.join(map(str, settings.infer_sizes))})")
        for size in settings.infer_sizes:
            if preset.arch == "refinedet" and size != preset.refinedet.image_size:
                continue           # RefineDet320 runs at 320, RefineDet512 at 512
            # random weights: RetinaNet's prior (0.01) stays under its 0.05 threshold, but a random
            # RefineDet's softmax (~1/21 per class) passes 0.01 everywhere and would time 20 full
            # NMS runs; raise its threshold so both time the network (see the post suite for NMS)
            extra = {"score_thresh": 0.3} if preset.arch == "refinedet" else {}
            try:
                base = _build(name, settings, size, device, **extra).eval()
            except Exception as err:  # noqa: BLE001 - a preset under construction must not stop the suite
                table.notes.append(f"{name}: could not be built ({type(err).__name__}: {err})")
                continue
            fast = optimize_for_inference(base)
            for batch in settings.infer_batches:
                images = _images(batch, size, device)
                flops = count_flops(base, lambda: base(images))

                def run_base():
                    with torch.no_grad():
                        return base(images)

                def run_fast():
                    with torch.inference_mode(), _autocast(device, dtype):
                        return fast(images)

                fns = {"base": run_base, "fast": run_fast}
                if settings.torchvision and name == "retinanet_r50_fpn":
                    tv = _torchvision_model(base.num_classes, size)
                    if tv is not None:
                        tv = tv.to(device)

                        def run_tv():
                            with torch.inference_mode():
                                return tv(images)
                        fns["tv"] = run_tv
                    elif not tv_note:
                        table.notes.append("torchvision not importable: no torchvision column")
                        tv_note = True
                times = time_interleaved(fns, settings.repeat, settings.warmup, device)
                base_ms, fast_ms = _median_ms(times["base"]), _median_ms(times["fast"])
                tv_ms: Any = _median_ms(times["tv"]) if "tv" in times else "n/a"
                table.add([name, size, batch, flops / batch / 1e9, base_ms, fast_ms, base_ms / fast_ms,
                                   1000 * batch / fast_ms, flops / 1e9 / (fast_ms / 1000), tv_ms])
            del base, fast
    return table


def _random_targets(batch: int, size: int, num_classes: int, n: int = 8, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(batch):
        xy = torch.rand(n, 2, generator=g) * size * 0.7
        wh = 16 + torch.rand(n, 2, generator=g) * size * 0.3
        boxes = torch.cat([xy, (xy + wh).clamp(max=size)], 1)
        targets.append({"boxes": boxes, "labels": torch.randint(0, num_classes, (n,), generator=g)})
    return targets


def _train_step_times(model: nn.Module, batch: Tensor, targets: list[dict], device: torch.device,
                      dtype: torch.dtype | None, opt: torch.optim.Optimizer) -> dict[str, float]:
    """One RetinaNet step timed in parts (seconds)."""
    t = [time.perf_counter()]
    with _autocast(device, dtype):
        outputs, anchors = model.dense_forward(batch)
        _sync(device)
        t.append(time.perf_counter())
        losses = model.losses(outputs, anchors, targets)
        loss = sum(losses.values())
    _sync(device)
    t.append(time.perf_counter())
    loss.backward()
    _sync(device)
    t.append(time.perf_counter())
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(device)
    t.append(time.perf_counter())
    return {k: t[i + 1] - t[i] for i, k in enumerate(("forward", "loss", "backward", "step"))}


def bench_train(settings: BenchSettings, device: torch.device) -> Table:
    """A RetinaNet training step split into forward, loss, backward and optimizer step."""
    dtype = _precision(device)
    table = Table("Training step (ms, median)",
                  ["model", "size", "batch", "mode", "forward", "loss", "backward", "step", "total", "img/s", "speedup"])
    table.notes.append("baseline: fp32 NCHW; fast: channels_last" + (f" + {dtype} autocast" if dtype else
                                                                      " (fp32: no native bf16 here)"))
    table.notes.append("SGD momentum step; random weights and 8 random boxes per image; BatchNorm in train mode")
    for name, size, batch_size in itertools.product(settings.train_models, settings.train_sizes,
                                                    settings.train_batches):
        images = _images(batch_size, size, device)
        results = {}
        for mode in ("baseline", "fast"):
            torch.manual_seed(0)
            model = _build(name, settings, size, device).train()
            if mode == "fast":
                model = model.to(memory_format=torch.channels_last)
            targets = [{k: v.to(device) for k, v in t.items()}
                       for t in _random_targets(batch_size, size, model.num_classes)]
            batch, _, targets = model.preprocessor(images, targets)
            if mode == "fast":
                batch = batch.contiguous(memory_format=torch.channels_last)
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
            parts = [_train_step_times(model, batch, targets, device, dtype if mode == "fast" else None, opt)
                     for _ in range(settings.warmup + settings.repeat)][settings.warmup:]
            med = {k: 1000 * statistics.median(p[k] for p in parts) for k in parts[0]}
            total = 1000 * statistics.median(sum(p.values()) for p in parts)
            results[mode] = total
            table.add([name, size, batch_size, mode, med["forward"], med["loss"], med["backward"], med["step"],
                               total, 1000 * batch_size / total,
                               results["baseline"] / total if mode == "fast" else 1.0])
            del model, opt
    return table


def _dense_postprocess_inputs(settings: BenchSettings, batch: int, seed: int = 0):
    """logits/deltas/anchors for five levels of ``post_candidates`` anchors each, where every
    anchor has several classes above the threshold (so each level's top-k is full)."""
    g = torch.Generator().manual_seed(seed)
    k = settings.post_classes
    level_sizes, anchors = [], []
    for level in range(settings.post_levels):
        n = settings.post_candidates
        side = 32 * 2 ** level
        centres = torch.rand(n, 2, generator=g) * 800
        half = side * (0.5 + torch.rand(n, 2, generator=g)) / 2
        anchors.append(torch.cat([centres - half, centres + half], 1))
        level_sizes.append(n)
    anchors = torch.cat(anchors)
    total = anchors.shape[0]
    logits = torch.randn(batch, total, k, generator=g) - 1.0      # ~20% of scores above 0.05
    deltas = torch.randn(batch, total, 4, generator=g) * 0.1
    return logits, deltas, anchors, level_sizes


def _postprocess_per_image(model: nn.Module, logits: Tensor, deltas: Tensor, anchors: Tensor,
                           image_sizes: list[tuple[int, int]], level_sizes: list[int]) -> list[dict]:
    """The baseline: torchvision's RetinaNet post-processing shape — loop over images, then levels."""
    results = []
    k = logits.shape[-1]
    for i, size in enumerate(image_sizes):
        boxes_all, scores_all, labels_all = [], [], []
        for lg, dl, an in zip(logits[i].split(level_sizes), deltas[i].split(level_sizes), anchors.split(level_sizes)):
            scores = torch.sigmoid(lg).flatten()
            keep = scores > model.score_thresh
            scores, idxs = scores[keep], torch.nonzero(keep).squeeze(1)
            top = min(model.topk_candidates, idxs.numel())
            scores, order = scores.topk(top)
            idxs = idxs[order]
            anchor_idxs = idxs // k
            boxes = clip_boxes(model.box_coder.decode(dl[anchor_idxs], an[anchor_idxs]), size)
            boxes_all.append(boxes)
            scores_all.append(scores)
            labels_all.append(idxs % k)
        boxes, scores, labels = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
        keep = batched_nms(boxes, scores, labels, model.nms_thresh)[: model.detections_per_img]
        results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return results


def bench_post(settings: BenchSettings, device: torch.device) -> Table:
    """Dense post-processing: batched (densedet) vs per-image loop."""
    table = Table(f"Post-processing, {settings.post_levels} levels x {settings.post_candidates} candidates, "
                  f"{settings.post_classes} classes",
                  ["batch", "candidates/img", "kept/img", "per-image loop ms", "densedet batched ms", "speedup"])
    # only score_thresh, topk, nms, detections_per_img and the coder matter: a bare object will do
    model = RetinaNet.__new__(RetinaNet)
    nn.Module.__init__(model)
    model.box_coder, model.score_thresh, model.topk_candidates = BoxCoder(), 0.05, 1000
    model.nms_thresh, model.detections_per_img = 0.5, 100
    for batch in settings.post_batches:
        logits, deltas, anchors, level_sizes = _dense_postprocess_inputs(settings, batch)
        logits, deltas, anchors = logits.to(device), deltas.to(device), anchors.to(device)
        sizes = [(800, 800)] * batch
        outputs, per_level = {"cls_logits": logits, "bbox_deltas": deltas}, list(anchors.split(level_sizes))
        fast = lambda: RetinaNet.postprocess(model, outputs, per_level, sizes)  # noqa: E731
        slow = lambda: _postprocess_per_image(model, logits, deltas, anchors, sizes, level_sizes)  # noqa: E731
        a, b = fast(), slow()
        for x, y in zip(a, b):   # same detections (ties aside), so the comparison is fair
            if x["scores"].shape != y["scores"].shape or not torch.allclose(x["scores"], y["scores"]):
                table.notes.append("warning: baseline and densedet post-processing disagree")
                break
        base_ms = _median_ms(time_call(slow, settings.repeat, settings.warmup, device))
        fast_ms = _median_ms(time_call(fast, settings.repeat, settings.warmup, device))
        cand = min(settings.post_candidates, 1000) * settings.post_levels
        table.add([batch, cand, statistics.mean(len(x["scores"]) for x in a), base_ms, fast_ms,
                           base_ms / fast_ms])
    table.notes.append("scores > 0.05, top 1000 per level, class-wise NMS 0.5, 100 per image; both use densedet's "
                       "exact NMS, so the difference is batching over images")
    return table


def _match_per_image(anchors: Tensor, gt_boxes: list[Tensor], fg: float = 0.5, bg: float = 0.4) -> list[Tensor]:
    """Baseline matcher, torchvision's algorithm image by image (IoU ≥ fg foreground, < bg
    background, low-quality matches kept)."""
    out = []
    for gt in gt_boxes:
        iou = box_iou(gt, anchors)                          # [G, A]
        vals, idx = iou.max(0)
        matched = idx.clone()
        matched[vals < bg] = -1
        matched[(vals >= bg) & (vals < fg)] = -2
        best = iou.max(1, keepdim=True).values
        gt_i, anc_i = torch.nonzero((iou == best) & (best > 0), as_tuple=True)
        matched[anc_i] = idx[anc_i]
        out.append(matched)
    return out


def bench_match(settings: BenchSettings, device: torch.device) -> Table:
    table = Table(f"Matching, {settings.match_anchors} anchors x {settings.match_boxes} boxes",
                  ["batch", "per-image loop ms", "all images at once ms", "densedet ms", "speedup vs loop"])
    g = torch.Generator().manual_seed(0)
    side = int(math.sqrt(settings.match_anchors / 9))
    centres = torch.rand(settings.match_anchors, 2, generator=g) * 1024
    wh = 16 + torch.rand(settings.match_anchors, 2, generator=g) * 300
    anchors = torch.cat([centres - wh / 2, centres + wh / 2], 1).to(device)
    matcher = Matcher()
    at_once = Matcher()
    at_once.chunk_elements = 1 << 62
    for batch in settings.match_batches:
        targets = []
        for _ in range(batch):
            xy = torch.rand(settings.match_boxes, 2, generator=g) * 900
            wh = 8 + torch.rand(settings.match_boxes, 2, generator=g) * 200
            targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.zeros(settings.match_boxes,
                                                                                        dtype=torch.long)})
        padded = pad_targets(targets, device)
        gts = [t["boxes"].to(device) for t in targets]
        times = time_interleaved({"loop": lambda: _match_per_image(anchors, gts),
                                  "once": lambda: at_once(anchors, padded),
                                  "densedet": lambda: matcher(anchors, padded)}, settings.repeat, settings.warmup,
                                 device)
        base_ms, once_ms, fast_ms = (_median_ms(times[k]) for k in ("loop", "once", "densedet"))
        table.add([batch, base_ms, once_ms, fast_ms, base_ms / fast_ms])
    table.notes.append(f"anchors: {settings.match_anchors} random boxes in a 1024 px image (~{side}x{side}x9)")
    table.notes.append(f"densedet matches images together while [images, boxes, anchors] stays under "
                       f"{Matcher.chunk_elements} elements, image by image beyond")
    return table


# -- peak memory ---------------------------------------------------------------------------------

def _rss_mb() -> tuple[float, float]:
    """(current, high-water) resident set size in MB, from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line[:5]] = int(line.split()[1]) / 1024
    return values["VmRSS"], values["VmHWM"]


def _reset_peak() -> bool:
    """Reset the kernel's high-water mark (Linux ≥ 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _memory_child(spec: dict) -> dict:
    """Runs in a fresh interpreter: build the model and inputs, reset the high-water mark, do the
    work twice, read the high-water mark."""
    import resource  # Unix-only: imported where the memory suite runs, so the command loads everywhere
    torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))
    settings = BenchSettings(model_overrides=spec["overrides"])
    device = torch.device("cpu")
    size, batch = spec["size"], spec["batch"]
    model = _build(spec["model"], settings, size, device)
    fast = spec["mode"] == "fast"
    dtype = _precision(device) if fast else None
    if fast:
        model = optimize_for_inference(model, inplace=True) if spec["kind"] == "infer" else \
            model.to(memory_format=torch.channels_last)
    images = _images(batch, size, device)
    if spec["kind"] == "infer":
        model.eval()
        context = torch.inference_mode if fast else torch.no_grad
        before = _start_peak()
        for _ in range(2):
            with context(), _autocast(device, dtype):
                model(images)
    else:
        model.train()
        targets = _random_targets(batch, size, model.num_classes)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
        batch_t, _, targets = model.preprocessor(images, targets)
        before = _start_peak()
        for _ in range(2):
            _train_step_times(model, batch_t, targets, device, dtype, opt)
    after = _rss_mb()[1] if before[1] else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"setup_mb": before[0], "peak_mb": after, "params_mb": params / 2 ** 20, "exact": bool(before[1])}


def _start_peak() -> tuple[float, bool]:
    """(resident MB now, whether the high-water mark could be reset). Without the reset (not
    Linux), fall back to ru_maxrss, which then also counts any higher peak during setup."""
    import resource  # Unix-only (see _memory_child)
    gc.collect()
    if os.path.exists("/proc/self/status") and _reset_peak():
        return _rss_mb()[0], True
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, False


def measure_peak_memory(kind: str, model: str, size: int, batch: int, mode: str,
                        overrides: dict | None = None, threads: int | None = None) -> dict:
    """Peak resident memory (MB) of two inference calls / training steps, in a fresh subprocess.

    Why the OS's numbers: tracemalloc only sees Python's allocator, while torch's CPU tensors come
    from its C++ allocator; the kernel's resident-set high-water mark sees everything (weights,
    activations, autograd buffers, oneDNN scratch). A fresh process per measurement keeps one
    run's allocator caches out of the next. After building the model and inputs the high-water
    mark is reset (``/proc/self/clear_refs``), so ``peak_mb`` is the peak *during the work* and
    ``peak_mb - setup_mb`` what the work added on top of the resident model and inputs. Where the
    reset is impossible (``exact`` False) ``ru_maxrss`` is used and setup peaks are included.
    """
    spec = {"kind": kind, "model": model, "size": size, "batch": batch, "mode": mode,
            "overrides": overrides or {}, "threads": threads}
    code = ("import json, sys; from densedet.commands.bench import _memory_child; "
            "print('RESULT' + json.dumps(_memory_child(json.loads(sys.argv[1]))))")
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement {spec} failed:\n{proc.stderr[-2000:]}")
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def bench_memory(settings: BenchSettings, device: torch.device) -> Table:
    table = Table(f"Peak resident memory at {settings.memory_size}x{settings.memory_size} (MB)",
                  ["model", "work", "batch", "mode", "resident after setup", "peak during work", "added by the work",
                   "weights"])
    table.notes.append("kernel RSS high-water mark in a fresh subprocess per row, reset after setup "
                       "(tracemalloc does not see torch's C++ allocator); two calls / steps; CPU")
    for name in settings.memory_models:
        for kind in ("infer", "train"):
            batch = settings.memory_batches[kind]
            for mode in ("baseline", "fast"):
                r = measure_peak_memory(kind, name, settings.memory_size, batch, mode, settings.model_overrides,
                                        torch.get_num_threads())
                table.add([name, kind, batch, mode, r["setup_mb"], r["peak_mb"],
                                   r["peak_mb"] - r["setup_mb"], r["params_mb"]])
                if not r["exact"]:
                    table.notes.append("high-water mark could not be reset: peaks include setup")
    return table


# -- inference fast paths ------------------------------------------------------------------------

class _Network(nn.Module):
    """features + heads of a detector: ``batch -> tuple of head outputs`` (what jit/compile can take)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.model.head_outputs(self.model.features(x)).values())


def bench_fast_paths(settings: BenchSettings, device: torch.device) -> Table:
    """fp32 inference of the network alone under candidate optimisations."""
    size = settings.fast_size
    table = Table(f"fp32 inference fast paths, network only, {size}x{size} batch 1 (ms, median)",
                  ["model", "variant", "ms", "speedup vs first", "max |diff|", "prepare s"])
    x = torch.randn(1, 3, size, size, device=device)
    for name in settings.fast_models:
        model = _build(name, settings, size, device).eval()
        net = _Network(model).eval()
        with torch.inference_mode():
            ref = net(x)
        variants: dict[str, tuple[str, Callable[[], nn.Module], bool]] = {
            "eager": ("eager no_grad NCHW (baseline)", lambda: net, False),
            "channels_last": ("inference_mode + channels_last",
                              lambda: copy.deepcopy(net).to(memory_format=torch.channels_last), True),
            "folded": ("+ conv-BN folded",
                       lambda: fuse_conv_bn(copy.deepcopy(net)).to(memory_format=torch.channels_last), True),
            "jit": ("torch.jit.trace + freeze", lambda: _jit_freeze(net, x), True),
            "compile": ("torch.compile (inductor)", lambda: _compiled(net, x), True),
        }
        prepared: dict[str, tuple[Callable[[], Any], Any, float]] = {}
        for key in settings.fast_variants:
            label, prepare, inference_mode = variants[key]
            ctx = torch.inference_mode if inference_mode else torch.no_grad
            xin = x.contiguous(memory_format=torch.channels_last) if key in ("channels_last", "folded") else x
            start = time.perf_counter()
            try:
                candidate = prepare()
                with ctx():
                    out = candidate(xin)          # first call: compiles / specialises
            except Exception as err:  # noqa: BLE001 - report a failing candidate, keep measuring the rest
                table.add([name, label, "failed", "", "", f"{type(err).__name__}: {str(err)[:80]}"])
                continue

            def call(candidate=candidate, ctx=ctx, xin=xin):
                with ctx():
                    return candidate(xin)
            diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(out, ref))
            prepared[key] = (call, diff, time.perf_counter() - start)
        times = time_interleaved({k: v[0] for k, v in prepared.items()}, settings.repeat, settings.warmup, device)
        base_ms = _median_ms(times[next(iter(times))])
        for key, (_, diff, prep_s) in prepared.items():
            ms = _median_ms(times[key])
            table.add([name, variants[key][0], ms, base_ms / ms, diff, prep_s])
    table.notes.append("network = backbone + FPN + heads (post-processing excluded: data-dependent shapes); "
                       "variants timed in turns (interleaved); prepare = build + first call (compilation)")
    return table


def _jit_freeze(net: nn.Module, x: Tensor) -> nn.Module:
    with torch.no_grad():
        traced = torch.jit.trace(copy.deepcopy(net).eval(), x, check_trace=False)
    return torch.jit.optimize_for_inference(torch.jit.freeze(traced))


def _compiled(net: nn.Module, x: Tensor) -> nn.Module:
    return torch.compile(copy.deepcopy(net).eval())


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------

def bench_loss(settings: BenchSettings, device: torch.device) -> Table:
    """The classification loss of a training step (forward + backward) over RetinaNet's anchors at
    ``loss_size`` with 80 classes: the fused :func:`~densedet.losses.focal_loss_sum` against the
    unfused path (one-hot targets, copy of the valid anchors, element-wise focal loss, autograd)."""
    k = 80
    cells = sum(math.ceil(settings.loss_size / 2 ** level) ** 2 for level in range(3, 8))
    anchors = 9 * cells
    table = Table(f"Focal loss, forward + backward, {anchors} anchors x {k} classes",
                  ["batch", "unfused ms", "fused ms", "speedup", "max |grad diff|"])
    g = torch.Generator().manual_seed(0)
    for batch in settings.loss_batches:
        logits = (torch.randn(batch, anchors, k, generator=g) * 3 - 4).to(device)
        labels = torch.randint(0, k, (batch, anchors), generator=g)
        labels[torch.rand(batch, anchors, generator=g) > 0.002] = -1          # ~1:500 foreground
        valid = (torch.rand(batch, anchors, generator=g) > 0.05)
        labels, valid = labels.to(device), valid.to(device)
        grads = {}

        def unfused():
            x = logits.clone().requires_grad_(True)
            fg = labels >= 0
            targets = torch.zeros_like(x)
            targets[fg, labels[fg]] = 1.0
            sigmoid_focal_loss(x[valid], targets[valid]).sum().backward()
            grads["unfused"] = x.grad

        def fused():
            x = logits.clone().requires_grad_(True)
            focal_loss_sum(x, labels, valid).backward()
            grads["fused"] = x.grad

        times = time_interleaved({"unfused": unfused, "fused": fused}, settings.repeat, settings.warmup, device)
        base, fast = _median_ms(times["unfused"]), _median_ms(times["fused"])
        table.add([batch, base, fast, base / fast, float((grads["unfused"] - grads["fused"]).abs().max())])
    table.notes.append("both include the clone of the logits that stands in for the head's output; "
                       "the ratio is what RetinaNet.losses gained by the fusion")
    return table


_SUITE_FUNCS = {"infer": bench_inference, "peak": bench_peak, "train": bench_train, "post": bench_post,
                "match": bench_match, "loss": bench_loss, "memory": bench_memory, "fast": bench_fast_paths}


def run_suites(suites: Sequence[str], settings: BenchSettings, device: torch.device | None = None,
               log: Callable[[str], None] = print) -> dict:
    """Run the named suites; returns ``{"machine": {...}, "tables": [Table.as_dict(), ...]}`` and
    logs each table as markdown as soon as it is measured."""
    flush_denormals()           # what densedet's training and inference run with
    device = device or torch.device("cpu")
    unknown = [s for s in suites if s not in _SUITE_FUNCS]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; choose from {', '.join(SUITES)} or all")
    machine = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
               "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
               "fast_bf16": _precision(device) is not None, "load_average_start": _load_average()}
    log(f"densedet bench: torch {machine['torch']}, {machine['threads']} threads on {device}, "
        f"load average {machine['load_average_start']}")
    tables = []
    for suite in suites:
        start = time.perf_counter()
        table = _SUITE_FUNCS[suite](settings, device)
        table.notes.append(f"suite '{suite}' took {time.perf_counter() - start:.0f} s")
        tables.append(table)
        log(table.markdown())
    machine["load_average_end"] = _load_average()
    log(f"load average at the end: {machine['load_average_end']} (timings are medians; a shared machine "
        f"inflates them all)")
    return {"machine": machine, "tables": [t.as_dict() for t in tables]}


def write_results(results: dict, path: str | Path) -> None:
    """``.json`` → JSON; anything else → markdown."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(results, indent=1))
        return
    m = results["machine"]
    head = (f"# densedet bench\n\ntorch {m['torch']}, {m['threads']} threads, {m['device']}, fast bf16: "
            f"{m['fast_bf16']}, load average {m['load_average_start']} → {m['load_average_end']}\n\n")
    path.write_text(head + "\n".join(Table(**t).markdown() for t in results["tables"]))


def add_parser(subparsers: Any) -> None:
    """Register ``densedet bench [--quick] [--suite ...] [--out PATH]``."""
    p = subparsers.add_parser("bench", help="measure inference/training speed, post-processing, matching, memory",
                              description=__doc__.split("\n\n")[0] + " Suites: " + ", ".join(SUITES) +
                              "; 'all' = " + ", ".join(DEFAULT_SUITES) + ".")
    p.add_argument("--quick", action="store_true", help="few sizes and repeats (~2 minutes on two cores)")
    p.add_argument("--suite", nargs="+", default=["all"], choices=["all", *SUITES],
                   help="which suites to run (default all; 'fast' must be named: it compiles for minutes)")
    p.add_argument("--out", default=None, help="also write the tables to this .md or .json file")
    p.add_argument("--repeat", type=int, default=None, help="timed repeats per measurement")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--models", nargs="+", default=None, help="presets for the infer suite (RetinaNet ones also "
                   "for the train suite)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="input sizes for the infer and train suites")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes for the infer and train suites")
    p.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    """``densedet bench`` without the rest of the CLI (the scripts in ``benchmarks/`` call this)."""
    parser = argparse.ArgumentParser(prog="densedet")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


def _check_args(args: argparse.Namespace) -> None:
    """Refuse settings no measurement can run with, naming the option (before minutes of timing)."""
    for name, values in (("--repeat", [args.repeat]), ("--threads", [args.threads]), ("--sizes", args.sizes),
                         ("--batches", args.batches)):
        bad = [v for v in values or () if v is not None and v < 1]
        if bad:
            raise UsageError(f"{name}: must be >= 1, got {' '.join(map(str, bad))}")
    unknown = [m for m in args.models or () if m not in PRESETS]
    if unknown:
        raise UsageError(f"--models: unknown preset(s) {' '.join(unknown)}; choose from {', '.join(PRESETS)}")
    try:
        kind = torch.device(args.device).type
    except RuntimeError:
        raise UsageError(f"--device {args.device}: not a device name (cpu, cuda, cuda:1 ...)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: this PyTorch sees no CUDA device; use --device cpu")
    if args.out and Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: is a folder; bench writes one file (.md, or .json)")
    above = next((p for p in Path(args.out or ".").parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UsageError(f"--out {args.out}: {above} is a file, not a folder")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    settings = copy.deepcopy(QUICK if args.quick else FULL)
    if args.repeat:
        settings.repeat = args.repeat
    if args.models:
        settings.infer_models = list(args.models)
        settings.train_models = [m for m in args.models if m.startswith("retinanet")] or settings.train_models
    if args.sizes:
        settings.infer_sizes = list(args.sizes)
        settings.train_sizes = list(args.sizes)
    if args.batches:
        settings.infer_batches = list(args.batches)
        settings.train_batches = list(args.batches)
    if args.threads:
        torch.set_num_threads(args.threads)
    global PROGRESS
    PROGRESS = True
    suites = list(DEFAULT_SUITES) if "all" in args.suite else list(dict.fromkeys(args.suite))
    results = run_suites(suites, settings, torch.device(args.device))
    if args.out:
        write_results(results, args.out)
        print(f"wrote {args.out}")
    return 0

"""The CPU training step's kernels: convolution weight gradients as one GEMM, fused AdamW, and both in a config's step.

    python benchmarks/train_kernels.py [--config configs/demo_digits.yaml] [--steps 24] [--repeat 10]
                                       [--products 131072 65536]

Part 1, per convolution shape (fp32, channels_last, 3x3 unless noted): the weight gradient alone,
``aten.convolution_backward`` asked for the weight only (the baseline, what autograd runs) against
:func:`densedet.conv_grad.conv2d_weight_grad`, with the largest relative difference between them.
With ``--config``, part 2: one AdamW step over the config model's trainable parameters, per-op
(the baseline) against ``fused=True``; part 3: the config's training step (its model, batches,
frozen stages) with plain convolutions and per-op AdamW (the baseline), with
:func:`use_gemm_weight_grad` (the library's threshold on in x out channels, or each of
``--products``), and with that and fused AdamW (what ``densedet train`` runs), all from the same
weights, steps interleaved so that load drifts hit all alike, grouped by the batch's window size.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from densedet.commands.bench import timed_train_step  # noqa: E402
from densedet.conv_grad import MIN_CHANNEL_PRODUCT, conv2d_weight_grad, use_gemm_weight_grad  # noqa: E402
from densedet.device import flush_denormals  # noqa: E402

# (batch, in channels, map size, out channels, kernel, stride): the demo's layer3/layer4 on 64, 96
# and 160 px windows, then larger maps (ResNet layer4 at 320-800 px inputs) and narrower layers.
SHAPES = [(50, 512, 2, 512, 3, 1), (22, 512, 3, 512, 3, 1), (8, 512, 5, 512, 3, 1),
          (50, 256, 4, 512, 3, 2), (8, 256, 10, 512, 3, 2), (50, 256, 4, 512, 1, 2),
          (8, 512, 10, 512, 3, 1), (8, 512, 16, 512, 3, 1), (4, 512, 25, 512, 3, 1), (8, 256, 32, 512, 3, 2),
          (50, 256, 4, 256, 3, 1), (8, 256, 10, 256, 3, 1), (50, 128, 8, 256, 3, 2), (8, 128, 20, 256, 3, 2),
          (50, 256, 4, 128, 1, 1), (50, 128, 8, 128, 3, 1), (8, 128, 20, 128, 3, 1)]


def _ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def shape_table(repeat: int) -> None:
    print("| input | out | kernel / stride | oneDNN weight grad ms | GEMM ms | speedup | max rel. diff |")
    print("|---|---|---|---|---|---|---|")
    for n, cin, size, cout, k, s in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(n, cin, size, size).contiguous(memory_format=torch.channels_last)
        w = (torch.randn(cout, cin, k, k) * 0.01).contiguous(memory_format=torch.channels_last)
        pad = k // 2
        g = torch.randn_like(F.conv2d(x, w, stride=s, padding=pad))

        def native():
            return torch.ops.aten.convolution_backward(g, x, w, None, [s, s], [pad, pad], [1, 1], False, [0, 0], 1,
                                                       [False, True, False])[1]

        def gemm():
            return conv2d_weight_grad(x, g, w.shape, (s, s), (pad, pad))

        diff = ((gemm() - native()).abs().max() / native().abs().max()).item()
        t_native, t_gemm = _ms(native, repeat), _ms(gemm, repeat)
        print(f"| {n}x{cin}x{size}x{size} | {cout} | {k}x{k} / {s} | {t_native:.1f} | {t_gemm:.1f} | "
              f"{t_native / t_gemm:.2f}x | {diff:.1e} |", flush=True)


def adam_table(model, repeat: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    ms = {}
    for fused in (False, True):
        copies = [p.detach().clone().requires_grad_() for p in params]
        for c, p in zip(copies, params):
            c.grad = p.grad.clone()
        opt = torch.optim.AdamW(copies, lr=1e-4, weight_decay=1e-4, fused=fused)
        ms[fused] = _ms(opt.step, repeat)
    for p in params:
        p.grad = None
    print(f"\nAdamW step, {len(params)} tensors, {sum(p.numel() for p in params) / 1e6:.1f}M parameters\n")
    print("| AdamW | ms | speedup |\n|---|---|---|")
    print(f"| per-op (torch's default on CPU) | {ms[False]:.1f} | 1.00x |")
    print(f"| fused=True | {ms[True]:.1f} | {ms[False] / ms[True]:.2f}x |")


def step_table(config: str, steps: int, products: list[int], repeat: int) -> None:
    from densedet.config import load_config
    from densedet.engine.data import BatchStream, build_train_dataset, load_split
    from densedet.models import build_from_config
    cfg = load_config(config)
    stream = BatchStream(build_train_dataset(cfg, load_split(cfg.data, "train")), cfg.train.batch_size, 0,
                         crop_sizes=cfg.data.crop_sizes)
    torch.manual_seed(0)
    base = build_from_config(cfg.model).to(memory_format=torch.channels_last)
    frozen = cfg.train.pretrain_freeze_stages if cfg.train.pretrain_iters or cfg.train.pretrain_minutes else 0
    if frozen:
        base.backbone.body.freeze(frozen)
    adam_table(base, repeat)
    models = {}
    for product, fused in [(0, False)] + [(p, False) for p in products] + [(products[0], True)]:
        model = copy.deepcopy(base).train()
        switched = use_gemm_weight_grad(model, product) if product else 0
        name = f"GEMM weight grad, in x out >= {product} ({switched} convs)" if product else "oneDNN, per-op AdamW"
        name += ", fused AdamW" if fused else ""
        params = [p for p in model.parameters() if p.requires_grad]
        models[name] = (model, torch.optim.AdamW(params, lr=1e-4, fused=fused))
    times: dict[str, dict[int, list[float]]] = {name: {} for name in models}
    windows: dict[int, int] = {}
    for it in range(steps):
        images, targets = stream.batch(it)
        size = images[0].shape[-1]
        windows[size] = len(images)
        for name, (model, opt) in models.items():
            times[name].setdefault(size, []).append(timed_train_step(model, opt, images, targets))
    sizes = sorted(windows)
    print(f"\n{config}: training step, median ms per window size ({steps} interleaved steps, the first of each "
          "size dropped)\n")
    print("| convolutions | " + " | ".join(f"{windows[s]} x {s} px" for s in sizes) + " | windows / s | speedup |")
    print("|---" * (len(sizes) + 3) + "|")
    rates, baseline = {}, next(iter(models))
    for name in models:
        medians = {s: statistics.median(times[name][s][1:] or times[name][s]) for s in sizes}
        # windows/s over a cycle with each size equally often, as the stream draws them
        rates[name] = sum(windows[s] for s in sizes) / sum(medians.values())
        print(f"| {name} | " + " | ".join(f"{1000 * medians[s]:.0f}" for s in sizes)
              + f" | {rates[name]:.1f} | {rates[name] / rates[baseline]:.2f}x |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="also time this config's training step")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--products", type=int, nargs="+", default=[MIN_CHANNEL_PRODUCT],
                        help="in x out channel thresholds to compare (default: the library's)")
    args = parser.parse_args()
    flush_denormals()
    shape_table(args.repeat)
    if args.config:
        step_table(args.config, args.steps, args.products, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())

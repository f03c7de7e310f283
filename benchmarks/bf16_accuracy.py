"""COCO AP of a checkpoint in fp32 and under bf16 autocast, on the same images (issue 7's check).

    python benchmarks/bf16_accuracy.py --weights runs/demo/model_final.pt [--max-images 100]

Runs the checkpoint over its validation split twice — fp32, then ``torch.autocast`` to bf16 (forced,
whatever the CPU: on one without AMX / AVX512-BF16 bf16 is emulated and ~40x slower, so a subset
with ``--max-images`` keeps this short) — and prints both COCO APs, the change in AP points, and
how far the detections themselves moved (score and box differences of the top detections).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout without installing

import torch  # noqa: E402

from densedet.data import to_coco_dict  # noqa: E402
from densedet.device import flush_denormals  # noqa: E402
from densedet.engine.checkpoint import model_from_checkpoint  # noqa: E402
from densedet.engine.data import load_split  # noqa: E402
from densedet.engine.evaluate import predict_dataset  # noqa: E402
from densedet.evaluation import evaluate_coco  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--max-images", type=int, default=0, help="0: the whole validation split")
    args = parser.parse_args()
    flush_denormals()
    model, cfg, _ = model_from_checkpoint(args.weights)
    model.eval()
    data = load_split(cfg.data, "val")
    if args.max_images:
        data = dataclasses.replace(data, records=data.records[: args.max_images])
    rows = {}
    for name, dtype in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
        start = time.perf_counter()
        results = predict_dataset(model, data, batch_size=4, dtype=dtype)
        seconds = (time.perf_counter() - start) / len(data.records)
        metrics = evaluate_coco(results, to_coco_dict(data), class_names=data.class_names)
        rows[name] = (metrics, seconds, results)
    base = rows["fp32"][0]
    print(f"{len(data.records)} validation images, weights {args.weights}\n")
    print("| precision | AP | AP50 | AP75 | ΔAP (points) | s/image |")
    print("|---|---|---|---|---|---|")
    for name, (m, seconds, _) in rows.items():
        print(f"| {name} | {m['AP']:.4f} | {m['AP50']:.4f} | {m['AP75']:.4f} | "
              f"{100 * (m['AP'] - base['AP']):+.2f} | {seconds:.2f} |")
    a, b = rows["fp32"][2], rows["bf16 autocast"][2]
    top = min(len(a), len(b), 200)
    ds = sorted(abs(x["score"] - y["score"]) for x, y in zip(sorted(a, key=lambda r: -r["score"])[:top],
                                                               sorted(b, key=lambda r: -r["score"])[:top]))
    if ds:
        print(f"\nscores of the top {top} detections (rank by rank): median |Δ| {ds[len(ds) // 2]:.4f}, "
              f"max {ds[-1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

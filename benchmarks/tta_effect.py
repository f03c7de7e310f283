"""COCO AP of a checkpoint single-scale vs each test-time augmentation mode (issue 4's measurement).

    python benchmarks/tta_effect.py --weights runs/demo/model_final.pt [--max-images 100]
    python benchmarks/tta_effect.py --weights runs/demo/model_final.pt --scale-sets 320,384 320,352,384,416,448
    python benchmarks/tta_effect.py --weights runs/demo/model_final.pt --split tune --scale-sets 384 320,384

Runs every mode on the checkpoint's validation split (``--split tune``: the digit scenes held out
for choosing test-time settings, so that val is looked at once, with the choice made) and prints one markdown table: the
single-scale baseline first, each TTA mode with its AP and the change against that baseline,
and the seconds per image (measured in the same run, so the cost is comparable too).
``--scale-sets`` replaces the preset modes with one multi-scale pass set per argument (input
sizes, no flip, ``--merge`` (box voting by default): what ``test.tta_scales`` runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from densedet.data import DetectionDataset, to_coco_dict
from densedet.engine.checkpoint import model_from_checkpoint
from densedet.engine.data import load_split
from densedet.evaluation import detections_to_coco, evaluate_coco
from densedet.tta import FLIP_ONLY, TTAConfig, apply_soft_nms, refinedet_tta, tta_inference, model_input_size


def evaluate(model, data, images, predict, batch_size: int = 8) -> tuple[dict, float]:
    results, start = [], time.perf_counter()
    for i in range(0, len(images), batch_size):
        chunk = list(range(i, min(i + batch_size, len(images))))
        with torch.inference_mode():
            dets = predict([images[j] for j in chunk])
        results += detections_to_coco(dets, [int(data.records[j].image_id) for j in chunk], data.category_ids)
    seconds = (time.perf_counter() - start) / len(images)
    metrics = evaluate_coco(results, to_coco_dict(data), class_names=data.class_names)
    return metrics, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--max-images", type=int, default=0, help="0: the whole validation split")
    parser.add_argument("--scale-sets", nargs="+", default=[], metavar="S1,S2,…",
                        help="instead of the preset modes: these input-size sets, no flip, merged by --merge")
    parser.add_argument("--merge", default="vote", choices=["vote", "soft_vote", "nms"],
                        help="how --scale-sets passes are merged (default vote)")
    parser.add_argument("--split", default="val", choices=["val", "tune"])
    args = parser.parse_args()
    model, cfg, _ = model_from_checkpoint(args.weights)
    data = load_split(cfg.data, args.split)
    if args.max_images:
        data = dataclasses.replace(data, records=data.records[: args.max_images])
    dataset = DetectionDataset(data)
    images = [dataset[i][0] for i in range(len(dataset))]
    base = model_input_size(model)
    multi = refinedet_tta(base)
    modes = [
        ("single scale", lambda ims: model(ims)),
        ("single scale + soft-NMS (linear)", lambda ims: apply_soft_nms(model(ims), "linear")),
        ("flip, box voting", lambda ims: tta_inference(model, ims, FLIP_ONLY)),
        ("flip, NMS", lambda ims: tta_inference(model, ims, dataclasses.replace(FLIP_ONLY, merge="nms"))),
        (f"multi-scale {list(multi.scales)} + flip, box voting", lambda ims: tta_inference(model, ims, multi)),
        ("multi-scale + flip, soft voting", lambda ims: tta_inference(model, ims, dataclasses.replace(multi, merge="soft_vote"))),
        ("multi-scale + flip, NMS", lambda ims: tta_inference(model, ims, dataclasses.replace(multi, merge="nms"))),
    ]
    if args.scale_sets:
        sets = [TTAConfig(scales=tuple(int(v) for v in spec.split(",")), flip=False, merge=args.merge)
                for spec in args.scale_sets]
        modes = modes[:1] + [(f"scales {', '.join(map(str, t.scales))}, {args.merge}",
                              lambda ims, t=t: tta_inference(model, ims, t)) for t in sets]
    rows = []
    for name, predict in modes:
        metrics, seconds = evaluate(model, data, images, predict)
        rows.append((name, metrics, seconds))
        print(f"{name}: AP {metrics['AP']:.4f}", file=sys.stderr, flush=True)
    base_ap = rows[0][1]["AP"]
    print(f"\n{args.weights} on {len(images)} {args.split} images\n")
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
    print("| mode | " + " | ".join(keys) + " | ΔAP | s / image |")
    print("|---" * (len(keys) + 3) + "|")
    for name, m, seconds in rows:
        numbers = " | ".join(f"{m[k]:.3f}" for k in keys)
        print(f"| {name} | {numbers} | {m['AP'] - base_ap:+.3f} | {seconds:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

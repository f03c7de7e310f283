"""Where a checkpoint's AP goes on its validation split: missed objects, confused classes, or
background and duplicate detections.

    python benchmarks/error_breakdown.py --weights runs/demo/model_final.pt [--score 0.2]

Three tables:
1. per object size: the share of objects with a detection of the right class at IoU >= 0.5
   (any score the model outputs), and the median score of the best such detection;
2. at the objects that have some detection at IoU >= 0.5: how often the highest-scoring class
   there is the right one (top-1 accuracy of the detector's classification, and the rank of
   the right class);
3. every detection scoring >= --score, matched greedily by score as COCO does at IoU 0.5:
   true positive, duplicate (its object already taken), wrong class (IoU >= 0.5 with an object
   of another class), poorly placed (IoU 0.1-0.5 with an object of its class), background.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout without installing

import torch  # noqa: E402

from densedet.boxes import box_iou  # noqa: E402
from densedet.device import flush_denormals  # noqa: E402
from densedet.engine.checkpoint import model_from_checkpoint  # noqa: E402
from densedet.engine.data import load_split  # noqa: E402
from densedet.engine.evaluate import predict_dataset  # noqa: E402

SIZE_BINS = ((0, 24), (24, 48), (48, 96), (96, 1e9))       # sqrt(box area), pixels
KINDS = ("true positive", "duplicate", "wrong class", "poorly placed", "background")


def image_breakdown(gt_boxes, gt_labels, det_boxes, det_scores, det_labels, score_min):
    """Per object: (size, best right-class score at IoU >= .5, rank of the right class among the
    classes detected at IoU >= .5 or None); per detection >= score_min: its kind index."""
    iou = box_iou(gt_boxes, det_boxes)                                   # [G, D]
    same = gt_labels[:, None] == det_labels[None, :]
    hit = iou >= 0.5
    sizes = ((gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])).sqrt()
    # best score of each class among the detections overlapping each object: [G, K]
    num_classes = int(torch.cat([gt_labels, det_labels]).max()) + 1 if len(gt_labels) else 1
    per_class = torch.zeros(len(gt_boxes), num_classes).scatter_reduce_(
        1, det_labels.expand(len(gt_boxes), -1), torch.where(hit, det_scores, 0.0), "amax")
    right = per_class.gather(1, gt_labels[:, None]).squeeze(1)
    rank = (per_class > right[:, None]).sum(1)
    detected = hit.any(1)
    objects = [(s, r, k if d else None) for s, r, k, d in
               zip(sizes.tolist(), right.tolist(), rank.tolist(), detected.tolist())]
    kinds, taken = [], torch.zeros(len(gt_boxes), dtype=torch.bool)
    for d in torch.argsort(det_scores, descending=True).tolist():
        if det_scores[d] < score_min:
            break
        free = hit[:, d] & same[:, d] & ~taken
        if free.any():
            taken[torch.where(free, iou[:, d], -1.0).argmax()] = True
            kinds.append(0)
        elif (hit[:, d] & same[:, d]).any():
            kinds.append(1)
        elif hit[:, d].any():
            kinds.append(2)
        elif ((iou[:, d] >= 0.1) & same[:, d]).any():
            kinds.append(3)
        else:
            kinds.append(4)
    return objects, kinds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--score", type=float, default=0.2, help="score above which detections are sorted into kinds")
    args = parser.parse_args()
    flush_denormals()
    model, cfg, _ = model_from_checkpoint(args.weights)
    data = load_split(cfg.data, "val")
    label_of = {c: i for i, c in enumerate(data.category_ids)}
    by_image: dict[int, list[dict]] = {}
    for r in predict_dataset(model, data, 8):
        by_image.setdefault(r["image_id"], []).append(r)
    objects, kinds = [], []
    for rec in data.records:
        keep = ~torch.as_tensor(rec.iscrowd, dtype=torch.bool)
        gt_boxes = torch.as_tensor(rec.boxes)[keep]
        gt_labels = torch.as_tensor(rec.labels)[keep]
        dets = by_image.get(int(rec.image_id), [])
        xywh = torch.tensor([d["bbox"] for d in dets], dtype=torch.float32).reshape(-1, 4)
        det_boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        det_scores = torch.tensor([d["score"] for d in dets], dtype=torch.float32)
        det_labels = torch.tensor([label_of[d["category_id"]] for d in dets], dtype=torch.long)
        o, k = image_breakdown(gt_boxes, gt_labels, det_boxes, det_scores, det_labels, args.score)
        objects += o
        kinds += k
    sizes = torch.tensor([o[0] for o in objects])
    best = torch.tensor([o[1] for o in objects])
    print(f"{len(objects)} objects in {len(data.records)} images\n")
    print("| object size (px) | objects | right class found at IoU 0.5 | median score of it |\n|---|---|---|---|")
    for lo, hi in SIZE_BINS:
        m = (sizes >= lo) & (sizes < hi)
        if m.any():
            found = best[m] > 0
            median = f"{best[m][found].median():.2f}" if found.any() else "-"
            name = f"{lo}-{hi:.0f}" if hi < 1e9 else f">= {lo}"
            print(f"| {name} | {int(m.sum())} | {found.float().mean():.1%} | {median} |")
    ranks = torch.tensor([o[2] for o in objects if o[2] is not None])
    print(f"\nobjects with a detection at IoU 0.5: {len(ranks)}; the right class scores highest there for "
          f"{(ranks == 0).float().mean():.1%}")
    print("| rank of the right class | 1 | 2 | 3 | 4+ |\n|---|---|---|---|---|")
    counts = [int((ranks == r).sum()) for r in range(3)] + [int((ranks >= 3).sum())]
    print("| objects | " + " | ".join(str(c) for c in counts) + " |")
    tally = torch.bincount(torch.tensor(kinds, dtype=torch.long), minlength=len(KINDS))
    print(f"\ndetections scoring >= {args.score}: {len(kinds)}")
    print("| kind | detections | share |\n|---|---|---|")
    for name, n in zip(KINDS, tally.tolist()):
        print(f"| {name} | {n} | {n / max(1, len(kinds)):.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

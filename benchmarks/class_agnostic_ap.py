"""COCO AP of a checkpoint on its validation split, class-aware and class-agnostic (every label -> one).

    python benchmarks/class_agnostic_ap.py --weights runs/demo/model_final.pt

The gap between the two says how much of the missing AP is confusing classes rather than missing
objects (class-wise NMS leaves overlapping boxes of different labels, which count as false
positives class-agnostically, so the agnostic AP is a lower bound).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout without installing

from densedet.data import to_coco_dict  # noqa: E402
from densedet.device import flush_denormals  # noqa: E402
from densedet.engine.checkpoint import model_from_checkpoint  # noqa: E402
from densedet.engine.data import load_split  # noqa: E402
from densedet.engine.evaluate import predict_dataset  # noqa: E402
from densedet.evaluation import evaluate_coco  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    args = parser.parse_args()
    flush_denormals()
    model, cfg, _ = model_from_checkpoint(args.weights)
    data = load_split(cfg.data, "val")
    results = predict_dataset(model, data, 8)
    gt = to_coco_dict(data)
    aware = evaluate_coco(results, gt)
    one = copy.deepcopy(gt)
    one["categories"] = [{"id": 1, "name": "object"}]
    for ann in one["annotations"]:
        ann["category_id"] = 1
    agnostic = evaluate_coco([dict(r, category_id=1) for r in results], one)
    print("| | AP | AP50 | AP75 | AR100 |\n|---|---|---|---|---|")
    for name, m in (("class-aware", aware), ("class-agnostic", agnostic)):
        print(f"| {name} | {m['AP']:.3f} | {m['AP50']:.3f} | {m['AP75']:.3f} | {m['AR100']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

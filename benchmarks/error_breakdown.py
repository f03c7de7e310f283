"""Where a checkpoint's AP goes on its validation split: the errors by kind and object size, and the AP50
each kind costs (:func:`densedet.evaluation.errors.error_breakdown`; the same tables are in the run
report, ``densedet eval --weights CKPT --report DIR``).

    python benchmarks/error_breakdown.py --weights runs/demo/model_final.pt [--score 0.2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout without installing

from densedet.device import flush_denormals  # noqa: E402
from densedet.engine.checkpoint import model_from_checkpoint  # noqa: E402
from densedet.engine.data import load_split  # noqa: E402
from densedet.engine.evaluate import predict_dataset  # noqa: E402
from densedet.evaluation.errors import KINDS, SIZES, error_breakdown, image_results  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--score", type=float, default=0.2, help="detections scoring lower are left out")
    args = parser.parse_args()
    flush_denormals()
    model, cfg, _ = model_from_checkpoint(args.weights)
    data = load_split(cfg.data, "val")
    result = error_breakdown(image_results(data, predict_dataset(model, data, 8)), data.num_classes, args.score)
    print(f"{result['objects']} objects in {len(data.records)} images; {result['true_positives']} true positives "
          f"scoring >= {args.score}; AP50 of those detections {result['ap50']:.3f}\n")
    print("| kind | errors | " + " | ".join(SIZES) + " | AP50 gained when fixed |\n|---|---|---|---|---|---|")
    for kind in KINDS:
        sizes = " | ".join(str(result["by_size"][kind][s]) for s in SIZES)
        print(f"| {kind} | {result['counts'][kind]} | {sizes} | {result['ap50_gain'][kind]:+.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

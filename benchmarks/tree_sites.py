"""COCO AP of a tree-crown checkpoint at the two sites it was not trained on (issue 21's check).

    python benchmarks/tree_sites.py --weights runs/own_trees/model_final.pt [--tta none turns]

deepforest==2.1.0 ships four annotated photos. The tree runs of docs/own-data.md train on the two
2019_YELL photos (Yellowstone) and report OSBS_029 (Florida, 61 crowns). SOAP_061 (California,
37 crowns, labelled Alive / Dead) is a second site that no run looks at: here both labels count
as one tree class. A rule that helps at one site and not at the other is a rule for that photo.

Prints one markdown row per site and test-time setting (``none``, or a ``densedet predict --tta``
preset), single model, fp32.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np

from densedet.data import load_voc
from densedet.engine.checkpoint import model_from_checkpoint
from densedet.engine.data import resolve_paths
from densedet.engine.evaluate import evaluate_model
from densedet.tta import tta_preset

SITES = {"OSBS_029": "pkg://deepforest/data/OSBS_029.xml", "SOAP_061": "pkg://deepforest/data/SOAP_061.xml"}


def one_class(spec: str):
    """The photo's annotations with every label as class 0 ("Tree")."""
    data = load_voc(resolve_paths(spec, "site")[0])
    for record in data.records:
        record.labels = np.zeros_like(record.labels)
    return dataclasses.replace(data, class_names=["Tree"], category_ids=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="a densedet checkpoint trained on tree crowns")
    parser.add_argument("--tta", nargs="+", default=["none"], help="none and/or densedet predict --tta presets")
    args = parser.parse_args(argv)
    model = model_from_checkpoint(args.weights)[0].eval()
    print("| site | crowns | TTA | AP | AP50 | AR100 |\n|---|---|---|---|---|---|")
    for site, spec in SITES.items():
        data = one_class(spec)
        crowns = sum(len(r.boxes) for r in data.records)
        for name in args.tta:
            m = evaluate_model(model, data, batch_size=1, tta=tta_preset(name, model))
            print(f"| {site} | {crowns} | {name} | {m['AP']:.3f} | {m['AP50']:.3f} | {m['AR100']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

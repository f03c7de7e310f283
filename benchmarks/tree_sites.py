"""COCO AP of a tree-crown checkpoint at each site of deepforest's photos (issue 21's check).

    python benchmarks/tree_sites.py --weights runs/own_trees/model_final.pt [--tta none turns] [--turned] [--box-vote on off]

deepforest==2.1.0 ships four annotated photos. The tree runs of docs/own-data.md train on the two
2019_YELL photos (Yellowstone) and report OSBS_029 (Florida, 61 crowns). SOAP_061 (California,
37 crowns, labelled Alive / Dead) is a second site that no run looks at: here both labels count
as one tree class. A rule that helps at one site and not at the other is a rule for that photo.
The YELL row scores the training photos themselves: the gap to the other sites is what the model
did not carry from one site to another.

Every photo is cut into the tiles the checkpoint was trained on (its ``data.tile_size`` and
``tile_overlap``, as ``densedet predict`` does by default; 400 px overlapping by 90 for a
checkpoint trained on whole images), fp32. Prints
one markdown row per site and test-time setting (``none``, or a ``densedet predict --tta`` preset);
``--turned`` adds a row per quarter turn of the photo (and of its boxes), single scale: how much
the model depends on the orientation it was trained in. ``--box-vote`` scores the checkpoint with
box voting on and/or off (``model.box_vote``; default: as the checkpoint says).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np
import torch

from densedet.data import image_size, load_voc, to_coco_dict
from densedet.data.transforms import turn_boxes
from densedet.engine.data import resolve_paths
from densedet.evaluation import detections_to_coco, evaluate_coco
from densedet.predict import Predictor, to_image_tensor
from densedet.tta import tta_preset

SITES = {"2019_YELL (training)": "pkg://deepforest/data/2019_YELL*.xml",
         "OSBS_029": "pkg://deepforest/data/OSBS_029.xml",
         "SOAP_061": "pkg://deepforest/data/SOAP_061.xml"}
TILE, OVERLAP = 400, 90     # for a checkpoint trained without tiles


def one_class(spec: str):
    """The photos' annotations with every label as class 0 ("Tree")."""
    data = load_voc(resolve_paths(spec, "site"))
    for record in data.records:
        record.labels = np.zeros_like(record.labels)
    return dataclasses.replace(data, class_names=["Tree"], category_ids=None)


def turned(data, turns: int):
    """The photos' records with their boxes turned ``turns`` quarter turns counter-clockwise, as
    :class:`~densedet.data.RandomRotate90` turns them."""
    records = []
    for record in data.records:
        height, width = image_size(record.file_name)
        boxes = torch.from_numpy(record.boxes)
        for _ in range(turns):
            boxes = turn_boxes(boxes, width)
            width, height = height, width
        records.append(dataclasses.replace(record, boxes=boxes.numpy(), height=height, width=width))
    return dataclasses.replace(data, records=records)


def score(predictor: Predictor, data, turns: int = 0) -> tuple[float, float, float]:
    """AP, AP50 and AR of the tiled predictions, counting up to 1.5x the most crowns in a photo (at least 100)."""
    detections = [predictor(to_image_tensor(record.file_name).rot90(turns, (-2, -1)))[0] for record in data.records]
    data = turned(data, turns)
    results = detections_to_coco(detections, [r.image_id for r in data.records])
    most = max(100, int(1.5 * max(len(r.boxes) for r in data.records)))
    m = evaluate_coco(results, to_coco_dict(data), max_dets=(1, 10, most))
    return m["AP"], m["AP50"], m[f"AR{most}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="a densedet checkpoint trained on tree crowns")
    parser.add_argument("--tta", nargs="+", default=["none"], help="none and/or densedet predict --tta presets")
    parser.add_argument("--turned", action="store_true", help="also score each photo turned by 90, 180, 270 degrees")
    parser.add_argument("--box-vote", nargs="+", choices=("on", "off"), default=None,
                        help="score with box voting on and/or off (default: the checkpoint's model.box_vote)")
    args = parser.parse_args(argv)
    predictor = Predictor(args.weights, precision="fp32")          # tiles as trained
    if not predictor.tile_size:
        predictor.tile_size, predictor.tile_overlap = TILE, OVERLAP
    print(f"tiles of {predictor.tile_size} px, overlapping by {predictor.tile_overlap}", file=sys.stderr)
    votes = [v == "on" for v in args.box_vote] if args.box_vote else [bool(predictor.model.box_vote)]
    print("| site | crowns | TTA | box voting | AP | AP50 | AR (100, or 1.5x the crowns) |\n|---|---|---|---|---|---|---|")
    for site, spec in SITES.items():
        data = one_class(spec)
        crowns = sum(len(r.boxes) for r in data.records)
        rows = [(site, name, 0) for name in args.tta]
        rows += [(f"{site}, turned {90 * turns} degrees", "none", turns) for turns in ((1, 2, 3) if args.turned else ())]
        for label, name, turns in rows:
            predictor.tta = tta_preset(name, predictor.model)
            for vote in votes:
                predictor.model.box_vote = vote
                ap, ap50, ar = score(predictor, data, turns)
                print(f"| {label} | {crowns} | {name} | {'on' if vote else 'off'} | {ap:.3f} | {ap50:.3f} | {ar:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Two sets of images of three sizes, for the size rule of ``densedet train --data`` (``recipe.size_view``).

    python benchmarks/mixed_sizes.py --out data_cache/mixed
    densedet train --data data_cache/mixed/survey/train.json --val data_cache/mixed/survey/val.json --minutes 5
    densedet train --data data_cache/mixed/zoom/train.json --val data_cache/mixed/zoom/val.json --minutes 5

The digit scenes, the tree crowns and the large photos each hold images of one size, so the rule
that decides how images of several sizes are resized never acts on them. Here MNIST digits (as the
demo's) are drawn on the demo's backgrounds in square images of 160, 320 and 640 px, a third each:

- ``survey``: digits of 12-40 px in every image, as in crops of one aerial survey, fields of one
  microscope or pages scanned at one DPI: an object's size in pixels does not depend on its image's;
  the larger images hold more digits.
- ``zoom``: scenes of 320 px with digits of 12-60 px, each saved at half, full or double size, as
  photos of one kind of scene taken by cameras of several resolutions: the objects' sizes follow
  their images'.

240 training and 60 validation images each, drawn by ``densedet.data.digits.render_scene`` from
fixed seeds, so the same command writes the same files; ``val_160.json``, ``val_320.json`` and
``val_640.json`` hold the validation images of one size each (``densedet eval --weights RUN/model_final.pt
data.val=data_cache/mixed/survey/val_160.json``).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image

from densedet.data import DetectionData, ImageRecord, save_coco
from densedet.data.digits import CLASS_NAMES, load_mnist_5k, render_scene

SIDES = (160, 320, 640)
SPLITS = {"train": 240, "val": 60}


def scene(kind: str, index: int, split_code: int, digits: np.ndarray, labels: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image ``index`` of a split: (pixels [S, S, 3], boxes [N, 4], labels [N])."""
    rng = np.random.default_rng([7, split_code, index])
    side = SIDES[index % len(SIDES)]
    if kind == "survey":
        per_area = (side / 320) ** 2
        return render_scene(rng, digits, labels, size=side, min_digits=max(1, round(2 * per_area)),
                            max_digits=max(2, round(8 * per_area)), min_px=12, max_px=40)
    pixels, boxes, box_labels = render_scene(rng, digits, labels, size=320, min_digits=2, max_digits=8,
                                             min_px=12, max_px=60)
    if side != 320:
        pixels = np.asarray(Image.fromarray(pixels).resize((side, side), Image.BILINEAR))
        boxes = boxes * (side / 320)
    return pixels, boxes, box_labels


def write_set(out: str, kind: str, digits: np.ndarray, labels: np.ndarray) -> None:
    for code, (split, count) in enumerate(SPLITS.items()):
        folder = os.path.join(out, split)
        os.makedirs(folder, exist_ok=True)
        records = []
        for index in range(count):
            pixels, boxes, box_labels = scene(kind, index, code, digits, labels)
            path = os.path.join(folder, f"{index:06d}.png")
            Image.fromarray(pixels).save(path, compress_level=1)
            records.append(ImageRecord(path, index + 1, pixels.shape[0], pixels.shape[1], boxes, box_labels))
        save_coco(DetectionData(records, list(CLASS_NAMES), None, kind), os.path.join(out, f"{split}.json"), folder)
        for side in SIDES if split == "val" else ():        # to score a model on each size alone
            alone = [r for r in records if r.width == side]
            save_coco(DetectionData(alone, list(CLASS_NAMES), None, kind), os.path.join(out, f"val_{side}.json"),
                      folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data_cache/mixed", help="folder for the two sets")
    args = parser.parse_args()
    digits, labels = load_mnist_5k()
    for kind in ("survey", "zoom"):
        write_set(os.path.join(args.out, kind), kind, digits, labels)
        print(f"{kind}: {os.path.join(args.out, kind)}")


if __name__ == "__main__":
    main()

"""Large photos of one size and smaller, non-square validation images: the case where ``densedet train
--data`` tiles the photos into square tiles while the evaluation images are 640 x 480.

    python benchmarks/tiled_photos.py --out data_cache/tiled
    densedet train --data data_cache/tiled/train.json --val data_cache/tiled/val.json --minutes 5 --output-dir RUN
    densedet eval --weights RUN/model_final.pt data.val=data_cache/tiled/photos.json    # the held-out photos, tiled

MNIST digits of 12-40 px (as the demo's) on the demo's backgrounds. A photo is 1280 x 1920 px, a grid
of 2 x 3 scenes of 640 px; a validation image is the top 480 rows of a 640 px scene (boxes the crop cuts
are crowd regions, ignored by the scoring). ``photos.json`` holds 4 more photos that no run trains on,
scored tile by tile as ``densedet predict`` cuts them. Fixed seeds: the same command writes the same files.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image

from densedet.data import DetectionData, ImageRecord, save_coco
from densedet.data.digits import CLASS_NAMES, load_mnist_5k, render_scene

SCENE = 640
GRID = (2, 3)               # scenes per photo: rows, columns
CROP_ROWS = 480             # a validation image: the top rows of one scene
COUNTS = {"train": 12, "val": 60, "photos": 4}


def _scene(rng: np.random.Generator, digits: np.ndarray, labels: np.ndarray):
    return render_scene(rng, digits, labels, size=SCENE, min_digits=8, max_digits=32, min_px=12, max_px=40)


def photo(seed: list[int], digits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows, cols = GRID
    pixels = np.zeros((rows * SCENE, cols * SCENE, 3), np.uint8)
    boxes, box_labels = [], []
    for r in range(rows):
        for c in range(cols):
            scene, b, lab = _scene(rng, digits, labels)
            pixels[r * SCENE:(r + 1) * SCENE, c * SCENE:(c + 1) * SCENE] = scene
            boxes.append(b + np.array([c * SCENE, r * SCENE] * 2, np.float32))
            box_labels.append(lab)
    return pixels, np.concatenate(boxes), np.concatenate(box_labels)


def crop(seed: list[int], digits: np.ndarray, labels: np.ndarray):
    """The top CROP_ROWS of a scene; a box the crop cuts is kept, clipped, as a crowd region."""
    scene, boxes, box_labels = _scene(np.random.default_rng(seed), digits, labels)
    inside = boxes[:, 1] < CROP_ROWS
    boxes, box_labels = boxes[inside].copy(), box_labels[inside]
    cut = boxes[:, 3] > CROP_ROWS
    boxes[:, 3] = np.minimum(boxes[:, 3], CROP_ROWS)
    return scene[:CROP_ROWS], boxes, box_labels, cut


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data_cache/tiled", help="folder for the set")
    args = parser.parse_args()
    digits, labels = load_mnist_5k()
    for code, (split, count) in enumerate(COUNTS.items()):
        folder = os.path.join(args.out, split)
        os.makedirs(folder, exist_ok=True)
        records = []
        for index in range(count):
            if split == "val":
                pixels, boxes, box_labels, crowd = crop([11, code, index], digits, labels)
            else:
                pixels, boxes, box_labels = photo([11, code, index], digits, labels)
                crowd = np.zeros(len(boxes), bool)
            path = os.path.join(folder, f"{index:06d}.png")
            Image.fromarray(pixels).save(path, compress_level=1)
            records.append(ImageRecord(path, index + 1, pixels.shape[0], pixels.shape[1], boxes, box_labels,
                                       iscrowd=crowd))
        save_coco(DetectionData(records, list(CLASS_NAMES), None, "tiled"), os.path.join(args.out, f"{split}.json"),
                  folder)
        print(f"{split}: {count} images of {records[0].width}x{records[0].height} px, "
              f"{sum(len(r.boxes) for r in records)} boxes: {os.path.join(args.out, split + '.json')}")


if __name__ == "__main__":
    main()

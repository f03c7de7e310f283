"""The digit-scene demo dataset: determinism, split disjointness, counts, tight boxes."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from densedet.data import load_coco, make_digit_scenes
from densedet.data.digits import (INK_THRESHOLD, load_mnist_5k, render_scene, split_indices)

ARGS = dict(num_train=12, num_val=6, seed=3, num_tune=4)


@pytest.fixture(scope="module")
def mnist():
    return load_mnist_5k()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_digit_scenes(str(tmp_path_factory.mktemp("digits")), **ARGS)


def all_files(root):
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def test_mnist_file_format(mnist):
    images, labels = mnist
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and (images > 0).any(axis=(1, 2)).all()


def test_train_and_val_digits_are_disjoint(mnist):
    _, labels = mnist
    train, val = split_indices(labels)
    assert len(train) == 4000 and len(val) == 1000
    assert not set(train.tolist()) & set(val.tolist())
    assert np.bincount(labels[train]).tolist() == [400] * 10
    assert np.bincount(labels[val]).tolist() == [100] * 10


def test_written_scene_is_render_scene_of_its_seed(scenes, mnist):
    """Scene i of a split is render_scene(rng(seed, split, i)) over that split's digit pool:
    redrawing it from the pool reproduces the PNG pixels and the json boxes exactly."""
    images, labels = mnist
    train, val = split_indices(labels)
    for split_code, split, rows in ((0, "train", train), (1, "val", val), (2, "tune", val)):
        rng = np.random.default_rng([ARGS["seed"], split_code, 0])
        pixels, boxes, box_labels, masks = render_scene(rng, images[rows], labels[rows],
                                                        return_masks=True)
        png = np.asarray(Image.open(os.path.join(scenes[f"{split}_images"], "000000.png")))
        np.testing.assert_array_equal(png, pixels)
        data = load_coco(scenes[f"{split}_json"], scenes[f"{split}_images"])
        np.testing.assert_array_equal(data.records[0].boxes, boxes)
        np.testing.assert_array_equal(data.records[0].labels, box_labels)
        used = rows[[m["index"] for m in masks]]
        assert set(used.tolist()) <= set(rows.tolist())
        np.testing.assert_array_equal(labels[used], box_labels)


def _ink_crop(digit: np.ndarray) -> np.ndarray:
    """A 28x28 MNIST digit cut to its nonzero pixels, as alpha in [0, 1]."""
    ys, xs = np.nonzero(digit)
    return digit[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32) / 255.0


def _paste_residual(pixels: np.ndarray, box: tuple[int, int, int, int], crop: np.ndarray,
                    max_fringe: int = 8) -> float:
    """How well ``crop``, pasted as the digits module docstring says, explains the scene under ``box``.

    A digit is its ink crop resized (PIL bilinear) to some Wa x Ha, pasted as alpha ``a`` in one
    colour ``c``: pixel = background * (1 - a) + c * a, and its json box is where a >= INK_THRESHOLD.
    For every size whose ink box is exactly ``box`` (x, y, w, h), the patch is fitted per channel
    with a background linear in x and y; the smallest RMS residual (pixel values in [0, 1]) is
    returned, inf if no size gives the box. The true digit leaves only the background's curvature.
    """
    x, y, w, h = box
    best = np.inf
    for ha in range(h, h + max_fringe):
        for wa in range(w, w + max_fringe):
            alpha = np.asarray(Image.fromarray(crop).resize((wa, ha), Image.Resampling.BILINEAR)).clip(0, 1)
            ink = alpha >= INK_THRESHOLD
            rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
            if len(rows) == 0 or (rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0]) != (h, w):
                continue
            x0, y0 = x - cols[0], y - rows[0]
            if x0 < 0 or y0 < 0 or y0 + ha > pixels.shape[0] or x0 + wa > pixels.shape[1]:
                continue
            step = max(1, int(math.sqrt(ha * wa / 2000)))  # a few thousand pixels are plenty
            patch = pixels[y0:y0 + ha:step, x0:x0 + wa:step].reshape(-1, 3).astype(np.float64) / 255.0
            a = alpha[::step, ::step].ravel().astype(np.float64)
            yy, xx = (g.ravel() / 100.0 for g in np.mgrid[0:ha:step, 0:wa:step])
            # background b0 + bx x + by y, times (1 - a), plus c a: linear in 6 unknowns per channel
            design = np.stack([np.ones_like(a), xx, yy, a, a * xx, a * yy], axis=1)
            coef, *_ = np.linalg.lstsq(design, patch, rcond=None)
            best = min(best, float(np.sqrt(np.mean((design @ coef - patch) ** 2))))
    return best


def test_written_scenes_come_from_their_split_pool(scenes, mnist):
    """Checked from the outside, without the generator: every clearly visible digit of a written
    scene (long side >= 32 px, no other box within 4 px) is a digit of its split's MNIST pool, with
    the json label — it is explained by pasting an own-pool digit far better than by pasting any
    digit of the other split's pool. Candidates: the digits whose shape (ink crop at 16x16) best
    correlates with the scene's ink under the box, the best few of each pool; up to 8 digits a split."""
    images, labels = mnist
    train, val = split_indices(labels)
    crops = [_ink_crop(d) for d in images]
    side = 16
    shapes = np.stack([np.asarray(Image.fromarray(c).resize((side, side), Image.Resampling.BILINEAR))
                       for c in crops]).reshape(len(crops), -1)
    shapes -= shapes.mean(1, keepdims=True)
    shapes /= np.linalg.norm(shapes, axis=1, keepdims=True)
    for split, own, other in (("train", train, val), ("val", val, train), ("tune", val, train)):
        doc = json.load(open(scenes[f"{split}_json"]))
        checked = 0
        for image in doc["images"]:
            pixels = np.asarray(Image.open(os.path.join(scenes[f"{split}_images"], image["file_name"])))
            size = pixels.shape[0]
            anns = [a for a in doc["annotations"] if a["image_id"] == image["id"]]
            for ann in anns:
                if checked == 8:
                    break
                x, y, w, h = map(int, ann["bbox"])
                m = 4
                apart = all(o is ann or o["bbox"][0] >= x + w + m or o["bbox"][0] + o["bbox"][2] <= x - m
                            or o["bbox"][1] >= y + h + m or o["bbox"][1] + o["bbox"][3] <= y - m for o in anns)
                if max(w, h) < 32 or not apart or min(x, y) < 3 or max(x + w, y + h) > size - 3:
                    continue
                # the ink: distance from the background colour around the box
                ring = np.concatenate([pixels[y - 3:y, x - 3:x + w + 3].reshape(-1, 3),
                                       pixels[y + h:y + h + 3, x - 3:x + w + 3].reshape(-1, 3),
                                       pixels[y:y + h, x - 3:x].reshape(-1, 3),
                                       pixels[y:y + h, x + w:x + w + 3].reshape(-1, 3)]).astype(np.float32)
                ink = np.linalg.norm(pixels[y:y + h, x:x + w].astype(np.float32) - np.median(ring, axis=0), axis=2)
                query = np.asarray(Image.fromarray(ink).resize((side, side), Image.Resampling.BILINEAR)).ravel()
                query = (query - query.mean()) / np.linalg.norm(query - query.mean())
                fit = {}
                for pool in (own, other):
                    for i in pool[np.argsort(-(shapes[pool] @ query))[:6]]:
                        fit[int(i)] = _paste_residual(pixels, (x, y, w, h), crops[i])
                own_set = set(own.tolist())
                best_own = min((i for i in fit if i in own_set), key=fit.get)
                best_other = min(fit[i] for i in fit if i not in own_set)
                where = f"{split} {image['file_name']} box {ann['bbox']}"
                assert fit[best_own] < 0.12, f"{where}: no digit of the {split} pool explains it"
                assert best_other > 1.3 * fit[best_own], \
                    f"{where}: a digit of the other pool fits as well ({best_other:.4f} vs {fit[best_own]:.4f})"
                assert labels[best_own] == ann["category_id"] - 1, f"{where}: label"
                checked += 1
        assert checked >= 3, f"{split}: only {checked} digits could be checked"


def test_same_arguments_same_bytes_and_seed_matters(scenes, tmp_path):
    again = make_digit_scenes(str(tmp_path / "again"), **ARGS)
    assert all_files(scenes["root"]) == all_files(again["root"])
    other = make_digit_scenes(str(tmp_path / "other"), **{**ARGS, "seed": 4})
    first = "train/000000.png"
    assert all_files(other["root"])[first] != all_files(scenes["root"])[first]


def test_counts_layout_and_coco_format(scenes):
    for split, count in (("train", ARGS["num_train"]), ("val", ARGS["num_val"]),
                         ("tune", ARGS["num_tune"])):
        pngs = sorted(os.listdir(scenes[f"{split}_images"]))
        assert pngs == [f"{i:06d}.png" for i in range(count)]
        doc = json.load(open(scenes[f"{split}_json"]))
        assert doc["categories"] == [{"id": d + 1, "name": str(d)} for d in range(10)]
        data = load_coco(scenes[f"{split}_json"], scenes[f"{split}_images"])
        assert data.class_names == [str(d) for d in range(10)] and len(data) == count
        assert data.report.dropped == 0 and data.report.clipped == 0
        for record in data.records:
            assert 2 <= len(record) <= 10
            assert (record.height, record.width) == (320, 320)
        with Image.open(os.path.join(scenes[f"{split}_images"], pngs[0])) as image:
            assert image.mode == "RGB" and image.size == (320, 320)
    meta = json.load(open(scenes["meta"]))
    assert meta["num_train"] == 12 and meta["seed"] == 3 and meta["max_px"] == 150
    assert meta["num_tune"] == 4


def test_tune_scenes_are_not_val_scenes_and_leave_older_caches_valid(scenes, tmp_path):
    """The tune split draws from val's digit pool (checked above) but other scenes; without it the
    meta is the one written before the split existed, so such caches are not redrawn."""
    for i in range(ARGS["num_tune"]):
        name = f"{i:06d}.png"
        tune = np.asarray(Image.open(os.path.join(scenes["tune_images"], name)))
        val = np.asarray(Image.open(os.path.join(scenes["val_images"], name)))
        assert not np.array_equal(tune, val)
    plain = make_digit_scenes(str(tmp_path / "plain"), num_train=2, num_val=1)
    assert "num_tune" not in json.load(open(plain["meta"]))
    assert not os.path.exists(plain["tune_json"])


def test_matching_meta_does_nothing_and_new_arguments_redraw(tmp_path):
    root = str(tmp_path / "d")
    paths = make_digit_scenes(root, num_train=4, num_val=2)
    png = os.path.join(paths["train_images"], "000000.png")
    stamp = os.stat(png).st_mtime_ns
    os.utime(png, ns=(stamp - 10**9, stamp - 10**9))  # mark the file; a rewrite would reset it
    make_digit_scenes(root, num_train=4, num_val=2)
    assert os.stat(png).st_mtime_ns == stamp - 10**9
    make_digit_scenes(root, num_train=3, num_val=2)
    assert sorted(os.listdir(paths["train_images"])) == ["000000.png", "000001.png",
                                                         "000002.png"]
    assert os.stat(png).st_mtime_ns != stamp - 10**9


def test_boxes_are_tight_around_the_ink_and_sizes_in_range(mnist):
    images, labels = mnist
    sizes = []
    for i in range(40):
        pixels, boxes, _, masks = render_scene(np.random.default_rng(i), images, labels,
                                               return_masks=True)
        assert len(boxes) == len(masks) >= 2
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 320).all()
        for box, mask in zip(boxes, masks):
            rows, cols = np.nonzero(mask["alpha"] >= INK_THRESHOLD)
            # Ink pixel (r, c) covers [c, c+1) x [r, r+1): the box is exactly their union.
            ink = [mask["x0"] + cols.min(), mask["y0"] + rows.min(),
                   mask["x0"] + cols.max() + 1, mask["y0"] + rows.max() + 1]
            assert box.tolist() == ink
            sizes.append(max(box[2] - box[0], box[3] - box[1]))
    sizes = np.array(sizes)
    assert sizes.min() >= 12 and sizes.max() <= 150
    # Log-uniform on [12, 150]: P(< 24) = log 2 / log 12.5 = 0.27, P(> 100) = 0.16.
    assert 0.17 < (sizes < 24).mean() < 0.40
    assert 0.07 < (sizes > 100).mean() < 0.28
    assert math.isclose(np.median(np.log(sizes)), (math.log(12) + math.log(150)) / 2, abs_tol=0.3)


def test_boxes_overlap_at_most_iou_0_3(mnist):
    images, labels = mnist
    for i in range(20):
        _, boxes, _ = render_scene(np.random.default_rng(100 + i), images, labels)
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                x1, y1 = np.maximum(boxes[a, :2], boxes[b, :2])
                x2, y2 = np.minimum(boxes[a, 2:], boxes[b, 2:])
                inter = max(x2 - x1, 0) * max(y2 - y1, 0)
                area = lambda k: (boxes[k, 2] - boxes[k, 0]) * (boxes[k, 3] - boxes[k, 1])
                assert inter / (area(a) + area(b) - inter) <= 0.3


def test_digit_colour_contrasts_with_the_background(mnist):
    """Where a digit's alpha is 1 the pixel is the digit colour; its luminance differs from the
    mean background luminance in the box by at least the generator's 0.4 margin (minus the
    damage later, overlapping digits may do, so we test the median over digits)."""
    images, labels = mnist
    weights = np.array([0.299, 0.587, 0.114])
    gaps = []
    for i in range(10):
        pixels, boxes, _, masks = render_scene(np.random.default_rng(200 + i), images, labels,
                                               return_masks=True)
        for mask in masks[-1:]:  # the last digit drawn is never overdrawn
            alpha = mask["alpha"]
            r, c = np.unravel_index(np.argmax(alpha), alpha.shape)
            ink = pixels[mask["y0"] + r, mask["x0"] + c] / 255.0
            h, w = alpha.shape
            patch = pixels[mask["y0"]:mask["y0"] + h, mask["x0"]:mask["x0"] + w] / 255.0
            background = patch[alpha < 0.01].mean(axis=0)
            gaps.append(abs(ink @ weights - background @ weights))
    assert np.median(gaps) > 0.3

"""SSD augmentation: boxes stay on their pixels, samplers honour their IoU constraints, seeding."""

from __future__ import annotations

import colorsys

import pytest
import torch

from densedet.boxes import box_iou
from densedet.data.ssd_augment import (
    CAFFE_SAMPLERS,
    CropSampler,
    Expand,
    PhotometricDistort,
    RandomIoUCrop,
    RandomMirror,
    SSDAugmentation,
    WarpResize,
    hsv_to_rgb,
    rgb_to_hsv,
    sample_crop,
)


def rectangles_image(height: int, width: int, rects: list[tuple[int, int, int, int]], values: list[float]):
    image = torch.zeros(3, height, width)
    for (x0, y0, x1, y1), v in zip(rects, values):
        image[:, y0:y1, x0:x1] = v
    target = {"boxes": torch.tensor(rects, dtype=torch.float32), "labels": torch.arange(len(rects))}
    return image, target


def bright_extent(mask: torch.Tensor) -> list[float]:
    """(x1, y1, x2, y2) of the True pixels, in continuous coordinates (pixel i spans [i, i+1))."""
    ys, xs = mask.nonzero(as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_hsv_round_trip_and_colorsys_reference():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 6, 7, generator=g)
    image[:, 0, 0] = 0.5  # grey: hue and saturation 0
    hsv = rgb_to_hsv(image)
    for y, x in [(0, 0), (1, 2), (5, 6), (3, 3)]:
        expected = colorsys.rgb_to_hsv(*image[:, y, x].tolist())
        assert hsv[:, y, x].tolist() == pytest.approx(expected, abs=1e-6)
    torch.testing.assert_close(hsv_to_rgb(hsv), image)


def test_photometric_steps():
    g = torch.Generator().manual_seed(1)
    distort = PhotometricDistort(generator=g)
    grey = torch.full((3, 4, 4), 0.4)
    torch.testing.assert_close(distort.saturation(grey), grey)  # a grey image has no saturation
    torch.testing.assert_close(distort.hue(grey), grey)
    image = torch.rand(3, 8, 8, generator=g)
    for _ in range(20):
        out, _ = distort(image, {"boxes": torch.zeros(0, 4)})
        assert out.shape == image.shape and out.min() >= 0 and out.max() <= 1
    # hue rotation keeps value and saturation
    shifted = rgb_to_hsv(distort.hue(image))
    torch.testing.assert_close(shifted[1:], rgb_to_hsv(image)[1:], atol=1e-5, rtol=1e-5)
    swap = PhotometricDistort(prob=0.0, channel_swap_prob=1.0, generator=g)
    out, _ = swap(image, {})
    assert sorted(out.flatten(1).sum(1).tolist()) == pytest.approx(sorted(image.flatten(1).sum(1).tolist()))


def test_expand_fills_with_mean_and_moves_boxes():
    image, target = rectangles_image(20, 30, [(5, 4, 15, 10)], [1.0])
    expand = Expand(mean=(0.25, 0.5, 0.75), max_ratio=3.0, prob=1.0, generator=torch.Generator().manual_seed(3))
    out, t = expand(image, target)
    assert out.shape[1] >= 20 and out.shape[2] >= 30
    x0, y0, x1, y1 = t["boxes"][0].int().tolist()
    assert bool((out[:, y0:y1, x0:x1] == 1).all())
    assert (out == 1).all(0).sum() == 60  # the rectangle is all that is white
    left, top = x0 - 5, y0 - 4
    outside = torch.ones(out.shape[1:], dtype=torch.bool)
    outside[top:top + 20, left:left + 30] = False
    assert bool((out[0][outside] == 0.25).all() and (out[2][outside] == 0.75).all())


@pytest.mark.parametrize("sampler_index", range(1, 6))
def test_crop_samplers_honour_min_iou(sampler_index):
    sampler = CAFFE_SAMPLERS[sampler_index]
    g = torch.Generator().manual_seed(sampler_index)
    # boxes of several sizes, one large enough for the IoU >= 0.9 sampler to succeed now and then
    boxes = torch.tensor([[10.0, 20, 90, 60], [100, 100, 180, 190], [30, 140, 60, 170], [10, 10, 230, 190]])
    found = 0
    for _ in range(60):
        crop = sample_crop(sampler, 200, 240, boxes, g)
        if crop is None:
            continue
        found += 1
        x0, y0, x1, y1 = crop
        assert 0 <= x0 < x1 <= 240 and 0 <= y0 < y1 <= 200
        # side between 0.3 and 1 of the image side (aspect clamped so the crop fits), +-1 px rounding
        assert 0.3 * 0.3 * 240 * 200 - 300 <= (x1 - x0) * (y1 - y0)
        iou = box_iou(torch.tensor([crop], dtype=torch.float32), boxes)[0]
        assert float(iou.max()) >= sampler.min_iou
    assert found > 0


def test_crop_max_iou_and_unconstrained_samplers():
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[0.0, 0, 50, 50]])
    capped = CropSampler(0.3, 1.0, 0.5, 2.0, max_iou=0.2, max_trials=200)
    found, touching = 0, 0
    for _ in range(20):
        crop = sample_crop(capped, 100, 100, boxes, g)
        if crop is None:
            continue
        found += 1
        x0, y0, x1, y1 = crop
        assert 0 <= x0 < x1 <= 100 and 0 <= y0 < y1 <= 100
        iou = float(box_iou(torch.tensor([crop], dtype=torch.float32), boxes).max())
        assert iou <= 0.2
        touching += iou > 0
    # About half of the random crops have IoU <= 0.2 with the box (most of them still overlap it),
    # so 200 trials fail with probability ~2^-200: every call must yield a crop, and a cap read as
    # "no overlap at all" would leave no crop touching the box.
    assert found == 20
    assert touching >= 5
    assert sample_crop(CAFFE_SAMPLERS[0], 100, 120, boxes, g) == (0, 0, 120, 100)  # the whole image
    # a constrained sampler needs a box; the last Caffe sampler (max IoU 1) accepts any crop otherwise
    assert sample_crop(CAFFE_SAMPLERS[3], 100, 100, torch.zeros(0, 4), g) is None
    any_crops = [sample_crop(CAFFE_SAMPLERS[6], 100, 100, boxes, g) for _ in range(10)]
    assert all(crop is not None for crop in any_crops)
    assert all(0 <= x0 < x1 <= 100 and 0 <= y0 < y1 <= 100 for x0, y0, x1, y1 in any_crops)
    assert len(set(any_crops)) > 1  # random crops, not the whole image every time


def test_crop_keeps_boxes_whose_centre_is_inside():
    # the image encodes pixel coordinates, so the crop window can be read back from the output
    h, w = 120, 160
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    image = torch.stack((xs / 1000, ys / 1000, torch.zeros(h, w)))
    boxes = torch.tensor([[10.0, 10, 50, 40], [60, 30, 150, 110], [0, 80, 30, 120], [100, 0, 160, 20]])
    target = {"boxes": boxes, "labels": torch.tensor([1, 2, 3, 4]), "difficult": torch.tensor([0, 1, 0, 1])}
    crop = RandomIoUCrop([CropSampler(0.5, 0.7, 0.5, 2.0)], generator=torch.Generator().manual_seed(0))
    seen_dropped = False
    for _ in range(30):
        out, t = crop(image, target)
        x0, y0 = round(out[0, 0, 0].item() * 1000), round(out[1, 0, 0].item() * 1000)
        x1, y1 = x0 + out.shape[2], y0 + out.shape[1]
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = (centre[:, 0] >= x0) & (centre[:, 0] <= x1) & (centre[:, 1] >= y0) & (centre[:, 1] <= y1)
        seen_dropped |= not bool(inside.all())
        assert t["labels"].tolist() == target["labels"][inside].tolist()
        assert t["difficult"].tolist() == target["difficult"][inside].tolist()
        expected = boxes[inside].clone()
        expected[:, 0::2] = expected[:, 0::2].clamp(x0, x1) - x0
        expected[:, 1::2] = expected[:, 1::2].clamp(y0, y1) - y0
        torch.testing.assert_close(t["boxes"], expected)
    assert seen_dropped


def test_mirror_and_warp_by_hand():
    image, target = rectangles_image(40, 80, [(10, 5, 30, 25)], [1.0])
    out, t = RandomMirror(prob=1.0)(image, target)
    assert t["boxes"].tolist() == [[50.0, 5.0, 70.0, 25.0]]
    assert bright_extent(out[0] > 0.5) == [50, 5, 70, 25]
    out, t = WarpResize(20, ("bilinear",))(image, target)
    assert out.shape == (3, 20, 20)
    torch.testing.assert_close(t["boxes"], torch.tensor([[2.5, 2.5, 7.5, 12.5]]))


@pytest.mark.parametrize("mode", ["bilinear", "area", "nearest-exact", "bicubic"])
def test_full_pipeline_keeps_box_on_its_pixels(mode):
    """White-rectangle test: after zoom-out, crop, warp and flip the kept box still frames the
    white pixels (edges located at the half-intensity crossing, within the resampling error)."""
    g = torch.Generator().manual_seed(7)
    image, target = rectangles_image(160, 200, [(40, 30, 130, 110)], [1.0])
    augment = SSDAugmentation(size=96, mean=(0.0, 0.0, 0.0), photometric=False, interpolations=(mode,), generator=g)
    checked = 0
    for _ in range(25):
        out, t = augment(image, target)
        assert out.shape == (3, 96, 96)
        if len(t["boxes"]) == 0:
            continue
        x1, y1, x2, y2 = t["boxes"][0].tolist()
        if min(x2 - x1, y2 - y1) < 3:
            continue  # too thin after the warp to locate both edges
        assert bright_extent(out[0] > 0.5) == pytest.approx([x1, y1, x2, y2], abs=1.0), (mode, t["boxes"])
        checked += 1
    assert checked >= 10


def test_full_pipeline_labels_follow_their_rectangles():
    """Three rectangles of different greys (nearest-neighbour warp keeps the greys exact): every kept
    box frames the pixels of its own label's grey, through every random step."""
    g = torch.Generator().manual_seed(3)
    rects = [(20, 30, 70, 90), (110, 20, 180, 60), (90, 100, 150, 140)]
    values = [1.0, 0.6, 0.3]
    image, target = rectangles_image(160, 200, rects, values)
    augment = SSDAugmentation(size=96, mean=(0.0, 0.0, 0.0), photometric=False,
                              interpolations=("nearest-exact",), generator=g)
    checked = 0
    for _ in range(25):
        out, t = augment(image, target)
        for box, label in zip(t["boxes"], t["labels"]):
            x1, y1, x2, y2 = box.tolist()
            if min(x2 - x1, y2 - y1) < 3:
                continue
            ext = bright_extent((out[0] - values[int(label)]).abs() < 1e-6)
            assert ext == pytest.approx([x1, y1, x2, y2], abs=1.0), (ext, box.tolist())
            checked += 1
    assert checked >= 20


def test_same_seed_same_output_and_photometric_keeps_geometry():
    image = torch.rand(3, 60, 80, generator=torch.Generator().manual_seed(0))
    target = {"boxes": torch.tensor([[5.0, 5, 40, 30], [30, 20, 70, 55]]), "labels": torch.tensor([0, 1])}
    runs = []
    for seed in (11, 11, 12):
        augment = SSDAugmentation(64, generator=torch.Generator().manual_seed(seed))
        runs.append([augment(image, target) for _ in range(5)])
    for (a, ta), (b, tb) in zip(runs[0], runs[1]):
        assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])
    assert any(not torch.equal(a, c) for (a, _), (c, _) in zip(runs[0], runs[2]))
    # photometric distortion draws from the generator but does not move anything
    distort = PhotometricDistort(generator=torch.Generator().manual_seed(0))
    _, t = distort(image, target)
    assert t is target


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="image"):
        SSDAugmentation(64)(torch.rand(1, 10, 10), {"boxes": torch.zeros(0, 4)})
    with pytest.raises(ValueError, match="boxes"):
        SSDAugmentation(64)(torch.rand(3, 10, 10), {"boxes": torch.zeros(4)})

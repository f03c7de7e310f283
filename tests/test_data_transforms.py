"""Transforms keep boxes on their pixels; tiling covers the image and splits boxes correctly."""

import pytest
import torch

from densedet.data import (Compose, RandomHorizontalFlip, ResizeFixed, ResizeShortestEdge,
                           tile_image)
from densedet.data.transforms import crop_target, tile_grid, tile_starts


def rectangle_scene(height=90, width=120, box=(20, 10, 50, 40)):
    """A black image with one white rectangle, and its target."""
    image = torch.zeros(3, height, width)
    x1, y1, x2, y2 = box
    image[:, y1:y2, x1:x2] = 1.0
    target = {"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([3]),
              "iscrowd": torch.tensor([False]), "difficult": torch.tensor([False]),
              "image_id": 7, "orig_size": (height, width)}
    return image, target


def bright_box(image):
    """Continuous box of the pixels brighter than 0.5 (pixel (r, c) covers [c, c+1))."""
    rows, cols = torch.nonzero(image.mean(0) > 0.5, as_tuple=True)
    return [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]


def assert_box_on_pixels(image, target, tol=1.0):
    expected = torch.tensor(bright_box(image), dtype=torch.float32)
    assert torch.allclose(target["boxes"][0], expected, atol=tol), (target["boxes"], expected)


def test_flip_maps_x_to_width_minus_x():
    image, target = rectangle_scene()
    flipped, out = RandomHorizontalFlip(p=1.0)(image, target)
    assert out["boxes"].tolist() == [[70, 10, 100, 40]]  # 120 - 50, 120 - 20
    assert bright_box(flipped) == [70, 10, 100, 40]
    assert torch.equal(flipped.flip(-1), image)
    assert target["boxes"].tolist() == [[20, 10, 50, 40]]  # input target untouched
    same, kept = RandomHorizontalFlip(p=0.0)(image, target)
    assert same is image and kept is target


def test_flip_probability_uses_torch_generator():
    torch.manual_seed(0)
    flip = RandomHorizontalFlip(p=0.5)
    image, target = rectangle_scene()
    flips = [flip(image, target)[1]["boxes"][0, 0].item() == 70 for _ in range(400)]
    assert 0.4 < sum(flips) / 400 < 0.6
    torch.manual_seed(0)
    assert flips == [flip(image, target)[1]["boxes"][0, 0].item() == 70 for _ in range(400)]


@pytest.mark.parametrize("transform, size", [
    (ResizeShortestEdge((60,), 1000), (60, 80)),  # shrink 2/3
    (ResizeShortestEdge((270,), 1000), (270, 360)),  # enlarge 3x
    (ResizeShortestEdge((800,), 150), (113, 150)),  # the longer side limits: scale 1.25
    (ResizeFixed(64), (64, 64)),  # warp, aspect not kept
    (ResizeFixed((50, 200)), (50, 200)),
])
def test_resize_moves_boxes_with_pixels(transform, size):
    image, target = rectangle_scene()
    resized, out = transform(image, target)
    assert tuple(resized.shape) == (3, *size)
    scale_x, scale_y = size[1] / 120, size[0] / 90
    expected = torch.tensor([[20 * scale_x, 10 * scale_y, 50 * scale_x, 40 * scale_y]])
    assert torch.allclose(out["boxes"], expected)
    assert_box_on_pixels(resized, out)
    assert 0.0 <= resized.min() and resized.max() <= 1.0
    assert out["orig_size"] == (90, 120) and out["labels"].tolist() == [3]


def test_resize_shortest_edge_chooses_among_min_sizes():
    torch.manual_seed(1)
    resize = ResizeShortestEdge((40, 50, 60), max_size=1000)
    image, target = rectangle_scene()
    shorter = {resize(image, target)[0].shape[1] for _ in range(40)}
    assert shorter == {40, 50, 60}


def test_compose_and_empty_targets():
    image, target = rectangle_scene()
    target = {**target, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    pipeline = Compose([ResizeShortestEdge((45,), 1000), RandomHorizontalFlip(1.0)])
    out_image, out = pipeline(image, target)
    assert tuple(out_image.shape) == (3, 45, 60) and out["boxes"].shape == (0, 4)


def test_tile_starts_hand_values():
    assert tile_starts(1000, 400, 100) == [0, 300, 600]
    assert tile_starts(1001, 400, 100) == [0, 300, 600, 601]  # last tile ends at the border
    assert tile_starts(300, 400, 50) == [0]
    assert tile_starts(400, 400, 0) == [0]
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(1000, 400, 400)


def test_tiles_cover_the_image_and_are_views():
    image = torch.rand(3, 250, 333)
    tiles = tile_image(image, None, tile_size=100, overlap=30)
    assert len(tiles) == len(tile_starts(250, 100, 30)) * len(tile_starts(333, 100, 30))
    covered = torch.zeros(250, 333, dtype=torch.int32)
    for crop, tile_target, (x0, y0) in tiles:
        h, w = crop.shape[-2:]
        assert h <= 100 and w <= 100 and tile_target is None
        assert torch.equal(crop, image[:, y0:y0 + h, x0:x0 + w])
        covered[y0:y0 + h, x0:x0 + w] += 1
    assert covered.min() >= 1


def test_object_split_by_a_tile_border_is_clipped_in_both_tiles():
    image, target = rectangle_scene(height=100, width=180, box=(60, 10, 130, 50))
    # Tiles of 100 with overlap 20: x ranges [0, 100) and [80, 180).
    extra = torch.tensor([[85, 0, 99, 20], [10, 60, 90, 90]], dtype=torch.float32)
    target["boxes"] = torch.cat([target["boxes"], extra])
    target["labels"] = torch.tensor([3, 4, 5])
    target["iscrowd"] = torch.tensor([False, True, False])
    target["difficult"] = torch.zeros(3, dtype=torch.bool)
    (left, left_t, left_o), (right, right_t, right_o) = tile_image(image, target, 100, 20)
    assert (left_o, right_o) == ((0, 0), (80, 0))
    # Box 0 keeps 40/70 of its area in the left tile and 50/70 in the right: in both.
    # Box 1 lies in the overlap: whole in both. Box 2 keeps only 10/80 in the right: dropped.
    assert left_t["boxes"].tolist() == [[60, 10, 100, 50], [85, 0, 99, 20], [10, 60, 90, 90]]
    assert left_t["labels"].tolist() == [3, 4, 5]
    assert right_t["boxes"].tolist() == [[0, 10, 50, 50], [5, 0, 19, 20]]
    assert right_t["labels"].tolist() == [3, 4] and right_t["iscrowd"].tolist() == [False, True]
    assert right_t["orig_size"] == (100, 100) and right_t["tile_origin"] == (80, 0)
    assert bright_box(right) == [0, 10, 50, 50] and bright_box(left) == [60, 10, 100, 50]
    # A lower threshold keeps the 12.5% sliver.
    lenient = crop_target(target, 80, 0, 180, 100, min_visibility=0.1)
    assert lenient["boxes"].tolist()[-1] == [0, 60, 10, 90]


def test_tile_grid_row_major():
    assert tile_grid(150, 150, 100, 0) == [(0, 0, 100, 100), (50, 0, 150, 100),
                                           (0, 50, 100, 150), (50, 50, 150, 150)]

"""Transforms keep boxes on their pixels; tiling covers the image and splits boxes correctly."""

import pytest
import torch

from densedet.data import (Compose, RandomHorizontalFlip, RandomObjectCrop, RandomRotate90, ResizeFixed,
                           ResizeShortestEdge, tile_image)
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


def test_a_flip_that_may_change_the_class_marks_the_mirrored_target_only():
    image, target = rectangle_scene()
    _, out = RandomHorizontalFlip(p=1.0)(image, target)
    assert "class_unknown" not in out                      # the default: a mirror keeps the class
    _, out = RandomHorizontalFlip(p=1.0, keeps_class=False)(image, target)
    assert out["class_unknown"] is True and out["boxes"].tolist() == [[70, 10, 100, 40]]
    assert "class_unknown" not in target
    _, kept = RandomHorizontalFlip(p=0.0, keeps_class=False)(image, target)
    assert "class_unknown" not in kept                     # not mirrored: its classes are known
    _, window = Compose([RandomHorizontalFlip(1.0, keeps_class=False), RandomObjectCrop(48)])(image, target)
    assert window["class_unknown"] is True                 # the mark survives the window cut


def test_flip_probability_uses_torch_generator():
    torch.manual_seed(0)
    flip = RandomHorizontalFlip(p=0.5)
    image, target = rectangle_scene()
    flips = [flip(image, target)[1]["boxes"][0, 0].item() == 70 for _ in range(400)]
    assert 0.4 < sum(flips) / 400 < 0.6
    torch.manual_seed(0)
    assert flips == [flip(image, target)[1]["boxes"][0, 0].item() == 70 for _ in range(400)]


def test_quarter_turns_move_boxes_with_pixels():
    image, target = rectangle_scene()                 # 120 wide, 90 high; box (20, 10, 50, 40)
    seen = {}
    torch.manual_seed(0)
    for _ in range(40):
        turned, out = RandomRotate90()(image, target)
        assert_box_on_pixels(turned, out, tol=0.0)
        seen[tuple(out["boxes"][0].tolist())] = tuple(turned.shape[1:])
    # one quarter turn counter-clockwise: (x, y) -> (y, 120 - x), the image 120 high and 90 wide
    assert seen == {(20, 10, 50, 40): (90, 120), (10, 70, 40, 100): (120, 90),
                    (70, 50, 100, 80): (90, 120), (50, 20, 80, 50): (120, 90)}
    assert target["boxes"].tolist() == [[20, 10, 50, 40]]   # input target untouched


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


def two_rectangles(height=100, width=200):
    """Rectangles A (bright, 30x30 at x 20..50) and B (grey, 40x20 at x 120..160)."""
    image = torch.zeros(3, height, width)
    image[:, 10:40, 20:50] = 1.0
    image[:, 50:70, 120:160] = 0.4
    target = {"boxes": torch.tensor([[20, 10, 50, 40], [120, 50, 160, 70]], dtype=torch.float32),
              "labels": torch.tensor([1, 2]), "iscrowd": torch.tensor([False, False]),
              "difficult": torch.tensor([False, False]), "image_id": 1, "orig_size": (height, width)}
    return image, target


def test_object_crop_holds_the_chosen_object_whole_on_its_pixels():
    image, target = rectangle_scene()  # 90 x 120, box (20, 10, 50, 40)
    crop = RandomObjectCrop(48)
    starts = set()
    for seed in range(40):
        torch.manual_seed(seed)
        window, out = crop(image, target)
        assert window.shape == (3, 48, 48)
        assert out["resize_as"] == (90, 120)
        assert out["iscrowd"].tolist() == [False] and out["labels"].tolist() == [3]
        assert_box_on_pixels(window, out, tol=0.0)       # whole, and where its pixels are
        x0, y0 = out["tile_origin"]
        assert torch.equal(window, image[:, y0:y0 + 48, x0:x0 + 48])
        starts.add((x0, y0))
    # every start keeping the box inside is x0 in [2, 20], y0 in [0, 10]; the draws spread over them
    assert all(2 <= x0 <= 20 and 0 <= y0 <= 10 for x0, y0 in starts)
    assert len({x for x, _ in starts}) > 8 and len({y for _, y in starts}) > 5


def test_object_crop_in_model_pixels_reaches_the_model_at_its_size_from_images_of_any_size():
    """model_size (min_size, max_size): a 64 px window is cut at 64 / f px of an image the model
    resizes by f (shorter side to 240), so the preprocessor brings each window to 64 px."""
    from densedet.models.preprocess import ImagePreprocessor
    pre = ImagePreprocessor(min_size=240, max_size=400, size_divisible=32).train()
    crop = RandomObjectCrop(64, model_size=(240, 400))
    for (h, w), cut in (((120, 160), 32), ((240, 320), 64), ((480, 640), 128), ((1200, 1600), 320)):
        image = torch.rand(3, h, w)
        target = {"boxes": torch.tensor([[10.0, 10.0, 26.0, 26.0]]), "labels": torch.tensor([1]),
                  "iscrowd": torch.tensor([False]), "orig_size": (h, w)}
        window, out = crop(image, target)
        assert window.shape[-2:] == (cut, cut) and out["resize_as"] == (h, w)
        assert out["boxes"].tolist() == [(target["boxes"][0] - torch.tensor([*out["tile_origin"]] * 2)).tolist()]
        _, sizes, resized = pre([window], [out])
        assert sizes == [(64, 64)]
        assert torch.allclose(resized[0]["boxes"], out["boxes"] * 64 / cut)
    # a tile's window is sized by the size the tile is resized as (its resize_as), as the model resizes it
    tile = {"boxes": torch.tensor([[5.0, 5.0, 15.0, 15.0]]), "labels": torch.tensor([1]),
            "iscrowd": torch.tensor([False]), "resize_as": (480, 640)}
    assert crop(torch.rand(3, 300, 300), tile)[0].shape[-2:] == (128, 128)
    assert RandomObjectCrop(64).side_in(480, 640) == 64          # without model_size: the image's pixels


def test_object_crop_ignores_objects_it_cuts():
    image, target = two_rectangles()
    # Hand window (10, 0)-(130, 100): A whole; B keeps 10 of its 40 px width (25% < 70%): ignored.
    out = crop_target(target, 10, 0, 130, 100, min_visibility=0.7, ignore_partial=True)
    assert out["boxes"].tolist() == [[10, 10, 40, 40], [110, 50, 120, 70]]
    assert out["iscrowd"].tolist() == [False, True]
    assert out["labels"].tolist() == [1, 2]
    # Window (10, 0)-(150, 100): B keeps 30/40 = 75% >= 70%: a normal (clipped) box.
    out = crop_target(target, 10, 0, 150, 100, min_visibility=0.7, ignore_partial=True)
    assert out["iscrowd"].tolist() == [False, False]
    assert out["boxes"][1].tolist() == [110, 50, 140, 70]
    # Without ignore_partial the cut box is dropped, as tiles do.
    assert crop_target(target, 10, 0, 130, 100, 0.7)["labels"].tolist() == [1]
    # A crowd box stays a crowd box; a box outside the window is gone either way.
    crowd = {**target, "iscrowd": torch.tensor([True, False])}
    out = crop_target(crowd, 0, 0, 100, 100, 0.7, ignore_partial=True)
    assert out["iscrowd"].tolist() == [True] and out["labels"].tolist() == [1]


def test_object_crop_centres_on_a_random_non_crowd_object():
    image, target = two_rectangles()
    target = {**target, "iscrowd": torch.tensor([False, True])}  # B is crowd: never the chosen one
    for seed in range(20):
        torch.manual_seed(seed)
        _, out = RandomObjectCrop(60)(image, target)
        assert [20 - out["tile_origin"][0], 10 - out["tile_origin"][1]] == out["boxes"][0, :2].tolist()
    image, target = two_rectangles()
    chosen = set()
    for seed in range(30):
        torch.manual_seed(seed)
        _, out = RandomObjectCrop(60)(image, target)
        chosen.update(int(l) for l, c in zip(out["labels"], out["iscrowd"]) if not c)
    assert chosen == {1, 2}


def test_object_crop_centres_only_on_objects_that_fit():
    """A (30x30) fits a 34 px window, B (40x20) does not: every window holds A whole. A window
    neither fits falls back to any object, as before."""
    image, target = two_rectangles()
    for seed in range(20):
        torch.manual_seed(seed)
        _, out = RandomObjectCrop(34)(image, target)
        whole = out["boxes"][~out["iscrowd"]]
        assert out["labels"][~out["iscrowd"]].tolist() == [1] and (whole[0, 2:] - whole[0, :2]).tolist() == [30, 30]
    chosen = set()
    for seed in range(30):
        torch.manual_seed(seed)
        _, out = RandomObjectCrop(24)(image, target)   # neither fits: each is cut, both get drawn
        assert out["iscrowd"].all()
        x0 = out["tile_origin"][0]
        chosen.add(1 if x0 < 60 else 2)
    assert chosen == {1, 2}


def test_object_crop_of_empty_and_small_images():
    image = torch.rand(3, 50, 70)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "iscrowd": torch.zeros(0, dtype=torch.bool), "image_id": 1, "orig_size": (50, 70)}
    torch.manual_seed(0)
    window, out = RandomObjectCrop(32)(image, empty)
    assert window.shape == (3, 32, 32) and len(out["boxes"]) == 0
    window, out = RandomObjectCrop(64)(image, empty)   # window taller than the image: full height
    assert window.shape == (3, 50, 64)
    # An object larger than the window: the window lies inside the object, which is then cut
    # (ignored) rather than taught as background.
    big = {**empty, "boxes": torch.tensor([[5.0, 5.0, 65.0, 45.0]]), "labels": torch.tensor([0]),
           "iscrowd": torch.tensor([False])}
    for seed in range(10):
        torch.manual_seed(seed)
        window, out = RandomObjectCrop(32)(image, big)
        x0, y0 = out["tile_origin"]
        assert 5 <= x0 <= 33 and 5 <= y0 <= 13
        assert out["iscrowd"].tolist() == [True]
    with pytest.raises(ValueError, match="size > 0"):
        RandomObjectCrop(0)

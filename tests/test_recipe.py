"""The rules of densedet.recipe, each pinned on a small hand-made annotation set (no training),
the one-class warm-up, the held-out splits and the choice of test-time augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from densedet.backbones.resnet import ResNet
from densedet.boxes import box_iou
from densedet.config import Config, ConfigError, apply_overrides, validate
from densedet.data import DetectionDataset, RandomObjectCrop, TiledDataset
from densedet.data.formats import detect_format
from densedet.data.records import DatasetError, DetectionData, ImageRecord
from densedet.data.split import SPLIT_SALT, holdout_counts, region_layout, split_by_image, split_by_region
from densedet.engine.data import shrink_to_input
from densedet.engine.evaluate import eval_tiles
from densedet.engine.pretrain import background_share, background_windows, pretrain_backbone
from densedet.engine.tune import candidate_sets, choose_tta
from densedet.models import build_from_config
from densedet.models.preprocess import ImagePreprocessor
from densedet.tta import TTAConfig
from densedet.errors import UsageError
from densedet.recipe import (DataSummary, RecipeOptions, base_config, choose_anchors, choose_ratios, derive,
                             grid_best_iou, holdout, parse_model_name, recipe_config, MAX_TUNE_IMAGES,
                             MAX_VAL_IMAGES)


def make_data(boxes_per_image, hw=(320, 320), labels=None, names=("thing",)) -> DetectionData:
    """One record per entry of ``boxes_per_image`` (lists of x1, y1, x2, y2), all ``hw`` (or one hw each)."""
    records = []
    for i, boxes in enumerate(boxes_per_image):
        h, w = hw[i] if isinstance(hw, list) else hw
        b = np.array(boxes, np.float32).reshape(-1, 4)
        lab = np.zeros(len(b), np.int64) if labels is None else np.array(labels[i], np.int64)
        records.append(ImageRecord(f"{i}.png", i + 1, h, w, b, lab))
    return DetectionData(records, list(names), None, "hand-made")


def squares(rng, n, lo, hi, size=320):
    out = []
    for _ in range(n):
        s = float(rng.uniform(lo, hi))
        x, y = rng.uniform(0, size - s, 2)
        out.append([x, y, x + s, y + s])
    return out


def values(rows) -> dict:
    return {r.key: r.value for r in rows}


def derived(data, val=None, **options) -> dict:
    summary = DataSummary.from_data(data, val)
    opts = RecipeOptions(has_val=val is not None, **options)
    return values(derive(summary, opts, holdout(summary, val is not None)))


# -- anchors and levels --------------------------------------------------------------------------------

def test_small_boxes_get_small_anchors_and_no_empty_level():
    rng = np.random.default_rng(0)
    data = make_data([squares(rng, 5, 8, 20) for _ in range(20)])
    v = derived(data)
    assert v["model.anchor_sizes"][0] == 16.0                     # 2 x stride 8: the smallest that covers them
    assert v["model.retinanet.min_level"] == 3 and v["model.retinanet.max_level"] == 5   # no anchors above P5
    assert v["model.min_size"] > 320                              # p2 below 12 px: upscaled, never shrunk


def test_boxes_of_every_size_use_the_paper_anchors_up_to_p7():
    rng = np.random.default_rng(1)
    data = make_data([squares(rng, 4, 12, 600, size=800) for _ in range(30)], hw=(800, 800))
    v = derived(data)
    assert v["model.retinanet.max_level"] == 7 and v["model.anchor_sizes"][0] in (16.0, 32.0)
    assert v["model.min_size"] == 800                             # native scale
    assert v["data.crop_sizes"] == []                             # large objects: whole images


def test_native_scale_says_which_limit_keeps_it():
    rng = np.random.default_rng(2)
    reasons = {}
    for name, data in {"small objects": make_data([squares(rng, 4, 14, 60, size=800) for _ in range(30)],
                                                  hw=(800, 800)),
                       "small images": make_data([squares(rng, 2, 36, 44, size=96) for _ in range(30)],
                                                 hw=(96, 96))}.items():
        summary = DataSummary.from_data(data)
        rows = {r.key: r for r in derive(summary, RecipeOptions(), holdout(summary, False))}
        assert rows["model.min_size"].value == data.records[0].height, name          # native scale
        reasons[name] = rows["model.min_size"].reason
    assert "the small objects are" in reasons["small objects"] and "shorter side" not in reasons["small objects"]
    assert "the shorter side is 96 px" in reasons["small images"] and "small objects" not in reasons["small images"]


def test_coverage_rule_is_what_the_grid_gives():
    # a 32 px box centred on a stride-8 grid point matches a 32 px anchor exactly
    iou, level = grid_best_iou(np.array([[16.0, 16.0, 48.0, 48.0]]), [[32.0]], [1.0], [8], 0.0)
    assert iou[0] == pytest.approx(1.0) and level[0] == 0
    # a 10 px box half-way between points of a stride-64 grid of 256 px anchors reaches almost nothing
    iou, _ = grid_best_iou(np.array([[27.0, 27.0, 37.0, 37.0]]), [[256.0]], [1.0], [64], 0.0)
    assert iou[0] < 0.01


def test_elongated_boxes_add_ratios():
    wh = np.array([[10.0, 60.0]] * 50 + [[20.0, 20.0]] * 50)       # half the boxes h/w = 6
    ratios, why = choose_ratios(wh)
    assert ratios == [0.5, 1.0, 2.0, 4.0, 8.0] and "elongated" in why
    ratios, _ = choose_ratios(np.array([[20.0, 22.0]] * 10))
    assert ratios == [0.5, 1.0, 2.0]                              # squarish: the paper's three


def test_elongated_boxes_are_covered_better_with_the_added_ratios():
    rng = np.random.default_rng(2)
    boxes = []
    for _ in range(200):
        x, y = rng.uniform(0, 200, 2)
        boxes.append([x, y, x + 12, y + 80])                      # h/w 6.7
    boxes = np.array(boxes)
    plain, _ = choose_anchors(boxes, "retinanet", [0.5, 1.0, 2.0])
    ratios, _ = choose_ratios(boxes[:, 2:] - boxes[:, :2])
    wide, _ = choose_anchors(boxes, "retinanet", ratios)
    assert wide["coverage"] > plain["coverage"] + 0.3


# -- input scale, tiles, windows -------------------------------------------------------------------

def test_huge_images_with_tiny_objects_are_tiled_not_downscaled():
    rng = np.random.default_rng(3)
    train = make_data([squares(rng, 30, 14, 30, size=3000) for _ in range(3)], hw=(3000, 3000))
    val = make_data([squares(rng, 5, 14, 30, size=500) for _ in range(2)], hw=(500, 500))
    v = derived(train, val)
    assert v["model.min_size"] == 500 and v["model.max_size"] == 500   # the evaluation images' own size
    assert v["data.tile_size"] == 500 and v["data.tile_scale_as"] == [500, 500]
    assert v["data.crop_sizes"] and max(v["data.crop_sizes"]) <= 0.6 * 500   # small objects: windows


@pytest.mark.parametrize("object_px, upscaled", [((20, 40), False), ((7, 11), True)])
def test_a_square_tile_takes_the_factor_of_a_non_square_evaluation_image(object_px, upscaled):
    """800x600 evaluation images, 2400x1800 training photos cut into 800 px tiles: an 800 px tile resized
    by its own size would take 600/800 of the evaluation images' factor; one factor serves both."""
    rng = np.random.default_rng(12)
    train = make_data([squares(rng, 40, *object_px, size=1800) for _ in range(4)], hw=(1800, 2400))
    val = make_data([squares(rng, 5, *object_px, size=600) for _ in range(5)], hw=(600, 800))
    v = derived(train, val)
    assert v["data.tile_size"] == 800 and v["model.scale_as"] is not None
    model = ImagePreprocessor(v["model.min_size"], v["model.max_size"], scale_as=v["model.scale_as"]).eval()
    tile, image, edge = (model._scale_for(h, w) or (1.0, 1.0) for h, w in ((800, 800), (600, 800), (300, 800)))
    assert tile == image == edge and (tile[0] > 1.0) == upscaled


def mixed_size_set(rng, objects_follow: bool) -> DetectionData:
    """Images of three sizes with 4 squares each: of 20-50 px in every image, or of 20-50 px in the
    480 x 640 images and as much smaller / larger in the others (``objects_follow``)."""
    sides = [(150, 200), (480, 640), (900, 1200)] * 8
    boxes = []
    for h, w in sides:
        f = h / 480 if objects_follow else 1.0
        image = []
        for _ in range(4):
            side = float(rng.uniform(20, 50)) * f
            x, y = rng.uniform(0, w - side), rng.uniform(0, h - side)
            image.append([x, y, x + side, y + side])
        boxes.append(image)
    return make_data(boxes, hw=sides)


def test_objects_of_one_size_in_images_of_many_keep_one_scale():
    # crops of one survey: a 30 px object is 30 px in a 150 px image and in a 900 px one
    rng = np.random.default_rng(0)
    val = make_data([[[0, 0, 30, 30]]] * 3, hw=(480, 640))
    data = mixed_size_set(rng, objects_follow=False)
    v = derived(data, val)
    assert v["model.scale_as"] == [480, 480] and v["model.min_size"] == v["model.max_size"] == 480
    assert v["data.tile_size"] == 640                       # the 1200 px images are still tiled
    assert "data.shrink_at_load" not in v
    # every image, whatever its size, is seen at its own scale
    cfg = recipe_config(derive(DataSummary.from_data(data, val), RecipeOptions(has_val=True)),
                        base_config("retinanet_r18_fpn"))
    model = build_from_config(cfg.model)
    assert [model.preprocessor.resized_size(h, w) for h, w in ((150, 200), (900, 1200))] == [(150, 200), (900, 1200)]
    # RefineDet would warp each image (or tile) to its square, the 150 x 200 images 2.1 x 1.6: it takes them
    # by the factor of a full 320 px tile (1.00x) instead, and pads them to its input
    rd = derived(data, val, model="refinedet320_r18")
    assert rd["model.scale_as"] == [320, 320] and rd["data.tile_size"] == 320
    cfg = recipe_config(derive(DataSummary.from_data(data, val), RecipeOptions(model="refinedet320_r18", has_val=True)),
                        base_config("refinedet320_r18"))
    validate(cfg)
    pre = build_from_config(cfg.model).preprocessor
    assert [pre.resized_size(h, w) for h, w in ((150, 200), (320, 320), (320, 200))] == [(150, 200), (320, 320),
                                                                                         (320, 200)]
    assert pre(([torch.rand(3, 150, 200)]))[0].shape == (1, 3, 320, 320)


def test_refinedet_warps_whole_the_images_whose_objects_follow_their_size():
    # one scene at three resolutions: warping each image whole to the input brings its objects to one size;
    # tiles (of the objects' own pixels, 6-16 px in the 150 px images) would keep them apart
    rng = np.random.default_rng(0)
    val = make_data([[[0, 0, 30, 30]]] * 3, hw=(480, 640))
    data = mixed_size_set(rng, objects_follow=True)
    rd = derived(data, val, model="refinedet320_r18")
    assert rd["data.tile_size"] == 0 and "model.scale_as" not in rd
    assert "follow their images'" in reasons(data, val, model="refinedet320_r18")["model.refinedet.image_size"]


def test_objects_that_follow_their_images_size_are_resized_with_them():
    # one scene at three resolutions: each image to the evaluation images' shorter side, no tiles, the
    # objects' sizes measured there (6-16 px in the 150 px images, 20-50 px at 480), windows in model
    # pixels: cut at each image's own factor
    rng = np.random.default_rng(0)
    val = make_data([[[0, 0, 30, 30]]] * 3, hw=(480, 640))
    data = mixed_size_set(rng, objects_follow=True)
    assert np.percentile(DataSummary.from_data(data).box_sizes, 2) < 12
    v = derived(data, val)
    assert v["model.scale_as"] is None and (v["model.min_size"], v["model.max_size"]) == (480, 640)
    assert v["data.tile_size"] == 0 and v["data.crop_model_pixels"] is True
    assert v["data.crop_sizes"] == [64]                    # the p98 object, ~50 px at 480, with margin
    cfg = recipe_config(derive(DataSummary.from_data(data, val), RecipeOptions(has_val=True)),
                        base_config("retinanet_r18_fpn"))
    crop = RandomObjectCrop(64, model_size=(cfg.model.min_size, cfg.model.max_size))
    assert [crop.side_in(h, w) for h, w in ((150, 200), (480, 640), (900, 1200))] == [20, 64, 120]
    # images of one shorter side: nothing to decide, no row
    assert "model.scale_as" not in derived(make_data([squares(rng, 4, 20, 50)] * 10), val)


def test_windows_are_sized_from_the_objects():
    rng = np.random.default_rng(4)
    data = make_data([squares(rng, 6, 20, 40, size=640) for _ in range(20)], hw=(640, 640))
    v = derived(data)
    largest = max(v["data.crop_sizes"])
    assert 40 * 1.1 <= largest <= 96                               # holds the largest object with margin
    assert v["data.train_min_sizes"] == [640]
    assert v["train.batch_size"] >= 8                              # small windows: more of them per batch


def test_windows_need_room_in_the_image():
    rng = np.random.default_rng(5)
    data = make_data([squares(rng, 2, 100, 150, size=256) for _ in range(20)], hw=(256, 256))
    assert derived(data)["data.crop_sizes"] == []


def test_large_photos_of_large_objects_are_shrunk_to_the_smallest_anchor_or_320_px():
    rng = np.random.default_rng(8)
    big = [squares(rng, 3, 480, 1600, size=3000) for _ in range(20)]
    v = derived(make_data(big, hw=(3000, 4000)))
    # p2 of the boxes ~480 px: shrinking them to 32 px would take the images below 320 px, so 320 px it is
    assert v["model.min_size"] == 320 and v["model.max_size"] == round(4000 * 320 / 3000)
    assert v["data.shrink_at_load"] is True
    rows = {r.key: r for r in derive(DataSummary.from_data(make_data(big, hw=(3000, 4000))), RecipeOptions())}
    assert "100.0% of boxes have an anchor" in rows["model.anchor_sizes"].reason   # natively: over P7's reach
    # objects of 64 px and more in 2000 px images: shrunk until the smallest are 32 px
    data = make_data([squares(rng, 6, 64, 200, size=2000) for _ in range(20)], hw=(2000, 2000))
    p2 = np.percentile(DataSummary.from_data(data).box_sizes, 2)
    assert derived(data)["model.min_size"] == round(2000 * 32 / p2)
    # small objects in the same photos: nothing is shrunk, nothing is shrunk at load
    v = derived(make_data([squares(rng, 6, 20, 200, size=2000) for _ in range(20)], hw=(2000, 2000)))
    assert v["model.min_size"] == 2000 and "data.shrink_at_load" not in v


def test_shrink_at_load_resizes_pixels_and_boxes_as_the_model_would(tmp_path):
    pixels = np.zeros((600, 800, 3), np.uint8)
    pixels[200:400, 400:600] = 255                                   # a white square under the box
    Image.fromarray(pixels).save(tmp_path / "big.png")
    Image.fromarray(np.zeros((200, 300, 3), np.uint8)).save(tmp_path / "small.png")
    data = make_data([[[400, 200, 600, 400]], [[10, 10, 50, 50]]], hw=[(600, 800), (200, 300)])
    data.records[0].file_name, data.records[1].file_name = str(tmp_path / "big.png"), str(tmp_path / "small.png")
    shrunk = shrink_to_input(data, 300, 1000)
    big, small = shrunk.records
    assert (big.height, big.width, big.resize) == (300, 400, (300, 400))
    assert big.boxes.tolist() == [[200.0, 100.0, 300.0, 200.0]]
    assert small is data.records[1]                                  # the model would not shrink it: untouched
    image, target = DetectionDataset(shrunk)[0]
    assert image.shape == (3, 300, 400)
    assert torch.equal(target["boxes"], torch.tensor([[200.0, 100.0, 300.0, 200.0]]))
    inside, outside = image[:, 105:195, 205:295], image[:, :, :190]
    assert inside.min() == 1.0 and outside.max() == 0.0              # the square stays under its box
    preprocess = ImagePreprocessor(min_size=300, max_size=1000).eval()
    _, sizes, _ = preprocess([image])
    assert tuple(sizes[0]) == (300, 400)                              # the model's resize leaves it as it is
    warped = shrink_to_input(data, 300, 1000, fixed_size=250)         # RefineDet's warp, to 250 x 250
    assert (warped.records[0].resize, warped.records[1].resize) == ((250, 250), None)   # 200 px high: kept
    assert np.allclose(warped.records[0].boxes, [[125.0, 250 / 3, 187.5, 500 / 3]])
    assert DetectionDataset(warped)[0][0].shape == (3, 250, 250)


def test_shrink_at_load_clips_the_boxes_of_an_image_whose_size_came_from_its_file(tmp_path):
    Image.fromarray(np.zeros((600, 800, 3), np.uint8)).save(tmp_path / "big.png")
    record = ImageRecord(str(tmp_path / "big.png"), 1, None, None,                # a CSV row: no size given
                         np.array([[400, 200, 600, 400], [790, 590, 900, 700], [850, 10, 900, 50]], np.float32),
                         np.array([0, 1, 2]))
    shrunk = shrink_to_input(DetectionData([record], ["a", "b", "c"], None, "test.csv"), 300, 1000).records[0]
    assert shrunk.boxes.tolist() == [[200.0, 100.0, 300.0, 200.0], [395.0, 295.0, 400.0, 300.0]]
    assert shrunk.labels.tolist() == [0, 1]                           # the box wholly outside is dropped
    assert DetectionDataset(DetectionData([shrunk], ["a", "b", "c"], None, "test.csv"))[0][0].shape == (3, 300, 400)


def test_refinedet_warps_large_photos_once_when_loaded_and_leaves_small_ones():
    rng = np.random.default_rng(9)
    big = derived(make_data([squares(rng, 3, 40, 400, size=1200) for _ in range(20)], hw=(1200, 1600)),
                  model="refinedet320_r18")
    assert big["data.shrink_at_load"] is True
    small = derived(make_data([squares(rng, 3, 20, 100, size=320) for _ in range(20)]), model="refinedet320_r18")
    assert "data.shrink_at_load" not in small


def reasons(data, val=None, **options) -> dict:
    summary = DataSummary.from_data(data, val)
    rows = derive(summary, RecipeOptions(has_val=val is not None, **options), holdout(summary, val is not None))
    return {r.key: r.reason for r in rows}


def coverage(reason: str) -> float:
    """The share of boxes with an anchor at IoU 0.5, as the anchor row prints it."""
    return float(reason.split("% of boxes have an anchor")[0].split()[-1]) / 100


def test_refinedet_cuts_images_it_would_shrink_small_objects_in_into_tiles_of_its_input(tmp_path):
    # 640 px images of 12-20 px objects: warped whole to 320 they would be 6-10 px (no anchor reached them)
    rng = np.random.default_rng(13)
    data = make_data([squares(rng, 6, 12, 20, size=640) for _ in range(20)], hw=(640, 640))
    v, why = derived(data, model="refinedet320_r18"), reasons(data, model="refinedet320_r18")
    assert v["data.tile_size"] == 320 and v["data.tile_overlap"] == 32 and v["data.tile_scale_as"] is None
    assert "data.shrink_at_load" not in v                               # nothing is shrunk, at load or after
    assert "objects at 1.00x, never downscaled" in why["data.tile_size"]
    assert "box sizes 12/20 px" in why["model.anchor_sizes"] and coverage(why["model.anchor_sizes"]) > 0.5
    cfg = recipe_config(derive(DataSummary.from_data(data), RecipeOptions(model="refinedet320_r18")),
                        base_config("refinedet320_r18"))
    assert eval_tiles(cfg.data) == (320, 32)                            # evaluation cuts the same tiles
    # each training tile reaches the model at 320 x 320, its boxes at their size in the photo (scale 1)
    Image.fromarray(np.zeros((640, 640, 3), np.uint8)).save(tmp_path / "0.png")
    one = make_data([data.records[0].boxes.tolist()], hw=(640, 640))
    one.records[0].file_name = str(tmp_path / "0.png")
    tiles = TiledDataset(one, cfg.data.tile_size, cfg.data.tile_overlap, scale_as=cfg.data.tile_scale_as)
    warp = ImagePreprocessor(fixed_size=(320, 320))
    for i in range(len(tiles)):
        image, target = tiles[i]
        _, sizes, out = warp([image], [target])
        assert sizes == [(320, 320)] and torch.allclose(out[0]["boxes"], target["boxes"])
    # RetinaNet sees the same images whole at their own size, as before
    assert derived(data)["data.tile_size"] == 0 and derived(data)["model.min_size"] == 640


def test_refinedet_tiles_huge_photos_of_tiny_objects_small_enough_to_upscale_them():
    # 5000x4000 photos of 8-14 px objects, 500 px validation images: 500 px tiles warped to 320 shrank them 0.64x
    rng = np.random.default_rng(14)
    train = make_data([squares(rng, 40, 8, 14, size=4000) for _ in range(3)], hw=(4000, 5000))
    val = make_data([squares(rng, 5, 8, 14, size=500) for _ in range(2)], hw=(500, 500))
    v, why = derived(train, val, model="refinedet320_r18"), reasons(train, val, model="refinedet320_r18")
    p2 = np.percentile(DataSummary.from_data(train, val).box_sizes, 2)
    assert v["data.tile_size"] <= 320 and v["data.tile_size"] == round(320 / min(2.0, 12 / p2))   # RetinaNet's 12/p2
    assert "small objects upscaled to 12 px" in why["data.tile_size"]
    assert not any("never downscaled" in reason for reason in why.values())
    assert coverage(why["model.anchor_sizes"]) > 0.5 and "only" not in why["model.anchor_sizes"]


def test_refinedet_still_shrinks_large_objects_and_says_so():
    rng = np.random.default_rng(15)
    data = make_data([squares(rng, 3, 40, 400, size=1200) for _ in range(20)], hw=(1200, 1600))
    v, why = derived(data, model="refinedet320_r18"), reasons(data, model="refinedet320_r18")
    assert v["data.tile_size"] == 0 and v["data.shrink_at_load"] is True       # warped whole, at load, as before
    assert "large objects, which the warp shrinks" in why["model.refinedet.image_size"]
    # large photos of large objects over 1.5x the validation images: tiles of those, warped (shrunk) as before
    big = make_data([squares(rng, 3, 480, 1600, size=3000) for _ in range(4)], hw=(3000, 4000))
    val = make_data([squares(rng, 1, 200, 600, size=1000) for _ in range(2)], hw=(1000, 1000))
    v, why = derived(big, val, model="refinedet320_r18"), reasons(big, val, model="refinedet320_r18")
    assert v["data.tile_size"] == 1000 and v["data.tile_scale_as"] == [1000, 1000]
    assert "0.32x, the objects are large" in why["data.tile_size"] and "never downscaled" not in why["data.tile_size"]


def test_refinedet_keeps_whole_images_that_the_warp_does_not_shrink():
    # the digit scenes' case: 320 px images, objects up to 150 px, p2 ~11 px: warped at 1x, as before
    rng = np.random.default_rng(16)
    data = make_data([squares(rng, 6, 8, 150) for _ in range(20)])
    assert 10 < np.percentile(DataSummary.from_data(data).box_sizes, 2) < 12    # RetinaNet would upscale them
    v, why = derived(data, model="refinedet320_r18"), reasons(data, model="refinedet320_r18")
    assert v["data.tile_size"] == 0 and "data.shrink_at_load" not in v and "data.tile_scale_as" not in v
    assert "at 1.00x" in why["model.refinedet.image_size"] and "only cut into tiles when it would" in \
        why["model.refinedet.image_size"]
    plain, _ = choose_anchors(DataSummary.from_data(data).boxes, "refinedet", [0.5, 1.0, 2.0])
    assert v["model.anchor_sizes"] == [plain["anchor_sizes"][0] * 2 ** k for k in range(4)]   # measured at 1x


def test_anchors_that_miss_most_boxes_say_so():
    rng = np.random.default_rng(17)
    tiny = make_data([squares(rng, 6, 4, 7) for _ in range(20)])         # 4-7 px in 320 px images: warped at 1x
    why = reasons(tiny, model="refinedet320_r18")["model.anchor_sizes"]
    assert coverage(why) < 0.5 and "of boxes reach an anchor: objects this small need RetinaNet " \
        "(--model retinanet_r18_fpn)" in why
    assert "need RetinaNet" not in reasons(tiny)["model.anchor_sizes"]   # RetinaNet is not told to use itself
    assert "reach an anchor" not in reasons(make_data([squares(rng, 6, 20, 40) for _ in range(20)]),
                                            model="refinedet320_r18")["model.anchor_sizes"]


def test_classes_without_training_boxes_are_named_and_kept():
    rng = np.random.default_rng(18)
    data = make_data([squares(rng, 2, 20, 40) for _ in range(12)], labels=[[0, 1]] * 12, names=("a", "b", "unused"))
    v, why = derived(data), reasons(data)
    assert v["model.num_classes"] == 3 and why["model.num_classes"].endswith("no training boxes: unused (kept as "
                                                                             "classes, never learnt)")
    every = make_data([squares(rng, 2, 20, 40) for _ in range(12)])
    assert "no training boxes" not in reasons(every)["model.num_classes"]


def test_shrink_at_load_needs_the_models_one_scale_and_no_tiles():
    for overrides in (["data.tile_size=400"], ["data.train_min_sizes=[800,1000]"], ["data.augment=ssd"],
                      ["model.scale_as=[800,800]"]):     # one factor for every image: a shrunk one, shrunk twice
        with pytest.raises(ConfigError, match="shrink_at_load"):
            validate(apply_overrides(Config(), ["data.shrink_at_load=true", "model.min_size=800"] + overrides))
    with pytest.raises(ConfigError, match="scale_as"):
        validate(apply_overrides(Config(), ["model.scale_as=[800]"]))
    # RefineDet takes scale_as too: each image resized by one factor and padded to its input
    validate(apply_overrides(Config(), ["model.arch=refinedet", "model.min_size=320", "model.max_size=320",
                                        "model.scale_as=[244,244]"]))
    # windows in model pixels: need windows, and mean nothing more with one factor for every image
    for overrides in ([], ["data.crop_sizes=[64]", "model.scale_as=[800,800]"]):
        with pytest.raises(ConfigError, match="crop_model_pixels"):
            validate(apply_overrides(Config(), ["data.crop_model_pixels=true"] + overrides))
    validate(apply_overrides(Config(), ["data.crop_model_pixels=true", "data.crop_sizes=[64]"]))


# -- classes, images without boxes, the holdout, the starting point ----------------------------------

def test_one_class_gets_the_background_warm_up_and_no_class_cross_entropy():
    rng = np.random.default_rng(6)
    v = derived(make_data([squares(rng, 3, 20, 40) for _ in range(12)]))
    assert v["model.num_classes"] == 1
    assert v["model.retinanet.class_ce_weight"] == 0.0
    assert background_share(v["train.pretrain_background"], 1) == 0.5
    assert background_share(v["train.pretrain_background"], 3) == 0.0


def test_images_without_boxes_are_kept_and_counted():
    rng = np.random.default_rng(7)
    data = make_data([squares(rng, 3, 20, 40) for _ in range(8)] + [[] for _ in range(4)])
    rows = derive(DataSummary.from_data(data), RecipeOptions())
    assert "4 without boxes" in next(r.reason for r in rows if r.key == "model.num_classes")


def test_no_boxes_at_all_is_refused():
    with pytest.raises(UsageError, match="no boxes"):
        derived(make_data([[] for _ in range(5)]))


def test_holdout_rule():
    rng = np.random.default_rng(8)
    small = derived(make_data([squares(rng, 2, 20, 40) for _ in range(5)]))
    assert small["data.val_fraction"] == 0.1 and small["data.tune_fraction"] == 0.0 and not small["test.tta_choose"]
    big = derived(make_data([squares(rng, 2, 20, 40) for _ in range(40)]))
    assert big["data.tune_fraction"] == 0.1 and big["test.tta_choose"]
    with_val = derived(make_data([squares(rng, 2, 20, 40) for _ in range(40)]), make_data([squares(rng, 2, 20, 40)]))
    assert with_val["data.val_fraction"] == 0.0
    with pytest.raises(UsageError, match="--val"):
        derived(make_data([squares(rng, 2, 20, 40) for _ in range(2)]))


def test_held_out_splits_are_capped_in_images():
    """10% of a large set would take thousands of images from training, and the tune split costs a pass
    over its images per test-time set tried: at most MAX_VAL_IMAGES and MAX_TUNE_IMAGES."""
    assert holdout_counts(12_000, 0.1, 0.1, MAX_VAL_IMAGES, MAX_TUNE_IMAGES) == (MAX_VAL_IMAGES, MAX_TUNE_IMAGES)
    assert holdout_counts(12_000, 0.1, 0.1) == (1200, 1200)
    assert holdout_counts(40, 0.1, 0.1, MAX_VAL_IMAGES, MAX_TUNE_IMAGES) == (4, 4)
    rng = np.random.default_rng(11)
    data = make_data([squares(rng, 1, 20, 40) for _ in range(3000)])
    rows = {r.key: r for r in holdout(DataSummary.from_data(data), has_val=False)}
    assert rows["data.val_max_images"].value == MAX_VAL_IMAGES and rows["data.tune_max_images"].value == MAX_TUNE_IMAGES
    assert rows["data.val_fraction"].reason.startswith("no --val: 300 of 3000")
    assert rows["data.tune_fraction"].reason.startswith(f"{MAX_TUNE_IMAGES} more training images")
    parts = split_by_image(data, 0.1, 0.1, seed=0, val_max=MAX_VAL_IMAGES, tune_max=MAX_TUNE_IMAGES)
    assert [len(parts[k].records) for k in ("train", "val", "tune")] == [2450, 300, MAX_TUNE_IMAGES]


def test_held_out_splits_each_get_an_image_with_objects_or_are_not_made():
    """AP is not measured on images without objects: a held-out split takes one with objects, and
    training keeps one. 40 images, of which 1, 2 or 3 have objects."""
    rng = np.random.default_rng(10)

    def mostly_empty(with_objects: int):
        return make_data([squares(rng, 2, 20, 40) if i < with_objects else [] for i in range(40)])

    with pytest.raises(UsageError, match="only 1 training image.* with objects.*--val"):
        derived(mostly_empty(1))
    two = derived(mostly_empty(2))
    assert two["data.val_fraction"] == 0.1 and two["data.tune_fraction"] == 0.0 and not two["test.tta_choose"]
    three = derived(mostly_empty(3))
    assert three["data.tune_fraction"] == 0.1 and three["test.tta_choose"]
    parts = split_by_image(mostly_empty(3), three["data.val_fraction"], three["data.tune_fraction"], seed=0)
    assert all(any(len(r) for r in part.records) for part in parts.values())
    with_val = derived(mostly_empty(1), make_data([squares(rng, 2, 20, 40)]))
    assert with_val["data.val_fraction"] == 0.0 and with_val["data.tune_fraction"] == 0.0


def test_fine_tuning_recipe_from_imagenet_weights():
    rng = np.random.default_rng(9)
    v = derived(make_data([squares(rng, 3, 20, 40) for _ in range(12)]), weights="r18.pth", weights_kind="imagenet")
    assert v["model.norm"] == "frozen_bn" and v["solver.optimizer"] == "sgd"
    assert v["model.pretrained_backbone"] == "r18.pth" and "train.pretrain_minutes" not in v
    scratch = derived(make_data([squares(rng, 3, 20, 40) for _ in range(12)]))
    assert scratch["model.norm"] == "bn" and scratch["solver.optimizer"] == "adamw"
    assert scratch["model.retinanet.head_norm"] == "gn" and scratch["train.pretrain_freeze_stages"] == 2
    # the box-crop warm-up goes with a ResNet trunk, whichever family: RefineDet R18 too, not VGG16
    assert derived(make_data([squares(rng, 3, 20, 40) for _ in range(12)]),
                   model="refinedet320_r18")["train.pretrain_minutes"] == 1.5
    assert "train.pretrain_minutes" not in derived(make_data([squares(rng, 3, 20, 40) for _ in range(12)]),
                                                   model="refinedet320_vgg16")


def test_flip_and_model_names():
    rng = np.random.default_rng(10)
    data = make_data([squares(rng, 3, 20, 40) for _ in range(12)])
    assert derived(data, flip=False)["data.hflip_prob"] == 0.0
    # a mirror keeps the one class; with several it may change one, so mirrored windows teach boxes only
    assert derived(data)["data.hflip_keeps_class"] is True
    two = make_data([squares(rng, 3, 20, 40) for _ in range(12)], labels=[[0, 1, 1]] * 12, names=("a", "b"))
    assert derived(two)["data.hflip_keeps_class"] is False
    assert "data.hflip_keeps_class" not in derived(two, flip=False)
    assert "data.hflip_keeps_class" not in derived(two, model="refinedet320_r18")   # Caffe's SSD mirror stays
    assert derived(data)["data.rotate90"] is False and derived(data, top_down=True)["data.rotate90"] is True
    assert derived(data)["model.box_vote"] is True and derived(data, model="refinedet320_r18")["model.box_vote"]
    assert derived(data)["data.photometric"] is True and derived(data, model="refinedet320_r18")["data.photometric"]
    assert parse_model_name("refinedet320_vgg16") == ("refinedet", "vgg16", 320)
    assert parse_model_name("retinanet_r50_fpn") == ("retinanet", "resnet50", 0)
    with pytest.raises(UsageError, match="--model"):
        parse_model_name("yolo")


@pytest.mark.parametrize("model", ["retinanet_r18_fpn", "refinedet320_r18"])
def test_derived_values_make_a_valid_config(model):
    rng = np.random.default_rng(11)
    data = make_data([squares(rng, 3, 10, 60) for _ in range(12)], labels=[[0, 1, 1]] * 12, names=("a", "b"))
    rows = derive(DataSummary.from_data(data), RecipeOptions(model=model))
    cfg = recipe_config(rows, base_config(model))
    assert cfg.model.num_classes == 2 and cfg.model.arch == model.split("_")[0].rstrip("0123456789")
    if cfg.model.arch == "refinedet":
        assert cfg.model.refinedet.image_size == 320 and len(cfg.model.anchor_sizes) == 4
        assert cfg.model.aspect_ratios == [1.0, 2.0, 0.5]          # Caffe's w/h in Caffe's order: no warning


# -- format detection ---------------------------------------------------------------------------------

def test_format_detection(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "b.csv").write_text("x.png,1,2,3,4,a\n")
    voc = tmp_path / "voc"
    voc.mkdir()
    (voc / "1.xml").write_text("<annotation/>")
    (tmp_path / "c.txt").write_text("x.png,1,2,3,4,a\n")
    (tmp_path / "d.ann").write_text('{"images": []}')
    (tmp_path / "e.ann").write_text("just words\n")
    assert detect_format([str(tmp_path / "a.json")]) == "coco"
    assert detect_format([str(tmp_path / "b.csv")]) == "csv"
    assert detect_format([str(voc)]) == "voc"
    assert detect_format([str(voc / "1.xml"), str(voc / "1.xml")]) == "voc"
    assert detect_format([str(tmp_path / "c.txt")]) == "csv"
    assert detect_format([str(tmp_path / "d.ann")]) == "coco"
    with pytest.raises(DatasetError, match="e.ann: cannot tell the annotation format"):
        detect_format([str(tmp_path / "e.ann")])
    with pytest.raises(DatasetError, match="different formats"):
        detect_format([str(tmp_path / "a.json"), str(tmp_path / "b.csv")])


# -- the held-out splits ------------------------------------------------------------------------------

def test_splits_are_by_image_disjoint_and_seeded():
    data = make_data([[[0, 0, 10, 10]] for _ in range(50)])
    a = split_by_image(data, 0.1, 0.1, seed=0)
    ids = {name: {r.image_id for r in part.records} for name, part in a.items()}
    assert len(ids["val"]) == 5 and len(ids["tune"]) == 5 and len(ids["train"]) == 40
    assert not (ids["val"] & ids["tune"]) and not (ids["train"] & (ids["val"] | ids["tune"]))
    b = split_by_image(data, 0.1, 0.1, seed=0)
    assert {r.image_id for r in b["val"].records} == ids["val"]
    c = split_by_image(data, 0.1, 0.1, seed=1)
    assert {r.image_id for r in c["val"].records} != ids["val"]
    assert "tune" not in split_by_image(data, 0.1, 0.0, seed=0)


def test_splits_hold_out_images_with_and_without_objects_in_proportion():
    # 40 frames, 4 with an object (a camera trap's set): a plain draw of 4 + 4 held out had left the
    # validation split without any object (COCO AP -1)
    boxes = [[[0, 0, 10, 10]] if i % 10 == 0 else [] for i in range(40)]
    data = make_data(boxes)
    for seed in range(5):
        parts = split_by_image(data, 0.1, 0.1, seed=seed)
        with_objects = {name: sum(len(r.boxes) > 0 for r in part.records) for name, part in parts.items()}
        assert with_objects == {"val": 1, "tune": 1, "train": 2}
        assert [len(part.records) for part in parts.values()] == [4, 4, 32]
    # a set whose every image has objects splits as the seeded draw alone
    full = make_data([[[0, 0, 10, 10]] for _ in range(50)])
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0 * SPLIT_SALT + 1)).tolist()
    assert [r.image_id for r in split_by_image(full, 0.1, 0.1, seed=0)["val"].records] == \
        [full.records[i].image_id for i in sorted(order[:5])]
    # one image with objects stays in training
    lone = split_by_image(make_data([[[0, 0, 10, 10]]] + [[] for _ in range(19)]), 0.1, 0.1, seed=0)
    assert sum(len(r.boxes) for r in lone["train"].records) == 1


def test_split_refuses_to_leave_nothing_to_train_on():
    with pytest.raises(DatasetError, match="train on"):
        split_by_image(make_data([[[0, 0, 10, 10]] for _ in range(2)]), 0.5, 0.4, seed=0)


def test_region_layout_puts_the_bands_at_the_far_end_behind_a_gap():
    # taller than wide: bands across the width at the bottom; val last, tune before it, the gap before both
    assert region_layout(3000, 1000, 0.1, 0.1, gap=50) == {
        "train": (0, 0, 1000, 2350), "tune": (0, 2400, 1000, 2700), "val": (0, 2700, 1000, 3000)}
    assert region_layout(1000, 3000, 0.0, 0.1, gap=50) == {"train": (0, 0, 2650, 1000), "tune": (2700, 0, 3000, 1000)}
    assert region_layout(1000, 900, 0.1, 0.1, gap=60) is None        # a 100 px band cannot hold two 60 px objects


def test_split_by_region_trains_on_no_pixel_of_a_held_out_object(tmp_path):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 255, (1200, 500, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "big.png")
    boxes = [[x, y, x + 20, y + 24] for y in range(0, 1170, 30) for x in range(5, 480, 37)]
    big = ImageRecord(str(tmp_path / "big.png"), 7, 1200, 500, np.array(boxes, np.float32), np.zeros(len(boxes)))
    small = ImageRecord("small.png", 8, 300, 300, np.array([[0, 0, 20, 24]], np.float32), np.zeros(1))
    data = DetectionData([big, small], ["thing"], None, "grid")
    parts = split_by_region(data, 0.1, 0.1, gap=24, piece=160)
    train, tune, val = parts["train"].records, parts["tune"].records, parts["val"].records
    assert train[1] is small and train[0].region == (0, 0, 500, 936)        # too small to share: trained on whole
    assert [r.region for r in val] == [(0, 1080, 167, 1200), (167, 1080, 333, 1200), (333, 1080, 500, 1200)]
    assert len({r.image_id for r in train + tune + val}) == len(train + tune + val) and 7 not in {r.image_id for r in tune}
    trained = train[0].region
    scored = 0
    for record in tune + val:
        x0, y0, x1, y1 = record.region
        assert (record.height, record.width) == (y1 - y0, x1 - x0) and y0 >= trained[3] + 24    # behind the gap
        for box, crowd in zip(record.boxes + [x0, y0, x0, y0], record.iscrowd):
            whole = any(np.allclose(box, b) for b in boxes)
            assert crowd != whole                                        # cut by the border: ignored, not scored
            scored += not crowd
    inside = [b for b in boxes if b[1] >= 936 + 24 and any(
        r.region[0] <= b[0] and b[2] <= r.region[2] and r.region[1] <= b[1] and b[3] <= r.region[3] for r in tune + val)]
    assert scored == len(inside) > 0
    # the pixels are the region's, the boxes in its coordinates
    image, target = DetectionDataset(parts["val"])[1]
    assert torch.equal((image * 255).round().byte(), torch.from_numpy(pixels[1080:1200, 167:333]).permute(2, 0, 1))
    assert float(target["boxes"][:, 0].min()) >= 0 and float(target["boxes"][:, 2].max()) <= 166
    with pytest.raises(DatasetError, match="--val"):
        split_by_region(DetectionData([small], ["thing"], None, "one"), 0.1, 0.1, gap=24)


def test_holdout_by_region_for_few_large_photos():
    rng = np.random.default_rng(12)
    photos = make_data([squares(rng, 600, 20, 40, size=2000) for _ in range(3)], hw=(2000, 2000))
    v = derived(photos)
    assert v["data.holdout"] == "region" and v["data.val_fraction"] == 0.1 and v["data.tune_fraction"] == 0.1
    assert 38 <= v["data.holdout_gap"] <= 40 and v["data.holdout_piece"] == 0 and v["test.tta_choose"]
    # with a validation file: only the tune band, cut into pieces the size of the validation images
    v = derived(photos, make_data([squares(rng, 5, 20, 40, size=500)], hw=(400, 500)))
    assert v["data.holdout"] == "region" and v["data.val_fraction"] == 0.0 and v["data.holdout_piece"] == 500
    # a tune band of fewer than 100 whole objects cannot tell test-time sets apart: only the val band
    sparse = make_data([squares(rng, 60, 20, 40, size=2000) for _ in range(3)], hw=(2000, 2000))
    v = derived(sparse)
    assert v["data.holdout"] == "region" and v["data.val_fraction"] == 0.1 and v["data.tune_fraction"] == 0.0
    assert not v["test.tta_choose"]
    assert "data.holdout" not in derived(sparse, make_data([squares(rng, 5, 20, 40, size=500)], hw=(400, 500)))
    # many images, or photos small against their objects: whole images, as before
    assert "data.holdout" not in derived(make_data([squares(rng, 3, 20, 40, size=2000) for _ in range(12)],
                                                   hw=(2000, 2000)))
    assert "data.holdout" not in derived(make_data([squares(rng, 3, 100, 150, size=600) for _ in range(5)],
                                                   hw=(600, 600)))


# -- choosing the TTA on the tune split ------------------------------------------------------------------

def test_tta_choice_keeps_single_scale_when_no_set_beats_it():
    candidates = candidate_sets(320, flip=True)
    chosen, rows = choose_tta(lambda tta: {"AP": 0.40 if tta is None else 0.39}, candidates)
    assert chosen is None and rows[0] == {"tta": "single scale", "AP": 0.40} and len(rows) == len(candidates) + 1
    chosen, _ = choose_tta(lambda tta: {"AP": 0.40 if tta is None else 0.40}, candidates)
    assert chosen is None                                          # a tie is no gain
    # on a small tune split a gain below the resolution of AP (1/N for N objects) is no gain either
    chosen, _ = choose_tta(lambda tta: {"AP": 0.40 if tta is None else 0.41}, candidates, margin=1 / 40)
    assert chosen is None
    chosen, _ = choose_tta(lambda tta: {"AP": 0.40 if tta is None else 0.43}, candidates, margin=1 / 40)
    assert chosen is candidates[0]


def test_tta_choice_picks_the_best_set():
    candidates = candidate_sets(320, flip=False)
    assert all(not c.flip for c in candidates) and candidates[0].scales == (320, 384)
    # the model's own scale is in every set as it is; only the others are rounded (240 px images: not to 256)
    assert [c.scales for c in candidate_sets(240, flip=False)] == [(240, 288), (240, 256, 288, 320),
                                                                   (192, 240, 288)]
    assert not any(c.rotate for c in candidates)
    # a model trained on quarter turns (--top-down) is also tried on them, with the mirrors it learnt too
    turns = [c for c in candidate_sets(320, flip=True, rotate=True) if c.rotate]
    assert turns == [TTAConfig(scales=(320,), flip=True, rotate=True, merge="vote")]
    best = candidates[1]
    chosen, _ = choose_tta(lambda tta: {"AP": 0.5 if tta is best else 0.3}, candidates)
    assert chosen is best


def test_tta_choice_adds_the_mirror_to_the_best_scale_set_when_it_helped():
    candidates = candidate_sets(320, flip=True, rotate=True)
    mirror, turns, scales = candidates[0], candidates[1], candidates[3]
    assert (mirror.scales, mirror.flip, mirror.rotate) == ((320,), True, False) and turns.rotate
    with_mirror = TTAConfig(scales=scales.scales, flip=True, merge="vote")

    def tune(values):
        asked = []

        def evaluate(tta):
            asked.append(tta)
            return {"AP": values.get(tta, 0.40) if tta is not None else 0.40}
        chosen, rows = choose_tta(evaluate, candidates, margin=0.01)
        return chosen, rows, asked
    chosen, rows, asked = tune({mirror: 0.43, turns: 0.45, scales: 0.50, with_mirror: 0.52})
    assert chosen == with_mirror and rows[-1] == {"tta": with_mirror.describe(), "AP": 0.52}
    assert not any(tta is not None and tta.rotate and len(tta.scales) > 1 for tta in asked)   # never 8x the passes
    # the scale set with the mirror must beat the scale set by the margin, as any set must beat single scale
    chosen, _, _ = tune({mirror: 0.43, scales: 0.50, with_mirror: 0.505})
    assert chosen is scales
    # the mirror alone did not beat single scale by the margin (the turns did): nothing is added
    chosen, _, asked = tune({mirror: 0.405, turns: 0.45, scales: 0.50})
    assert chosen is scales and len(asked) == len(candidates) + 1
    # the winner is not a scale set: nothing to add to
    chosen, _, asked = tune({mirror: 0.43, turns: 0.55, scales: 0.50})
    assert chosen is turns and len(asked) == len(candidates) + 1


# -- the one-class warm-up ---------------------------------------------------------------------------------

def test_background_windows_stay_away_from_boxes():
    data = make_data([[[0, 0, 40, 40], [60, 60, 100, 100]]], hw=(200, 200))
    g = torch.Generator().manual_seed(0)
    images, windows = background_windows(g, 20, data, torch.tensor([30.0]))
    assert float(box_iou(windows, torch.tensor([[0.0, 0, 40, 40], [60, 60, 100, 100]])).max()) < 0.1


def test_one_class_warm_up_learns_object_against_background():
    """Bright squares on dark noise, one class: with background crops the warm-up has a task, and its loss
    falls below chance (the entropy of the crops' labels, ln 2)."""
    rng = np.random.default_rng(0)
    images, records = [], []
    for i in range(6):
        pixels = torch.from_numpy((rng.random((3, 96, 96)) * 80).astype(np.uint8))
        boxes = squares(rng, 2, 14, 22, size=96)
        for x1, y1, x2, y2 in boxes:
            pixels[:, int(y1):int(y2), int(x1):int(x2)] = 230
        images.append(pixels)
        records.append(ImageRecord(f"{i}.png", i + 1, 96, 96, np.array(boxes, np.float32), np.zeros(2, np.int64)))
    data = DetectionData(records, ["square"], None, "squares")
    torch.manual_seed(0)
    trunk = ResNet(18, norm="bn", frozen_stages=0, out_features=("res3", "res4", "res5"))
    stats = pretrain_backbone(trunk, lambda i: images[i], data, torch.zeros(3), torch.ones(3), lr=2e-3,
                              weight_decay=1e-4, batch_size=16, crop_sizes=(32,), iterations=12, seed=0)
    assert stats["background"] == 0.5 and stats["chance_loss"] == pytest.approx(np.log(2))
    assert stats["loss"] < 0.8 * stats["chance_loss"], stats


def test_tta_choice_needs_a_tune_split():
    with pytest.raises(ConfigError, match="tune split"):
        apply_overrides(Config(), ["test.tta_choose=true", "data.format=coco"])
    apply_overrides(Config(), ["test.tta_choose=true", "data.format=coco", "data.tune_fraction=0.1"])


def test_tiles_are_resized_as_the_evaluation_images(tmp_path):
    Image.fromarray(np.zeros((100, 160, 3), np.uint8)).save(tmp_path / "0.png")
    data = make_data([[[10, 10, 30, 30]]], hw=(100, 160))
    data.records[0].file_name = str(tmp_path / "0.png")
    tiles = TiledDataset(data, 64, 16, scale_as=(50, 50))
    assert all(tiles[i][1]["resize_as"] == (50, 50) for i in range(len(tiles)))
    assert "resize_as" not in TiledDataset(data, 64, 16)[0][1]

"""`densedet analyze`: statistics on hand-made datasets whose answers are worked out by hand."""

import argparse
import json

import numpy as np
import pytest
import torch
import yaml

from densedet import analysis as A
from densedet.commands import analyze as AN
from densedet.config import Config, ConfigError, DataConfig, to_dict
from densedet.data import DatasetError, DetectionData, ImageRecord
from densedet.models import build_from_config


def tiny_config() -> Config:
    """One square anchor per position, base sizes 21 / 42 / 84 at strides 8 / 16 / 32, 128x128 input.

    At P3 (16x16 positions) the anchor at cell (4, 4) is centred on (32, 32): [21.5, 21.5, 42.5, 42.5].
    """
    cfg = Config()
    m = cfg.model
    m.backbone, m.num_classes = "resnet18", 2
    m.retinanet.min_level, m.retinanet.max_level = 3, 5
    m.anchor_sizes, m.retinanet.scales_per_octave, m.aspect_ratios = [21.0, 42.0, 84.0], 1, [1.0]
    m.fixed_size, m.size_divisible = [128, 128], 128
    m.retinanet.fpn_channels, m.retinanet.head_convs = 16, 1
    return cfg


EXACT_BOX = [21.5, 21.5, 42.5, 42.5]     # equal to one P3 anchor
TINY_BOX = [62.0, 62.0, 66.0, 66.0]      # 4x4


def two_images() -> DetectionData:
    return DetectionData([ImageRecord("a.png", 1, 128, 128, [EXACT_BOX], [0]),
                          ImageRecord("b.png", 2, 128, 128, [TINY_BOX], [1])], ["cat", "dog"], None, "hand-made")


@pytest.fixture(scope="module")
def tiny_setup():
    cfg = tiny_config()
    return cfg, A.anchor_setup(build_from_config(cfg.model))


def test_anchor_counts_of_a_box_equal_to_an_anchor(tiny_setup):
    # 16² + 8² + 4² = 336 anchors. The equal anchor: IoU 1 -> foreground.
    # Its 4 neighbours at P3 are shifted by one stride (8 px): IoU = (21-8)·21 / (2·441 - 13·21) = 13/29 = 0.448
    #   -> ignored (0.4 <= IoU < 0.5). Diagonal neighbours: 169 / 713 = 0.237 -> background.
    # P4 (size 42) and P5 (84) anchors: at most 441/1764 = 0.25 -> background.
    cfg, setup = tiny_setup
    images = A.prepare_images(two_images(), setup.preprocessor, [0])
    stats = A.anchor_statistics(setup, images)
    per = stats["per_image"]
    assert (per["anchors"], per["foreground"], per["ignored"], per["background"]) == ([336], [1], [4], [331])
    assert stats["coverage"]["below_fg"] == 0.0
    assert stats["coverage"]["mean_best_iou"] == pytest.approx(1.0)
    assert stats["background_per_foreground"] == 331.0


def test_tiny_box_matches_no_anchor_at_05_but_keeps_its_tied_best_anchors(tiny_setup):
    # A P3 anchor contains the 4x4 box when its centre c satisfies c - 10.5 <= 62 and 66 <= c + 10.5,
    # i.e. c in {56, 64, 72} on each axis: 9 anchors, all with IoU 16/441. Low-quality matching keeps
    # all tied best anchors -> 9 foreground, nothing in the ignore band, 327 background.
    cfg, setup = tiny_setup
    stats = A.anchor_statistics(setup, A.prepare_images(two_images(), setup.preprocessor))
    per = stats["per_image"]
    assert per["foreground"] == [1, 9] and per["ignored"] == [4, 0] and per["background"] == [331, 327]
    cov = stats["coverage"]
    assert cov["below_fg"] == 0.5 and cov["below_bg"] == 0.5
    by = {row["bin"]: row for row in cov["by_size"]}
    assert by["0-16"]["boxes"] == 1 and by["0-16"]["below_fg"] == 1.0        # the tiny box (size 4)
    assert by["0-16"]["mean_best_iou"] == pytest.approx(16 / 441, rel=1e-5)
    assert by["16-32"]["boxes"] == 1 and by["16-32"]["below_fg"] == 0.0      # the exact box (size 21)
    assert by["0-16"]["not_assigned"] == 0.0                                # kept by the low-quality rule
    assert stats["boxes_not_assigned"] == 0.0
    assert stats["anchors_per_box_mean"] == 5.0                             # (1 + 9) / 2


def test_without_low_quality_matches_the_tiny_box_gets_no_anchor():
    cfg = tiny_config()
    cfg.model.retinanet.allow_low_quality_matches = False
    setup = A.anchor_setup(build_from_config(cfg.model))
    stats = A.anchor_statistics(setup, A.prepare_images(two_images(), setup.preprocessor))
    assert stats["per_image"]["foreground"] == [1, 0]
    assert stats["boxes_not_assigned"] == 0.5
    assert stats["images_without_foreground"] == 1


def test_candidates_report_coverage_of_other_anchor_sizes(tiny_setup):
    # base sizes x 0.25 -> 5.25 at P3; a 5.25 anchor at (64, 64) holds the 4x4 box: IoU 16 / 5.25² = 0.58.
    cfg, setup = tiny_setup
    images = A.prepare_images(two_images(), setup.preprocessor)
    out = A.candidate_coverage(cfg.model, {"x0.25": {"anchor_sizes": [5.25, 10.5, 21.0]},
                                           "ratios": {"aspect_ratios": [0.5, 1.0, 2.0]},
                                           "broken": {"anchor_sizes": [1.0]}}, images)
    small = out["x0.25"]["coverage"]
    assert small["by_size"][0]["below_fg"] == 0.0
    assert small["by_size"][0]["mean_best_iou"] == pytest.approx(16 / 5.25 ** 2, rel=1e-5)
    assert small["below_fg"] == 0.0          # the exact box still finds its 21-px anchor at P5
    assert out["ratios"]["anchors_per_location"] == 3
    assert out["ratios"]["anchors_per_image_mean"] == 3 * 336
    assert "error" in out["broken"] and "anchor_sizes" in out["broken"]["error"]


def test_default_candidates_include_data_ratios():
    cfg = tiny_config()
    cands = A.default_candidates(cfg.model, np.array([0.5, 1.0, 1.0, 2.0, 4.0]))
    assert cands["sizes x0.5"] == {"anchor_sizes": [10.5, 21.0, 42.0]}
    assert cands["ratios from data"]["aspect_ratios"] == [0.7, 1.0, 3.2]   # 10th/50th/90th percentiles
    default = Config().model                                                  # None -> 32·2^(l-3)
    assert A.default_candidates(default)["sizes x0.5"]["anchor_sizes"] == [16, 32, 64, 128, 256]


@pytest.mark.parametrize("hw", [(100, 150), (150, 100), (37, 300), (64, 64), (201, 99)])
def test_resized_size_and_anchors_agree_with_the_model(hw):
    cfg = tiny_config()
    cfg.model.fixed_size, cfg.model.min_size, cfg.model.max_size, cfg.model.size_divisible = None, 64, 200, 32
    model = build_from_config(cfg.model).eval()
    setup = A.anchor_setup(model)
    h, w = hw
    batch, sizes, _ = model.preprocessor([torch.zeros(3, h, w)])
    assert A.resized_image_size(model.preprocessor, h, w) == sizes[0]
    data = DetectionData([ImageRecord("x.png", 1, h, w, [[1, 2, 10, 20]], [0])], ["a", "b"], None, "x")
    (im,) = A.prepare_images(data, setup.preprocessor)
    assert im.padded == tuple(batch.shape[-2:])
    assert im.boxes[0].tolist() == pytest.approx([1 * sizes[0][1] / w, 2 * sizes[0][0] / h,
                                                  10 * sizes[0][1] / w, 20 * sizes[0][0] / h])
    with torch.no_grad():
        _, anchors = model.dense_forward(batch)
    assert torch.equal(setup.anchors(im.padded), torch.cat(anchors))


def test_dataset_statistics_by_hand():
    data = DetectionData([
        ImageRecord("a.png", 1, 100, 200, [[0, 0, 10, 40], [0, 0, 30, 30], [5, 5, 9, 9]], [0, 1, 1],
                    iscrowd=[False, False, True]),
        ImageRecord("b.png", 2, 100, 200, [], []),
        ImageRecord("c.png", 3, 50, 60, [[0, 0, 20, 5]], [1]),
    ], ["a", "b"], None, "hand")
    s = A.dataset_statistics(data)
    assert (s["images"], s["images_without_boxes"], s["boxes"], s["crowd_boxes"]) == (3, 1, 4, 1)
    assert s["boxes_per_image"]["mean"] == pytest.approx(4 / 3)
    # non-crowd boxes: 10x40 (size 20, h/w 4), 30x30 (30, 1), 20x5 (10, 0.25)
    assert s["box_size"]["p0"] == pytest.approx(10) and s["box_size"]["p50"] == pytest.approx(20)
    assert s["box_size"]["p100"] == pytest.approx(30)
    assert s["aspect_ratio"]["p50"] == pytest.approx(1.0) and s["aspect_ratio"]["p0"] == pytest.approx(0.25)
    assert s["class_counts"] == {"a": 1, "b": 2}
    assert s["image_sizes"][0] == {"height": 100, "width": 200, "images": 2}


def test_prepare_images_reads_missing_size_from_the_header_or_names_the_file(tmp_path):
    from PIL import Image
    Image.new("RGB", (40, 30)).save(tmp_path / "img.png")
    data = DetectionData([ImageRecord(str(tmp_path / "img.png"), 7, None, None, [[0, 0, 4, 4]], [0])],
                         ["a"], None, "ann.json")
    cfg = tiny_config()
    cfg.model.fixed_size = None
    cfg.model.min_size, cfg.model.max_size = 60, 1000
    setup = A.anchor_setup(build_from_config(cfg.model))
    (im,) = A.prepare_images(data, setup.preprocessor)
    assert im.resized == (60, 80)
    data.records[0].file_name = str(tmp_path / "missing.png")
    with pytest.raises(DatasetError, match="missing.png.*id 7"):
        A.prepare_images(data, setup.preprocessor)


def _coco(path, boxes_per_image):
    images, anns = [], []
    for i, boxes in enumerate(boxes_per_image, 1):
        images.append({"id": i, "file_name": f"{i}.png", "height": 128, "width": 128})
        for x1, y1, x2, y2 in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}))
    return str(path)


def test_load_split_reads_each_format(tmp_path):
    coco = _coco(tmp_path / "train.json", [[EXACT_BOX], [TINY_BOX, EXACT_BOX]])
    data = A.load_split(DataConfig(format="coco", train=coco))
    assert len(data) == 2 and data.class_names == ["cat", "dog"] and len(data.records[1]) == 2
    (tmp_path / "val.csv").write_text("image_path,x1,y1,x2,y2,label\nq.png,1,2,3,4,cat\nq.png,5,6,7,8,dog\n")
    data = A.load_split(DataConfig(format="csv", val=str(tmp_path / "val.csv")), "val")
    assert len(data) == 1 and data.records[0].boxes.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    (tmp_path / "voc").mkdir()
    (tmp_path / "voc" / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename><size><width>50</width><height>40</height><depth>3</depth></size>"
        "<object><name>cat</name><difficult>0</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax>"
        "<ymax>20</ymax></bndbox></object></annotation>")
    data = A.load_split(DataConfig(format="voc", train=str(tmp_path / "voc")))
    assert data.records[0].boxes.tolist() == [[0, 0, 10, 20]]
    with pytest.raises(ConfigError, match="data.val"):
        A.load_split(DataConfig(format="coco", train=coco), "val")
    with pytest.raises(DatasetError, match="nope.json"):
        A.load_split(DataConfig(format="coco", train=str(tmp_path / "nope.json")))


def test_load_split_digits_generates_the_scenes(tmp_path):
    data = A.load_split(DataConfig(format="digits", root=str(tmp_path / "digits"), num_train=2, num_val=1,
                                    num_tune=0), "val")
    assert len(data) == 1 and data.class_names == [str(d) for d in range(10)]
    assert data.records[0].height == 320 and len(data.records[0]) >= 2


def test_cli_writes_json_and_plots(tmp_path, capsys):
    cfg = tiny_config()
    cfg.data.format = "coco"
    cfg.data.train = _coco(tmp_path / "train.json", [[EXACT_BOX], [TINY_BOX]])
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    parser = argparse.ArgumentParser()
    AN.add_parser(parser.add_subparsers())
    args = parser.parse_args(["analyze", str(tmp_path / "cfg.yaml"), "model.num_classes=3",
                              "--out", str(tmp_path / "out"), "--no-candidates"])
    assert args.func(args) == 0
    out = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert out["dataset"]["boxes"] == 2
    assert out["anchors"]["per_image"]["foreground"] == [1, 9]
    assert out["anchors"]["coverage"]["below_fg"] == 0.5
    assert "candidates" not in out
    for name in ("box_sizes.png", "coverage_by_size.png", "imbalance_per_image.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "1 foreground : 66 background" in printed          # (331 + 327) / (1 + 9) = 65.8
    bad = parser.parse_args(["analyze", str(tmp_path / "cfg.yaml"), "model.nope=1"])
    with pytest.raises(ConfigError, match="model.nope"):   # densedet.cli.main turns it into exit code 2
        bad.func(bad)


def test_analyze_with_candidates_and_plots(tmp_path):
    result = A.analyze(tiny_config(), data=two_images(), log=lambda *_: None)
    cands = result["candidates"]
    assert cands["current"]["coverage"]["below_fg"] == 0.5
    assert {"sizes x0.5", "sizes x0.75", "4 scales/octave", "ratios 1:3..3:1"} <= set(cands)
    assert cands["4 scales/octave"]["anchors_per_location"] == 4
    sizes = result["anchors"].pop("_box_sizes")
    assert sorted(sizes.tolist()) == pytest.approx([4.0, 21.0])
    paths = AN.write_plots(result, sizes, tmp_path)
    assert all(p.stat().st_size > 1000 for p in paths)
    assert "boxes with best anchor IoU < 0.5:  50.0%" in AN.format_summary(result)


def test_crowd_boxes_are_not_counted_as_boxes_but_ignore_their_anchors(tiny_setup):
    # A crowd region over the right half: every non-foreground anchor lying at least half inside it is ignored
    # (the matcher's rule); the crowd box itself takes no part in coverage or box counts.
    cfg, setup = tiny_setup
    plain = DetectionData([ImageRecord("a.png", 1, 128, 128, [EXACT_BOX], [0])], ["cat", "dog"], None, "x")
    crowd = DetectionData([ImageRecord("a.png", 1, 128, 128, [EXACT_BOX, [64, 0, 128, 128]], [0, 1],
                                       iscrowd=[False, True])], ["cat", "dog"], None, "x")
    a = A.anchor_statistics(setup, A.prepare_images(plain, setup.preprocessor))
    b = A.anchor_statistics(setup, A.prepare_images(crowd, setup.preprocessor))
    assert b["boxes"] == a["boxes"] == 1 and b["coverage"]["below_fg"] == 0.0
    assert b["per_image"]["foreground"] == [1]
    # Brute force over the anchors: intersection with the crowd region / anchor area >= 0.5, not already
    # foreground or ignored in the plain image (the 5 around the exact box lie far left of x = 64).
    anchors = setup.anchors((128, 128)).double().numpy()
    inter_w = np.clip(np.minimum(anchors[:, 2], 128) - np.maximum(anchors[:, 0], 64), 0, None)
    inter_h = np.clip(np.minimum(anchors[:, 3], 128) - np.maximum(anchors[:, 1], 0), 0, None)
    area = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    inside = int((inter_w * inter_h / area >= 0.5).sum())
    assert inside > 50
    assert b["per_image"]["ignored"][0] - a["per_image"]["ignored"][0] == inside


def test_a_pixel_budget_analyses_fewer_large_images_evenly_spaced():
    """Matching costs anchors x boxes: with ``max_pixels`` the analysis takes no more images than hold
    that many model pixels (each of these is 128 x 128 = 16384), evenly spaced, and at least one."""
    data = DetectionData([ImageRecord(f"{i}.png", i + 1, 128, 128, [EXACT_BOX], [0]) for i in range(10)],
                         ["cat", "dog"], None, "hand-made")
    quiet = {"candidates": False, "data": data, "log": lambda *_: None}
    assert A.analyze(tiny_config(), **quiet)["anchors"]["images"] == 10
    assert A.analyze(tiny_config(), max_pixels=10 * 16384, **quiet)["anchors"]["images"] == 10
    assert A.analyze(tiny_config(), max_pixels=3 * 16384, **quiet)["anchors"]["images"] == 3
    assert A.analyze(tiny_config(), max_pixels=100, **quiet)["anchors"]["images"] == 1

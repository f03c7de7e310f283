"""Predictor: input types, tiling, precision choice; ``densedet predict`` end to end."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import densedet.device
from densedet.commands.predict import add_parser, expand_inputs, progress_bar
from densedet.errors import UsageError
from densedet.predict import Predictor, cpu_has_fast_bf16, fast_autocast, merge_tiles, to_image_tensor
from densedet.visualize import draw_detections
from densedet.tta import FLIP_ONLY, TTAConfig
from test_tta import BrightBoxModel, scene


def tiny_checkpoint(path, category_ids=None, num_classes=3, tiles=(0, 128)):
    """A small random-weight RetinaNet R18 checkpoint whose scores start near 0.1 (so it detects things),
    trained (so its config says) on ``tiles`` = (data.tile_size, data.tile_overlap)."""
    from densedet.config import Config, to_dict
    from densedet.engine.checkpoint import CHECKPOINT_FORMAT, atomic_save
    from densedet.models import build_from_config
    cfg = Config()
    cfg.data.tile_size, cfg.data.tile_overlap = tiles
    m = cfg.model
    m.backbone, m.num_classes, m.retinanet.fpn_channels, m.retinanet.head_convs = "resnet18", num_classes, 16, 1
    m.min_size, m.max_size, m.retinanet.prior_prob, m.score_thresh, m.detections_per_img = 64, 128, 0.1, 0.05, 20
    torch.manual_seed(0)
    model = build_from_config(m)
    atomic_save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": to_dict(cfg),
                 "class_names": [f"class{i}" for i in range(num_classes)], "category_ids": category_ids,
                 "iteration": 0}, path)
    return path


def rgb(h, w, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# -- precision ------------------------------------------------------------------------------------

def test_cpu_bf16_detection_reads_cpuinfo_flags(tmp_path):
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor : 0\nflags : fpu sse avx avx2 fma\n")
    amx = tmp_path / "amx"
    amx.write_text("processor : 0\nflags : fpu avx2 avx512f amx_bf16 amx_tile\n")
    avx512bf16 = tmp_path / "avx512bf16"
    avx512bf16.write_text("flags : avx512f avx512_bf16\n")
    assert not cpu_has_fast_bf16(str(avx2))
    assert cpu_has_fast_bf16(str(amx)) and cpu_has_fast_bf16(str(avx512bf16))


def test_fast_autocast_picks_bf16_only_where_fast(monkeypatch):
    monkeypatch.setattr(densedet.device, "cpu_has_fast_bf16", lambda: False)
    with fast_autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(densedet.device, "cpu_has_fast_bf16", lambda: True)
    with fast_autocast("cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with fast_autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="precision"):
        fast_autocast("cpu", "fp16")


# -- inputs ---------------------------------------------------------------------------------------

def test_to_image_tensor_accepts_every_input_kind(tmp_path):
    array = rgb(20, 30)
    expected = torch.from_numpy(array).permute(2, 0, 1)
    path = tmp_path / "a.png"
    Image.fromarray(array).save(path)
    for value in (str(path), path, Image.fromarray(array), array, expected.clone()):
        out = to_image_tensor(value)
        assert out.dtype == torch.uint8 and torch.equal(out, expected)
    gray = to_image_tensor(array[:, :, 0])
    assert gray.shape == (3, 20, 30) and torch.equal(gray[1], expected[0])
    rgba = np.concatenate([array, np.full((20, 30, 1), 7, np.uint8)], axis=2)
    assert torch.equal(to_image_tensor(rgba), expected)
    assert to_image_tensor(array.astype(np.float32) / 255).dtype == torch.float32
    with pytest.raises(ValueError, match="image 4"):
        to_image_tensor(torch.zeros(1, 5, 5), 4)
    with pytest.raises(ValueError, match="dtype"):
        to_image_tensor(array.astype(np.int32))
    with pytest.raises(TypeError, match="unsupported"):
        to_image_tensor(3)


def test_predictor_gives_the_same_detections_for_every_input_kind(tmp_path):
    array = rgb(48, 64, seed=1)
    path = tmp_path / "img.png"
    Image.fromarray(array).save(path)
    # batch_size 1: every input goes through an identical forward pass (batch composition can
    # change the last bits of a convolution)
    # fp32: precision "auto" runs bf16 on CPUs with AMX or AVX512-BF16, and the direct call below is fp32
    predictor = Predictor.from_checkpoint(tiny_checkpoint(tmp_path / "tiny.pt"), batch_size=1, precision="fp32")
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    outs = predictor([str(path), Image.fromarray(array), array, tensor, tensor.float() / 255])
    assert outs[0]["boxes"].shape[0] > 0
    for out in outs[1:]:
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(out[key], outs[0][key])
    # the same as calling the model directly in fp32
    with torch.inference_mode():
        direct = predictor.model([tensor.float() / 255])[0]
    assert torch.equal(direct["boxes"], outs[0]["boxes"])
    # one image (not a list) gives a list of one
    assert len(predictor(array)) == 1


def test_predictor_score_thresh_overrides_the_checkpoint(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    image = rgb(48, 64, seed=2)
    low = Predictor(ckpt, score_thresh=0.01)(image)[0]
    high = Predictor(ckpt, score_thresh=0.5)(image)[0]
    assert low["scores"].numel() > 0 and high["scores"].numel() == 0


def test_predictor_with_tta_maps_boxes_back():
    image = scene(64, 96, {0: (8, 16, 40, 48)})
    predictor = Predictor(BrightBoxModel(min_size=64), tta=TTAConfig(scales=(64, 128, 32), flip=True, merge="nms"))
    (det,) = predictor(image)
    assert det["boxes"].tolist() == [[8.0, 16.0, 40.0, 48.0]]


# -- tiling ---------------------------------------------------------------------------------------

def test_object_split_by_a_tile_border_is_reported_once_in_image_coordinates():
    # 200x300 image, 128 px tiles with 64 px overlap: x starts 0, 64, 128, 172; y starts 0, 64, 72.
    # The red object [100, 30, 150, 60] is cut by tile (0, 0)'s right border and tile (128, 0)'s left
    # border and seen whole by tile (64, 0). Green sits inside one tile, blue in the bottom-right corner.
    rects = {0: (100, 30, 150, 60), 1: (10, 140, 40, 180), 2: (260, 170, 300, 200)}
    image = scene(200, 300, rects)
    model = BrightBoxModel(min_size=128)
    (det,) = Predictor(model, tile_size=128, tile_overlap=64, batch_size=5)(image)
    got = {int(l): b for l, b in zip(det["labels"].tolist(), det["boxes"].tolist())}
    assert got == {c: list(map(float, r)) for c, r in rects.items()}
    assert all(call[-2:] == (128, 128) for call in model.calls)      # tiles at their own size
    assert sum(call[0] for call in model.calls) == 12                  # 4 x 3 tiles


def test_evaluation_tiles_an_image_larger_than_the_training_tiles(tmp_path):
    """A model trained on tiles (data.tile_size) is scored as it predicts: the same tiles, merged."""
    from densedet.config import DataConfig
    from densedet.data import DetectionData, ImageRecord
    from densedet.engine.evaluate import eval_tiles, evaluate_model, predict_dataset
    rects = {0: (100, 30, 150, 60), 1: (10, 140, 40, 180), 2: (260, 170, 300, 200)}
    Image.fromarray((scene(200, 300, rects) * 255).byte().permute(1, 2, 0).numpy()).save(tmp_path / "photo.png")
    boxes = np.array(list(rects.values()), np.float32)
    data = DetectionData([ImageRecord(str(tmp_path / "photo.png"), 1, 200, 300, boxes, np.arange(3))],
                         ["r", "g", "b"], None, "scene")
    assert eval_tiles(DataConfig()) is None and eval_tiles(DataConfig(tile_size=128, tile_overlap=64)) == (128, 64)
    model = BrightBoxModel(min_size=128, max_size=128)
    results = predict_dataset(model, data, batch_size=5, tiles=(128, 64))
    assert {r["category_id"] - 1: [x1, y1, x1 + w, y1 + h] for r in results           # category ids 1..3
            for x1, y1, w, h in [r["bbox"]]} == {c: list(map(float, b)) for c, b in rects.items()}
    assert all(call[-2:] == (128, 128) for call in model.calls)      # never the whole photo, shrunk
    assert evaluate_model(model, data, batch_size=5, tiles=(128, 64))["AP"] == pytest.approx(1.0)
    whole = predict_dataset(BrightBoxModel(min_size=128, max_size=128), data, batch_size=5)
    assert {r["category_id"]: r["bbox"] for r in whole} != {r["category_id"]: r["bbox"] for r in results}


def test_predictor_tiles_as_the_model_was_trained(tmp_path, capsys):
    tiled = tiny_checkpoint(tmp_path / "tiled.pt", tiles=(96, 24))
    whole = tiny_checkpoint(tmp_path / "whole.pt")

    def tiles(weights, **kwargs):
        predictor = Predictor(weights, **kwargs)
        return predictor.tile_size, predictor.tile_overlap

    assert tiles(tiled) == (96, 24) and tiles(tiled, tile_size=0) == (0, 128)
    assert tiles(tiled, tile_overlap=40) == (96, 40) and tiles(tiled, tile_size=256) == (256, 128)
    assert tiles(whole) == (0, 128) and tiles(whole, tile_size=64, tile_overlap=8) == (64, 8)
    with pytest.raises(ValueError, match="tile_overlap"):
        Predictor(tiled, tile_overlap=96)
    Image.fromarray(rgb(40, 40)).save(tmp_path / "x.png")
    assert run_cli(["predict", str(tmp_path / "x.png"), "--weights", str(tiled), "--out", str(tmp_path / "out")]) == 0
    assert "tiles as trained: 96 px (data.tile_size), overlap 24 px" in capsys.readouterr().err
    with pytest.raises(UsageError, match="--tile-overlap"):
        run_cli(["predict", str(tmp_path / "x.png"), "--weights", str(tiled), "--out", str(tmp_path / "out"),
                 "--tile-overlap", "100"])


def test_merge_tiles_needs_the_containment_step():
    windows = [(0, 0, 128, 128), (64, 0, 192, 128), (128, 0, 256, 128)]
    dets = [
        {"boxes": torch.tensor([[100.0, 30, 128, 60]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])},
        {"boxes": torch.tensor([[36.0, 30, 86, 60]]), "scores": torch.tensor([0.6]), "labels": torch.tensor([0])},
        {"boxes": torch.tensor([[0.0, 30, 22, 60], [0.0, 30, 22, 60]]), "scores": torch.tensor([0.8, 0.7]),
         "labels": torch.tensor([0, 1])},
    ]
    merged = merge_tiles(dets, windows, (128, 256), iou_threshold=0.5)
    # the two red parts go (contained in the whole red box from tile 2); the cut box of class 1
    # stays: no larger box of its own class covers it
    assert merged["boxes"].tolist() == [[128.0, 30, 150, 60], [100.0, 30, 150, 60]]
    assert merged["labels"].tolist() == [1, 0]
    assert merged["scores"].tolist() == pytest.approx([0.7, 0.6])
    # without the containment step NMS alone gets it wrong: the higher-scoring left part (IoU 28/50
    # with the whole) suppresses the whole box and the right part (IoU 22/50) survives as well
    unmerged = merge_tiles(dets, windows, (128, 256), contain_threshold=1.5)
    red = unmerged["boxes"][unmerged["labels"] == 0].tolist()
    assert red == [[100.0, 30, 128, 60], [128.0, 30, 150, 60]]
    # a box touching the image border (not a tile border) is never treated as cut
    edge = merge_tiles([{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "scores": torch.tensor([0.5]),
                         "labels": torch.tensor([0])},
                        {"boxes": torch.tensor([[0.0, 0, 30, 30]]), "scores": torch.tensor([0.4]),
                         "labels": torch.tensor([0])}], [(0, 0, 64, 64), (0, 0, 64, 64)], (64, 64), 0.5)
    assert edge["boxes"].shape[0] == 2


def test_large_aerial_size_image_is_tiled_with_real_model(tmp_path):
    predictor = Predictor.from_checkpoint(tiny_checkpoint(tmp_path / "tiny.pt"), tile_size=256, tile_overlap=64,
                                          batch_size=8)
    image = torch.zeros(3, 2472 // 4, 2299 // 4, dtype=torch.uint8)         # 618 x 574
    (det,) = predictor(image)
    assert det["boxes"].shape[0] > 20                                       # more than one tile's cap
    assert (det["boxes"][:, 2] <= 574 + 1e-3).all() and (det["boxes"][:, 3] <= 618 + 1e-3).all()
    assert (det["boxes"][:, 2] > 256).any() and (det["boxes"][:, 3] > 256).any()


# -- command line ---------------------------------------------------------------------------------

def test_expand_inputs_files_folders_globs(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("b.png", "a.jpg", "notes.txt"):
        (folder / name).write_bytes(b"x")
    single = tmp_path / "c.png"
    single.write_bytes(b"x")
    files = expand_inputs([str(single), str(folder), str(folder / "*.png")])
    assert files == [single, folder / "a.jpg", folder / "b.png"]
    with pytest.raises(FileNotFoundError, match="missing.png"):
        expand_inputs([str(tmp_path / "missing.png")])
    with pytest.raises(FileNotFoundError, match="matches no image"):
        expand_inputs([str(tmp_path / "*.gif")])


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_reports_counts_on_a_terminal_only():
    stream = _Terminal()
    with progress_bar(3, stream=stream, mininterval=0) as bar:
        for _ in range(3):
            bar.update()
    frames = [f for f in stream.getvalue().replace("\n", "\r").split("\r") if f.strip()]
    assert frames[-1].startswith("predict") and "3/3" in frames[-1]
    assert any("1/3" in f for f in frames)
    log = io.StringIO()                        # not a terminal (a log file, a pipe): no bar at all
    with progress_bar(3, stream=log) as bar:
        bar.update(3)
    assert log.getvalue() == ""


def test_draw_detections_respects_the_threshold():
    image = torch.zeros(3, 60, 80, dtype=torch.uint8)
    det = {"boxes": torch.tensor([[5.0, 25, 30, 40], [50, 35, 75, 55]]), "scores": torch.tensor([0.9, 0.1]),
           "labels": torch.tensor([0, 1])}
    drawn = np.asarray(draw_detections(image, det, ["cat", "dog"], score_thresh=0.3))
    assert drawn.shape == (60, 80, 3)
    assert drawn[25:41, 5:31].any()            # the 0.9 box (and its label above it) is drawn
    assert not drawn[35:60, 45:80].any()       # around the 0.1 box nothing is


def test_draw_detections_on_a_16_bit_picture_keeps_its_grey():
    picture = Image.fromarray(np.full((40, 50), 257 * 90, np.uint16))
    drawn = np.asarray(draw_detections(picture, {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                                                 "labels": torch.zeros(0, dtype=torch.long)}))
    assert drawn.shape == (40, 50, 3) and (drawn == 90).all()       # PIL's convert("RGB") gives 255


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="densedet")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def assert_saved_detections_match(results, image_id, expected, category_ids):
    """``detections.json`` records of one image equal a Predictor's output: boxes (COCO xywh back to xyxy)
    within 1e-3 px, scores within 1e-5, labels mapped back from the category ids, in the same order."""
    saved = [r for r in results if r["image_id"] == image_id]
    assert len(saved) == len(expected["scores"]) > 0
    xywh = np.array([r["bbox"] for r in saved], dtype=np.float64).reshape(-1, 4)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    np.testing.assert_allclose(xyxy, expected["boxes"].double().numpy(), rtol=0, atol=1e-3)
    np.testing.assert_allclose([r["score"] for r in saved], expected["scores"].double().numpy(), rtol=0, atol=1e-5)
    assert [category_ids.index(r["category_id"]) for r in saved] == expected["labels"].tolist()


def test_cli_predict_end_to_end(tmp_path, capsys):
    category_ids = [5, 7, 9]
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt", category_ids=category_ids)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(rgb(48, 64, seed=3)).save(folder / "one.png")
    Image.fromarray(rgb(40, 40, seed=4)).save(folder / "two.jpg")
    out = tmp_path / "out"
    # fp32 on both sides: "auto" would pick bf16 on CPUs with fast bf16, and the comparison must be exact
    assert run_cli(["predict", str(folder), "--weights", str(ckpt), "--out", str(out),
                    "--score-thresh-draw", "0.05", "--batch-size", "1", "--precision", "fp32"]) == 0
    results = json.loads((out / "detections.json").read_text())
    images = json.loads((out / "images.json").read_text())
    assert [r["file_name"] for r in images] == [str(folder / "one.png"), str(folder / "two.jpg")]
    assert [r["id"] for r in images] == [1, 2]
    assert {r["image_id"] for r in results} == {1, 2}
    assert {r["category_id"] for r in results} <= {5, 7, 9}
    assert all(len(r["bbox"]) == 4 and 0 < r["score"] <= 1 for r in results)
    # the saved detections are the predictor's: boxes, scores and labels, image by image
    predictor = Predictor.from_checkpoint(ckpt, batch_size=1, precision="fp32")
    for image_id, name in ((1, "one.png"), (2, "two.jpg")):
        expected = predictor([folder / name])[0]
        assert_saved_detections_match(results, image_id, expected, category_ids)
    for name, size in (("one.png", (64, 48)), ("two.png", (40, 40))):
        with Image.open(out / name) as drawn:
            assert drawn.size == size
    original = np.asarray(Image.open(folder / "one.png"))
    assert (np.asarray(Image.open(out / "one.png")) != original).any()      # boxes were drawn
    assert "detections" in capsys.readouterr().out
    # a different drawing threshold, TTA or tiling: detections.json still written; drawing changes nothing saved
    out2 = tmp_path / "out2"
    assert run_cli(["predict", str(folder / "one.png"), "--weights", str(ckpt), "--out", str(out2),
                    "--score-thresh-draw", "0.99", "--precision", "fp32"]) == 0
    first = [r for r in results if r["image_id"] == 1]
    assert json.loads((out2 / "detections.json").read_text()) == first
    # TTA + tiling: the saved detections are those of a Predictor built with the same TTA and tile settings
    out3 = tmp_path / "out3"
    assert run_cli(["predict", str(folder / "*.png"), "--weights", str(ckpt), "--out", str(out3), "--tta", "flip",
                    "--tile", "32", "--tile-overlap", "8", "--precision", "fp32"]) == 0
    tiled = Predictor.from_checkpoint(ckpt, tile_size=32, tile_overlap=8, batch_size=4, precision="fp32",
                                      tta=FLIP_ONLY)
    expected = tiled([folder / "one.png"])[0]
    untiled = Predictor.from_checkpoint(ckpt, precision="fp32")([folder / "one.png"])[0]
    same = expected["boxes"].shape == untiled["boxes"].shape and torch.equal(expected["boxes"], untiled["boxes"])
    assert not same                                                  # the TTA and tile settings do change the result
    assert_saved_detections_match(json.loads((out3 / "detections.json").read_text()), 1, expected, category_ids)


def test_cli_rejects_bad_tiling_and_missing_inputs(tmp_path):
    ckpt = tmp_path / "none.pt"
    with pytest.raises(UsageError, match="tile-overlap"):
        run_cli(["predict", "x.png", "--weights", str(ckpt), "--out", str(tmp_path), "--tile", "32",
                 "--tile-overlap", "64"])
    with pytest.raises(FileNotFoundError, match="x.png"):
        run_cli(["predict", str(tmp_path / "x.png"), "--weights", str(ckpt), "--out", str(tmp_path)])

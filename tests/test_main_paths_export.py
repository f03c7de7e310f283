"""``densedet export`` of a model without ``fixed_size`` ("fit" resize: keep the aspect ratio, pad
bottom/right): the graph gives PyTorch's detections, ``--score-thresh`` keeps the ones above it,
``--static-batch`` fixes the batch axis, and ``default_export_size`` picks the input size.
The comparison policy is ``test_export``'s (``_assert_same_detections``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from densedet.cli import main
from densedet.config import to_dict
from densedet.data import load_coco
from densedet.engine.checkpoint import CHECKPOINT_FORMAT, atomic_save, model_from_checkpoint
from densedet.export import default_export_size, sidecar_path
from densedet.models import build_from_config

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from test_export import _assert_same_detections, _calibrate_retinanet, _match, _spread_scores  # noqa: E402


def _images(digit_scenes) -> list[torch.Tensor]:
    """Two 128 px scenes and a 128x96 crop of one (fit mode pads it to the right)."""
    data = load_coco(digit_scenes["val_json"], digit_scenes["val_images"])
    from densedet.data import load_image
    scenes = [load_image(r.file_name).float() / 255 for r in data.records[:2]]
    return scenes + [scenes[1][:, :, :96].contiguous()]


@pytest.fixture(scope="module")
def fit_checkpoint(make_tiny_config, digit_scenes, tmp_path_factory):
    """A tiny RetinaNet (min_size = max_size = 128, size_divisible 64, no fixed_size) whose head is
    set up to give ~100 varied scores above its threshold per image, saved as a checkpoint."""
    root = tmp_path_factory.mktemp("fit_export")
    cfg = make_tiny_config(root / "run")
    cfg.model.score_thresh, cfg.model.detections_per_img = 0.05, 50
    torch.manual_seed(0)
    model = build_from_config(cfg.model).eval()
    assert model.preprocessor.fixed_size is None
    _spread_scores(model, _images(digit_scenes), _calibrate_retinanet, per_image=100)
    path = root / "fit.pt"
    atomic_save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": to_dict(cfg),
                 "class_names": [str(i) for i in range(10)], "category_ids": list(range(1, 11)), "iteration": 0},
                path)
    return path


def _export(weights, out, *flags) -> dict:
    assert main(["export", "--weights", str(weights), "--out", str(out), *flags]) == 0
    return json.loads(sidecar_path(out).read_text())


def _reference(weights, images, **overrides):
    model, _, _ = model_from_checkpoint(weights, **overrides)
    with torch.no_grad():
        batch, sizes, _ = model.preprocessor(images)
        return model, batch, sizes, model.postprocess(*model.dense_forward(batch), sizes)


def _run(path, batch, sizes):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": batch.numpy(), "image_sizes": np.asarray(sizes, np.float32)})


@pytest.fixture(scope="module")
def fit_export(fit_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "fit.onnx"
    return out, _export(fit_checkpoint, out)


def test_default_export_size():
    from densedet.config import ModelConfig
    cfg = ModelConfig(backbone="resnet18", num_classes=2, min_size=100, max_size=200, size_divisible=64)
    assert default_export_size(build_from_config(cfg)) == (128, 128)        # 100 padded up to 64's multiple
    cfg.min_size, cfg.size_divisible = 128, 32
    assert default_export_size(build_from_config(cfg)) == (128, 128)        # already a multiple
    assert default_export_size(build_from_config(cfg), dynamic_size=True) == (1344, 1344)   # 1333 padded up
    cfg.max_size = 2000
    assert default_export_size(build_from_config(cfg), dynamic_size=True) == (2016, 2016)   # max_size padded up
    cfg.fixed_size = [96, 160]
    assert default_export_size(build_from_config(cfg)) == (96, 160)         # a fixed size wins


def test_fit_export_matches_pytorch(fit_checkpoint, fit_export, digit_scenes):
    out, side = fit_export
    # dynamic size by default, up to max(max_size, 1333) padded to size_divisible 64
    assert side["resize"] == "fit" and side["dynamic_size"] and side["input_size"] == [1344, 1344]
    images = _images(digit_scenes)
    _, batch, sizes, refs = _reference(fit_checkpoint, images)
    assert tuple(batch.shape[-2:]) == (128, 128) and [tuple(s) for s in sizes][2] == (128, 96)
    assert all(len(r["scores"]) > 10 for r in refs)                          # something to compare
    _assert_same_detections(refs, *_run(out, batch, sizes))


def test_fit_export_runner_maps_back_to_original_pixels(fit_checkpoint, fit_export, digit_scenes):
    """The torch-free runner's fit resize + padding on a 200x150 image gives the model's detections."""
    from densedet.onnx_runner import OnnxDetectorRunner
    out, _ = fit_export
    image = torch.nn.functional.interpolate(_images(digit_scenes)[0][None, :, :, :96], size=(200, 150),
                                            mode="bilinear", align_corners=False)[0]
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    model, _, _ = model_from_checkpoint(fit_checkpoint)
    with torch.no_grad():
        ref = model([pixels.float() / 255])[0]
    got = OnnxDetectorRunner(out)([pixels.permute(1, 2, 0).numpy()])[0]
    assert len(got["scores"]) == len(ref["scores"]) > 0
    missing, extra = _match(ref, got["boxes"], got["scores"], got["labels"])
    assert not missing and not len(extra)


def test_score_thresh_keeps_the_detections_above_it(fit_checkpoint, fit_export, tmp_path, digit_scenes):
    out, side = fit_export
    high = tmp_path / "high.onnx"
    high_side = _export(fit_checkpoint, high, "--score-thresh", "0.3")
    assert side["score_thresh"] == 0.05 and high_side["score_thresh"] == 0.3
    images = _images(digit_scenes)
    _, batch, sizes, refs = _reference(fit_checkpoint, images)
    low_boxes, low_scores, low_labels, low_n = _run(out, batch, sizes)
    boxes, scores, labels, n = _run(high, batch, sizes)
    above = [int((low_scores[i, :low_n[i]] > 0.3).sum()) for i in range(len(images))]
    assert list(n) == above and 0 < sum(above) < sum(low_n)                  # fewer, and not none
    for i in range(len(images)):
        assert (scores[i, :n[i]] > 0.3).all()
        keep = low_scores[i, :low_n[i]] > 0.3        # the same detections as the default export above 0.3
        ref = {"boxes": torch.from_numpy(low_boxes[i, :low_n[i]][keep]),
               "scores": torch.from_numpy(low_scores[i, :low_n[i]][keep]),
               "labels": torch.from_numpy(low_labels[i, :low_n[i]][keep])}
        missing, extra = _match(ref, boxes[i, :n[i]], scores[i, :n[i]], labels[i, :n[i]])
        assert not missing and not len(extra)
    # and PyTorch with the same threshold agrees
    _, _, _, refs_high = _reference(fit_checkpoint, images, score_thresh=0.3)
    _assert_same_detections(refs_high, boxes, scores, labels, n)


def test_static_batch_fixes_the_batch_axis(fit_checkpoint, fit_export, tmp_path, digit_scenes):
    def batch_dims(path):
        graph = onnx.load(str(path)).graph
        return [(v.type.tensor_type.shape.dim[0].dim_value, v.type.tensor_type.shape.dim[0].dim_param)
                for v in list(graph.input) + list(graph.output)]

    dynamic, _ = fit_export
    assert batch_dims(dynamic) == [(0, "batch")] * 6
    static = tmp_path / "static.onnx"
    _export(fit_checkpoint, static, "--static-batch", "--batch-size", "3")
    assert batch_dims(static) == [(3, "")] * 6
    _, batch, sizes, refs = _reference(fit_checkpoint, _images(digit_scenes))
    _assert_same_detections(refs, *_run(static, batch, sizes))
    with pytest.raises(Exception, match="(?i)dimension|shape|index"):       # any other batch size is refused
        _run(static, batch[:2], sizes[:2])

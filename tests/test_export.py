"""ONNX export: the graph gives PyTorch's detections; the torch-free runner maps them back.

Comparison policy (``_assert_same_detections``): per image, every PyTorch detection must have an
ONNX detection with the same label, score within 1e-4 and box within 1e-2 px, one-to-one, and the
counts must agree. Order is not compared: scores that differ by ~1e-7 (onnxruntime's convolutions
round differently) may swap near-equal neighbours, and ONNX TopK/NMS may order exact ties
differently. A near-tie NMS decision (an IoU within float rounding of the threshold) could in
principle keep a box on one side only; we allow no such case here (none occurred on these images)
so that a real post-processing bug cannot hide behind the tolerance — if one ever appears the
failure message lists the unmatched detections with their scores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import densedet
from densedet.commands.export import add_parser
from densedet.data import load_image
from densedet.export import OnnxDetector, export_onnx, onnx_nms, sidecar_path
from densedet.models import RefineDet
from densedet.models.preprocess import ImagePreprocessor

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

REPO = Path(__file__).resolve().parent.parent
RUNNER_FILE = REPO / "densedet" / "onnx_runner.py"
SCORE_TOL, BOX_TOL = 1e-4, 1e-2


def _deepforest_images() -> list[Path]:
    spec = importlib.util.find_spec("deepforest")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("deepforest (its sample aerial images) not installed")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    # two large crops (downscaled by the warp) and a 400x400 tile
    paths = [data / "2019_YELL_2_528000_4978000_image_crop2.png", data / "2019_YELL_2_541000_4977000_image_crop.png",
             data / "OSBS_029.png"]
    if not all(p.is_file() for p in paths):
        pytest.skip("deepforest sample images missing")
    return paths


def _load_runner_module():
    """densedet/onnx_runner.py loaded from its file, as a user who copied it would (no package import)."""
    spec = importlib.util.spec_from_file_location("standalone_onnx_runner", RUNNER_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def _spread_scores(model: nn.Module, images: list[torch.Tensor], logits_of, per_image: int = 300) -> None:
    """Make a random-weight head produce varied scores: Kaiming-initialised towers (the paper's
    N(0, 0.01) init gives nearly equal logits everywhere, i.e. score ties), then a class bias
    that puts ~``per_image`` candidates above the score threshold."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                m.bias.zero_()
    logits_of(model, images, per_image)


def _calibrate_retinanet(model, images, per_image):
    model.head.regression_head.bbox_reg.weight.mul_(0.1)           # deltas ~0.05: boxes near anchors
    batch, _, _ = model.preprocessor(images)
    logits = model.dense_forward(batch)[0]["cls_logits"]
    q = torch.quantile(logits.flatten()[::7], 1 - per_image / logits[0].numel())
    thresh_logit = float(np.log(model.score_thresh / (1 - model.score_thresh)))
    model.head.classification_head.cls_logits.bias.fill_(thresh_logit - float(q))


def _match(ref: dict, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray):
    """Greedy one-to-one matching (see the module docstring); returns unmatched indices on both sides."""
    used = np.zeros(len(scores), bool)
    missing = []
    rb, rs, rl = (ref[k].numpy() for k in ("boxes", "scores", "labels"))
    for i in range(len(rs)):
        ok = ~used & (labels == rl[i]) & (np.abs(scores - rs[i]) <= SCORE_TOL) & \
             (np.abs(boxes - rb[i]).max(1) <= BOX_TOL)
        hits = np.flatnonzero(ok)
        if hits.size:
            used[hits[0]] = True
        else:
            missing.append(i)
    return missing, np.flatnonzero(~used)


def _assert_same_detections(refs: list[dict], boxes, scores, labels, counts) -> None:
    for i, ref in enumerate(refs):
        n = int(counts[i])
        assert n == len(ref["scores"]), f"image {i}: {n} ONNX detections vs {len(ref['scores'])} in PyTorch"
        missing, extra = _match(ref, boxes[i, :n], scores[i, :n], labels[i, :n])
        assert not missing and not len(extra), (
            f"image {i}: PyTorch detections without an ONNX twin {ref['scores'][missing].tolist()}, "
            f"ONNX extras {scores[i, extra].tolist()}")
        # padding past the count
        assert (labels[i, n:] == -1).all() and (scores[i, n:] == 0).all()


# ----------------------------------------------------------------------------------------------
# RetinaNet
# ----------------------------------------------------------------------------------------------

SIZE = (384, 384)


@pytest.fixture(scope="module")
def retinanet_export(tmp_path_factory):
    torch.manual_seed(0)
    paths = _deepforest_images()
    images = [load_image(str(p)).float() / 255 for p in paths]
    model = densedet.build_model("retinanet_r18_fpn", num_classes=6, fixed_size=list(SIZE), fpn_channels=64,
                                 head_convs=2, score_thresh=0.05, detections_per_img=100).eval()
    _spread_scores(model, images, _calibrate_retinanet)
    path = tmp_path_factory.mktemp("onnx") / "retina.onnx"
    # traced with batch 1; the batch axis is dynamic, so the tests below run batch 3
    export_onnx(model, path, image_size=SIZE, batch_size=1, class_names=list("abcdef"))
    return model, images, paths, path


def _torch_reference(model, images):
    with torch.no_grad():
        batch, sizes, _ = model.preprocessor(images)
        return batch, sizes, model.postprocess(*model.dense_forward(batch), sizes)


def test_retinanet_onnx_matches_pytorch_on_aerial_images(retinanet_export):
    model, images, _, path = retinanet_export
    batch, sizes, refs = _torch_reference(model, images)
    assert all(20 <= len(r["scores"]) for r in refs), "the calibrated head should give dozens of detections"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"images": batch.numpy(), "image_sizes": np.asarray(sizes, np.float32)})
    assert out[0].shape == (3, 100, 4) and out[1].shape == (3, 100) and out[3].shape == (3,)
    _assert_same_detections(refs, *out)


def test_exported_wrapper_in_pytorch_equals_model_postprocess(retinanet_export):
    """The traced module, run eagerly (NMS by densedet's exact batched_nms), is bit-identical."""
    model, images, _, _ = retinanet_export
    batch, sizes, refs = _torch_reference(model, images)
    with torch.no_grad():
        boxes, scores, labels, counts = OnnxDetector(model, SIZE)(batch, torch.tensor(sizes, dtype=torch.float32))
    for i, ref in enumerate(refs):
        n = int(counts[i])
        assert torch.equal(boxes[i, :n], ref["boxes"]) and torch.equal(scores[i, :n], ref["scores"])
        assert torch.equal(labels[i, :n], ref["labels"])


def test_box_voting_is_in_the_exported_graph(retinanet_export, tmp_path):
    model, images, _, _ = retinanet_export
    _, _, plain = _torch_reference(model, images)
    model.box_vote = True
    try:
        batch, sizes, refs = _torch_reference(model, images)
        path = export_onnx(model, tmp_path / "voted.onnx", image_size=SIZE, batch_size=1)
    finally:
        model.box_vote = False
    moved = sum(int(((r["boxes"] - p["boxes"]).abs().amax(-1) > 10 * BOX_TOL).sum()) for r, p in zip(refs, plain))
    assert moved > 10, "box voting should move the boxes of overlapping detections (by more than the tolerance)"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"images": batch.numpy(), "image_sizes": np.asarray(sizes, np.float32)})
    _assert_same_detections(refs, *out)


def test_sidecar_records_what_the_runner_needs(retinanet_export):
    _, _, _, path = retinanet_export
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["input_size"] == list(SIZE) and meta["resize"] == "warp"
    assert meta["class_names"] == list("abcdef") and meta["score_thresh"] == pytest.approx(0.05)
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406]) and meta["arch"] == "retinanet"


def test_runner_end_to_end_matches_model_in_original_pixels(retinanet_export):
    """Image file → runner (numpy resize + onnxruntime) → boxes in original pixels, vs model(images).
    The numpy resize equals F.interpolate up to float rounding (~1e-6), within the same tolerances."""
    model, images, paths, path = retinanet_export
    runner_mod = _load_runner_module()
    runner = runner_mod.OnnxDetectorRunner(path)
    with torch.no_grad():
        refs = model(images)
    for p, ref in zip(paths, refs):
        image = runner_mod.load_rgb(p)
        det = runner([image])[0]
        assert len(det["scores"]) == len(ref["scores"])
        missing, extra = _match(ref, det["boxes"], det["scores"], det["labels"])
        assert not missing and not len(extra)
        assert det["boxes"][:, 2].max() <= image.shape[1] + 1e-3 and det["names"][0] in "abcdef"


def test_runner_decodes_every_image_mode_as_densedet_does(tmp_path):
    """The standalone runner imports nothing from densedet, so it decodes images itself: 16-bit
    grayscale scaled (not clipped to white), alpha and palette transparency dropped, EXIF applied."""
    from PIL import Image
    runner_mod = _load_runner_module()
    rng = np.random.default_rng(0)
    palette = Image.fromarray(rng.integers(0, 4, (6, 5), dtype=np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 200, 100, 50, 10, 250, 30, 90, 90, 90] + [0] * 756)
    exif = Image.Exif()
    exif[0x0112] = 6
    images = {"gray16.png": (Image.fromarray(rng.integers(0, 65536, (6, 5), dtype=np.uint16)), {}),
              "rgba.png": (Image.fromarray(rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)), {}),
              "palette.png": (palette, {"transparency": 0}),
              "gray.png": (Image.fromarray(rng.integers(0, 256, (6, 5), dtype=np.uint8)), {}),
              "turned.png": (Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)), {"exif": exif})}
    for name, (image, options) in images.items():
        image.save(tmp_path / name, **options)
        expected = load_image(str(tmp_path / name)).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(runner_mod.load_rgb(tmp_path / name), expected, err_msg=name)


def test_runner_fit_resize_equals_torch_preprocessor():
    """``resize: fit`` (aspect kept, zero padding after normalising) equals ImagePreprocessor."""
    runner_mod = _load_runner_module()
    from densedet.models.preprocess import ImagePreprocessor
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (200, 100, 3), dtype=np.uint8)
    runner = runner_mod.OnnxDetectorRunner.__new__(runner_mod.OnnxDetectorRunner)
    runner.meta = {"resize": "fit"}
    runner.height = runner.width = 128
    runner.mean = np.asarray([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
    runner.std = np.asarray([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)
    resized, size = runner.preprocess(image)
    pre = ImagePreprocessor(min_size=64, max_size=128, size_divisible=128).eval()
    batch, sizes, _ = pre([torch.from_numpy(image.transpose(2, 0, 1).copy()).float() / 255])
    assert size == sizes[0] == (128, 64) and runner.batch_shape([size]) == (128, 128)
    # torch's kernel rounds its source coordinates slightly differently at a few pixels (~1e-5 on
    # normalised values in [-2.2, 2.7]); far below what changes a detection
    np.testing.assert_allclose(resized, batch[0, :, :, :64].numpy(), atol=1e-4)
    assert (batch[0, :, :, 64:] == 0).all()


def test_runner_and_deploy_resize_as_the_preprocessor_with_scale_as():
    """A model that scales every image by one factor (``model.scale_as``) is resized so by the runner
    and the deploy backends too: the sidecar names the size whose factor every image takes."""
    runner_mod = _load_runner_module()
    from densedet.deploy.common import fit_scale
    from densedet.models.preprocess import ImagePreprocessor
    meta = {"resize": "fit", "input_size": [512, 512], "min_size": 200, "max_size": 200, "scale_as": [100, 100]}
    runner = runner_mod.OnnxDetectorRunner.__new__(runner_mod.OnnxDetectorRunner)
    runner.meta, runner.height, runner.width = meta, 512, 512
    runner.mean = np.zeros((3, 1, 1), np.float32)
    runner.std = np.ones((3, 1, 1), np.float32)
    pre = ImagePreprocessor(min_size=200, max_size=200, size_divisible=32, scale_as=(100, 100)).eval()
    for h, w in ((60, 90), (150, 120)):
        _, size = runner.preprocess(np.zeros((h, w, 3), np.uint8))
        _, sizes, _ = pre([torch.zeros(3, h, w)])
        assert size == sizes[0] == (2 * h, 2 * w)
        assert fit_scale(h, w, meta) == 2.0
    assert fit_scale(60, 90, {**meta, "scale_as": None}) == min(200 / 60, 200 / 90)


def test_runner_script_runs_without_torch(retinanet_export, tmp_path):
    _, _, paths, path = retinanet_export
    out = tmp_path / "dets.json"
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('r', {str(RUNNER_FILE)!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            f"m.main([{str(path)!r}, {str(paths[2])!r}, '--json', {str(out)!r}, '--threads', '1'])\n"
            "print('TORCH_LOADED', 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "TORCH_LOADED False" in proc.stdout
    records = json.loads(out.read_text())
    assert records and set(records[0]) == {"image", "label", "score", "box"}


def test_runner_refuses_a_score_threshold_below_the_exported_one(retinanet_export, capsys):
    runner_mod = _load_runner_module()
    _, _, paths, path = retinanet_export
    exported = json.loads(sidecar_path(path).read_text())["score_thresh"]
    with pytest.raises(SystemExit) as stop:
        runner_mod.main([str(path), str(paths[0]), "--score-thresh", str(exported / 10)])
    assert stop.value.code == 2 and f"exported with score_thresh {exported:g}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        runner_mod.main([str(path), str(paths[0]), "--score-thresh", "30"])   # 0.30 mistyped
    assert stop.value.code == 2 and "must be a score in [0, 1], got 30" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# NMS operator semantics
# ----------------------------------------------------------------------------------------------

def _nms_session(tmp_path):
    class Wrap(nn.Module):
        def forward(self, boxes, scores):
            return onnx_nms(boxes, scores, 3, 0.5, 0.05)
    boxes = torch.zeros(1, 4, 4)
    scores = torch.zeros(1, 2, 4)
    path = tmp_path / "nms.onnx"
    torch.onnx.export(Wrap(), (boxes, scores), str(path), dynamo=False, opset_version=17,
                      input_names=["boxes", "scores"], output_names=["selected"],
                      dynamic_axes={"boxes": {0: "b", 1: "n"}, "scores": {0: "b", 2: "n"}})
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.filterwarnings("ignore")          # the TorchScript exporter's deprecation and tracer notices
def test_onnx_nms_matches_eager_semantics(tmp_path):
    session = _nms_session(tmp_path)
    # hand case: IoU([0,0,2,1], [0,0,1,1]) = 0.5 exactly -> both kept (suppression needs IoU > 0.5);
    # a score equal to the threshold 0.05 is dropped; per class at most 3.
    boxes = torch.tensor([[[0, 0, 2, 1], [0, 0, 1, 1], [5, 5, 6, 6], [0, 0, 2, 1.1]]], dtype=torch.float32)
    scores = torch.tensor([[[0.9, 0.8, 0.05, 0.7], [0.1, 0.2, 0.3, 0.4]]])
    eager = onnx_nms(boxes, scores, 3, 0.5, 0.05)
    onnx_sel = session.run(None, {"boxes": boxes.numpy(), "scores": scores.numpy()})[0]
    as_set = lambda rows: sorted(map(tuple, np.asarray(rows).tolist()))  # noqa: E731
    # class 0: box 3 overlaps box 0 by 2/2.2 > 0.5 -> removed; class 1: boxes 3,2,1 (cap 3), box 0 dropped
    assert as_set(eager) == as_set(onnx_sel) == [(0, 0, 0), (0, 0, 1), (0, 1, 1), (0, 1, 2), (0, 1, 3)]
    # random boxes, two images
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(2, 60, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(2, 60, 2, generator=g) * 20], -1)
    scores = torch.rand(2, 2, 60, generator=g)
    onnx_sel = session.run(None, {"boxes": boxes.numpy(), "scores": scores.numpy()})[0]
    assert as_set(onnx_nms(boxes, scores, 3, 0.5, 0.05)) == as_set(onnx_sel)


# ----------------------------------------------------------------------------------------------
# RefineDet (two-step decoding, ARM filtering), with a tiny backbone to keep the test fast
# ----------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------
# RetinaNet with its own resize: an export of dynamic size
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dynamic_export(tmp_path_factory):
    """A RetinaNet that resizes each image by its own size (shorter side 128, longer at most 512),
    one class so that the coarse levels of a small input hold fewer than ``topk_candidates`` scores,
    exported with dynamic height and width (traced at its largest input, 512 x 512)."""
    torch.manual_seed(0)
    paths = _deepforest_images()
    full = [load_image(str(p)).float() / 255 for p in paths]
    # a tall and a wide crop, a small square and two photos: five sizes after resizing
    images = [full[2][:, :300, :120], full[2][:, 40:100, :400], full[2][:, :90, :90], full[2], full[0]]
    model = densedet.build_model("retinanet_r18_fpn", num_classes=1, min_size=128, max_size=512, fpn_channels=32,
                                 head_convs=1, score_thresh=0.05, detections_per_img=300).eval()
    _spread_scores(model, images, _calibrate_retinanet, per_image=600)
    path = tmp_path_factory.mktemp("onnx_dyn") / "dynamic.onnx"
    export_onnx(model, path, class_names=["tree"])
    return model, images, path


def test_dynamic_size_export_matches_pytorch_at_every_size(dynamic_export):
    """Each image alone at its own size, and images of several sizes padded together as the model
    pads them: the graph gives PyTorch's detections, including at sizes whose levels hold fewer
    candidates than the traced input's (a top-k count baked in at trace time would fail there)."""
    model, images, path = dynamic_export
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, "height", "width"]
    shapes = set()
    for group in ([0], [1], [2], [3], [4], [0, 1, 2]):
        batch, sizes, refs = _torch_reference(model, [images[i] for i in group])
        shapes.add(tuple(batch.shape[-2:]))
        out = session.run(None, {"images": batch.numpy(), "image_sizes": np.asarray(sizes, np.float32)})
        _assert_same_detections(refs, *out)
    assert len(shapes) >= 4 and (128, 128) in shapes
    # at 128 x 128 the coarsest level has 1 x 1 x 9 anchors: fewer than the 1000 a top-k takes there
    assert model.grid_sizes((128, 128))[-1] == (1, 1) and model.topk_candidates > 9


def test_dynamic_size_sidecar_and_runner(dynamic_export):
    """The sidecar says the size is dynamic; the torch-free runner and the deploy backend pad a
    batch only to its largest image, rounded up to size_divisible, and give model(images)."""
    from densedet.deploy import load_deployed
    from densedet.deploy.common import preprocess_images
    model, images, path = dynamic_export
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["dynamic_size"] is True and meta["size_divisible"] == 128
    assert meta["input_size"] == [1408, 1408]          # max(max_size, 1333) padded up to the divisor
    with torch.no_grad():
        refs = model(images[:3])
    batch, sizes = preprocess_images(images[:3], meta)
    assert tuple(batch.shape[-2:]) == (384, 512) and sizes == [(320, 128), (76, 512), (128, 128)]
    runner = _load_runner_module().OnnxDetectorRunner(path)
    hwc = [(im.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy() for im in images[:3]]
    for detector, inputs in ((runner, hwc), (load_deployed(path), images[:3])):
        for ref, det in zip(refs, detector(inputs)):
            assert len(det["scores"]) == len(ref["scores"]) > 0
            if detector is not runner:         # the runner reads 8-bit pixels: its scores differ slightly
                missing, extra = _match(ref, *(np.asarray(det[k]) for k in ("boxes", "scores", "labels")))
                assert not missing and not len(extra)


def test_dynamic_size_only_where_it_gives_the_models_detections(tmp_path):
    """A fixed-size model (RefineDet's warp) and anchors that follow the padded size (the
    torchvision preset's inferred strides) export at one fixed size by default, and refuse a
    dynamic one; a RetinaNet with its own resize and fixed strides exports dynamic by default."""
    from densedet.export import dynamic_size_problem
    preset = densedet.build_model("retinanet_r50_fpn_torchvision", num_classes=2, min_size=128, max_size=128)
    refinedet = RefineDet(3, backbone=_TinyBackbone(), image_size=320, tcb_channels=16)
    own = densedet.build_model("retinanet_r18_fpn", num_classes=2, min_size=128, max_size=128, fpn_channels=16,
                               head_convs=1)
    assert "inferred strides" in dynamic_size_problem(preset)
    assert "warps every image to (320, 320)" in dynamic_size_problem(refinedet)
    assert dynamic_size_problem(own) is None
    for model in (preset, refinedet):
        with pytest.raises(ValueError, match="dynamic-size export"):
            OnnxDetector(model.eval(), (384, 384), dynamic_size=True)
    path = export_onnx(refinedet, tmp_path / "rd.onnx")
    assert json.loads(sidecar_path(path).read_text())["dynamic_size"] is False


class _TinyBackbone(nn.Module):
    """Four levels at strides 8, 16, 32, 64 (what RefineDet expects of a backbone)."""

    def __init__(self) -> None:
        super().__init__()
        self.out_channels = [16, 16, 16, 16]
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.downs = nn.ModuleList(nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU()) for _ in range(3))

    def forward(self, x):
        outs = [self.stem(x)]
        for down in self.downs:
            outs.append(down(outs[-1]))
        return outs


def test_refinedet_onnx_matches_pytorch(tmp_path):
    torch.manual_seed(0)
    paths = _deepforest_images()
    model = RefineDet(3, backbone=_TinyBackbone(), image_size=320, tcb_channels=32,
                                detections_per_img=200).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    images = [load_image(str(p)).float() / 255 for p in paths]
    with torch.no_grad():
        batch, sizes, _ = model.preprocessor(images)
        refs = model.postprocess(*model.dense_forward(batch), sizes)
        eager = OnnxDetector(model, (320, 320))(batch, torch.tensor(sizes, dtype=torch.float32))
    assert all(len(r["scores"]) >= 20 for r in refs)
    _assert_same_detections(refs, *(t.numpy() for t in eager))
    path = export_onnx(model, tmp_path / "refinedet.onnx")
    assert json.loads(sidecar_path(path).read_text())["arch"] == "refinedet"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"images": batch.numpy(), "image_sizes": np.asarray(sizes, np.float32)})
    _assert_same_detections(refs, *out)


def test_padded_refinedet_export_and_runner_match_pytorch_at_every_size(tmp_path):
    """RefineDet with ``model.scale_as`` resizes each image by one factor and pads it to its input:
    exported, the sidecar says ``fit`` with that size, and the standalone runner gives PyTorch's
    detections in original pixels for images smaller than, and as large as, the scale_as size."""
    torch.manual_seed(0)
    model = RefineDet(3, backbone=_TinyBackbone(), image_size=320, tcb_channels=32, detections_per_img=200,
                      preprocessor=ImagePreprocessor(320, 320, size_divisible=64, fixed_size=(320, 320),
                                                     scale_as=(244, 244))).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    photo = load_image(str(_deepforest_images()[2]))                     # 400 x 400
    crops = [photo[:, :h, :w] for h, w in ((160, 160), (244, 244), (244, 130))]
    path = export_onnx(model, tmp_path / "padded.onnx")
    meta = json.loads(sidecar_path(path).read_text())
    assert (meta["resize"], meta["input_size"], meta["scale_as"], meta["dynamic_size"]) == ("fit", [320, 320],
                                                                                            [244, 244], False)
    runner_mod = _load_runner_module()
    runner = runner_mod.OnnxDetectorRunner(path)
    with torch.no_grad():
        refs = model([c.float() / 255 for c in crops])
    for crop, ref in zip(crops, refs):
        det = runner([crop.permute(1, 2, 0).numpy()])[0]
        assert len(ref["scores"]) >= 10 and len(det["scores"]) == len(ref["scores"])
        missing, extra = _match(ref, det["boxes"], det["scores"], det["labels"])
        assert not missing and not len(extra)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def test_export_cli_from_checkpoint(tmp_path, capsys):
    from densedet.config import Config, to_dict
    from densedet.engine.checkpoint import CHECKPOINT_FORMAT, atomic_save
    from densedet.models import build_from_config
    cfg = Config()
    cfg.model.backbone, cfg.model.num_classes = "resnet18", 2
    cfg.model.retinanet.fpn_channels, cfg.model.retinanet.head_convs = 32, 1
    cfg.model.min_size, cfg.model.max_size = 256, 256
    model = build_from_config(cfg.model)
    ckpt = tmp_path / "model.pt"
    atomic_save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": to_dict(cfg),
                 "class_names": ["tree", "bird"], "category_ids": None, "iteration": 0}, ckpt)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    out = tmp_path / "m.onnx"
    args = parser.parse_args(["export", "--weights", str(ckpt), "--format", "onnx", "--out", str(out),
                              "--size", "256", "384"])
    assert args.func(args) == 0
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["class_names"] == ["tree", "bird"] and meta["input_size"] == [256, 384] and meta["resize"] == "fit"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images", "image_sizes"]
    assert session.get_inputs()[0].shape[1:] == [3, "height", "width"] and meta["dynamic_size"]
    assert "any size up to 256x384" in capsys.readouterr().out
    fixed = tmp_path / "fixed.onnx"
    args = parser.parse_args(["export", "--weights", str(ckpt), "--out", str(fixed), "--fixed-size"])
    assert args.func(args) == 0
    session = ort.InferenceSession(str(fixed), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [3, 256, 256]
    assert not json.loads(sidecar_path(fixed).read_text())["dynamic_size"]
    with pytest.raises(ValueError, match="multiple of"):
        export_onnx(model, tmp_path / "bad.onnx", image_size=(250, 256))


def test_export_cli_refuses_another_size_for_a_model_of_one_input_size(tmp_path):
    """RefineDet's anchors and weights are tied to its input: a 320 model exported at 512 would detect
    other boxes than PyTorch's."""
    from densedet.config import Config, to_dict
    from densedet.engine.checkpoint import CHECKPOINT_FORMAT, atomic_save
    from densedet.errors import UsageError
    from densedet.models import build_from_config
    cfg = Config()
    cfg.model.arch, cfg.model.backbone, cfg.model.num_classes = "refinedet", "resnet18", 2
    cfg.model.refinedet.image_size, cfg.model.refinedet.tcb_channels = 320, 32
    ckpt = tmp_path / "model.pt"
    atomic_save({"format": CHECKPOINT_FORMAT, "model": build_from_config(cfg.model).state_dict(),
                 "config": to_dict(cfg), "class_names": ["a", "b"], "category_ids": None, "iteration": 0}, ckpt)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["export", "--weights", str(ckpt), "--out", str(tmp_path / "m.onnx"),
                              "--size", "512", "512"])
    with pytest.raises(UsageError, match=r"--size 512 512: .*model.pt is a model of one input size, 320x320"):
        args.func(args)
    assert not (tmp_path / "m.onnx").exists()


# ----------------------------------------------------------------------------------------------
# Inference fast path
# ----------------------------------------------------------------------------------------------

def test_optimize_for_inference_folds_norms_and_keeps_outputs():
    from densedet.backbones.resnet import FrozenBatchNorm2d
    from densedet.export import optimize_for_inference
    torch.manual_seed(0)
    model = densedet.build_model("retinanet_r18_fpn", num_classes=3, fixed_size=[128, 128], fpn_channels=32,
                                 head_convs=2, head_norm="bn").eval()
    with torch.no_grad():           # non-trivial statistics, so a wrong fold would show
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.copy_(torch.rand_like(m.weight) + 0.5)
                m.bias.copy_(torch.randn_like(m.bias) * 0.1)
    norms = lambda mod: [m for m in mod.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]  # noqa
    n_before = len(norms(model))
    fast = optimize_for_inference(model)
    assert norms(fast) == [] and len(norms(model)) == n_before        # the original is untouched
    x = torch.randn(2, 3, 128, 128)
    with torch.inference_mode():
        ref = model.dense_forward(x)[0]
        out = fast.dense_forward(x.contiguous(memory_format=torch.channels_last))[0]
    for a, b in zip(ref.values(), out.values()):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)

"""Test-time augmentation: exact coordinate round trips, size ranges, merges, presets."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densedet.models.preprocess import ImagePreprocessor
from densedet.tta import (REFINEDET320_SCALES, TTAConfig, apply_soft_nms, merge_detections, model_input_size,
                          pass_preprocessor, refinedet_tta, size_range_mask, tta_inference, tta_preset)


class BrightBoxModel(nn.Module):
    """A "detector" with densedet's dense API whose output is a known function of its input.

    Class c is the bounding box of the pixels whose channel c exceeds 0.5 (in the resized image
    the model sees), scored ``0.9 - 0.1 c``. Normalisation is the identity (mean 0, std 1) and there
    is no padding, so the box it finds is exactly the bright rectangle after resizing.
    """

    def __init__(self, min_size: int = 64, max_size: int = 1000, fixed_size=None) -> None:
        super().__init__()
        self.preprocessor = ImagePreprocessor(min_size, max_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                                           size_divisible=1, fixed_size=fixed_size)
        self.num_classes = 3
        self.score_thresh = 0.0
        self.nms_thresh = 0.5
        self.calls: list[tuple[int, ...]] = []

    def dense_forward(self, batch: Tensor):
        self.calls.append(tuple(batch.shape))
        mask = batch > 0.5                                                   # [B, 3, H, W]
        rows, cols = mask.any(-1), mask.any(-2)                              # [B, 3, H], [B, 3, W]
        h, w = batch.shape[-2:]
        ys = torch.arange(h, dtype=torch.float32)
        xs = torch.arange(w, dtype=torch.float32)
        inf = torch.tensor(math.inf)
        y1 = torch.where(rows, ys, inf).amin(-1)
        y2 = torch.where(rows, ys, -inf).amax(-1) + 1
        x1 = torch.where(cols, xs, inf).amin(-1)
        x2 = torch.where(cols, xs, -inf).amax(-1) + 1
        present = rows.any(-1)
        scores = torch.where(present, torch.tensor([0.9, 0.8, 0.7]), torch.zeros(()))
        boxes = torch.stack([x1, y1, x2, y2], -1)
        return {"scores": scores, "boxes": boxes}, []

    def postprocess(self, outputs, anchors, image_sizes):
        out = []
        for scores, boxes in zip(outputs["scores"], outputs["boxes"]):
            keep = scores > 0
            out.append({"boxes": boxes[keep], "scores": scores[keep], "labels": torch.arange(3)[keep]})
        return out

    def forward(self, images):
        original = [tuple(im.shape[-2:]) for im in images]
        batch, sizes, _ = self.preprocessor(images)
        dets = self.postprocess(*self.dense_forward(batch), sizes)
        return self.preprocessor.postprocess(dets, sizes, original)


def scene(h: int, w: int, rects: dict[int, tuple[int, int, int, int]]) -> Tensor:
    image = torch.zeros(3, h, w)
    for c, (x1, y1, x2, y2) in rects.items():
        image[c, y1:y2, x1:x2] = 1.0
    return image


# Edges on multiples of 8: bilinear resizing by 1/4 .. 4x keeps them exactly (at threshold 0.5).
RECTS = {0: (8, 16, 40, 48), 1: (56, 8, 88, 24)}


def as_dict(det) -> dict[int, list[float]]:
    return {int(l): b for l, b in zip(det["labels"].tolist(), det["boxes"].tolist())}


# -- exact coordinate round trips -----------------------------------------------------------------

@pytest.mark.parametrize("scale", [0, 32, 64, 128, 256])
@pytest.mark.parametrize("flip", [False, True])
def test_resize_model_pass_maps_boxes_back_exactly(scale, flip):
    model = BrightBoxModel(min_size=64).eval()
    image = scene(64, 96, RECTS)
    cfg = TTAConfig(scales=(scale,), flip=flip, merge="nms")
    (det,) = tta_inference(model, [image], cfg)
    # each pass alone (with its flip the two passes give the same box, merged by NMS)
    assert as_dict(det) == {c: list(map(float, r)) for c, r in RECTS.items()}
    # scale = the shorter side the model sees; the flip pass is in the same batch
    short = 64 if scale == 0 else scale
    assert model.calls[-1] == ((2 if flip else 1), 3, short, short * 96 // 64)


@pytest.mark.parametrize("scale,expected_size", [(0, (64, 64)), (32, (32, 32)), (128, (128, 128))])
def test_warp_model_pass_maps_boxes_back_exactly(scale, expected_size):
    # a 32x64 image warped to scale x scale: different factors in x and y (1x/2x, 0.5x/1x, 2x/4x)
    model = BrightBoxModel(fixed_size=(64, 64)).eval()
    rects = {0: (8, 4, 40, 20), 2: (48, 8, 60, 28)}
    image = scene(32, 64, rects)
    for flip in (False, True):
        (det,) = tta_inference(model, [image], TTAConfig(scales=(scale,), flip=flip, merge="nms"))
        assert as_dict(det) == {c: list(map(float, r)) for c, r in rects.items()}
        assert model.calls[-1][-2:] == expected_size


def test_flip_pass_alone_is_the_mirror_formula():
    # an asymmetric object near the left edge: the mirrored image sees it near the right edge
    model = BrightBoxModel(min_size=64).eval()
    image = scene(64, 96, {0: (0, 8, 16, 56)})
    mirrored = model([image.flip(-1)])[0]["boxes"]
    assert mirrored.tolist() == [[80.0, 8.0, 96.0, 56.0]]
    (det,) = tta_inference(model, [image], TTAConfig(scales=(128,), flip=True, merge="nms"))
    assert det["boxes"].tolist() == [[0.0, 8.0, 16.0, 56.0]]


@pytest.mark.parametrize("scale", [0, 32, 128])
@pytest.mark.parametrize("model, height, width, rects", [
    (BrightBoxModel(min_size=64), 64, 96, RECTS),
    (BrightBoxModel(fixed_size=(64, 64)), 32, 64, {0: (8, 4, 40, 20), 2: (48, 8, 60, 28)}),
], ids=["resize", "warp"])
def test_quarter_turn_passes_map_boxes_back_exactly(scale, model, height, width, rects):
    # a landscape image: its odd turns are portrait, so each view's size and scale factors differ
    model.eval().calls.clear()
    cfg = TTAConfig(scales=(scale,), flip=True, rotate=True, merge="vote")
    assert cfg.views() == [(False, 0), (False, 1), (False, 2), (False, 3), (True, 0), (True, 1), (True, 2), (True, 3)]
    (det,) = tta_inference(model, [scene(height, width, rects)], cfg)
    # voting averages the eight views' boxes: one view mapped back wrongly would move or add a box
    assert det["labels"].tolist() == list(rects)
    assert torch.allclose(det["boxes"], torch.tensor(list(rects.values()), dtype=torch.float32), atol=1e-4)
    assert model.calls == [model.calls[0]] and model.calls[0][0] == 8   # one batch holds every view
    assert tta_preset("turns") == TTAConfig(scales=(0,), flip=True, rotate=True, merge="vote")


def test_all_passes_vote_to_the_true_boxes():
    model = BrightBoxModel(min_size=64).eval()
    images = [scene(64, 96, RECTS), scene(64, 96, {2: (16, 16, 48, 32)})]
    cfg = TTAConfig(scales=(64, 32, 128, 256), flip=True, merge="vote")
    dets = tta_inference(model, images, cfg)
    truth = [RECTS, {2: (16, 16, 48, 32)}]
    for det, rects in zip(dets, truth):
        got = as_dict(det)
        assert sorted(got) == sorted(rects)
        for c, r in rects.items():
            assert got[c] == pytest.approx(list(map(float, r)), abs=1e-4)
        # 8 passes, identical boxes: voting keeps one box per object with the max score
        assert det["scores"].tolist() == pytest.approx([0.9 - 0.1 * c for c in sorted(rects)])


def test_plain_pass_equals_model_output_on_retinanet():
    from densedet import build_model
    torch.manual_seed(0)
    model = build_model("retinanet_r18_fpn", num_classes=3, fpn_channels=16, head_convs=1, min_size=64,
                        max_size=128, prior_prob=0.1, score_thresh=0.05).eval()
    images = [torch.rand(3, 60, 90), torch.rand(3, 70, 50)]
    with torch.inference_mode():
        expected = model(images)
    got = tta_inference(model, images, TTAConfig(scales=(0,), flip=False, merge="nms", iou_threshold=0.5))
    for e, g in zip(expected, got):
        assert e["boxes"].shape[0] > 0
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(e[key], g[key]), key


# -- real models: every pass maps back to the image ----------------------------------------------
#
# The reference below runs each pass by hand with the models' dense API (model.preprocessor's
# mean/std/size_divisible, dense_forward, postprocess), without densedet.tta: the image and its
# mirror are normalised, resized to the pass's size (shorter side = scale, longer side capped at
# max_size * scale / min_size, for resize models; scale x scale for warp models), zero-padded and
# detected in one batch, then the boxes are mapped back by the scale factors and, for the mirror,
# by x -> W - x, and kept by the pass's size range.

def pass_size(model, height: int, width: int, scale: int) -> tuple[int, int]:
    """The (h, w) one pass feeds the model, from TTAConfig's documented meaning of a scale."""
    p = model.preprocessor
    if p.fixed_size is not None:
        return (scale, scale) if scale else tuple(p.fixed_size)
    short, cap = (p.min_size[-1], p.max_size) if scale == 0 else (scale, round(p.max_size * scale / p.min_size[-1]))
    factor = min(short / min(height, width), cap / max(height, width))
    return math.floor(height * factor), math.floor(width * factor)


def reference_passes(model, image: Tensor, cfg: TTAConfig) -> dict[str, Tensor]:
    """All passes' detections in original pixels, pooled (boxes, scores, labels, and per box its pass)."""
    p = model.preprocessor
    big_h, big_w = image.shape[-2:]
    pooled = {"boxes": [], "scores": [], "labels": [], "pass": []}
    for i, scale in enumerate(cfg.scales):
        h, w = pass_size(model, big_h, big_w, scale)
        views = [image, image.flip(-1)] if cfg.flip else [image]
        batch = torch.cat([F.interpolate(((v - p.mean) / p.std)[None], size=(h, w), mode="bilinear",
                                         align_corners=False) for v in views])
        d = p.size_divisible
        batch = F.pad(batch, (0, -w % d, 0, -h % d))
        with torch.inference_mode():
            dets = model.postprocess(*model.dense_forward(batch), [(h, w)] * len(views))
        lo, hi = cfg.range_of(i)
        for flipped, det in zip((False, True), dets):
            x1, y1, x2, y2 = (det["boxes"].float() * torch.tensor([big_w / w, big_h / h] * 2)).unbind(1)
            if flipped:
                x1, x2 = big_w - x2, big_w - x1
            boxes = torch.stack([x1, y1, x2, y2], 1)
            longer = torch.maximum(x2 - x1, y2 - y1)
            shorter = torch.minimum(x2 - x1, y2 - y1)
            keep = ((longer > lo) if lo is not None else torch.ones_like(longer, dtype=torch.bool)) & \
                   ((shorter < hi) if hi is not None else torch.ones_like(longer, dtype=torch.bool))
            pooled["boxes"].append(boxes[keep])
            pooled["scores"].append(det["scores"][keep].float())
            pooled["labels"].append(det["labels"][keep])
            pooled["pass"] += [(scale, flipped)] * int(keep.sum())
    return {k: (v if k == "pass" else torch.cat(v)) for k, v in pooled.items()}


def assert_tta_is_the_merged_reference(model, image: Tensor, cfg: TTAConfig, det=None) -> None:
    """``det`` (default: run here) of tta_inference equals the reference passes merged as cfg says;
    with merge="nms" moreover every output box is, exactly, one box of one reference pass (no merge
    code involved), and some come from the mirrored view."""
    pooled = reference_passes(model, image, cfg)
    flipped = sum(f for _, f in pooled["pass"])
    assert 0 < len(pooled["pass"]) - flipped and (0 < flipped or not cfg.flip), "every view must give boxes"
    if det is None:
        (det,) = tta_inference(model, [image], cfg)
    expected = merge_detections(pooled["boxes"], pooled["scores"], pooled["labels"], cfg.merge, cfg.iou_threshold,
                                cfg.detections_per_img, cfg.score_thresh, cfg.sigma)
    assert det["boxes"].shape[0] > 0
    torch.testing.assert_close(det["boxes"], expected["boxes"], atol=1e-3, rtol=0)
    torch.testing.assert_close(det["scores"], expected["scores"], atol=1e-5, rtol=0)
    assert det["labels"].tolist() == expected["labels"].tolist()
    if cfg.merge == "nms":  # NMS keeps boxes as they are: each is one reference box, the best one first
        assert det["scores"][0] == pytest.approx(float(pooled["scores"].max()), abs=1e-6)
        for box, score, label in zip(det["boxes"], det["scores"], det["labels"]):
            same = ((pooled["boxes"] - box).abs().amax(1) < 1e-3) & ((pooled["scores"] - score).abs() < 1e-6) \
                & (pooled["labels"] == label)
            assert bool(same.any()), f"{box.tolist()} ({float(score):.4f}, class {int(label)}) is no pass's box"
        if cfg.flip:
            assert any(f and bool(((det["boxes"] - b).abs().amax(1) < 1e-3).any())
                       for (_, f), b in zip(pooled["pass"], pooled["boxes"])), "no output box is a mirrored one"


def test_tta_runs_retinanet_multiscale_with_flip():
    from densedet import build_model
    torch.manual_seed(0)
    model = build_model("retinanet_r18_fpn", num_classes=2, fpn_channels=16, head_convs=1, min_size=64,
                        max_size=128, prior_prob=0.1).eval()
    image = torch.rand(3, 48, 80)
    cfg = replace(refinedet_tta(64, multiple=32), detections_per_img=50)
    (det,) = tta_inference(model, [image], cfg)
    assert 0 < det["boxes"].shape[0] <= 50
    assert (det["boxes"][:, 0] >= 0).all() and (det["boxes"][:, 2] <= 80 + 1e-4).all()
    assert (det["boxes"][:, 3] <= 48 + 1e-4).all()
    assert torch.all(det["scores"][:-1] >= det["scores"][1:])
    # the merge is that of the hand-run passes: rescaled ones mapped back by their scale factor,
    # mirrored ones by x -> W - x, each kept by its size range
    assert_tta_is_the_merged_reference(model, image, cfg, det)
    # one rescaled pass alone and one pass with its mirror, merged by NMS: each output box is one
    # hand-run box, so neither can hide behind the others or behind the merge
    assert_tta_is_the_merged_reference(model, image, TTAConfig(scales=(96,), flip=False, merge="nms"))
    assert_tta_is_the_merged_reference(model, image, TTAConfig(scales=(0,), flip=True, merge="nms"))


def test_tta_on_refinedet_uses_its_own_api():
    from densedet.backbones import vgg
    from densedet.models import refinedet
    torch.manual_seed(0)
    w = 4
    backbone = vgg.VGG16(stage_channels=(w, 2 * w, 4 * w, 8 * w, 8 * w), fc_channels=16 * w,
                         extra_channels=(4 * w, 8 * w))
    model = refinedet.RefineDet(2, backbone=backbone, tcb_channels=4 * w, image_size=128, score_thresh=0.0).eval()
    assert model_input_size(model) == 128
    image = torch.rand(3, 100, 150)
    cfg = TTAConfig(scales=(128, 64, 192), flip=True, merge="soft_vote")
    (det,) = tta_inference(model, [image], cfg)
    assert det["boxes"].shape[0] > 0
    assert set(det["labels"].tolist()) <= {0, 1}
    # warped passes (128x128, 64x64, 192x192 for a 150x100 image: different factors in x and y)
    # map back to the hand-run passes
    assert_tta_is_the_merged_reference(model, image, cfg, det)


def test_tta_needs_eval_mode():
    with pytest.raises(ValueError, match="eval"):
        tta_inference(BrightBoxModel().train(), [scene(64, 64, {})], TTAConfig())


def test_tta_loads_a_checkpoint_path(tmp_path):
    from densedet.config import Config, to_dict
    from densedet.engine.checkpoint import CHECKPOINT_FORMAT, atomic_save
    from densedet.models import build_from_config
    cfg = Config()
    cfg.model.backbone, cfg.model.num_classes, cfg.model.retinanet.fpn_channels = "resnet18", 2, 16
    cfg.model.min_size, cfg.model.max_size, cfg.model.retinanet.prior_prob = 64, 96, 0.1
    cfg.model.retinanet.head_convs = 1
    torch.manual_seed(0)
    model = build_from_config(cfg.model)
    path = tmp_path / "tiny.pt"
    atomic_save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": to_dict(cfg),
                 "class_names": ["a", "b"], "category_ids": None, "iteration": 0}, path)
    image = torch.rand(3, 64, 64)
    flip = TTAConfig(scales=(0,), flip=True, merge="nms", iou_threshold=0.5)
    from_path = tta_inference(path, [image], flip)
    from_model = tta_inference(model.eval(), [image], flip)
    assert torch.equal(from_path[0]["boxes"], from_model[0]["boxes"])


# -- scale semantics ------------------------------------------------------------------------------

def test_pass_preprocessor_sets_shorter_side_or_warp_and_leaves_model_alone():
    resize = ImagePreprocessor(min_size=800, max_size=1333)
    small = pass_preprocessor(resize, 400)
    batch, sizes, _ = small.eval()([torch.rand(3, 600, 900)])
    assert sizes == [(400, 600)]
    assert resize.min_size == (800,) and resize.max_size == 1333
    # the longer-side cap scales with the shorter side: round(1333 * 400 / 800) = 666, and the
    # preprocessor floors 100 * 0.666 to 66
    _, sizes, _ = small.eval()([torch.rand(3, 100, 1000)])
    assert sizes == [(66, 666)]
    warp = ImagePreprocessor(fixed_size=(320, 320), size_divisible=64)
    _, sizes, _ = pass_preprocessor(warp, 192).eval()([torch.rand(3, 500, 375)])
    assert sizes == [(192, 192)] and warp.fixed_size == (320, 320)
    assert pass_preprocessor(warp, 0) is warp


def test_refinedet320_preset_is_the_spec_scale_set():
    cfg = REFINEDET320_SCALES
    assert cfg.scales == (320, 192, 384, 448, 512, 576, 704) and cfg.flip
    assert cfg.ranges[1] == (32, None)
    assert [hi for _, hi in cfg.ranges[2:]] == [160, 128, 96, 64, 32]
    assert refinedet_tta(320) == cfg
    c512 = refinedet_tta(512)
    assert all(s % 64 == 0 for s in c512.scales) and c512.scales[0] == 512
    assert c512.ranges[1] == (32 * 512 / 320, None)
    assert tta_preset("none") is None
    assert tta_preset("refinedet", BrightBoxModel(min_size=320)) == cfg


def test_config_checks_its_fields():
    with pytest.raises(ValueError, match="ranges"):
        TTAConfig(scales=(320, 192), ranges=((None, None),))
    with pytest.raises(ValueError, match="merge"):
        TTAConfig(merge="average")
    with pytest.raises(ValueError, match="preset"):
        tta_preset("big")
    assert TTAConfig(scales=[320, 192]).scales == (320, 192)


# -- size ranges ----------------------------------------------------------------------------------

def test_size_range_rules():
    # (w, h): (40, 10) long 40 short 10 sqrt 20; (32, 32) exactly at the bound; (8, 8)
    boxes = torch.tensor([[0, 0, 40, 10], [0, 0, 32, 32], [5, 5, 13, 13]], dtype=torch.float32)
    assert size_range_mask(boxes, (32, None)).tolist() == [True, False, False]
    assert size_range_mask(boxes, (32, None), "sqrt_area").tolist() == [False, False, False]
    assert size_range_mask(boxes, (None, 16)).tolist() == [True, False, True]
    assert size_range_mask(boxes, (None, 16), "sqrt_area").tolist() == [False, False, True]
    assert size_range_mask(boxes, (None, None)).tolist() == [True, True, True]


def test_each_scale_keeps_only_its_size_range():
    model = BrightBoxModel(min_size=64).eval()
    small, large = (8, 8, 24, 24), (40, 8, 88, 56)          # 16 px and 48 px
    image = scene(64, 96, {0: small, 1: large})
    down = TTAConfig(scales=(32,), flip=True, ranges=((32, None),), merge="nms")
    up = TTAConfig(scales=(128,), flip=True, ranges=((None, 32),), merge="nms")
    assert as_dict(tta_inference(model, [image], down)[0]) == {1: list(map(float, large))}
    assert as_dict(tta_inference(model, [image], up)[0]) == {0: list(map(float, small))}
    both = TTAConfig(scales=(32, 128), flip=True, ranges=((32, None), (None, 32)), merge="nms")
    assert as_dict(tta_inference(model, [image], both)[0]) == {0: list(map(float, small)),
                                                              1: list(map(float, large))}


# -- merges on hand-made cases --------------------------------------------------------------------

# A and B overlap with IoU 81/119 (intersection 9x9, union 100 + 100 - 81); C is apart; D is A's
# box in another class.
A, B, C = [0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [20.0, 20.0, 30.0, 30.0]
BOXES = torch.tensor([A, B, C, A])
SCORES = torch.tensor([0.9, 0.6, 0.5, 0.4])
LABELS = torch.tensor([0, 0, 0, 1])
IOU_AB = 81 / 119


def test_merge_nms():
    out = merge_detections(BOXES, SCORES, LABELS, "nms", 0.45)
    assert out["boxes"].tolist() == [A, C, A]
    assert out["labels"].tolist() == [0, 0, 1]


def test_merge_vote_is_the_score_weighted_mean_with_the_max_score():
    out = merge_detections(BOXES, SCORES, LABELS, "vote", 0.45)
    mean = [(0.9 * a + 0.6 * b) / 1.5 for a, b in zip(A, B)]          # [0.4, 0.4, 10.4, 10.4]
    assert out["boxes"].flatten().tolist() == pytest.approx(mean + C + A, abs=1e-6)
    assert out["scores"].tolist() == pytest.approx([0.9, 0.5, 0.4])
    assert out["labels"].tolist() == [0, 0, 1]


def test_merge_soft_vote_also_reemits_grouped_boxes_decayed():
    out = merge_detections(BOXES, SCORES, LABELS, "soft_vote", 0.45, score_thresh=0.01)
    decayed = 0.6 * (1 - IOU_AB)                                      # 0.1916
    assert out["scores"].tolist() == pytest.approx([0.9, 0.5, 0.4, decayed], abs=1e-6)
    assert out["boxes"][3].tolist() == B
    # a re-emitted box below the threshold is dropped
    assert merge_detections(BOXES, SCORES, LABELS, "soft_vote", 0.45, score_thresh=0.2)["boxes"].shape[0] == 3


def test_merge_soft_nms_linear_and_gaussian():
    lin = merge_detections(BOXES, SCORES, LABELS, "soft_nms_linear", 0.45)
    assert lin["scores"].tolist() == pytest.approx([0.9, 0.5, 0.4, 0.6 * (1 - IOU_AB)], abs=1e-6)
    assert lin["boxes"].tolist() == [A, C, A, B]
    gauss = merge_detections(BOXES, SCORES, LABELS, "soft_nms_gaussian", 0.45, sigma=0.5)
    # C and A-in-class-1 do not overlap A: exp(0) = 1
    assert gauss["scores"].tolist() == pytest.approx([0.9, 0.5, 0.4, 0.6 * math.exp(-IOU_AB ** 2 / 0.5)], abs=1e-6)


def test_merge_keeps_the_top_detections():
    out = merge_detections(BOXES, SCORES, LABELS, "nms", 0.45, detections_per_img=2)
    assert out["scores"].tolist() == pytest.approx([0.9, 0.5])


def test_apply_soft_nms_on_single_scale_output():
    det = {"boxes": BOXES, "scores": SCORES, "labels": LABELS}
    (out,) = apply_soft_nms([det], "linear", iou_threshold=0.3)
    assert out["scores"].tolist() == pytest.approx([0.9, 0.5, 0.4, 0.6 * (1 - IOU_AB)], abs=1e-6)
    single = apply_soft_nms(det, "gaussian", sigma=0.5)
    assert single["scores"][-1].item() == pytest.approx(0.6 * math.exp(-IOU_AB ** 2 / 0.5), abs=1e-6)
    with pytest.raises(ValueError, match="linear"):
        apply_soft_nms(det, "cubic")


def test_describe_names_the_passes_and_the_merge():
    assert TTAConfig(scales=(320, 384), flip=True, merge="nms").describe() == "scales [320, 384], flip, merged by nms"
    assert TTAConfig(scales=[448], flip=False).describe() == "scales [448], merged by vote"

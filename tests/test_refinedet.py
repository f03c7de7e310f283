"""RefineDet: anchors, VGG16 pieces, TCB, Caffe matching, mining, ODM filtering, decoding, overfit."""

from __future__ import annotations

import importlib.util
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from densedet.backbones.vgg import L2Norm, VGG16, convert_torchvision_vgg16, load_torchvision_vgg16
from densedet.boxes import box_iou
from densedet.models.refinedet import (
    RefineDet,
    RefineDetResNet,
    TransferConnectionBlock,
    hard_negative_mining,
    refinedet_anchors,
)
from densedet.matching import match_anchors
from densedet.models import build_model
from densedet.models.base import select_detections

DATA = Path(importlib.util.find_spec("deepforest").origin).parent / "data"


def tiny_vgg(width: int = 8) -> VGG16:
    """A reduced-width VGG16 (same topology) so the model trains in seconds on a CPU."""
    w = width
    return VGG16(stage_channels=(w, 2 * w, 4 * w, 8 * w, 8 * w), fc_channels=16 * w, extra_channels=(4 * w, 8 * w))


def tiny_refinedet(num_classes: int = 2, image_size: int = 320, width: int = 8, **kwargs) -> RefineDet:
    return RefineDet(num_classes, backbone=tiny_vgg(width), tcb_channels=4 * width, image_size=image_size, **kwargs)


# ----------------------------------------------------------------------------------------------
# Anchors
# ----------------------------------------------------------------------------------------------


def test_anchor_counts_match_the_paper():
    assert refinedet_anchors((320, 320)).shape == (6375, 4)
    assert refinedet_anchors((512, 512)).shape == (16320, 4)


def test_first_anchors_by_hand():
    a = refinedet_anchors((320, 320))
    r2 = math.sqrt(2)
    # level 0 (stride 8, size 32), cell (y=0, x=0), centre (4, 4): ratios 1, 2, 1/2
    expected = torch.tensor([
        [4 - 16, 4 - 16, 4 + 16, 4 + 16],
        [4 - 16 * r2, 4 - 16 / r2, 4 + 16 * r2, 4 + 16 / r2],
        [4 - 16 / r2, 4 - 16 * r2, 4 + 16 / r2, 4 + 16 * r2],
        [12 - 16, 4 - 16, 12 + 16, 4 + 16],  # next cell in x
    ])
    torch.testing.assert_close(a[:4], expected)
    torch.testing.assert_close(a[3 * 40], torch.tensor([-12.0, -4.0, 20.0, 28.0]))  # row y=1, x=0
    # first anchor of level 1 (stride 16, size 64) after 40*40*3 anchors; not clipped
    torch.testing.assert_close(a[4800], torch.tensor([8.0 - 32, 8.0 - 32, 8.0 + 32, 8.0 + 32]))
    # last anchor: level 3 (stride 64, size 256), cell (4, 4), ratio 1/2
    c, hw, hh = 4.5 * 64, 128 / r2, 128 * r2
    torch.testing.assert_close(a[-1], torch.tensor([c - hw, c - hh, c + hw, c + hh]))


def test_non_multiple_of_64_is_a_clear_error():
    with pytest.raises(ValueError, match="300x300"):
        tiny_refinedet(image_size=300)
    model = tiny_refinedet(image_size=320).eval()
    with pytest.raises(ValueError, match="320x352"):
        model.features(torch.zeros(1, 3, 320, 352))
    with pytest.raises(ValueError, match="not a multiple of 64"):
        model.anchors_for_size((100, 128))


# ----------------------------------------------------------------------------------------------
# Backbone pieces
# ----------------------------------------------------------------------------------------------


def test_l2norm_output_norm_equals_its_weight():
    x = torch.randn(2, 16, 5, 7) * 37
    norm = L2Norm(16, scale=10.0)
    y = norm(x)
    torch.testing.assert_close(y.norm(dim=1), torch.full((2, 5, 7), 10.0))
    # per-channel weights scale each channel of the unit vector
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 17.0))
    y = norm(x)
    unit = x / x.norm(dim=1, keepdim=True)
    torch.testing.assert_close(y, unit * torch.arange(1.0, 17.0).view(1, -1, 1, 1))


def test_vgg16_levels_strides_and_channels():
    model = VGG16().eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 128, 192))
    assert [tuple(f.shape[1:]) for f in feats] == [(512, 16, 24), (512, 8, 12), (1024, 4, 6), (512, 2, 3)]
    assert model.out_channels == [512, 512, 1024, 512]
    # the first two sources leave through the L2Norm layers: norm 10 and 8 at every position
    torch.testing.assert_close(feats[0].norm(dim=1), torch.full((1, 16, 24), 10.0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(feats[1].norm(dim=1), torch.full((1, 8, 12), 8.0), rtol=1e-4, atol=1e-4)
    assert model.fc6.dilation == (3, 3) and model.fc6.kernel_size == (3, 3)


def _torchvision_vgg16_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tensors with torchvision's ``vgg16()`` key names and shapes."""
    state = {}
    cin = 3
    conv_indices = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    for i, cout in zip(conv_indices, widths):
        state[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=generator)
        state[f"features.{i}.bias"] = torch.randn(cout, generator=generator)
        cin = cout
    # the two big matrices as row + column terms: every entry still differs from its neighbours
    # (so an index mix-up shows), at a fraction of the cost of 120M random draws
    state["classifier.0.weight"] = (torch.randn(4096, 1, generator=generator)
                                    + torch.randn(1, 25088, generator=generator))
    state["classifier.0.bias"] = torch.randn(4096, generator=generator)
    state["classifier.3.weight"] = (torch.randn(4096, 1, generator=generator)
                                    + torch.randn(1, 4096, generator=generator))
    state["classifier.3.bias"] = torch.randn(4096, generator=generator)
    state["classifier.6.weight"] = torch.randn(1000, 4096, generator=generator)
    state["classifier.6.bias"] = torch.randn(1000, generator=generator)
    return state


def test_convert_torchvision_vgg16_subsamples_fc6_fc7():
    g = torch.Generator().manual_seed(0)
    state = _torchvision_vgg16_state(g)
    out = convert_torchvision_vgg16(state)
    assert out["fc6.weight"].shape == (1024, 512, 3, 3) and out["fc7.weight"].shape == (1024, 1024, 1, 1)
    assert not any(k.startswith("classifier") for k in out)
    # spot checks of the index arithmetic: row 4o, input (c, 3y, 3x) of the flattened 512x7x7
    for o, c, y, x in [(0, 0, 0, 0), (5, 17, 1, 2), (1023, 511, 2, 2)]:
        assert out["fc6.weight"][o, c, y, x] == state["classifier.0.weight"][4 * o, c * 49 + 3 * y * 7 + 3 * x]
    assert out["fc7.weight"][7, 9, 0, 0] == state["classifier.3.weight"][28, 36]
    torch.testing.assert_close(out["fc6.bias"], state["classifier.0.bias"][::4])

    # Functional check: on a 7x7 map that is zero except at the taps (0, 3, 6)^2, the dilated fc6
    # conv at the centre equals the original Linear layer (its every 4th output).
    x = torch.zeros(1, 512, 7, 7)
    taps = torch.tensor([0, 3, 6])
    x[:, :, taps[:, None], taps] = torch.randn(1, 512, 3, 3, generator=g)
    linear = F.linear(x.flatten(1), state["classifier.0.weight"], state["classifier.0.bias"])[:, ::4]
    conv = F.conv2d(x, out["fc6.weight"], out["fc6.bias"], padding=3, dilation=3)[:, :, 3, 3]
    torch.testing.assert_close(conv, linear, rtol=1e-4, atol=1e-3)

    model = VGG16()
    load_torchvision_vgg16(model, state)
    torch.testing.assert_close(model.features[28].weight, state["features.28.weight"])
    torch.testing.assert_close(model.fc7.weight, out["fc7.weight"])
    with pytest.raises(ValueError, match="missing"):
        convert_torchvision_vgg16({k: v for k, v in state.items() if not k.startswith("classifier.0")})


def test_tcb_output_shapes():
    feats = [torch.randn(2, c, s, s) for c, s in [(512, 40), (512, 20), (1024, 10), (512, 5)]]
    tcb = TransferConnectionBlock([512, 512, 1024, 512], 256)
    out = tcb(feats)
    assert [tuple(p.shape) for p in out] == [(2, 256, 40, 40), (2, 256, 20, 20), (2, 256, 10, 10), (2, 256, 5, 5)]
    assert all(bool((p >= 0).all()) for p in out)  # every P ends with a ReLU


def test_tcb_top_down_path_reaches_the_finest_level():
    """P3 depends on the stride-64 source (through three deconvolutions); P6 does not see P3's source."""
    # positive inputs and weights: every ReLU passes whatever the global RNG state (seeded anyway)
    g = torch.Generator().manual_seed(0)
    feats = [(torch.rand(1, 8, s, s, generator=g) + 0.1).requires_grad_() for s in (8, 4, 2, 1)]
    tcb = TransferConnectionBlock([8] * 4, 8)
    with torch.no_grad():  # positive weights/biases: every ReLU passes, so gradients are non-zero
        for p in tcb.parameters():
            p.copy_(p.abs() + 0.01)
    out = tcb(feats)
    out[0].sum().backward()
    assert feats[3].grad.abs().sum() > 0
    assert torch.autograd.grad(out[3].sum(), feats[0], allow_unused=True)[0] is None


def test_resnet_backbone_with_res6_and_r101_builder():
    backbone = RefineDetResNet(18, norm="bn", frozen_stages=0).eval()
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 128, 128))
    assert [tuple(f.shape[1:]) for f in feats] == [(128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2)]
    model = build_model("refinedet320_r101", num_classes=3).eval()
    with torch.no_grad():
        out = model.head_outputs(model.features(torch.randn(1, 3, 64, 64)))
    anchors = 3 * (64 + 16 + 4 + 1)
    assert out["arm_logits"].shape == (1, anchors, 2) and out["odm_logits"].shape == (1, anchors, 4)
    assert model.odm_head.box_convs[0].in_channels == 1024  # Caffe's residual block before each head


def test_configs_build_the_caffe_model():
    from densedet.config import load_config
    from densedet.models.refinedet import build_refinedet

    root = Path(__file__).resolve().parents[1] / "densedet" / "configs"
    cfg = load_config(root / "refinedet512_vgg16_voc.yaml")
    model = build_refinedet(cfg.model)
    assert isinstance(model.backbone, VGG16) and model.image_size == (512, 512)
    assert model.aspect_ratios == (1.0, 2.0, 0.5) and model.box_coder.weights == (10.0, 10.0, 5.0, 5.0)
    assert (model.nms_thresh, model.topk_candidates, model.detections_per_img) == (0.45, 1000, 500)
    assert model.odm_head.cls_convs[0].out_channels == 3 * 21
    assert model.anchors_for_size(model.image_size).shape == (16320, 4)


# ----------------------------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------------------------


def caffe_match_bbox(iou: list[list[float]], threshold: float) -> list[int]:
    """Literal transcription of Caffe ``MatchBBox`` (bipartite, then PER_PREDICTION) with loops.

    ``iou[i][j]``: anchor i, GT j. Bipartite: scan anchors in order, GTs in pool order, keep strict
    improvements (so ties go to the first anchor, then the first GT).
    """
    num_anchors, num_gt = len(iou), len(iou[0]) if iou else 0
    match = [-1] * num_anchors
    pool = list(range(num_gt))
    while pool:
        best_i, best_j, best = -1, -1, -1.0
        for i in range(num_anchors):
            if match[i] != -1:
                continue
            for j in pool:
                if iou[i][j] > 1e-6 and iou[i][j] > best:
                    best_i, best_j, best = i, j, iou[i][j]
        if best_i == -1:
            break
        match[best_i] = best_j
        pool.remove(best_j)
    for i in range(num_anchors):
        if match[i] != -1:
            continue
        best_j, best = -1, -1.0
        for j in range(num_gt):
            if iou[i][j] >= threshold and iou[i][j] > best:
                best_j, best = j, iou[i][j]
        match[i] = best_j
    return match


def test_scale_as_pads_instead_of_warping():
    """With ``scale_as`` every image takes the factor that warps a ``scale_as`` image to the input, and is
    padded to the input: a full-size image gets exactly the warp, a smaller one keeps its objects' size."""
    from densedet.models.preprocess import ImagePreprocessor
    warp = ImagePreprocessor(320, 320, size_divisible=64, fixed_size=(320, 320)).eval()
    pad = ImagePreprocessor(320, 320, size_divisible=64, fixed_size=(320, 320), scale_as=(244, 244)).eval()
    full, small = torch.rand(3, 244, 244), torch.rand(3, 160, 100)
    assert torch.equal(pad([full])[0], warp([full])[0])
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0]])
    batch, sizes, targets = pad([small, full], [{"boxes": boxes}, {"boxes": boxes}])
    factor = 320 / 244
    assert sizes == [(math.floor(160 * factor), math.floor(100 * factor)), (320, 320)]
    assert batch.shape == (2, 3, 320, 320)
    assert (batch[0, :, sizes[0][0]:] == 0).all() and (batch[0, :, :, sizes[0][1]:] == 0).all()
    assert torch.allclose(targets[0]["boxes"], boxes * torch.tensor([131 / 100, 209 / 160] * 2))
    assert warp([small])[1] == [(320, 320)]                       # the warp: 2.0 x 3.2
    assert pad.padded_size(*sizes[0]) == (320, 320)               # as `densedet analyze` counts its anchors
    assert pad.resized_size(160, 100) == sizes[0] and pad.postprocess([{"boxes": targets[0]["boxes"]}], sizes[:1],
                                                                      [(160, 100)])[0]["boxes"].allclose(boxes)


def test_two_gts_wanting_the_same_anchor():
    anchors = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 14], [50, 50, 60, 60]])
    gts = torch.tensor([[[0.0, 0, 10, 11], [0, 0, 10, 12]]])  # both prefer anchor 0
    iou = box_iou(anchors, gts[0])
    # IoUs: gt0 -> (10/11, 10/14), gt1 -> (10/12, 12/14): (a0, gt0) is the global maximum
    assert iou.argmax(0).tolist() == [0, 1] or iou[0, 1] > iou[1, 1]
    matched = match_anchors(anchors, gts, torch.ones(1, 2, dtype=torch.bool), 0.5)
    assert matched.tolist() == [[0, 1, -1]]
    # the per-GT argmax of the PyTorch port would give both GTs anchor 0; gt1 would lose its anchor
    assert caffe_match_bbox(iou.tolist(), 0.5) == [0, 1, -1]


def test_bipartite_match_below_threshold_and_per_prediction_above():
    anchors = torch.tensor([[0.0, 0, 32, 32], [8, 0, 40, 32], [100, 100, 132, 132]])
    gts = torch.tensor([[[2.0, 0, 34, 32], [100, 100, 110, 110]]])  # gt1 has IoU 0.098 with anchor 2
    matched = match_anchors(anchors, gts, torch.ones(1, 2, dtype=torch.bool), 0.5)
    # anchor 0 is gt0's best; anchor 1 has IoU 24/40 = 0.6 >= 0.5; anchor 2 is gt1's (weak) best
    assert matched.tolist() == [[0, 0, 1]]


@pytest.mark.parametrize("seed", range(6))
def test_matching_equals_caffe_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    # integer grid boxes: many exactly equal IoUs, so tie-breaking is exercised
    anchors = refinedet_anchors((64, 64), strides=(8, 16), sizes=(16, 32))
    bsz, max_gt = 3, 7
    xy = torch.randint(0, 48, (bsz, max_gt, 2), generator=g).float()
    wh = torch.randint(4, 33, (bsz, max_gt, 2), generator=g).float()
    gts = torch.cat([xy, xy + wh], dim=-1)
    gts[0, 1] = gts[0, 0]  # duplicate GT: both want the same anchors
    valid = torch.arange(max_gt)[None] < torch.tensor([[7], [3], [0]])
    per_image = anchors.unsqueeze(0) + torch.randint(-2, 3, (bsz, anchors.shape[0], 4), generator=g).float()
    for a in (anchors, per_image):
        matched = match_anchors(a, gts, valid, 0.5)
        for b in range(bsz):
            ab = a if a.dim() == 2 else a[b]
            n = int(valid[b].sum())
            expected = caffe_match_bbox(box_iou(ab, gts[b, :n]).tolist(), 0.5) if n else [-1] * ab.shape[0]
            assert matched[b].tolist() == expected


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------


def test_hard_negative_mining_is_three_to_one_per_image():
    loss = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 1.0],
                         [0.1, 0.9, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 1.0],
                         [0.1, 0.9, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 1.0]])
    positive = torch.zeros(3, 10, dtype=torch.bool)
    positive[0, 9] = True        # 1 positive -> 3 negatives
    positive[2, [0, 1, 2]] = True  # 3 positives -> 9 wanted, only 7 in the pool
    pool = ~positive
    neg = hard_negative_mining(loss, positive, pool, 3.0)
    assert neg[0].nonzero().flatten().tolist() == [1, 3, 5]  # losses 0.9, 0.8, 0.7
    assert neg[1].sum() == 0  # no positives, no negatives
    assert neg[2].tolist() == pool[2].tolist()


def _loss_setup(objectness_threshold: float):
    """A model whose head outputs we write by hand (64 px input, 255 anchors, one GT)."""
    model = tiny_refinedet(num_classes=2, image_size=64, objectness_threshold=objectness_threshold)
    anchors = model.anchors_for_size((64, 64))
    num = anchors.shape[0]
    targets = [{"boxes": torch.tensor([[-12.0, -12.0, 20.0, 20.0]]), "labels": torch.tensor([1])}]
    arm_logits = torch.zeros(1, num, 2)
    arm_logits[0, :, 0] = 10.0    # ARM: P_obj = 4.5e-5 everywhere, the positives included ...
    arm_logits[0, 200:203] = 0.0  # ... except three anchors it is unsure about (P_obj = 0.5)
    odm_logits = torch.zeros(1, num, 3)
    odm_logits[0, :, 0] = 5.0
    odm_logits[0, 100:110, 0] = -5.0  # the hardest ODM negatives, but easy for the ARM
    outputs = {"arm_deltas": torch.zeros(1, num, 4), "arm_logits": arm_logits,
               "odm_deltas": torch.zeros(1, num, 4, requires_grad=True),
               "odm_logits": odm_logits.requires_grad_(True)}
    positives = match_anchors(anchors, targets[0]["boxes"][None], torch.ones(1, 1, dtype=torch.bool))[0] >= 0
    return model, outputs, anchors, targets, positives.nonzero().flatten().tolist()


def test_odm_filter_drops_easy_negatives_never_positives():
    model, outputs, anchors, targets, positives = _loss_setup(0.01)
    assert 2 <= len(positives) and max(positives) < 100
    losses = model.losses(outputs, [anchors], targets)
    losses["odm_cls"].backward()
    used = (outputs["odm_logits"].grad.abs().sum(-1)[0] > 0).nonzero().flatten().tolist()
    # every positive counts although the ARM calls it background; 3 * P negatives are wanted, but
    # only the three anchors the ARM did not reject may be mined
    assert used == positives + [200, 201, 202]
    log_p = F.log_softmax(outputs["odm_logits"].detach()[0], -1)
    expected = -(log_p[positives, 2].sum() + log_p[200:203, 0].sum()) / len(positives)
    torch.testing.assert_close(losses["odm_cls"], expected)
    # the box loss covers exactly the positives
    assert (outputs["odm_deltas"].grad is None
            or (outputs["odm_deltas"].grad.abs().sum(-1)[0] > 0).nonzero().flatten().tolist() == [])
    losses["odm_box"].backward()
    box_used = (outputs["odm_deltas"].grad.abs().sum(-1)[0] > 0).nonzero().flatten().tolist()
    assert set(box_used) <= set(positives)

    # without the filter the hardest ODM negatives (anchors 100..109) are mined first
    model, outputs, anchors, targets, positives = _loss_setup(0.0)
    model.losses(outputs, [anchors], targets)["odm_cls"].backward()
    used = (outputs["odm_logits"].grad.abs().sum(-1)[0] > 0).nonzero().flatten().tolist()
    assert set(range(100, 110)) <= set(used) and len(used) == 4 * len(positives)


def test_zero_positive_batch_gives_finite_zero_loss():
    model = tiny_refinedet(image_size=64).train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 80, 50)]
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    losses = model(images, targets)
    assert set(losses) == {"arm_cls", "arm_box", "odm_cls", "odm_box"}
    total = sum(losses.values())
    assert torch.isfinite(total) and float(total.detach()) == 0.0
    total.backward()


def test_targets_are_validated():
    model = tiny_refinedet(image_size=64).train()
    bad_label = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([2])}]
    with pytest.raises(ValueError, match="target 0: labels"):
        model([torch.rand(3, 64, 64)], bad_label)
    empty_box = [{"boxes": torch.tensor([[5.0, 0, 5, 10]]), "labels": torch.tensor([0])}]
    with pytest.raises(ValueError, match="zero or negative width"):
        model([torch.rand(3, 64, 64)], empty_box)


# ----------------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------------


def test_two_step_decode_by_hand():
    model = tiny_refinedet(num_classes=2, image_size=64)
    anchors = torch.tensor([[0.0, 0, 32, 32], [32, 32, 64, 64]])
    # ARM: shift x by 0.1 * 1 * 32 = 3.2; ODM: double the width (0.2 * 5 ln 2 = ln 2)
    outputs = {
        "arm_deltas": torch.tensor([[[1.0, 0, 0, 0], [0, 0, 0, 0]]]),
        "arm_logits": torch.tensor([[[0.0, 0.0], [10.0, 0.0]]]),  # anchor 1: P_obj = 4.5e-5 < 0.01
        "odm_deltas": torch.tensor([[[0.0, 0, 5 * math.log(2), 0], [0, 0, 0, 0]]]),
        "odm_logits": torch.tensor([[[0.0, math.log(2), math.log(3)], [0, 1, 2]]]),
    }
    boxes, scores = model.decode_scores(outputs, [anchors])
    # refined anchor (3.2, 0, 35.2, 32), centre x 19.2; final width 64
    torch.testing.assert_close(boxes[0, 0], torch.tensor([19.2 - 32, 0, 19.2 + 32, 32]))
    torch.testing.assert_close(boxes[0, 1], anchors[1])
    torch.testing.assert_close(scores[0, 0], torch.tensor([2 / 6, 3 / 6]))
    assert scores[0, 1].tolist() == [0.0, 0.0]  # zeroed by the ARM filter


def test_select_detections_thresholds_nms_and_cap():
    model = tiny_refinedet(num_classes=2, image_size=64, detections_per_img=3)
    boxes = torch.tensor([[[0.0, 0, 10, 10], [0, 0, 10, 11], [20, 20, 30, 30], [40, 40, 70, 70], [5, 5, 6, 6]]])
    boxes = boxes.repeat(2, 1, 1)
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.6, 0.0], [0.5, 0.005], [0.4, 0.3]]).repeat(2, 1, 1)
    scores[1] = scores[1] * 0.5
    sizes = torch.tensor([(64.0, 64.0), (32.0, 64.0)])

    def select():
        return select_detections(model.candidates_per_class(boxes, scores), sizes, model.nms_thresh,
                                 model.detections_per_img)

    dets = select()
    # class 0: box 1 is suppressed by box 0 (IoU 10/11); class 1: 0.7, 0.3, 0.1 kept (0.005 below threshold)
    assert dets[0]["scores"].tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert dets[0]["labels"].tolist() == [0, 1, 0]
    # image 1 is 32 px high: the box at y 40..70 is clipped to the image
    assert dets[1]["scores"].tolist() == pytest.approx([0.45, 0.35, 0.3])
    assert dets[1]["labels"].tolist() == [0, 1, 0]
    model.detections_per_img = 10
    dets = select()
    torch.testing.assert_close(dets[1]["boxes"][3], torch.tensor([40.0, 32, 64, 32]))


def test_box_voting_moves_each_kept_box_to_the_score_weighted_mean_of_its_overlaps():
    model = tiny_refinedet(num_classes=2, image_size=64, detections_per_img=10, nms_thresh=0.45)
    # class 0: boxes 1 and 2 overlap box 0 at IoU 0.60 and 0.69 (both suppressed, both vote for
    # it); box 3 is far away (kept, alone); class 1: box 4 sits on box 0 but votes only in its own class
    boxes = torch.tensor([[[0.0, 0, 10, 10], [0, 0, 10, 6], [0, 0, 10, 14.5], [40, 40, 50, 50], [0, 0, 10, 10]]])
    scores = torch.tensor([[[0.8, 0.0], [0.4, 0.0], [0.2, 0.0], [0.5, 0.0], [0.0, 0.9]]])
    sizes = torch.tensor([(64.0, 64.0)])
    candidates = model.candidates_per_class(boxes, scores)
    plain = select_detections(candidates, sizes, model.nms_thresh, model.detections_per_img)[0]
    voted = select_detections(candidates, sizes, model.nms_thresh, model.detections_per_img, box_vote=True)[0]
    assert plain["scores"].tolist() == pytest.approx([0.9, 0.8, 0.5])
    assert torch.equal(voted["scores"], plain["scores"]) and torch.equal(voted["labels"], plain["labels"])
    y2 = (0.8 * 10 + 0.4 * 6 + 0.2 * 14.5) / 1.4
    torch.testing.assert_close(voted["boxes"], torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, y2], [40, 40, 50, 50]]))
    model.box_vote = True                                       # the model's own flag does the same
    with torch.no_grad():
        outputs, anchors = model.dense_forward(torch.rand(1, 3, 64, 64))
    model.score_thresh = 0.0
    reference = select_detections(model.decode(outputs, anchors, sizes), sizes, model.nms_thresh,
                                  model.detections_per_img, box_vote=True)[0]
    torch.testing.assert_close(model.postprocess(outputs, anchors, [(64, 64)])[0]["boxes"], reference["boxes"])


def test_eval_returns_original_pixels_and_foreground_labels():
    model = tiny_refinedet(num_classes=3, image_size=64).eval()
    with torch.no_grad():
        dets = model([torch.rand(3, 200, 100), torch.rand(3, 64, 64)])
    assert len(dets) == 2 and dets[0]["boxes"].shape[0] > 0
    for det, (h, w) in zip(dets, [(200, 100), (64, 64)]):
        assert det["labels"].min() >= 0 and det["labels"].max() < 3
        assert det["boxes"][:, 0::2].max() <= w and det["boxes"][:, 1::2].max() <= h
        assert bool((det["scores"][:-1] >= det["scores"][1:]).all())


# ----------------------------------------------------------------------------------------------
# Overfitting real images
# ----------------------------------------------------------------------------------------------


def load_deepforest(name: str, size: int, crop: tuple[int, int, int, int] | None = None):
    """Image [3, size, size] in [0, 1] and its VOC boxes, optionally cropped (x0, y0, x1, y1) first."""
    image = torch.from_numpy(np.array(Image.open(DATA / f"{name}.png").convert("RGB"))).permute(2, 0, 1).float() / 255
    root = ET.parse(DATA / f"{name}.xml").getroot()
    boxes = torch.tensor([[float(o.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax")]
                          for o in root.iter("object")])
    if crop is not None:
        x0, y0, x1, y1 = crop
        image = image[:, y0:y1, x0:x1]
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = (centre[:, 0] > x0) & (centre[:, 0] < x1) & (centre[:, 1] > y0) & (centre[:, 1] < y1)
        boxes = boxes[inside] - torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, x1 - x0)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, y1 - y0)
    h, w = image.shape[-2:]
    image = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    boxes = boxes * torch.tensor([size / w, size / h, size / w, size / h])
    return image.clamp(0, 1), {"boxes": boxes, "labels": torch.zeros(len(boxes), dtype=torch.long)}


def overfit(model: RefineDet, images, targets, steps: int, lr: float) -> list[dict]:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        losses = model(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return model(images)


def recall_precision(det: dict, target: dict, score: float = 0.5, iou: float = 0.5) -> tuple[float, float]:
    """Greedy one-to-one matching of detections above ``score`` to GT at ``iou``."""
    boxes = det["boxes"][det["scores"] > score]
    if len(boxes) == 0:
        return 0.0, 1.0
    overlaps = box_iou(boxes, target["boxes"])
    used = set()
    hits = 0
    for row in overlaps:
        for j in row.argsort(descending=True).tolist():
            if row[j] < iou:
                break
            if j not in used:
                used.add(j)
                hits += 1
                break
    return hits / len(target["boxes"]), hits / len(boxes)


def test_overfit_small_crop():
    """Default-run variant: a 128 px crop of one aerial photo, a narrow model, a few seconds."""
    torch.manual_seed(0)
    image, target = load_deepforest("OSBS_029", 128, crop=(100, 100, 228, 228))
    assert len(target["boxes"]) >= 5
    model = tiny_refinedet(num_classes=1, image_size=128, width=8)
    dets = overfit(model, [image], [target], steps=150, lr=3e-3)
    recall, precision = recall_precision(dets[0], target)
    assert recall >= 0.9 and precision >= 0.9, (recall, precision)


@pytest.mark.slow
def test_overfit_two_aerial_photos_at_320():
    """Two full 400 px photos (61 and 37 trees) warped to 320: near-perfect detections."""
    torch.manual_seed(0)
    data = [load_deepforest("OSBS_029", 320), load_deepforest("SOAP_061", 320)]
    images, targets = [d[0] for d in data], [d[1] for d in data]
    model = tiny_refinedet(num_classes=1, image_size=320, width=16)
    dets = overfit(model, images, targets, steps=300, lr=2e-3)
    for det, target in zip(dets, targets):
        recall, precision = recall_precision(det, target)
        assert recall >= 0.9 and precision >= 0.9, (recall, precision)


def test_a_preset_refuses_options_it_cannot_honour():
    from densedet.config import ConfigError
    with pytest.raises(ConfigError, match=r"model\.retinanet: is set, but model\.arch is refinedet"):
        build_model("refinedet320_vgg16", focal_gamma=1.0)
    with pytest.raises(ConfigError, match=r"model\.min_size: RefineDet warps every image"):
        build_model("refinedet320_vgg16", min_size=300, max_size=300)
    assert build_model("refinedet320_vgg16", image_size=512).image_size == (512, 512)

"""RetinaNet: head initialisation, shapes and order, coordinates, losses, wiring, presets, batching."""

from __future__ import annotations

import importlib.util
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

from densedet import build_model
from densedet.config import ConfigError
from densedet.models.retinanet import _flatten_level


def _tiny(**kw):
    """R18 with thin FPN/heads: every code path of the preset, a fraction of the compute."""
    kw = {"num_classes": 3, "fpn_channels": 32, "head_convs": 1, **kw}
    torch.manual_seed(0)
    return build_model("retinanet_r18_fpn", **kw).eval()


def _target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.long)}


# --- head ----------------------------------------------------------------------------------------------


def _dense(model, batch):
    """(logits, deltas, anchors [A, 4], anchors per level) of ``model.dense_forward``."""
    outputs, anchors = model.dense_forward(batch)
    return outputs["cls_logits"], outputs["bbox_deltas"], torch.cat(anchors), [len(a) for a in anchors]


def _losses(model, logits, deltas, anchors, targets):
    return model.losses({"cls_logits": logits, "bbox_deltas": deltas}, [anchors], targets)


def _postprocess(model, logits, deltas, anchors, sizes, per_level):
    return model.postprocess({"cls_logits": logits, "bbox_deltas": deltas}, list(anchors.split(per_level)), sizes)


def test_head_init_prior_bias_and_small_gaussian_weights():
    model = build_model("retinanet_r18_fpn", num_classes=20)
    head = model.head
    bias = head.classification_head.cls_logits.bias
    assert bias.shape == (9 * 20,)
    assert torch.allclose(bias, torch.full_like(bias, -math.log(99.0)))
    assert bias[0].item() == pytest.approx(-4.59512, abs=1e-5)
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 2 * (4 + 1)                      # 4 tower convs + the predictor, in each subnet
    for conv in convs:
        w = conv.weight.detach()
        assert w.std().item() == pytest.approx(0.01, rel=0.05)
        assert abs(w.mean().item()) < 1e-3
        if conv is not head.classification_head.cls_logits:
            assert torch.equal(conv.bias, torch.zeros_like(conv.bias))
    # so every anchor starts at foreground probability pi = 0.01
    with torch.no_grad():
        logits, _ = head([torch.randn(1, 256, 4, 4)])
    assert torch.sigmoid(logits).mean().item() == pytest.approx(0.01, abs=1e-3)


def test_output_shapes_of_the_dense_forward():
    model = _tiny()
    with torch.no_grad():
        logits, deltas, anchors, per_level = _dense(model, torch.zeros(2, 3, 128, 192))
    grids = [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    n = sum(h * w for h, w in grids) * 9
    assert n == 4608
    assert logits.shape == (2, n, 3) and deltas.shape == (2, n, 4) and anchors.shape == (n, 4)
    assert per_level == [h * w * 9 for h, w in grids]


def test_head_outputs_are_flattened_in_the_anchor_order():
    # Channel a*K + k at (y, x) of a level must land at row (y*W + x)*A + a, column k.
    a, k, h, w = 3, 4, 2, 5
    x = torch.zeros(1, a * k, h, w)
    for c in range(a * k):
        for yy in range(h):
            for xx in range(w):
                x[0, c, yy, xx] = 1000 * c + 10 * yy + xx
    flat = _flatten_level(x, k)
    assert flat.shape == (1, h * w * a, k)
    for yy in range(h):
        for xx in range(w):
            for aa in range(a):
                for kk in range(k):
                    assert flat[0, (yy * w + xx) * a + aa, kk].item() == 1000 * (aa * k + kk) + 10 * yy + xx


# --- coordinates ---------------------------------------------------------------------------------------

def test_boxes_come_back_in_each_images_original_pixels():
    # I is 96x128 and min_size=96, so I is not resized. J is I upsampled 2x by pixel repetition; the
    # model resizes it by 0.5 (bilinear between equal pixels), giving exactly I. So J's boxes must be
    # exactly twice I's. K has another size and aspect: its boxes must lie inside K's own frame.
    torch.manual_seed(1)
    model = _tiny(min_size=96, max_size=1000, score_thresh=0.005, detections_per_img=50)
    image = torch.rand(3, 96, 128)
    big = image.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    other = torch.rand(3, 80, 200)
    batch, sizes, _ = model.preprocessor([image, big, other])
    assert sizes == [(96, 128), (96, 128), (96, 240)]
    assert torch.equal(batch[0], batch[1])
    with torch.no_grad():
        det_i, det_j, det_k = model([image, big, other])
    assert len(det_i["boxes"]) == 50
    assert torch.allclose(det_j["boxes"], 2 * det_i["boxes"], atol=1e-4)
    assert torch.equal(det_j["scores"], det_i["scores"]) and torch.equal(det_j["labels"], det_i["labels"])
    assert det_j["boxes"][:, 2].max() <= 256 and det_j["boxes"][:, 3].max() <= 192
    assert det_j["boxes"][:, 2].max() > 128                      # really in the 2x frame
    b = det_k["boxes"]
    assert (b[:, :2] >= 0).all() and (b[:, 2] <= 200 + 1e-4).all() and (b[:, 3] <= 80 + 1e-4).all()


def test_eval_outputs_are_sorted_and_labels_are_zero_based():
    model = _tiny(score_thresh=0.005, min_size=64, max_size=200)
    with torch.no_grad():
        (det,) = model([torch.rand(3, 64, 64)])
    assert set(det) == {"boxes", "scores", "labels"}
    assert (det["scores"][:-1] >= det["scores"][1:]).all()
    assert det["labels"].min() >= 0 and det["labels"].max() <= 2


# --- training ------------------------------------------------------------------------------------------

def test_train_losses_are_finite_with_an_image_without_boxes():
    model = _tiny(min_size=128, max_size=200).train()
    images = [torch.rand(3, 128, 128), torch.rand(3, 100, 140)]
    targets = [_target([[10, 20, 60, 70], [64, 64, 120, 100]], [0, 2]), _target([], [])]
    losses = model(images, targets)
    assert set(losses) == {"cls", "box"}
    total = losses["cls"] + losses["box"]
    assert torch.isfinite(total) and losses["box"] > 0
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_train_losses_with_no_box_in_the_whole_batch():
    model = _tiny(min_size=64, max_size=200).train()
    losses = model([torch.rand(3, 64, 64)] * 2, [_target([], []), _target([], [])])
    assert torch.isfinite(losses["cls"]) and losses["cls"] > 0     # negatives still learn (normaliser 1)
    assert losses["box"].item() == 0.0


def test_train_rejects_degenerate_boxes_naming_the_image():
    model = _tiny().train()
    with pytest.raises(ValueError, match="target 1.*zero or negative width"):
        model([torch.rand(3, 64, 64)] * 2, [_target([[0, 0, 5, 5]], [0]), _target([[5, 5, 5, 9]], [0])])


def _dense_case(bsz: int = 3, seed: int = 0):
    model = _tiny()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _, _, anchors, per_level = _dense(model, torch.zeros(1, 3, 128, 128))
    n = anchors.shape[0]
    logits = torch.randn(bsz, n, 3, generator=gen) * 2 - 3
    deltas = torch.randn(bsz, n, 4, generator=gen) * 0.2
    return model, logits, deltas, anchors, per_level


def test_loss_is_normalised_by_the_foreground_count_of_the_whole_batch():
    model, logits, deltas, anchors, _ = _dense_case()
    targets = [_target([[10, 10, 50, 60], [60, 30, 120, 90], [0, 0, 128, 128]], [0, 1, 2]),
               _target([], []),
               _target([[30, 40, 62, 70]], [1])]
    from densedet.matching import pad_targets
    fg = (model.matcher(anchors, pad_targets(targets)).matched_idxs >= 0).sum(1).tolist()
    assert fg[0] > fg[2] > 0 and fg[1] == 0
    batch = _losses(model, logits, deltas, anchors, targets)
    for key in ("cls", "box"):
        summed = sum(_losses(model, logits[i:i + 1], deltas[i:i + 1], anchors, [targets[i]])[key] * max(1, fg[i])
                     for i in range(3))
        assert batch[key].item() == pytest.approx(summed.item() / sum(fg), rel=1e-5)


def test_classification_loss_sums_focal_loss_over_non_ignored_anchors():
    # Brute force: build the one-hot targets anchor by anchor and sum the focal loss of every
    # anchor that is not in the ignore band.
    from densedet.losses import sigmoid_focal_loss
    from densedet.matching import pad_targets
    model, logits, deltas, anchors, _ = _dense_case(bsz=1, seed=3)
    targets = [_target([[10, 10, 50, 60], [60, 30, 120, 90]], [2, 0])]
    matched = model.matcher(anchors, pad_targets(targets)).matched_idxs[0]
    total = torch.zeros(())
    fg = 0
    for j in range(anchors.shape[0]):
        m = int(matched[j])
        if m == -2:
            continue
        onehot = torch.zeros(3)
        if m >= 0:
            onehot[int(targets[0]["labels"][m])] = 1.0
            fg += 1
        total = total + sigmoid_focal_loss(logits[0, j], onehot).sum()
    loss = _losses(model, logits, deltas, anchors, targets)["cls"]
    assert loss.item() == pytest.approx(total.item() / fg, rel=1e-5)


def test_class_cross_entropy_term_is_softmax_ce_over_foreground_anchors():
    # Brute force, anchor by anchor: -log softmax(logits)[true class] summed over the foreground
    # anchors, over the same normaliser as the focal loss; absent when the weight is 0.
    from densedet.matching import pad_targets
    model, logits, deltas, anchors, _ = _dense_case(bsz=1, seed=5)
    targets = [_target([[10, 10, 50, 60], [60, 30, 120, 90]], [2, 0])]
    plain = _losses(model, logits, deltas, anchors, targets)
    assert set(plain) == {"cls", "box"}
    matched = model.matcher(anchors, pad_targets(targets)).matched_idxs[0]
    total, fg = 0.0, 0
    for j in range(anchors.shape[0]):
        m = int(matched[j])
        if m >= 0:
            label = int(targets[0]["labels"][m])
            total += -(logits[0, j, label] - torch.logsumexp(logits[0, j], 0)).item()
            fg += 1
    assert fg > 0
    model.class_ce_weight = 0.5
    losses = _losses(model, logits, deltas, anchors, targets)
    assert losses["cls_ce"].item() == pytest.approx(0.5 * total / fg, rel=1e-5)
    assert losses["cls"].item() == plain["cls"].item() and losses["box"].item() == plain["box"].item()

def test_an_image_whose_classes_are_unknown_teaches_its_boxes_and_no_class():
    # Brute force, anchor by anchor: image 1 is marked class_unknown (a mirrored window, with
    # data.hflip_keeps_class false). Its anchors on objects drop out of the focal loss and the class
    # cross-entropy; its background anchors and every box term stay, over the same normaliser.
    from densedet.losses import sigmoid_focal_loss
    from densedet.matching import pad_targets
    model, logits, deltas, anchors, _ = _dense_case(bsz=2, seed=7)
    model.class_ce_weight = 0.5
    targets = [_target([[10, 10, 50, 60], [60, 30, 120, 90]], [2, 0]), _target([[20, 40, 90, 100]], [1])]
    plain = _losses(model, logits, deltas, anchors, targets)
    marked = _losses(model, logits, deltas, anchors, [targets[0], {**targets[1], "class_unknown": True}])
    matched = model.matcher(anchors, pad_targets(targets)).matched_idxs
    focal, ce, fg = 0.0, 0.0, int((matched >= 0).sum())
    for i in range(2):
        for j in range(anchors.shape[0]):
            m = int(matched[i, j])
            if m == -2 or (i == 1 and m >= 0):
                continue
            onehot = torch.zeros(3)
            if m >= 0:
                label = int(targets[i]["labels"][m])
                onehot[label] = 1.0
                ce += -(logits[i, j, label] - torch.logsumexp(logits[i, j], 0)).item()
            focal += sigmoid_focal_loss(logits[i, j], onehot).sum().item()
    assert int((matched[1] >= 0).sum()) > 0
    assert marked["cls"].item() == pytest.approx(focal / fg, rel=1e-5)
    assert marked["cls_ce"].item() == pytest.approx(0.5 * ce / fg, rel=1e-5)
    assert marked["box"].item() == plain["box"].item()
    assert marked["cls"].item() < plain["cls"].item() and marked["cls_ce"].item() < plain["cls_ce"].item()


# --- inference batching --------------------------------------------------------------------------------

def test_batched_postprocess_equals_each_image_alone():
    model, logits, deltas, anchors, per_level = _dense_case(bsz=3, seed=1)
    model.detections_per_img = 7         # the per-image cap must bite
    model.score_thresh = 0.03
    sizes = [(128, 128), (100, 90), (64, 128)]
    batched = _postprocess(model, logits, deltas, anchors, sizes, per_level)
    assert len(batched) == 3
    for i in range(3):
        (alone,) = _postprocess(model, logits[i:i + 1], deltas[i:i + 1], anchors, [sizes[i]], per_level)
        assert len(alone["boxes"]) == 7
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(batched[i][key], alone[key]), (i, key)
        h, w = sizes[i]
        assert (batched[i]["boxes"][:, 2] <= w).all() and (batched[i]["boxes"][:, 3] <= h).all()


def _reference_postprocess(model, logits, deltas, anchors, size, per_level):
    """One image, loops: per level threshold + top-k + decode + clip, then greedy class-wise NMS."""
    from densedet.boxes import box_iou, clip_boxes
    k = logits.shape[-1]
    cands = []
    for lg, dl, an in zip(logits.split(per_level), deltas.split(per_level), anchors.split(per_level)):
        scores = torch.sigmoid(lg).flatten()
        idx = [i for i in scores.argsort(descending=True).tolist() if scores[i] > model.score_thresh]
        for i in idx[: model.topk_candidates]:
            box = model.box_coder.decode(dl[i // k][None], an[i // k][None])
            box = clip_boxes(box, torch.tensor([size], dtype=torch.float32))[0]
            cands.append((scores[i].item(), i % k, box))
    cands.sort(key=lambda c: -c[0])
    kept = []
    for score, label, box in cands:
        if all(lab != label or box_iou(box[None], b[None]).item() <= model.nms_thresh for _, lab, b in kept):
            kept.append((score, label, box))
    return kept[: model.detections_per_img]


def test_postprocess_matches_a_per_image_loop_reference():
    model, logits, deltas, anchors, per_level = _dense_case(bsz=2, seed=4)
    model.score_thresh, model.topk_candidates, model.detections_per_img = 0.2, 40, 25
    sizes = [(128, 128), (96, 112)]
    out = _postprocess(model, logits, deltas, anchors, sizes, per_level)
    for i in range(2):
        ref = _reference_postprocess(model, logits[i], deltas[i], anchors, sizes[i], per_level)
        assert len(ref) == len(out[i]["scores"]) > 5
        assert torch.allclose(out[i]["scores"], torch.tensor([r[0] for r in ref]))
        assert out[i]["labels"].tolist() == [r[1] for r in ref]
        assert torch.allclose(out[i]["boxes"], torch.stack([r[2] for r in ref]), atol=1e-4)


def test_postprocess_threshold_leaves_images_without_detections():
    model, logits, deltas, anchors, per_level = _dense_case(bsz=2, seed=2)
    logits[0] = -20.0                     # nothing above the threshold in image 0
    out = _postprocess(model, logits, deltas, anchors, [(128, 128)] * 2, per_level)
    assert out[0]["boxes"].shape == (0, 4) and len(out[1]["boxes"]) > 0


# --- wiring and presets --------------------------------------------------------------------------------

def test_p6_comes_from_c5_by_default_and_from_p5_when_asked():
    r18 = build_model("retinanet_r18_fpn", num_classes=2)
    assert r18.backbone.fpn.extra_blocks.p6.weight.shape == (256, 512, 3, 3)
    r18_p5 = build_model("retinanet_r18_fpn", num_classes=2, p6_from="p5")
    assert r18_p5.backbone.fpn.extra_blocks.p6.weight.shape == (256, 256, 3, 3)
    assert r18.backbone.fpn.extra_blocks.p7.weight.shape == (256, 256, 3, 3)


@pytest.mark.parametrize("p6_from", ["c5", "p5"])
def test_p6_and_p7_are_computed_from_the_documented_inputs(p6_from):
    model = _tiny(p6_from=p6_from)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        c3, c4, c5 = model.backbone.body(x)
        p3, p4, p5, p6, p7 = model.backbone(x)
        extra = model.backbone.fpn.extra_blocks
        assert torch.allclose(p6, extra.p6(c5 if p6_from == "c5" else p5), atol=1e-5)
        assert torch.allclose(p7, extra.p7(F.relu(p6)), atol=1e-5)


def _torchvision_retinanet_keys() -> set[str]:
    """The keys of torchvision's ``retinanet_resnet50_fpn().state_dict()``, from its module tree:
    IntermediateLayerGetter over a FrozenBN ResNet-50 (no fc), FeaturePyramidNetwork with
    Conv2dNormActivation blocks (``.0``), LastLevelP6P7, and RetinaNetHead (4 conv blocks + predictor)."""
    bn = ("weight", "bias", "running_mean", "running_var")
    keys = {"backbone.body.conv1.weight"} | {f"backbone.body.bn1.{k}" for k in bn}
    for li, blocks in zip(range(1, 5), (3, 4, 6, 3)):
        for b in range(blocks):
            p = f"backbone.body.layer{li}.{b}"
            for i in (1, 2, 3):
                keys.add(f"{p}.conv{i}.weight")
                keys |= {f"{p}.bn{i}.{k}" for k in bn}
            if b == 0:
                keys.add(f"{p}.downsample.0.weight")
                keys |= {f"{p}.downsample.1.{k}" for k in bn}
    for i in range(3):
        for kind in ("inner_blocks", "layer_blocks"):
            keys |= {f"backbone.fpn.{kind}.{i}.0.weight", f"backbone.fpn.{kind}.{i}.0.bias"}
    keys |= {f"backbone.fpn.extra_blocks.{p}.{k}" for p in ("p6", "p7") for k in ("weight", "bias")}
    for sub, pred in (("classification_head", "cls_logits"), ("regression_head", "bbox_reg")):
        for i in range(4):
            keys |= {f"head.{sub}.conv.{i}.0.weight", f"head.{sub}.conv.{i}.0.bias"}
        keys |= {f"head.{sub}.{pred}.weight", f"head.{sub}.{pred}.bias"}
    return keys


def test_torchvision_preset_state_dict_keys_match_torchvision():
    model = build_model("retinanet_r50_fpn_torchvision")
    state = model.state_dict()
    assert set(state) == _torchvision_retinanet_keys()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["head.classification_head.cls_logits.weight"] == (9 * 91, 256, 3, 3)
    assert shapes["head.regression_head.bbox_reg.weight"] == (36, 256, 3, 3)
    assert shapes["head.classification_head.conv.0.0.weight"] == (256, 256, 3, 3)
    assert shapes["backbone.fpn.inner_blocks.0.0.weight"] == (256, 512, 1, 1)
    assert shapes["backbone.fpn.inner_blocks.2.0.weight"] == (256, 2048, 1, 1)
    assert shapes["backbone.fpn.extra_blocks.p6.weight"] == (256, 256, 3, 3)     # P6 from P5
    assert model.detections_per_img == 300 and model.preprocessor.size_divisible == 32


def test_build_model_overrides_take_effect():
    model = _tiny(min_size=512, max_size=700, score_thresh=0.2, nms_thresh=0.6, detections_per_img=3,
                  topk_candidates=50)
    assert model.preprocessor.min_size == (512,) and model.preprocessor.max_size == 700
    assert (model.score_thresh, model.nms_thresh, model.detections_per_img, model.topk_candidates) == (0.2, 0.6, 3, 50)
    assert model.config.min_size == 512
    batch, sizes, _ = model.preprocessor([torch.rand(3, 100, 200)])
    assert sizes == [(350, 700)]                        # 512/100 would make the long side 1024 > 700
    model.score_thresh = 0.0
    with torch.no_grad():
        (det,) = model([torch.rand(3, 64, 64)])
    assert len(det["boxes"]) == 3
    one_per_level = _tiny(min_size=64, max_size=200, score_thresh=0.0, topk_candidates=1, detections_per_img=100)
    with torch.no_grad():
        (det,) = one_per_level([torch.rand(3, 64, 64)])
    assert 1 <= len(det["boxes"]) <= 5                  # at most one candidate from each of P3..P7


def test_build_model_override_changes_the_architecture():
    model = _tiny(max_level=6, anchor_sizes=[16, 32, 64, 128], head_norm="gn", head_convs=2)
    assert len(model.anchor_generator.sizes) == 4 and model.anchor_generator.sizes[0][0] == 16.0
    assert isinstance(model.head.classification_head.conv[0][1], torch.nn.GroupNorm)
    with torch.no_grad():
        out = model.backbone(torch.zeros(1, 3, 128, 128))
    assert len(out) == 4


def test_unknown_override_is_named():
    with pytest.raises(ConfigError, match="'min_sise'"):
        build_model("retinanet_r18_fpn", min_sise=600)
    with pytest.raises(ConfigError, match="score_thresh"):
        build_model("retinanet_r18_fpn", score_thresh="high")
    with pytest.raises(ValueError, match="unknown model 'retinanet_r19_fpn'"):
        build_model("retinanet_r19_fpn")


# --- learning on real data -----------------------------------------------------------------------------

DEEPFOREST_DATA = os.path.join(os.path.dirname(importlib.util.find_spec("deepforest").origin), "data")


def _tree_photo(xml: str, crop: tuple[int, int, int, int] | None, size: int):
    """A deepforest aerial photo (VOC boxes of tree crowns), optionally cropped, resized to size x size."""
    from densedet.data import load_image, load_voc
    from densedet.data.transforms import crop_target, resize

    record = load_voc(os.path.join(DEEPFOREST_DATA, xml)).records[0]
    image = load_image(record.file_name).float() / 255
    target = {"boxes": torch.from_numpy(record.boxes), "labels": torch.zeros(len(record), dtype=torch.long)}
    if crop is not None:
        x0, y0, x1, y1 = crop
        image = image[:, y0:y1, x0:x1]
        target = crop_target(target, x0, y0, x1, y1)
    image, target = resize(image, target, size, size)
    return image, {"boxes": target["boxes"], "labels": target["labels"]}


def _overfit_ap50(photos: list[tuple[str, tuple | None]], size: int, steps: int) -> tuple[float, list[int]]:
    """Train a small from-scratch RetinaNet on the photos with Adam; COCO AP50 on the same photos."""
    from densedet.evaluation import detections_to_coco, evaluate_coco

    random.seed(0)
    torch.manual_seed(0)
    images, targets = zip(*[_tree_photo(xml, crop, size) for xml, crop in photos])
    # GroupNorm in the backbone too: with one or two images per batch BatchNorm's batch statistics
    # would differ from the running statistics used in eval mode.
    model = build_model("retinanet_r18_fpn", num_classes=1, norm="gn", fpn_channels=64, head_convs=2,
                        head_norm="gn", max_level=6, anchor_sizes=[16, 32, 64, 128], fixed_size=[size, size],
                        size_divisible=64, detections_per_img=200)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    model.train()
    for _ in range(steps):
        losses = model(list(images), list(targets))
        optimizer.zero_grad()
        (losses["cls"] + losses["box"]).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        detections = model(list(images))
    gt = {"images": [{"id": i + 1, "height": size, "width": size} for i in range(len(images))],
          "categories": [{"id": 1, "name": "Tree"}], "annotations": []}
    for i, t in enumerate(targets):
        for x1, y1, x2, y2 in t["boxes"].tolist():
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i + 1, "category_id": 1,
                                      "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                      "iscrowd": 0})
    metrics = evaluate_coco(detections_to_coco(detections, list(range(1, len(images) + 1))), gt)
    return metrics["AP50"], [len(t["boxes"]) for t in targets]


def test_small_retinanet_overfits_a_crop_of_a_real_aerial_photo():
    ap50, counts = _overfit_ap50([("OSBS_029.xml", (0, 0, 192, 192))], size=192, steps=40)
    assert counts == [14]
    assert ap50 > 0.9


@pytest.mark.slow
def test_small_retinanet_overfits_two_real_aerial_photos():
    photos = [("OSBS_029.xml", None), ("2019_YELL_2_541000_4977000_image_crop.xml", (300, 300, 700, 700))]
    ap50, counts = _overfit_ap50(photos, size=320, steps=80)
    assert counts == [61, 30]
    assert ap50 > 0.9


def test_preprocessor_multi_scale_takes_one_size_per_batch_and_evaluates_at_min_size():
    from densedet.models.preprocess import ImagePreprocessor
    prep = ImagePreprocessor(min_size=128, max_size=1000, size_divisible=32)
    images = [torch.rand(3, 100, 150), torch.rand(3, 120, 100)]
    boxes = torch.tensor([[10.0, 20.0, 50.0, 80.0]])
    for size in (64, 96):
        batch, sizes, targets = prep.train()(images, [{"boxes": boxes}, {"boxes": boxes}], min_size=size)
        assert [min(s) for s in sizes] == [size, size]           # one shorter side for the batch
        scale = sizes[0][0] / 100                                # image 0: 100 px high
        assert torch.allclose(targets[0]["boxes"], boxes * scale, atol=1e-4)
    _, sizes, _ = prep.eval()(images, min_size=64)               # evaluation keeps min_size
    assert [min(s) for s in sizes] == [128, 128]


def test_preprocessor_scales_a_crop_as_its_source_image():
    from densedet.models.preprocess import ImagePreprocessor
    prep = ImagePreprocessor(min_size=320, max_size=320, size_divisible=32).train()
    crop = torch.rand(3, 160, 160)
    boxes = torch.tensor([[10.0, 20.0, 50.0, 80.0]])
    # A 160 px crop of a 320 x 320 scene, trained at 256: scaled by 256 / 320 = 0.8 like the scene.
    batch, sizes, targets = prep([crop], [{"boxes": boxes, "resize_as": (320, 320)}], min_size=256)
    assert sizes == [(128, 128)] and batch.shape[-2:] == (128, 128)
    assert torch.allclose(targets[0]["boxes"], boxes * 0.8)
    # Without resize_as the crop itself would be brought to a 256 px shorter side.
    _, sizes, _ = prep([crop], [{"boxes": boxes}], min_size=256)
    assert sizes == [(256, 256)]
    # A crop of a 400 x 500 image: the scale 256 / 400 = 0.64 of the image, not of the crop.
    _, sizes, targets = prep([torch.rand(3, 100, 200)], [{"boxes": boxes, "resize_as": (400, 500)}], min_size=256)
    assert sizes == [(64, 128)]
    assert torch.allclose(targets[0]["boxes"], boxes * 0.64)


def test_preprocessor_with_scale_as_gives_every_image_one_factor():
    from densedet.models.preprocess import ImagePreprocessor
    from densedet.tta import pass_preprocessor
    prep = ImagePreprocessor(min_size=200, max_size=200, size_divisible=32, scale_as=(200, 200)).eval()
    images = [torch.rand(3, 150, 200), torch.rand(3, 900, 1200)]
    _, sizes, _ = prep(images)
    assert sizes == [(150, 200), (900, 1200)]                    # each at its own size: the factor is 1
    _, sizes, targets = prep.train()([torch.rand(3, 160, 200)], [{"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]),
                                                                 "resize_as": (480, 640)}], min_size=150)
    assert sizes == [(120, 150)]                                 # 150 / 200 = 0.75, whatever the source image
    assert torch.allclose(targets[0]["boxes"], torch.tensor([[7.5, 7.5, 22.5, 22.5]]))
    # a test-time scale multiplies that one factor: 240 / 200 = 1.2 for every image
    _, sizes, _ = pass_preprocessor(prep, 240).eval()(images)
    assert sizes == [(180, 240), (1080, 1440)]


@pytest.mark.parametrize("k", [3, 40, 1000])
def test_best_above_equals_a_top_k_over_the_thresholded_scores(k):
    from densedet.models.retinanet import best_above
    gen = torch.Generator().manual_seed(k)
    scores = torch.rand(4, 500, generator=gen) ** 4               # ~22% above 0.3
    scores[1] = 0.0                                               # a row with nothing above
    got_scores, got_idx = best_above(scores, 0.3, k)
    masked = torch.where(scores > 0.3, scores, torch.full_like(scores, -1.0))
    want_scores, want_idx = masked.topk(min(k, 500), dim=1)
    for row in range(4):
        got = {(i, s) for i, s in zip(got_idx[row].tolist(), got_scores[row].tolist()) if s > 0.3}
        want = {(i, s) for i, s in zip(want_idx[row].tolist(), want_scores[row].tolist()) if s > 0.3}
        assert got == want and len(want) == min(k, int((scores[row] > 0.3).sum()))
    assert (got_scores[1] == -1).all()

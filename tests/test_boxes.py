"""Tests for densedet.boxes: overlaps against brute-force references, coder round trips, and NMS
against a plain sequential greedy loop."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from densedet.boxes import (
    BoxCoder,
    batched_nms,
    box_area,
    box_iou,
    box_voting,
    clip_boxes,
    elementwise_box_iou,
    elementwise_giou,
    generalized_box_iou,
    nms,
    soft_nms,
)

# ----------------------------------------------------------------------------------------------
# helpers and brute-force references
# ----------------------------------------------------------------------------------------------


def random_boxes(
    n: int, generator: torch.Generator, size: float = 100.0, max_wh: float = 40.0, min_wh: float = 0.5
) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * size
    wh = torch.rand(n, 2, generator=generator) * (max_wh - min_wh) + min_wh
    return torch.cat([xy, xy + wh], dim=1)


def python_iou(a, b) -> float:
    """IoU of two boxes with plain Python floats (float64)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference_nms(boxes: torch.Tensor, scores: torch.Tensor, thr: float, labels=None) -> list[int]:
    """Classic sequential greedy NMS with Python loops.

    The pairwise IoUs come from box_iou (tested against python_iou separately) so that the
    threshold comparisons see bit-identical values; what is tested here is the suppression logic.
    """
    iou = box_iou(boxes, boxes).tolist()
    s = scores.tolist()
    lab = [0] * len(s) if labels is None else labels.tolist()
    order = sorted(range(len(s)), key=lambda i: (-s[i], i))  # stable: ties lower index first
    kept: list[int] = []
    for i in order:
        if all(not (lab[k] == lab[i] and iou[k][i] > thr) for k in kept):
            kept.append(i)
    return kept


def reference_soft_nms(boxes, scores, labels, thr, sigma, method, score_thr):
    """Bodla et al.'s loop, per class, with Python floats; returns {index: final score}."""
    b = boxes.tolist()
    result = {}
    for c in set(labels.tolist()):
        cur = {i: float(scores[i]) for i in range(len(b)) if int(labels[i]) == c and float(scores[i]) >= score_thr}
        while cur:
            top = min(cur, key=lambda i: (-cur[i], i))
            result[top] = cur.pop(top)
            for j in list(cur):
                o = python_iou(b[top], b[j])
                if method == "linear":
                    w = 1.0 - o if o > thr else 1.0
                else:
                    w = math.exp(-o * o / sigma)
                cur[j] *= w
                if cur[j] < score_thr:
                    del cur[j]
    return result


# ----------------------------------------------------------------------------------------------
# areas, IoU, GIoU, clipping
# ----------------------------------------------------------------------------------------------


def test_box_area_is_width_times_height_without_plus_one():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 3.0, 5.0, 4.0], [1.0, 1.0, 1.0, 5.0]])
    assert box_area(boxes).tolist() == [100.0, 3.0, 0.0]
    assert box_area(boxes.view(3, 1, 4)).shape == (3, 1)


def special_boxes() -> torch.Tensor:
    return torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],
            [0.0, 0.0, 10.0, 10.0],  # identical
            [20.0, 20.0, 30.0, 30.0],  # disjoint
            [2.0, 2.0, 5.0, 5.0],  # contained
            [10.0, 0.0, 20.0, 10.0],  # touching edge: IoU 0
            [3.0, 3.0, 3.0, 8.0],  # zero width
            [4.0, 4.0, 4.0, 4.0],  # a point
        ]
    )


def test_box_iou_matches_python_double_loop():
    g = torch.Generator().manual_seed(0)
    boxes1 = torch.cat([special_boxes(), random_boxes(30, g)])
    boxes2 = torch.cat([special_boxes(), random_boxes(20, g)])
    iou = box_iou(boxes1, boxes2)
    assert iou.shape == (len(boxes1), len(boxes2))
    expected = torch.tensor(
        [[python_iou(a, b) for b in boxes2.tolist()] for a in boxes1.tolist()], dtype=torch.float64
    )
    torch.testing.assert_close(iou.double(), expected, atol=1e-6, rtol=0)
    assert not torch.isnan(iou).any()
    assert iou.min() >= 0 and iou.max() <= 1
    # hand values: identical 1, contained 9/100, degenerate pairs 0 (not NaN)
    assert iou[0, 1] == 1.0 and iou[0, 3] == pytest.approx(0.09) and iou[0, 2] == 0.0 and iou[0, 4] == 0.0
    assert iou[6, 6] == 0.0 and iou[5, 5] == 0.0


def test_box_iou_batched_broadcasts_over_leading_dim():
    g = torch.Generator().manual_seed(1)
    b1 = random_boxes(3 * 5, g).view(3, 5, 4)
    b2 = random_boxes(3 * 7, g).view(3, 7, 4)
    batched = box_iou(b1, b2)
    assert batched.shape == (3, 5, 7)
    for i in range(3):
        torch.testing.assert_close(batched[i], box_iou(b1[i], b2[i]), atol=0, rtol=0)
    # a single set of boxes against a batch broadcasts too
    assert box_iou(b1[0], b2).shape == (3, 5, 7)


def test_box_iou_of_half_precision_is_computed_in_fp32():
    g = torch.Generator().manual_seed(2)
    b1 = (random_boxes(10, g) * 8).bfloat16()
    b2 = (random_boxes(12, g) * 8).bfloat16()
    iou = box_iou(b1, b2)
    assert iou.dtype == torch.float32
    torch.testing.assert_close(iou, box_iou(b1.float(), b2.float()), atol=0, rtol=0)
    # fp16 areas above 65504 would overflow to inf; in fp32 they don't
    big = torch.tensor([[0.0, 0.0, 800.0, 800.0]], dtype=torch.float16)
    assert box_iou(big, big).item() == 1.0


def test_elementwise_box_iou_equals_pairwise_diagonal():
    g = torch.Generator().manual_seed(3)
    a, b = random_boxes(25, g), random_boxes(25, g)
    torch.testing.assert_close(elementwise_box_iou(a, b), box_iou(a, b).diagonal(), atol=0, rtol=0)


def test_generalized_iou_bounds_identity_and_hand_value():
    g = torch.Generator().manual_seed(4)
    boxes = torch.cat([special_boxes(), random_boxes(40, g)])
    giou = generalized_box_iou(boxes, boxes)
    assert giou.min() >= -1 and giou.max() <= 1
    assert not torch.isnan(giou).any()
    valid = box_area(boxes) > 0
    iou = box_iou(boxes, boxes)
    # identical boxes: the hull is the union, so GIoU = IoU = 1
    torch.testing.assert_close(giou.diagonal()[valid], iou.diagonal()[valid])
    assert torch.all(giou.diagonal()[valid] == 1)
    # disjoint unit squares two apart: IoU 0, hull 3, union 2 -> GIoU = -(3 - 2) / 3
    pair = torch.tensor([[0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0]])
    assert generalized_box_iou(pair[:1], pair[1:]).item() == pytest.approx(-1.0 / 3.0)
    # far apart boxes approach -1
    far = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1000.0, 1000.0, 1001.0, 1001.0]])
    assert generalized_box_iou(far[:1], far[1:]).item() == pytest.approx(-1.0, abs=1e-5)


def test_elementwise_giou_matches_pairwise_and_has_finite_gradients():
    g = torch.Generator().manual_seed(5)
    a, b = random_boxes(30, g), random_boxes(30, g)
    torch.testing.assert_close(elementwise_giou(a, b), generalized_box_iou(a, b).diagonal(), atol=1e-6, rtol=0)
    a.requires_grad_(True)
    (1 - elementwise_giou(a, b)).sum().backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def test_clip_boxes_with_tuple_and_per_image_tensor():
    boxes = torch.tensor([[-5.0, -3.0, 50.0, 20.0], [10.0, 12.0, 30.0, 40.0]])
    clipped = clip_boxes(boxes, (15, 40))  # h = 15, w = 40
    assert clipped.tolist() == [[0.0, 0.0, 40.0, 15.0], [10.0, 12.0, 30.0, 15.0]]
    batch = torch.stack([boxes, boxes])  # [2, 2, 4]
    sizes = torch.tensor([[15, 40], [100, 25]])  # [2, 2] per-image (h, w)
    out = clip_boxes(batch, sizes)
    assert out[0].tolist() == clipped.tolist()
    assert out[1].tolist() == [[0.0, 0.0, 25.0, 20.0], [10.0, 12.0, 25.0, 40.0]]
    assert clip_boxes(boxes, torch.tensor([15, 40])).tolist() == clipped.tolist()


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="boxes2"):
        box_iou(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="scores"):
        nms(torch.zeros(3, 4), torch.zeros(4), 0.5)
    with pytest.raises(ValueError, match="weights"):
        BoxCoder(weights=(1.0, 0.0, 1.0, 1.0))


# ----------------------------------------------------------------------------------------------
# box coder
# ----------------------------------------------------------------------------------------------


def test_coder_round_trip_random_boxes():
    g = torch.Generator().manual_seed(6)
    # sizes 16..300 px: every gt/anchor size ratio is far inside the decode clamp (62.5x)
    anchors = random_boxes(500, g, size=800, max_wh=300, min_wh=16)
    gts = random_boxes(500, g, size=800, max_wh=300, min_wh=16)
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        coder = BoxCoder(weights)
        deltas = coder.encode(gts, anchors)
        assert deltas.shape == (500, 4) and torch.isfinite(deltas).all()
        # fp32 spacing at 1000 px is 6e-5, so allow a few ulp relative on top of atol 1e-4
        torch.testing.assert_close(coder.decode(deltas, anchors), gts, atol=1e-4, rtol=2e-6)
        # in fp64 the round trip is exact to far below a pixel's millionth
        deltas64 = coder.encode(gts.double(), anchors.double())
        assert deltas64.dtype == torch.float64
        torch.testing.assert_close(coder.decode(deltas64, anchors.double()), gts.double(), atol=1e-9, rtol=0)


def test_coder_encode_formula_by_hand():
    anchor = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), size (10, 20)
    gt = torch.tensor([[2.0, 4.0, 22.0, 14.0]])  # centre (12, 9), size (20, 10)
    d = BoxCoder().encode(gt, anchor)[0].tolist()
    assert d == pytest.approx([0.7, -0.05, math.log(2.0), math.log(0.5)])


def test_variance_coder_equals_weights_10_10_5_5():
    g = torch.Generator().manual_seed(7)
    anchors = random_boxes(50, g)
    gts = random_boxes(50, g)
    v = (0.1, 0.1, 0.2, 0.2)
    # SSD / RefineDet "variance" encoding written out by hand
    a_c = (anchors[:, :2] + anchors[:, 2:]) / 2
    a_wh = anchors[:, 2:] - anchors[:, :2]
    g_c = (gts[:, :2] + gts[:, 2:]) / 2
    g_wh = gts[:, 2:] - gts[:, :2]
    by_hand = torch.cat([(g_c - a_c) / (v[0] * a_wh), torch.log(g_wh / a_wh) / v[2]], dim=1)
    torch.testing.assert_close(BoxCoder((10.0, 10.0, 5.0, 5.0)).encode(gts, anchors), by_hand)
    torch.testing.assert_close(BoxCoder.from_variances(v).encode(gts, anchors), by_hand)
    # and the SSD decoding formula
    pred = torch.randn(50, 4, generator=g) * 0.5
    c = a_c + pred[:, :2] * v[0] * a_wh
    wh = a_wh * torch.exp(pred[:, 2:] * v[2])
    torch.testing.assert_close(
        BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(pred, anchors), torch.cat([c - wh / 2, c + wh / 2], 1)
    )


def test_decode_clamps_only_large_dw_dh():
    anchor = torch.tensor([[100.0, 100.0, 140.0, 120.0]])  # w 40, h 20
    coder = BoxCoder()
    out = coder.decode(torch.tensor([[0.0, 0.0, 50.0, 1e4]]), anchor)[0]
    assert math.isclose(coder.clamp, math.log(1000.0 / 16))
    assert (out[2] - out[0]).item() == pytest.approx(40.0 * 1000.0 / 16, rel=1e-6)  # 62.5x the anchor
    assert (out[3] - out[1]).item() == pytest.approx(20.0 * 1000.0 / 16, rel=1e-6)
    assert ((out[:2] + out[2:]) / 2).tolist() == [120.0, 110.0]  # centre unchanged
    # large negative dw is not clamped: the box shrinks towards zero width, stays finite
    small = coder.decode(torch.tensor([[0.0, 0.0, -50.0, 0.0]]), anchor)[0]
    assert torch.isfinite(small).all() and 0 <= (small[2] - small[0]).item() < 1e-12


def test_decode_bf16_inputs_in_fp32():
    g = torch.Generator().manual_seed(8)
    anchors = (random_boxes(100, g, size=700, max_wh=100)).bfloat16()
    deltas = (torch.randn(100, 4, generator=g) * 0.3).bfloat16()
    boxes = BoxCoder().decode(deltas, anchors)
    assert boxes.dtype == torch.float32
    torch.testing.assert_close(boxes, BoxCoder().decode(deltas.float(), anchors.float()), atol=0, rtol=0)
    # why it matters: bf16 cannot even represent 801.0 (its spacing at 800 is 4)
    assert torch.tensor(801.0).bfloat16().float().item() != 801.0


def test_encode_rejects_nothing_for_degenerate_gt_but_gives_inf():
    # documented: callers validate boxes at the dataset reader
    d = BoxCoder().encode(torch.tensor([[5.0, 5.0, 5.0, 9.0]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    assert torch.isinf(d[0, 2])


# ----------------------------------------------------------------------------------------------
# NMS
# ----------------------------------------------------------------------------------------------


def nms_cases():
    """(boxes, scores) pairs covering the hard cases, from fixed seeds."""
    cases = []
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        n = int(torch.randint(2, 300, (1,), generator=g))
        kind = seed % 5
        if kind == 0:  # spread out
            boxes, scores = random_boxes(n, g, size=200), torch.rand(n, generator=g)
        elif kind == 1:  # heavy overlaps: a few clusters of jittered copies
            centres = random_boxes(4, g, size=60)
            boxes = centres[torch.randint(0, 4, (n,), generator=g)] + torch.randn(n, 4, generator=g)
            boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 0.1)
            scores = torch.rand(n, generator=g)
        elif kind == 2:  # exact score ties
            boxes = random_boxes(n, g, size=50)
            scores = torch.randint(0, 4, (n,), generator=g).float() / 4
        elif kind == 3:  # duplicate boxes, tied and untied scores
            base = random_boxes(max(1, n // 4), g, size=50)
            boxes = base[torch.randint(0, len(base), (n,), generator=g)]
            scores = torch.randint(0, 10, (n,), generator=g).float()
        else:  # more than one NMS block (256) with clusters
            n = 700
            boxes = random_boxes(n, g, size=150, max_wh=60)
            scores = torch.rand(n, generator=g)
        cases.append((boxes, scores))
    return cases


@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_nms_equals_sequential_greedy_reference(thr):
    for boxes, scores in nms_cases():
        keep = nms(boxes, scores, thr)
        assert keep.dtype == torch.int64
        assert keep.tolist() == reference_nms(boxes, scores, thr)


def test_nms_threshold_one_keeps_everything_sorted_stably():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 4)
    scores = torch.tensor([0.5, 0.9, 0.5, 0.9])
    assert nms(boxes, scores, 1.0).tolist() == [1, 3, 0, 2]
    assert nms(boxes, scores, 0.5).tolist() == [1]  # duplicates: the first of the tied best survives


def test_nms_long_suppression_chain_across_blocks():
    # boxes of width 10 shifted by 3: each overlaps the next by 7/13 > 0.5 and the one after by
    # 4/16 < 0.5; greedy keeps every other box. The chain spans several blocks and needs one
    # fixed-point pass per link.
    n = 600
    x = torch.arange(n, dtype=torch.float32) * 3
    boxes = torch.stack([x, torch.zeros(n), x + 10, torch.full((n,), 10.0)], dim=1)
    scores = torch.linspace(1.0, 0.1, n)
    keep = nms(boxes, scores, 0.5)
    assert keep.tolist() == list(range(0, n, 2))
    # reversing scores reverses the order of visits: keeps every other box from the end
    assert sorted(nms(boxes, scores.flip(0), 0.5).tolist()) == list(range(1, n, 2))


def test_nms_empty_and_single():
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).dtype == torch.int64
    assert nms(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([0.3]), 0.5).tolist() == [0]
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).tolist() == []


def test_nms_accepts_bf16_boxes():
    g = torch.Generator().manual_seed(11)
    boxes, scores = random_boxes(100, g, size=60), torch.rand(100, generator=g)
    b16 = boxes.bfloat16()
    assert nms(b16, scores, 0.5).tolist() == reference_nms(b16.float(), scores, 0.5)


@pytest.mark.parametrize("thr", [0.0, 0.45, 0.5, 1.0])
def test_batched_nms_equals_per_class_reference_merged(thr):
    for seed, (boxes, scores) in enumerate(nms_cases()):
        g = torch.Generator().manual_seed(100 + seed)
        labels = torch.randint(0, 5, (len(boxes),), generator=g) * 7 - 3  # arbitrary class ids
        keep = batched_nms(boxes, scores, labels, thr)
        merged = []
        for c in labels.unique().tolist():
            members = torch.nonzero(labels == c).squeeze(1)
            merged += members[reference_nms(boxes[members], scores[members], thr)].tolist()
        s = scores.tolist()
        merged.sort(key=lambda i: (-s[i], i))
        assert keep.tolist() == merged
        assert keep.tolist() == reference_nms(boxes, scores, thr, labels)


def test_batched_nms_different_classes_never_suppress():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3)
    keep = batched_nms(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 1, 0]), 0.5)
    assert keep.tolist() == [0, 1]


# ----------------------------------------------------------------------------------------------
# soft-NMS and box voting
# ----------------------------------------------------------------------------------------------

# A = full square, B its top 80 %, C its top half: IoU(A,B) = 0.8, IoU(A,C) = 0.5, IoU(B,C) = 50/80
SOFT_BOXES = torch.tensor(
    [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 8.0], [0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 10.0, 10.0]]
)
SOFT_SCORES = torch.tensor([0.9, 0.8, 0.7, 0.6])
SOFT_LABELS = torch.tensor([0, 0, 0, 1])  # the 4th box is A's copy in another class


def test_soft_nms_linear_hand_computed():
    keep, new = soft_nms(SOFT_BOXES, SOFT_SCORES, SOFT_LABELS, iou_threshold=0.3, method="linear")
    # pick A: B -> 0.8 * (1 - 0.8) = 0.16, C -> 0.7 * (1 - 0.5) = 0.35
    # pick C: B -> 0.16 * (1 - 0.625) = 0.06; the class-1 copy keeps 0.6
    assert keep.tolist() == [0, 3, 2, 1]
    torch.testing.assert_close(new, torch.tensor([0.9, 0.6, 0.35, 0.06]))
    # B falls below a 0.1 score threshold and is dropped
    keep, new = soft_nms(SOFT_BOXES, SOFT_SCORES, SOFT_LABELS, 0.3, method="linear", score_threshold=0.1)
    assert keep.tolist() == [0, 3, 2]


def test_soft_nms_gaussian_hand_computed():
    keep, new = soft_nms(SOFT_BOXES, SOFT_SCORES, SOFT_LABELS, sigma=0.5, method="gaussian")
    c = 0.7 * math.exp(-0.25 / 0.5)  # 0.4246
    b = 0.8 * math.exp(-0.64 / 0.5) * math.exp(-(0.625**2) / 0.5)  # decayed by A, then by C
    assert keep.tolist() == [0, 3, 2, 1]
    torch.testing.assert_close(new, torch.tensor([0.9, 0.6, c, b]))


@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_soft_nms_matches_sequential_reference(method):
    for seed in range(5):
        g = torch.Generator().manual_seed(200 + seed)
        boxes = random_boxes(80, g, size=40)
        scores = torch.rand(80, generator=g)
        labels = torch.randint(0, 3, (80,), generator=g)
        keep, new = soft_nms(boxes, scores, labels, 0.3, 0.5, method, 0.01)
        expected = reference_soft_nms(boxes, scores, labels, 0.3, 0.5, method, 0.01)
        assert sorted(keep.tolist()) == sorted(expected)
        torch.testing.assert_close(new, torch.tensor([expected[i] for i in keep.tolist()]), atol=1e-5, rtol=0)
        assert torch.all(new[:-1] >= new[1:])


def test_soft_nms_rejects_unknown_method():
    with pytest.raises(ValueError, match="method"):
        soft_nms(SOFT_BOXES, SOFT_SCORES, SOFT_LABELS, method="hard")


def test_box_voting_hand_case():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # class 0, top
            [1.0, 1.0, 11.0, 11.0],  # class 0, IoU 81/119 with the top: grouped
            [50.0, 50.0, 60.0, 60.0],  # class 0, far: its own group
            [0.0, 0.0, 10.0, 10.0],  # class 1, on top of the first: never grouped with it
        ]
    )
    scores = torch.tensor([0.9, 0.6, 0.5, 0.8])
    labels = torch.tensor([0, 0, 0, 1])
    out_boxes, out_scores, out_labels = box_voting(boxes, scores, labels, iou_threshold=0.45)
    # weighted mean of the first two: (0.9 * b0 + 0.6 * b1) / 1.5 = b0 + 0.4
    torch.testing.assert_close(
        out_boxes, torch.tensor([[0.4, 0.4, 10.4, 10.4], [0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    )
    torch.testing.assert_close(out_scores, torch.tensor([0.9, 0.8, 0.5]))
    assert out_labels.tolist() == [0, 1, 0]

    out_boxes, out_scores, out_labels = box_voting(boxes, scores, labels, iou_threshold=0.45, soft=True)
    # soft: the grouped non-top box comes back unchanged with 0.6 * (1 - 81/119)
    assert out_labels.tolist() == [0, 1, 0, 0]
    torch.testing.assert_close(out_scores, torch.tensor([0.9, 0.8, 0.5, 0.6 * 38 / 119]))
    torch.testing.assert_close(out_boxes[3], boxes[1])

    # above the pair's IoU nothing is grouped: voting returns the input, sorted by score
    out_boxes, out_scores, _ = box_voting(boxes, scores, labels, iou_threshold=0.7)
    torch.testing.assert_close(out_boxes, boxes[[0, 3, 1, 2]])


def test_box_voting_empty():
    b, s, l = box_voting(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    assert b.shape == (0, 4) and s.shape == (0,) and l.shape == (0,)


# ----------------------------------------------------------------------------------------------
# property tests
# ----------------------------------------------------------------------------------------------

coord = st.floats(min_value=0, max_value=100, allow_nan=False, width=32)
extent = st.floats(min_value=0.5, max_value=50, allow_nan=False, width=32)
box_st = st.tuples(coord, coord, extent, extent).map(lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]])
boxes_st = st.lists(box_st, min_size=1, max_size=30).map(lambda b: torch.tensor(b, dtype=torch.float32))


@settings(max_examples=50, deadline=None)
@given(boxes_st, boxes_st)
def test_property_iou_bounded_and_symmetric(b1, b2):
    iou = box_iou(b1, b2)
    assert torch.all((iou >= 0) & (iou <= 1))
    torch.testing.assert_close(iou, box_iou(b2, b1).T, atol=0, rtol=0)
    giou = generalized_box_iou(b1, b2)
    assert torch.all((giou >= -1) & (giou <= iou + 1e-6))


# sizes 1..50: size ratios stay below the decode clamp (62.5x), where decoding is exactly invertible
coder_extent = st.floats(min_value=1, max_value=50, allow_nan=False, width=32)
coder_box_st = st.tuples(coord, coord, coder_extent, coder_extent).map(
    lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]]
)


@settings(max_examples=50, deadline=None)
@given(st.lists(coder_box_st, min_size=1, max_size=30), st.data())
def test_property_coder_round_trip(gts, data):
    anchors = data.draw(st.lists(coder_box_st, min_size=len(gts), max_size=len(gts)))
    gts = torch.tensor(gts, dtype=torch.float32)
    anchors = torch.tensor(anchors, dtype=torch.float32)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(coder.decode(coder.encode(gts, anchors), anchors), gts, atol=1e-4, rtol=0)


@settings(max_examples=50, deadline=None)
@given(
    boxes_st,
    st.data(),
    st.sampled_from([0.0, 0.3, 0.5, 0.9]),
)
def test_property_nms_kept_apart_and_removed_covered(boxes, data, thr):
    n = len(boxes)
    scores = torch.tensor(data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n)), dtype=torch.float32)
    labels = torch.tensor(data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)))
    keep = batched_nms(boxes, scores, labels, thr).tolist()
    iou = box_iou(boxes, boxes)
    same = labels[:, None] == labels[None, :]
    for a in keep:
        for b in keep:
            if a != b and same[a, b]:
                assert iou[a, b] <= thr
    for r in set(range(n)) - set(keep):
        assert any(same[k, r] and scores[k] >= scores[r] and iou[k, r] > thr for k in keep)

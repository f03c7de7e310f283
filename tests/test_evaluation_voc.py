"""Pascal VOC AP: hand-worked examples, difficult/duplicate rules, a brute-force devkit-style reference."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from densedet.evaluation import evaluate_voc, evaluate_voc_from_coco, format_voc_table, voc_ap

# Three GTs; detections in score order are TP, FP, TP:
#   precision [1, 1/2, 2/3], recall [1/3, 1/3, 2/3].
# VOC07 11-point: t = 0, .1, .2, .3 -> max precision at recall >= t is 1 (4 points);
#   t = .4, .5, .6 -> only recall 2/3 qualifies, precision 2/3 (3 points); t = .7 .. 1 -> 0 (4 points).
#   AP = (4 * 1 + 3 * 2/3) / 11 = 6/11.
# VOC10 area: envelope [1, 1, 2/3]; recall steps 0 -> 1/3 at precision 1, 1/3 -> 2/3 at 2/3,
#   nothing beyond 2/3. AP = 1/3 + 2/9 = 5/9.
HAND_PRECISION = np.array([1.0, 0.5, 2 / 3])
HAND_RECALL = np.array([1 / 3, 1 / 3, 2 / 3])
HAND_AP07 = 6 / 11
HAND_AP10 = 5 / 9


def test_voc_ap_hand_example():
    assert voc_ap(HAND_RECALL, HAND_PRECISION, use_07_metric=True) == pytest.approx(HAND_AP07, abs=1e-15)
    assert voc_ap(HAND_RECALL, HAND_PRECISION, use_07_metric=False) == pytest.approx(HAND_AP10, abs=1e-15)


def test_voc_ap_edges():
    assert voc_ap(np.zeros(0), np.zeros(0), True) == 0.0
    assert voc_ap(np.zeros(0), np.zeros(0), False) == 0.0
    assert voc_ap(np.array([0.5, 1.0]), np.array([1.0, 1.0]), False) == 1.0
    assert voc_ap(np.array([0.5, 1.0]), np.array([1.0, 1.0]), True) == pytest.approx(1.0, abs=1e-15)
    # Recall exactly 0.3 (3 of 10) reaches the 0.3 threshold: t = 0, .1, .2, .3 -> 4/11.
    assert voc_ap(np.array([0.1, 0.2, 0.3]), np.ones(3), True) == pytest.approx(4 / 11, abs=1e-15)


def box(x: float, y: float, w: float = 10.0, h: float = 10.0) -> list[float]:
    return [x, y, x + w, y + h]


def one_image(det_boxes, det_scores, det_labels, gt_boxes, gt_labels, difficult=None):
    det = {"boxes": torch.tensor(det_boxes, dtype=torch.float32).reshape(-1, 4),
           "scores": torch.tensor(det_scores), "labels": torch.tensor(det_labels, dtype=torch.long)}
    gt = {"boxes": np.array(gt_boxes, dtype=np.float64).reshape(-1, 4), "labels": np.array(gt_labels)}
    if difficult is not None:
        gt["difficult"] = np.array(difficult, dtype=bool)
    return det, gt


def test_tp_fp_tp_matches_hand_example():
    gts = [box(0, 0), box(50, 0), box(100, 0)]
    # score order: on GT 0 (TP), far away (FP), on GT 1 (TP); GT 2 never found
    det, gt = one_image([box(100, 100), box(0, 0), box(50, 1)], [0.8, 0.9, 0.7], [0, 0, 0], gts, [0, 0, 0])
    for use_07, expected in ((True, HAND_AP07), (False, HAND_AP10)):
        out = evaluate_voc([det], [gt], num_classes=1, use_07_metric=use_07)
        np.testing.assert_allclose(out["precision"]["0"], HAND_PRECISION, atol=1e-15)
        np.testing.assert_allclose(out["recall"]["0"], HAND_RECALL, atol=1e-15)
        assert out["per_class"]["0"] == pytest.approx(expected, abs=1e-15)
        assert out["mAP"] == pytest.approx(expected, abs=1e-15)
        assert out["num_positives"]["0"] == 3


def test_detection_on_difficult_gt_is_neither_tp_nor_fp():
    gts = [box(0, 0), box(50, 0), box(100, 0), box(200, 0)]
    # The hand example plus a difficult 4th GT hit by a detection scored between the others.
    det, gt = one_image([box(100, 100), box(0, 0), box(50, 1), box(200, 0)], [0.8, 0.9, 0.7, 0.85], [0, 0, 0, 0],
                        gts, [0, 0, 0, 0], difficult=[False, False, False, True])
    out = evaluate_voc([det], [gt], num_classes=1)
    assert out["num_positives"]["0"] == 3  # the difficult GT is not a positive
    np.testing.assert_allclose(out["precision"]["0"], HAND_PRECISION, atol=1e-15)
    np.testing.assert_allclose(out["recall"]["0"], HAND_RECALL, atol=1e-15)
    assert out["per_class"]["0"] == pytest.approx(HAND_AP10, abs=1e-15)


def test_second_detection_on_same_gt_is_fp():
    # Two GTs, two detections on GT 0: precision [1, 1/2], recall [1/2, 1/2].
    # Area: 0 -> 1/2 at precision 1 -> AP 1/2. 11-point: t = 0 .. .5 (6 points) at 1 -> 6/11.
    det, gt = one_image([box(0, 0), box(1, 0)], [0.9, 0.8], [0, 0], [box(0, 0), box(50, 50)], [0, 0])
    out = evaluate_voc([det], [gt], num_classes=1)
    np.testing.assert_allclose(out["precision"]["0"], [1.0, 0.5], atol=1e-15)
    np.testing.assert_allclose(out["recall"]["0"], [0.5, 0.5], atol=1e-15)
    assert out["mAP"] == pytest.approx(0.5, abs=1e-15)
    assert evaluate_voc([det], [gt], num_classes=1, use_07_metric=True)["mAP"] == pytest.approx(6 / 11, abs=1e-15)


def test_iou_uses_continuous_coordinates():
    gt_box = [0.0, 0.0, 10.0, 10.0]
    # IoU exactly 0.5 (50 / 100) is a match; 49 / 100 is not, though with the "+1" convention it
    # would be (11 * 5.9) / 121 = 0.536.
    det, gt = one_image([[0.0, 0.0, 10.0, 5.0]], [0.9], [0], [gt_box], [0])
    assert evaluate_voc([det], [gt], num_classes=1)["mAP"] == 1.0
    det, gt = one_image([[0.0, 0.0, 10.0, 4.9]], [0.9], [0], [gt_box], [0])
    assert evaluate_voc([det], [gt], num_classes=1)["mAP"] == 0.0


def test_multi_class_mean_excludes_classes_without_gt():
    # class "a": one GT found -> AP 1. class "b": two GTs, one found after an FP:
    #   precision [0, 1/2], recall [0, 1/2]; envelope 1/2 over recall 0 -> 1/2 -> AP 1/4.
    # class "c": no GT (a stray detection only) -> nan, not in the mean.
    img1 = one_image([box(0, 0), box(300, 300), box(50, 0), box(400, 0)], [0.9, 0.8, 0.7, 0.6], [0, 1, 1, 2],
                     [box(0, 0), box(50, 0)], [0, 1])
    img2 = one_image([], [], [], [box(10, 10)], [1])
    out = evaluate_voc([img1[0], img2[0]], [img1[1], img2[1]], class_names=["a", "b", "c"])
    assert out["per_class"]["a"] == 1.0
    assert out["per_class"]["b"] == pytest.approx(0.25, abs=1e-15)
    assert math.isnan(out["per_class"]["c"])
    assert out["mAP"] == pytest.approx((1.0 + 0.25) / 2, abs=1e-15)
    assert set(out["curves"]) == {"a", "b"}
    table = format_voc_table(out)
    assert "mAP = 62.50" in table and "25.00" in table and " -" in table


def reference_ap(tp: list[int], npos: int, use_07: bool) -> float:
    """The devkit's AP of one class from its TP/FP flags in score order, written out here so the
    reference shares no code with densedet's ``voc_ap``. Exact rational arithmetic (no float ties
    at the 0.1 recall steps): recall_k = TP_k / npos, precision_k = TP_k / k.

    VOC07: mean over t = 0, 0.1, ..., 1 of the highest precision at a recall >= t (0 if none).
    VOC10+: area under the precision envelope, where the envelope at detection k is the highest
    precision at any detection j >= k; each rise of recall contributes its width times it.
    """
    recall, precision, hits = [], [], 0
    for k, flag in enumerate(tp, start=1):
        hits += flag
        recall.append(Fraction(hits, npos))
        precision.append(Fraction(hits, k))
    if use_07:
        total = Fraction(0)
        for i in range(11):
            reached = [p for r, p in zip(recall, precision) if r >= Fraction(i, 10)]
            total += max(reached) if reached else 0
        return float(total / 11)
    area, previous = Fraction(0), Fraction(0)
    for k in range(len(recall)):
        if recall[k] > previous:
            area += (recall[k] - previous) * max(precision[k:])
            previous = recall[k]
    return float(area)


def test_reference_ap_hand_example():
    # the hand example above: TP, FP, TP with three positives
    assert reference_ap([1, 0, 1], 3, True) == HAND_AP07
    assert reference_ap([1, 0, 1], 3, False) == HAND_AP10
    assert reference_ap([1, 0], 2, False) == 0.5 and reference_ap([1, 0], 2, True) == 6 / 11
    assert reference_ap([0, 1], 2, False) == 0.25
    assert reference_ap([], 4, True) == 0.0 and reference_ap([], 4, False) == 0.0


def devkit_reference(dets, gts, num_classes, iou_threshold, use_07):
    """Straightforward VOC devkit loop (one detection at a time over the dataset, continuous IoU),
    sharing no code with densedet (the AP from ``reference_ap``)."""
    aps = []
    for c in range(num_classes):
        records = [(float(s), i, list(map(float, b)))
                   for i, d in enumerate(dets) for b, s, l in zip(d["boxes"], d["scores"], d["labels"]) if l == c]
        records.sort(key=lambda r: -r[0])
        gt_c = {i: [(list(map(float, b)), bool(f)) for b, l, f in zip(g["boxes"], g["labels"], g["difficult"]) if l == c]
                for i, g in enumerate(gts)}
        npos = sum(not f for v in gt_c.values() for _, f in v)
        used = {i: [False] * len(v) for i, v in gt_c.items()}
        tp = []  # per detection in score order: 1 true positive, 0 false positive
        for _, i, b in records:
            best, best_j = -1.0, -1
            for j, (g, _) in enumerate(gt_c[i]):
                iw = min(b[2], g[2]) - max(b[0], g[0])
                ih = min(b[3], g[3]) - max(b[1], g[1])
                inter = max(iw, 0.0) * max(ih, 0.0)
                union = (b[2] - b[0]) * (b[3] - b[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
                if inter / union > best:
                    best, best_j = inter / union, j
            if best >= iou_threshold:
                if gt_c[i][best_j][1]:
                    continue
                if not used[i][best_j]:
                    used[i][best_j] = True
                    tp.append(1)
                    continue
            tp.append(0)
        if npos == 0:
            continue
        aps.append(reference_ap(tp, npos, use_07))
    return float(np.mean(aps))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("use_07", [True, False])
def test_random_dataset_matches_devkit_loop(seed, use_07):
    rng = np.random.default_rng(seed)
    dets, gts = [], []
    for _ in range(8):
        m = int(rng.integers(0, 7))
        xy = rng.uniform(0, 200, size=(m, 2))
        g_boxes = np.concatenate([xy, xy + rng.uniform(10, 60, size=(m, 2))], axis=1)
        g_labels = rng.integers(0, 4, size=m)
        gts.append({"boxes": g_boxes, "labels": g_labels, "difficult": rng.random(m) < 0.2})
        picks = rng.integers(0, max(m, 1), size=int(rng.integers(0, 10))) if m else np.zeros(0, int)
        d_boxes = g_boxes[picks] + rng.normal(0, 4, size=(len(picks), 4)) if m else np.zeros((0, 4))
        d_labels = g_labels[picks] if m else np.zeros(0, int)
        extra = int(rng.integers(0, 4))
        exy = rng.uniform(0, 200, size=(extra, 2))
        d_boxes = np.concatenate([d_boxes, np.concatenate([exy, exy + 30], axis=1)])
        d_labels = np.concatenate([d_labels, rng.integers(0, 4, size=extra)])
        dets.append({"boxes": d_boxes, "labels": d_labels, "scores": rng.random(len(d_boxes))})
    out = evaluate_voc(dets, gts, num_classes=4, use_07_metric=use_07)
    assert out["mAP"] == pytest.approx(devkit_reference(dets, gts, 4, 0.5, use_07), abs=1e-12)
    assert 0.0 < out["mAP"] < 1.0


def coco_case() -> tuple[dict, list[dict]]:
    """COCO-format version of the hand example (category 7 "car") plus difficult/ignore/crowd GTs."""
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 10]},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [50, 0, 10, 10]},
        {"id": 3, "image_id": 2, "category_id": 7, "bbox": [100, 0, 10, 10]},
        {"id": 4, "image_id": 2, "category_id": 7, "bbox": [200, 0, 10, 10], "difficult": 1},
        {"id": 5, "image_id": 2, "category_id": 7, "bbox": [300, 0, 10, 10], "ignore": 1},
        {"id": 6, "image_id": 1, "category_id": 7, "bbox": [300, 0, 50, 50], "iscrowd": 1},
        {"id": 7, "image_id": 2, "category_id": 9, "bbox": [0, 0, 20, 20]},
    ]
    gt = {"images": [{"id": 1}, {"id": 2}], "annotations": anns,
          "categories": [{"id": 9, "name": "bus"}, {"id": 7, "name": "car"}]}
    results = [
        {"image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 10], "score": 0.9},     # TP
        {"image_id": 2, "category_id": 7, "bbox": [200, 0, 10, 10], "score": 0.88},  # difficult: ignored
        {"image_id": 2, "category_id": 7, "bbox": [300, 0, 10, 10], "score": 0.86},  # ignore: ignored
        {"image_id": 1, "category_id": 7, "bbox": [300, 0, 50, 50], "score": 0.85},  # crowd: ignored
        {"image_id": 1, "category_id": 7, "bbox": [100, 100, 10, 10], "score": 0.8},  # FP
        {"image_id": 1, "category_id": 7, "bbox": [50, 1, 10, 10], "score": 0.7},    # TP
        {"image_id": 2, "category_id": 9, "bbox": [0, 0, 20, 20], "score": 0.5},     # TP (bus)
    ]
    return gt, results


def test_from_coco_matches_hand_example():
    gt, results = coco_case()
    for use_07, expected in ((True, HAND_AP07), (False, HAND_AP10)):
        out = evaluate_voc_from_coco(results, gt, use_07_metric=use_07)
        assert list(out["per_class"]) == ["car", "bus"]  # ascending category id: 7, 9
        np.testing.assert_allclose(out["precision"]["car"], HAND_PRECISION, atol=1e-15)
        np.testing.assert_allclose(out["recall"]["car"], HAND_RECALL, atol=1e-15)
        assert out["per_class"]["car"] == pytest.approx(expected, abs=1e-15)
        assert out["per_class"]["bus"] == pytest.approx(1.0, abs=1e-15)
        assert out["mAP"] == pytest.approx((expected + 1.0) / 2, abs=1e-15)


def test_bad_input_is_a_clear_error():
    det, gt = one_image([box(0, 0)], [0.9], [3], [box(0, 0)], [0])
    with pytest.raises(ValueError, match=r"detections\[0\] has a label outside 0..1"):
        evaluate_voc([det], [gt], num_classes=2)
    with pytest.raises(ValueError, match=r"ground_truths\[0\] has no 'labels'"):
        evaluate_voc([det], [{"boxes": np.zeros((0, 4))}], num_classes=4)
    with pytest.raises(ValueError, match="num_classes or class_names"):
        evaluate_voc([det], [gt])
    gt_coco, results = coco_case()
    with pytest.raises(ValueError, match="image id"):
        evaluate_voc_from_coco(results + [{"image_id": 5, "category_id": 7, "bbox": [0, 0, 1, 1], "score": 1.0}], gt_coco)

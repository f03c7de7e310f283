"""COCO evaluation: identical to pycocotools run by hand, configurable detection caps, conversion."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch

from densedet.evaluation import detections_to_coco, evaluate_coco, format_table

STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def make_synthetic(seed: int, num_images: int = 6, num_classes: int = 3) -> tuple[dict, list[dict]]:
    """A small COCO GT (boxes in all three area ranges, some crowd) and perturbed detections.

    Detections: most GTs get a jittered copy (sometimes two), some are missed, and there are
    random false positives, all with random scores; categories are numbered 1, 3, 5 (not 1..K).
    """
    rng = np.random.default_rng(seed)
    cat_ids = [1 + 2 * k for k in range(num_classes)]
    images, anns, results = [], [], []
    for img_id in range(10, 10 + num_images):
        images.append({"id": img_id, "width": 640, "height": 480, "file_name": f"{img_id}.jpg"})
        for _ in range(rng.integers(3, 9)):
            # side lengths spanning small (< 32^2), medium and large (> 96^2) areas
            w, h = rng.choice([12.0, 20.0, 45.0, 70.0, 130.0, 200.0]) * rng.uniform(0.8, 1.2, size=2)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            cat = int(rng.choice(cat_ids))
            crowd = int(rng.random() < 0.1)
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": crowd})
            for _ in range(rng.choice([0, 1, 1, 1, 2])):
                jitter = rng.normal(0, 0.08, size=4) * [w, h, w, h]
                box = [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])]
                label = cat if rng.random() < 0.9 else int(rng.choice(cat_ids))
                results.append({"image_id": img_id, "category_id": label, "bbox": box, "score": float(rng.random())})
        for _ in range(rng.integers(0, 4)):
            w, h = rng.uniform(10, 150, size=2)
            results.append({"image_id": img_id, "category_id": int(rng.choice(cat_ids)),
                            "bbox": [float(rng.uniform(0, 500)), float(rng.uniform(0, 350)), w, h],
                            "score": float(rng.random())})
    categories = [{"id": c, "name": f"class{c}"} for c in cat_ids]
    return {"images": images, "annotations": anns, "categories": categories}, results


def pycocotools_by_hand(gt: dict, results: list[dict], tmp_path, max_dets=None, cat_ids=None) -> np.ndarray:
    """The official recipe: COCO(file), loadRes, COCOeval evaluate/accumulate/summarize -> stats."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    path = tmp_path / "gt_reference.json"
    path.write_text(json.dumps(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(path))
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if max_dets is not None:
            ev.params.maxDets = list(max_dets)
        if cat_ids is not None:
            ev.params.catIds = list(cat_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_twelve_numbers_equal_pycocotools(seed, tmp_path):
    gt, results = make_synthetic(seed)
    areas = [a["area"] for a in gt["annotations"]]
    assert min(areas) < 32**2 and max(areas) > 96**2 and any(32**2 < a < 96**2 for a in areas)
    assert any(a["iscrowd"] for a in gt["annotations"])
    expected = pycocotools_by_hand(gt, results, tmp_path)
    metrics = evaluate_coco(results, gt)
    assert list(k for k in metrics if k not in ("per_class", "curves")) == STAT_NAMES
    got = np.array([metrics[k] for k in STAT_NAMES])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert 0.0 < metrics["AP"] < 1.0


def test_per_class_ap_equals_single_category_pycocotools(tmp_path):
    gt, results = make_synthetic(5)
    metrics = evaluate_coco(results, gt)
    assert list(metrics["per_class"]) == ["class1", "class3", "class5"]
    for cat in gt["categories"]:
        expected = pycocotools_by_hand(gt, results, tmp_path, cat_ids=[cat["id"]])[0]
        assert metrics["per_class"][cat["name"]] == pytest.approx(expected, abs=1e-12)


def test_inputs_are_not_modified_and_paths_work(tmp_path):
    gt, results = make_synthetic(3)
    gt_before, results_before = copy.deepcopy(gt), copy.deepcopy(results)
    from_objects = evaluate_coco(results, gt)
    assert gt == gt_before and results == results_before  # pycocotools writes into both otherwise
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(results))
    from_files = evaluate_coco(str(tmp_path / "res.json"), tmp_path / "gt.json")
    assert all(from_files[k] == from_objects[k] for k in STAT_NAMES)


def test_perfect_detections_give_ap_one():
    gt, _ = make_synthetic(4)
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"] if not a["iscrowd"]]
    metrics = evaluate_coco(results, gt)
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "ARs", "ARm", "ARl"):
        assert metrics[name] == 1.0, name
    assert all(v == 1.0 for v in metrics["per_class"].values())


def grid_case() -> tuple[dict, list[dict]]:
    """One image with 150 disjoint 20x20 GTs of one class and a perfect detection for each."""
    anns, results = [], []
    for i in range(150):
        x, y = 30.0 * (i % 15), 30.0 * (i // 15)
        anns.append({"id": i + 1, "image_id": 1, "category_id": 1, "bbox": [x, y, 20.0, 20.0], "area": 400.0, "iscrowd": 0})
        results.append({"image_id": 1, "category_id": 1, "bbox": [x, y, 20.0, 20.0], "score": 1.0 - i / 1000})
    gt = {"images": [{"id": 1, "width": 460, "height": 310}], "annotations": anns,
          "categories": [{"id": 1, "name": "dot"}]}
    return gt, results


def test_default_cap_of_100_truncates_dense_images():
    gt, results = grid_case()
    metrics = evaluate_coco(results, gt)
    # The 100 best detections are all TPs: recall 100/150 at every IoU, precision 1 up to it.
    assert metrics["AR100"] == pytest.approx(100 / 150, abs=1e-12)
    assert metrics["AR1"] == pytest.approx(1 / 150, abs=1e-12)
    assert metrics["AR10"] == pytest.approx(10 / 150, abs=1e-12)
    # Recall thresholds 0.00 .. 0.66 (67 of 101) are reached with precision 1, the rest not at all.
    assert metrics["AP"] == pytest.approx(67 / 101, abs=1e-12)


def test_max_dets_300_renames_ar_and_counts_every_detection(tmp_path):
    gt, results = grid_case()
    metrics = evaluate_coco(results, gt, max_dets=(1, 10, 300))
    assert "AR300" in metrics and "AR100" not in metrics
    assert metrics["AP"] == 1.0 and metrics["AP50"] == 1.0 and metrics["AR300"] == 1.0
    assert metrics["AR1"] == pytest.approx(1 / 150, abs=1e-12)
    assert metrics["AR10"] == pytest.approx(10 / 150, abs=1e-12)
    assert metrics["APm"] == -1.0 and metrics["ARl"] == -1.0  # no medium/large GT: undefined
    # pycocotools' summarize reads everything but AP at maxDets[0..2], so those 11 agree.
    expected = pycocotools_by_hand(gt, results, tmp_path, max_dets=(1, 10, 300))
    got = [metrics[k] for k in ["AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR300", "ARs", "ARm", "ARl"]]
    np.testing.assert_allclose(got, expected[1:], rtol=0, atol=1e-12)
    assert "AR300" in format_table(metrics) and "maxDets=300" in format_table(metrics)


def test_max_dets_order_and_validation():
    gt, results = grid_case()
    assert evaluate_coco(results, gt, max_dets=(300, 1, 10))["AR300"] == 1.0  # sorted like COCOeval
    with pytest.raises(ValueError, match="max_dets"):
        evaluate_coco(results, gt, max_dets=(0, 10))


def test_empty_results_give_zeros():
    gt, _ = make_synthetic(0)
    metrics = evaluate_coco([], gt)
    assert all(metrics[k] == 0.0 for k in STAT_NAMES)
    assert all(v == 0.0 for v in metrics["per_class"].values())


def test_unknown_image_or_category_is_a_clear_error():
    gt, results = make_synthetic(0)
    with pytest.raises(ValueError, match=r"image id\(s\) not in the ground truth.*999"):
        evaluate_coco(results + [{"image_id": 999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}], gt)
    with pytest.raises(ValueError, match=r"category id\(s\) \[2\]"):
        evaluate_coco(results + [{"image_id": 10, "category_id": 2, "bbox": [0, 0, 5, 5], "score": 0.5}], gt)
    with pytest.raises(ValueError, match="record #1 has no 'score'"):
        evaluate_coco([results[0], {"image_id": 10, "category_id": 1, "bbox": [0, 0, 1, 1]}], gt)


def test_class_names_override_and_table():
    gt, results = make_synthetic(1)
    metrics = evaluate_coco(results, gt, class_names=["cat", "dog", "bird"])
    assert list(metrics["per_class"]) == ["cat", "dog", "bird"]
    table = format_table(metrics)
    assert table.count("\n") >= 13 and "maxDets=100" in table and "dog" in table
    with pytest.raises(ValueError, match="class_names has 2 names"):
        evaluate_coco(results, gt, class_names=["a", "b"])


def test_detections_to_coco_converts_boxes_and_labels():
    dets = [
        {"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.5, 1.5, 2.5, 3.0]]),
         "scores": torch.tensor([0.9, 0.25]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    records = detections_to_coco(dets, image_ids=[7, 8], category_ids=[1, 3, 5])
    assert records == [
        {"image_id": 7, "category_id": 1, "bbox": [10.0, 20.0, 20.0, 40.0], "score": pytest.approx(0.9)},
        {"image_id": 7, "category_id": 5, "bbox": [0.5, 1.5, 2.0, 1.5], "score": 0.25},
    ]
    assert [r["category_id"] for r in detections_to_coco(dets, [7, 8])] == [1, 3]  # label + 1
    json.dumps(records)  # plain Python numbers
    with pytest.raises(ValueError, match="label 2 outside 0..1"):
        detections_to_coco(dets, [7, 8], category_ids=[1, 3])
    with pytest.raises(ValueError, match="2 detection dicts but 1 image ids"):
        detections_to_coco(dets, [7])


def test_detections_to_coco_round_trip_perfect_ap():
    gt, _ = make_synthetic(2)
    cat_ids = [c["id"] for c in gt["categories"]]
    image_ids = [img["id"] for img in gt["images"]]
    dets = []
    for img_id in image_ids:
        anns = [a for a in gt["annotations"] if a["image_id"] == img_id and not a["iscrowd"]]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
        dets.append({"boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
                     "scores": torch.ones(len(anns)),
                     "labels": torch.tensor([cat_ids.index(a["category_id"]) for a in anns], dtype=torch.long)})
    metrics = evaluate_coco(detections_to_coco(dets, image_ids, cat_ids), gt)
    assert metrics["AP"] == pytest.approx(1.0, abs=1e-12)

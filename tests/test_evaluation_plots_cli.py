"""Precision-recall plots are valid PNGs; the results-file helper evaluates files end to end."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image
from test_evaluation_coco import STAT_NAMES, make_synthetic
from test_evaluation_voc import HAND_AP07, HAND_AP10, coco_case

from densedet.commands.eval import eval_results_main
from densedet.evaluation import (
    evaluate_coco,
    evaluate_voc_from_coco,
    plot_pr_curves,
)


def assert_valid_pngs(paths):
    for path in paths:
        with Image.open(path) as img:
            assert img.format == "PNG"
            img.verify()


def test_coco_pr_curves_written(tmp_path):
    gt, results = make_synthetic(0)
    metrics = evaluate_coco(results, gt)
    curves = metrics["curves"]
    assert set(curves) == {"class1", "class3", "class5"}
    recall, precision = curves["class1"]["IoU=0.50"]
    assert recall.shape == precision.shape == (101,)
    assert np.all(np.diff(precision) <= 0)  # COCO precision is already the envelope
    paths = plot_pr_curves(metrics, tmp_path / "coco")
    assert [p.name for p in paths] == ["pr_class1.png", "pr_class3.png", "pr_class5.png", "pr_overall.png"]
    assert_valid_pngs(paths)


def test_plot_from_an_accumulated_cocoeval(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, results = make_synthetic(1)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
    paths = plot_pr_curves(ev, tmp_path)
    assert len(paths) == 4 and paths[0].name == "pr_1.png"  # named by category id
    assert_valid_pngs(paths)


def test_voc_pr_curves_written(tmp_path):
    gt, results = coco_case()
    metrics = evaluate_voc_from_coco(results, gt)
    paths = plot_pr_curves(metrics, tmp_path)
    assert [p.name for p in paths] == ["pr_car.png", "pr_bus.png", "pr_overall.png"]
    assert_valid_pngs(paths)


def test_plot_rejects_other_inputs(tmp_path):
    with pytest.raises(ValueError, match="'curves'"):
        plot_pr_curves({"AP": 0.5}, tmp_path)
    with pytest.raises(TypeError):
        plot_pr_curves([1, 2], tmp_path)


def write_files(tmp_path, gt, results):
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text(json.dumps(results))
    return str(tmp_path / "results.json"), str(tmp_path / "gt.json")


def test_eval_results_main_coco(tmp_path, capsys):
    gt, results = make_synthetic(2)
    res_path, gt_path = write_files(tmp_path, gt, results)
    out = tmp_path / "out" / "metrics.json"
    summary = eval_results_main(res_path, gt_path, metric="coco", out=str(out), max_dets=(1, 10, 100),
                                plot_dir=tmp_path / "plots")
    saved = json.loads(out.read_text())
    assert saved == summary
    assert list(saved) == STAT_NAMES + ["per_class"]
    direct = evaluate_coco(results, gt)
    assert all(saved[k] == direct[k] for k in STAT_NAMES)
    assert saved["per_class"] == direct["per_class"]
    printed = capsys.readouterr().out
    assert "maxDets=100" in printed and "class3" in printed
    assert_valid_pngs(sorted((tmp_path / "plots").glob("*.png")))


def test_eval_results_main_coco_custom_max_dets(tmp_path):
    gt, results = make_synthetic(2)
    res_path, gt_path = write_files(tmp_path, gt, results)
    summary = eval_results_main(res_path, gt_path, metric="coco", out=None, max_dets=(1, 10, 300))
    assert "AR300" in summary and "AR100" not in summary


@pytest.mark.parametrize("metric,expected_car", [("voc07", HAND_AP07), ("voc10", HAND_AP10)])
def test_eval_results_main_voc(tmp_path, metric, expected_car):
    gt, results = coco_case()
    gt["categories"].append({"id": 11, "name": "tram"})  # no GT: written as null, not in the mean
    res_path, gt_path = write_files(tmp_path, gt, results)
    out = tmp_path / "voc.json"
    summary = eval_results_main(res_path, gt_path, metric=metric, out=out)
    saved = json.loads(out.read_text())
    assert saved == summary and set(saved) == {"mAP", "per_class"}
    assert saved["per_class"]["car"] == pytest.approx(expected_car, abs=1e-15)
    assert saved["per_class"]["tram"] is None
    assert saved["mAP"] == pytest.approx((expected_car + 1.0) / 2, abs=1e-15)


def test_eval_results_main_rejects_unknown_metric(tmp_path):
    gt, results = coco_case()
    res_path, gt_path = write_files(tmp_path, gt, results)
    with pytest.raises(ValueError, match="metric must be one of"):
        eval_results_main(res_path, gt_path, metric="voc12", out=None)

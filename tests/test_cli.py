"""The ``densedet`` command: help for every verb, errors that name the bad key (exit 2), and
``densedet eval`` on a results file and on a checkpoint."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from densedet.cli import build_parser, main, parse_args
from densedet.config import save_config, to_dict
from densedet.data import load_coco
from densedet.engine.checkpoint import CHECKPOINT_FORMAT, atomic_save, model_from_checkpoint
from densedet.engine.evaluate import predict_dataset
from densedet.evaluation import evaluate_coco
from densedet.models import build_from_config

REPO = Path(__file__).resolve().parent.parent


def verbs() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def squash(text: str) -> str:
    return " ".join(text.split())


def test_python_m_densedet_help_lists_the_verbs():
    run = subprocess.run([sys.executable, "-m", "densedet", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: densedet")
    for verb in ("demo", "train", "eval"):
        assert verb in run.stdout


@pytest.mark.parametrize("verb", sorted(verbs()))
def test_every_verb_has_a_help_that_describes_it(verb, capsys):
    description = verbs()[verb].description
    assert description and len(description.split()) >= 5, f"densedet {verb} has no description"
    with pytest.raises(SystemExit) as info:
        main([verb, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: densedet {verb}")
    assert squash(description)[:60] in squash(out)


def test_the_core_verbs_are_registered():
    assert {"demo", "train", "eval"} <= set(verbs())


def test_overrides_may_follow_options():
    args = parse_args(["train", "c.yaml", "solver.lr=0.1", "--weights", "w.pt", "train.batch_size=8"])
    assert args.config == "c.yaml" and args.weights == "w.pt"
    assert args.overrides == ["solver.lr=0.1", "train.batch_size=8"]
    args = parse_args(["eval", "--weights", "w.pt", "model.min_size=384"])
    assert args.overrides == ["model.min_size=384"]
    with pytest.raises(SystemExit):
        parse_args(["train", "c.yaml", "--weights", "w.pt", "--no-such-flag"])
    with pytest.raises(SystemExit):
        parse_args(["train", "c.yaml", "--weights", "w.pt", "stray"])


# -- bad configs: exit 2 with the key named ---------------------------------------------------------

@pytest.fixture
def config_file(tiny_config, tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    save_config(tiny_config(), path)
    return path


@pytest.mark.parametrize("override, named", [
    ("model.no_such_option=3", "model.no_such_option"),
    ("nosection.lr=3", "nosection"),
    ("train.max_iters=many", "train.max_iters"),
    ("solver.lr=[1, 2]", "solver.lr"),
    ("train.batch_size=0", "train.batch_size"),
])
def test_train_with_a_bad_override_exits_2_naming_the_key(config_file, override, named, capsys):
    assert main(["train", str(config_file), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("densedet train: error:") and named in err and str(config_file) in err


def test_train_with_a_missing_config_exits_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_train_with_a_class_count_that_does_not_fit_the_data_exits_2(config_file, capsys, restore_torch_globals):
    assert main(["train", str(config_file), "model.num_classes=5"]) == 2
    err = capsys.readouterr().err
    assert "model.num_classes is 5 but the training data has 10 classes" in err


def test_eval_without_weights_or_results_says_what_it_needs(capsys):
    assert main(["eval"]) == 2
    assert "--weights" in capsys.readouterr().err
    assert main(["eval", "--results", "r.json"]) == 2
    assert "--annotations" in capsys.readouterr().err


# -- densedet eval -------------------------------------------------------------------------------

def test_eval_of_a_results_file(digit_scenes, tmp_path, capsys):
    """The ground truth itself as results scores AP 1; shifting every box by its width scores 0."""
    gt = json.loads(Path(digit_scenes["val_json"]).read_text())
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"]]
    shifted = [dict(r, bbox=[r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3]] + r["bbox"][2:])
               for r in perfect]
    for results, ap in ((perfect, 1.0), (shifted, 0.0)):
        results_path, out = tmp_path / "results.json", tmp_path / "metrics.json"
        results_path.write_text(json.dumps(results))
        assert main(["eval", "--results", str(results_path), "--annotations", digit_scenes["val_json"],
                     "--out", str(out)]) == 0
        assert "AP" in capsys.readouterr().out
        assert json.loads(out.read_text())["AP"] == pytest.approx(ap)


@pytest.fixture
def untrained_checkpoint(tiny_config, tmp_path) -> Path:
    """An untrained tiny model's checkpoint whose config points at the validation scenes."""
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_from_config(cfg.model)
    path = tmp_path / "tiny.pt"
    atomic_save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": to_dict(cfg),
                 "class_names": [str(i) for i in range(10)], "category_ids": list(range(1, 11)),
                 "iteration": 0}, path)
    return path


def test_eval_of_a_checkpoint_prints_the_table_and_writes_json(untrained_checkpoint, digit_scenes, tmp_path,
                                                               capsys):
    """``densedet eval --weights`` equals predicting and scoring by hand with the library. The
    untrained model's scores sit near its prior (0.01), so model.score_thresh=0.001 is passed
    as an override to get detections to compare."""
    out = tmp_path / "eval" / "metrics.json"
    code = main(["eval", "--weights", str(untrained_checkpoint), "--out", str(out), "--precision", "fp32",
                 "model.score_thresh=0.001"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "AP" in printed and "AP50" in printed
    metrics = json.loads(out.read_text())
    detections = json.loads((out.parent / "metrics_detections.json").read_text())

    model, _, _ = model_from_checkpoint(untrained_checkpoint, score_thresh=0.001)
    data = load_coco(digit_scenes["val_json"], digit_scenes["val_images"])
    expected = predict_dataset(model, data, batch_size=4)
    assert len(expected) > 0
    assert len(detections) == len(expected)
    assert min(d["score"] for d in detections) >= 0.001
    for got, want in zip(detections, expected):
        assert got["image_id"] == want["image_id"] and got["category_id"] == want["category_id"]
        assert got["bbox"] == pytest.approx(want["bbox"], abs=1e-3)
    reference = evaluate_coco(expected, digit_scenes["val_json"])
    for key in ("AP", "AP50", "AP75", "AR100"):
        assert metrics[key] == pytest.approx(reference[key], abs=1e-6)


def test_eval_of_a_checkpoint_runs_the_configs_tta(untrained_checkpoint, digit_scenes, tmp_path, capsys):
    """test.tta_scales (from the checkpoint's config or, here, an override) makes ``densedet eval``
    predict with that test-time augmentation."""
    from densedet.tta import TTAConfig
    out = tmp_path / "metrics.json"
    assert main(["eval", "--weights", str(untrained_checkpoint), "--out", str(out), "--precision", "fp32",
                 "model.score_thresh=0.001", "test.tta_scales=[128,192]"]) == 0
    assert "test-time augmentation (test.tta_*): scales [128, 192]" in capsys.readouterr().err
    detections = json.loads((tmp_path / "metrics_detections.json").read_text())
    model, _, _ = model_from_checkpoint(untrained_checkpoint, score_thresh=0.001)
    data = load_coco(digit_scenes["val_json"], digit_scenes["val_images"])
    expected = predict_dataset(model, data, batch_size=4, tta=TTAConfig(scales=(128, 192), flip=False))
    assert len(detections) == len(expected) > 0
    assert [d["bbox"] for d in expected] != [d["bbox"] for d in predict_dataset(model, data, batch_size=4)]
    for got, want in zip(detections, expected):
        assert got["image_id"] == want["image_id"] and got["category_id"] == want["category_id"]
        assert got["bbox"] == pytest.approx(want["bbox"], abs=1e-3)


def test_eval_of_a_checkpoint_that_does_not_fit_its_overrides_exits_2(untrained_checkpoint, capsys):
    assert main(["eval", "--weights", str(untrained_checkpoint), "model.num_classes=5"]) == 2
    err = capsys.readouterr().err
    assert "cls_logits.weight" in err and "shape mismatch" in err


def test_eval_of_a_checkpoint_on_some_of_its_classes_scores_them_by_name(untrained_checkpoint, digit_scenes,
                                                                         tmp_path, capsys):
    """A validation set with 3 of the 10 digit classes, listed in another order: its labels are matched
    to the model's by name and only those 3 are scored. A class the model does not have is an error
    that names the file and the class."""
    gt = json.loads(Path(digit_scenes["val_json"]).read_text())
    gt["categories"] = [c for c in gt["categories"] if c["id"] <= 3][::-1]
    gt["annotations"] = [a for a in gt["annotations"] if a["category_id"] <= 3]
    three = tmp_path / "val3.json"
    three.write_text(json.dumps(gt))
    out = tmp_path / "m.json"
    assert main(["eval", "--weights", str(untrained_checkpoint), f"data.val={three}", "--out", str(out)]) == 0
    per_class = json.loads(out.read_text())["per_class"]
    names = [c["name"] for c in gt["categories"]]
    assert sorted(k for k, v in per_class.items() if v is not None and v >= 0) == sorted(names)
    gt["categories"].append({"id": 99, "name": "ten"})
    three.write_text(json.dumps(gt))
    assert main(["eval", "--weights", str(untrained_checkpoint), f"data.val={three}"]) == 2
    err = capsys.readouterr().err
    assert "val3.json: classes 'ten' are not among the 10 training classes" in err


@pytest.mark.parametrize("config, family", [("demo_digits", "RetinaNet resnet18-FPN"),
                                            ("refinedet_demo_digits", "RefineDet320 resnet18")])
def test_the_demo_banner_names_the_configs_model(config, family, monkeypatch, tmp_path, capsys):
    from densedet.commands import train as train_verb
    seen = {}

    def fake_train(cfg, resume=False):
        seen["arch"] = cfg.model.arch
        return {key: 0.0 for key in (*train_verb.DEMO_METRICS, "train_minutes", "images_per_s")} | {
            "iterations": 0, "single_scale": {}}
    monkeypatch.setattr(train_verb, "train", fake_train)
    main(["demo", "--config", config, "--output-dir", str(tmp_path / "run")])
    assert f"; {family} for 10 minutes;" in capsys.readouterr().err

"""The main paths end to end, on tiny budgets: ``densedet demo`` (its table and metrics.json),
periodic evaluation and ``model_best.pt``, ``densedet train --weights/--output-dir``, the run's
pictures (rendered for real), and ``densedet eval --weights`` with VOC metrics, the tune split and
``--plot-dir``. ONNX export in "fit" mode is in ``test_main_paths_export.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densedet.cli import main
from densedet.commands.train import DEMO_METRICS
from densedet.config import find_config, save_config
from densedet.data import load_coco, to_coco_dict
from densedet.engine import finish, report, trainer
from densedet.engine.checkpoint import load_checkpoint
from densedet.engine.trainer import train
from densedet.evaluation import evaluate_voc_from_coco

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRIC_KEYS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def assert_png(path: Path, min_side: int = 32) -> tuple[int, int]:
    """``path`` is a complete PNG (decodes to the last byte) of at least ``min_side`` px a side."""
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    with Image.open(path) as image:
        image.load()                                   # a truncated file fails here
        assert min(image.size) >= min_side, (path, image.size)
        return image.size


def fake_metrics(ap: float) -> dict:
    """An evaluation result with every COCO number derived from ``ap`` (distinct per key)."""
    return {**{k: round(ap + 0.001 * i, 6) for i, k in enumerate(METRIC_KEYS)}, "per_class": {}}


# ------------------------------------------------------------------------------------------------
# densedet demo
# ------------------------------------------------------------------------------------------------

DEMO_OVERRIDES = [
    "data.num_train=4", "data.num_val=2", "data.num_tune=2",       # 320 px scenes: ~0.1 s each
    "train.max_minutes=0", "train.max_iters=2", "train.pretrain_iters=0", "train.batch_size=2",
    "train.precision=fp32", "train.channels_last=false",
    "model.min_size=128", "model.max_size=128", "data.train_min_sizes=[128]", "data.crop_sizes=[]",
    "model.retinanet.fpn_channels=32", "model.retinanet.head_convs=1",
    "test.tta_scales=[96,128]", "test.num_vis=2",
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, keep_torch_globals):
    """``densedet demo`` on 4+2 scenes for 2 iterations, with TTA (two table rows). Evaluation runs
    for real; its numbers are then replaced by distinct known ones (an untrained model scores 0
    everywhere, which would hide a swapped row or column): single scale from 0.1, TTA from 0.5."""
    root = tmp_path_factory.mktemp("demo")
    out, data_root = root / "run", root / "scenes"
    real_evaluate, calls = finish.evaluate_model, []

    def evaluate(*args, **kwargs):
        metrics = real_evaluate(*args, **kwargs)
        calls.append(kwargs.get("tta"))
        return {**metrics, **fake_metrics(0.1 if kwargs.get("tta") is None else 0.5)}

    stdout, stderr = io.StringIO(), io.StringIO()
    with keep_torch_globals(), pytest.MonkeyPatch.context() as mp, \
            contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        mp.setattr(finish, "evaluate_model", evaluate)
        code = main(["demo", f"data.root={data_root}", *DEMO_OVERRIDES, "--output-dir", str(out)])
    return {"code": code, "out": out, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(), "calls": calls,
            "data_root": data_root}


def _table(stdout: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert set(lines[1]) <= set("|-"), lines
    return cells[0], cells[2:]


def test_find_config_finds_shipped_configs_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                 # away from the checkout's configs/ folder
    demo = find_config("demo_digits")
    assert demo.name == "demo_digits.yaml" and demo.is_file()
    assert find_config("demo_digits.yaml") == demo == find_config("configs/demo_digits.yaml")
    assert demo.parent.parent.name == "densedet"                   # the copy shipped in the package
    (tmp_path / "demo_digits").write_text("model: {}\n")             # a file as given wins over the name
    assert find_config("demo_digits") == Path("demo_digits")
    with pytest.raises(FileNotFoundError, match="tiny_digits"):     # the error lists what is shipped
        find_config("no_such_config")


def test_demo_prints_one_row_per_evaluation_with_the_numbers_of_metrics_json(demo_run):
    assert demo_run["code"] == 0, demo_run["stderr"][-2000:]
    assert [t is None for t in demo_run["calls"]] == [True, False]          # single scale, then TTA
    header, rows = _table(demo_run["stdout"])
    assert header == ["evaluation", *DEMO_METRICS, "train min", "img/s"]
    saved = json.loads((demo_run["out"] / "metrics.json").read_text())
    assert [r[0] for r in rows] == ["single scale", "TTA 96/128 vote"]
    assert saved["tta"] == {"scales": [96, 128], "flip": False, "rotate": False, "merge": "vote"}
    for row, numbers in zip(rows, (saved["single_scale"], saved)):
        assert len(row) == len(header)
        assert row[1:len(DEMO_METRICS) + 1] == [f"{numbers[k]:.3f}" for k in DEMO_METRICS]
        assert row[-2:] == [f"{saved['train_minutes']:.1f}", f"{saved['images_per_s']:.1f}"]
    # metrics.json holds what the evaluations returned: the TTA numbers on top, single scale kept apart
    assert {k: saved[k] for k in METRIC_KEYS} == {k: v for k, v in fake_metrics(0.5).items() if k in METRIC_KEYS}
    assert saved["single_scale"]["AP"] == 0.1 and saved["iterations"] == 2


def test_demo_leaves_a_complete_run_folder(demo_run):
    out = demo_run["out"]
    for name in ("config.yaml", "last.pt", "model_final.pt", "model_best.pt", "metrics.json", "metrics.jsonl",
                 "report.html"):
        assert (out / name).is_file(), name
    assert "densedet demo: 4 training / 2 validation digit scenes" in demo_run["stderr"]
    final = load_checkpoint(out / "model_final.pt")
    assert final["iteration"] == 2 and final["metrics"]["AP"] == 0.5
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "loss" in r] == [2]          # log_period 10: only the end


def test_demo_draws_its_curves_and_predictions_for_real(demo_run):
    """Nothing replaces the pictures here: a plotting error shows as the log line, and fails."""
    out = demo_run["out"]
    assert "could not draw plots" not in demo_run["stderr"]
    assert assert_png(out / "curves.png", 200) == (675, 324)    # no periodic evaluation: 2 panels, 7.5 x 3.6 in at 90 dpi
    drawn = sorted((out / "predictions").glob("*.png"))
    val = load_coco(str(demo_run["data_root"] / "val.json"), str(demo_run["data_root"] / "val"))
    assert [p.stem for p in drawn] == sorted(Path(r.file_name).stem for r in val.records)   # num_vis 2 of 2
    for path in drawn:
        assert assert_png(path) == (320 + 8 + 320, 320)     # ground truth and detections, at the scene's size


# ------------------------------------------------------------------------------------------------
# plots and drawings, directly
# ------------------------------------------------------------------------------------------------

def test_plot_curves_renders_losses_lr_and_evaluations(tmp_path):
    rows = [{"iteration": i, "lr": 0.01 * i, "loss": 3.0 / i, "loss_cls": 2.0 / i, "loss_box": 1.0 / i}
            for i in range(1, 6)] + [{"iteration": 4, "eval": fake_metrics(0.3)}]
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report.plot_curves(jsonl, tmp_path / "curves.png")
    assert assert_png(tmp_path / "curves.png", 200) == (990, 324)          # 3 panels: 11 x 3.6 in at 90 dpi
    # without evaluations, no validation panel
    jsonl.write_text("\n".join(json.dumps(r) for r in rows[:-1]) + "\n")
    report.plot_curves(jsonl, tmp_path / "train_only.png")
    assert assert_png(tmp_path / "train_only.png", 200) == (675, 324)
    # no training rows: no file (and no error)
    jsonl.write_text(json.dumps(rows[-1]) + "\n")
    report.plot_curves(jsonl, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_draw_predictions_writes_one_png_per_image(tiny_config, digit_scenes, tmp_path):
    from densedet.models import build_from_config
    torch.manual_seed(0)
    model = build_from_config(tiny_config().model)
    model.score_thresh = 0.001                  # an untrained model scores near its prior, 0.01
    data = load_coco(digit_scenes["val_json"], digit_scenes["val_images"])
    report.draw_predictions(model, data, tmp_path / "pred", 3, score_thresh=0.0)
    drawn = sorted((tmp_path / "pred").glob("*.png"))
    assert [p.stem for p in drawn] == sorted(Path(r.file_name).stem for r in data.records[:3])
    for path in drawn:
        assert assert_png(path) == (128 + 8 + 128, 128)     # ground truth, 8 px, detections
    # score_thresh 0 draws boxes: both halves differ from the scene
    scene = np.asarray(Image.open(data.records[0].file_name).convert("RGB"))
    drawn_scene = np.asarray(Image.open(tmp_path / "pred" / f"{Path(data.records[0].file_name).stem}.png"))
    for half in (drawn_scene[:, :128], drawn_scene[:, 136:]):
        assert half.shape == scene.shape and (half != scene).any(axis=-1).mean() > 0.01


def test_a_plotting_error_is_reported_and_the_run_still_finishes(tiny_config, restore_torch_globals, monkeypatch):
    """engine/finish.py keeps a finished run when a picture fails, and says so in the log."""
    def broken(*args, **kwargs):
        raise RuntimeError("matplotlib exploded")

    monkeypatch.setattr(report, "plot_curves", broken)
    monkeypatch.setattr(report, "draw_predictions", lambda *a, **k: None)
    monkeypatch.setattr(report, "write_run_report", lambda *a, **k: None)     # tests/test_report.py has its own
    cfg = tiny_config()
    cfg.train.max_iters, cfg.data.train_min_sizes = 1, []
    lines: list[str] = []
    summary = train(cfg, log=lines.append)
    assert summary["iterations"] == 1
    out = Path(cfg.train.output_dir)
    assert (out / "metrics.json").is_file() and (out / "model_final.pt").is_file()
    assert "(could not draw plots: matplotlib exploded)" in lines
    assert lines[-1].startswith("run folder:")                              # reported, then the run ends as usual


@pytest.mark.parametrize("failing", ["plot_curves", "draw_predictions"])
def test_one_picture_failing_loses_neither_the_other_nor_the_run(tiny_config, restore_torch_globals, monkeypatch,
                                                                  failing):
    """The curves and the drawn predictions are tried apart: when one raises, the other is still made,
    the failure is named in the log, and the run ends as usual."""
    made: list[str] = []

    def broken(*args, **kwargs):
        raise RuntimeError(f"{failing} exploded")

    for name in ("plot_curves", "draw_predictions"):
        monkeypatch.setattr(report, name, broken if name == failing else (lambda *a, _n=name, **k: made.append(_n)))
    monkeypatch.setattr(report, "write_run_report", lambda *a, **k: None)         # tests/test_report.py has its own
    cfg = tiny_config()
    cfg.train.max_iters, cfg.data.train_min_sizes = 1, []
    lines: list[str] = []
    assert train(cfg, log=lines.append)["iterations"] == 1
    other = "draw_predictions" if failing == "plot_curves" else "plot_curves"
    assert made == [other]                                                   # the other picture was still made
    what = "plots" if failing == "plot_curves" else "predictions"
    assert f"(could not draw {what}: {failing} exploded)" in lines
    assert (Path(cfg.train.output_dir) / "model_final.pt").is_file() and lines[-1].startswith("run folder:")


# ------------------------------------------------------------------------------------------------
# periodic evaluation and model_best.pt
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("final_ap, best_iteration", [(0.5, 4), (0.9, 6)])
def test_model_best_holds_the_weights_of_the_best_evaluation(tiny_config, restore_torch_globals, no_plots,
                                                             monkeypatch, final_ap, best_iteration):
    """train.eval_period 1 over 6 iterations evaluates after steps 1-5 (the APs below, the best 0.6
    after step 4), then the final model (``final_ap``). model_best.pt must hold the weights that
    scored the best AP: step 4's, or the final ones when those score higher."""
    periodic_aps = [0.1, 0.4, 0.3, 0.6, 0.2]
    snapshots: list[dict] = []

    def periodic(model, *args, **kwargs):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return fake_metrics(periodic_aps[len(snapshots) - 1])

    monkeypatch.setattr(trainer, "evaluate_model", periodic)
    monkeypatch.setattr(finish, "evaluate_model", lambda *a, **k: fake_metrics(final_ap))
    cfg = tiny_config()
    cfg.train.eval_period, cfg.train.max_iters, cfg.train.checkpoint_period = 1, 6, 6
    cfg.data.train_min_sizes = []
    train(cfg, log=lambda _: None)
    out = Path(cfg.train.output_dir)

    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["iteration"], r["eval"]["AP"]) for r in evals if "eval" in r]
    assert evals == list(zip(range(1, 6), periodic_aps))
    best, final = load_checkpoint(out / "model_best.pt"), load_checkpoint(out / "model_final.pt")
    assert best["iteration"] == best_iteration
    assert best["metrics"]["AP"] == max(max(periodic_aps), final_ap)
    expected = snapshots[best_iteration - 1] if best_iteration <= len(snapshots) else final["model"]
    for key, value in expected.items():
        assert torch.equal(best["model"][key], value), key
    assert not torch.equal(best["model"]["head.classification_head.cls_logits.weight"],
                           snapshots[0]["head.classification_head.cls_logits.weight"])   # the weights moved


# ------------------------------------------------------------------------------------------------
# densedet train --weights --output-dir
# ------------------------------------------------------------------------------------------------

def test_train_weights_starts_from_them_and_output_dir_takes_the_files(tiny_config, tmp_path, restore_torch_globals,
                                                                       no_plots, monkeypatch):
    from densedet.config import to_dict
    from densedet.engine.checkpoint import CHECKPOINT_FORMAT, atomic_save
    from densedet.models import build_from_config
    cfg = tiny_config("configured")                 # train.output_dir the command line overrides
    config_path = tmp_path / "tiny.yaml"
    save_config(cfg, config_path)
    torch.manual_seed(123)
    start = build_from_config(cfg.model).state_dict()
    start = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in start.items()}   # no init could match
    weights = tmp_path / "start.pt"
    atomic_save({"format": CHECKPOINT_FORMAT, "model": start, "config": to_dict(cfg),
                 "class_names": [str(i) for i in range(10)], "category_ids": list(range(1, 11)), "iteration": 0},
                weights)

    first_step: list[dict] = []
    real_step = trainer.run_step

    def spy(parts, *args, **kwargs):
        if not first_step:
            first_step.append({k: v.detach().clone() for k, v in parts.model.state_dict().items()})
        return real_step(parts, *args, **kwargs)

    monkeypatch.setattr(trainer, "run_step", spy)
    out = tmp_path / "elsewhere"
    assert main(["train", str(config_path), "train.max_iters=1", "--weights", str(weights),
                 "--output-dir", str(out)]) == 0
    assert first_step[0].keys() == start.keys()
    for key, value in start.items():
        assert torch.equal(first_step[0][key], value), key
    for name in ("config.yaml", "last.pt", "model_final.pt", "metrics.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert not Path(cfg.train.output_dir).exists()
    final = load_checkpoint(out / "model_final.pt")
    assert final["iteration"] == 1
    assert not torch.equal(final["model"]["head.classification_head.cls_logits.weight"],
                           start["head.classification_head.cls_logits.weight"])            # and it trained

    # without --weights the first step starts elsewhere (the check above can fail)
    first_step.clear()
    assert main(["train", str(config_path), "train.max_iters=1", "--output-dir", str(tmp_path / "scratch")]) == 0
    assert not torch.equal(first_step[0]["head.classification_head.cls_logits.weight"],
                           start["head.classification_head.cls_logits.weight"])


# ------------------------------------------------------------------------------------------------
# densedet eval --weights: VOC metrics, the tune split, --plot-dir
# ------------------------------------------------------------------------------------------------

def _tune_split(demo_run):
    root = demo_run["data_root"]
    assert (root / "tune.json").is_file()
    return load_coco(str(root / "tune.json"), str(root / "tune"))


def test_eval_on_the_tune_split_writes_its_detections_and_plots(demo_run, tmp_path, capsys, restore_torch_globals):
    assert demo_run["code"] == 0
    out, plots = tmp_path / "m.json", tmp_path / "plots"
    assert main(["eval", "--weights", str(demo_run["out"] / "model_final.pt"), "--split", "tune", "--precision",
                 "fp32", "--out", str(out), "--plot-dir", str(plots), "model.score_thresh=0.0001",
                 "test.tta_scales=[]"]) == 0
    tune = _tune_split(demo_run)
    detections = json.loads((tmp_path / "m_detections.json").read_text())
    assert detections and {d["image_id"] for d in detections} <= {r.image_id for r in tune.records}
    metrics = json.loads(out.read_text())
    assert set(METRIC_KEYS) <= set(metrics)
    written = sorted(p.name for p in plots.glob("*.png"))
    classes = {tune.class_names[int(label)] for r in tune.records for label in r.labels}
    assert written == sorted([f"pr_{c}.png" for c in classes] + ["pr_overall.png"])
    for name in written:
        assert_png(plots / name, 100)


@pytest.mark.parametrize("metric", ["voc07", "voc10"])
def test_eval_voc_metrics_on_the_tune_split(demo_run, tmp_path, capsys, monkeypatch, metric):
    """The model's predictions are replaced by a known list (the tune ground truth, every other box
    shifted off its object and ranked first), whose VOC07 (11-point) and VOC10 (area) mAPs differ:
    the printed and written mAP must be the one the metric names, on the tune split."""
    from densedet.commands import eval as eval_command
    tune = _tune_split(demo_run)
    gt = to_coco_dict(tune)
    results = []
    for i, ann in enumerate(gt["annotations"]):
        x, y, w, h = ann["bbox"]
        box = [x + w, y + h, w, h] if i % 2 else [x, y, w, h]
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": box,
                        "score": 0.9 - 0.001 * i + (0.05 if i % 2 else 0.0)})
    seen = []

    def predict(model, data, *args, **kwargs):
        seen.append(sorted(r.image_id for r in data.records))
        return results

    monkeypatch.setattr(eval_command, "predict_dataset", predict)
    out = tmp_path / "voc.json"
    assert main(["eval", "--weights", str(demo_run["out"] / "model_final.pt"), "--split", "tune", "--metric", metric,
                 "--out", str(out), "test.tta_scales=[]"]) == 0
    assert seen == [sorted(r.image_id for r in tune.records)]
    expected = {m: evaluate_voc_from_coco(results, gt, use_07_metric=(m == "voc07"))["mAP"]
                for m in ("voc07", "voc10")}
    assert abs(expected["voc07"] - expected["voc10"]) > 0.003           # the two metrics tell apart (0.405 / 0.399)
    written = json.loads(out.read_text())
    assert written["mAP"] == pytest.approx(expected[metric], abs=1e-9)
    assert f"mAP = {100 * expected[metric]:.2f}" in capsys.readouterr().out

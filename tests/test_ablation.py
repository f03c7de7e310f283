"""`densedet ablate` with the trainer replaced by a fake whose metrics depend on the loss settings."""

import argparse
import csv
import json

import pytest
import yaml

from densedet.commands import ablate as AB
from densedet.config import Config, to_dict
from densedet.data import DatasetError
from densedet.engine.trainer import TrainingError
from densedet.errors import UsageError


def base_config() -> Config:
    cfg = Config()
    cfg.train.max_iters = 900
    cfg.solver.steps = [600, 800]
    cfg.solver.warmup_iters = 90
    return cfg


class FakeTrain:
    """Records the config of every call; AP = 0.30 + 0.01·γ for FL, fixed values for the others."""

    def __init__(self, fail_on: str | None = None):
        self.calls = []
        self.fail_on = fail_on

    def __call__(self, cfg, resume=False, log=print):
        self.calls.append(cfg)
        m = cfg.model.retinanet
        if m.cls_loss == self.fail_on:
            raise RuntimeError("diverged | loss is nan")
        ap = {"focal": 0.30 + 0.01 * m.focal_gamma, "ohem": 0.25, "ohem_topk": 0.27, "ghmc": 0.33}[m.cls_loss]
        return {"AP": ap, "AP50": ap + 0.2, "AP75": ap + 0.02, "APs": float("nan")}


def test_paper_alphas_are_table_1b():
    assert [AB.paper_alpha(g) for g in (0, 0.1, 0.2, 0.5, 1, 2, 5)] == [.75, .75, .75, .5, .25, .25, .25]
    assert AB.paper_alpha(3.0) == 0.25 and AB.paper_alpha(0.05) == 0.75    # nearest tabulated γ


def test_plan_shares_the_fl_run_between_both_tables():
    runs = AB.plan_runs()
    names = [r.name for r in runs]
    assert names == ["fl_gamma0_alpha0.75", "fl_gamma0.5_alpha0.5", "fl_gamma1_alpha0.25", "fl_gamma2_alpha0.25",
                     "fl_gamma5_alpha0.25", "ohem", "ohem-topk", "ghmc"]
    fl = runs[3]
    assert fl.groups == ["gamma", "loss"] and fl.method == "FL"
    assert AB.plan_runs(gammas=None, methods=["FL"])[0].name == "fl_gamma2_alpha0.25"
    with pytest.raises(ValueError, match="unknown method"):
        AB.plan_runs(methods=["SGD"])


def test_run_config_sets_loss_budget_and_output(tmp_path):
    cfg = base_config()
    r = AB.AblationRun("fl_gamma0.5_alpha0.5", "FL", "focal", 0.5, 0.5)
    c = AB.run_config(cfg, r, tmp_path, budget_iters=90)
    assert (c.model.retinanet.cls_loss, c.model.retinanet.focal_gamma, c.model.retinanet.focal_alpha) == ("focal", 0.5, 0.5)
    assert c.train.max_iters == 90 and c.train.max_minutes == 0
    assert c.solver.steps == [60, 80] and c.solver.warmup_iters == 9     # 900-iteration schedule / 10
    assert c.train.output_dir == str(tmp_path / "runs" / "fl_gamma0.5_alpha0.5")
    assert cfg.model.retinanet.focal_gamma == 2.0 and cfg.train.max_iters == 900   # the base config is untouched
    c = AB.run_config(cfg, AB.AblationRun("ghmc", "GHM-C", "ghmc"), tmp_path, budget_minutes=2.5)
    assert c.train.max_minutes == 2.5 and c.train.max_iters == 900 and c.model.retinanet.focal_gamma == 2.0
    with pytest.raises(ValueError, match="exactly one"):
        AB.run_config(cfg, r, tmp_path)


def test_run_config_keeps_the_warmup_of_a_time_budgeted_config(tmp_path):
    # demo_digits.yaml: max_iters 100000 is only a cap, 10 minutes decide; its 20 warm-up
    # iterations must survive a 200-iteration budget (100000 -> 200 would scale them to 0).
    cfg = base_config()
    cfg.train.max_iters, cfg.train.max_minutes, cfg.solver.warmup_iters = 100_000, 10.0, 20
    c = AB.run_config(cfg, AB.AblationRun("fl", "FL", "focal", 2.0, 0.25), tmp_path, budget_iters=200)
    assert c.train.max_iters == 200 and c.train.max_minutes == 0 and c.solver.warmup_iters == 20


def test_sweep_trains_each_run_once_with_its_config_and_writes_tables(tmp_path):
    fake = FakeTrain()
    runs = AB.plan_runs()
    results = AB.run_ablation(base_config(), tmp_path, runs, budget_iters=30, train_fn=fake, log=lambda *_: None)
    assert len(fake.calls) == 8 and len(results) == 8
    seen = {(c.model.retinanet.cls_loss, c.model.retinanet.focal_gamma if c.model.retinanet.cls_loss == "focal" else None,
             c.model.retinanet.focal_alpha if c.model.retinanet.cls_loss == "focal" else None) for c in fake.calls}
    assert seen == {("focal", 0.0, 0.75), ("focal", 0.5, 0.5), ("focal", 1.0, 0.25), ("focal", 2.0, 0.25),
                    ("focal", 5.0, 0.25), ("ohem", None, None), ("ohem_topk", None, None), ("ghmc", None, None)}
    assert all(c.train.max_iters == 30 for c in fake.calls)
    assert len({c.train.output_dir for c in fake.calls}) == 8

    with open(tmp_path / "table_gamma.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(float(r["gamma"]), float(r["alpha"]), float(r["AP"])) for r in rows] == [
        (0.0, 0.75, 30.0), (0.5, 0.5, 30.5), (1.0, 0.25, 31.0), (2.0, 0.25, 32.0), (5.0, 0.25, 35.0)]
    assert float(rows[3]["AP50"]) == pytest.approx(52.0) and float(rows[3]["paper_AP"]) == 34.0
    md = (tmp_path / "table_gamma.md").read_text()
    assert "| γ | α | AP | AP50 | AP75 |" in md and "| 2 | 0.25 | 32.0 | 52.0 | 34.0 | 34.0 | 52.5 | 36.5 |" in md

    with open(tmp_path / "table_loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], float(r["AP"])) for r in rows] == [("FL", 32.0), ("OHEM 1:3", 25.0), ("OHEM", 27.0),
                                                               ("GHM-C", 33.0)]
    assert (tmp_path / "ap_vs_gamma.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert saved["budget_iters"] == 30 and saved["runs"][0]["metrics"]["APs"] is None   # NaN -> null


def test_finished_runs_are_reused_failed_ones_retried(tmp_path):
    cfg = base_config()
    runs = AB.plan_runs(gammas=[2.0], methods=["FL", "OHEM"])
    first = FakeTrain(fail_on="ohem_topk")
    results = AB.run_ablation(cfg, tmp_path, runs, budget_iters=30, train_fn=first, log=lambda *_: None)
    assert [r["error"] for r in results] == [None, "RuntimeError: diverged | loss is nan"]
    assert "failed: RuntimeError: diverged / loss is nan" in (tmp_path / "table_loss.md").read_text()
    second = FakeTrain()
    AB.run_ablation(cfg, tmp_path, runs, budget_iters=30, train_fn=second, log=lambda *_: None)
    assert [c.model.retinanet.cls_loss for c in second.calls] == ["ohem_topk"]          # only the failed run again
    third = FakeTrain()
    AB.run_ablation(cfg, tmp_path, runs, budget_iters=60, train_fn=third, log=lambda *_: None)
    assert len(third.calls) == 2                                              # another budget: train again


def test_cli_runs_the_sweep_with_the_trainer_patched(tmp_path, monkeypatch, capsys):
    fake = FakeTrain()
    monkeypatch.setattr(AB, "_default_train", lambda: fake)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(to_dict(base_config())))
    parser = argparse.ArgumentParser()
    AB.add_parser(parser.add_subparsers())
    args = parser.parse_args(["ablate", str(tmp_path / "cfg.yaml"), "model.num_classes=3", "--budget-iters", "20",
                              "--out", str(tmp_path / "out"), "--gammas", "0", "2", "--methods", "GHM-C"])
    assert args.func(args) == 0
    assert [(c.model.retinanet.cls_loss, c.model.num_classes) for c in fake.calls] == [("focal", 3)] * 2 + [("ghmc", 3)]
    printed = capsys.readouterr().out
    assert "| 0 | 0.75 | 30.0 |" in printed and "GHM-C" in printed
    with pytest.raises(SystemExit):
        parser.parse_args(["ablate", str(tmp_path / "cfg.yaml"), "--out", "x"])          # a budget is required
    bad = parser.parse_args(["ablate", str(tmp_path / "cfg.yaml"), "--budget-iters", "0", "--out", "x"])
    with pytest.raises(UsageError, match="--budget-iters"):    # densedet.cli.main: one line, exit code 2
        bad.func(bad)


def test_a_diverged_run_is_recorded_but_bad_data_stops_the_sweep(tmp_path):
    runs = AB.plan_runs(gammas=[0.0, 2.0], methods=None)

    def diverges(cfg, resume=False, log=print):
        if cfg.model.retinanet.focal_gamma == 0.0:
            raise TrainingError("5 non-finite steps in a row at iteration 3; stopping")
        return {"AP": 0.3, "AP50": 0.5, "AP75": 0.3}

    lines = []
    results = AB.run_ablation(base_config(), tmp_path / "a", runs, budget_iters=30, train_fn=diverges, log=lines.append)
    assert [r["error"] for r in results] == ["TrainingError: 5 non-finite steps in a row at iteration 3; stopping", None]
    assert not any("Traceback" in line for line in lines)        # a run's divergence is no bug in densedet

    calls = []

    def bad_data(cfg, resume=False, log=print):
        calls.append(cfg)
        raise DatasetError("train.json: truncated JSON")

    with pytest.raises(DatasetError, match="train.json"):     # the same data in every run: stop at the first
        AB.run_ablation(base_config(), tmp_path / "b", runs, budget_iters=30, train_fn=bad_data, log=lambda *_: None)
    assert len(calls) == 1

"""``train`` under a time budget (``train.max_minutes``), on a fake clock: each step "takes" the
seconds a function of its iteration says, so the plan, the time stop and the resume are exact and
no test depends on the machine's speed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from densedet.config import to_dict
from densedet.engine.checkpoint import load_checkpoint
from densedet.engine.data import BatchStream
from densedet.engine.trainer import train

pytestmark = pytest.mark.usefixtures("no_plots")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.step_seconds = step_seconds         # a test may give another

    def __call__(self) -> float:
        return self.now


def step_seconds(iteration: int) -> float:
    """1 s a step while the budget measures the speed (steps 0-10), then 2 s: the run slows down."""
    return 1.0 if iteration < 11 else 2.0


@pytest.fixture
def fake_time(monkeypatch):
    """A fake clock that advances by ``step_seconds(iteration)`` whenever a batch is drawn (inside
    the timed step); set ``now = 0`` for each run, whose clock starts afresh."""
    clock = FakeClock()
    drawn = BatchStream.batch

    def batch(self, iteration):
        clock.now += clock.step_seconds(iteration)
        return drawn(self, iteration)

    monkeypatch.setattr(BatchStream, "batch", batch)
    return clock


def budgeted(cfg):
    """15 s of training, max_iters 100 a mere cap, a cosine whose LR depends on the planned count.
    The plan: 11 steps of 1 s, fitted after them to 11 + int(4 s / 1 s x 0.98) = 14 iterations; the
    2 s steps then spend the 15 s at iteration 13: a time stop."""
    cfg.train.max_minutes, cfg.train.max_iters = 0.25, 100
    cfg.solver.schedule, cfg.solver.min_lr_factor = "cosine", 0.0
    cfg.model.norm = "auto"            # resolved in the run's own copy, never in the caller's config
    return cfg


def records(cfg) -> list[dict]:
    lines = (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss_cls" in r]


def test_a_budgeted_run_plans_once_stops_on_time_and_resumes_to_the_same_weights(
        tiny_config, stop_training_at, fake_time, restore_torch_globals):
    straight = budgeted(tiny_config("straight"))
    before = to_dict(straight)
    lines: list[str] = []
    summary = train(straight, log=lines.append, clock=fake_time)
    assert to_dict(straight) == before                                        # the caller's config untouched
    assert "time budget 0.25 min: 1.00 s/iteration -> 14 iterations" in lines
    assert "time budget reached at iteration 13" in lines
    assert summary["iterations"] == 13 and summary["train_minutes"] * 60 == 15.0
    lrs = [r["lr"] for r in records(straight)]
    assert [r["iteration"] for r in records(straight)] == list(range(1, 14))
    after_warmup = lrs[2:]                                                    # solver.warmup_iters 2
    assert all(b < a for a, b in zip(after_warmup, after_warmup[1:])), lrs    # never backwards
    last = load_checkpoint(Path(straight.train.output_dir) / "last.pt")
    assert (last["iteration"], last["max_iters"], last["elapsed"], last["plan_fitted"]) == (13, 13, 15.0, True)
    assert load_checkpoint(Path(straight.train.output_dir) / "model_final.pt")["config"]["model"]["norm"] == "bn"

    resumed = budgeted(tiny_config("resumed"))
    stop_training_at(12)                               # last.pt holds iteration 12 (checkpoint_period 2)
    fake_time.now = 0.0
    with pytest.raises(KeyboardInterrupt):
        train(resumed, log=lambda _: None, clock=fake_time)
    last = load_checkpoint(Path(resumed.train.output_dir) / "last.pt")
    assert (last["iteration"], last["max_iters"], last["elapsed"], last["plan_fitted"]) == (12, 14, 13.0, True)

    stop_training_at(None)
    lines, fake_time.now = [], 0.0
    summary = train(resumed, resume=True, log=lines.append, clock=fake_time)
    assert any(line.startswith("resumed from") and "iteration 12/14" in line for line in lines)
    assert not any("s/iteration" in line for line in lines)                    # the same plan, not a new one
    assert "time budget reached at iteration 13" in lines
    assert summary["iterations"] == 13 and summary["train_minutes"] * 60 == 15.0
    assert records(resumed) == records(straight)           # losses, LRs, and speeds on the fake clock
    final = {name: load_checkpoint(Path(c.train.output_dir) / "model_final.pt")["model"]
             for name, c in (("straight", straight), ("resumed", resumed))}
    differ = [k for k in final["straight"] if not torch.equal(final["straight"][k], final["resumed"][k])]
    assert not differ, differ[:5]


def test_a_re_planned_run_resumes_on_its_plan_to_the_same_weights(
        tiny_config, stop_training_at, fake_time, restore_torch_globals):
    """30 s of training; 1 s steps until iteration 11, then 0.5 s. The first plan (1 s/step) ends
    at 29; the re-plan at 50% of the time (iteration 21) stretches it to 48, the cosine continuing
    from where it stood. A run killed at 30 resumes on that plan (the progress anchor is in
    last.pt) and ends exactly as the straight run."""
    fake_time.step_seconds = lambda iteration: 1.0 if iteration < 11 else 0.5

    def thirty_seconds(cfg):
        cfg = budgeted(cfg)
        cfg.train.max_minutes = 0.5
        return cfg

    straight = thirty_seconds(tiny_config("straight"))
    lines: list[str] = []
    summary = train(straight, log=lines.append, clock=fake_time)
    assert "time budget 0.5 min: 1.00 s/iteration -> 29 iterations" in lines
    assert any(line.startswith("time budget re-planned at iteration 21") and line.endswith("-> 48 iterations")
               for line in lines), lines
    assert summary["iterations"] == 48 and summary["train_minutes"] * 60 == 29.5
    lrs = [r["lr"] for r in records(straight)][2:]                       # after the 2 warm-up steps
    assert all(b < a for a, b in zip(lrs, lrs[1:])), lrs                 # never up, not even at the re-plan
    assert lrs[-1] < 1e-3 * straight.solver.lr                           # the cosine ends at the budget's end

    resumed = thirty_seconds(tiny_config("resumed"))
    stop_training_at(30)                                                 # last.pt at 30: after the re-plan
    fake_time.now = 0.0
    with pytest.raises(KeyboardInterrupt):
        train(resumed, log=lambda _: None, clock=fake_time)
    last = load_checkpoint(Path(resumed.train.output_dir) / "last.pt")
    assert (last["iteration"], last["max_iters"], last["plan_anchor"][0], last["plan_replans"]) == (30, 48, 21, 2)
    stop_training_at(None)
    fake_time.now = 0.0
    summary = train(resumed, resume=True, log=lambda _: None, clock=fake_time)
    assert summary["iterations"] == 48 and records(resumed) == records(straight)
    final = {name: load_checkpoint(Path(c.train.output_dir) / "model_final.pt")["model"]
             for name, c in (("straight", straight), ("resumed", resumed))}
    assert all(torch.equal(final["straight"][k], final["resumed"][k]) for k in final["straight"])


def test_a_budgeted_run_saves_last_pt_at_each_plan_whatever_its_checkpoint_period(
        tiny_config, stop_training_at, fake_time, restore_torch_globals):
    """checkpoint_period 1000 never comes in a short run; the plans (at 11, the re-plan at 21) save
    last.pt, so a run killed at 30 resumes from 21, not from nothing, and ends as a straight run."""
    fake_time.step_seconds = lambda iteration: 1.0 if iteration < 11 else 0.5

    def thirty_seconds(cfg):
        cfg = budgeted(cfg)
        cfg.train.max_minutes, cfg.train.checkpoint_period = 0.5, 1000
        return cfg

    straight = thirty_seconds(tiny_config("straight"))
    train(straight, log=lambda _: None, clock=fake_time)
    killed = thirty_seconds(tiny_config("killed"))
    stop_training_at(30)
    fake_time.now = 0.0
    with pytest.raises(KeyboardInterrupt):
        train(killed, log=lambda _: None, clock=fake_time)
    assert load_checkpoint(Path(killed.train.output_dir) / "last.pt")["iteration"] == 21
    stop_training_at(None)
    fake_time.now = 0.0
    summary = train(killed, resume=True, log=lambda _: None, clock=fake_time)
    assert summary["iterations"] == 48 and records(killed)[-1] == records(straight)[-1]
    final = {name: load_checkpoint(Path(c.train.output_dir) / "model_final.pt")["model"]
             for name, c in (("straight", straight), ("killed", killed))}
    assert all(torch.equal(final["straight"][k], final["killed"][k]) for k in final["straight"])

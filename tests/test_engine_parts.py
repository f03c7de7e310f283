"""The trainer's parts, each alone: the step, the time budget, the metrics log, the checkpoints and
the progress display. No training run, no real time: the budget reads a fake clock."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from densedet.config import Config
from densedet.data import DetectionData
from densedet.engine.budget import TimeBudget
from densedet.engine.checkpoint import load_checkpoint
from densedet.engine.checkpointing import Checkpointer, RunState
from densedet.engine.ema import ModelEMA
from densedet.engine.metrics_log import MetricsLog
from densedet.engine.progress import ProgressDisplay
from densedet.engine.trainer import StepParts, build_optimizer, lr_factor, run_step


class FakeClock:
    """Seconds that pass only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- the step ------------------------------------------------------------------------------------

class Toy(nn.Module):
    """A 'detector' whose losses are ``(w x - y)^2`` and ``|w|``, scaled by ``poison`` (NaN: a bad step)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.poison = 1.0
        self.sizes: list = []

    def forward(self, images, targets, min_size=None):
        self.sizes.append(min_size)
        x, y = images[0], targets[0]["y"]
        return {"fit": ((self.w * x).sum() - y) ** 2 * self.poison, "norm": self.w.abs().sum()}


def toy_parts(ema: bool = False, clip: float = 0.0) -> StepParts:
    model = Toy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return StepParts(model, model, optimizer, ModelEMA(model, 0.5) if ema else None, clip_grad_norm=clip)


def toy_batch():
    return [torch.tensor([1.0, 2.0, 3.0])], [{"y": torch.tensor(1.0), "image_id": 7}]


def test_a_finite_step_moves_the_weights_and_the_average():
    parts = toy_parts(ema=True, clip=1.0)
    before = parts.model.w.detach().clone()
    result = run_step(parts, *toy_batch(), min_size=96)
    assert result.applied and set(result.losses) == {"fit", "norm"}
    assert result.losses["fit"] == pytest.approx(25.0) and result.losses["norm"] == pytest.approx(3.0)
    assert not torch.equal(parts.model.w, before)
    assert parts.ema.updates == 1 and parts.model.sizes == [96]
    assert float(parts.model.w.grad.norm()) == pytest.approx(1.0)            # clipped to clip_grad_norm


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_a_non_finite_loss_or_gradient_leaves_weights_optimizer_and_average_alone(clip):
    for poison in (float("nan"), float("inf")):
        parts = toy_parts(ema=True, clip=clip)
        parts.model.poison = poison
        before = parts.model.w.detach().clone()
        result = run_step(parts, *toy_batch())
        assert not result.applied and not math.isfinite(result.losses["fit"])
        assert torch.equal(parts.model.w, before) and parts.ema.updates == 0
        assert parts.optimizer.state_dict()["state"] == {}


def test_a_finite_loss_with_a_non_finite_gradient_is_skipped():
    parts = toy_parts()
    images, targets = toy_batch()
    with torch.no_grad():
        parts.model.w[0] = 0.0        # |w| at 0 has gradient 0; sqrt at 0 an infinite one
    parts.model.forward = lambda im, t, min_size=None: {"root": parts.model.w.abs().sqrt().sum()}
    before = parts.model.w.detach().clone()
    result = run_step(parts, images, targets)
    assert math.isfinite(result.losses["root"]) and not result.applied
    assert torch.equal(parts.model.w, before)


# -- the time budget -----------------------------------------------------------------------------

def cosine(warmup: int = 0) -> Config:
    cfg = Config()
    cfg.solver.schedule, cfg.solver.min_lr_factor, cfg.solver.warmup_iters = "cosine", 0.0, warmup
    return cfg


def simulate(budget: TimeBudget, clock: FakeClock, step_seconds, cfg: Config, start: int = 0):
    """The trainer's loop around a budget: LR of each step, the max_iters it used, the end."""
    lrs, plans, iteration, lines = [], [], start, []
    while iteration < budget.max_iters:
        lrs.append(lr_factor(iteration, budget.progress(iteration), cfg))
        plans.append(budget.max_iters)
        with budget.timed():
            clock.advance(step_seconds(iteration))
        iteration += 1
        if iteration < budget.max_iters and budget.out_of_time():
            budget.stop_at(iteration)
        elif (line := budget.fit(iteration)) is not None:
            lines.append(line)
    return lrs, plans, iteration, lines


def test_a_run_that_speeds_up_is_re_planned_with_the_lr_continuous_and_never_rising():
    """Steps take 1 s, then 0.25 s from step 30 on. The first plan (1 s/step) ends at 59; a single
    plan would end the run there, at 38 s of its 60. The re-plans stretch it to the budget, and
    each continues the schedule's progress from where it stands: the LR never jumps up (the old
    every-10-steps re-fit restarted the cosine at iteration / max_iters and did)."""
    clock = FakeClock()
    cfg = cosine(warmup=5)
    budget = TimeBudget(minutes=1.0, max_iters=10_000, clock=clock)
    lrs, plans, end, lines = simulate(budget, clock, lambda i: 1.0 if i < 30 else 0.25, cfg)
    assert lines[0] == "time budget 1 min: 1.00 s/iteration -> 59 iterations"
    assert plans.index(59) == 11                                 # after 1 + 10 measured steps
    # 25% of the time at step 21 (1 s/step: the same 59, nothing said), 50% at step 31 (steps
    # 21-30: nine of 1 s and one of 0.25 s), then 75% of the schedule at step 49 (0.25 s/step)
    assert lines[1].startswith("time budget re-planned at iteration 31 (50% of the time")
    assert lines[1].endswith("0.93 s/iteration -> 62 iterations")
    assert lines[2].startswith("time budget re-planned at iteration 49")
    assert lines[2].endswith("0.25 s/iteration -> 147 iterations") and len(lines) == 3
    assert end == 147 and 0.98 * 60 <= budget.spent <= 60        # the budget spent, not 38 s of it
    after_warmup = lrs[5:]
    assert all(b <= a for a, b in zip(after_warmup, after_warmup[1:])), after_warmup
    steps = [a - b for a, b in zip(after_warmup, after_warmup[1:])]
    assert max(steps) < 0.05                                     # no jump down at a re-plan either
    assert lrs[-1] < 0.001                                       # and the cosine reaches its end


def test_a_run_that_slows_down_too_soon_to_re_plan_stops_on_time():
    clock = FakeClock()
    budget = TimeBudget(minutes=0.5, max_iters=1000, clock=clock)
    lrs, plans, end, _ = simulate(budget, clock, lambda i: 1.0 if i < 11 else 3.0, cosine())
    assert set(plans[11:]) == {29}                               # 11 + int(19 s x 0.98)
    assert budget.spent >= 30 and end == budget.max_iters == 18  # 11 s + 7 x 3 s: a time stop
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))


def test_the_first_step_is_not_part_of_the_speed():
    clock = FakeClock()
    budget = TimeBudget(minutes=1.0, max_iters=1000, calibration_steps=4, clock=clock)
    steps = [20.0, 1.0, 1.0, 1.0, 1.0]                         # the first step pays for allocations
    for iteration, seconds in enumerate(steps, 1):
        with budget.timed():
            clock.advance(seconds)
        line = budget.fit(iteration)
    assert budget.fitted and budget.max_iters == 5 + int(36 * 0.98)
    assert "1.00 s/iteration" in line


def test_the_speed_is_the_steady_state_after_the_slow_first_steps():
    """The first 20 steps take 0.5 s, the rest 0.2 s (kernel choices, warm caches): the window
    spans 3% of the 10 minutes and its second half gives 0.2 s, so the run spends its budget
    instead of ending minutes early as a fit on steps 2-11 (0.5 s/step) did."""
    clock = FakeClock()
    budget = TimeBudget(minutes=10.0, max_iters=100_000, clock=clock)
    lrs, plans, end, lines = simulate(budget, clock, lambda i: 0.5 if i < 20 else 0.2, cosine())
    assert lines and "0.20 s/iteration" in lines[0]
    assert 0.97 * 600 <= budget.spent <= 600 and end == budget.max_iters
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))


def test_the_fit_never_exceeds_the_configured_count():
    clock = FakeClock()
    budget = TimeBudget(minutes=10.0, max_iters=50, clock=clock)
    _, plans, end, lines = simulate(budget, clock, lambda i: 1.0, cosine())
    assert set(plans) == {50} and end == 50
    assert lines == ["time budget 10 min: 1.00 s/iteration -> 50 iterations (train.max_iters ends the run first)"]


def test_no_budget_is_a_fixed_count():
    clock = FakeClock()
    budget = TimeBudget(minutes=0.0, max_iters=30, clock=clock)
    _, plans, end, lines = simulate(budget, clock, lambda i: 100.0, cosine())
    assert set(plans) == {30} and end == 30 and lines == [] and not budget.out_of_time()


def test_a_resumed_budget_keeps_its_plan_or_measures_again_when_it_had_none():
    clock = FakeClock()
    # a checkpoint from before re-planning: its one plan stands, however fast the steps
    old = TimeBudget(minutes=1.0, max_iters=1000, plan={"max_iters": 40, "elapsed": 30.0, "plan_fitted": True},
                     clock=clock)
    lrs, plans, end, lines = simulate(old, clock, lambda i: 0.5, cosine(), start=25)
    assert set(plans) == {40} and end == 40 and lines == []
    assert old.state_dict() == {"max_iters": 40, "elapsed": 37.5, "plan_fitted": True, "plan_anchor": [0, 0.0],
                                "plan_replans": 3}

    # a plan with re-plans left continues from its anchor, and its progress is the saved one
    plan = {"max_iters": 100, "elapsed": 20.0, "plan_fitted": True, "plan_anchor": [20, 0.2], "plan_replans": 1}
    resumed = TimeBudget(minutes=1.0, max_iters=1000, plan=plan, clock=clock)
    assert resumed.progress(60) == pytest.approx(0.2 + 0.8 * 40 / 80) and resumed.cap == 1000
    _, plans, end, lines = simulate(resumed, clock, lambda i: 0.5, cosine(), start=30)
    assert plans[0] == 100 and len(lines) >= 1 and end > 100     # faster than planned: re-planned longer

    unfitted = TimeBudget(minutes=1.0, max_iters=1000, plan={"max_iters": 1000, "elapsed": 30.0,
                                                             "plan_fitted": False}, clock=clock)
    _, plans, end, lines = simulate(unfitted, clock, lambda i: 1.0, cosine(), start=5)
    assert len(lines) == 1 and plans[:11] == [1000] * 11       # measured again: 1 + 10 steps of this process
    assert plans[11] == end == 16 + int((60 - 41) * 0.98)      # then fitted to the 19 s left


def test_every_process_takes_rank_0s_plan_and_stop():
    clock = FakeClock()
    budget = TimeBudget(minutes=1.0, max_iters=1000, calibration_steps=2, clock=clock, agree=lambda v: 7)
    for _ in range(3):
        with budget.timed():
            clock.advance(1.0)
    budget.fit(3)
    assert budget.max_iters == 7
    assert budget.out_of_time()                                  # rank 0 says so (7 is true)


# -- metrics.jsonl -------------------------------------------------------------------------------

def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_average_the_window_and_write_nan_as_null(tmp_path):
    clock = FakeClock()
    log = MetricsLog(tmp_path / "metrics.jsonl", clock=clock)
    log.start()
    log.add({"cls": 1.0, "box": 0.5}, images=4)
    log.add({"cls": 3.0, "box": 1.5}, images=4)
    clock.advance(2.0)
    first = log.close_window(2, lr=0.01, epoch=1.0, skipped_steps=0)
    assert first == {"iteration": 2, "lr": 0.01, "loss_cls": 2.0, "loss_box": 1.0, "images_per_s": 4.0,
                     "epoch": 1.0, "skipped_steps": 0, "loss": 3.0}
    log.add({"cls": float("nan"), "box": 1.0}, images=4)             # a skipped step
    clock.advance(1.0)
    log.close_window(3, lr=0.01, epoch=1.5, skipped_steps=1)
    log.evaluation(3, {"AP": 0.5, "AP50": 0.75, "per_class": {"a": 0.5}})
    records = read(tmp_path / "metrics.jsonl")
    assert records[0] == first
    assert records[1]["loss_cls"] is None and records[1]["loss"] is None and records[1]["loss_box"] == 1.0
    assert records[2] == {"iteration": 3, "eval": {"AP": 0.5, "AP50": 0.75}}


def test_a_resumed_log_forgets_the_lost_iterations_and_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps({"iteration": i, "loss": 1.0}) for i in range(1, 6)) +
                    '\n{"iteration": 4, "eval": {}}\n{"iteration": 6, "lo')
    MetricsLog(path).start(resumed_at=4)
    assert [(r["iteration"], "eval" in r) for r in read(path)] == [(1, False), (2, False), (3, False), (4, False),
                                                                 (4, True)]
    MetricsLog(path).start()
    assert path.read_text() == ""


def test_other_processes_keep_the_averages_and_write_nothing(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", write=False)
    log.start()
    log.add({"cls": 2.0}, images=2)
    assert log.close_window(1, 0.1, 0.5, 0)["loss"] == 2.0
    assert not (tmp_path / "metrics.jsonl").exists()


# -- checkpoints ---------------------------------------------------------------------------------

def toy_checkpointer(tmp_path, write=True) -> Checkpointer:
    data = DetectionData(records=[], class_names=["a", "b"], category_ids=[1, 2], source="test")
    return Checkpointer(tmp_path, Config(), data, write=write)


def test_last_pt_holds_what_a_resume_needs_and_restores_it(tmp_path):
    cfg = Config()
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    optimizer = build_optimizer(model, cfg)
    model(torch.randn(2, 3, 4, 4)).sum().backward()
    optimizer.step()
    checkpoints = toy_checkpointer(tmp_path)
    assert checkpoints.describe_last().startswith("No checkpoint was written yet")
    state = RunState(iteration=8, best_ap=0.3, skipped_steps=1, pretrain={"seconds": 2.0})
    budget = TimeBudget(1.0, 1000, plan={"max_iters": 40, "elapsed": 12.5, "plan_fitted": True,
                                         "plan_anchor": [5, 0.1], "plan_replans": 1})
    ema = ModelEMA(model, 0.9)
    checkpoints.save_last(model, optimizer, state, budget, ema)
    assert checkpoints.describe_last() == f"The last good checkpoint is {tmp_path / 'last.pt'} (iteration 8)"
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert (ckpt["iteration"], ckpt["max_iters"], ckpt["elapsed"], ckpt["plan_fitted"]) == (8, 40, 12.5, True)
    assert (ckpt["plan_anchor"], ckpt["plan_replans"]) == ([5, 0.1], 1)
    assert ckpt["class_names"] == ["a", "b"] and ckpt["ema"]["decay"] == 0.9 and "rng" in ckpt
    assert RunState.from_checkpoint(ckpt) == state

    expected = torch.rand(5)                       # restoring the RNG state replays the draws after the save
    fresh = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    torch.manual_seed(123)
    lines = []
    (tmp_path / ".last.pt.abc.tmp").write_bytes(b"half")          # a save cut short by a kill
    again = toy_checkpointer(tmp_path).restore_last(fresh, build_optimizer(fresh, cfg), lines.append)
    assert torch.equal(torch.rand(5), expected)
    assert again["iteration"] == 8 and lines[0] == f"resumed from {tmp_path / 'last.pt'} at iteration 8/40"
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert not (tmp_path / ".last.pt.abc.tmp").exists()


def test_final_weights_carry_no_optimizer_and_replace_best_only_when_better(tmp_path):
    model = nn.Linear(2, 2)
    checkpoints = toy_checkpointer(tmp_path)
    checkpoints.save_final(model, 10, 10, {"AP": 0.2}, best=False)
    final = load_checkpoint(tmp_path / "model_final.pt")
    assert "optimizer" not in final and "rng" not in final and final["metrics"] == {"AP": 0.2}
    assert not (tmp_path / "model_best.pt").exists()
    checkpoints.save_final(model, 10, 10, {"AP": 0.3}, best=True)
    assert load_checkpoint(tmp_path / "model_best.pt")["metrics"] == {"AP": 0.3}


def test_other_processes_write_no_checkpoint(tmp_path):
    model = nn.Linear(2, 2)
    checkpoints = toy_checkpointer(tmp_path, write=False)
    checkpoints.save_last(model, build_optimizer(model, Config()), RunState(iteration=2), TimeBudget(0, 10))
    checkpoints.save_final(model, 2, 10, {}, best=True)
    assert list(tmp_path.iterdir()) == [] and checkpoints.last_saved == 2


# -- the progress display ------------------------------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal():
    stream = io.StringIO()
    progress = ProgressDisplay(total=8, initial=2, stream=stream)
    assert progress.line(4, "loss 1.0", seconds=2.0) == "[############------------] 4/8 eta 00:04 loss 1.0"
    progress.update(4, "loss 1.0")
    progress.set_total(6)
    progress.update(6, "loss 0.5")
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "] 4/8 eta " in lines[0] and lines[0].endswith(" loss 1.0")
    assert lines[1].startswith("[" + "#" * 24 + "] 6/6 eta ") and lines[1].endswith(" loss 0.5")
    assert ProgressDisplay(8, stream=stream).line(0, "x", 0.0).endswith("0/8 eta ? x")


def test_a_tqdm_bar_on_a_terminal_and_nothing_when_disabled():
    terminal = Terminal()
    progress = ProgressDisplay(total=10, stream=terminal)
    progress.update(5, "loss 0.7")
    progress.set_total(20)
    progress.close()
    assert progress.bar is not None and "5/20" in terminal.getvalue() and "loss 0.7" in terminal.getvalue()
    quiet = io.StringIO()
    silent = ProgressDisplay(total=10, enabled=False, stream=quiet)
    silent.update(5, "x")
    silent.close()
    assert quiet.getvalue() == ""

"""The training loop: one process or several (``torchrun``), resumable, with nothing lost.

``train(cfg)`` runs the whole job: data → model → SGD with warm-up and a step or cosine schedule →
periodic COCO evaluation and best-checkpoint keeping → final metrics, curves and drawn predictions.
One step is :func:`run_step`; the rest lives in its own parts: ``budget.TimeBudget`` (the
iteration count under ``train.max_minutes``), ``metrics_log.MetricsLog`` (metrics.jsonl),
``progress.ProgressDisplay`` (the bar), ``checkpointing.Checkpointer`` (last/best/final files,
resume), ``pretrain.warm_up_trunk`` (the box-crop warm-up), ``finish.finish_run`` (the end-of-run
evaluation and report) and ``distributed`` (process agreement).

Guarantees:
- every checkpoint is written atomically (``checkpoint.atomic_save``), holding the config, so
  ``--weights CKPT`` alone rebuilds the model;
- ``resume=True`` restores model, optimizer, schedule, RNG states and iteration from
  ``output_dir/last.pt``; batches and augmentation are functions of the iteration
  (``engine.data.BatchStream``), so the resumed run continues as if never stopped (bit for bit
  with a fixed ``max_iters`` and the same thread count; a time-budgeted run continues the same
  plan, saved in the checkpoint, and spends the budget left);
- a worker group that torchrun restarts (``--max-restarts``: a worker was killed) resumes by itself:
  when ``TORCHELASTIC_RESTART_COUNT`` > 0 and ``output_dir/last.pt`` exists, ``train`` behaves as
  ``resume=True`` (rank 0 decides and tells the others, so all read the same last.pt, which only
  rank 0 writes); without a last.pt yet it starts from scratch, as the first attempt did (the
  restarted group meets under a store prefix of its own: ``distributed.init_distributed``);
- under a time budget the learning rate never jumps and never moves backwards: the iteration count
  is planned after a calibration window and again as the speed drifts, never above
  ``train.max_iters``, each plan continuing the schedule from where it stands, and the run stops on
  time if it must (the rule: ``budget.TimeBudget``);
- a non-finite loss or gradient never reaches the weights: the step is skipped and counted, and
  ``train.max_bad_steps`` in a row stop the run with the last good checkpoint intact; with several
  processes all agree to skip, before backward (DDP reduces gradients inside it);
- ``train.ema_decay`` keeps a weight average, which periodic and final evaluations use and
  model_best.pt / model_final.pt hold;
- the box-crop warm-up (``train.pretrain_*``) runs before detection, inside the time budget, and
  ``train.pretrain_freeze_stages`` then freezes the trunk's first stages;
- the caller's ``cfg`` is never written to (the run works on a resolved copy).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .. import conv_grad
from ..errors import DensedetError
from ..config import Config, ConfigError, save_config
from ..data import DetectionData, align_classes
from ..device import autocast, default_device, flush_denormals, fused_adam_ok, resolve_precision
from ..models import DenseDetector, build_from_config, load_weights
from .budget import TimeBudget
from .checkpointing import Checkpointer, RunState
from .data import BatchStream, build_train_dataset, check_image_files, load_split
from .distributed import all_agree, init_distributed, lost_peer, rank0_first, value_of_rank0
from .ema import ModelEMA
from .evaluate import eval_tiles, evaluate_model
from .finish import RunTotals, finish_run
from .metrics_log import MetricsLog, scalars
from .pretrain import warm_up_trunk
from .progress import ProgressDisplay, say_to_stderr

__all__ = ["train", "TrainingError", "build_optimizer", "lr_factor", "init_distributed", "run_step",
           "StepParts", "StepResult"]


class TrainingError(DensedetError, RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


# -- optimisation ------------------------------------------------------------------------------

def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW; norm weights and biases get ``weight_decay_norm`` (detectron2's
    ``WEIGHT_DECAY_NORM``: decaying a norm's scale only fights the normalisation)."""
    s = cfg.solver
    decay, no_decay = [], []
    for module in model.modules():
        is_norm = isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.SyncBatchNorm))
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (no_decay if is_norm or name == "bias" else decay).append(p)
    groups = [{"params": decay, "weight_decay": s.weight_decay},
              {"params": no_decay, "weight_decay": s.weight_decay_norm}]
    if s.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum)
    return torch.optim.AdamW(groups, lr=s.lr, fused=fused_adam_ok(decay + no_decay))


def lr_factor(iteration: int, progress: float, cfg: Config) -> float:
    """Multiplier of the base LR: linear warm-up from ``warmup_factor`` over the first iterations, then
    steps (at iterations) or a cosine over the schedule's ``progress`` (0 to 1: ``TimeBudget.progress``)."""
    s = cfg.solver
    if s.schedule == "cosine":
        progress = min(1.0, progress)
        factor = s.min_lr_factor + (1 - s.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        factor = s.gamma ** sum(iteration >= step for step in s.steps)
    if iteration < s.warmup_iters:
        alpha = iteration / s.warmup_iters
        factor *= s.warmup_factor * (1 - alpha) + alpha
    return factor


# -- one step ----------------------------------------------------------------------------------

@dataclass
class StepParts:
    """What :func:`run_step` works with, built once per run."""

    forward: nn.Module                   # the model as called: DistributedDataParallel-wrapped with several processes
    model: nn.Module                     # the model itself: its parameters, the weight average's source
    optimizer: torch.optim.Optimizer
    ema: ModelEMA | None = None
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype | None = None     # autocast dtype; None: fp32
    clip_grad_norm: float = 0.0          # 0: no clipping


@dataclass
class StepResult:
    losses: dict[str, float]             # this process's losses by name (NaN or inf when they stopped the step)
    applied: bool                        # False: a non-finite loss or gradient on some process; weights unchanged


def run_step(parts: StepParts, images: list[torch.Tensor], targets: list[dict],
             min_size: int | None = None) -> StepResult:
    """One optimisation step on a batch; skipped on every process when a loss or gradient is not
    finite on any. ``min_size``: the batch's shorter side under multi-scale training."""
    images = [image.to(parts.device, non_blocking=True) for image in images]
    targets = [{k: (v.to(parts.device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    with autocast(parts.device, parts.dtype):
        losses = parts.forward(images, targets, min_size=min_size)
    loss = sum(losses.values())
    parts.optimizer.zero_grad(set_to_none=True)
    # Agree before backward: DDP all-reduces gradients inside backward, so a process that skipped
    # it would leave the others waiting there (a hang, or mismatched collectives).
    applied = all_agree(bool(torch.isfinite(loss)), parts.device)
    if applied:
        loss.backward()
        norm = _gradient_norm(parts.model, parts.clip_grad_norm)
        applied = all_agree(bool(torch.isfinite(norm)), parts.device)   # all skip, or DDP's replicas diverge
    if applied:
        parts.optimizer.step()
        if parts.ema is not None:
            parts.ema.update(parts.model)
    return StepResult({name: float(value.detach()) for name, value in losses.items()}, applied)


def _gradient_norm(model: nn.Module, clip: float) -> torch.Tensor:
    """The gradients' total norm, clipped to ``clip`` when it is > 0 (the norm before clipping)."""
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    return torch.norm(torch.stack([p.grad.detach().norm() for p in model.parameters() if p.grad is not None]))


# -- the run -----------------------------------------------------------------------------------

@dataclass
class _Run:
    """Everything one training run holds, built by :func:`_prepare`."""

    cfg: Config                      # the resolved copy of the caller's config
    is_main: bool
    say: Callable[[str], None]
    val_data: DetectionData
    stream: BatchStream
    step: StepParts
    state: RunState
    budget: TimeBudget
    checkpoints: Checkpointer
    log: MetricsLog
    progress: ProgressDisplay
    bad_in_a_row: int = 0


def train(cfg: Config, resume: bool = False, log: Callable[[str], None] | None = None,
          init_weights: str | None = None, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Train ``cfg`` to the end and return the final COCO metrics (rank 0; ``{}`` elsewhere).

    ``init_weights`` starts from a checkpoint's (or state dict's) weights (fine-tuning), as
    opposed to ``resume``, which continues the same run. ``clock`` is the time source of the
    time budget and the logged speeds (tests give a fake one).
    """
    run = _prepare(cfg, resume, log or say_to_stderr, init_weights, clock)
    try:
        return _train_and_finish(run)
    except RuntimeError as err:
        if not lost_peer(err):
            raise
        # not a bug here: a collective lost a process, killed or stopped on an error of its own
        resume = "; continue with --resume" if run.checkpoints.last_saved is not None else ""
        raise TrainingError(f"another process of this run stopped (killed, or on an error it reports itself; "
                            f"torchrun's report names it). {run.checkpoints.describe_last()}{resume}") from err


def _train_and_finish(run: _Run) -> dict:
    """The training loop, then the final evaluation and the run folder's files (:func:`finish_run`)."""
    try:
        while run.state.iteration < run.budget.max_iters:
            _train_one_iteration(run)
            _after_step(run)
    finally:
        run.progress.close()
    s = run.state
    totals = RunTotals(s.iteration, run.budget.max_iters, run.budget.spent, run.stream.first_sample(s.iteration),
                       s.skipped_steps, s.best_ap, s.pretrain)
    if run.step.ema is not None:     # from here on the model is the average: evaluated, saved, drawn
        run.step.model.load_state_dict(run.step.ema.state)
    return finish_run(run.cfg, run.step.model, run.val_data, run.step.device, run.step.dtype, totals,
                      run.checkpoints, run.is_main, run.say)


def _train_one_iteration(run: _Run) -> None:
    """Set the LR, take iteration ``run.state.iteration``'s batch and step on it (timed), count a skip."""
    iteration, cfg = run.state.iteration, run.cfg
    for group in run.step.optimizer.param_groups:
        group["lr"] = cfg.solver.lr * lr_factor(iteration, run.budget.progress(iteration), cfg)
    # Multi-scale: one shorter side for the whole batch, a function of the iteration alone
    # (the same on every process and after a resume).
    min_size = run.stream.min_size(iteration, cfg.data.train_min_sizes) if cfg.data.train_min_sizes else None
    with run.budget.timed():
        images, targets = run.stream.batch(iteration)
        result = run_step(run.step, images, targets, min_size)
    if result.applied:
        run.bad_in_a_row = 0
    else:
        _skipped(run, result)
    run.state.iteration += 1
    run.log.add(result.losses, run.stream.size_of(iteration))


def _skipped(run: _Run, result: StepResult) -> None:
    """Count a skipped step; too many in a row stop the run."""
    run.state.skipped_steps += 1
    run.bad_in_a_row += 1
    iteration = run.state.iteration
    run.say(f"iteration {iteration}: non-finite loss or gradient ({result.losses}); step skipped "
            f"({run.bad_in_a_row} in a row)")
    if run.bad_in_a_row >= run.cfg.train.max_bad_steps:
        raise TrainingError(f"{run.bad_in_a_row} non-finite steps in a row at iteration {iteration}; stopping. "
                            f"{run.checkpoints.describe_last()}; try a lower solver.lr or solver.clip_grad_norm")


def _after_step(run: _Run) -> None:
    """The bookkeeping after a step: time budget, log record, periodic evaluation, last.pt."""
    iteration, t, budget = run.state.iteration, run.cfg.train, run.budget
    done = iteration >= budget.max_iters
    if not done and budget.out_of_time():
        warming = iteration < run.cfg.solver.warmup_iters
        run.say(f"time budget reached at iteration {iteration}" + (
            f", inside the learning rate's warm-up ({run.cfg.solver.warmup_iters} steps): too short to learn to "
            f"detect; give it more time (train.max_minutes, or --minutes)" if warming else ""))
        budget.stop_at(iteration)
        done = True
    planned = None if done else budget.fit(iteration)
    if planned is not None or done:
        run.progress.set_total(budget.max_iters)
    if planned is not None:
        run.say(planned)
    if iteration % t.log_period == 0 or done:
        _log_window(run)
    if t.eval_period and iteration % t.eval_period == 0 and not done:
        _evaluate(run)
    # also at each plan of a time budget (its first and its re-plans at 25/50/75%), decided alike on
    # every process: a killed run of a few minutes then loses at most about a quarter of it
    if done or iteration % t.checkpoint_period == 0 or planned is not None:
        run.checkpoints.save_last(run.step.model, run.step.optimizer, run.state, budget, run.step.ema)


def _log_window(run: _Run) -> None:
    it = run.state.iteration
    record = run.log.close_window(it, run.step.optimizer.param_groups[0]["lr"], run.stream.epoch_of(it),
                                  run.state.skipped_steps)
    terms = " ".join(f"{k[5:]} {v:.3f}" for k, v in record.items() if k.startswith("loss_"))
    run.progress.update(it, f"loss {record['loss']:.3f} ({terms}) lr {record['lr']:.4g} "
                            f"{record['images_per_s']:.1f} img/s")


def _evaluate(run: _Run) -> None:
    """A periodic evaluation (of the weight average when there is one); a new best AP is saved."""
    step, it = run.step, run.state.iteration
    with step.ema.applied(step.model) if step.ema is not None else contextlib.nullcontext():
        metrics = evaluate_model(step.model, run.val_data, run.cfg.test.batch_size, step.device, step.dtype,
                                 run.cfg.test.max_dets, tiles=eval_tiles(run.cfg.data))
        if run.is_main and metrics["AP"] > run.state.best_ap:     # saves the evaluated weights
            run.state.best_ap = metrics["AP"]
            run.checkpoints.save_best(step.model, step.optimizer, it, run.budget.max_iters, scalars(metrics))
    run.say(f"iteration {it}: AP {metrics['AP']:.4f} AP50 {metrics['AP50']:.4f}")
    run.log.evaluation(it, metrics)


# -- setting up --------------------------------------------------------------------------------

def _prepare(cfg: Config, resume: bool, log: Callable[[str], None], init_weights: str | None,
             clock: Callable[[], float]) -> _Run:
    """Everything before the first step: processes, seeds, data, model, resume or warm-up."""
    rank, world = init_distributed()
    flush_denormals()
    is_main = rank == 0
    say = log if is_main else (lambda msg: None)
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir {out}: is a file; a run writes a folder (checkpoints, metrics, report)")
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    cfg = _resolved(cfg)
    _seed(cfg)
    device, dtype = _device_and_precision(cfg, world, say)
    train_data, val_data = _load_data(cfg, say)
    dataset = build_train_dataset(cfg, train_data)
    stream = BatchStream(dataset, cfg.train.batch_size, cfg.train.seed, rank, world, cfg.data.crop_sizes)
    model = _build_model(cfg, device, init_weights, say)
    optimizer = build_optimizer(model, cfg)
    checkpoints = Checkpointer(out, cfg, train_data, write=is_main)
    metrics_log = MetricsLog(out / "metrics.jsonl", write=is_main, clock=clock)
    new_budget = functools.partial(TimeBudget, cfg.train.max_minutes, clock=clock,
                                   agree=functools.partial(value_of_rank0, device=device))   # rank 0 decides
    restart = _torchrun_restart()
    restarted = restart > 0 and not resume and bool(value_of_rank0(int(checkpoints.last_path.is_file()), device))
    if resume or restarted:
        saved = _resume(checkpoints, model, optimizer, say)
        if restarted:
            say(f"restarted by torchrun (restart {restart}): resuming from {checkpoints.last_path} "
                f"at iteration {saved['iteration']}")
        state = RunState.from_checkpoint(saved)
        budget = new_budget(cfg.train.max_iters, plan=saved)
        metrics_log.start(resumed_at=state.iteration)
    else:
        saved, state, budget = {}, RunState(), new_budget(cfg.train.max_iters)
        metrics_log.start()
        if cfg.train.pretrain_minutes > 0 or cfg.train.pretrain_iters > 0:
            state.pretrain = warm_up_trunk(model, dataset, train_data, cfg, device, dtype, rank, say,
                                           clock=clock)
            budget.spent = state.pretrain["seconds"]          # the warm-up is part of the time budget
            # a run killed from here on resumes into detection, not into a second warm-up
            checkpoints.save_last(model, optimizer, state, budget)
    if state.pretrain and cfg.train.pretrain_freeze_stages > 0:
        # The warm-up taught the early stages their filters; detection then skips their backward.
        model.freeze_trunk(cfg.train.pretrain_freeze_stages)
    ema = _build_ema(cfg, model, saved, say, checkpoints)
    step = StepParts(_distributed(model, device, world), model, optimizer, ema, device, dtype,
                     cfg.solver.clip_grad_norm)
    progress = ProgressDisplay(budget.max_iters, state.iteration, enabled=is_main)
    return _Run(cfg, is_main, say, val_data, stream, step, state, budget, checkpoints, metrics_log,
                progress)


def _resume(checkpoints: Checkpointer, model: nn.Module, optimizer: torch.optim.Optimizer,
            say: Callable[[str], None]) -> dict:
    if not checkpoints.last_path.is_file():
        raise TrainingError(f"{checkpoints.last_path}: no checkpoint to resume from (--resume continues a run "
                            f"folder holding last.pt; leave --resume out to start a new run)")
    return checkpoints.restore_last(model, optimizer, say)


def _torchrun_restart() -> int:
    """How many times torchrun has restarted this worker group (0: the first attempt, or no torchrun)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def _resolved(cfg: Config) -> Config:
    """A copy of ``cfg`` with ``model.norm: auto`` resolved (the caller's object is left as it is)."""
    cfg = copy.deepcopy(cfg)
    if cfg.model.norm == "auto":
        cfg.model.norm = "frozen_bn" if cfg.model.pretrained_backbone else "bn"
    return cfg


def _seed(cfg: Config) -> None:
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)


def _device_and_precision(cfg: Config, world: int,
                          say: Callable[[str], None]) -> tuple[torch.device, torch.dtype | None]:
    device = default_device()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = resolve_precision(cfg.train.precision, device)
    slow_bf16 = dtype is None and device.type == "cpu" and cfg.train.precision == "auto"
    say(f"densedet train: device {device}, precision {dtype or 'fp32'}"
        f"{' (no AMX/AVX512-BF16 on this CPU: fp32 is faster here)' if slow_bf16 else ''}"
        f", {world} process{'es' if world > 1 else ''}")
    return device, dtype


def _load_data(cfg: Config, say: Callable[[str], None]) -> tuple[DetectionData, DetectionData]:
    """The train and val splits, the val labels matched to the training classes by name. Every image file
    is checked (from its header) before training starts: the held-out ones (val, and tune when the
    test-time set is chosen) are otherwise first opened by the first evaluation, after the budget."""
    # the digit scenes are drawn by rank 0 alone: two processes drawing at once delete each other's files
    with rank0_first(cfg.data.format == "digits"):
        train_data = load_split(cfg.data, "train")
    val_data = align_classes(load_split(cfg.data, "val"), train_data.class_names)
    say(f"train data: {train_data.report}".rstrip())
    say(f"val data: {val_data.report}".rstrip())
    if train_data.num_classes != cfg.model.num_classes:
        names = ", ".join(train_data.class_names[:12]) + ("…" if train_data.num_classes > 12 else "")
        raise ConfigError(f"model.num_classes is {cfg.model.num_classes} but the training data has "
                          f"{train_data.num_classes} classes ({names})")
    check_image_files(train_data)
    check_image_files(val_data)
    if cfg.test.tta_choose:
        check_image_files(load_split(cfg.data, "tune"))
    return train_data, val_data


def _build_model(cfg: Config, device: torch.device, init_weights: str | None,
                 say: Callable[[str], None]) -> DenseDetector:
    model = build_from_config(cfg.model)
    model.config = cfg.model
    if init_weights:
        load_weights(model, init_weights)
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.train.gemm_weight_grad and device.type == "cpu":
        conv_grad.use_gemm_weight_grad(model)   # class swap only: parameters, state dict and checkpoints unchanged
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {cfg.model.arch} {cfg.model.backbone}, {n_params / 1e6:.1f}M parameters, norm {cfg.model.norm}")
    return model


def _build_ema(cfg: Config, model: nn.Module, saved: dict, say: Callable[[str], None],
               checkpoints: Checkpointer) -> ModelEMA | None:
    """The weight average (``train.ema_decay``), continued from the resumed checkpoint's when it has one."""
    if cfg.train.ema_decay <= 0:
        return None
    ema = ModelEMA(model, cfg.train.ema_decay)
    if "ema" in saved:
        ema.load_state_dict(saved["ema"])
    elif saved.get("iteration", 0) > 0:
        say(f"note: {checkpoints.last_path} holds no weight average (written without train.ema_decay); "
            f"it starts here")
    return ema


def _distributed(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """The model wrapped for several processes; built after any freezing, since DDP reduces the
    gradients of the parameters that need them."""
    if world == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

"""The training loop: one process or several (``torchrun``), resumable, with nothing lost.

``train(cfg)`` runs the whole job: data → model → SGD with warm-up and a step or cosine schedule →
periodic COCO evaluation and best-checkpoint keeping → final metrics, curves and drawn predictions.

Guarantees:
- every checkpoint is written atomically (``checkpoint.atomic_save``), holding the config, so
  ``--weights CKPT`` alone rebuilds the model;
- ``resume=True`` restores model, optimizer, schedule, RNG states and iteration from
  ``output_dir/last.pt``; batches and augmentation are functions of the iteration
  (``engine.data.BatchStream``), so the resumed run continues as if never stopped (bit for bit
  with a fixed ``max_iters`` and the same thread count; a time-budgeted run spends the budget
  left, re-fitting its iteration count to the measured speed);
- a non-finite loss or gradient never reaches the weights: the step is skipped and counted, and
  ``train.max_bad_steps`` in a row stop the run with the last good checkpoint intact.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..config import Config, ConfigError, save_config, to_dict
from ..device import autocast, default_device, flush_denormals, fused_adam_ok, resolve_precision
from ..models import build_from_config
from ..tta import tta_from_config
from .checkpoint import CHECKPOINT_FORMAT, atomic_save, load_checkpoint
from .data import BatchStream, build_train_dataset, load_split
from .ema import ModelEMA
from .evaluate import evaluate_model

__all__ = ["train", "TrainingError", "build_optimizer", "lr_factor", "init_distributed"]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


# -- distributed ------------------------------------------------------------------------------

def init_distributed() -> tuple[int, int]:
    """(rank, world_size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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



def lr_factor(iteration: int, max_iters: int, cfg: Config) -> float:
    """Multiplier of the base LR: linear warm-up from ``warmup_factor``, then steps or cosine."""
    s = cfg.solver
    if s.schedule == "cosine":
        progress = min(1.0, iteration / max(1, max_iters))
        factor = s.min_lr_factor + (1 - s.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        factor = s.gamma ** sum(iteration >= step for step in s.steps)
    if iteration < s.warmup_iters:
        alpha = iteration / s.warmup_iters
        factor *= s.warmup_factor * (1 - alpha) + alpha
    return factor


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
            "python": list(random.getstate()[1])}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = np.random.get_state()
    np.random.set_state((np_state[0], np.asarray(state["numpy"], dtype=np.uint32), *np_state[2:]))
    py = random.getstate()
    random.setstate((py[0], tuple(state["python"]), py[2]))


# -- logging ------------------------------------------------------------------------------------

class Progress:
    """A one-line progress bar with ETA on a terminal; plain periodic lines otherwise (CI, files)."""

    def __init__(self, total: int, stream=sys.stderr) -> None:
        self.total, self.stream, self.tty = total, stream, stream.isatty()
        self.start = time.perf_counter()

    def update(self, done: int, text: str, final: bool = False) -> None:
        elapsed = time.perf_counter() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        frac = done / max(1, self.total)
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        eta_s = "?" if not math.isfinite(eta) else time.strftime("%M:%S", time.gmtime(eta))
        line = f"[{bar}] {done}/{self.total} eta {eta_s} {text}"
        if self.tty:
            self.stream.write("\r" + line[:160].ljust(160) + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# -- the job -----------------------------------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _checkpoint(model, optimizer, cfg, iteration, max_iters, data, extra=None) -> dict:
    return {"format": CHECKPOINT_FORMAT, "model": _unwrap(model).state_dict(), "config": to_dict(cfg),
            "class_names": list(data.class_names), "category_ids": data.category_ids,
            "iteration": iteration, "max_iters": max_iters, "optimizer": optimizer.state_dict(),
            "rng": _rng_state(), "num_threads": torch.get_num_threads(), **(extra or {})}


def train(cfg: Config, resume: bool = False, log: Callable[[str], None] | None = None,
          init_weights: str | None = None) -> dict:
    """Train ``cfg`` to the end and return the final COCO metrics (rank 0; ``{}`` elsewhere).

    ``init_weights`` starts from a checkpoint's (or state dict's) weights (fine-tuning), as
    opposed to ``resume``, which continues the same run.
    """
    rank, world = init_distributed()
    flush_denormals()
    is_main = rank == 0
    log = log if log is not None else (lambda msg: print(msg, file=sys.stderr, flush=True))
    say = log if is_main else (lambda msg: None)
    out = Path(cfg.train.output_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    from ..ablation_losses import reset_ghmc_state
    reset_ghmc_state()          # GHM-C's gradient-density average belongs to one run
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)

    device = default_device()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = resolve_precision(cfg.train.precision, device)
    say(f"densedet train: device {device}, precision {dtype or 'fp32'}"
        f"{' (no AMX/AVX512-BF16 on this CPU: fp32 is faster here)' if dtype is None and device.type == 'cpu' and cfg.train.precision == 'auto' else ''}"
        f", {world} process{'es' if world > 1 else ''}")

    train_data = load_split(cfg.data, "train")
    val_data = load_split(cfg.data, "val")
    say(f"train data: {train_data.report}".rstrip())
    if train_data.num_classes != cfg.model.num_classes:
        raise ConfigError(f"model.num_classes is {cfg.model.num_classes} but the training data has "
                          f"{train_data.num_classes} classes ({', '.join(train_data.class_names[:12])}"
                          f"{'…' if train_data.num_classes > 12 else ''})")
    dataset = build_train_dataset(cfg, train_data)
    stream = BatchStream(dataset, cfg.train.batch_size, cfg.train.seed, rank, world, cfg.data.crop_sizes)

    if cfg.model.norm == "auto":
        cfg.model.norm = "frozen_bn" if cfg.model.pretrained_backbone else "bn"
    model = build_from_config(cfg.model)
    model.config = cfg.model
    if init_weights:
        from ..models import load_weights
        load_weights(model, init_weights)
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.train.gemm_weight_grad and device.type == "cpu":
        from ..conv_grad import use_gemm_weight_grad
        use_gemm_weight_grad(model)        # class swap only: parameters, state dict and checkpoints unchanged
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {cfg.model.arch} {cfg.model.backbone}, {n_params / 1e6:.1f}M parameters, norm {cfg.model.norm}")
    optimizer = build_optimizer(model, cfg)

    start_iter, max_iters, best_ap = 0, cfg.train.max_iters, -1.0
    elapsed_before, skipped_before = 0.0, 0
    last_saved = None        # iteration of the last.pt this run wrote or resumed from
    last_path = out / "last.pt"
    if resume:
        if not last_path.is_file():
            raise TrainingError(f"--resume: no checkpoint at {last_path}")
        ckpt = load_checkpoint(last_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        _set_rng_state(ckpt["rng"])
        start_iter, max_iters = ckpt["iteration"], ckpt["max_iters"]
        best_ap = ckpt.get("best_ap", -1.0)
        elapsed_before = ckpt.get("elapsed", 0.0)
        skipped_before, last_saved = ckpt.get("skipped_steps", 0), start_iter
        if is_main:
            _drop_records_after(out / "metrics.jsonl", start_iter)
        say(f"resumed from {last_path} at iteration {start_iter}/{max_iters}")
        if ckpt.get("num_threads", torch.get_num_threads()) != torch.get_num_threads():
            # Float sums are reduced in a thread-count-dependent order: same weights need the same count.
            say(f"note: the interrupted run used {ckpt['num_threads']} threads, this one {torch.get_num_threads()}; "
                f"set OMP_NUM_THREADS={ckpt['num_threads']} for bit-identical continuation")
        for stale in out.glob(".last.pt.*.tmp"):      # a save cut short by the kill
            stale.unlink(missing_ok=True)
    elif is_main:
        (out / "metrics.jsonl").write_text("")

    pretrain_stats: dict = {}
    if not resume and (cfg.train.pretrain_minutes > 0 or cfg.train.pretrain_iters > 0):
        pretrain_stats = _pretrain(model, dataset, train_data, cfg, device, dtype, rank, world, say)
        elapsed_before = pretrain_stats["seconds"]        # the warm-up is part of the time budget
        if is_main:    # a run killed from here on resumes into detection, not into a second warm-up
            atomic_save(_checkpoint(model, optimizer, cfg, 0, max_iters, train_data,
                                    {"best_ap": best_ap, "elapsed": elapsed_before, "skipped_steps": 0,
                                     "pretrain": pretrain_stats}), last_path)
        last_saved = 0
    elif resume:
        pretrain_stats = ckpt.get("pretrain", {})
    if pretrain_stats and cfg.train.pretrain_freeze_stages > 0:
        # The warm-up taught the early stages their filters; detection then skips their backward.
        model.backbone.body.freeze(cfg.train.pretrain_freeze_stages)
        model.train()
    ema = ModelEMA(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    if ema is not None and resume:
        if "ema" in ckpt:
            ema.load_state_dict(ckpt["ema"])
        elif start_iter > 0:
            say(f"note: {last_path} holds no weight average (written without train.ema_decay); it starts here")
    ddp_model = model
    if world > 1:       # after any freezing: DDP reduces the gradients of the parameters that need them
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    budget = cfg.train.max_minutes * 60.0
    calibrated = resume or budget <= 0
    recent_steps: collections.deque = collections.deque(maxlen=20)
    progress = Progress(max_iters)
    t_train = 0.0            # seconds spent in training steps (evaluation excluded)
    bad_in_a_row, skipped = 0, skipped_before
    window: dict[str, float] = {}
    window_n, window_imgs, window_t = 0, 0, time.perf_counter()
    iteration = start_iter
    history = []
    while iteration < max_iters:
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cfg.solver.lr * lr_factor(iteration, max_iters, cfg)
        images, targets = stream.batch(iteration)
        if cfg.data.train_min_sizes:
            # Multi-scale: one shorter side for the whole batch, a function of the iteration alone
            # (the same on every process and after a resume).
            model.transform.train_min_sizes = (stream.min_size(iteration, cfg.data.train_min_sizes),)
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        with autocast(device, dtype):
            losses = ddp_model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss))
        if world > 1:
            # Agree before backward: DDP all-reduces gradients inside backward, so a process that
            # skipped it would leave the others waiting there (a hang, or mismatched collectives).
            finite = _all_finite(finite, device)
        if finite:
            loss.backward()
            if cfg.solver.clip_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.solver.clip_grad_norm)
            else:
                norm = torch.norm(torch.stack([p.grad.detach().norm() for p in model.parameters()
                                               if p.grad is not None]))
            finite = bool(torch.isfinite(norm))
            if world > 1:  # every process must agree to skip, or DDP's replicas diverge
                finite = _all_finite(finite, device)
        if finite:
            optimizer.step()
            if ema is not None:
                ema.update(model)
            bad_in_a_row = 0
        else:
            skipped += 1
            bad_in_a_row += 1
            say(f"iteration {iteration}: non-finite loss or gradient "
                f"({ {k: float(v.detach()) for k, v in losses.items()} }); step skipped ({bad_in_a_row} in a row)")
            if bad_in_a_row >= cfg.train.max_bad_steps:
                saved = (f"The last good checkpoint is {last_path} (iteration {last_saved})" if last_saved is not None
                         else f"No checkpoint was written yet (train.checkpoint_period {cfg.train.checkpoint_period})")
                raise TrainingError(f"{bad_in_a_row} non-finite steps in a row at iteration {iteration}; stopping. "
                                    f"{saved}; try a lower solver.lr or solver.clip_grad_norm")
        iteration += 1
        t_train += time.perf_counter() - t0
        recent_steps.append(time.perf_counter() - t0)
        for k, v in losses.items():
            window[k] = window.get(k, 0.0) + float(v.detach())
        window_n += 1
        window_imgs += stream.size_of(iteration)

        if budget > 0 and iteration - start_iter >= 10 and iteration % 10 == 0 and iteration < max_iters:
            # Fit the schedule to the time budget: from the measured step time, set max_iters so the
            # run and its LR schedule end on budget. Re-fitted every 10 steps (the machine's load can
            # change); max_iters is saved with each checkpoint, so a resumed run continues the same plan.
            per_iter = sum(recent_steps) / len(recent_steps)
            remaining = budget - elapsed_before - t_train
            new_max = max(iteration + 1, iteration + int(remaining / per_iter * 0.98))
            if world > 1:
                t = torch.tensor([new_max], device=device)
                dist.broadcast(t, 0)
                new_max = int(t.item())
            changed = abs(new_max - max_iters) > max(2, 0.02 * max_iters)
            max_iters = new_max
            progress.total = max_iters
            if not calibrated or changed:
                say(f"time budget {cfg.train.max_minutes:g} min: {per_iter:.2f} s/iteration -> {max_iters} iterations")
            calibrated = True

        if iteration % cfg.train.log_period == 0 or iteration == max_iters:
            dt = time.perf_counter() - window_t
            record = {"iteration": iteration, "lr": optimizer.param_groups[0]["lr"],
                      **{f"loss_{k}": v / window_n for k, v in window.items()},
                      "images_per_s": window_imgs / dt, "epoch": stream.epoch_of(iteration),
                      "skipped_steps": skipped}
            record["loss"] = sum(v for k, v in record.items() if k.startswith("loss_"))
            history.append(record)
            if is_main:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(_json_safe(record)) + "\n")
                terms = " ".join(f"{k[5:]} {v:.3f}" for k, v in record.items() if k.startswith("loss_"))
                progress.update(iteration, f"loss {record['loss']:.3f} ({terms}) lr {record['lr']:.4g} "
                                           f"{record['images_per_s']:.1f} img/s")
            window, window_n, window_imgs, window_t = {}, 0, 0, time.perf_counter()

        done = iteration >= max_iters
        if budget > 0 and elapsed_before + t_train >= budget and not done:
            say(f"time budget reached at iteration {iteration}")
            max_iters, done = iteration, True
        periodic_eval = cfg.train.eval_period and iteration % cfg.train.eval_period == 0 and not done
        if periodic_eval:
            with ema.applied(model) if ema is not None else contextlib.nullcontext():
                metrics = evaluate_model(model, val_data, cfg.test.batch_size, device, dtype, cfg.test.max_dets)
                if is_main and metrics["AP"] > best_ap:     # saves the evaluated weights: the average if any
                    best_ap = metrics["AP"]
                    atomic_save(_checkpoint(model, optimizer, cfg, iteration, max_iters, train_data,
                                            {"metrics": _scalars(metrics)}), out / "model_best.pt")
            if is_main:
                say(f"iteration {iteration}: AP {metrics['AP']:.4f} AP50 {metrics['AP50']:.4f}")
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"iteration": iteration, "eval": _scalars(metrics)}) + "\n")
        if done or iteration % cfg.train.checkpoint_period == 0:
            if is_main:
                atomic_save(_checkpoint(model, optimizer, cfg, iteration, max_iters, train_data,
                                        {"best_ap": best_ap, "elapsed": elapsed_before + t_train,
                                         "skipped_steps": skipped, "pretrain": pretrain_stats,
                                         **({"ema": ema.state_dict()} if ema is not None else {})}), last_path)
            last_saved = iteration

    train_seconds = elapsed_before + t_train
    detect_seconds = train_seconds - pretrain_stats.get("seconds", 0.0)
    images_per_s = stream.first_sample(iteration) / max(detect_seconds, 1e-9)
    say(f"training done: {iteration} iterations, {train_seconds / 60:.1f} min of training"
        f"{f' ({detect_seconds / 60:.1f} detecting)' if pretrain_stats else ''}, "
        f"{images_per_s:.1f} images/s, {skipped} skipped steps")
    if ema is not None:     # from here on the model is the average: evaluated, saved, drawn
        model.load_state_dict(ema.state)
    metrics = single = evaluate_model(model, val_data, cfg.test.batch_size, device, dtype, cfg.test.max_dets)
    tta = tta_from_config(cfg.test)
    if tta is not None:  # the reported numbers are then the TTA ones; the best checkpoint is chosen single-scale
        say(f"single scale: AP {single['AP']:.3f}, AP50 {single['AP50']:.3f}; now with test-time augmentation "
            f"({tta.describe()})")
        metrics = evaluate_model(model, val_data, cfg.test.batch_size, device, dtype, cfg.test.max_dets, tta=tta)
    if not is_main:
        return {}
    final = _checkpoint(model, optimizer, cfg, iteration, max_iters, train_data, {"metrics": _scalars(metrics)})
    final.pop("optimizer")
    final.pop("rng")
    atomic_save(final, out / "model_final.pt")
    if single["AP"] > best_ap:
        atomic_save(final, out / "model_best.pt")
    summary = {**_scalars(metrics), "per_class": metrics.get("per_class", {}), "iterations": iteration,
               "train_minutes": train_seconds / 60, "images_per_s": images_per_s,
               "skipped_steps": skipped, "precision": str(dtype or "fp32")}
    if tta is not None:
        summary["tta"] = {"scales": list(tta.scales), "flip": tta.flip, "merge": tta.merge}
        summary["single_scale"] = _scalars(single)
    if pretrain_stats:
        summary["pretrain"] = pretrain_stats
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    from ..evaluation import format_table
    say(format_table(metrics))
    try:
        from .report import draw_predictions, plot_curves
        plot_curves(out / "metrics.jsonl", out / "curves.png")
        draw_predictions(model, val_data, out / "predictions", cfg.test.num_vis, device)
    except Exception as err:  # noqa: BLE001 - plots are a convenience; never lose a finished run to them
        say(f"(could not draw plots: {err})")
    say(f"run folder: {out} (model_final.pt, model_best.pt, metrics.json, metrics.jsonl, curves.png, predictions/)")
    return summary


def _pretrain(model, dataset, train_data, cfg: Config, device, dtype, rank: int, world: int, say) -> dict:
    """The box-crop warm-up of the trunk (``engine.pretrain``), on rank 0; with several processes the
    others wait and receive the trunk's weights and statistics from it."""
    from .pretrain import pretrain_backbone
    from ..data import DetectionDataset
    trunk = model.backbone.body
    stats = {}
    if rank == 0:
        images = dataset if isinstance(dataset, DetectionDataset) else DetectionDataset(
            train_data, cache_images=cfg.data.cache_images)
        t = cfg.train
        stats = pretrain_backbone(trunk, images.load_uint8, train_data, model.transform.mean, model.transform.std,
                                  t.pretrain_lr or cfg.solver.lr, cfg.solver.weight_decay, t.pretrain_batch_size,
                                  crop_sizes=tuple(t.pretrain_crop_sizes), minutes=t.pretrain_minutes,
                                  iterations=t.pretrain_iters, seed=t.seed,
                                  channels_last=t.channels_last, device=device,
                                  autocast=lambda: autocast(device, dtype), log=say)
    if world > 1:
        with torch.no_grad():
            for tensor in trunk.state_dict().values():
                flat = tensor.contiguous()        # channels_last weights: broadcast a packed copy
                dist.broadcast(flat, 0)
                tensor.copy_(flat)
        seconds = torch.tensor([stats.get("seconds", 0.0)], dtype=torch.float64, device=device)
        dist.broadcast(seconds, 0)
        stats = {**stats, "seconds": float(seconds.item())}
    return stats


def _all_finite(finite: bool, device: torch.device) -> bool:
    """True when ``finite`` holds on every process."""
    flag = torch.tensor([0.0 if finite else 1.0], device=device)
    dist.all_reduce(flag)
    return flag.item() == 0


def _drop_records_after(path: Path, iteration: int) -> None:
    """Forget the log records of iterations after ``iteration``: the interrupted run logged them,
    but their steps were lost with it and the resumed run logs them again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["iteration"] <= iteration:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            pass                # a line cut short by the kill
    path.write_text("".join(kept))


def _json_safe(record: dict) -> dict:
    """NaN/inf (a skipped step's loss) as null: strict JSON readers refuse NaN."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def _scalars(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}

"""A run's checkpoints: what goes into ``last.pt``, ``model_best.pt`` and ``model_final.pt``, and
how ``--resume`` takes ``last.pt`` back.

Every file is written with :func:`~densedet.engine.checkpoint.atomic_save` (never half a file)
and holds the config, class names and category ids, so ``--weights FILE`` alone rebuilds the
model. ``last.pt`` also holds what continues the run bit for bit: the optimizer, the RNG states,
the iteration, the time budget's plan (``max_iters``, ``elapsed``, ``plan_fitted``, ``plan_anchor``,
``plan_replans``), the best AP so far, the skipped steps, the warm-up's statistics and the weight
average. ``model_best.pt`` holds the weights of the best periodic evaluation (the average when
there is one); ``model_final.pt`` the final weights (the average when there is one), without
optimizer or RNG states.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..config import Config, to_dict
from ..data import DetectionData
from .budget import TimeBudget
from .checkpoint import CHECKPOINT_FORMAT, atomic_save, load_checkpoint
from .distributed import world_size
from .ema import ModelEMA

__all__ = ["RunState", "Checkpointer", "rng_state", "set_rng_state"]


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
            "python": list(random.getstate()[1])}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = np.random.get_state()
    np.random.set_state((np_state[0], np.asarray(state["numpy"], dtype=np.uint32), *np_state[2:]))
    py = random.getstate()
    random.setstate((py[0], tuple(state["python"]), py[2]))


@dataclass
class RunState:
    """Where a run stands, besides its weights, optimizer and time budget."""

    iteration: int = 0
    best_ap: float = -1.0            # of the periodic evaluations (rank 0)
    skipped_steps: int = 0
    pretrain: dict = field(default_factory=dict)    # the box-crop warm-up's statistics; {} without one

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> RunState:
        return cls(ckpt["iteration"], ckpt.get("best_ap", -1.0), ckpt.get("skipped_steps", 0),
                   ckpt.get("pretrain", {}))


class Checkpointer:
    """Builds and writes the run's checkpoint files under ``out`` (only when ``write``: rank 0)."""

    def __init__(self, out: Path, cfg: Config, data: DetectionData, write: bool = True) -> None:
        self.cfg, self.data, self.write = cfg, data, write
        self.last_path, self.best_path, self.final_path = out / "last.pt", out / "model_best.pt", out / "model_final.pt"
        self.last_saved: int | None = None      # the iteration of the last.pt written or resumed from

    def contents(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, iteration: int,
                 max_iters: int, **extra) -> dict:
        """A checkpoint of ``model``; with ``optimizer`` also its state and the RNG states."""
        ckpt = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": to_dict(self.cfg),
                "class_names": list(self.data.class_names), "category_ids": self.data.category_ids,
                "iteration": iteration, "max_iters": max_iters}
        if optimizer is not None:
            ckpt.update(optimizer=optimizer.state_dict(), rng=rng_state())
        return {**ckpt, "num_threads": torch.get_num_threads(), "world_size": world_size(), **extra}

    def save_last(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: RunState, budget: TimeBudget,
                  ema: ModelEMA | None = None) -> None:
        plan = budget.state_dict()
        if self.write:
            atomic_save(self.contents(model, optimizer, state.iteration, plan.pop("max_iters"), **plan,
                                      best_ap=state.best_ap, skipped_steps=state.skipped_steps,
                                      pretrain=state.pretrain, **({"ema": ema.state_dict()} if ema else {})),
                        self.last_path)
        self.last_saved = state.iteration

    def save_best(self, model: nn.Module, optimizer: torch.optim.Optimizer, iteration: int, max_iters: int,
                  metrics: dict) -> None:
        if self.write:
            atomic_save(self.contents(model, optimizer, iteration, max_iters, metrics=metrics), self.best_path)

    def save_final(self, model: nn.Module, iteration: int, max_iters: int, metrics: dict, best: bool) -> None:
        """model_final.pt, and model_best.pt too when ``best`` (the final weights beat every evaluation)."""
        if self.write:
            final = self.contents(model, None, iteration, max_iters, metrics=metrics)
            atomic_save(final, self.final_path)
            if best:
                atomic_save(final, self.best_path)

    def restore_last(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                     say: Callable[[str], None]) -> dict:
        """Load last.pt's weights, optimizer and RNG states; returns the checkpoint (for the rest)."""
        ckpt = load_checkpoint(self.last_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        self.last_saved = ckpt["iteration"]
        say(f"resumed from {self.last_path} at iteration {ckpt['iteration']}/{ckpt['max_iters']}")
        threads = ckpt.get("num_threads", torch.get_num_threads())
        processes = ckpt.get("world_size", world_size())
        if processes != world_size():
            # Each process normalises and reduces its share of the batch: another count sums in another order.
            say(f"note: the interrupted run trained in {processes} process{'es' if processes > 1 else ''}, this "
                f"one in {world_size()}: the same batches follow, but the weights are not bit-identical to an "
                f"uninterrupted run's")
        elif threads != torch.get_num_threads():
            # Float sums are reduced in a thread-count-dependent order: same weights need the same count.
            say(f"note: the interrupted run used {threads} threads, this one {torch.get_num_threads()}; "
                f"set OMP_NUM_THREADS={threads} for bit-identical continuation")
        if self.write:
            for stale in self.last_path.parent.glob(f".{self.last_path.name}.*.tmp"):   # a save cut short by the kill
                stale.unlink(missing_ok=True)
        return ckpt

    def describe_last(self) -> str:
        """Where a stopped run can be taken up again."""
        if self.last_saved is None:
            return f"No checkpoint was written yet (train.checkpoint_period {self.cfg.train.checkpoint_period})"
        return f"The last good checkpoint is {self.last_path} (iteration {self.last_saved})"

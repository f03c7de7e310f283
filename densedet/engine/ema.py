"""Exponential moving average of a model's weights (``train.ema_decay``).

The average is taken over the whole floating-point state: parameters and BatchNorm statistics. Its
decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the first steps,
whose weights are far from anything useful, fade out quickly instead of dominating a short run
(the ramp passes 0.99 only after ~900 steps: in shorter runs it, not ``decay``, sets the average).
Evaluation during and at the end of training uses the averaged weights, and the final checkpoint
holds them; ``last.pt`` holds both the trained weights and the average, so ``--resume`` continues
both.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

__all__ = ["ModelEMA"]


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._float_keys = [k for k, v in self.state.items() if v.is_floating_point()]
        self._other_keys = [k for k in self.state if k not in self._float_keys]   # BatchNorm's step count

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current state (call after each optimizer step)."""
        weight = 1.0 - self.current_decay()
        live = model.state_dict()
        torch._foreach_lerp_([self.state[k] for k in self._float_keys], [live[k] for k in self._float_keys], weight)
        for k in self._other_keys:           # integer buffers are copied, not averaged
            self.state[k].copy_(live[k])
        self.updates += 1

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """``model`` with the averaged weights inside the block, its own weights restored after."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.state)
        try:
            yield model
        finally:
            model.load_state_dict(own)

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "updates": self.updates, "state": self.state}

    def load_state_dict(self, saved: dict[str, object]) -> None:
        state: dict[str, Tensor] = saved["state"]  # type: ignore[assignment]
        missing = set(self.state) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the model: {sorted(missing)[:5]}")
        for k, v in state.items():
            self.state[k].copy_(v)
        self.updates = int(saved["updates"])  # type: ignore[arg-type]

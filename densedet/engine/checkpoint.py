"""Checkpoints: written atomically, read without executing code, self-describing.

A checkpoint is a dict saved with ``torch.save``::

    {"format": "densedet-checkpoint-v1", "model": state_dict, "config": Config as plain dict,
     "class_names": [...], "category_ids": [...] | None, "iteration": int,
     "optimizer": ..., "scheduler": ..., "rng": {...}, "metrics": {...}}

Only tensors, numbers, strings, lists and dicts are stored, so it loads with
``torch.load(weights_only=True)``: a checkpoint file can never run code. Saving writes to a
temporary file in the same folder, fsyncs it and renames it over the target, so a kill or a full
disk at any moment leaves either the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DensedetError
from ..config import Config, ConfigError, from_dict, upgrade_config_dict, with_model_options
from ..models import build_from_config, load_state_dict_checked
from ..serialization import UnreadableFile, load_tensors

__all__ = ["CHECKPOINT_FORMAT", "atomic_save", "load_checkpoint", "model_from_checkpoint", "CheckpointError"]

CHECKPOINT_FORMAT = "densedet-checkpoint-v1"


class CheckpointError(DensedetError, ValueError):
    """A checkpoint file is missing, unreadable, or does not fit the model."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` via a temporary file + fsync + rename (POSIX-atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CheckpointError(f"{path}: could not write checkpoint ({err.strerror or err}); "
                              f"the previous file at that path is unchanged") from None
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_checkpoint(path: str | Path) -> dict:
    """Read a densedet checkpoint (``weights_only=True``); raises :class:`CheckpointError` naming the file."""
    path = Path(path)
    try:
        ckpt = load_tensors(path, "checkpoint")
    except UnreadableFile as err:
        raise CheckpointError(str(err)) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a densedet checkpoint (no '{CHECKPOINT_FORMAT}' format tag); "
                              f"for a plain state dict use build_model(..., weights=path)")
    return ckpt


def model_from_checkpoint(path: str | Path, **model_overrides: Any) -> tuple[nn.Module, Config, dict]:
    """Rebuild the model a checkpoint was trained with and load its weights.

    Returns ``(model in eval mode, Config, checkpoint dict)``. ``model_overrides`` change
    inference-time fields (``score_thresh``, ``detections_per_img``, ``min_size`` …).
    """
    ckpt = load_checkpoint(path)
    try:
        cfg = from_dict(Config, upgrade_config_dict(ckpt["config"]))
        norm = cfg.model.norm if cfg.model.norm != "auto" else (       # keep the norm the run trained with
            "frozen_bn" if cfg.model.pretrained_backbone else "bn")
        # the weights come from the checkpoint, not from an ImageNet file
        cfg.model = with_model_options(cfg.model, **model_overrides, norm=norm, pretrained_backbone=None)
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None
    model = build_from_config(cfg.model)
    model.config = cfg.model
    try:
        load_state_dict_checked(model, ckpt["model"], str(path))
    except ValueError as err:  # a CheckpointError, so that the CLI reports it as a bad input
        raise CheckpointError(str(err)) from None
    model.class_names = ckpt.get("class_names")
    model.category_ids = ckpt.get("category_ids")
    return model.eval(), cfg, ckpt

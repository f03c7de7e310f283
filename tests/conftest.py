"""Shared fixtures: a tiny digit-scene dataset and a tiny training config that runs in seconds.

Nothing here is autouse: fixtures apply only to the tests that ask for them.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import pytest
import torch

from densedet.config import Config
from densedet.data import make_digit_scenes


@pytest.fixture(scope="session")
def digit_scenes(tmp_path_factory) -> dict[str, str]:
    """8 training and 4 validation digit scenes of 128x128 px (2-5 digits of 12-64 px each),
    generated once per session. Returns make_digit_scenes' paths (train_json, train_images, ...)."""
    root = tmp_path_factory.mktemp("digits")
    return make_digit_scenes(str(root), num_train=8, num_val=4, size=128, seed=0,
                             min_digits=2, max_digits=5, min_px=12, max_px=64)


@pytest.fixture(scope="session")
def make_tiny_config(digit_scenes):
    """Factory: ``make_tiny_config(output_dir, norm="bn")`` -> a :class:`Config` for a 6-iteration
    run of a small RetinaNet R18-FPN (32 FPN channels, one GN head conv, P3-P6) on
    ``digit_scenes`` at 128 px, writing to ``output_dir``.

    The scenes are read as COCO files: ``data.format: digits`` always regenerates 320 px scenes
    (DataConfig has no scene-size field), which would cost seconds per test.
    """

    def make(output_dir, norm: str = "bn") -> Config:
        cfg = Config()
        m = cfg.model
        m.arch, m.backbone, m.num_classes, m.norm, m.frozen_stages = "retinanet", "resnet18", 10, norm, 0
        m.retinanet.fpn_channels, m.retinanet.head_convs, m.retinanet.head_norm = 32, 1, "gn"
        m.retinanet.max_level, m.anchor_sizes = 6, [16.0, 32.0, 64.0, 128.0]
        m.min_size, m.max_size, m.size_divisible = 128, 128, 64
        d = cfg.data
        d.format = "coco"
        d.train, d.train_images = digit_scenes["train_json"], digit_scenes["train_images"]
        d.val, d.val_images = digit_scenes["val_json"], digit_scenes["val_images"]
        d.hflip_prob = 0.5          # exercise seeded augmentation (resume must replay it exactly)
        d.train_min_sizes = [64, 128]   # and multi-scale training (one size per batch, by iteration)
        s = cfg.solver
        s.lr, s.warmup_iters, s.warmup_factor, s.clip_grad_norm = 0.01, 2, 0.1, 10.0
        t = cfg.train
        t.batch_size, t.max_iters, t.checkpoint_period, t.log_period = 2, 6, 2, 1
        t.output_dir = str(output_dir)
        t.max_minutes, t.precision, t.deterministic, t.eval_period = 0.0, "fp32", True, 0
        cfg.test.batch_size, cfg.test.num_vis = 4, 0
        return cfg

    return make


@pytest.fixture
def tiny_config(make_tiny_config, tmp_path):
    """Factory: ``tiny_config(name="run", norm="bn")`` -> the tiny config writing to ``tmp_path / name``."""
    return lambda name="run", norm="bn": make_tiny_config(tmp_path / name, norm)


@contextlib.contextmanager
def torch_globals_kept():
    """``train`` seeds the global RNGs and switches on deterministic algorithms for the whole
    process; put both back so later tests in the session see what they expect."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_rng_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)


@pytest.fixture
def restore_torch_globals():
    """Function-scoped :func:`torch_globals_kept`."""
    with torch_globals_kept():
        yield


@pytest.fixture(scope="session")
def keep_torch_globals():
    """The :func:`torch_globals_kept` context manager, for module-scoped fixtures."""
    return torch_globals_kept


@pytest.fixture(scope="module")
def no_plots():
    """Skip ``train``'s closing curve plot, drawings and report.html (matplotlib: ~1.5 s a run) for the
    module that asks; the engine tests check numbers and files, not pictures."""
    from densedet.engine import report
    real = report.plot_curves, report.draw_predictions, report.write_run_report
    report.plot_curves = report.draw_predictions = report.write_run_report = lambda *args, **kwargs: None
    yield
    report.plot_curves, report.draw_predictions, report.write_run_report = real


@pytest.fixture
def stop_training_at(monkeypatch):
    """``stop_training_at(n)``: from now on a run asking the batch stream for iteration ``n`` is
    interrupted there (KeyboardInterrupt, as a Ctrl-C); ``stop_training_at(None)`` lifts it."""
    from densedet.engine.data import BatchStream
    real = BatchStream.batch

    def interrupted(self, iteration):
        if iteration == stop["at"]:
            raise KeyboardInterrupt
        return real(self, iteration)

    stop = {"at": None}
    monkeypatch.setattr(BatchStream, "batch", interrupted)
    return lambda iteration: stop.update(at=iteration)


@pytest.fixture(autouse=True)
def _reset_flush_denormal():
    """densedet's training/inference entry points turn on flush-to-zero for denormals (process-wide
    CPU state, see densedet.device.flush_denormals); reset it after each test so that tests of exact
    float behaviour (hypothesis feeds subnormals to the box ops) do not depend on test order."""
    yield
    torch.set_flush_denormal(False)

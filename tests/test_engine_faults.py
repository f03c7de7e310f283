"""What the engine does when things go wrong: non-finite steps, a kill or a full disk while a
checkpoint is written, a checkpoint file that carries code or does not fit the model."""

from __future__ import annotations

import errno
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from densedet.config import to_dict
from densedet.engine import checkpoint as ckpt_module
from densedet.engine import trainer
from densedet.engine.checkpoint import (CHECKPOINT_FORMAT, CheckpointError, atomic_save, load_checkpoint,
                                        model_from_checkpoint)
from densedet.engine.trainer import TrainingError, train
from densedet.models import build_from_config, load_weights

pytestmark = pytest.mark.usefixtures("no_plots")

REPO = Path(__file__).resolve().parent.parent


# -- non-finite steps -----------------------------------------------------------------------------

def poison_training(monkeypatch, bad_steps: dict[int, str]) -> dict[int, dict[str, torch.Tensor]]:
    """Make ``train``'s model return a bad loss at the given training steps (0-based calls).

    ``{step: "loss"}``: the classification loss is NaN. ``{step: "grad"}``: the loss stays finite
    but its gradient is NaN (``sqrt(0 * x)`` is 0, its derivative inf * 0). Returns the
    parameters seen at the start of every step, {step: {name: tensor}}, filled in as training runs.
    """
    seen: dict[int, dict[str, torch.Tensor]] = {}
    real_build = trainer.build_from_config

    def build(cfg):
        model = real_build(cfg)
        forward, steps = model.forward, itertools.count()

        def poisoned(images, targets=None, **kwargs):
            if not model.training:
                return forward(images, targets, **kwargs)
            step = next(steps)
            seen[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
            losses = forward(images, targets, **kwargs)
            if bad_steps.get(step) == "loss":
                losses["cls"] = losses["cls"] * float("nan")
            elif bad_steps.get(step) == "grad":
                zero = sum(p.sum() for p in model.head.parameters()) * 0.0
                losses["box"] = losses["box"] + zero.sqrt()
            return losses

        model.forward = poisoned
        return model

    monkeypatch.setattr(trainer, "build_from_config", build)
    return seen


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_non_finite_steps_are_skipped_and_counted(tiny_config, monkeypatch, restore_torch_globals):
    """A NaN loss (step 2) and a finite loss with a NaN gradient (step 3) leave the weights as
    they were; the other steps do change them; metrics.jsonl and metrics.json count 2 skips."""
    cfg = tiny_config()
    cfg.train.max_bad_steps = 3
    seen = poison_training(monkeypatch, {2: "loss", 3: "grad"})
    summary = train(cfg, log=lambda msg: None)
    assert sorted(seen) == [0, 1, 2, 3, 4, 5]
    assert not same(seen[1], seen[2])          # step 1 was taken
    assert same(seen[2], seen[3])              # step 2 (NaN loss) skipped
    assert same(seen[3], seen[4])              # step 3 (finite loss, NaN gradient) skipped
    assert not same(seen[4], seen[5])          # training goes on
    records = {r["iteration"]: r for r in jsonl(Path(cfg.train.output_dir) / "metrics.jsonl") if "loss_cls" in r}
    assert [records[i]["skipped_steps"] for i in range(1, 7)] == [0, 0, 1, 2, 2, 2]
    assert summary["skipped_steps"] == 2 and summary["iterations"] == 6
    final = load_checkpoint(Path(cfg.train.output_dir) / "model_final.pt")["model"]
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())


def test_too_many_bad_steps_stop_with_the_last_good_checkpoint(tiny_config, monkeypatch, restore_torch_globals):
    """Steps 3, 4, ... all NaN with max_bad_steps 2: TrainingError at the second, naming last.pt,
    which loads, holds the weights the good steps made, and resumes to the end once the cause
    is gone."""
    cfg = tiny_config()
    cfg.train.max_bad_steps = 2
    seen = poison_training(monkeypatch, {3: "loss", 4: "loss", 5: "loss"})
    last = Path(cfg.train.output_dir) / "last.pt"
    with pytest.raises(TrainingError) as info:
        train(cfg, log=lambda msg: None)
    message = str(info.value)
    assert "2 non-finite steps in a row" in message and f"{last} (iteration 4)" in message
    assert sorted(seen) == [0, 1, 2, 3, 4]
    ckpt = load_checkpoint(last)
    assert ckpt["iteration"] == 4                        # written after step 3, which was skipped
    weights = {n: ckpt["model"][n] for n in seen[3]}
    assert same(weights, seen[3]) and same(weights, seen[4])
    assert all(torch.isfinite(v).all() for v in weights.values())

    monkeypatch.setattr(trainer, "build_from_config", build_from_config)
    summary = train(cfg, resume=True, log=lambda msg: None)
    assert summary["iterations"] == 6
    assert summary["skipped_steps"] == 1                 # step 3; step 4's failure was not checkpointed


def test_stopping_before_any_checkpoint_says_there_is_none(tiny_config, monkeypatch, restore_torch_globals):
    cfg = tiny_config()
    cfg.train.max_bad_steps, cfg.train.checkpoint_period = 2, 100
    poison_training(monkeypatch, {0: "loss", 1: "loss", 2: "loss"})
    with pytest.raises(TrainingError, match="No checkpoint was written yet"):
        train(cfg, log=lambda msg: None)
    assert not (Path(cfg.train.output_dir) / "last.pt").exists()


_RANK0_NAN = """
import sys, os
from densedet.engine import trainer
real_build = trainer.build_from_config
def build(cfg):
    model = real_build(cfg)
    forward, calls = model.forward, [0]
    def poisoned(images, targets=None, **kwargs):
        losses = forward(images, targets, **kwargs)
        if model.training:
            calls[0] += 1
            if calls[0] == 2 and os.environ["RANK"] == "0":
                losses["cls"] = losses["cls"] * float("nan")
        return losses
    model.forward = poisoned
    return model
trainer.build_from_config = build
from densedet.engine import report
report.plot_curves = report.draw_predictions = report.write_run_report = lambda *a, **k: None
from densedet.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_nan_on_one_process_only_is_skipped_by_all(tiny_config, tmp_path):
    """2 processes (torchrun, gloo); rank 0 alone gets a NaN loss at step 1. All processes must
    agree to skip before anyone calls backward: a process that skips backward while the other
    all-reduces gradients in it deadlocks DDP. The run must end with one skipped step."""
    from densedet.config import save_config
    cfg = tiny_config(norm="gn")
    cfg.model.retinanet.max_level, cfg.model.anchor_sizes = 7, [16.0, 32.0, 64.0, 128.0, 256.0]  # P6-only: P7 unused
    cfg.train.max_iters, cfg.train.batch_size = 3, 4   # 2 images a process: GN needs > 1 value a group at P7 (1x1)
    config_path, script = tmp_path / "ddp.yaml", tmp_path / "rank0_nan.py"
    save_config(cfg, config_path)
    script.write_text(_RANK0_NAN)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_addr", "127.0.0.1", "--master_port", str(port), str(script), "train",
                              str(config_path)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    # A deadlock never ends, a slow machine does: wait for the run's end (its exit) up to 10 minutes
    # (3 iterations take seconds) before calling it a hang.
    try:
        _, err = child.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)        # the launcher and the two workers it started
        _, err = child.communicate()
        pytest.fail("the 2-process run hung after a NaN on one process (collective mismatch); its log ends:\n"
                    + err[-2000:])
    assert child.returncode == 0, err[-3000:]
    summary = json.loads((Path(cfg.train.output_dir) / "metrics.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["iterations"] == 3


# -- atomic checkpoints ---------------------------------------------------------------------------

def half_then(error: BaseException):
    """A torch.save that writes half of the real bytes, then fails with ``error``."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        import io
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        raise error

    return save


def small_checkpoint(value: float) -> dict:
    return {"format": CHECKPOINT_FORMAT, "model": {"w": torch.full((64, 64), value)}, "iteration": int(value)}


@pytest.mark.parametrize("error", [KeyboardInterrupt(), SystemExit(1)])
def test_an_interrupted_save_keeps_the_previous_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch, error):
    path = tmp_path / "last.pt"
    atomic_save(small_checkpoint(1.0), path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", half_then(error))
    with pytest.raises(type(error)):
        atomic_save(small_checkpoint(2.0), path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]
    assert load_checkpoint(path)["iteration"] == 1


def test_a_full_disk_gives_a_checkpoint_error_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save(small_checkpoint(1.0), path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", half_then(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(CheckpointError) as info:
        atomic_save(small_checkpoint(2.0), path)
    message = str(info.value)
    assert str(path) in message and os.strerror(errno.ENOSPC) in message and "unchanged" in message
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_a_failing_fsync_or_rename_gives_a_checkpoint_error(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save(small_checkpoint(1.0), path)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    for name in ("fsync", "replace"):
        with monkeypatch.context() as m:
            m.setattr(ckpt_module.os, name, broken)
            with pytest.raises(CheckpointError, match=os.strerror(errno.EIO)):
                atomic_save(small_checkpoint(2.0), path)
        assert path.read_bytes() == before
        assert sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_a_save_replaces_the_file_with_the_new_content(tmp_path):
    path = tmp_path / "sub" / "last.pt"                # the folder is created
    atomic_save(small_checkpoint(1.0), path)
    atomic_save(small_checkpoint(2.0), path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((64, 64), 2.0))
    assert sorted(os.listdir(path.parent)) == ["last.pt"]


def test_unreadable_checkpoints_are_named(tmp_path):
    path = tmp_path / "cut.pt"
    atomic_save(small_checkpoint(1.0), path)
    path.write_bytes(path.read_bytes()[:300])          # a file cut short (not by atomic_save)
    with pytest.raises(CheckpointError, match="cut.pt: truncated or damaged checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="missing.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="plain.pt: not a densedet checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")


# -- checkpoint safety ----------------------------------------------------------------------------

class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class PlainObject:
    def __init__(self) -> None:
        self.value = 3


@pytest.mark.parametrize("payload", ["os.system", "class instance"])
def test_a_checkpoint_carrying_objects_is_refused_and_no_code_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    obj = RunsCode(marker) if payload == "os.system" else PlainObject()
    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model": {"w": torch.zeros(1)}, "extra": obj}, path)
    with pytest.raises(CheckpointError, match="evil.pt: holds Python objects"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError):
        model_from_checkpoint(path)
    with pytest.raises(ValueError, match="evil.pt"):
        load_weights(torch.nn.Linear(1, 1), str(path))
    assert not marker.exists()


def tiny_checkpoint(cfg, path: Path, num_classes: int) -> None:
    cfg.model.num_classes = num_classes
    torch.manual_seed(0)
    model = build_from_config(cfg.model)
    atomic_save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": to_dict(cfg),
                 "class_names": [str(i) for i in range(num_classes)], "category_ids": None, "iteration": 0}, path)


def test_weights_for_another_class_count_are_refused_with_the_mismatched_keys(tiny_config, tmp_path):
    """9 anchors per position: 10 classes -> cls_logits has 90 output channels, 5 classes -> 45."""
    cfg = tiny_config()
    path = tmp_path / "ten.pt"
    tiny_checkpoint(cfg, path, num_classes=10)
    cfg.model.num_classes = 5
    five = build_from_config(cfg.model)
    for attempt in (lambda: load_weights(five, str(path)), lambda: model_from_checkpoint(path, num_classes=5)):
        with pytest.raises(ValueError) as info:
            attempt()
        message = str(info.value)
        assert "ten.pt" in message and "shape mismatch" in message
        assert "head.classification_head.cls_logits.weight (90, 32, 3, 3) vs model (45, 32, 3, 3)" in message
        assert "head.classification_head.cls_logits.bias (90,) vs model (45,)" in message
        assert "regression" not in message                # only the keys that differ
    with pytest.raises(CheckpointError):                  # a CheckpointError: the CLI reports it, no traceback
        model_from_checkpoint(path, num_classes=5)
    model, loaded_cfg, _ = model_from_checkpoint(path)
    assert loaded_cfg.model.num_classes == 10 and model.class_names == [str(i) for i in range(10)]

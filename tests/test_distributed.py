"""Several processes and what goes wrong with them: the digit scenes drawn once, one error message for
bad input, a lost process named as such, workers that stop with their torchrun, files written by rank 0
alone, and a resume with another process count.

The runs train the tiny config of ``conftest.make_tiny_config`` (or the shipped ``tiny_digits``) for a
few iterations, in 2 gloo processes (``torch.multiprocessing.spawn``, or ``torchrun`` as a user runs it).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from densedet.config import find_config, load_config, save_config
from densedet.engine.checkpoint import atomic_save, load_checkpoint
from densedet.engine.trainer import train
from densedet.engine.tune import CHOICE_FILE, record_choice

pytestmark = pytest.mark.usefixtures("no_plots")

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra.get("PYTHONPATH"), str(REPO),
                                                    os.environ.get("PYTHONPATH")) if p)
    return env


def torchrun(*args: str) -> list[str]:
    """``torchrun --nproc_per_node 2 -m densedet ARGS`` on a free local port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "-m", "densedet", *args]


def _in_group(rank: int, world: int, port: int, work, args) -> None:
    """One process of a gloo group of ``world``: runs ``work(rank, *args)``."""
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        work(rank, *args)
    finally:
        dist.destroy_process_group()


def spawn_two(work, *args) -> None:
    import torch.multiprocessing as mp
    mp.spawn(_in_group, args=(2, free_port(), work, args), nprocs=2, join=True)


# -- the digit scenes -------------------------------------------------------------------------------

def _load_digits(rank: int, cfg, out: str) -> None:
    from densedet.data import digits
    from densedet.engine import trainer
    real = digits._write_split

    def drawing(folder, *args, **kwargs):
        with open(os.path.join(out, f"drew.{rank}"), "a") as f:
            f.write(folder + "\n")
        time.sleep(1.0)         # drawing takes a while: a second process would start drawing too
        return real(folder, *args, **kwargs)
    digits._write_split = drawing
    data, _ = trainer._load_data(cfg, lambda msg: None)
    (Path(out) / f"loaded.{rank}").write_text(str(len(data.records)))


def test_digit_scenes_are_drawn_once_by_rank0_and_read_by_every_process(tmp_path):
    """``torchrun ... train tiny_digits`` in a fresh clone: both processes drew the scenes into one folder at
    once, each deleting the other's images (a DatasetError "image file not found" on one rank, or worse)."""
    cfg = load_config(find_config("tiny_digits"), [f"data.root={tmp_path / 'scenes'}", "data.num_train=2",
                                                   "data.num_val=1"])
    spawn_two(_load_digits, cfg, str(tmp_path))
    assert sorted(p.name for p in tmp_path.glob("drew.*")) == ["drew.0"]
    assert (tmp_path / "loaded.0").read_text() == (tmp_path / "loaded.1").read_text() == "2"


# -- bad input: one message -------------------------------------------------------------------------

@pytest.mark.parametrize("override, named", [
    ("data.train={missing}", "annotation path not found (data.train)"),
    ("train.batch_size=3", "train.batch_size (3) must be divisible by the number of processes (2)"),
], ids=["missing-annotations", "batch-not-divisible"])
def test_bad_input_under_torchrun_is_reported_once(digit_scenes, tmp_path, override, named):
    """Every process met the same bad input and printed the same line (rank 1's first, rank 0's after
    another line): now rank 0 reports it, and torchrun stops the others before they do."""
    data = [f"data.{split}{part}={digit_scenes[split + ('_json' if part == '' else part)]}"
            for split in ("train", "val") for part in ("", "_images")]
    run = subprocess.run(torchrun("train", "tiny_digits", f"train.output_dir={tmp_path / 'run'}", "data.format=coco",
                                  *data, override.format(missing=tmp_path / "missing.json")),
                         cwd=tmp_path, env=torchrun_env(), capture_output=True, text=True, timeout=120)
    errors = [line for line in run.stderr.splitlines() if line.startswith("densedet train: error:")]
    assert run.returncode != 0
    assert len(errors) == 1, run.stderr[-3000:]
    assert named in errors[0] and "internal error" not in errors[0]


# -- a process lost mid-run -------------------------------------------------------------------------

def _train_until_rank1_dies(rank: int, cfg, out: str) -> None:
    from densedet.engine.data import BatchStream
    real = BatchStream.batch

    def batch(self, iteration):
        if rank == 1 and iteration == 2:
            os._exit(0)         # as if killed: no message, its sockets closed
        return real(self, iteration)
    BatchStream.batch = batch
    try:
        train(cfg, log=lambda msg: None)
    except BaseException as err:    # noqa: BLE001 - the test reads what rank 0 met
        (Path(out) / "error").write_text(f"{type(err).__name__}: {err}")


def test_a_process_lost_mid_run_is_named_as_such_not_as_a_bug(tiny_config, tmp_path):
    """A worker killed mid-run made the survivor report gloo's "Connection closed by peer" as an internal
    error, "a bug in densedet" (exit 1); now it is a TrainingError naming last.pt and --resume (exit 2)."""
    cfg = tiny_config()
    cfg.model.retinanet.max_level, cfg.model.anchor_sizes = 7, [16.0, 32.0, 64.0, 128.0, 256.0]   # DDP: all grads
    cfg.model.norm, cfg.train.batch_size, cfg.train.checkpoint_period = "gn", 4, 1
    spawn_two(_train_until_rank1_dies, cfg, str(tmp_path))
    error = (tmp_path / "error").read_text()
    assert error.startswith("TrainingError: another process of this run stopped"), error
    assert f"{Path(cfg.train.output_dir) / 'last.pt'} (iteration 2); continue with --resume" in error


# -- torchrun killed --------------------------------------------------------------------------------

# On the PYTHONPATH of the workers only: each writes its pid to pid.RANK.
_PIDS_SITECUSTOMIZE = """
import os, pathlib
if "RANK" in os.environ and "DENSEDET_TEST_PID_DIR" in os.environ:
    (pathlib.Path(os.environ["DENSEDET_TEST_PID_DIR"]) / f"pid.{os.environ['RANK']}").write_text(str(os.getpid()))
"""


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_workers_stop_when_torchrun_is_killed(tiny_config, tmp_path):
    """``kill -9`` of torchrun left its workers training on, unseen, to the end of the run, writing the run
    folder that a ``--resume`` would then share with them; now they stop with it."""
    cfg = tiny_config()
    cfg.model.retinanet.max_level, cfg.model.anchor_sizes = 7, [16.0, 32.0, 64.0, 128.0, 256.0]
    cfg.model.norm, cfg.train.batch_size, cfg.train.max_iters, cfg.train.checkpoint_period = "gn", 4, 500, 1
    save_config(cfg, tmp_path / "run.yaml")
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_PIDS_SITECUSTOMIZE)
    env = torchrun_env(PYTHONPATH=str(hooks), DENSEDET_TEST_PID_DIR=str(hooks))
    agent = subprocess.Popen(torchrun("train", str(tmp_path / "run.yaml")), cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = Path(cfg.train.output_dir) / "last.pt"
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and agent.poll() is None and not last.exists():
            time.sleep(0.1)
        assert last.exists() and agent.poll() is None, "the run ended or stalled before torchrun could be killed"
        pids = [int((hooks / f"pid.{rank}").read_text()) for rank in (0, 1)]
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(map(_running, pids)):
            time.sleep(0.1)
        assert not any(map(_running, pids)), "the workers train on without their torchrun"
    finally:
        if agent.poll() is None:
            agent.kill()
        for pid in pids:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


# -- files rank 0 writes ----------------------------------------------------------------------------

def test_only_rank0_adds_the_tta_choice_to_metrics_json(tmp_path):
    """``densedet train`` called ``record_choice`` on every process: rank 1, done first, read and rewrote
    metrics.json while rank 0 wrote it (an old run's file, or half of the new one); train returns {} there."""
    (tmp_path / CHOICE_FILE).write_text(json.dumps({"chosen": None}))
    (tmp_path / "metrics.json").write_text('{"AP": 0.5')          # rank 0 halfway through writing it
    assert record_choice(tmp_path, {}) == {}
    assert (tmp_path / "metrics.json").read_text() == '{"AP": 0.5'
    (tmp_path / "metrics.json").write_text('{"AP": 0.5}')
    assert record_choice(tmp_path, {"AP": 0.5})["tta_choice"] == {"chosen": None}
    assert json.loads((tmp_path / "metrics.json").read_text())["tta_choice"] == {"chosen": None}


# -- resuming with another process count ------------------------------------------------------------

def test_resume_with_another_process_count_says_it_is_not_bit_identical(tiny_config, restore_torch_globals):
    """A 2-process run resumed in one process (or the reverse) continued with the same batches, and the
    only note said to set OMP_NUM_THREADS "for bit-identical continuation", which no thread count gives."""
    cfg = tiny_config()
    cfg.train.max_iters = 2
    train(cfg, log=lambda msg: None)
    last = Path(cfg.train.output_dir) / "last.pt"
    saved = load_checkpoint(last)
    assert saved["world_size"] == 1
    atomic_save({**saved, "world_size": 2, "num_threads": torch.get_num_threads() + 1}, last)  # torchrun's
    cfg.train.max_iters = 3
    said: list[str] = []
    train(cfg, resume=True, log=said.append)
    notes = [line for line in said if line.startswith("note:")]
    assert notes == ["note: the interrupted run trained in 2 processes, this one in 1: the same batches follow, "
                     "but the weights are not bit-identical to an uninterrupted run's"]

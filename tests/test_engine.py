"""The training engine's guarantees: deterministic batches, exact resume, and several processes
computing what one process on the whole batch computes.

Runs train a 6-iteration RetinaNet R18-FPN on 8 tiny digit scenes (conftest ``make_tiny_config``).
Weights are compared bit for bit (``torch.equal``): with ``train.deterministic`` and the same
number of threads, CPU training here is reproducible exactly, so a resumed run must match an
uninterrupted one exactly, not approximately.
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

from densedet.config import ConfigError, save_config
from densedet.engine.checkpoint import load_checkpoint
from densedet.engine.data import BatchStream, build_train_dataset, load_split
from densedet.engine.trainer import TrainingError, lr_factor, train

pytestmark = pytest.mark.usefixtures("no_plots")

REPO = Path(__file__).resolve().parent.parent


# -- helpers ----------------------------------------------------------------------------------

def final_weights(cfg) -> dict[str, torch.Tensor]:
    return load_checkpoint(Path(cfg.train.output_dir) / "model_final.pt")["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:5]}"


def loss_records(cfg) -> list[tuple[int, float, float]]:
    """(iteration, loss_cls, loss_box) of every training record in metrics.jsonl, in file order."""
    lines = (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [(r["iteration"], r["loss_cls"], r["loss_box"]) for r in records if "loss_cls" in r]


def subprocess_env() -> dict[str, str]:
    """The child uses as many threads as this process: a different thread count splits float
    reductions differently, and the comparison is bit for bit."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def straight_run(make_tiny_config, keep_torch_globals, tmp_path_factory, no_plots):
    """Run A: the tiny config trained 6 iterations without interruption."""
    cfg = make_tiny_config(tmp_path_factory.mktemp("straight") / "run")
    with keep_torch_globals():
        metrics = train(cfg, log=lambda msg: None)
    return cfg, metrics


# -- the batch stream ---------------------------------------------------------------------------

def test_batch_stream_is_a_pure_function_of_the_iteration(tiny_config):
    cfg = tiny_config()
    dataset = build_train_dataset(cfg, load_split(cfg.data, "train"))
    first = BatchStream(dataset, 4, seed=3)
    images_a, targets_a = first.batch(5)
    first.batch(0)                                   # another position in between changes nothing
    images_b, targets_b = BatchStream(dataset, 4, seed=3).batch(5)
    for a, b in zip(images_a + [t["boxes"] for t in targets_a], images_b + [t["boxes"] for t in targets_b]):
        assert torch.equal(a, b)


def test_batch_stream_covers_each_image_once_per_epoch(tiny_config):
    cfg = tiny_config()
    dataset = build_train_dataset(cfg, load_split(cfg.data, "train"))
    stream = BatchStream(dataset, 4, seed=0)
    for epoch in range(3):                           # 8 images, 4 per batch: 2 iterations an epoch
        ids = [t["image_id"] for it in (2 * epoch, 2 * epoch + 1) for t in stream.batch(it)[1]]
        assert sorted(ids) == sorted(r.image_id for r in dataset.data.records)
    assert stream.epoch_of(3) == 1.5


def test_batch_stream_gives_each_rank_its_slice_of_the_global_batch(tiny_config):
    """Rank r of W holds images [r*B/W, (r+1)*B/W) of the one-process batch, augmentation included
    (hflip_prob 0.5 here), across an epoch boundary."""
    cfg = tiny_config()
    dataset = build_train_dataset(cfg, load_split(cfg.data, "train"))
    whole = BatchStream(dataset, 4, seed=1)
    for iteration in range(4):
        images, targets = whole.batch(iteration)
        for rank in range(2):
            shard_images, shard_targets = BatchStream(dataset, 4, seed=1, rank=rank, world_size=2).batch(iteration)
            assert len(shard_images) == 2
            for j in range(2):
                assert torch.equal(shard_images[j], images[2 * rank + j])
                assert torch.equal(shard_targets[j]["boxes"], targets[2 * rank + j]["boxes"])
                assert shard_targets[j]["image_id"] == targets[2 * rank + j]["image_id"]


def test_batch_stream_flips_are_seeded_per_sample(tiny_config):
    """With hflip_prob 0.5 some samples come flipped: the stream really draws augmentation."""
    cfg = tiny_config()
    data = load_split(cfg.data, "train")
    dataset = build_train_dataset(cfg, data)
    stream = BatchStream(dataset, 2, seed=0)
    plain = build_train_dataset(cfg, data)
    plain.transforms = None
    flipped = 0
    for k in range(16):
        image, target = stream.sample(k)
        original, _ = plain[stream._index(k)]
        if not torch.equal(image, original):
            assert torch.equal(image, original.flip(-1))
            flipped += 1
    assert 0 < flipped < 16


def test_photometric_distortion_is_seeded_per_sample_and_keeps_the_boxes(tiny_config):
    """data.photometric: sample k's colours change, the same in every stream; its boxes do not."""
    cfg = tiny_config()
    cfg.data.photometric, cfg.data.hflip_prob = True, 0.0
    data = load_split(cfg.data, "train")
    stream, again = (BatchStream(build_train_dataset(cfg, data), 2, seed=0) for _ in range(2))
    plain = build_train_dataset(cfg, data)
    plain.transforms = None
    changed = 0
    for k in range(8):
        (image, target), (image2, _) = stream.sample(k), again.sample(k)
        original, original_target = plain[stream._index(k)]
        assert torch.equal(image, image2) and torch.equal(target["boxes"], original_target["boxes"])
        assert image.shape == original.shape and 0 <= float(image.min()) and float(image.max()) <= 1
        changed += not torch.equal(image, original)
    assert changed >= 6                                  # 1 - 0.5^4: almost every sample is distorted


def test_batch_stream_crops_are_seeded_per_sample_windows_of_the_image(tiny_config):
    """data.crop_size: sample k is the same window whatever stream draws it, cut from the image."""
    cfg = tiny_config()
    cfg.data.crop_size, cfg.data.hflip_prob = 64, 0.0
    data = load_split(cfg.data, "train")
    first = BatchStream(build_train_dataset(cfg, data), 2, seed=0)
    second = BatchStream(build_train_dataset(cfg, data), 2, seed=0)
    plain = build_train_dataset(cfg, data)
    plain.transforms = None
    origins = set()
    for k in range(12):
        (image, target), (again, target2) = first.sample(k), second.sample(k)
        assert torch.equal(image, again) and torch.equal(target["boxes"], target2["boxes"])
        original, whole = plain[first._index(k)]
        x0, y0 = target["tile_origin"]
        assert image.shape[-2:] == (64, 64) and target["resize_as"] == tuple(original.shape[-2:])
        assert torch.equal(image, original[:, y0:y0 + 64, x0:x0 + 64])
        kept = ~target["iscrowd"]
        assert kept.any() == (len(whole["boxes"]) > 0)       # an image with objects holds one whole
        origins.add((x0, y0))
    assert len(origins) > 6


def test_windows_in_model_pixels_reach_the_model_at_their_size(tiny_config):
    """data.crop_model_pixels: the training windows are cut at size / the image's resize factor, and
    the model's preprocessor brings each back to size (here 48 px at model.min_size 2x the image)."""
    from densedet.models import build_from_config
    cfg = tiny_config()
    cfg.data.crop_sizes, cfg.data.crop_model_pixels, cfg.data.hflip_prob = [48], True, 0.0
    data = load_split(cfg.data, "train")
    height, width = data.records[0].height, data.records[0].width
    cfg.model.min_size, cfg.model.max_size = 2 * min(height, width), 2 * max(height, width)
    dataset = build_train_dataset(cfg, data)
    stream = BatchStream(dataset, 2, seed=0, crop_sizes=cfg.data.crop_sizes)
    images, targets = stream.batch(0)
    assert all(image.shape[-2:] == (24, 24) for image in images)          # 48 model px of a 2x image
    model = build_from_config(cfg.model).train()
    _, sizes, _ = model.preprocessor(images, targets)
    assert sizes == [(48, 48)] * len(images)


def test_batch_stream_crop_sizes_draw_one_window_size_per_batch_at_equal_pixels(tiny_config):
    """data.crop_sizes [32, 64] at batch 2: a batch is 2 windows of 64 px or 8 of 32 px, drawn by
    iteration; batches take consecutive samples of the run, a fresh stream (a resumed run) draws the
    same, and rank r of 2 holds its half."""
    cfg = tiny_config()
    cfg.data.crop_sizes, cfg.data.hflip_prob = [32, 64], 0.0
    data = load_split(cfg.data, "train")
    stream = BatchStream(build_train_dataset(cfg, data), 2, seed=0, crop_sizes=cfg.data.crop_sizes)
    drawn, batches = 0, []
    for iteration in range(12):
        size = stream.crop_size(iteration)
        images, targets = stream.batch(iteration)
        assert len(images) == {64: 2, 32: 8}[size] == stream.size_of(iteration)
        assert all(image.shape[-2:] == (size, size) for image in images)
        assert stream.first_sample(iteration) == drawn
        assert [t["image_id"] for t in targets] == [data.records[stream._index(k)].image_id
                                                   for k in range(drawn, drawn + len(images))]
        drawn += len(images)
        batches.append((images, targets))
    assert {stream.crop_size(it) for it in range(12)} == {32, 64}
    assert stream.epoch_of(12) == drawn / len(data.records)
    resumed = BatchStream(build_train_dataset(cfg, data), 2, seed=0, crop_sizes=cfg.data.crop_sizes)
    for iteration in (11, 4):
        images, targets = resumed.batch(iteration)
        assert all(torch.equal(a, b) for a, b in zip(images, batches[iteration][0]))
        for rank in range(2):
            shard, _ = BatchStream(build_train_dataset(cfg, data), 2, seed=0, rank=rank, world_size=2,
                                   crop_sizes=cfg.data.crop_sizes).batch(iteration)
            half = len(images) // 2
            assert all(torch.equal(a, b) for a, b in zip(shard, images[rank * half:(rank + 1) * half], strict=True))


def test_batch_stream_rejects_a_batch_that_does_not_split(tiny_config):
    cfg = tiny_config()
    dataset = build_train_dataset(cfg, load_split(cfg.data, "train"))
    with pytest.raises(ConfigError, match="batch_size"):
        BatchStream(dataset, 3, seed=0, rank=0, world_size=2)


# -- the schedule -------------------------------------------------------------------------------

def test_lr_factor_warmup_steps_and_cosine(tiny_config):
    cfg = tiny_config()
    s = cfg.solver
    s.warmup_iters, s.warmup_factor, s.steps, s.gamma = 10, 0.1, [20, 30], 0.5
    assert lr_factor(0, 0 / 40, cfg) == pytest.approx(0.1)
    assert lr_factor(5, 5 / 40, cfg) == pytest.approx(0.1 * 0.5 + 0.5)        # linear from 0.1 to 1
    assert lr_factor(10, 10 / 40, cfg) == 1.0
    assert lr_factor(19, 19 / 40, cfg) == 1.0
    assert lr_factor(20, 20 / 40, cfg) == pytest.approx(0.5)
    assert lr_factor(35, 35 / 40, cfg) == pytest.approx(0.25)
    s.schedule, s.warmup_iters, s.min_lr_factor = "cosine", 0, 0.1
    assert lr_factor(0, 0 / 40, cfg) == pytest.approx(1.0)
    assert lr_factor(20, 20 / 40, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(40, 40 / 40, cfg) == pytest.approx(0.1)


# -- determinism and resume -----------------------------------------------------------------------

def test_training_twice_gives_identical_weights(straight_run, tiny_config, restore_torch_globals):
    """The precondition of exact resume: the same config trains to the same bits."""
    cfg_a, metrics_a = straight_run
    cfg = tiny_config("again")
    metrics = train(cfg, log=lambda msg: None)
    assert_same_weights(final_weights(cfg), final_weights(cfg_a))
    assert loss_records(cfg) == loss_records(cfg_a)
    assert metrics["AP"] == metrics_a["AP"]
    assert metrics["iterations"] == 6 and metrics["skipped_steps"] == 0


def test_resume_after_an_interruption_equals_the_uninterrupted_run(straight_run, tiny_config, stop_training_at,
                                                                   restore_torch_globals):
    """Stop during iteration 4 (last.pt holds iteration 2, iteration 3's step is lost), resume:
    the final weights and the logged losses equal the straight run's bit for bit, and
    metrics.jsonl lists every iteration once."""
    cfg_a, _ = straight_run
    cfg = tiny_config("resumed")
    stop_training_at(3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=lambda msg: None)
    assert load_checkpoint(Path(cfg.train.output_dir) / "last.pt")["iteration"] == 2
    assert not (Path(cfg.train.output_dir) / "model_final.pt").exists()

    stop_training_at(None)
    logs = []
    metrics = train(cfg, resume=True, log=logs.append)
    assert any("resumed from" in line and "iteration 2/6" in line for line in logs)
    assert_same_weights(final_weights(cfg), final_weights(cfg_a))
    assert loss_records(cfg) == loss_records(cfg_a)
    assert metrics["iterations"] == 6


def test_resume_without_a_checkpoint_is_refused(tiny_config, restore_torch_globals):
    cfg = tiny_config()
    with pytest.raises(TrainingError, match="last.pt"):
        train(cfg, resume=True, log=lambda msg: None)


_HOLD_AFTER_CHECKPOINT = """
import pathlib, sys, time
from densedet.engine.checkpoint import CheckpointError, load_checkpoint
from densedet.engine.data import BatchStream
last, ready = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
real = BatchStream.batch
def held(self, iteration):
    # Once last.pt holds iteration >= 2, say which (ready) and wait there for the SIGKILL: the kill lands
    # mid-run however fast or slow the machine is; waiting changes no number.
    try:
        saved = load_checkpoint(last)["iteration"] if last.exists() else -1
    except CheckpointError:
        saved = -1
    if saved >= 2:
        ready.write_text(str(saved))
        while True:
            time.sleep(1)
    return real(self, iteration)
BatchStream.batch = held
from densedet.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
def test_resume_after_sigkill_equals_the_uninterrupted_run(straight_run, tiny_config, tmp_path):
    """``densedet train`` killed with SIGKILL once last.pt reports iteration >= 2, then
    ``densedet train --resume``: final weights equal run A's bit for bit.

    The killed process holds at its next batch once last.pt reports iteration >= 2 and writes a
    file saying so; the test waits for that file (up to 10 minutes: a slow machine is no failure)
    and kills then, so the kill lands mid-run whatever the speed.
    """
    cfg_a, _ = straight_run
    cfg = tiny_config("killed")
    config_path = tmp_path / "tiny.yaml"
    save_config(cfg, config_path)
    last, ready = Path(cfg.train.output_dir) / "last.pt", tmp_path / "holding"
    child = subprocess.Popen([sys.executable, "-c", _HOLD_AFTER_CHECKPOINT, str(last), str(ready), "train",
                              str(config_path)], cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    killed_at = None
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and child.poll() is None and not ready.exists():
            time.sleep(0.1)
        if ready.exists() and child.poll() is None:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=60)
            killed_at = load_checkpoint(last)["iteration"]
    finally:
        child.kill()
        _, err = child.communicate()
    assert killed_at is not None, f"the run ended or stalled before it could be killed:\n{err.decode()[-2000:]}"
    assert child.returncode == -signal.SIGKILL
    assert 2 <= killed_at < 6
    assert not (Path(cfg.train.output_dir) / "model_final.pt").exists()

    resumed = subprocess.run([sys.executable, "-m", "densedet", "train", str(config_path), "--resume"], cwd=REPO,
                             env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {last} at iteration {killed_at}/6" in resumed.stderr
    assert_same_weights(final_weights(cfg), final_weights(cfg_a))
    assert loss_records(cfg) == loss_records(cfg_a)


# -- several processes ---------------------------------------------------------------------------

def with_p7(cfg):
    """The tiny config on P3-P7: P3-P6 models leave a parameter without gradient (see below)."""
    cfg.model.retinanet.max_level, cfg.model.anchor_sizes = 7, [16.0, 32.0, 64.0, 128.0, 256.0]
    return cfg


def test_every_parameter_gets_a_gradient(tiny_config, restore_torch_globals):
    """DistributedDataParallel (find_unused_parameters=False, as the trainer builds it) needs
    every trainable parameter to take part in the loss; an unused one leaves the first step's
    gradients un-averaged and stops the run at the second."""
    from densedet.models import build_from_config
    cfg = tiny_config(norm="gn")
    torch.manual_seed(0)
    model = build_from_config(cfg.model).train()
    dataset = build_train_dataset(cfg, load_split(cfg.data, "train"))
    images, targets = BatchStream(dataset, 2, 0).batch(0)
    sum(model(images, targets).values()).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


def _ddp_gradients(rank: int, world: int, port: int, cfg, out: str) -> None:
    """One process of a 2-process gloo group: loss and gradients of its shard under DDP."""
    import torch.distributed as dist
    from densedet.models import build_from_config
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = build_from_config(cfg.model).train()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        dataset = build_train_dataset(cfg, load_split(cfg.data, "train"))
        images, targets = BatchStream(dataset, cfg.train.batch_size, cfg.train.seed, rank, world).batch(1)
        losses = ddp(images, targets)
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"losses": {k: v.detach() for k, v in losses.items()}, "grads": grads},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_compute_the_gradient_of_the_whole_batch(tiny_config, tmp_path, restore_torch_globals):
    """DDP over 2 gloo processes, each with half of a 4-image batch, equals one process on all 4
    images: the mean of the per-process losses is the whole-batch loss and the averaged gradients
    are its gradients (the focal-loss normaliser is all-reduced: ``foreground_normalizer``).

    The backbone uses GroupNorm, not BatchNorm: BN normalises with the statistics of the batch a
    process sees, so 2 processes with 2 images each compute a different function from one
    process with 4 (SyncBatchNorm would be needed); GN is per image and makes the two equal.
    P3-P7 rather than P3-P6: see ``test_every_parameter_gets_a_gradient``.
    """
    import torch.multiprocessing as mp
    from densedet.models import build_from_config
    cfg = with_p7(tiny_config(norm="gn"))
    cfg.train.batch_size = 4
    cfg.model.retinanet.class_ce_weight = 0.5     # its cross-entropy term shares the all-reduced normaliser
    mp.spawn(_ddp_gradients, args=(2, free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    shards = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    torch.manual_seed(0)
    model = build_from_config(cfg.model).train()
    dataset = build_train_dataset(cfg, load_split(cfg.data, "train"))
    images, targets = BatchStream(dataset, 4, cfg.train.seed).batch(1)
    losses = model(images, targets)
    sum(losses.values()).backward()

    for key, value in losses.items():
        mean = (shards[0]["losses"][key] + shards[1]["losses"][key]) / 2
        torch.testing.assert_close(mean, value.detach(), rtol=1e-5, atol=1e-5)
    # the shards really differ, so the check above is not trivially true
    assert not torch.equal(shards[0]["losses"]["cls"], shards[1]["losses"]["cls"])
    assert set(losses) == {"cls", "box", "cls_ce"}
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == shards[0]["grads"].keys() == shards[1]["grads"].keys()
    for name, grad in grads.items():
        assert torch.equal(shards[0]["grads"][name], shards[1]["grads"][name]), name  # DDP replicas agree
        torch.testing.assert_close(shards[0]["grads"][name], grad, rtol=0.0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_torchrun_two_processes_train_like_one(tiny_config, tmp_path, restore_torch_globals):
    """``torchrun --nproc_per_node 2 -m densedet train`` (gloo) ends with the weights one process
    reaches on the same global batches (GroupNorm backbone; see the test above for why), including
    the box-crop warm-up, which rank 0 runs and broadcasts, and the stages frozen after it."""
    single = with_p7(tiny_config("single", norm="gn"))
    # 4 images: 2 a process, since GN at P7 (1x1 at 128 px) needs more than one value per group
    single.train.max_iters, single.train.checkpoint_period, single.train.batch_size = 3, 3, 4
    single.train.pretrain_iters, single.train.pretrain_batch_size = 2, 8
    single.train.pretrain_freeze_stages = 2     # DDP must be built after the freeze, or it waits for their grads
    train(single, log=lambda msg: None)

    double = with_p7(tiny_config("double", norm="gn"))
    double.train.max_iters, double.train.checkpoint_period, double.train.batch_size = 3, 3, 4
    double.train.pretrain_iters, double.train.pretrain_batch_size = 2, 8
    double.train.pretrain_freeze_stages = 2
    config_path = tmp_path / "ddp.yaml"
    save_config(double, config_path)
    env = subprocess_env()
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                          "-m", "densedet", "train", str(config_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 processes" in run.stderr
    a, b = final_weights(single), final_weights(double)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


# Put on the PYTHONPATH of a torchrun run only: every worker writes its pid to pid.RESTART.RANK, and
# rank 0 of the first attempt, once last.pt holds iteration >= 2, writes "holding" and waits at its
# next batch for the SIGKILL (the kill lands mid-run however fast the machine; waiting changes no
# number). Restarted workers run untouched.
_ELASTIC_SITECUSTOMIZE = """
import os, pathlib
if "RANK" in os.environ and "TORCHELASTIC_RESTART_COUNT" in os.environ:
    _dir = pathlib.Path(os.environ["DENSEDET_TEST_ELASTIC_DIR"])
    _restart, _rank = os.environ["TORCHELASTIC_RESTART_COUNT"], os.environ["RANK"]
    (_dir / f"pid.{_restart}.{_rank}").write_text(str(os.getpid()))
    if _restart == "0" and _rank == "0":
        import time
        from densedet.engine.checkpoint import CheckpointError, load_checkpoint
        from densedet.engine.data import BatchStream
        _last, _real = pathlib.Path(os.environ["DENSEDET_TEST_ELASTIC_LAST"]), BatchStream.batch
        def _held(self, iteration):
            try:
                saved = load_checkpoint(_last)["iteration"] if _last.exists() else -1
            except CheckpointError:
                saved = -1
            if saved >= 2:
                (_dir / "holding").write_text(str(saved))
                while True:
                    time.sleep(1)
            return _real(self, iteration)
        BatchStream.batch = _held
"""


def _torchrun(config_path: Path, *extra: str) -> list[str]:
    """``torchrun --nproc_per_node 2 EXTRA -m densedet train CONFIG`` on a free local port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *extra,
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "-m", "densedet", "train", str(config_path)]


@pytest.mark.slow
def test_torchrun_restart_after_a_killed_worker_resumes_by_itself(tiny_config, tmp_path, restore_torch_globals):
    """``torchrun --nproc_per_node 2 --max-restarts 1 -m densedet train``: one worker SIGKILLed once
    last.pt holds iteration >= 2; torchrun restarts the group, which resumes from last.pt without
    ``--resume``, and ends with the weights of an uninterrupted 2-process run bit for bit
    (``torch.equal``: the same gloo all-reduces in the same order, one thread a process), with
    metrics.jsonl listing every iteration once."""
    def config(name):
        cfg = with_p7(tiny_config(name, norm="gn"))     # DDP: P7 gives every parameter a gradient
        cfg.train.max_iters, cfg.train.checkpoint_period, cfg.train.batch_size = 5, 1, 4
        return cfg

    env = subprocess_env()
    env["OMP_NUM_THREADS"] = "1"    # the two workers share the cores; float sums in one fixed order
    straight = config("straight")
    save_config(straight, tmp_path / "straight.yaml")
    run = subprocess.run(_torchrun(tmp_path / "straight.yaml"), cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    killed = config("killed")
    save_config(killed, tmp_path / "killed.yaml")
    last, hooks = Path(killed.train.output_dir) / "last.pt", tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_ELASTIC_SITECUSTOMIZE)
    env_killed = dict(env, DENSEDET_TEST_ELASTIC_DIR=str(hooks), DENSEDET_TEST_ELASTIC_LAST=str(last),
                      PYTHONPATH=str(hooks) + os.pathsep + env["PYTHONPATH"])
    agent = subprocess.Popen(_torchrun(tmp_path / "killed.yaml", "--max-restarts", "1"), cwd=REPO,
                             env=env_killed, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed_at = None
    try:
        deadline = time.monotonic() + 600
        while (time.monotonic() < deadline and agent.poll() is None
               and not ((hooks / "holding").exists() and (hooks / "pid.0.1").exists())):
            time.sleep(0.1)
        if agent.poll() is None and (hooks / "holding").exists():
            killed_at = load_checkpoint(last)["iteration"]
            os.kill(int((hooks / "pid.0.1").read_text()), signal.SIGKILL)     # rank 1 of the first attempt
        _, err = agent.communicate(timeout=600)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.communicate()
    assert killed_at is not None, f"the run ended or stalled before it could be killed:\n{err[-3000:]}"
    assert 2 <= killed_at < 5
    assert agent.returncode == 0, err[-3000:]
    assert (hooks / "pid.1.0").exists() and (hooks / "pid.1.1").exists()     # torchrun did restart the group
    assert f"restarted by torchrun (restart 1): resuming from {last} at iteration {killed_at}" in err
    assert_same_weights(final_weights(killed), final_weights(straight))
    assert [r[0] for r in loss_records(killed)] == [1, 2, 3, 4, 5]     # the replayed steps logged once
    assert loss_records(killed) == loss_records(straight)


def test_multi_scale_size_is_one_per_batch_and_a_function_of_the_iteration(tiny_config):
    cfg = tiny_config()
    stream = BatchStream(build_train_dataset(cfg, load_split(cfg.data, "train")), 4, seed=3)
    sizes = [stream.min_size(it, [64, 96, 128]) for it in range(60)]
    assert set(sizes) == {64, 96, 128}                                   # every size gets drawn
    assert sizes == [BatchStream(stream.dataset, 2, seed=3, rank=1, world_size=2).min_size(it, [64, 96, 128])
                     for it in range(60)]                                # same on every process
    # The dataset leaves the size to the model (a resize there would be undone by the model's own).
    image, target = stream.sample(0)
    record = stream.dataset.data.records[stream._index(0)]
    assert tuple(image.shape[-2:]) == (record.height, record.width)


def test_trainer_feeds_the_model_the_drawn_size_per_iteration(tiny_config, restore_torch_globals, monkeypatch):
    from densedet.models.preprocess import ImagePreprocessor
    seen = []
    original = ImagePreprocessor.forward

    def spy(self, images, targets=None, min_size=None):
        batch, sizes, targets = original(self, images, targets, min_size)
        if self.training:
            seen.append((batch.shape[-1], {s for s in sizes}))
        return batch, sizes, targets

    monkeypatch.setattr(ImagePreprocessor, "forward", spy)
    cfg = tiny_config()
    train(cfg, log=lambda msg: None)
    stream = BatchStream(build_train_dataset(cfg, load_split(cfg.data, "train")), cfg.train.batch_size, cfg.train.seed)
    expected = [stream.min_size(it, cfg.data.train_min_sizes) for it in range(cfg.train.max_iters)]
    assert [w for w, _ in seen] == expected
    assert all(sizes == {(w, w)} for w, sizes in seen)                   # one size for the whole batch


def test_trainer_takes_each_iterations_crop_size_batch(tiny_config, restore_torch_globals, monkeypatch):
    """data.crop_sizes: the model is fed iteration k's batch of stream.size_of(k) windows."""
    from densedet.models.preprocess import ImagePreprocessor
    seen = []
    original = ImagePreprocessor.forward

    def spy(self, images, targets=None, min_size=None):
        if self.training:
            seen.append((len(images), max(max(im.shape[-2:]) for im in images)))
        return original(self, images, targets, min_size)

    monkeypatch.setattr(ImagePreprocessor, "forward", spy)
    cfg = tiny_config()
    cfg.data.crop_sizes, cfg.data.hflip_prob = [32, 64], 0.0
    ticks = iter(range(10_000))        # a clock that counts up: each timed step lasts 1 s
    summary = train(cfg, log=lambda msg: None, clock=lambda: float(next(ticks)))
    stream = BatchStream(build_train_dataset(cfg, load_split(cfg.data, "train")), cfg.train.batch_size,
                         cfg.train.seed, crop_sizes=cfg.data.crop_sizes)
    its = range(cfg.train.max_iters)
    assert seen == [(stream.size_of(it), stream.crop_size(it)) for it in its]
    assert {n for n, _ in seen} == {2, 8}
    assert summary["train_minutes"] * 60 == pytest.approx(cfg.train.max_iters * 1.0)
    assert summary["images_per_s"] == pytest.approx(sum(n for n, _ in seen) / cfg.train.max_iters)


def test_final_evaluation_with_tta_reports_it_beside_single_scale(tiny_config, restore_torch_globals, no_plots,
                                                                   monkeypatch):
    """test.tta_scales: the final weights are evaluated plain and with the configured TTA;
    metrics.json's numbers are the TTA ones and "single_scale" holds the plain ones."""
    from densedet.engine import finish
    from densedet.engine.evaluate import evaluate_model
    from densedet.tta import TTAConfig
    calls = []

    def spy(*args, tta=None, **kwargs):
        calls.append((tta, evaluate_model(*args, tta=tta, **kwargs)))
        return calls[-1][1]

    monkeypatch.setattr(finish, "evaluate_model", spy)
    cfg = tiny_config()
    cfg.test.tta_scales = [128, 192]
    train(cfg, log=lambda msg: None)
    saved = json.loads((Path(cfg.train.output_dir) / "metrics.json").read_text())
    assert saved["tta"] == {"scales": [128, 192], "flip": False, "rotate": False, "merge": "vote"}
    assert [tta for tta, _ in calls] == [None, TTAConfig(scales=(128, 192), flip=False, merge="vote")]
    (_, plain), (_, with_tta) = calls
    keys = ["AP", "AP50", "AP75", "AR1", "AR10", "AR100"]
    assert [saved[k] for k in keys] == pytest.approx([with_tta[k] for k in keys])
    assert [saved["single_scale"][k] for k in keys] == pytest.approx([plain[k] for k in keys])


def test_predict_dataset_with_tta_returns_the_tta_detections(tiny_config, restore_torch_globals):
    from densedet.data import DetectionDataset
    from densedet.engine.evaluate import predict_dataset
    from densedet.evaluation import detections_to_coco
    from densedet.models import build_from_config
    from densedet.tta import TTAConfig, tta_inference
    cfg = tiny_config()
    cfg.model.score_thresh = 0.0                  # an untrained model: keep every box
    torch.manual_seed(0)
    model = build_from_config(cfg.model).eval()
    data = load_split(cfg.data, "val")
    tta = TTAConfig(scales=(128, 192), flip=False)
    results = predict_dataset(model, data, batch_size=3, tta=tta)
    images = [DetectionDataset(data)[i][0] for i in range(len(data.records))]
    with torch.inference_mode():
        expected = detections_to_coco(tta_inference(model, images, tta), [r.image_id for r in data.records],
                                      data.category_ids)
        plain = detections_to_coco(model(images), [r.image_id for r in data.records], data.category_ids)
    assert len(results) == len(expected) > 0
    assert [(r["image_id"], r["category_id"]) for r in results] == [(r["image_id"], r["category_id"]) for r in expected]
    def numbers(rs):
        return torch.tensor([r["bbox"] + [r["score"]] for r in rs])

    torch.testing.assert_close(numbers(results), numbers(expected), atol=1e-4, rtol=1e-5)
    assert numbers(results).shape != numbers(plain).shape or not torch.allclose(numbers(results), numbers(plain))


def test_load_split_reads_the_digit_tune_split_and_refuses_it_elsewhere(tmp_path, tiny_config):
    """``tune`` is the digit scenes held out for choosing test-time settings: its own scenes, of
    data.num_tune; other formats have one only when data.tune_fraction carves it from data.train, and
    say so, as does num_tune 0."""
    from densedet.config import DataConfig
    data = DataConfig(format="digits", root=str(tmp_path / "digits"), num_train=1, num_val=1, num_tune=2)
    tune, val = load_split(data, "tune"), load_split(data, "val")
    assert len(tune.records) == 2 and len(val.records) == 1
    assert tune.source != val.source and tune.source.endswith("tune.json")
    data.num_tune = 0
    with pytest.raises(ConfigError, match="data.num_tune"):
        load_split(data, "tune")
    with pytest.raises(ConfigError, match="no tune split: set data.tune_fraction"):
        load_split(tiny_config().data, "tune")


def test_trainer_takes_the_gemm_weight_grad_and_trains_as_with_onednn(straight_run, tiny_config, keep_torch_globals,
                                                                       no_plots, monkeypatch):
    """train.gemm_weight_grad (on by default) switches the wide convolutions of the model it trains
    (ResNet-18's layer3 and layer4: 8 3x3 convs, 2 1x1 downsamples; the tiny FPN is too narrow);
    off, the same 6 steps give the same weights up to float-sum order."""
    import densedet.conv_grad as conv_grad
    switched = []
    real = conv_grad.use_gemm_weight_grad
    monkeypatch.setattr(conv_grad, "use_gemm_weight_grad", lambda model: switched.append(real(model)) or switched[-1])
    cfg = tiny_config("gemm")
    with keep_torch_globals():
        train(cfg, log=lambda msg: None)
    assert switched == [10]
    native = tiny_config("native")
    native.train.gemm_weight_grad = False
    with keep_torch_globals():
        train(native, log=lambda msg: None)
    assert switched == [10]
    weights = {name: load_checkpoint(Path(c.train.output_dir) / "model_final.pt")["model"]
               for name, c in (("straight", straight_run[0]), ("gemm", cfg), ("native", native))}
    for key, value in weights["straight"].items():
        assert torch.equal(weights["gemm"][key], value), key         # the same path twice: bit-identical
        if value.is_floating_point():
            torch.testing.assert_close(weights["native"][key], value, rtol=1e-3, atol=1e-5, msg=key)


def test_adamw_takes_the_fused_kernel_on_cpu_with_the_same_values(tiny_config):
    """build_optimizer's AdamW is the fused one on CPU parameters; 30 steps of it and of the
    per-op AdamW from the same start and gradients agree to float rounding."""
    from densedet.device import fused_adam_ok
    from densedet.engine.trainer import build_optimizer
    cfg = tiny_config()
    cfg.solver.optimizer, cfg.solver.weight_decay, cfg.solver.weight_decay_norm = "adamw", 0.01, 0.01
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Conv2d(8, 4, 1))
    fused = build_optimizer(model, cfg)
    assert fused.defaults["fused"] is True
    assert not fused_adam_ok([]) and not fused_adam_ok([torch.zeros(2, dtype=torch.int64)])
    twin = [p.detach().clone().requires_grad_() for p in model.parameters()]
    per_op = torch.optim.AdamW(twin, lr=cfg.solver.lr, weight_decay=0.01, fused=False)
    for _ in range(30):
        for p, q in zip(model.parameters(), twin):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        per_op.step()
    for p, q in zip(model.parameters(), twin):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# -- training learns -----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_training_raises_ap_on_the_digit_scenes(make_tiny_config, tmp_path, restore_torch_globals, no_plots, seed):
    """``train`` itself (the whole engine: data, augmentation, solver, final evaluation) turns an
    untrained detector (AP50 ~0) into one that finds the digits: 120 iterations of the tiny R18
    RetinaNet on the 8 training scenes, evaluated on them, reach AP50 ~0.33 and AP ~0.15 at seeds 0
    and 1 (measured; the bars below leave room). A loop that steps but does not learn (a wrong
    target, a dead LR, a broken loss or matcher) stays near the untrained model. Slow: ~10 s a seed."""
    from densedet.engine.evaluate import evaluate_model
    from densedet.models import build_from_config
    cfg = make_tiny_config(tmp_path / "run")
    cfg.data.val, cfg.data.val_images = cfg.data.train, cfg.data.train_images   # does the run fit its data?
    cfg.train.seed, cfg.train.max_iters, cfg.train.checkpoint_period, cfg.train.log_period = seed, 120, 120, 1000
    cfg.train.deterministic = False
    torch.manual_seed(seed)                                     # the untrained model: train()'s seeding, 0 steps
    untrained = evaluate_model(build_from_config(cfg.model).eval(), load_split(cfg.data, "val"), 4)
    assert untrained["AP50"] < 0.03
    trained = train(cfg, log=lambda _: None)
    assert trained["iterations"] == 120
    assert trained["AP50"] >= 0.2 and trained["AP50"] > untrained["AP50"] + 0.15
    assert trained["AP"] >= 0.08 and trained["AP"] > untrained["AP"] + 0.06


def test_evaluation_batches_images_of_one_size(tiny_config, tmp_path, restore_torch_globals):
    """The model pads a batch to its largest image, and a small image padded with a large one's
    border scores worse than alone: evaluation batches images of one size, so each image gets the
    detections it gets on its own, and the sizes' order does not matter."""
    import numpy as np
    from PIL import Image
    from densedet.data import DetectionData, ImageRecord
    from densedet.engine.evaluate import predict_dataset
    from densedet.models import build_from_config
    from densedet.tiling import batches_of_one_size
    assert batches_of_one_size("abcdef", [(1, 2), (3, 4), (1, 2), (1, 2), (3, 4), (5, 5)], 2) == [
        ["a", "c"], ["d"], ["b", "e"], ["f"]]
    cfg = tiny_config()
    cfg.model.score_thresh = 0.0                  # an untrained model: keep every box
    torch.manual_seed(0)
    model = build_from_config(cfg.model).eval()
    shapes = []
    forward = model.forward

    def recording(images, *args, **kwargs):
        shapes.append({tuple(im.shape) for im in images})
        return forward(images, *args, **kwargs)

    model.forward = recording
    rng = np.random.default_rng(0)
    records = []
    for k, (h, w) in enumerate([(64, 96), (128, 128), (64, 96), (128, 128), (96, 64)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{k}.png")
        records.append(ImageRecord(str(tmp_path / f"{k}.png"), k + 1, h, w, np.array([[2, 2, 20, 20]], np.float32),
                                   np.array([0])))
    data = DetectionData(records, ["thing"], None, "sizes")

    def by_image(results):
        out = {}
        for r in results:
            out.setdefault(r["image_id"], []).append(r["bbox"] + [r["score"], r["category_id"]])
        return {k: torch.tensor(v) for k, v in out.items()}

    batched = by_image(predict_dataset(model, data, batch_size=4))
    assert all(len(s) == 1 for s in shapes) and len(shapes) == 3       # (64, 96) x2, (128, 128) x2, (96, 64)
    alone = {}
    for record in records:
        alone.update(by_image(predict_dataset(model, DetectionData([record], ["thing"], None, "one"), batch_size=1)))
    assert batched.keys() == alone.keys() == {1, 2, 3, 4, 5}
    for k in alone:
        torch.testing.assert_close(batched[k], alone[k], atol=1e-4, rtol=1e-5)

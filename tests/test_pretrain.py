"""The box-crop warm-up of the backbone (``train.pretrain_minutes`` / ``pretrain_iters``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from densedet.backbones.resnet import ResNet
from densedet.config import Config, ConfigError, validate
from densedet.data import DetectionDataset
from densedet.data.records import DetectionData, ImageRecord
from densedet.engine.checkpoint import load_checkpoint
from densedet.engine.data import load_split
from densedet.engine.pretrain import (CropAugment, CropClassifier, box_items, crop_batch, crop_boxes,
                                      pretrain_backbone)
from densedet.engine.trainer import train
from densedet.models import PRESETS

pytestmark = pytest.mark.usefixtures("no_plots")


def test_crop_boxes_cuts_the_window_around_the_box():
    image = torch.zeros(3, 100, 120)
    image[:, 30:50, 40:60] = 1.0                         # a white 20 x 20 square, box (40, 30, 60, 50)
    boxes = torch.tensor([[40.0, 30.0, 60.0, 50.0]] * 3)
    context = torch.tensor([1.0, 2.0, 2.0])
    shift = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.5, 0.0]])
    crops = crop_boxes(image, boxes, 16, context, shift)
    assert crops.shape == (3, 3, 16, 16)
    assert torch.allclose(crops[0], torch.ones(3, 16, 16))            # window = the box
    inner = torch.zeros(16, 16)
    inner[4:12, 4:12] = 1.0                                           # window twice the box: box in the middle half
    assert torch.allclose(crops[1, 0], inner, atol=1e-6)
    shifted = torch.zeros(16, 16)
    shifted[4:12, 0:8] = 1.0                                          # centre moved right by half a box side
    assert torch.allclose(crops[2, 0], shifted, atol=1e-6)


def test_box_items_skip_crowd_boxes_and_keep_each_boxs_image():
    def record(i, boxes, labels, crowd):
        return ImageRecord(file_name=f"{i}.png", image_id=i, height=10, width=10,
                           boxes=np.array(boxes, np.float32).reshape(-1, 4), labels=np.array(labels, np.int64),
                           iscrowd=np.array(crowd, bool), difficult=np.zeros(len(labels), bool))
    records = [record(1, [[0, 0, 5, 5], [1, 1, 9, 9]], [3, 1], [False, True]),
               record(2, [], [], []),                                          # a negative image
               record(3, [[2, 2, 4, 6]], [4], [False])]
    data = DetectionData(records=records, class_names=[str(i) for i in range(5)],
                         category_ids=list(range(1, 6)), source="test")
    image_of, boxes, labels = box_items(data)
    assert image_of.tolist() == [0, 2]
    assert boxes.tolist() == [[0.0, 0.0, 5.0, 5.0], [2.0, 2.0, 4.0, 6.0]] and labels.tolist() == [3, 4]


def _corner_data():
    """One 40 x 40 image whose only box holds a white top-left quadrant: every turn and mirror differs."""
    image = torch.zeros(3, 40, 40, dtype=torch.uint8)
    image[:, 10:20, 10:20] = 255
    record = ImageRecord(file_name="0.png", image_id=0, height=40, width=40,
                         boxes=np.array([[10, 10, 30, 30]], np.float32), labels=np.array([0], np.int64),
                         iscrowd=np.zeros(1, bool), difficult=np.zeros(1, bool))
    data = DetectionData(records=[record], class_names=["a"], category_ids=[1], source="test")
    return data, lambda i: image


def _crops(augment, data, load, seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    return crop_batch(g, box_items(data), load, 64, (size,), augment=augment)[0]


def test_warm_up_crops_get_the_mirror_and_the_quarter_turns_of_the_detection_windows():
    data, load = _corner_data()
    plain = _crops(CropAugment(), data, load)
    assert torch.equal(_crops(CropAugment(hflip_prob=1.0), data, load), plain.flip(-1))
    turned = _crops(CropAugment(rotate90=True), data, load)
    seen = set()
    for crop, original in zip(turned, plain):
        matches = [k for k in range(4) if torch.equal(crop, original.rot90(k, (-2, -1)))]
        assert len(matches) == 1                      # each crop is one turn of its unaugmented self
        seen.add(matches[0])
    assert seen == {0, 1, 2, 3}                       # and 64 crops draw every turn
    both = _crops(CropAugment(hflip_prob=0.5, rotate90=True), data, load)
    corners = {tuple((torch.nonzero(c[0] > 0.5).float().mean(0) < 8).tolist()) for c in both}
    assert len(corners) == 4                          # the bright corner lands in each of the four corners


def test_warm_up_crops_get_the_photometric_distortion_with_the_geometry_unchanged():
    data, load = _corner_data()
    plain = _crops(CropAugment(), data, load)
    distorted = _crops(CropAugment(photometric=True), data, load)
    assert distorted.min() >= 0 and distorted.max() <= 1
    changed = (distorted - plain).abs().amax(dim=(1, 2, 3)) > 1e-3
    assert 0 < changed.sum() < len(plain)            # each step applied with probability 1/2: some crops untouched
    bright, dark = plain > 0.5, plain < 0.01          # no pixel moves: the white quadrant stays the brighter part
    for crop, b, d in zip(distorted, bright, dark):
        assert crop[b].mean() > crop[d].mean() + 0.2
    assert torch.equal(_crops(CropAugment(photometric=True), data, load), distorted)   # the same generator, the same crops


def test_warm_up_augmentation_when_switched_on_follows_the_detection_windows():
    cfg = Config()
    cfg.data.hflip_prob, cfg.data.rotate90, cfg.data.photometric = 0.5, True, True
    assert CropAugment.of(cfg) == CropAugment()       # off by default
    cfg.train.pretrain_augment = True
    assert CropAugment.of(cfg) == CropAugment(0.5, True, True)
    cfg.data.hflip_keeps_class = False                # a crop's label is its class: no mirror that may change it
    assert CropAugment.of(cfg) == CropAugment(0.0, True, True)
    cfg.data.hflip_keeps_class = True
    cfg.data.hflip_prob, cfg.data.rotate90, cfg.data.photometric = 0.0, False, False
    assert CropAugment.of(cfg) == CropAugment()
    cfg.data.augment = "ssd"                          # SSD's pipeline mirrors and distorts by itself
    assert CropAugment.of(cfg) == CropAugment(0.5, False, True)
    cfg.train.pretrain_augment = False
    assert CropAugment.of(cfg) == CropAugment()


def _trunk():
    torch.manual_seed(0)
    return ResNet(18, norm="bn", frozen_stages=0, out_features=("res3", "res4", "res5"))


def test_warm_up_learns_the_classes_of_real_digits_and_is_repeatable(make_tiny_config, tmp_path):
    cfg = make_tiny_config(tmp_path)
    data = load_split(cfg.data, "train")
    images = DetectionDataset(data, cache_images=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])

    def run(iterations):
        trunk = _trunk()
        stats = pretrain_backbone(trunk, images.load_uint8, data, mean, std, lr=2e-3, weight_decay=1e-4,
                                  batch_size=16, iterations=iterations, seed=3)
        return trunk.state_dict(), stats

    before = _trunk().state_dict()
    (first, _), (second, _) = run(4), run(4)
    assert all(torch.equal(first[k], second[k]) for k in first)            # same seed, same weights
    assert not torch.equal(first["conv1.weight"], before["conv1.weight"])  # the trunk was trained
    assert not torch.equal(first["bn1.running_mean"], before["bn1.running_mean"])
    _, stats = run(60)
    assert stats["iterations"] == 60 and stats["boxes"] == len(box_items(data)[0])
    # 10 classes: chance is 0.1; the last 10 steps classify the (training) crops far better.
    assert stats["accuracy"] > 0.5, stats


def test_warm_up_trains_the_classifier_it_is_given_and_refuses_one_on_another_trunk(make_tiny_config, tmp_path):
    cfg = make_tiny_config(tmp_path)
    data = load_split(cfg.data, "train")
    images = DetectionDataset(data, cache_images=True)
    trunk = _trunk()
    classifier = CropClassifier(trunk, list(trunk.out_channels), data.num_classes)
    heads = copy.deepcopy(classifier.heads.state_dict())
    pretrain_backbone(trunk, images.load_uint8, data, torch.zeros(3), torch.ones(3), lr=1e-3, weight_decay=0.0,
                      batch_size=4, iterations=2, classifier=classifier)
    assert not torch.equal(classifier.heads[-1].weight, heads["2.weight"])     # the caller's heads were trained
    with pytest.raises(ValueError, match="CropClassifier on this trunk"):
        pretrain_backbone(_trunk(), images.load_uint8, data, torch.zeros(3), torch.ones(3), lr=1e-3,
                          weight_decay=0.0, batch_size=4, iterations=1, classifier=classifier)


def test_warm_up_draws_one_of_the_given_crop_sizes_per_step(make_tiny_config, tmp_path, monkeypatch):
    import densedet.engine.pretrain as pretrain_module
    cfg = make_tiny_config(tmp_path)
    data = load_split(cfg.data, "train")
    images = DetectionDataset(data, cache_images=True)
    real, sizes = pretrain_module.crop_boxes, []

    def spy(image, boxes, size, context, shift):
        sizes.append(size)
        return real(image, boxes, size, context, shift)

    monkeypatch.setattr(pretrain_module, "crop_boxes", spy)
    pretrain_backbone(_trunk(), images.load_uint8, data, torch.zeros(3), torch.ones(3), lr=1e-3,
                      weight_decay=0.0, batch_size=4, crop_sizes=(24, 40), iterations=12, seed=0)
    assert set(sizes) == {24, 40}


def _resume_to(cfg, max_iters: int) -> dict:
    """Resume ``cfg``'s finished run with its schedule extended to ``max_iters``."""
    last = Path(cfg.train.output_dir) / "last.pt"
    ckpt = load_checkpoint(last)
    ckpt["max_iters"] = cfg.train.max_iters = max_iters
    torch.save(ckpt, last)
    return train(cfg, resume=True, log=lambda _: None)


def test_trainer_warms_up_counts_it_in_the_budget_and_resumes_past_it(make_tiny_config, tmp_path,
                                                                      restore_torch_globals, monkeypatch):
    import densedet.engine.pretrain as pretrain_module

    # One fake clock, the one given to train(), so the numbers are exact: it counts up 1 s a read, so
    # the run's budget times each detection step as 1 s (two reads); during the warm-up it counts 30 s a
    # read, and the warm-up reads it twice (start, end). A warm-up on the real clock would not see 30 s.
    class Clock:
        def __init__(self) -> None:
            self.now, self.tick = 0.0, 1.0

        def __call__(self) -> float:
            self.now += self.tick
            return self.now

    clock = Clock()
    real = pretrain_module.pretrain_backbone

    def warm_up(*args, **kwargs):
        clock.tick = 30.0
        try:
            return real(*args, **kwargs)
        finally:
            clock.tick = 1.0

    monkeypatch.setattr(pretrain_module, "pretrain_backbone", warm_up)
    cfg = make_tiny_config(tmp_path / "run")
    cfg.train.pretrain_iters, cfg.train.pretrain_batch_size, cfg.train.max_iters = 3, 8, 2
    summary = train(cfg, log=lambda _: None, clock=clock)
    assert summary["pretrain"]["iterations"] == 3 and summary["pretrain"]["seconds"] == 30.0
    assert summary["pretrain"]["crops_per_s"] == pytest.approx(3 * 8 / 30.0)
    assert summary["train_minutes"] * 60 == pytest.approx(30.0 + 2 * 1.0)     # the warm-up is inside
    assert summary["images_per_s"] == pytest.approx(2 * 2 / 2.0)               # detection's images over its own time
    saved = json.loads((Path(cfg.train.output_dir) / "metrics.json").read_text())
    assert saved["pretrain"]["iterations"] == 3
    last = load_checkpoint(Path(cfg.train.output_dir) / "last.pt")
    assert last["pretrain"]["iterations"] == 3 and last["iteration"] == 2

    # Resuming never warms up again (the checkpoint already holds the warmed-up trunk).
    monkeypatch.setattr(pretrain_module, "pretrain_backbone",
                        lambda *a, **k: pytest.fail("resume must not repeat the warm-up"))
    summary = _resume_to(cfg, 3)
    assert summary["iterations"] == 3 and summary["pretrain"]["iterations"] == 3


def test_warm_up_at_its_own_rate_then_frozen_stages_keep_its_weights_and_statistics_also_on_resume(
        make_tiny_config, tmp_path, restore_torch_globals, monkeypatch):
    import densedet.engine.pretrain as pretrain_module
    cfg = make_tiny_config(tmp_path / "run")
    cfg.train.pretrain_iters, cfg.train.pretrain_batch_size, cfg.train.max_iters = 3, 8, 2
    cfg.train.pretrain_freeze_stages = 2                  # the stem and layer1
    cfg.train.pretrain_lr = 0.005                         # solver.lr is 0.01
    cfg.train.pretrain_crop_sizes = [48, 64]
    real, warmed, rates = pretrain_module.pretrain_backbone, {}, []

    def spy(trunk, load_image, data, mean, std, lr, *args, **kwargs):
        rates.append((lr, kwargs["crop_sizes"]))
        stats = real(trunk, load_image, data, mean, std, lr, *args, **kwargs)
        warmed.update({k: v.clone() for k, v in trunk.state_dict().items()})
        return stats

    monkeypatch.setattr(pretrain_module, "pretrain_backbone", spy)
    out = Path(cfg.train.output_dir)

    def body_after_training():
        state = load_checkpoint(out / "model_final.pt")["model"]
        return {k[len("backbone.body."):]: v for k, v in state.items() if k.startswith("backbone.body.")}

    train(cfg, log=lambda _: None)
    assert rates == [(0.005, (48, 64))]
    body = body_after_training()
    early = [k for k in body if k.startswith(("conv1.", "bn1.", "layer1."))]
    assert len(early) > 20 and all(torch.equal(body[k], warmed[k]) for k in early)   # weights and BN statistics
    assert not torch.equal(body["layer2.0.conv1.weight"], warmed["layer2.0.conv1.weight"])    # the rest trains

    assert _resume_to(cfg, 3)["iterations"] == 3      # a third step, resumed: frozen again
    body = body_after_training()
    assert all(torch.equal(body[k], warmed[k]) for k in early)


def test_refinedet_with_a_resnet_trunk_warms_up_and_keeps_its_frozen_stages(
        make_tiny_config, tmp_path, restore_torch_globals, monkeypatch):
    """The warm-up works on any ResNet trunk: RefineDet R18's ``backbone.body`` learns on the crops,
    then its stem and layer1 stay as the warm-up left them while the rest trains."""
    import densedet.engine.pretrain as pretrain_module
    cfg = make_tiny_config(tmp_path / "run")
    cfg.model = copy.deepcopy(PRESETS["refinedet320_vgg16"])
    m = cfg.model
    m.backbone, m.num_classes, m.norm, m.frozen_stages = "resnet18", 10, "bn", 0
    m.refinedet.image_size, m.refinedet.tcb_channels = 128, 32
    m.anchor_sizes = [16.0, 32.0, 64.0, 128.0]
    cfg.data.train_min_sizes = []
    cfg.train.pretrain_iters, cfg.train.pretrain_batch_size, cfg.train.max_iters = 3, 8, 2
    cfg.train.pretrain_freeze_stages = 2
    real, warmed = pretrain_module.pretrain_backbone, {}

    def spy(trunk, *args, **kwargs):
        before = {k: v.clone() for k, v in trunk.state_dict().items()}
        stats = real(trunk, *args, **kwargs)
        warmed.update({k: v.clone() for k, v in trunk.state_dict().items()})
        assert not torch.equal(before["layer2.0.conv1.weight"], warmed["layer2.0.conv1.weight"])
        return stats

    monkeypatch.setattr(pretrain_module, "pretrain_backbone", spy)
    summary = train(cfg, log=lambda _: None)
    assert summary["pretrain"]["iterations"] == 3 and summary["iterations"] == 2
    state = load_checkpoint(Path(cfg.train.output_dir) / "model_final.pt")["model"]
    body = {k[len("backbone.body."):]: v for k, v in state.items() if k.startswith("backbone.body.")}
    early = [k for k in body if k.startswith(("conv1.", "bn1.", "layer1."))]
    assert len(early) > 20 and all(torch.equal(body[k], warmed[k]) for k in early)
    assert not torch.equal(body["layer3.0.conv1.weight"], warmed["layer3.0.conv1.weight"])


def test_the_warm_up_needs_a_resnet_trunk():
    cfg = Config()
    cfg.model.arch, cfg.model.backbone = "refinedet", "vgg16"
    cfg.train.pretrain_iters = 3
    with pytest.raises(ConfigError, match="train.pretrain_minutes.*ResNet trunk.*vgg16"):
        validate(cfg)

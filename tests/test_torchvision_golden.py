"""densedet's ``retinanet_r50_fpn_torchvision`` preset against torchvision's own outputs.

The golden file was recorded by ``tools/record_torchvision_goldens.py`` with torchvision
0.28 / torch 2.13 in a separate environment (torchvision is not a dependency). It holds
the state-dict keys and shapes of torchvision's ``retinanet_resnet50_fpn`` (v1, built as
for its COCO_V1 checkpoint: FrozenBatchNorm2d with eps 0), two real aerial photos, and
torchvision's detections on them after both models get the same deterministic weights
from ``golden_utils.seeded_state_dict_fill_`` (drawn from key names and shapes only).
``runs[name]["debug"]`` holds intermediates for hunting a mismatch: the padded batch
shape, resized sizes, the strides torchvision infers, its cell anchors, the first and
last anchors of image 0 and the head output shapes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import densedet
from golden_utils import match_detections, seeded_state_dict, seeded_state_dict_fill_, tensor_sha1

GOLDEN_PATH = Path(__file__).parent / "goldens" / "torchvision_retinanet_r50.pt"
PRESET = "retinanet_r50_fpn_torchvision"


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(GOLDEN_PATH, weights_only=True)


def golden_spec(golden: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The recorded torchvision state dict's keys and shapes (all float32)."""
    return {key: (tuple(shape), torch.float32) for key, shape in golden["state_dict_keys"]}


def build(golden: dict, run: str = "min320_max512", **kwargs) -> torch.nn.Module:
    overrides = golden["runs"][run]["overrides"]
    return densedet.build_model(PRESET, num_classes=golden["num_classes"], **overrides, **kwargs)


def run_model(model: torch.nn.Module, golden: dict, run: str) -> list[dict]:
    """Eval-mode inference on the run's stored images, converted as at recording."""
    images = [golden["images"][i].to(torch.float32) / 255 for i in golden["runs"][run]["image_indices"]]
    model.eval()
    with torch.no_grad():
        return model(images)


def assert_matches_golden(outputs: list[dict], golden: dict, run: str) -> None:
    expected = golden["runs"][run]["detections"]
    assert len(outputs) == len(expected)
    debug = golden["runs"][run]["debug"]
    for index, (ref, got) in enumerate(zip(expected, outputs)):
        try:
            match_detections(ref, got, score_tol=1e-4, box_tol=0.01)
        except AssertionError as err:
            raise AssertionError(
                f"run {run}, image {index}: {err}\n"
                f"torchvision: padded batch {debug['padded_batch_shape']}, resized "
                f"{debug['resized_image_sizes']}, inferred strides {debug['inferred_strides']}, "
                f"{debug['num_anchors_per_image']} anchors per image (more in golden['runs'][run]['debug'])"
            ) from None


def test_seeded_fill_draws_the_recorded_weights(golden):
    """The fill is bit-identical here and in the recording environment (needs no densedet)."""
    drawn = seeded_state_dict(golden_spec(golden), golden["seed"])
    assert {key: tensor_sha1(value) for key, value in drawn.items()} == golden["fill_sha1"]


def test_state_dict_keys_and_shapes_equal_torchvision(golden):
    model = build(golden)
    got = {key: list(value.shape) for key, value in model.state_dict().items()}
    expected = {key: shape for key, shape in golden["state_dict_keys"]}
    assert sorted(set(got) - set(expected)) == [], "keys torchvision does not have"
    assert sorted(set(expected) - set(got)) == [], "torchvision keys missing"
    assert {k: v for k, v in got.items() if v != expected[k]} == {}, "shapes differ"
    # so a torchvision state dict loads strictly
    model.load_state_dict(seeded_state_dict(golden_spec(golden), golden["seed"]), strict=True)


def test_detections_equal_torchvision_two_sizes_in_one_batch(golden):
    """min_size 320 / max_size 512, a 400x400 and a 300x460 image in one batch: exercises
    padding to 32, torchvision's inferred strides (P7: 106 x 128 here), its integer
    anchor sizes and rounded cell anchors, and detections from all five levels."""
    model = seeded_state_dict_fill_(build(golden), golden["seed"])
    assert_matches_golden(run_model(model, golden, "min320_max512"), golden, "min320_max512")


def test_detections_equal_torchvision_default_sizes(golden):
    """The preset's own sizes (min 800 / max 1333): one 400x400 image upscaled to 800x800;
    torchvision infers strides 61 and 114 for P6 and P7, where most detections come from.
    ~5-10 s on this machine (torchvision's time); mark it slow if densedet is slower."""
    model = seeded_state_dict_fill_(build(golden, "default"), golden["seed"])
    assert_matches_golden(run_model(model, golden, "default"), golden, "default")


def test_torchvision_state_dict_file_loads(golden, tmp_path):
    """A state dict saved from torchvision (torch.save of a plain dict) loads strictly."""
    state = seeded_state_dict(golden_spec(golden), golden["seed"])
    path = tmp_path / "torchvision_retinanet.pth"
    torch.save(state, path)
    model = build(golden, weights=str(path))
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[key], value) for key, value in state.items())


def test_published_checkpoint_layout_loads(golden, tmp_path):
    """torchvision's published COCO_V1 file predates the current head layout: its head
    towers are keyed ``conv.0, conv.2, conv.4, conv.6`` (plain Sequential of conv and
    ReLU) where the model now has ``conv.{0..3}.0``, and torchvision renames them on load
    (``_v1_to_v2_weights``). FrozenBatchNorm2d also drops ``num_batches_tracked`` keys,
    which a BatchNorm-trained file has. Both must load into the preset."""
    state = seeded_state_dict(golden_spec(golden), golden["seed"])
    legacy = {}
    for key, value in state.items():
        for head in ("head.classification_head.conv.", "head.regression_head.conv."):
            if key.startswith(head):
                index, _, leaf = key[len(head):].split(".")  # "<i>.0.<weight|bias>"
                key = f"{head}{2 * int(index)}.{leaf}"
        legacy[key] = value
    for key in list(state):
        if key.endswith(".running_var"):
            legacy[key.replace(".running_var", ".num_batches_tracked")] = torch.tensor(0)
    assert "head.classification_head.conv.6.weight" in legacy
    path = tmp_path / "retinanet_resnet50_fpn_coco_layout.pth"
    torch.save(legacy, path)
    loaded = build(golden, weights=str(path)).state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[key], value) for key, value in state.items())


# -- training: the preset's losses equal torchvision's ------------------------------------------------

LOSS_GOLDEN_PATH = Path(__file__).parent / "goldens" / "torchvision_retinanet_r50_losses.pt"


@pytest.fixture(scope="module")
def loss_golden() -> dict:
    return torch.load(LOSS_GOLDEN_PATH, weights_only=True)


def _training_losses(golden: dict, loss_golden: dict, batch: str, **options) -> dict:
    """The preset's training losses on one recorded batch, with the recorded weights and targets."""
    model = seeded_state_dict_fill_(
        densedet.build_model(PRESET, num_classes=golden["num_classes"], **loss_golden["overrides"], **options),
        golden["seed"]).train()
    images, targets = [], []
    for image_index, target_index in loss_golden["batches"][batch]["items"]:
        images.append(golden["images"][image_index].to(torch.float32) / 255)
        t = loss_golden["targets"][target_index] if target_index is not None else {"boxes": [], "labels": []}
        targets.append({"boxes": torch.tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4),
                        "labels": torch.tensor(t["labels"], dtype=torch.int64)})
    return {k: float(v.detach()) for k, v in model(images, targets).items()}


@pytest.mark.parametrize("batch", ["two_photos", "one_photo", "with_empty_image"])
def test_training_losses_equal_torchvision(golden, loss_golden, batch):
    """torchvision's classification and box losses (recorded by
    tools/record_torchvision_loss_goldens.py) to 1e-4 relative: the same matching, focal and L1
    terms, each image's sums over its own foreground count, then the mean over images; an image
    without boxes contributes its whole background loss over 1."""
    expected = loss_golden["batches"][batch]["losses"]
    got = _training_losses(golden, loss_golden, batch)
    assert got["cls"] == pytest.approx(expected["classification"], rel=1e-4)
    assert got["box"] == pytest.approx(expected["bbox_regression"], rel=1e-4)


def test_the_paper_normaliser_is_a_named_setting_that_differs(golden, loss_golden):
    """With the paper's batch normaliser (the canonical presets' default) the same batch gives other
    losses: the option is what makes the torchvision preset train like torchvision."""
    expected = loss_golden["batches"]["with_empty_image"]["losses"]
    got = _training_losses(golden, loss_golden, "with_empty_image", loss_normalizer="batch")
    assert abs(got["cls"] / expected["classification"] - 1) > 0.05

"""Record torchvision RetinaNet outputs as golden data for densedet's compatibility test.

NOT RUN IN CI, and never with densedet's own environment: it needs torchvision, which
must not be installed into the project's venv. Run it from a throwaway venv:

    python3 -m venv /work/tvenv
    PIP_CONFIG_FILE=/dev/null /work/tvenv/bin/pip install torch==2.13.0 torchvision==0.28.0 pillow numpy
    /work/tvenv/bin/python tools/record_torchvision_goldens.py [--data-dir DIR]   # record
    /work/tvenv/bin/python tools/record_torchvision_goldens.py --verify           # re-check

It writes ``tests/goldens/torchvision_retinanet_r50.pt`` which
``tests/test_torchvision_golden.py`` compares densedet's ``retinanet_r50_fpn_torchvision``
preset against. The torch version must equal the project's (2.13.0): the weights are drawn
by ``tests/golden_utils.py`` from a CPU generator and the test re-draws them.

The torchvision model is built exactly as ``retinanet_resnet50_fpn(weights=COCO_V1)``
builds it before loading the checkpoint -- FrozenBatchNorm2d with eps = 0.0
(torchvision's ``overwrite_eps`` for that checkpoint) -- since the densedet preset exists
to run that checkpoint. ``retinanet_resnet50_fpn(weights=None, weights_backbone=None)``
would instead use trainable BatchNorm2d (eps 1e-5, extra ``num_batches_tracked`` keys);
the script checks that its keys differ only by those and reports how far its
detections are from the golden ones.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import Tensor
from torchvision.models import resnet50
from torchvision.models.detection import retinanet_resnet50_fpn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.ops import batched_nms, clip_boxes_to_image
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from golden_utils import (  # noqa: E402
    match_detections,
    seeded_state_dict,
    seeded_state_dict_fill_,
    state_dict_spec,
    tensor_sha1,
)

DEFAULT_DATA_DIR = REPO / ".venv/lib/python3.11/site-packages/deepforest/data"
DEFAULT_OUT = REPO / "tests/goldens/torchvision_retinanet_r50.pt"
SEED = 0
NUM_CLASSES = 91
# (file, (top, left, height, width) or None): a square photo and a landscape crop of
# another, so that one batch holds two sizes and two aspect ratios.
IMAGES = [
    ("OSBS_029.png", None),
    ("2019_YELL_2_541000_4977000_image_crop.png", (400, 100, 300, 460)),
]
RUNS = {
    # Small sizes keep the test fast; both images in one batch (padding differs).
    "min320_max512": ({"min_size": 320, "max_size": 512}, [0, 1]),
    # torchvision's defaults (min 800 / max 1333), one image: the preset as shipped.
    "default": ({}, [0]),
}


def build_torchvision_retinanet(frozen_bn_eps: float = 0.0, **overrides) -> RetinaNet:
    """torchvision's RetinaNet R50-FPN v1 as built for its COCO_V1 checkpoint, eval mode."""
    backbone = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(
        backbone, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)
    )
    model = RetinaNet(backbone, NUM_CLASSES, **overrides)
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.eps = frozen_bn_eps
    return model.eval()


def load_images(data_dir: Path) -> list[Tensor]:
    """The golden inputs as uint8 (3, H, W) tensors."""
    images = []
    for name, box in IMAGES:
        path = data_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"golden input image not found: {path} (pass --data-dir)")
        array = np.asarray(Image.open(path).convert("RGB"))
        if box is not None:
            top, left, height, width = box
            array = array[top : top + height, left : left + width]
        images.append(torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous())
    return images


def to_model_input(image: Tensor) -> Tensor:
    """uint8 (3, H, W) -> float32 in [0, 1]; the test does exactly the same."""
    return image.to(torch.float32) / 255


def run_with_debug(model: RetinaNet, images: list[Tensor]) -> tuple[list[dict], dict]:
    """Run eval inference, capturing the intermediates a mismatch hunt needs."""
    captured: dict = {}
    hooks = [
        model.transform.register_forward_hook(lambda m, i, o: captured.update(image_list=o[0])),
        model.backbone.register_forward_hook(lambda m, i, o: captured.update(features=list(o.values()))),
        model.head.register_forward_hook(lambda m, i, o: captured.update(head=o)),
        model.anchor_generator.register_forward_hook(lambda m, i, o: captured.update(anchors=o)),
    ]
    with torch.no_grad():
        detections = model([to_model_input(im) for im in images])
    for hook in hooks:
        hook.remove()
    return detections, captured


def reference_postprocess(model: RetinaNet, captured: dict, index: int) -> dict:
    """Re-do torchvision's postprocessing for one image, keeping each detection's level.

    Also measures the margins that make the golden robust: how far the last kept
    score is above the first dropped one (the detections_per_img cut) and the score
    gaps at each level's top-k cut.
    """
    feats = captured["features"]
    num_anchors = captured["head"]["cls_logits"].shape[1] // sum(f.shape[2] * f.shape[3] for f in feats)
    sizes = [f.shape[2] * f.shape[3] * num_anchors for f in feats]
    logits = captured["head"]["cls_logits"][index].split(sizes)
    deltas = captured["head"]["bbox_regression"][index].split(sizes)
    anchors = captured["anchors"][index].split(sizes)
    image_size = captured["image_list"].image_sizes[index]
    boxes, scores, labels, levels, topk_gaps = [], [], [], [], []
    for level, (lg, dl, an) in enumerate(zip(logits, deltas, anchors)):
        flat = torch.sigmoid(lg).flatten()
        idx = torch.where(flat > model.score_thresh)[0]
        ordered, order = flat[idx].sort(descending=True)
        if len(ordered) > model.topk_candidates:
            k = model.topk_candidates
            topk_gaps.append((float(ordered[k - 1]), float(ordered[k - 1] - ordered[k])))
        keep = idx[order[: model.topk_candidates]]
        anchor_idx, label = keep // NUM_CLASSES, keep % NUM_CLASSES
        decoded = model.box_coder.decode_single(dl[anchor_idx], an[anchor_idx])
        boxes.append(clip_boxes_to_image(decoded, image_size))
        scores.append(flat[keep])
        labels.append(label)
        levels.append(torch.full_like(label, level))
    boxes, scores, labels, levels = map(torch.cat, (boxes, scores, labels, levels))
    survivors = batched_nms(boxes, scores, labels, model.nms_thresh)
    n = model.detections_per_img
    cut_gap = float(scores[survivors[n - 1]] - scores[survivors[n]]) if len(survivors) > n else float("nan")
    kept = survivors[:n]
    return {
        "boxes": boxes[kept],
        "scores": scores[kept],
        "labels": labels[kept],
        "levels": levels[kept],
        "num_after_nms": len(survivors),
        "candidates_per_level": torch.bincount(levels, minlength=len(feats)).tolist(),
        "detections_cut_score_gap": cut_gap,
        "topk_cut_score_gaps": topk_gaps,
    }


def debug_record(model: RetinaNet, captured: dict) -> dict:
    """Small tensors that locate a mismatch: preprocessing, strides, anchors, head."""
    image_list = captured["image_list"]
    padded_h, padded_w = image_list.tensors.shape[-2:]
    feats = captured["features"]
    anchors0 = captured["anchors"][0]
    head = captured["head"]
    return {
        "padded_batch_shape": list(image_list.tensors.shape),
        "resized_image_sizes": [list(s) for s in image_list.image_sizes],
        # the normalised, resized, padded batch: a corner patch and per-image channel sums
        "batch_corner_patch": image_list.tensors[:, :, :4, :4].clone(),
        "batch_channel_sums": image_list.tensors.double().sum(dim=(2, 3)),
        "feature_shapes": [list(f.shape) for f in feats],
        "feature_mean_std": torch.tensor([[f.mean(), f.std()] for f in feats]),
        # torchvision infers each level's stride as padded size // feature size
        "inferred_strides": [[padded_h // f.shape[2], padded_w // f.shape[3]] for f in feats],
        "cell_anchors": [a.clone() for a in model.anchor_generator.cell_anchors],
        "num_anchors_per_image": int(anchors0.shape[0]),
        "anchors_image0_first20": anchors0[:20].clone(),
        "anchors_image0_last20": anchors0[-20:].clone(),
        "cls_logits_shape": list(head["cls_logits"].shape),
        "bbox_regression_shape": list(head["bbox_regression"].shape),
        "cls_logits_image0_first4": head["cls_logits"][0, :4].clone(),
        "bbox_regression_image0_first4": head["bbox_regression"][0, :4].clone(),
    }


def record(data_dir: Path, out: Path) -> None:
    torch.set_num_threads(2)
    images = load_images(data_dir)
    builder_keys = set(retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES).state_dict())
    template = build_torchvision_retinanet()
    spec = state_dict_spec(template)
    extra = sorted(builder_keys - set(spec))
    assert set(spec) <= builder_keys and all(k.endswith(".num_batches_tracked") for k in extra), extra
    assert all(dtype == torch.float32 for _, dtype in spec.values())  # the test assumes so
    drawn = seeded_state_dict(spec, SEED)
    golden: dict = {
        "format_version": 1,
        "recorded_with": {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__)},
        "seed": SEED,
        "num_classes": NUM_CLASSES,
        "frozen_bn_eps": 0.0,
        "state_dict_keys": [[k, list(shape)] for k, (shape, _) in spec.items()],  # model order
        "bn_builder_extra_keys": extra,  # what weights=None adds (BatchNorm2d buffers)
        "fill_sha1": {k: tensor_sha1(v) for k, v in drawn.items()},
        "images": images,
        "image_sources": [f"deepforest/data/{name} region {box}" for name, box in IMAGES],
        "input_conversion": "image.to(torch.float32) / 255",
        "runs": {},
    }
    for run_name, (overrides, indices) in RUNS.items():
        model = seeded_state_dict_fill_(build_torchvision_retinanet(**overrides), SEED)
        batch = [images[i] for i in indices]
        start = time.perf_counter()
        detections, captured = run_with_debug(model, batch)
        seconds = time.perf_counter() - start
        debug = debug_record(model, captured)
        print(f"\n== run {run_name}: overrides {overrides}, images {indices}, {seconds:.1f} s")
        for key in ("padded_batch_shape", "resized_image_sizes", "feature_shapes", "inferred_strides", "num_anchors_per_image"):
            print(f"  {key}: {debug[key]}")
        print(f"  cell anchors (rounded half-sizes): {[a[:, 2].tolist() for a in debug['cell_anchors']]}")
        levels = []
        for i, det in enumerate(detections):
            ref = reference_postprocess(model, captured, i)
            # our re-implementation reproduces torchvision exactly (before the rescale)
            scale = torch.tensor([o / r for o, r in zip(batch[i].shape[-2:], captured["image_list"].image_sizes[i])])
            assert torch.equal(ref["scores"], det["scores"]) and torch.equal(ref["labels"], det["labels"])
            torch.testing.assert_close(ref["boxes"] * scale.flip(0).repeat(2), det["boxes"])
            levels.append(torch.bincount(ref["levels"], minlength=5).tolist())
            print(
                f"  image {indices[i]}: {len(det['scores'])} detections, {len(det['labels'].unique())} labels, "
                f"scores {float(det['scores'].min()):.4f}..{float(det['scores'].max()):.4f}, per level {levels[-1]}, "
                f"after NMS {ref['num_after_nms']}, candidates/level {ref['candidates_per_level']}, "
                f"300-cut gap {ref['detections_cut_score_gap']:.1e}, top-k cut (score, gap) "
                f"{['%.3f, %.0e' % g for g in ref['topk_cut_score_gaps']]}"
            )
        debug["detections_per_level"] = levels
        golden["runs"][run_name] = {
            "overrides": overrides,
            "image_indices": indices,
            "detections": [{k: v.clone().float() if k != "labels" else v.clone() for k, v in d.items()} for d in detections],
            "debug": debug,
            "torchvision_seconds": seconds,
        }
        robustness_checks(overrides, batch, detections)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(golden, out)
    print(f"\nwrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


def robustness_checks(overrides: dict, batch: list[Tensor], golden: list[dict]) -> None:
    """Show the golden output is not on a knife-edge, and what eps / BatchNorm change."""
    inputs = [to_model_input(im) for im in batch]
    variants = {
        "float64 network (same weights and float32 resize)": lambda: build_torchvision_retinanet(**overrides),
        "FrozenBN eps=1e-5": lambda: build_torchvision_retinanet(1e-5, **overrides),
        "weights=None builder (BatchNorm2d)": lambda: retinanet_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=NUM_CLASSES, **overrides
        ).eval(),
    }
    for name, make in variants.items():
        model = seeded_state_dict_fill_(make(), SEED)
        x = inputs
        if name.startswith("float64"):
            # Resize in float32 as the golden did: float32 bilinear weights alone
            # differ from float64 by ~1e-6 relative, which is not what we probe here.
            model = model.double()
            model.transform = _Float32Transform(build_torchvision_retinanet(**overrides).transform)
        with torch.no_grad():
            out = model(x)
        verdicts = []
        for ref, got in zip(golden, out):
            got = {k: v.float() if k != "labels" else v for k, v in got.items()}
            try:
                match_detections(ref, got)
                n = len(ref["scores"])
                verdicts.append(
                    f"match (max score diff {float((ref['scores'] - got['scores'][:n]).abs().max()):.1e}, "
                    f"box {float((ref['boxes'] - got['boxes'][:n]).abs().max()):.1e} px, in order)"
                )
            except AssertionError as err:
                verdicts.append(f"MISMATCH: {str(err)[:160]}")
        print(f"  vs {name}: {verdicts}")


class _Float32Transform(torch.nn.Module):
    """torchvision's transform run in float32, its padded batch handed on as float64."""

    def __init__(self, transform: torch.nn.Module) -> None:
        super().__init__()
        self.inner = transform

    def forward(self, images, targets=None):
        image_list, targets = self.inner(images, targets)
        image_list.tensors = image_list.tensors.double()
        return image_list, targets

    def postprocess(self, *args):
        return self.inner.postprocess(*args)


def verify(out: Path) -> None:
    """The test's comparison, with torchvision in place of densedet."""
    golden = torch.load(out, weights_only=True)
    for run_name, run in golden["runs"].items():
        model = build_torchvision_retinanet(golden["frozen_bn_eps"], **run["overrides"])
        keys = [[k, list(v.shape)] for k, v in model.state_dict().items()]
        assert keys == golden["state_dict_keys"], "state-dict keys/shapes differ"
        drawn = seeded_state_dict(state_dict_spec(model), golden["seed"])
        assert {k: tensor_sha1(v) for k, v in drawn.items()} == golden["fill_sha1"]
        model.load_state_dict(drawn, strict=True)
        images = [to_model_input(golden["images"][i]) for i in run["image_indices"]]
        with torch.no_grad():
            outputs = model(images)
        for ref, got in zip(run["detections"], outputs):
            match_detections(ref, got)
        print(f"verify {run_name}: torchvision matches the golden file")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="deepforest's data folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--verify", action="store_true", help="re-run torchvision against an existing file")
    args = parser.parse_args()
    if args.verify:
        verify(args.out)
    else:
        record(args.data_dir, args.out)


if __name__ == "__main__":
    main()

"""Record torchvision RetinaNet *training losses* as golden data (densedet's torchvision preset
must train like torchvision).

NOT RUN IN CI, and never in densedet's own environment: it needs torchvision. From a throwaway
venv (torchvision installs from this machine's disk):

    python3 -m venv /tmp/tvenv
    /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/tvenv/bin/python tools/record_torchvision_loss_goldens.py

It writes ``tests/goldens/torchvision_retinanet_r50_losses.pt``, which
``tests/test_torchvision_golden.py`` compares densedet's ``retinanet_r50_fpn_torchvision`` against.
The model and its weights are those of the detection goldens (``record_torchvision_goldens.py``:
the same builder, the same ``golden_utils`` fill from key names and shapes); the inputs are the
detection goldens' two aerial photos with hand-placed boxes of COCO labels, in three batches:
both photos (one box set each), the first photo alone, and the first photo beside one without
boxes (torchvision's handling of an image without boxes: every anchor is background).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torchvision

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "tests"))
from golden_utils import seeded_state_dict_fill_  # noqa: E402
from record_torchvision_goldens import SEED, build_torchvision_retinanet, to_model_input  # noqa: E402

DETECTION_GOLDEN = REPO / "tests/goldens/torchvision_retinanet_r50.pt"
DEFAULT_OUT = REPO / "tests/goldens/torchvision_retinanet_r50_losses.pt"
OVERRIDES = {"min_size": 320, "max_size": 512}

# Boxes (x1, y1, x2, y2) in each photo's own pixels, with COCO category ids; a few small and
# large, square and elongated, so that several pyramid levels and both ratios get foreground.
TARGETS = [
    {"boxes": [[10.0, 12.0, 60.0, 70.0], [200.0, 150.0, 330.0, 260.0], [90.0, 300.0, 120.0, 390.0],
               [300.0, 20.0, 390.0, 45.0]], "labels": [1, 18, 44, 3]},
    {"boxes": [[5.0, 5.0, 80.0, 60.0], [150.0, 100.0, 400.0, 290.0]], "labels": [64, 1]},
]
# batch name -> list of (image index, target index or None for an image without boxes)
BATCHES = {"two_photos": [(0, 0), (1, 1)], "one_photo": [(0, 0)], "with_empty_image": [(0, 0), (1, None)]}


def targets_for(index: int | None) -> dict:
    if index is None:
        return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    t = TARGETS[index]
    return {"boxes": torch.tensor(t["boxes"]), "labels": torch.tensor(t["labels"], dtype=torch.int64)}


def record(out: Path) -> None:
    torch.set_num_threads(2)
    images = torch.load(DETECTION_GOLDEN, weights_only=True)["images"]
    model = seeded_state_dict_fill_(build_torchvision_retinanet(**OVERRIDES), SEED).train()
    golden = {"format_version": 1,
              "recorded_with": {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__)},
              "seed": SEED, "overrides": OVERRIDES, "targets": TARGETS, "batches": {}}
    for name, items in BATCHES.items():
        batch = [to_model_input(images[i]) for i, _ in items]
        targets = [targets_for(t) for _, t in items]
        losses = model(batch, targets)
        golden["batches"][name] = {"items": [list(item) for item in items],
                                   "losses": {k: float(v) for k, v in losses.items()}}
        print(f"{name}: {golden['batches'][name]['losses']}")
    torch.save(golden, out)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    record(parser.parse_args().out)


if __name__ == "__main__":
    main()

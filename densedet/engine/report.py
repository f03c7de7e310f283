"""What a finished run leaves for a person to look at: loss/LR curves and drawn predictions."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw

__all__ = ["plot_curves", "draw_detections", "draw_predictions"]

_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def plot_curves(jsonl: str | Path, out_png: str | Path) -> None:
    """Loss terms and learning rate against iteration, from ``metrics.jsonl``."""
    from matplotlib.figure import Figure
    rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval" in r]
    if not train_rows:
        return
    fig = Figure(figsize=(11, 3.6))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    its = [r["iteration"] for r in train_rows]
    for key in sorted({k for r in train_rows for k in r if k.startswith("loss")}):
        ax1.plot(its, [r.get(key, float("nan")) for r in train_rows], label=key)
    ax1.set_xlabel("iteration"), ax1.set_title("training loss"), ax1.legend(fontsize=7)
    ax2.plot(its, [r["lr"] for r in train_rows])
    ax2.set_xlabel("iteration"), ax2.set_title("learning rate")
    if evals:
        ax3.plot([r["iteration"] for r in evals], [r["eval"]["AP"] for r in evals], "o-", label="AP")
        ax3.plot([r["iteration"] for r in evals], [r["eval"]["AP50"] for r in evals], "o-", label="AP50")
        ax3.legend(fontsize=7)
    ax3.set_xlabel("iteration"), ax3.set_title("validation")
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)


def draw_detections(image: Image.Image, det: dict, class_names=None, score_thresh: float = 0.3) -> Image.Image:
    """A copy of ``image`` with boxes, class names and scores above ``score_thresh`` drawn."""
    image = image.convert("RGB").copy()
    draw = ImageDraw.Draw(image)
    for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
        if score < score_thresh:
            continue
        colour = _COLOURS[int(label) % len(_COLOURS)]
        name = class_names[int(label)] if class_names and int(label) < len(class_names) else str(int(label))
        draw.rectangle(box, outline=colour, width=2)
        draw.text((box[0] + 2, max(0, box[1] - 11)), f"{name} {score:.2f}", fill=colour)
    return image


@torch.inference_mode()
def draw_predictions(model, data, out_dir: str | Path, num: int, device="cpu", score_thresh: float = 0.3) -> None:
    """Draw the model's detections on the first ``num`` images of ``data``."""
    from ..data import load_image
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    for record in data.records[:num]:
        pixels = load_image(record.file_name)
        det = model([pixels.float().div(255).to(device)])[0]
        det = {k: v.cpu() for k, v in det.items()}
        image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        draw_detections(image, det, data.class_names, score_thresh).save(out_dir / f"{Path(record.file_name).stem}.png")

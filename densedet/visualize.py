"""Detections drawn on images, one look everywhere: ``densedet predict``'s annotated images and the
``predictions/`` folder a training run leaves (:func:`draw_predictions`: ground truth on the left,
detections on the right).

Each box is outlined in its class's colour and tagged "name score" on a filled label of the same
colour; line width and font grow with the image, so large aerial photos stay readable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from .data import DetectionData, load_record_image
from .data.images import rgb_array

__all__ = ["draw_detections", "draw_ground_truth", "side_by_side", "draw_predictions", "PALETTE"]

# One colour per class (label modulo the palette's length).
PALETTE: list[tuple[int, int, int]] = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _to_pil(image: Tensor | np.ndarray | Image.Image) -> Image.Image:
    """A new RGB PIL image from a PIL image, a ``[3, H, W]`` tensor or an ``[H, W, 3]`` array
    (uint8, or float in [0, 1])."""
    if isinstance(image, Tensor):
        image = image.detach().cpu()
        array = image if image.dtype == torch.uint8 else (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
        image = Image.fromarray(array.permute(1, 2, 0).numpy())
    elif isinstance(image, np.ndarray):
        array = image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(array)
    return Image.fromarray(rgb_array(image))   # always a copy: the caller's image is left as it was


def _class_name(label: int, class_names: Sequence[str] | None) -> str:
    return class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)


def draw_detections(image: Tensor | np.ndarray | Image.Image, det: dict[str, Tensor],
                    class_names: Sequence[str] | None = None, score_thresh: float = 0.3,
                    line_width: int | None = None, font_size: int | None = None) -> Image.Image:
    """A copy of ``image`` with the boxes scoring ``>= score_thresh`` drawn, each labelled "name score".

    Args:
        image: a PIL image, a ``[3, H, W]`` tensor or an ``[H, W, 3]`` array (uint8, or float in [0, 1]).
        det: ``{"boxes": [D, 4] (x1, y1, x2, y2 pixels), "scores": [D], "labels": [D]}``.
        class_names: names by label; a label without a name is written as its number.
        score_thresh: boxes scoring lower are not drawn.
        line_width, font_size: default to the image's shorter side / 400 (at least 1) and / 60 (at least 10).
    """
    kept = [(box, int(label), f"{_class_name(int(label), class_names)} {score:.2f}")
            for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist())
            if score >= score_thresh]
    return _draw_boxes(_to_pil(image), kept, line_width, font_size)


def draw_ground_truth(image: Tensor | np.ndarray | Image.Image, boxes: Tensor | np.ndarray,
                      labels: Tensor | np.ndarray, class_names: Sequence[str] | None = None,
                      line_width: int | None = None, font_size: int | None = None) -> Image.Image:
    """A copy of ``image`` with the ground-truth ``boxes [G, 4]`` (x1, y1, x2, y2 pixels) drawn, each
    labelled with its class name (``labels [G]``), in the same colours as :func:`draw_detections`."""
    kept = [(box, int(label), _class_name(int(label), class_names))
            for box, label in zip(np.asarray(boxes).reshape(-1, 4).tolist(), np.asarray(labels).reshape(-1).tolist())]
    return _draw_boxes(_to_pil(image), kept, line_width, font_size)


def side_by_side(left: Image.Image, right: Image.Image, gap: int = 8) -> Image.Image:
    """``left`` and ``right`` on one white canvas, ``gap`` pixels apart, tops aligned."""
    canvas = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + gap, 0))
    return canvas


def _draw_boxes(image: Image.Image, boxes: list[tuple[list[float], int, str]], line_width: int | None,
                font_size: int | None) -> Image.Image:
    """Draw each ``(box, label, text)`` on ``image`` in place: the outline in the label's colour, the
    text on a filled tag of the same colour; returns ``image``."""
    draw = ImageDraw.Draw(image)
    line = line_width or max(1, round(min(image.size) / 400))
    font = _font(font_size or max(10, round(min(image.size) / 60)))
    for box, label, text in boxes:
        colour = PALETTE[label % len(PALETTE)]
        draw.rectangle(box, outline=colour, width=line)
        # the label sits above the box, or inside its top edge where the image ends above it
        left, top, right, bottom = draw.textbbox((box[0], box[1]), text, font=font)
        y = box[1] - (bottom - top) - 2 if box[1] - (bottom - top) - 2 >= 0 else box[1]
        left, top, right, bottom = draw.textbbox((box[0], y), text, font=font)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=colour)
        draw.text((box[0], y), text, fill=(0, 0, 0), font=font)
    return image


@torch.inference_mode()
def draw_predictions(model: nn.Module, data: DetectionData, out_dir: str | Path, num: int,
                     device: str | torch.device = "cpu", score_thresh: float = 0.3) -> None:
    """Draw the first ``num`` images of ``data`` into ``out_dir/<stem>.png``: the ground truth on the
    left, the model's detections scoring ``>= score_thresh`` on the right (8 white pixels between)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    for record in data.records[:num]:
        pixels = load_record_image(record)
        det = model([pixels.float().div(255).to(device)])[0]
        det = {k: v.cpu() for k, v in det.items()}
        truth = draw_ground_truth(pixels, record.boxes, record.labels, data.class_names)
        drawn = side_by_side(truth, draw_detections(pixels, det, data.class_names, score_thresh))
        stem = Path(record.file_name).stem + ("" if record.region is None else f"_{record.image_id}")
        drawn.save(out_dir / f"{stem}.png")

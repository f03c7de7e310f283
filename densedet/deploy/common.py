"""What every deploy backend shares: the errors, the sidecar, the preprocessing and the runner interface.

A deployed model is a file written by ``densedet export`` (ONNX ``.onnx`` or OpenVINO ``.xml``
with its ``.bin``) plus the JSON sidecar ``<file>.json`` (:func:`densedet.export.sidecar_path`).
:class:`DeployedDetector` wraps one the way a :class:`~densedet.models.base.DenseDetector` is
called in eval mode — ``detector(images: list[[3, H, W] float in [0, 1]]) -> list[{"boxes" [D, 4]
original pixels, "scores" [D], "labels" [D]}]`` — so :class:`~densedet.predict.Predictor` and
:func:`~densedet.engine.evaluate.predict_dataset` take either. The preprocessing follows the sidecar
(``warp`` to the fixed export size, or ``fit`` by the model's own scale; zero padding after
normalising, to the export size or, for a dynamic-size export, to the batch's largest image) with the same
``F.interpolate`` call as :class:`~densedet.models.preprocess.ImagePreprocessor`, so a fp32
backend sees the same input tensor as PyTorch.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DensedetError
from ..export import SIDECAR_FORMAT, sidecar_path

__all__ = ["BACKENDS", "DeployError", "MissingExtraError", "DeployFileError", "require", "read_sidecar",
           "default_threads", "fit_scale", "batch_shape", "preprocess_images", "DeployedDetector"]

BACKENDS = ("torch", "onnxruntime", "openvino")
EXTRA = "pip install 'densedet[deploy]'"


class DeployError(DensedetError):
    """A deploy backend cannot be used as asked."""


class MissingExtraError(DeployError, ImportError):
    """An optional package of the ``deploy`` extra is not installed."""


class DeployFileError(DeployError, ValueError):
    """An exported model file or its sidecar is missing or unreadable."""


def require(module: str, purpose: str):
    """Import ``module`` or raise :class:`MissingExtraError` naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(f"{purpose} needs the Python package {module!r}, which is not installed "
                                f"({err}); it is part of the deploy extra: {EXTRA}") from None


def default_threads() -> int:
    """The runtimes' thread count: the process's torch intra-op threads, so that a backend and
    PyTorch compete on equal terms (each runtime would otherwise pick its own default)."""
    return int(torch.get_num_threads())


def read_sidecar(model_path: str | Path) -> dict:
    """The sidecar of an exported model, checked for the fields a runner needs."""
    path = sidecar_path(model_path)
    if not Path(model_path).is_file():
        raise DeployFileError(f"{model_path}: exported model not found")
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DeployFileError(f"{path}: sidecar not found (densedet export writes it next to the model)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DeployFileError(f"{path}: not a densedet sidecar (invalid JSON: {err})") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise DeployFileError(f"{path}: not a densedet sidecar (format must be {SIDECAR_FORMAT!r})")
    for key in ("input_size", "resize", "mean", "std", "class_names", "score_thresh", "nms_thresh"):
        if key not in meta:
            raise DeployFileError(f"{path}: sidecar lacks the field {key!r}")
    if meta["resize"] not in ("warp", "fit"):
        raise DeployFileError(f"{path}: resize must be 'warp' or 'fit', got {meta['resize']!r}")
    return meta


def fit_scale(h: int, w: int, meta: dict) -> float:
    """The ``fit`` resize factor of an ``h x w`` image: the model's own (Python floats, as
    :class:`~densedet.models.preprocess.ImagePreprocessor`: shorter side to ``min_size``, longer
    side at most ``max_size``; as a ``scale_as`` image would be, when the sidecar names one), lowered
    where the result would not fit inside the export size. A sidecar without ``min_size`` (older
    exports) fits the export size exactly."""
    height, width = (int(s) for s in meta["input_size"])
    inside = min(height / h, width / w)
    if "min_size" not in meta:
        return inside
    sh, sw = meta.get("scale_as") or (h, w)
    scale = min(meta["min_size"] / min(sh, sw), meta["max_size"] / max(sh, sw))
    return scale if math.floor(h * scale) <= height and math.floor(w * scale) <= width else inside


def batch_shape(sizes: Sequence[tuple[int, int]], meta: dict) -> tuple[int, int]:
    """The ``(H, W)`` a batch of resized ``(h_i, w_i)`` images is padded to: the export size, or for
    a dynamic-size export its largest image rounded up to ``size_divisible`` (as
    :class:`~densedet.models.preprocess.ImagePreprocessor` pads), never beyond the export size."""
    height, width = (int(s) for s in meta["input_size"])
    if not meta.get("dynamic_size"):
        return height, width
    d = int(meta["size_divisible"])
    return (min(height, -(-max(h for h, _ in sizes) // d) * d), min(width, -(-max(w for _, w in sizes) // d) * d))


def preprocess_images(images: Sequence[Tensor], meta: dict) -> tuple[Tensor, list[tuple[int, int]]]:
    """Float ``[3, H_i, W_i]`` images in [0, 1] → (``[B, 3, H, W]`` float32, resized ``(h_i, w_i)``),
    as the sidecar says: normalise, then ``warp`` (stretch to exactly the export size) or ``fit``
    (one scale, :func:`fit_scale`; floored sides, bottom/right zero padding to :func:`batch_shape`).

    The arithmetic is :class:`~densedet.models.preprocess.ImagePreprocessor`'s (Python-float scale,
    ``F.interpolate`` bilinear with ``recompute_scale_factor``), so wherever the model's resized image
    fits the export size the backend gets the tensor PyTorch feeds itself.
    """
    height, width = (int(s) for s in meta["input_size"])
    mean = torch.tensor(meta["mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(meta["std"], dtype=torch.float32).view(3, 1, 1)
    resized = []
    for image in images:
        x = (image.float().cpu() - mean) / std
        h, w = x.shape[-2:]
        if meta["resize"] == "warp":
            if (h, w) != (height, width):
                x = F.interpolate(x[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        else:
            scale = fit_scale(h, w, meta)
            if scale != 1.0:
                nh, nw = max(1, math.floor(h * scale)), max(1, math.floor(w * scale))
                if math.floor(h * scale) >= 1 and math.floor(w * scale) >= 1:
                    x = F.interpolate(x[None], scale_factor=(scale, scale), mode="bilinear",
                                      recompute_scale_factor=True, align_corners=False)[0]
                else:
                    x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
            x = x[:, :height, :width]
        resized.append(x)
    sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in resized]
    batch = torch.zeros(len(images), 3, *batch_shape(sizes, meta))
    for b, x in enumerate(resized):
        batch[b, :, :x.shape[-2], :x.shape[-1]] = x
    return batch, sizes


class DeployedDetector(nn.Module):
    """An exported model behind the eval-mode interface of a densedet detector (module docstring).

    Subclasses open the file and implement :meth:`run`. ``score_thresh`` may be raised above the
    threshold baked into the graph (detections are then filtered); it cannot go lower.
    """

    backend = "?"

    def __init__(self, model_path: str | Path, meta: dict) -> None:
        super().__init__()
        self.model_path = Path(model_path)
        self.meta = meta
        self.class_names = list(meta["class_names"])
        self.num_classes = len(self.class_names)
        self.category_ids = meta.get("category_ids")
        self.nms_thresh = float(meta["nms_thresh"])
        self.export_score_thresh = float(meta["score_thresh"])
        self.score_thresh = self.export_score_thresh
        self.eval()

    def set_score_thresh(self, value: float) -> None:
        """Keep detections scoring above ``value`` (≥ the threshold the graph was exported with)."""
        if value < self.export_score_thresh:
            raise DeployError(f"{self.model_path}: score_thresh {value:g} is below the {self.export_score_thresh:g} "
                              "the model was exported with; re-export with densedet export --score-thresh")
        self.score_thresh = float(value)

    def run(self, batch: np.ndarray, image_sizes: np.ndarray) -> tuple[np.ndarray, ...]:
        """``images [B, 3, H, W]`` float32, ``image_sizes [B, 2]`` float32 → the graph's outputs
        ``(boxes [B, D, 4], scores [B, D], labels [B, D], num_detections [B])``."""
        raise NotImplementedError

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError("images must be a non-empty list of [3, H, W] tensors")
        batch, sizes = preprocess_images(images, self.meta)
        boxes, scores, labels, counts = self.run(batch.numpy(), np.asarray(sizes, np.float32))
        results = []
        for i, image in enumerate(images):
            n = int(counts[i])
            keep = scores[i, :n] > self.score_thresh
            (h, w), (oh, ow) = sizes[i], image.shape[-2:]
            ratio = torch.tensor([ow / w, oh / h, ow / w, oh / h], dtype=torch.float32)
            det_boxes = torch.from_numpy(np.ascontiguousarray(boxes[i, :n][keep])).float()
            if (h, w) != (oh, ow):
                det_boxes = det_boxes * ratio
            results.append({"boxes": det_boxes,
                            "scores": torch.from_numpy(np.ascontiguousarray(scores[i, :n][keep])).float(),
                            "labels": torch.from_numpy(np.ascontiguousarray(labels[i, :n][keep])).long()})
        return results

    def extra_repr(self) -> str:
        return f"{self.backend}: {self.model_path}, precision={self.meta.get('precision', 'fp32')}"

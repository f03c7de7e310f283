"""Prediction on image files, arrays and tensors: :class:`Predictor`.

    predictor = Predictor.from_checkpoint("runs/exp/model_best.pt", tta=FLIP_ONLY, tile_size=1024)
    detections = predictor(["a.jpg", "b.png"])   # per image {"boxes", "scores", "labels"}

Large images (aerial photos, e.g. deepforest's 2299x2472 orchards) are cut into overlapping tiles
that each go through the model at its own input size, so small objects are not resized away; the
boxes are shifted back and merged across tiles (:mod:`densedet.tiling`). Inference runs in fp32 under
``torch.inference_mode`` with channels-last weights; bf16 autocast is used only where the hardware
multiplies bf16 natively (:func:`fast_autocast`). ``backend="onnxruntime"`` or ``"openvino"`` runs an
exported model instead (``densedet export``; :mod:`densedet.deploy`), with the same tiling and
outputs. Drawing the detections: :func:`densedet.visualize.draw_detections`; the ``densedet
predict`` command: :mod:`densedet.commands.predict`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor, nn

from .data.images import rgb_array, load_image
# One definition of "where is bf16 fast" for the whole library (densedet.device), re-exported here.
from .device import cpu_has_fast_bf16, fast_autocast, flush_denormals
from .engine.checkpoint import model_from_checkpoint
from .errors import UsageError
from .tiling import detect_tiled, merge_tiles
from .tta import TTAConfig, tta_inference

__all__ = ["Predictor", "fast_autocast", "cpu_has_fast_bf16", "merge_tiles", "to_image_tensor"]


# -- inputs ---------------------------------------------------------------------------------------

def to_image_tensor(image: Any, index: int = 0) -> Tensor:
    """One image as ``[3, H, W]``: uint8 (0..255) or float (0..1), on the CPU.

    Accepts a file path (decoded by :func:`densedet.data.load_image`, EXIF rotation applied), a
    PIL image, a numpy array ``[H, W]`` / ``[H, W, 1|3|4]`` (uint8, or float in [0, 1]; alpha is
    ignored) or a tensor ``[3, H, W]`` (uint8, or float in [0, 1]).
    """
    if isinstance(image, (str, Path)):
        return load_image(str(image))
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.ascontiguousarray(rgb_array(ImageOps.exif_transpose(image)).transpose(2, 0, 1)))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise ValueError(f"image {index}: numpy array of shape {image.shape}; expected [H, W] or [H, W, 1|3|4]")
        if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
            raise ValueError(f"image {index}: numpy dtype {image.dtype}; expected uint8 or float in [0, 1]")
        image = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[:, :, :3]
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image {index}: tensor of shape {tuple(image.shape)}; expected [3, H, W]")
        if image.dtype != torch.uint8 and not image.is_floating_point():
            raise ValueError(f"image {index}: tensor dtype {image.dtype}; expected uint8 or float in [0, 1]")
        return image.cpu()
    raise TypeError(f"image {index}: unsupported type {type(image).__name__} "
                    "(use a path, PIL image, numpy HWC array or [3, H, W] tensor)")


def _as_model_input(image: Tensor, device: torch.device) -> Tensor:
    image = image.to(device)
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()


# -- tiling ---------------------------------------------------------------------------------------

# -- the predictor --------------------------------------------------------------------------------

class Predictor:
    """Detect objects in images with a trained model.

    Args:
        checkpoint_or_model: a densedet checkpoint path, or a model (it is put in eval mode and moved
            to ``device``; ``score_thresh`` is then set on it).
        device: where to run.
        score_thresh: the model's candidate score threshold (None: the checkpoint's).
        tta: test-time augmentation (:class:`~densedet.tta.TTAConfig`), or None.
        tile_size: > 0: images larger than this on a side are cut into tiles of this size; 0: never;
            None: the tiles the model was trained on (the checkpoint's or exported model's
            ``data.tile_size``), else never.
        tile_overlap: overlap between neighbouring tiles (should exceed the largest object); None:
            the training tiles' (``data.tile_overlap``) with ``tile_size=None``, else 128.
        batch_size: images (or tiles) per forward pass.
        precision: ``auto`` (bf16 only where fast, :func:`fast_autocast`), ``fp32`` or ``bf16``.
        channels_last: store conv weights channels-last (faster convolutions on CPU and GPU).
        backend: ``torch`` (a checkpoint or model), or ``onnxruntime`` / ``openvino`` (then
            ``checkpoint_or_model`` is a file written by ``densedet export``, run on the CPU; TTA is
            not available, and ``score_thresh`` can only raise the exported threshold).
        threads: the exported model's runtime threads (default: ``torch.get_num_threads()``).

    ``predictor(images)``: a list (or one) of paths, PIL images, numpy HWC uint8 arrays or
    ``[3, H, W]`` tensors → per image ``{"boxes": [D, 4] (x1, y1, x2, y2, original pixels),
    "scores": [D], "labels": [D] (0..K-1)}`` on the CPU, by decreasing score.
    """

    def __init__(self, checkpoint_or_model: str | Path | nn.Module, device: str | torch.device = "cpu",
                 score_thresh: float | None = None, tta: TTAConfig | None = None, tile_size: int | None = None,
                 tile_overlap: int | None = None, batch_size: int = 4, precision: str = "auto",
                 channels_last: bool = True, backend: str = "torch", threads: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        flush_denormals()
        self.backend = backend
        trained: dict = {}          # the training config's data section, where the model file carries it
        if backend != "torch":
            model = self._deployed(checkpoint_or_model, device, score_thresh, tta, threads)
            channels_last, precision = False, "fp32"
            trained = (model.meta.get("config") or {}).get("data") or {}
        elif isinstance(checkpoint_or_model, (str, Path)):
            overrides = {} if score_thresh is None else {"score_thresh": float(score_thresh)}
            model, cfg, _ = model_from_checkpoint(checkpoint_or_model, **overrides)
            trained = {"tile_size": cfg.data.tile_size, "tile_overlap": cfg.data.tile_overlap}
        else:
            model = checkpoint_or_model
            if score_thresh is not None:
                model.score_thresh = float(score_thresh)
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        fast_autocast(self.device, precision)  # validates precision now rather than on the first image
        self.precision = precision
        self.tta = tta
        if tile_size is None:
            tile_size = int(trained.get("tile_size") or 0)
            tile_overlap = int(trained.get("tile_overlap") or 0) if tile_overlap is None and tile_size else tile_overlap
        tile_overlap = 128 if tile_overlap is None else tile_overlap
        if tile_size < 0 or (tile_size > 0 and not 0 <= tile_overlap < tile_size):
            # a UsageError (a ValueError) names the command's options too: they reach it unchanged
            raise UsageError(f"tile_overlap (--tile-overlap): need tile_size >= 0 and 0 <= tile_overlap < tile_size "
                             f"(--tile), got tile_size={tile_size}, tile_overlap={tile_overlap}")
        self.tile_size, self.tile_overlap, self.batch_size = int(tile_size), int(tile_overlap), int(batch_size)
        num_classes = int(getattr(model, "num_classes", 0))
        self.class_names = list(getattr(model, "class_names", None) or [str(i) for i in range(num_classes)])
        self.category_ids = getattr(model, "category_ids", None)

    def _deployed(self, path: Any, device: str | torch.device, score_thresh: float | None,
                  tta: TTAConfig | None, threads: int | None) -> nn.Module:
        from .deploy import BACKENDS, DeployError, load_deployed
        if self.backend not in BACKENDS:
            raise DeployError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not isinstance(path, (str, Path)):
            raise DeployError(f"backend {self.backend!r} runs an exported model file (densedet export), "
                              f"not a {type(path).__name__}")
        if torch.device(device).type != "cpu":
            raise DeployError(f"backend {self.backend!r} runs on the CPU, not on {device}")
        if tta is not None:
            raise DeployError(f"test-time augmentation needs the torch backend, not {self.backend!r}")
        model = load_deployed(path, self.backend, threads)
        if score_thresh is not None:
            model.set_score_thresh(float(score_thresh))
        return model

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs: Any) -> "Predictor":
        """A predictor for the model stored in a densedet checkpoint (keyword arguments as the constructor)."""
        return cls(path, **kwargs)

    def detect(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """One forward pass (with TTA if configured) over float ``[3, H, W]`` images on ``self.device``."""
        if self.backend != "torch":
            with torch.inference_mode():
                return self.model(images)
        with torch.inference_mode(), fast_autocast(self.device, self.precision):
            out = tta_inference(self.model, images, self.tta) if self.tta is not None else self.model(images)
        return [{"boxes": d["boxes"].float().cpu(), "scores": d["scores"].float().cpu(), "labels": d["labels"].cpu()}
                for d in out]

    def __call__(self, images: Any) -> list[dict[str, Tensor]]:
        if not isinstance(images, (list, tuple)):
            images = [images]
        tensors = [to_image_tensor(image, i) for i, image in enumerate(images)]
        return detect_tiled(lambda crops: self.detect([_as_model_input(c, self.device) for c in crops]), tensors,
                            self.tile_size, self.tile_overlap, self.batch_size,
                            float(getattr(self.model, "nms_thresh", 0.5)))

"""Export a detector to ONNX, with its post-processing inside the graph.

The exported graph takes what :class:`~densedet.models.preprocess.ImagePreprocessor` produces and
returns final detections, so a deployment needs only onnxruntime (see ``densedet/onnx_runner.py``)::

    inputs   images       [B, 3, H, W] float32, normalised and zero-padded (H, W fixed at export)
             image_sizes  [B, 2] float32, (h, w) of the valid (resized, unpadded) region of each image
    outputs  boxes        [B, D, 4] float32, (x1, y1, x2, y2) in input pixels, clipped to image_sizes
             scores       [B, D] float32, decreasing; 0 in padding slots
             labels       [B, D] int64, 0..K-1; -1 in padding slots
             num_detections [B] int64, the number of valid slots (D = detections_per_img)

The batch dimension is dynamic; height and width are fixed because the anchors are baked in as
constants. Post-processing mirrors the PyTorch model step by step (sigmoid / softmax and box
decoding in fp32, per-level resp. per-class top-k, class-wise NMS, the D best per image); the NMS
is ONNX's ``NonMaxSuppression`` operator, which suppresses at IoU > threshold and keeps scores >
threshold, the same conventions as :func:`densedet.boxes.batched_nms`.

How: the post-processing is an ordinary ``nn.Module`` (:class:`OnnxDetector`) traced by the
TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``, which needs no onnxscript);
NMS is a ``torch.autograd.Function`` whose ``symbolic`` emits ``NonMaxSuppression`` and whose
eager ``forward`` computes the same thing with densedet's exact NMS, so the wrapper can be run and
tested in PyTorch too. A JSON sidecar ``<file>.json`` records what a runner needs (input size,
resize mode, mean/std, class names, thresholds).

Also here: :func:`optimize_for_inference`, the opt-in CPU fast path the benchmark justified
(``densedet bench --suite fast``). The ``densedet export`` command is :mod:`densedet.commands.export`.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .backbones.resnet import FrozenBatchNorm2d
from .boxes import batched_nms
from .models.base import DenseDetector, best_per_image, vote_boxes

__all__ = ["export_onnx", "OnnxDetector", "onnx_nms", "default_export_size", "optimize_for_inference",
           "fuse_conv_bn", "sidecar_path", "SIDECAR_FORMAT"]

SIDECAR_FORMAT = "densedet-onnx-v1"
INPUT_NAMES = ["images", "image_sizes"]
OUTPUT_NAMES = ["boxes", "scores", "labels", "num_detections"]


# ----------------------------------------------------------------------------------------------
# NonMaxSuppression as an exportable op
# ----------------------------------------------------------------------------------------------

class _NonMaxSuppression(torch.autograd.Function):
    """ONNX ``NonMaxSuppression`` (opset ≥ 10), corner boxes, per batch and class.

    ``forward(boxes [B, N, 4], scores [B, C, N]) -> selected [M, 3]`` int64 rows (batch, class, box),
    at most ``max_per_class`` per (batch, class); only scores > ``score_thresh`` take part.
    """

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, max_per_class: int, iou_thresh: float,
                score_thresh: float) -> Tensor:
        b, c, i = torch.nonzero(scores > score_thresh, as_tuple=True)
        num_classes = scores.shape[1]
        group = b * num_classes + c
        keep = batched_nms(boxes[b, i], scores[b, c, i], group, iou_thresh)   # by decreasing score
        # cap per group: rank of each kept box inside its (batch, class) group
        keep = keep[torch.sort(group[keep], stable=True).indices]
        counts = torch.bincount(group[keep], minlength=scores.shape[0] * num_classes)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(keep.numel(), device=boxes.device) - starts[group[keep]]
        keep = keep[rank < max_per_class]
        return torch.stack((b[keep], c[keep], i[keep]), dim=1)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_class: int, iou_thresh: float, score_thresh: float):
        const = lambda v, dtype: g.op("Constant", value_t=torch.tensor([v], dtype=dtype))  # noqa: E731
        return g.op("NonMaxSuppression", boxes, scores, const(max_per_class, torch.int64),
                    const(iou_thresh, torch.float32), const(score_thresh, torch.float32), center_point_box_i=0)


def onnx_nms(boxes: Tensor, scores: Tensor, max_per_class: int, iou_thresh: float, score_thresh: float) -> Tensor:
    """Class-wise NMS with ONNX ``NonMaxSuppression``'s signature; exports as that operator.

    Args:
        boxes: ``[B, N, 4]`` (x1, y1, x2, y2).
        scores: ``[B, C, N]``.
    Returns:
        ``[M, 3]`` int64 (batch, class, box index) of the kept boxes.
    """
    return _NonMaxSuppression.apply(boxes, scores, int(max_per_class), float(iou_thresh), float(score_thresh))


# ----------------------------------------------------------------------------------------------
# The exportable detector
# ----------------------------------------------------------------------------------------------

def default_export_size(model: DenseDetector) -> tuple[int, int]:
    """The model's fixed input size if it has one, else a square of its ``min_size`` padded up to
    ``size_divisible`` (RetinaNet's 800 → 896 with the default divisor 128)."""
    pre = model.preprocessor
    if pre.fixed_size is not None:
        return tuple(int(s) for s in pre.fixed_size)
    d = pre.size_divisible
    side = int(math.ceil(max(pre.min_size) / d) * d)
    return side, side


class OnnxDetector(nn.Module):
    """Network + post-processing on a fixed input size, with dense, padded outputs.

    ``forward(images [B, 3, H, W], image_sizes [B, 2]) -> (boxes [B, D, 4], scores [B, D],
    labels [B, D], num_detections [B])`` — see the module docstring. The model's own
    :meth:`~densedet.models.base.DenseDetector.decode` runs inside the graph; the selection is
    :func:`~densedet.models.base.select_detections` in fixed shapes (ONNX ``NonMaxSuppression``
    per class, then the same :func:`~densedet.models.base.best_per_image`, and the model's box voting
    when it has it, :func:`~densedet.models.base.vote_boxes`).
    """

    def __init__(self, model: DenseDetector, image_size: Sequence[int]) -> None:
        super().__init__()
        self.model = model.eval()
        self.image_size = (int(image_size[0]), int(image_size[1]))
        d = model.preprocessor.size_divisible
        if self.image_size[0] % d or self.image_size[1] % d:
            raise ValueError(f"export size {self.image_size} must be a multiple of the model's "
                             f"size_divisible={d} (the pyramid levels must tile the input exactly)")
        device = next(model.parameters()).device
        with torch.no_grad():
            _, anchors = model.dense_forward(torch.zeros(1, 3, *self.image_size, device=device))
        self.level_sizes = [len(a) for a in anchors]
        self.register_buffer("anchors", torch.cat(anchors).float(), persistent=False)

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        m = self.model
        outputs = m.head_outputs(m.features(m.network_layout(images)))
        candidates = m.decode(outputs, list(self.anchors.split(self.level_sizes)), image_sizes)
        boxes, scores, labels, keep = candidates
        # per-class score planes [B, K, N]: a candidate scores only in its own class's plane
        classes = torch.arange(m.num_classes, device=labels.device).view(1, -1, 1)
        in_plane = (labels.unsqueeze(1) == classes) & keep.unsqueeze(1)
        planes = torch.where(in_plane, scores.unsqueeze(1), torch.full_like(scores, -1.0).unsqueeze(1))
        selected = onnx_nms(boxes, planes, m.detections_per_img, m.nms_thresh, m.score_thresh)
        top_scores, top_idx, valid = best_per_image(selected[:, 0], selected[:, 2], scores, m.detections_per_img)
        top_boxes = torch.gather(boxes, 1, top_idx.unsqueeze(-1).expand(-1, -1, 4))
        top_labels = torch.gather(labels, 1, top_idx)
        if m.box_vote:
            top_boxes = vote_boxes(top_boxes, top_labels, candidates, m.nms_thresh)
        return _padded(_clip(top_boxes, image_sizes), top_scores, top_labels, valid)


def _clip(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """``[B, N, 4]`` clipped to per-image ``(h, w)`` ``[B, 2]`` (same arithmetic as ``clip_boxes``)."""
    h, w = image_sizes[:, 0:1].to(boxes.dtype), image_sizes[:, 1:2].to(boxes.dtype)
    return torch.stack((boxes[..., 0].clamp(min=0).minimum(w), boxes[..., 1].clamp(min=0).minimum(h),
                        boxes[..., 2].clamp(min=0).minimum(w), boxes[..., 3].clamp(min=0).minimum(h)), dim=-1)


def _padded(boxes: Tensor, scores: Tensor, labels: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Zero boxes and scores, label -1, in the slots past each image's detections."""
    boxes = torch.where(valid.unsqueeze(-1), boxes, torch.zeros_like(boxes))
    scores = torch.where(valid, scores, torch.zeros_like(scores))
    labels = torch.where(valid, labels, torch.full_like(labels, -1))
    return boxes, scores, labels, valid.sum(1)


# ----------------------------------------------------------------------------------------------
# export_onnx
# ----------------------------------------------------------------------------------------------

def sidecar_path(onnx_path: str | Path) -> Path:
    """``model.onnx`` → ``model.onnx.json``."""
    return Path(str(onnx_path) + ".json")


def _sidecar(model: DenseDetector, image_size: tuple[int, int], opset: int, class_names: list[str] | None) -> dict:
    pre = model.preprocessor
    fixed = pre.fixed_size is not None
    num_classes = int(model.num_classes)
    names = class_names or getattr(model, "class_names", None) or [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a model with {num_classes} classes")
    return {
        "format": SIDECAR_FORMAT,
        "arch": model.arch,
        "input_size": list(image_size),
        # warp: stretch to exactly (H, W), as fixed_size models do; fit: keep the aspect ratio,
        # scale as the model does (shorter side to min_size, longer side at most max_size), or less
        # where that would not fit inside (H, W), and pad bottom/right with zeros after normalising.
        "resize": "warp" if fixed else "fit",
        "min_size": int(pre.min_size[-1]),
        "max_size": int(pre.max_size),
        # [h, w]: every image is scaled as an h x w image would be (model.scale_as); null: by its own size
        "scale_as": list(pre.scale_as) if pre.scale_as else None,
        "mean": [float(v) for v in pre.mean.flatten()],
        "std": [float(v) for v in pre.std.flatten()],
        "class_names": list(names),
        "score_thresh": float(model.score_thresh),
        "nms_thresh": float(model.nms_thresh),
        "detections_per_img": int(model.detections_per_img),
        "inputs": INPUT_NAMES,
        "outputs": OUTPUT_NAMES,
        "opset": int(opset),
    }


def export_onnx(model: nn.Module, path: str | Path, image_size: Sequence[int] | None = None, batch_size: int = 1,
                opset: int = 17, dynamic_batch: bool = True, class_names: list[str] | None = None,
                sidecar_extra: dict | None = None) -> Path:
    """Write ``model`` (RetinaNet or RefineDet) as an ONNX file with post-processing inside, plus
    the JSON sidecar ``<path>.json``.

    Args:
        model: a densedet detector; exported in eval mode on CPU (the caller's model is not moved).
        path: output ``.onnx`` file.
        image_size: ``(H, W)`` of the padded input; default :func:`default_export_size`.
        batch_size: batch size of the example used for tracing (the batch axis stays dynamic
            unless ``dynamic_batch=False``).
        opset: ONNX opset (≥ 11 for NonMaxSuppression's tie-breaking and TopK semantics).
        class_names: stored in the sidecar; default ``model.class_names`` or "0".."K-1".
        sidecar_extra: more fields for the sidecar (``densedet export`` adds the checkpoint's
            config, so ``densedet eval --backend`` finds the data; see :mod:`densedet.deploy`).

    Returns:
        ``path``. The graph's inputs/outputs are listed in the module docstring.
    """
    if opset < 11:
        raise ValueError(f"opset must be >= 11, got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    size = tuple(int(s) for s in image_size) if image_size is not None else default_export_size(model)
    sidecar = {**_sidecar(model, size, opset, class_names), **(sidecar_extra or {})}
    wrapper = OnnxDetector(model.eval(), size)
    images = torch.zeros(batch_size, 3, *size, device=wrapper.anchors.device)
    sizes = torch.tensor([size] * batch_size, dtype=torch.float32, device=images.device)
    dynamic_axes = {name: {0: "batch"} for name in INPUT_NAMES + OUTPUT_NAMES} if dynamic_batch else None
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")    # the TorchScript exporter's deprecation and tracer notices
            torch.onnx.export(wrapper, (images, sizes), str(path), dynamo=False, opset_version=opset,
                              input_names=INPUT_NAMES, output_names=OUTPUT_NAMES, dynamic_axes=dynamic_axes,
                              do_constant_folding=True)
    finally:
        model.train(was_training)
    sidecar_path(path).write_text(json.dumps(sidecar, indent=2))
    return path


# ----------------------------------------------------------------------------------------------
# Inference fast path (opt-in)
# ----------------------------------------------------------------------------------------------

def _fold(conv: nn.Conv2d, norm: nn.Module) -> None:
    """conv(x)·scale + shift  ==  conv'(x) with W' = W·scale, b' = (b − mean)·scale + beta."""
    eps = float(norm.eps)
    weight = norm.weight if norm.weight is not None else torch.ones_like(norm.running_var)
    bias = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_var)
    scale = weight.detach() * torch.rsqrt(norm.running_var + eps)
    conv_bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(scale)
    conv.weight = nn.Parameter(conv.weight.detach() * scale.view(-1, 1, 1, 1).to(conv.weight.dtype),
                               requires_grad=False)
    conv.bias = nn.Parameter(((conv_bias - norm.running_mean) * scale + bias.detach()).to(conv.weight.dtype),
                             requires_grad=False)


def _is_foldable_norm(module: nn.Module) -> bool:
    if isinstance(module, FrozenBatchNorm2d):
        return True
    return isinstance(module, nn.BatchNorm2d) and not module.training and module.track_running_stats


@torch.no_grad()
def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """Fold each eval-mode BatchNorm / FrozenBatchNorm applied directly to a Conv2d's output into
    that conv (weights and bias), in place, and replace the norm by ``nn.Identity``; returns ``model``.

    Pairs are found structurally: a conv followed by a norm inside an ``nn.Sequential`` (FPN/head
    towers, ResNet ``downsample``), and sibling attributes ``convN`` / ``bnN`` (the ResNet blocks'
    naming, where ``bnN`` only ever sees ``convN``'s output). Inference only: no norm is left to train.
    """
    for parent in list(model.modules()):
        pairs: list[tuple[nn.Conv2d, str]] = []
        if isinstance(parent, nn.Sequential):
            items = list(parent.named_children())
            pairs += [(a, name_b) for (_, a), (name_b, b) in zip(items, items[1:])
                      if isinstance(a, nn.Conv2d) and _is_foldable_norm(b)]
        children = dict(parent.named_children())
        for name, child in children.items():
            if name.startswith("conv") and isinstance(child, nn.Conv2d):
                norm_name = "bn" + name[len("conv"):]
                if norm_name in children and _is_foldable_norm(children[norm_name]):
                    pairs.append((child, norm_name))
        for conv, norm_name in pairs:
            _fold(conv, getattr(parent, norm_name))
            setattr(parent, norm_name, nn.Identity())
    return model


def optimize_for_inference(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The CPU inference fast path that measured worth it: eval mode, conv-BN folding, channels_last.

    Call the result under ``torch.inference_mode()`` (and, where bf16 is native, autocast). On this
    project's 2-core AVX2 machine, 512x512 batch 1 fp32, network only, two interleaved runs with 9
    and 7 repeats (medians; machine shared, load average 3-8): channels_last + inference_mode gave
    1.24-1.41x over fp32 NCHW eager (R18 and R50), folding conv-BN on top 1.23-1.49x (R18) and
    1.43-1.58x (R50). ``torch.jit.trace`` + ``freeze`` (1.29-1.69x) and ``torch.compile``
    (inductor, 1.25-1.66x, plus 10-100 s of compilation) were not reliably better, so they are not
    used (``densedet bench --suite fast`` re-measures all of them).

    Returns a folded copy (the original keeps its norms and can still be trained) unless ``inplace``.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    fuse_conv_bn(model)
    model = model.to(memory_format=torch.channels_last)
    # channels_last weights with an NCHW input make oneDNN reorder at every layer, which costs
    # more than it saves: have the preprocessor hand the network a channels_last batch too
    pre = model.preprocessor
    if not getattr(pre, "_densedet_channels_last", False):
        pre.register_forward_hook(_batch_to_channels_last)
        pre._densedet_channels_last = True
    return model


def _batch_to_channels_last(module: nn.Module, inputs: Any, output: tuple) -> tuple:
    """Forward hook on a preprocessor: ``(batch, sizes, targets)`` with the batch channels_last."""
    return (output[0].contiguous(memory_format=torch.channels_last),) + tuple(output[1:])

"""A convolution and the norm after it, folded into one convolution whenever nothing can learn.

A norm whose statistics and affine are constants — ``FrozenBatchNorm2d`` always, ``BatchNorm2d``
in eval mode — is an affine map per channel, so ``norm(conv(x))`` equals one convolution with
``W' = W·s`` and ``b' = (b − mean)·s + beta``, where ``s = gamma / sqrt(var + eps)``. The trunks call
:func:`conv_norm` for every such pair. With gradients off (``torch.inference_mode()`` /
``torch.no_grad()``) it runs the folded convolution; the folded weights are computed once and
kept until a weight or a statistic changes (each tensor's version counter says when), so
``model.eval()`` then ``model(images)`` is the fast path with no extra call, and training,
``load_state_dict`` or a move to another device or dtype simply refold. With gradients on, it runs
the two modules as written, so training and gradient-based analyses see the usual graph.

The state dict is untouched (the folded weights are a cache, not parameters): checkpoints,
torchvision weights and :func:`densedet.export.fuse_conv_bn` (which folds in place for export) work
as before.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["conv_norm", "ConvNorm", "folded_weights", "is_constant_norm"]


def is_constant_norm(norm: nn.Module) -> bool:
    """Whether ``norm`` is a fixed per-channel affine map: a frozen BatchNorm, or a BatchNorm in
    eval mode that tracks running statistics (a norm class says it is frozen by ``is_constant = True``)."""
    if getattr(norm, "is_constant", False):
        return True
    return (isinstance(norm, nn.BatchNorm2d) and not norm.training and norm.track_running_stats
            and norm.running_mean is not None)


def folded_weights(conv: nn.Conv2d, norm: nn.Module) -> tuple[Tensor, Tensor]:
    """``(W', b')`` of the one convolution equal to ``norm(conv(x))`` (``norm`` constant), in the
    conv weight's dtype; the per-channel scale is computed in fp32."""
    var = norm.running_var.float()
    scale = torch.rsqrt(var + float(norm.eps))
    if norm.weight is not None:
        scale = scale * norm.weight.detach().float()
    beta = norm.bias.detach().float() if norm.bias is not None else torch.zeros_like(scale)
    conv_bias = conv.bias.detach().float() if conv.bias is not None else torch.zeros_like(scale)
    weight = conv.weight.detach().float() * scale.view(-1, 1, 1, 1)
    bias = (conv_bias - norm.running_mean.float()) * scale + beta
    return weight.to(conv.weight.dtype), bias.to(conv.weight.dtype)


def _state_key(conv: nn.Conv2d, norm: nn.Module, memory_format: torch.memory_format) -> tuple | None:
    """What the folded weights depend on: each tensor's identity and version, and the layout.
    ``None`` when a tensor has no version counter (one created under ``inference_mode``)."""
    tensors = [conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var]
    try:
        return (memory_format, float(norm.eps)) + tuple(
            (t.data_ptr(), t._version, t.dtype, t.device) if t is not None else None for t in tensors)
    except RuntimeError:
        return None


def _cached_folded(conv: nn.Conv2d, norm: nn.Module, memory_format: torch.memory_format) -> tuple[Tensor, Tensor]:
    key = _state_key(conv, norm, memory_format)
    cached = conv.__dict__.get("_densedet_folded")
    if key is not None and cached is not None and cached[0] == key:
        return cached[1], cached[2]
    # normal tensors even under inference_mode, so the cache serves no_grad callers as well
    with torch.inference_mode(False), torch.no_grad():
        weight, bias = folded_weights(conv, norm)
        weight = weight.contiguous(memory_format=memory_format)
    if key is not None:
        conv.__dict__["_densedet_folded"] = (key, weight, bias)
    return weight, bias


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(conv(x))``, as one folded convolution when gradients are off and ``norm`` is constant.

    The folded weight takes ``x``'s memory format (channels_last input, channels_last weight), the
    pairing oneDNN runs without reordering."""
    if torch.is_grad_enabled() or not is_constant_norm(norm):
        return norm(conv(x))
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    weight, bias = _cached_folded(conv, norm, memory_format)
    return conv._conv_forward(x, weight, bias)


class ConvNorm(nn.Sequential):
    """``nn.Sequential(conv, norm)`` whose forward is :func:`conv_norm` (ResNet's ``downsample``).
    A Sequential, so its state-dict keys stay ``0.weight``, ``1.running_mean``, …"""

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return conv_norm(self[0], self[1], x)

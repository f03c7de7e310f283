"""Convolution weight gradients as one matrix multiply, for the wide layers of a CPU training step.

On CPU in fp32, oneDNN's weight gradient of a wide convolution (ResNet's 512-channel layer4, its
strided entries) runs far below the machine's matmul rate when the feature map is small — as it
is for the demo's 64-160 px windows, where layer4 maps are 2x2 to 5x5: 54 ms for a 3x3 512->512
convolution over a [50, 512, 2, 2] input against 10 ms for the same product as one GEMM
(``python benchmarks/train_kernels.py``). The weight gradient is

    dW[o, c, i, j] = sum over n, y, x of dY[n, o, y, x] * Xpad[n, c, s*y + i, s*x + j]

i.e. ``dY`` as a (rows, C_out) matrix times the (rows, k*k*C_in) matrix of input patches
(rows = N x H_out x W_out): one GEMM, whose (C_out, k, k, C_in) result is the weight's
channels_last layout already. :class:`GemmGradConv2d` keeps the forward pass and the input
gradient of ``F.conv2d`` and computes only the weight gradient this way;
:func:`use_gemm_weight_grad` switches the convolutions of a model where it pays (measured).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GemmGradConv2d", "use_gemm_weight_grad", "conv2d_weight_grad", "MIN_CHANNEL_PRODUCT"]

# Where the weight gradient as a GEMM wins (benchmarks/train_kernels.py, part 1): from 128 x 256
# channels on (ResNet's layer3 and layer4, FPN's laterals); at 128 x 128 (FPN outputs, head towers)
# it is about even, so those keep oneDNN's.
MIN_CHANNEL_PRODUCT = 128 * 256
_CHUNK_BYTES = 64 << 20  # the patch matrix is built for at most this many bytes' worth of images at a time


def conv2d_weight_grad(x: Tensor, grad_out: Tensor, weight_shape: torch.Size, stride: tuple[int, int],
                       padding: tuple[int, int]) -> Tensor:
    """dL/dW of ``F.conv2d(x, W, stride=stride, padding=padding)`` (groups 1, dilation 1), given dL/dY.

    Returned in channels_last layout (``[C_out, C_in, kh, kw]`` with strides of (C_out, kh, kw, C_in)).
    The patch matrix is built per chunk of images, so it stays within ~64 MB (or one image's) whatever the batch.
    """
    c_out, c_in, kh, kw = weight_shape
    n, _, h_out, w_out = grad_out.shape
    sy, sx = stride
    xh = x.permute(0, 2, 3, 1)                                                                 # NHWC view
    if any(padding):                                                                           # (1x1: no copy)
        xh = F.pad(xh, (0, 0, padding[1], padding[1], padding[0], padding[0]))
    g = grad_out.permute(0, 2, 3, 1)                                                           # N, Ho, Wo, C_out
    patch_bytes_per_image = h_out * w_out * kh * kw * c_in * x.element_size()
    step = max(1, _CHUNK_BYTES // max(patch_bytes_per_image, 1))
    out = None
    for start in range(0, n, step):
        stop = min(n, start + step)
        taps = [xh[start:stop, i:i + sy * (h_out - 1) + 1:sy, j:j + sx * (w_out - 1) + 1:sx, :]
                for i in range(kh) for j in range(kw)]
        patches = torch.cat(taps, dim=3).reshape(-1, kh * kw * c_in)
        part = g[start:stop].reshape(-1, c_out).t() @ patches
        out = part if out is None else out.add_(part)
    return out.view(c_out, kh, kw, c_in).permute(0, 3, 1, 2)


class _GemmGradConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad, x, weight, None, ctx.stride, ctx.padding, (1, 1), False,
                                                         (0, 0), 1, (True, False, False))[0]
        if ctx.needs_input_grad[1]:
            grad_w = conv2d_weight_grad(x, grad, weight.shape, ctx.stride, ctx.padding)
            if grad_w.stride() != weight.stride():     # keep the weight's layout (NCHW, or 1x1 ambiguity)
                grad_w = torch.empty_strided(weight.shape, weight.stride(), dtype=grad_w.dtype).copy_(grad_w)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


class GemmGradConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same parameters, same state dict) whose weight gradient is one GEMM
    (:func:`conv2d_weight_grad`) when it trains in fp32 on CPU; elsewhere (CUDA, autocast, no
    gradient needed) it is exactly ``nn.Conv2d``."""

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type != "cpu" or x.dtype != torch.float32 or not self.weight.requires_grad
                or not torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")):
            return super().forward(x)
        return _GemmGradConv.apply(x, self.weight, self.bias, self.stride, self.padding)


def use_gemm_weight_grad(model: nn.Module, min_channel_product: int = MIN_CHANNEL_PRODUCT) -> int:
    """Make every plain convolution of ``model`` (groups 1, dilation 1, zero padding) with
    ``in_channels x out_channels >= min_channel_product`` a :class:`GemmGradConv2d`, in place (the
    module keeps its parameters and hooks; only its class changes). Returns how many were switched."""
    switched = 0
    for module in model.modules():
        if (type(module) is nn.Conv2d and module.groups == 1 and module.dilation == (1, 1)
                and module.padding_mode == "zeros" and isinstance(module.padding, tuple)
                and module.in_channels * module.out_channels >= min_channel_product):
            module.__class__ = GemmGradConv2d
            switched += 1
    return switched

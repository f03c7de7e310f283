"""Losses for dense detectors.

Focal loss (Lin et al. 2017, eq. 5): FL(p_t) = -α_t (1 - p_t)^γ log(p_t), computed from logits
with ``binary_cross_entropy_with_logits`` for numerical stability. γ = 0 with α = 0.5 is (half)
balanced cross-entropy; α < 0 disables the α weighting.

The normaliser is the number of foreground anchors of the whole batch (all processes together,
see :func:`foreground_normalizer`), as SPEC and the paper ("normalized by the number of anchors
assigned to a ground-truth box") define it; torchvision instead normalises per image and averages,
which weighs an image with 2 objects as much as one with 50.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .boxes import BoxCoder, elementwise_giou

__all__ = ["sigmoid_focal_loss", "focal_loss_sum", "foreground_normalizer", "box_regression_loss", "smooth_l1"]


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise focal loss; ``logits`` and ``targets`` (0/1) of the same shape, computed in fp32 (or fp64)."""
    if logits.dtype != torch.float64:
        logits = logits.float()
    targets = targets.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    loss = ce
    if gamma != 0:
        # 1 - p_t from sigmoid(-x) / sigmoid(x) directly rather than 1 - p_t: no cancellation for easy
        # examples, and the clamp keeps (1 - p_t)^(gamma - 1) finite where p_t rounds to 1 — for
        # gamma < 1 the backward pass would otherwise compute inf * 0 = NaN.
        one_minus_p_t = torch.sigmoid(-logits) * targets + torch.sigmoid(logits) * (1 - targets)
        loss = ce * one_minus_p_t.clamp(min=torch.finfo(logits.dtype).tiny) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


class _FocalLossSum(torch.autograd.Function):
    """Σ focal loss over the valid anchors of ``[B, A, K]`` logits given ``[B, A]`` labels, with
    the gradient computed in the same pass (closed form), so that backward is one multiply.

    With x_t = x for the target class and -x otherwise, p_t = σ(x_t) and q = 1 - p_t = σ(-x_t):
    FL = -α_t q^γ log p_t and dFL/dx = ±α_t q^γ (γ p_t log p_t - q) (+ for the target class).
    ``log p_t`` is ``logsigmoid(x_t)`` and q is ``σ(-x_t)``, never ``1 - p_t``: no cancellation for
    easy examples, and no q^(γ-1) factor, so γ < 1 stays finite where q rounds to 0.
    """

    # Elements per chunk: each chunk's ~10 temporaries stay in the CPU cache instead of streaming
    # [B, A, K] tensors through memory ~20 times. On the 2-core test machine, [8, 49104, 80]
    # forward + backward took 687 / 494 / 380 / 622 / 1005 ms with chunks of 2^14 / 16 / 18 / 22 /
    # (no chunking), against 2.1 s unfused (``densedet.commands.bench.bench_loss`` at batch 8 with each value).
    CHUNK_ELEMENTS = 1 << 18

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, valid: Tensor, alpha: float, gamma: float) -> Tensor:
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        k = logits.shape[-1]
        x_all = logits.reshape(-1, k)
        labels_all, valid_all = labels.reshape(-1), valid.reshape(-1)
        want_grad = ctx.needs_input_grad[0]
        grad_all = torch.empty(x_all.shape, dtype=logits.dtype, device=logits.device) if want_grad else None
        classes = torch.arange(k, device=logits.device)
        rows = max(1, _FocalLossSum.CHUNK_ELEMENTS // k)
        total = torch.zeros((), dtype=dtype, device=logits.device)
        for start in range(0, x_all.shape[0], rows):
            stop = start + rows
            x = x_all[start:stop].to(dtype)
            is_target = labels_all[start:stop, None] == classes                    # bool [n, K]
            neg_x = torch.neg(x)
            log_p_t = F.logsigmoid(torch.where(is_target, x, neg_x))
            q = torch.sigmoid(torch.where(is_target, neg_x, x))
            weight = q * q if gamma == 2.0 else (torch.ones_like(q) if gamma == 0.0 else q.pow(gamma))
            if alpha >= 0:
                weight.mul_(torch.where(is_target, alpha, 1.0 - alpha))
            weight.mul_(valid_all[start:stop, None])
            total -= (weight * log_p_t).sum()
            if want_grad:
                # grad = ±weight · (γ p_t log p_t − q), p_t = 1 − q (bounded: no cancellation here)
                g = torch.rsub(q, 1.0).mul_(log_p_t).mul_(gamma).sub_(q).mul_(weight)
                grad_all[start:stop] = torch.where(is_target, g, torch.neg(g))    # cast to logits' dtype
        if want_grad:
            ctx.save_for_backward(grad_all.view(logits.shape))
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None


def focal_loss_sum(logits: Tensor, labels: Tensor, valid: Tensor | None = None, alpha: float = 0.25,
                   gamma: float = 2.0) -> Tensor:
    """Summed focal loss of ``[B, A, K]`` (or ``[N, K]``) logits against integer ``labels`` of shape
    ``[B, A]`` (a class in 0..K-1, or any negative value for background), over anchors where
    ``valid`` is true (all when None). Equal to ``sigmoid_focal_loss(logits[valid], one_hot[valid]).sum()``
    but in one fused pass: no one-hot target tensor, no gather of the valid anchors, and the
    gradient computed in the forward pass (``densedet bench --suite loss`` compares the two)."""
    if valid is None:
        valid = torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
    return _FocalLossSum.apply(logits, labels, valid, float(alpha), float(gamma))


def foreground_normalizer(num_foreground: Tensor) -> Tensor:
    """Mean number of foreground anchors per process, at least 1.

    With DistributedDataParallel the gradients are averaged over W processes, so dividing each
    process's sum by ``total_fg / W`` gives exactly the gradient of ``sum_all / total_fg`` — the
    loss of one process holding the whole batch.
    """
    n = num_foreground.detach().float()
    if dist.is_available() and dist.is_initialized():
        n = n.clone()
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return n.clamp(min=1.0)


def smooth_l1(input: Tensor, target: Tensor, beta: float) -> Tensor:
    """Element-wise smooth-L1; ``beta = 0`` is exactly L1."""
    if beta < 1e-5:
        return (input - target).abs()
    return F.smooth_l1_loss(input, target, beta=beta, reduction="none")


def box_regression_loss(kind: str, pred_deltas: Tensor, gt_boxes: Tensor, anchors: Tensor,
                        box_coder: BoxCoder, beta: float = 0.0) -> Tensor:
    """Summed box loss over foreground anchors.

    Args:
        kind: ``l1`` (RetinaNet paper/torchvision), ``smooth_l1`` (with ``beta``) or ``giou``
            (on decoded boxes).
        pred_deltas: ``[F, 4]`` predicted deltas of the foreground anchors.
        gt_boxes: ``[F, 4]`` their matched boxes; anchors: ``[F, 4]``.
    """
    if kind == "giou":
        pred_boxes = box_coder.decode(pred_deltas, anchors)
        return (1.0 - elementwise_giou(pred_boxes, gt_boxes.float())).sum()
    target = box_coder.encode(gt_boxes.float(), anchors.float())
    if kind == "l1":
        return (pred_deltas.float() - target).abs().sum()
    if kind == "smooth_l1":
        return smooth_l1(pred_deltas.float(), target, beta).sum()
    raise ValueError(f"unknown box loss {kind!r}; expected l1, smooth_l1 or giou")

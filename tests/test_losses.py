"""Focal loss, its gradient, the foreground normaliser and the box losses, against hand values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from densedet.boxes import BoxCoder
from densedet.losses import box_regression_loss, foreground_normalizer, sigmoid_focal_loss, smooth_l1


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _focal_by_hand(x: float, y: int, alpha: float, gamma: float) -> float:
    """FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t) (Lin et al. 2017, eq. 5), written out in scalars."""
    p = _sigmoid(x)
    p_t = p if y == 1 else 1.0 - p
    alpha_t = 1.0 if alpha < 0 else (alpha if y == 1 else 1.0 - alpha)
    return -alpha_t * (1.0 - p_t) ** gamma * math.log(p_t)


# --- focal loss values -------------------------------------------------------------------------------

def test_focal_loss_at_logit_zero_matches_hand_values():
    # p = 0.5: CE = log 2, (1 - p_t)^2 = 1/4; alpha_t is 0.25 for a positive, 0.75 for a negative.
    loss = sigmoid_focal_loss(torch.zeros(2), torch.tensor([1.0, 0.0]), alpha=0.25, gamma=2.0)
    expected = torch.tensor([0.25 * 0.25 * math.log(2), 0.75 * 0.25 * math.log(2)])
    assert torch.allclose(loss, expected, rtol=1e-6)
    assert torch.allclose(loss, torch.tensor([0.0433217, 0.1299651]), atol=1e-7)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 0.0), (0.75, 1.0), (-1.0, 5.0), (0.25, 0.5)])
def test_focal_loss_matches_scalar_formula_for_mixed_logits_and_targets(alpha, gamma):
    xs = [-6.0, -2.5, -0.3, 0.0, 0.7, 3.0, 8.0]
    ys = [0, 1, 0, 1, 1, 0, 1]
    loss = sigmoid_focal_loss(torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64),
                              alpha=alpha, gamma=gamma)
    expected = torch.tensor([_focal_by_hand(x, y, alpha, gamma) for x, y in zip(xs, ys)], dtype=torch.float64)
    assert torch.allclose(loss.double(), expected, rtol=1e-5, atol=1e-9)


def test_focal_loss_downweights_easy_examples_much_more_than_hard_ones():
    # Paper, section 3.2: with gamma = 2 an example at p_t = 0.9 loses 100x, at p_t ~ 0.968 ~1000x.
    easy_logit = math.log(0.9 / 0.1)                      # p_t = 0.9 for a positive
    fl = sigmoid_focal_loss(torch.tensor([easy_logit]), torch.tensor([1.0]), alpha=-1, gamma=2.0)
    ce = F.binary_cross_entropy_with_logits(torch.tensor([easy_logit]), torch.tensor([1.0]))
    assert (ce / fl).item() == pytest.approx(100.0, rel=1e-4)


def test_focal_loss_with_gamma_zero_and_no_alpha_equals_bce():
    torch.manual_seed(0)
    logits = torch.randn(50, 7) * 4
    targets = (torch.rand(50, 7) > 0.7).float()
    loss = sigmoid_focal_loss(logits, targets, alpha=-1.0, gamma=0.0)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    assert torch.allclose(loss, bce, rtol=1e-6, atol=1e-7)


def test_focal_loss_with_gamma_zero_and_alpha_half_is_half_bce():
    # SPEC: gamma = 0 with alpha = 0.5 is the balanced CE of the ablations (a constant 1/2 factor).
    torch.manual_seed(1)
    logits = torch.randn(30) * 3
    targets = (torch.rand(30) > 0.5).float()
    loss = sigmoid_focal_loss(logits, targets, alpha=0.5, gamma=0.0)
    assert torch.allclose(loss, 0.5 * F.binary_cross_entropy_with_logits(logits, targets, reduction="none"),
                          rtol=1e-6)


def test_focal_loss_is_finite_for_extreme_logits():
    logits = torch.tensor([-200.0, -40.0, 40.0, 200.0])
    for targets in (torch.ones(4), torch.zeros(4)):
        assert torch.isfinite(sigmoid_focal_loss(logits, targets)).all()


# --- focal loss gradient -------------------------------------------------------------------------------

def _closed_form_grad(x: torch.Tensor, y_pm: torch.Tensor, gamma: float) -> torch.Tensor:
    """Seed 001: dFL/dx = y (1 - p_t)^gamma (gamma p_t log(p_t) + p_t - 1), y in {-1, +1}, alpha_t = 1."""
    p = torch.sigmoid(x)
    p_t = torch.where(y_pm > 0, p, 1 - p)
    return y_pm * (1 - p_t) ** gamma * (gamma * p_t * torch.log(p_t) + p_t - 1)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 5.0])
def test_focal_loss_gradient_matches_closed_form_without_alpha(gamma):
    x = torch.linspace(-9, 9, 37, dtype=torch.float64)
    for y01 in (1.0, 0.0):
        targets = torch.full_like(x, y01)
        xr = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(sigmoid_focal_loss(xr, targets, alpha=-1.0, gamma=gamma).sum(), xr)
        expected = _closed_form_grad(x, 2 * targets - 1, gamma)
        assert torch.allclose(grad, expected, rtol=1e-9, atol=1e-14), (gamma, y01)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_loss_gradient_with_alpha_one_weights_only_positives(gamma):
    # alpha = 1: alpha_t is 1 on a positive (the seed's formula) and 1 - alpha = 0 on a negative.
    x = torch.linspace(-6, 6, 25, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(sigmoid_focal_loss(xr, torch.ones_like(x), alpha=1.0, gamma=gamma).sum(), xr)
    assert torch.allclose(grad, _closed_form_grad(x, torch.ones_like(x), gamma), rtol=1e-9, atol=1e-14)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(sigmoid_focal_loss(xr, torch.zeros_like(x), alpha=1.0, gamma=gamma).sum(), xr)
    assert torch.equal(grad, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_loss_gradient_is_finite_for_confident_correct_predictions(dtype, gamma):
    # Easy examples with p_t rounding to 1 (|x| >~ 17 in fp32) are the common case late in training;
    # for gamma < 1 the factor (1 - p_t)^(gamma - 1) is infinite there and must not turn into NaN.
    x = torch.tensor([20.0, 40.0, 120.0, -20.0, -40.0, -120.0], dtype=dtype, requires_grad=True)
    targets = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=dtype)
    (grad,) = torch.autograd.grad(sigmoid_focal_loss(x, targets, alpha=0.25, gamma=gamma).sum(), x)
    assert torch.isfinite(grad).all(), grad
    assert grad.abs().max() < 1e-7          # the true gradient there is vanishingly small


def test_focal_loss_keeps_float64_and_upcasts_half_precision():
    x64 = torch.tensor([0.3], dtype=torch.float64)
    assert sigmoid_focal_loss(x64, torch.ones(1, dtype=torch.float64)).dtype == torch.float64
    x16 = torch.tensor([0.3], dtype=torch.bfloat16)
    assert sigmoid_focal_loss(x16, torch.ones(1)).dtype == torch.float32


# --- normaliser ----------------------------------------------------------------------------------------

def test_foreground_normalizer_is_the_count_clamped_at_one():
    assert foreground_normalizer(torch.tensor(0)).item() == 1.0
    assert foreground_normalizer(torch.tensor(1)).item() == 1.0
    assert foreground_normalizer(torch.tensor(37)).item() == 37.0
    n = foreground_normalizer(torch.tensor(5.0, requires_grad=True))
    assert not n.requires_grad and n.dtype == torch.float32


# --- box losses ----------------------------------------------------------------------------------------

ANCHOR = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
GT = torch.tensor([[1.0, 1.0, 11.0, 11.0]])         # shifted by 1 px: deltas (0.1, 0.1, 0, 0)


def test_box_coder_target_of_the_hand_case():
    assert torch.allclose(BoxCoder().encode(GT, ANCHOR), torch.tensor([[0.1, 0.1, 0.0, 0.0]]), atol=1e-7)


def test_l1_box_loss_hand_case():
    loss = box_regression_loss("l1", torch.zeros(1, 4), GT, ANCHOR, BoxCoder())
    assert loss.item() == pytest.approx(0.2, abs=1e-6)
    pred = torch.tensor([[0.3, -0.1, 0.5, 0.0]])
    loss = box_regression_loss("l1", pred, GT, ANCHOR, BoxCoder())
    assert loss.item() == pytest.approx(0.2 + 0.2 + 0.5 + 0.0, abs=1e-6)


def test_smooth_l1_box_loss_hand_case():
    # |d| = 0.1 < beta = 0.5: 0.5 d^2 / beta = 0.01 per coordinate; |d| = 1.1 >= beta: |d| - beta/2 = 0.85.
    loss = box_regression_loss("smooth_l1", torch.zeros(1, 4), GT, ANCHOR, BoxCoder(), beta=0.5)
    assert loss.item() == pytest.approx(0.02, abs=1e-6)
    pred = torch.tensor([[0.1, 0.1, 1.1, 0.0]])
    loss = box_regression_loss("smooth_l1", pred, GT, ANCHOR, BoxCoder(), beta=0.5)
    assert loss.item() == pytest.approx(0.85, abs=1e-6)


def test_smooth_l1_with_beta_zero_is_l1():
    a, b = torch.tensor([0.3, -2.0, 0.0]), torch.tensor([0.0, 0.5, 0.0])
    assert torch.equal(smooth_l1(a, b, 0.0), (a - b).abs())


def test_giou_box_loss_hand_case():
    # Zero deltas decode to the anchor [0,0,10,10]; with GT [1,1,11,11]: intersection 81, union 119,
    # enclosing box [0,0,11,11] of area 121: GIoU = 81/119 - (121 - 119)/121.
    loss = box_regression_loss("giou", torch.zeros(1, 4), GT, ANCHOR, BoxCoder())
    assert loss.item() == pytest.approx(1 - (81 / 119 - 2 / 121), abs=1e-6)
    # Disjoint prediction: IoU 0, enclosing [0,0,30,10] area 300, union 200 -> GIoU = -1/3.
    pred_anchor = torch.tensor([[20.0, 0.0, 30.0, 10.0]])
    loss = box_regression_loss("giou", torch.zeros(1, 4), ANCHOR, pred_anchor, BoxCoder())
    assert loss.item() == pytest.approx(1 + 1 / 3, abs=1e-6)


def test_box_losses_sum_over_foreground_anchors():
    anchors = ANCHOR.repeat(3, 1)
    gts = GT.repeat(3, 1)
    for kind in ("l1", "smooth_l1", "giou"):
        one = box_regression_loss(kind, torch.zeros(1, 4), GT, ANCHOR, BoxCoder(), beta=0.5)
        three = box_regression_loss(kind, torch.zeros(3, 4), gts, anchors, BoxCoder(), beta=0.5)
        assert three.item() == pytest.approx(3 * one.item(), rel=1e-6)
    empty = box_regression_loss("l1", torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4), BoxCoder())
    assert empty.item() == 0.0


def test_unknown_box_loss_is_named_in_the_error():
    with pytest.raises(ValueError, match="'iou2'"):
        box_regression_loss("iou2", torch.zeros(1, 4), GT, ANCHOR, BoxCoder())


# --- the fused focal loss used in training ----------------------------------------------------------

def _fused_case(dtype, seed=0, b=2, a=300, k=7):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, a, k, generator=g, dtype=torch.float64) * 6).to(dtype)
    logits[0, :5] = torch.tensor([40.0, -40.0, 17.0, -17.0, 0.0], dtype=dtype).unsqueeze(-1)   # saturated
    labels = torch.randint(-1, k, (b, a), generator=g)
    labels[0, :5] = torch.tensor([0, 0, 1, -1, 2])
    valid = torch.rand(b, a, generator=g) > 0.2
    return logits, labels, valid


@pytest.mark.parametrize("gamma,alpha", [(0.0, 0.75), (0.5, 0.5), (1.0, 0.25), (2.0, 0.25), (5.0, 0.25), (2.0, -1.0)])
def test_fused_focal_loss_equals_the_reference_and_its_autograd_gradient(gamma, alpha):
    from densedet.losses import focal_loss_sum
    logits, labels, valid = _fused_case(torch.float64)
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), 7).double() * (labels >= 0).unsqueeze(-1)
    ref_x = logits.clone().requires_grad_(True)
    ref = sigmoid_focal_loss(ref_x[valid], onehot[valid], alpha=alpha, gamma=gamma).sum()
    (ref_grad,) = torch.autograd.grad(ref * 0.37, ref_x)           # a non-unit upstream gradient
    x = logits.clone().requires_grad_(True)
    loss = focal_loss_sum(x, labels, valid, alpha=alpha, gamma=gamma)
    (grad,) = torch.autograd.grad(loss * 0.37, x)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(grad, ref_grad, rtol=1e-9, atol=1e-15)
    assert torch.equal(grad[~valid], torch.zeros_like(grad[~valid]))    # ignored anchors get nothing


def test_fused_focal_loss_in_float32_and_bfloat16_logits():
    from densedet.losses import focal_loss_sum
    logits64, labels, valid = _fused_case(torch.float64, seed=1)
    want = focal_loss_sum(logits64, labels, valid)
    for dtype, rel in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        x = logits64.to(dtype).requires_grad_(True)
        loss = focal_loss_sum(x, labels, valid)
        loss.backward()
        assert loss.dtype == torch.float32 and x.grad.dtype == dtype
        assert torch.isfinite(x.grad).all()
        assert loss.item() == pytest.approx(want.item(), rel=rel)

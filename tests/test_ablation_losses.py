"""The ablation losses against values worked out by hand (logits chosen so that sigmoid is 1/4, 1/2, 3/4, 7/8)."""

import math

import pytest
import torch

from densedet import ablation_losses as AL
from densedet.losses import sigmoid_focal_loss

LN2, LN3 = math.log(2), math.log(3)


def col(*xs):
    return torch.tensor(xs, dtype=torch.float32).view(-1, 1)


# -- balanced CE ---------------------------------------------------------------------------------

def test_balanced_ce_hand_value():
    # element 1: x = ln 3 -> p = 3/4, y = 1: CE = ln(4/3), α_t = α = 0.25
    # element 2: x = 0    -> p = 1/2, y = 0: CE = ln 2,    α_t = 1 - α = 0.75
    logits = torch.tensor([[LN3, 0.0]])
    targets = torch.tensor([[1.0, 0.0]])
    expected = 0.25 * math.log(4 / 3) + 0.75 * LN2
    assert AL.balanced_ce_loss(logits, targets, alpha=0.25).item() == pytest.approx(expected, rel=1e-6)
    # α < 0: plain CE
    assert AL.balanced_ce_loss(logits, targets, alpha=-1).item() == pytest.approx(math.log(4 / 3) + LN2, rel=1e-6)


def test_balanced_ce_is_focal_with_gamma_zero_and_ignores_gamma():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 4, generator=g) * 3
    targets = (torch.rand(50, 4, generator=g) < 0.2).float()
    ref = sigmoid_focal_loss(logits, targets, alpha=0.75, gamma=0.0).sum()
    got = AL.balanced_ce_loss(logits, targets, alpha=0.75, gamma=2.0)   # the model always passes its γ
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


# -- OHEM ----------------------------------------------------------------------------------------

def _ohem_example():
    # K = 1. Foreground rows (y = 1): x = 0 -> CE ln 2; x = ln 3 -> CE ln(4/3).
    # Background rows (y = 0), CE = ln(1 + e^x): x = ln 3 -> ln 4; 0 -> ln 2; -ln 3 -> ln(4/3); ln 7 -> ln 8.
    logits = col(0.0, LN3, LN3, 0.0, -LN3, math.log(7))
    targets = col(1, 1, 0, 0, 0, 0)
    return logits, targets


def test_ohem_with_ratio_hand_value():
    logits, targets = _ohem_example()
    # budget 4, fg_fraction 1/2: hardest 2 fg (ln 2, ln 4/3) + hardest 2 bg (ln 8, ln 4) = ln(256/3)
    got = AL.ohem_loss(logits, targets, batch_size_per_image=4, fg_fraction=0.5)
    assert got.item() == pytest.approx(math.log(256 / 3), rel=1e-6)
    # budget 4, 1:3 (fraction 1/4): 1 fg (ln 2) + 3 bg (ln 8, ln 4, ln 2) = ln 128
    got = AL.ohem_loss(logits, targets, batch_size_per_image=4)
    assert got.item() == pytest.approx(7 * LN2, rel=1e-6)


def test_ohem_without_ratio_takes_highest_losses():
    logits, targets = _ohem_example()
    # top 3 of {ln2, ln4/3 | ln4, ln2, ln4/3, ln8}: ln 8 + ln 4 + ln 2 = ln 64
    got = AL.ohem_topk_loss(logits, targets, batch_size_per_image=3)
    assert got.item() == pytest.approx(6 * LN2, rel=1e-6)


def test_ohem_budget_scales_with_images_and_fills_with_background():
    logits, targets = _ohem_example()
    # 2 per image x 2 images = 4; fg_fraction 1 asks for 4 positives, only 2 exist, background fills the rest
    got = AL.ohem_loss(logits, targets, num_images=2, batch_size_per_image=2, fg_fraction=1.0)
    assert got.item() == pytest.approx(math.log(256 / 3), rel=1e-6)
    # a budget above the anchor count keeps everything: the plain summed CE
    everything = AL.ohem_loss(logits, targets, batch_size_per_image=100, fg_fraction=None)
    assert everything.item() == pytest.approx(AL.balanced_ce_loss(logits, targets, alpha=-1).item(), rel=1e-6)


def test_ohem_sums_classes_per_anchor_and_gradient_reaches_only_kept_rows():
    # row 0: [0, 0] with target [1, 0] -> ln 2 + ln 2; row 1: [-5, -5] background, tiny loss; row 2: [3, 0] bg -> big
    logits = torch.tensor([[0.0, 0.0], [-5.0, -5.0], [3.0, 0.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    loss = AL.ohem_loss(logits, targets, batch_size_per_image=2, fg_fraction=0.5)
    expected = 2 * LN2 + math.log(1 + math.e ** 3) + LN2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad[1] == 0)
    assert torch.all(logits.grad[0] != 0) and torch.all(logits.grad[2] != 0)


def test_ohem_rejects_bad_arguments():
    logits, targets = _ohem_example()
    with pytest.raises(ValueError, match="fg_fraction"):
        AL.ohem_loss(logits, targets, fg_fraction=1.5)
    with pytest.raises(ValueError, match="\\[V, K\\]"):
        AL.ohem_loss(logits.view(-1), targets.view(-1))


# -- GHM-C -------------------------------------------------------------------------------------

def test_ghmc_two_batches_by_hand():
    ghm = AL.GHMC(bins=2, momentum=0.75)
    # batch 1: sigmoid = 1/4, 1/4, 1/4, 3/4 with y = 0 -> g = .25 (bin 0) x3, .75 (bin 1) x1
    # S = counts = [3, 1]; N = 4, occupied bins n = 2: β0 = 4/(3·2) = 2/3, β1 = 4/(1·2) = 2
    # CE: ln(4/3) for x = -ln 3, ln 4 for x = ln 3
    # loss = (3·(2/3)·ln(4/3) + 2·ln 4) / 4 = ln(16/3) / 2
    x1 = col(-LN3, -LN3, -LN3, LN3)
    y = torch.zeros(4, 1)
    assert ghm(x1, y).item() == pytest.approx(math.log(16 / 3) / 2, rel=1e-6)
    # batch 2: counts [1, 3]; S = .75·[3, 1] + .25·[1, 3] = [2.5, 1.5]; β0 = 4/(2.5·2) = .8, β1 = 4/(1.5·2) = 4/3
    # loss = (.8·ln(4/3) + 3·(4/3)·ln 4) / 4 = .2·ln(4/3) + ln 4
    x2 = col(-LN3, LN3, LN3, LN3)
    assert ghm(x2, y).item() == pytest.approx(0.2 * math.log(4 / 3) + math.log(4), rel=1e-6)
    assert ghm.acc_sum.tolist() == pytest.approx([2.5, 1.5])


def test_ghmc_weights_sum_to_element_count_and_g_of_one_is_in_last_bin():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(40, 3, generator=g) * 4
    targets = (torch.rand(40, 3, generator=g) < 0.3).float()
    ghm = AL.GHMC(bins=30, momentum=0.0)
    beta = ghm.weights(logits, targets)
    assert beta.sum().item() == pytest.approx(120.0, rel=1e-5)
    # g = |sigmoid(-100) - 1| = 1 exactly: last bin, alone there -> β = N / (1 · occupied bins)
    logits = torch.tensor([[-100.0], [0.0], [0.0]])
    targets = torch.tensor([[1.0], [0.0], [0.0]])
    beta = AL.GHMC(bins=30, momentum=0.0).weights(logits, targets)
    # g = 1 (bin 29, one element), g = .5 (bin 15, two elements); N = 3, n = 2
    assert beta.flatten().tolist() == pytest.approx([3 / 2, 3 / 4, 3 / 4])


def test_ghmc_loss_scales_by_foreground_rows_and_keeps_no_module_state():
    # momentum 0, x = 0 everywhere: every g = .5, one bin, β = 1: loss = mean CE = ln 2
    logits = torch.zeros(4, 2)
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    got = AL.ghmc_loss(logits, targets, alpha=0.25, gamma=2.0, ghmc=AL.GHMC(momentum=0.0))
    assert got.item() == pytest.approx(2 * LN2, rel=1e-6)       # × 2 foreground rows
    # without an instance, each call weighs its batch alone: a skewed batch does not change the next
    first = AL.ghmc_loss(logits, targets).item()
    AL.ghmc_loss(torch.full((4, 2), 5.0), targets)
    assert AL.ghmc_loss(logits, targets).item() == pytest.approx(first)


def test_each_ghmc_model_owns_its_running_density():
    from densedet.models import build_model
    a = build_model("retinanet_r18_fpn", num_classes=2, cls_loss="ghmc")
    b = build_model("retinanet_r18_fpn", num_classes=2, cls_loss="ghmc")
    assert a.ghmc is not None and a.ghmc is not b.ghmc
    a.classification_loss(torch.zeros(4, 2), torch.eye(2).repeat(2, 1), 1)
    assert a.ghmc.acc_sum is not None and b.ghmc.acc_sum is None


def test_ghmc_weights_carry_no_gradient():
    logits = col(-LN3, LN3).requires_grad_(True)
    targets = torch.zeros(2, 1)
    AL.GHMC(bins=2, momentum=0.0)(logits, targets).backward()
    # each element alone in its bin: β = 2/(1·2) = 1, so the gradient is that of mean BCE: (p - y) / N
    assert logits.grad.flatten().tolist() == pytest.approx([0.25 / 2, 0.75 / 2], rel=1e-6)


def test_losses_are_exported_where_the_model_looks():
    for name in ("balanced_ce", "ohem", "ohem_topk", "ghmc"):
        assert AL.ABLATION_LOSSES[name] is getattr(AL, f"{name}_loss")

"""Classification losses from the focal-loss paper's ablations and its related work.

Selected with ``model.cls_loss=<name>``: the RetinaNet model calls
``densedet.losses.<name>_loss(logits [V, K], targets [V, K], alpha=..., gamma=...)`` on the
non-ignored anchors of the whole batch and divides the result by the batch's foreground-anchor
count (see ``RetinaNet.classification_loss`` and ``losses.foreground_normalizer``). ``V`` is the
number of non-ignored anchors over all images of the batch, ``K`` the number of classes;
``targets`` is one-hot (a background anchor is a row of zeros).

- :func:`balanced_ce_loss`: α-balanced binary cross-entropy (Lin et al. 2017, eq. 3), i.e. the
  focal loss with γ = 0 — Table 1a of the paper.
- :func:`ohem_loss` / :func:`ohem_topk_loss`: online hard example mining as the paper's Table 1d
  baseline ("each example is scored by its loss, non-maximum suppression (nms) is then applied,
  and a minibatch is constructed with the highest-loss examples"; the "OHEM 1:3" variant, from
  SSD, enforces a 1:3 positive:negative ratio). The paper's best OHEM setting was *no* ratio,
  batch size 128, nms 0.5 (32.8 AP against FL's 36.0).
- :func:`ghmc_loss` / :class:`GHMC`: the gradient harmonizing classification loss (Li, Liu and
  Wang, "Gradient Harmonized Single-stage Detector", AAAI 2019).

Every loss is computed in fp32. ``alpha``/``gamma`` are accepted by all of them (the model always
passes them) and ignored where the loss has no such parameter, as each docstring says.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["balanced_ce_loss", "ohem_loss", "ohem_topk_loss", "ghmc_loss", "GHMC", "ABLATION_LOSSES",
           "OHEM_BATCH_SIZE_PER_IMAGE", "OHEM_FG_FRACTION", "GHM_BINS", "GHM_MOMENTUM"]

# Table 1d of Lin et al. 2017 sweeps 128 / 256 / 512 examples per image; 128 was best for both variants.
OHEM_BATCH_SIZE_PER_IMAGE = 128
# "OHEM 1:3": one positive for three negatives, i.e. at most a quarter of the minibatch is foreground.
OHEM_FG_FRACTION = 0.25
# Li et al. 2019, section 4 / their ablation: M = 30 bins and EMA momentum 0.75 for GHM-C.
GHM_BINS = 30
GHM_MOMENTUM = 0.75


def _check_shapes(logits: Tensor, targets: Tensor, name: str) -> None:
    if logits.shape != targets.shape or logits.dim() != 2:
        raise ValueError(f"{name}: logits and targets must both be [V, K]; got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")


# -- α-balanced cross-entropy ------------------------------------------------------------------

def balanced_ce_loss(logits: Tensor, targets: Tensor, alpha: float = 0.75, gamma: float | None = None,
                     num_images: int | None = None) -> Tensor:
    """Summed α-balanced BCE: ``Σ -α_t log(p_t)`` over all ``[V, K]`` elements.

    ``α_t = alpha`` for a target of 1 and ``1 - alpha`` for a 0 (paper eq. 3); ``alpha < 0``
    disables the weighting (plain CE). Equal to ``sigmoid_focal_loss(..., gamma=0).sum()``.
    The paper's best α for CE is 0.75 (Table 1a: 31.1 AP). ``gamma`` and ``num_images`` are
    ignored (the model passes its focal γ; this loss has none).
    """
    _check_shapes(logits, targets, "balanced_ce_loss")
    logits = logits.float()
    targets = targets.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if alpha >= 0:
        ce = (alpha * targets + (1 - alpha) * (1 - targets)) * ce
    return ce.sum()


# -- online hard example mining ------------------------------------------------------------

def _ohem_select(example_loss: Tensor, foreground: Tensor, budget: int, fg_fraction: float | None) -> Tensor:
    """Indices of the examples OHEM keeps: ``example_loss [V]`` (detached), ``foreground [V]`` bool.

    Without a ratio: the ``budget`` highest losses. With ``fg_fraction``: the hardest foreground
    examples up to ``round(budget * fg_fraction)``, and the hardest background examples fill the
    rest of the budget (Fast R-CNN's sampler fills with background the same way).
    """
    budget = min(budget, example_loss.numel())
    if fg_fraction is None:
        return example_loss.topk(budget).indices
    fg_idx = foreground.nonzero().squeeze(1)
    bg_idx = (~foreground).nonzero().squeeze(1)
    num_fg = min(int(round(budget * fg_fraction)), fg_idx.numel())
    num_bg = min(budget - num_fg, bg_idx.numel())
    hardest_fg = fg_idx[example_loss[fg_idx].topk(num_fg).indices]
    hardest_bg = bg_idx[example_loss[bg_idx].topk(num_bg).indices]
    return torch.cat([hardest_fg, hardest_bg])


def ohem_loss(logits: Tensor, targets: Tensor, alpha: float | None = None, gamma: float | None = None,
              num_images: int | None = None, batch_size_per_image: int = OHEM_BATCH_SIZE_PER_IMAGE,
              fg_fraction: float | None = OHEM_FG_FRACTION) -> Tensor:
    """OHEM baseline ("OHEM 1:3" by default): summed BCE of the hardest anchors only.

    Each anchor (a row of ``logits [V, K]``) is scored by its BCE summed over the K classes;
    ``batch_size_per_image * num_images`` anchors are kept — with ``fg_fraction`` (default 1/4,
    the paper's 1:3 positive:negative ratio) the hardest foreground anchors up to that fraction and
    the hardest background anchors for the rest; with ``fg_fraction=None`` simply the highest
    losses (:func:`ohem_topk_loss`, the paper's best variant). The selection carries no gradient;
    the returned value is the *sum* of the kept anchors' (unweighted) BCE, which the model divides
    by the foreground count — with the 1:3 ratio that is about 4x the mean over the minibatch.

    Differences from the paper, forced by the loss signature (logits and targets only):

    - no NMS among examples (the paper's nms 0.5/0.7 needs the anchors' boxes and scores per
      image, which this function does not receive);
    - the minibatch is chosen over the whole batch at once, not image by image, so an image
      with many hard anchors can take more than ``batch_size_per_image``.
    - ``num_images`` should be the batch size; when the caller does not pass it (the current
      ``RetinaNet.classification_loss`` does not) the budget is that of one image.

    ``alpha`` and ``gamma`` are ignored: OHEM balances by selection, with plain CE (paper §5.1).
    """
    _check_shapes(logits, targets, "ohem_loss")
    if batch_size_per_image < 1:
        raise ValueError(f"ohem_loss: batch_size_per_image must be >= 1, got {batch_size_per_image}")
    if fg_fraction is not None and not 0.0 <= fg_fraction <= 1.0:
        raise ValueError(f"ohem_loss: fg_fraction must be in [0, 1] or None, got {fg_fraction}")
    logits = logits.float()
    targets = targets.to(logits.dtype)
    if logits.shape[0] == 0:
        return logits.sum()
    per_anchor = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(dim=1)   # [V]
    foreground = targets.amax(dim=1) > 0
    budget = batch_size_per_image * max(int(num_images or 1), 1)
    keep = _ohem_select(per_anchor.detach(), foreground, budget, fg_fraction)
    return per_anchor[keep].sum()


def ohem_topk_loss(logits: Tensor, targets: Tensor, alpha: float | None = None, gamma: float | None = None,
                   num_images: int | None = None,
                   batch_size_per_image: int = OHEM_BATCH_SIZE_PER_IMAGE) -> Tensor:
    """OHEM without a class ratio: the ``batch_size_per_image * num_images`` highest-loss anchors.

    The paper's best OHEM setting (Table 1d: no 1:3 ratio, batch size 128). See :func:`ohem_loss`.
    """
    return ohem_loss(logits, targets, alpha, gamma, num_images, batch_size_per_image, fg_fraction=None)


# -- gradient harmonizing mechanism ----------------------------------------------------------

class GHMC:
    """GHM-C loss with its running gradient-density estimate (Li et al., AAAI 2019).

    For every element (anchor, class) the gradient norm of BCE w.r.t. the logit is
    ``g = |sigmoid(x) - y|`` ∈ [0, 1]. [0, 1] is split into ``bins`` equal bins (the last one
    closed at 1); ``R_j`` counts the elements in bin j and the paper's EMA keeps
    ``S_j ← m·S_j + (1 - m)·R_j`` over iterations (momentum m; every bin is updated, empty ones
    decay). An element in bin j gets the weight ``β = N / (S_j · n)``, where N is the number of
    elements and n the number of bins that hold at least one element in this batch — so the weights
    of a batch sum to N and the weighted BCE keeps the scale of a mean (the paper writes
    ``N / GD(g)`` with ``GD = S_j · M``; dividing by the occupied bins n instead of all M keeps
    ``Σ β = N`` when some bins are empty, as the authors' code does). The loss is
    ``Σ β·BCE / N``, the weights carrying no gradient.

    State: ``acc_sum [bins]`` (the S_j), filled from the first batch's counts (rather than from
    zero, which would inflate the first iterations' weights by 1 / (1 - m)). One instance serves
    one training run: a RetinaNet with ``cls_loss="ghmc"`` owns one.
    """

    def __init__(self, bins: int = GHM_BINS, momentum: float = GHM_MOMENTUM) -> None:
        if bins < 1:
            raise ValueError(f"GHMC: bins must be >= 1, got {bins}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"GHMC: momentum must be in [0, 1), got {momentum}")
        self.bins = bins
        self.momentum = momentum
        self.acc_sum: Tensor | None = None

    def reset(self) -> None:
        self.acc_sum = None

    def weights(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Per-element weights β ``[V, K]`` (no gradient); updates the running density."""
        with torch.no_grad():
            g = (torch.sigmoid(logits.float()) - targets.float()).abs()
            bin_idx = (g * self.bins).floor().long().clamp_(0, self.bins - 1)   # g = 1 falls in the last bin
            counts = torch.bincount(bin_idx.flatten(), minlength=self.bins).float()
            if self.momentum > 0:
                if self.acc_sum is None:
                    self.acc_sum = counts.clone()
                else:
                    self.acc_sum = self.momentum * self.acc_sum.to(counts.device) + (1 - self.momentum) * counts
                density = self.acc_sum
            else:
                density = counts
            total = float(g.numel())
            occupied = int((counts > 0).sum())
            per_bin = total / (density.clamp(min=1e-12) * max(occupied, 1))
            return per_bin[bin_idx]

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Mean GHM-C loss ``Σ β·BCE / N`` of ``[V, K]`` logits and 0/1 targets."""
        _check_shapes(logits, targets, "GHMC")
        logits = logits.float()
        targets = targets.to(logits.dtype)
        if logits.numel() == 0:
            return logits.sum()
        beta = self.weights(logits, targets)
        ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        return (beta * ce).sum() / logits.numel()


def ghmc_loss(logits: Tensor, targets: Tensor, alpha: float | None = None, gamma: float | None = None,
              num_images: int | None = None, ghmc: GHMC | None = None) -> Tensor:
    """GHM-C for the model's ``[V, K]`` logits/targets, scaled to survive the model's normaliser.

    GHM-C normalises by the number of elements itself (:class:`GHMC`); the model divides the
    returned value by the batch's foreground count F. So this returns ``GHMC(...) · max(F_local, 1)``
    with F_local the foreground rows of ``targets``: on one process the model's division then
    leaves exactly the paper's loss (with several processes, approximately: the model divides by
    the mean foreground count over processes).

    The running density lives in ``ghmc`` (the model's own :class:`GHMC`, bins 30, momentum 0.75);
    without one, a fresh :class:`GHMC` weighs this batch by its own density alone. ``alpha``,
    ``gamma`` and ``num_images`` are ignored.
    """
    loss = (ghmc or GHMC())(logits, targets)
    num_fg = int((targets.amax(dim=1) > 0).sum()) if targets.numel() else 0
    return loss * max(num_fg, 1)


# ``model.cls_loss`` name → loss (the focal loss itself is fused into RetinaNet.losses).
ABLATION_LOSSES = {"balanced_ce": balanced_ce_loss, "ohem": ohem_loss, "ohem_topk": ohem_topk_loss,
                   "ghmc": ghmc_loss}

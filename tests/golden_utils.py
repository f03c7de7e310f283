"""Deterministic weights and detection matching for golden-output tests.

The golden files in ``tests/goldens/`` were recorded with a *different* library
(torchvision, in a throwaway environment) from weights drawn here. Any model whose
``state_dict()`` has the same keys and shapes gets bit-identical weights from
:func:`seeded_state_dict_fill_`, because the draws depend only on the sorted key
names, their shapes and the seed -- never on module types or registration order.
This file depends on torch alone (and numpy, through ``Tensor.numpy``, for hashing)
so that it runs in both environments.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

# The constants below were tuned (tools/record_torchvision_goldens.py prints the
# resulting statistics) so that a *random* ResNet-50 RetinaNet still gives a golden
# output worth comparing: 300 detections per image over ~80 classes, scores spread
# over roughly (0.4, 0.99) with few near-ties, and detections from every level P3-P7.

# Every normalisation weight ~ U(0.5, 1) * NORM_WEIGHT_GAIN; bias and running_mean
# ~ N(0, NORM_BIAS_STD); running_var ~ U(0.5, 1.5). With centred conv weights (below)
# a gain of 1 keeps activations of order 1 through all 16 bottlenecks; the growth is
# geometric in this gain (1.4 already gives activations ~100).
NORM_WEIGHT_GAIN = 1.0
NORM_BIAS_STD = 0.1

# Per-level scale of the FPN output convs (torchvision's key names). The heads are
# shared across levels and P3 has 4x the anchors of P4, so with equal scales P3 owns
# the whole score tail and no detection would come from P4-P7 -- nor test their
# anchors (P7's stride is where torchvision's inferred strides differ most).
LEVEL_GAINS = {
    "backbone.fpn.layer_blocks.1.": 1.5,  # P4
    "backbone.fpn.layer_blocks.2.": 2.5,  # P5 (and through it P6, P7)
    "backbone.fpn.extra_blocks.p7.": 2.0,  # P7
}

# The heads' last convs, relative to He init. Logits: std ~1.6 around
# CLS_LOGITS_BIAS, so ~1 % of (anchor, class) pairs pass the 0.05 threshold and the
# top scores stay below 1 (no ties from saturation). Box deltas: std ~0.07, i.e.
# shifts of a few percent of the anchor size; larger deltas would carry float32
# noise of ~1e-5 * anchor size (P7 anchors are 1148 px) close to the 0.01 px tolerance.
CLS_LOGITS_GAIN = 2.0
CLS_LOGITS_BIAS = -7.0
BBOX_REG_GAIN = 0.1

ShapeSpec = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


def _weight_gain(key: str) -> float:
    """Extra scale of a conv weight, found from its key alone."""
    if ".cls_logits." in key:
        return CLS_LOGITS_GAIN
    if ".bbox_reg." in key:
        return BBOX_REG_GAIN
    for part, gain in LEVEL_GAINS.items():
        if key.startswith(part):
            return gain
    return 1.0


def seeded_state_dict(spec: ShapeSpec, seed: int) -> dict[str, Tensor]:
    """Draw a full state dict from key names and shapes alone.

    Args:
        spec: ``{key: (shape, dtype)}``, e.g. from :func:`state_dict_spec`.
        seed: seed of the CPU ``torch.Generator`` the draws come from.

    Returns:
        ``{key: Tensor}``: floating keys drawn in float32 (then cast to the spec's
        dtype), integer keys (``num_batches_tracked``) zeros. Keys are visited in
        sorted order, each drawing from one shared generator:

        * normalisation groups (a prefix that also has ``running_var``): see
          NORM_WEIGHT_GAIN;
        * tensors of rank >= 2 (conv / linear weights, ``(out, in, *k)``):
          N(0, 1), centred per output channel (each output responds to contrast in
          its input, not to the input's mean level, which otherwise dominates
          deep random features and makes every image look alike), times
          sqrt(2 / fan_in) (He) times :func:`_weight_gain`;
        * other rank-1 tensors (conv biases): N(0, 0.01), except the
          classification head's final bias, set to CLS_LOGITS_BIAS (no draw).
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    keys = sorted(spec)
    key_set = set(keys)
    out: dict[str, Tensor] = {}
    for key in keys:
        shape, dtype = spec[key]
        shape = tuple(shape)
        if not dtype.is_floating_point:
            out[key] = torch.zeros(shape, dtype=dtype)
            continue
        prefix, _, leaf = key.rpartition(".")
        is_norm = f"{prefix}.running_var" in key_set
        if is_norm and leaf == "weight":
            value = (0.5 + 0.5 * torch.rand(shape, generator=generator)) * NORM_WEIGHT_GAIN
        elif is_norm and leaf in ("bias", "running_mean"):
            value = NORM_BIAS_STD * torch.randn(shape, generator=generator)
        elif is_norm and leaf == "running_var":
            value = 0.5 + torch.rand(shape, generator=generator)
        elif len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            value = torch.randn(shape, generator=generator)
            value = value - value.flatten(1).mean(dim=1).reshape((-1,) + (1,) * (len(shape) - 1))
            value = value * (_weight_gain(key) * math.sqrt(2.0 / fan_in))
        elif ".cls_logits." in key and leaf == "bias":
            value = torch.full(shape, CLS_LOGITS_BIAS)
        else:
            value = 0.01 * torch.randn(shape, generator=generator)
        out[key] = value.to(dtype)
    return out


def state_dict_spec(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{key: (shape, dtype)}`` of a model's state dict."""
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def tensor_sha1(tensor: Tensor) -> str:
    """Hex SHA-1 of a CPU tensor's bytes: compares weights across environments."""
    return hashlib.sha1(tensor.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


@torch.no_grad()
def seeded_state_dict_fill_(model: nn.Module, seed: int) -> nn.Module:
    """Overwrite every floating parameter and buffer of ``model`` in place.

    The values are those of :func:`seeded_state_dict` for the model's own keys and
    shapes; integer buffers (``num_batches_tracked``) are left as they are.
    Returns the model for chaining.
    """
    state = model.state_dict()
    drawn = seeded_state_dict(state_dict_spec(model), seed)
    for key, tensor in state.items():
        if tensor.dtype.is_floating_point:
            # state_dict() tensors share storage with the parameters / buffers.
            tensor.copy_(drawn[key])
    return model


# ----------------------------------------------------------------------------- matching


def match_detections(
    ref: Mapping[str, Tensor],
    got: Mapping[str, Tensor],
    score_tol: float = 1e-4,
    box_tol: float = 0.01,
) -> None:
    """Assert that two detection lists of one image are the same up to tolerances.

    Args:
        ref, got: ``{"boxes": (N, 4) xyxy, "scores": (N,), "labels": (N,)}``, each
            sorted by decreasing score (as detectors return them).
        score_tol: max absolute score difference.
        box_tol: max absolute difference of each box coordinate, in pixels.

    First the lists are compared position by position. That fails legitimately
    when two detections have scores closer than the numerical noise of two
    float32 implementations: their order may swap. So if the in-order check
    fails, each reference detection is instead paired with an unused detection of
    ``got`` with the same label, every box coordinate within ``box_tol`` and the
    score within ``score_tol`` (the closest score first) -- i.e. order is only
    free among near-tied scores. Rounding boxes and sorting by (label, box) would
    not do: a box 0.004 px away can round to the other side. Raises
    AssertionError naming the first detection that has no partner.
    """
    n_ref, n_got = len(ref["scores"]), len(got["scores"])
    assert n_got == n_ref, f"detection count differs: expected {n_ref}, got {n_got}"
    if n_ref == 0:
        return
    rb, rs, rl = ref["boxes"].double(), ref["scores"].double(), ref["labels"].long()
    gb, gs, gl = got["boxes"].double(), got["scores"].double(), got["labels"].long()
    assert rb.shape == gb.shape == (n_ref, 4), f"boxes must be (N, 4): {rb.shape}, {gb.shape}"
    # float64 for the differences, so that the tolerances are not blurred by the
    # subtraction's own rounding
    if (
        torch.equal(rl, gl)
        and (rs - gs).abs().max() <= score_tol
        and (rb - gb).abs().max() <= box_tol
    ):
        return
    used = torch.zeros(n_got, dtype=torch.bool)
    for i in range(n_ref):
        score_diff = (gs - rs[i]).abs()
        ok = (
            ~used
            & (gl == rl[i])
            & (score_diff <= score_tol)
            & ((gb - rb[i]).abs().amax(dim=1) <= box_tol)
        )
        if not ok.any():
            _raise_no_partner(i, rb, rs, rl, gb, gs, gl)
        j = int(torch.where(ok, score_diff, torch.inf).argmin())
        used[j] = True


def _raise_no_partner(i: int, rb: Tensor, rs: Tensor, rl: Tensor, gb: Tensor, gs: Tensor, gl: Tensor) -> None:
    """Explain the failure with the nearest same-label detection."""
    same = torch.where(gl == rl[i])[0]
    nearest = "none with that label"
    if len(same):
        j = int(same[(gb[same] - rb[i]).abs().amax(dim=1).argmin()])
        nearest = (
            f"nearest same-label detection #{j}: score {float(gs[j]):.6f} (diff {float(gs[j] - rs[i]):.1e}), "
            f"box {[round(v, 3) for v in gb[j].tolist()]} (max diff {float((gb[j] - rb[i]).abs().max()):.4f} px)"
        )
    raise AssertionError(
        f"reference detection #{i} (label {int(rl[i])}, score {float(rs[i]):.6f}, "
        f"box {[round(v, 3) for v in rb[i].tolist()]}) has no match; {nearest}; "
        f"in-order max score diff {float((rs - gs).abs().max()):.1e}, "
        f"labels equal in order: {torch.equal(rl, gl)}"
    )

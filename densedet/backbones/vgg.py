"""VGG16 as RefineDet (and SSD) uses it: the fc-reduced, fully convolutional trunk plus extras.

Layout (SPEC "RefineDet", reference/refinedet.md §1.1, the authors' Caffe ``VGGNetBody`` with
``reduced=True``):

=========  ==========================================  ======  ========  =====
source     layers                                      stride  channels  norm
=========  ==========================================  ======  ========  =====
conv4_3    conv1_1 … conv4_3 (3x3, ReLU), 2x2/s2 pools   8      512       L2Norm, init 10
conv5_3    pool4, conv5_1 … conv5_3                     16      512       L2Norm, init 8
fc7        pool5 2x2/s2, fc6 3x3 dil 3 → 1024, fc7 1x1  32      1024      –
conv6_2    conv6_1 1x1 → 256, conv6_2 3x3/s2 → 512      64      512       –
=========  ==========================================  ======  ========  =====

pool5 is 2x2/s2 (SSD's is 3x3/s1), which is why fc7 sits at stride 32 here. The conv trunk keeps
torchvision's module indices (``features.0`` = conv1_1 … ``features.28`` = conv5_3), so an ImageNet
VGG16 state dict from torchvision loads after :func:`convert_torchvision_vgg16` subsamples its
fully connected fc6/fc7 into the reduced convolutions, as SSD's ``VGG_ILSVRC_16_layers_fc_reduced``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..serialization import WeightsMismatch, load_tensors

__all__ = ["L2Norm", "VGG16", "convert_torchvision_vgg16", "load_torchvision_vgg16"]

# Convolutions per VGG16 stage (configuration "D" of Simonyan & Zisserman).
_CONVS_PER_STAGE = (2, 2, 3, 3, 3)


class L2Norm(nn.Module):
    """Per-position L2 normalisation over channels with a learnable per-channel scale.

    ``y[b, c, h, w] = weight[c] * x[b, c, h, w] / (||x[b, :, h, w]||_2 + eps)`` (Caffe ``Normalize``
    with ``across_spatial=False, channel_shared=False``). conv4_3 activations are ~10-100x larger
    than the deeper ones; normalising them and learning the scale (init 10 / 8, ParseNet) keeps the
    stride-8 head from dominating early training.

    Args:
        channels: number of input channels.
        scale: initial value of every channel's weight.
        eps: added to the norm so an all-zero position maps to 0, not NaN (Caffe uses 1e-10).
    """

    def __init__(self, channels: int, scale: float, eps: float = 1e-10) -> None:
        super().__init__()
        self.eps = eps
        self.initial_scale = float(scale)
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, self.initial_scale)

    def forward(self, x: Tensor) -> Tensor:
        """``x: [B, C, H, W] -> [B, C, H, W]``, each position's channel vector of norm ``weight``."""
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps
        return x / norm * self.weight.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, scale={self.initial_scale}"


def _caffe_xavier_(conv: nn.Module) -> None:
    """Caffe's ``xavier`` filler: U(±sqrt(3 / fan_in)), bias 0 (not PyTorch's Glorot fan-avg)."""
    nn.init.kaiming_uniform_(conv.weight, nonlinearity="linear")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class VGG16(nn.Module):
    """Fully convolutional VGG16 trunk returning RefineDet's four source levels.

    Args:
        stage_channels: widths of the five conv stages (VGG16: 64, 128, 256, 512, 512). Smaller
            widths give a cheap model for tests; they do not match pretrained weights.
        fc_channels: width of the convolutional fc6 / fc7 (1024 in the reduced VGG16).
        extra_channels: widths of conv6_1 and conv6_2 (256, 512).
        l2norm_scales: initial L2Norm scales of conv4_3 and conv5_3 (10, 8; paper §3 and Caffe).
        fc6_dilation: dilation of the 3x3 fc6 (3: the 7x7 fc6 subsampled every 3rd tap).

    ``forward(x: [B, 3, H, W]) -> [conv4_3 [B, C4, H/8, W/8], conv5_3 [B, C5, H/16, W/16],
    fc7 [B, Cfc, H/32, W/32], conv6_2 [B, C6, H/64, W/64]]`` (the first two L2-normalised);
    ``out_channels`` and ``strides`` list the four levels.

    Parameter names: ``features.{0..28}`` as torchvision's ``vgg16().features`` (conv5_3 is
    ``features.28``), then ``fc6``, ``fc7``, ``conv6_1``, ``conv6_2``, ``conv4_3_norm``,
    ``conv5_3_norm``. Caffe pools with ceil rounding; so do we, though for the multiples of 64
    RefineDet accepts every pooled size is exact anyway.
    """

    def __init__(
        self,
        stage_channels: Sequence[int] = (64, 128, 256, 512, 512),
        fc_channels: int = 1024,
        extra_channels: Sequence[int] = (256, 512),
        l2norm_scales: Sequence[float] = (10.0, 8.0),
        fc6_dilation: int = 3,
    ) -> None:
        super().__init__()
        if len(stage_channels) != 5 or len(extra_channels) != 2 or len(l2norm_scales) != 2:
            raise ValueError(
                "VGG16 needs 5 stage_channels, 2 extra_channels and 2 l2norm_scales, got "
                f"{tuple(stage_channels)}, {tuple(extra_channels)}, {tuple(l2norm_scales)}"
            )
        layers: list[nn.Module] = []
        cin = 3
        for stage, (n_convs, cout) in enumerate(zip(_CONVS_PER_STAGE, stage_channels)):
            if stage > 0:
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            for _ in range(n_convs):
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]
                cin = cout
        # Index bookkeeping: with pools between stages the indices equal torchvision's features.
        self.features = nn.Sequential(*layers)
        self._conv4_3_end = 23  # features[:23] ends with relu4_3 (torchvision index 22)
        self.pool5 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.fc6 = nn.Conv2d(stage_channels[4], fc_channels, 3, padding=fc6_dilation, dilation=fc6_dilation)
        self.fc7 = nn.Conv2d(fc_channels, fc_channels, 1)
        self.conv6_1 = nn.Conv2d(fc_channels, extra_channels[0], 1)
        self.conv6_2 = nn.Conv2d(extra_channels[0], extra_channels[1], 3, stride=2, padding=1)
        self.conv4_3_norm = L2Norm(stage_channels[3], l2norm_scales[0])
        self.conv5_3_norm = L2Norm(stage_channels[4], l2norm_scales[1])
        self.relu = nn.ReLU(inplace=True)
        self.out_channels = [stage_channels[3], stage_channels[4], fc_channels, extra_channels[1]]
        self.strides = [8, 16, 32, 64]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Caffe xavier for every conv (the trunk is overwritten when ImageNet weights load)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _caffe_xavier_(m)
        self.conv4_3_norm.reset_parameters()
        self.conv5_3_norm.reset_parameters()

    def forward(self, x: Tensor) -> list[Tensor]:
        conv4_3 = self.features[: self._conv4_3_end](x)
        conv5_3 = self.features[self._conv4_3_end :](conv4_3)
        fc7 = self.relu(self.fc7(self.relu(self.fc6(self.pool5(conv5_3)))))
        conv6_2 = self.relu(self.conv6_2(self.relu(self.conv6_1(fc7))))
        return [self.conv4_3_norm(conv4_3), self.conv5_3_norm(conv5_3), fc7, conv6_2]


def convert_torchvision_vgg16(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Turn torchvision's ImageNet VGG16 state dict into :class:`VGG16` trunk weights.

    ``features.*`` are copied unchanged. The fully connected fc6 (``classifier.0``, 25088 → 4096,
    i.e. a 7x7 conv over 512 channels) and fc7 (``classifier.3``, 4096 → 4096) are subsampled as
    SSD did for its fc-reduced VGG: fc6 keeps every 4th output channel and every 3rd spatial tap
    (rows/cols 0, 3, 6 of the 7x7 kernel; the dilation-3 conv spans the same 7x7 window), giving
    ``[1024, 512, 3, 3]``; fc7 keeps every 4th output and input, giving ``[1024, 1024, 1, 1]``. The
    classifier ``classifier.6`` is dropped. The new layers (conv6_x, the L2Norm scales) are absent:
    load the result with :func:`load_torchvision_vgg16` (or ``strict=False``).

    Args:
        state_dict: ``features.{i}.weight/bias`` for the 13 convs and ``classifier.{0,3,6}.*``.

    Returns:
        a new dict with ``features.*``, ``fc6.weight [1024, 512, 3, 3]``, ``fc6.bias [1024]``,
        ``fc7.weight [1024, 1024, 1, 1]``, ``fc7.bias [1024]``.
    """
    required = ("classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ValueError(f"not a torchvision VGG16 state dict: missing {missing}")
    fc6_w = state_dict["classifier.0.weight"]
    fc7_w = state_dict["classifier.3.weight"]
    if tuple(fc6_w.shape) != (4096, 512 * 7 * 7) or tuple(fc7_w.shape) != (4096, 4096):
        raise ValueError(
            "not a torchvision VGG16 state dict: classifier.0.weight must be [4096, 25088] and "
            f"classifier.3.weight [4096, 4096], got {tuple(fc6_w.shape)} and {tuple(fc7_w.shape)}"
        )
    out = {k: v.clone() for k, v in state_dict.items() if k.startswith("features.")}
    # torchvision flattens the pool5 output [512, 7, 7] in (c, y, x) order, so a row of the Linear
    # weight reshapes to a 512x7x7 kernel.
    out["fc6.weight"] = fc6_w.view(4096, 512, 7, 7)[::4, :, ::3, ::3].contiguous()
    out["fc6.bias"] = state_dict["classifier.0.bias"][::4].clone()
    out["fc7.weight"] = fc7_w[::4, ::4].contiguous().view(1024, 1024, 1, 1)
    out["fc7.bias"] = state_dict["classifier.3.bias"][::4].clone()
    return out


def load_torchvision_vgg16(model: VGG16, path_or_state: str | Mapping[str, Tensor]) -> None:
    """Load torchvision ImageNet VGG16 weights (a file path or a state dict) into ``model``.

    Every trunk key must match in name and shape; the only keys allowed to stay at their
    initialisation are the layers VGG16 does not have (conv6_1, conv6_2, the L2Norm scales).
    """
    name = path_or_state if isinstance(path_or_state, str) else "state dict"
    state = load_tensors(path_or_state, "weights file") if isinstance(path_or_state, str) else path_or_state
    try:
        converted = convert_torchvision_vgg16(state)
    except ValueError as err:
        raise WeightsMismatch(f"{name}: {err}") from None
    try:
        result = model.load_state_dict(converted, strict=False)
    except RuntimeError as err:  # shape mismatch (e.g. a reduced-width VGG16)
        raise WeightsMismatch(f"{name}: does not fit this VGG16: {err}") from None
    new_layers = ("conv6_1.", "conv6_2.", "conv4_3_norm.", "conv5_3_norm.")
    missing = [k for k in result.missing_keys if not k.startswith(new_layers)]
    if missing or result.unexpected_keys:
        raise WeightsMismatch(f"{name}: not a torchvision VGG16 state dict: missing {missing}, "
                         f"unexpected {result.unexpected_keys}")

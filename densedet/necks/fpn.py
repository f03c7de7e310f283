"""Feature pyramid network (Lin et al. 2017) with RetinaNet's P6/P7.

Module names follow torchvision's ``FeaturePyramidNetwork`` + ``LastLevelP6P7``
(``inner_blocks.i.0``, ``layer_blocks.i.0``, ``extra_blocks.p6/p7``) so the torchvision-compatible
preset loads its checkpoints unchanged.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.resnet import make_norm

__all__ = ["FPN", "LastLevelP6P7", "BackboneWithFPN"]


def _conv_block(cin: int, cout: int, kernel: int, norm: str) -> nn.Sequential:
    # Sequential(conv[, norm]) mirrors torchvision's Conv2dNormActivation key layout (".0.weight").
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=norm == "none")]
    if norm != "none":
        layers.append(make_norm(norm, cout))
    return nn.Sequential(*layers)


class LastLevelP6P7(nn.Module):
    """P6 = 3x3/s2 conv on C5 (paper, detectron2, mmdet) or on P5 (torchvision v1); P7 = 3x3/s2 conv on ReLU(P6).

    With ``with_p7=False`` (a P3-P6 pyramid) no P7 conv exists at all: an unused parameter would
    get no gradient, which DistributedDataParallel refuses.
    """

    def __init__(self, in_channels: int, out_channels: int, use_p5: bool, with_p7: bool = True) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1) if with_p7 else None
        self.use_p5 = use_p5
        for m in (self.p6, self.p7):
            if m is not None:
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, c5: Tensor, p5: Tensor) -> list[Tensor]:
        p6 = self.p6(p5 if self.use_p5 else c5)
        return [p6] if self.p7 is None else [p6, self.p7(F.relu(p6))]


class FPN(nn.Module):
    """Top-down pyramid over backbone features C3..C5, plus optional P6/P7.

    ``forward(features: list[[B, C_i, H_i, W_i]]) -> list[[B, out_channels, H_l, W_l]]`` for
    P3..P5 and then P6, P7 when ``extra_levels`` is 2 (1 gives P6 only, 0 none).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, extra_levels: int = 2,
                 p6_from: str = "c5", norm: str = "none") -> None:
        super().__init__()
        if p6_from not in ("c5", "p5"):
            raise ValueError(f"fpn.p6_from must be 'c5' or 'p5', got {p6_from!r}")
        if extra_levels not in (0, 1, 2):
            raise ValueError(f"extra_levels must be 0, 1 or 2, got {extra_levels}")
        self.inner_blocks = nn.ModuleList(_conv_block(c, out_channels, 1, norm) for c in in_channels)
        self.layer_blocks = nn.ModuleList(_conv_block(out_channels, out_channels, 3, norm) for _ in in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.extra_levels = extra_levels
        self.extra_blocks = None
        if extra_levels:
            in_p6 = out_channels if p6_from == "p5" else in_channels[-1]
            self.extra_blocks = LastLevelP6P7(in_p6, out_channels, use_p5=p6_from == "p5", with_p7=extra_levels == 2)
        self.out_channels = out_channels

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        last = self.inner_blocks[-1](features[-1])
        results = [self.layer_blocks[-1](last)]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.inner_blocks[i](features[i])
            top_down = F.interpolate(last, size=lateral.shape[-2:], mode="nearest")
            last = lateral + top_down
            results.insert(0, self.layer_blocks[i](last))
        if self.extra_blocks is not None:
            extra = self.extra_blocks(features[-1], results[-1])
            results.extend(extra)
        return results


class BackboneWithFPN(nn.Module):
    """``body`` (a trunk returning C3..C5) followed by ``fpn``; key layout as torchvision's."""

    def __init__(self, body: nn.Module, fpn: FPN) -> None:
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.out_channels = fpn.out_channels

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.fpn(self.body(x))

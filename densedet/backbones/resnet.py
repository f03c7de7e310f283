"""ResNet-18/34/50/101 backbones with torchvision's parameter names.

The module tree (``conv1``, ``bn1``, ``layer1`` … ``layer4``, ``downsample.0/1``) mirrors
torchvision's ``ResNet`` exactly, so an ImageNet state-dict file saved from torchvision loads
with ``strict=True`` through :func:`load_torchvision_resnet` (only the classifier ``fc.*`` keys
are dropped, explicitly). Bottleneck blocks put the stride on the 3x3 conv ("ResNet v1.5"), as
torchvision does.

Normalisation follows SPEC: ``"frozen_bn"`` for an ImageNet-pretrained backbone (statistics and
affine fixed, as in the paper / detectron2), ``"bn"`` or ``"gn"`` when training from scratch,
where a frozen identity normalisation leaves the network unable to learn (measured in SPEC).
Every conv-norm pair goes through :func:`~densedet.backbones.folding.conv_norm`: with gradients
off and a constant norm (frozen, or BatchNorm in eval mode) it is one folded convolution.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..serialization import WeightsMismatch, load_tensors
from .folding import ConvNorm, conv_norm

__all__ = [
    "FrozenBatchNorm2d",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "make_norm",
    "load_torchvision_resnet",
]


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters (all four are buffers).

    Key names (``weight``, ``bias``, ``running_mean``, ``running_var``) equal torchvision's
    ``FrozenBatchNorm2d`` so its checkpoints load unchanged. ``eps`` is 1e-5 as torchvision's.
    """

    is_constant = True      # a fixed affine map: folded into the conv before it at inference (folding.py)

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401
        # A BatchNorm2d checkpoint carries num_batches_tracked, which a frozen norm has no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(kind: str, channels: int, eps: float = 1e-5) -> nn.Module:
    """Build a normalisation layer by name: ``frozen_bn``, ``bn``, ``gn`` (32 groups) or ``none``."""
    if kind == "frozen_bn":
        return FrozenBatchNorm2d(channels, eps)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(min(32, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; expected one of frozen_bn, bn, gn, none")


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = conv_norm(self.conv2, self.bn2, out)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 → 3x3 (strided) → 1x1 with expansion 4 (ResNet-50/101, RefineDet's res6)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = self.relu(conv_norm(self.conv2, self.bn2, out))
        out = conv_norm(self.conv3, self.bn3, out)
        return self.relu(out + identity)


_ARCH = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}
_STAGE_NAMES = ("res2", "res3", "res4", "res5")


class ResNet(nn.Module):
    """ResNet trunk returning the requested stage outputs.

    Args:
        depth: 18, 34, 50 or 101.
        norm: ``frozen_bn`` | ``bn`` | ``gn``.
        frozen_stages: 0 trains everything; 1 freezes the stem (conv1/bn1); k >= 2 also freezes
            ``layer1`` … ``layer{k-1}`` (detectron2's ``FREEZE_AT``: 2 = stem + res2, the paper's setting).
        out_features: stage names among ``res2`` … ``res5``.

    ``forward(x: [B, 3, H, W]) -> list[Tensor]`` in ``out_features`` order; ``res{k}`` has stride
    2**k and ``out_channels[i]`` channels.
    """

    def __init__(self, depth: int = 50, norm: str = "frozen_bn", frozen_stages: int = 2,
                 out_features: Sequence[str] = ("res3", "res4", "res5"), norm_eps: float = 1e-5) -> None:
        super().__init__()
        if depth not in _ARCH:
            raise ValueError(f"ResNet depth must be one of {sorted(_ARCH)}, got {depth}")
        unknown = [f for f in out_features if f not in _STAGE_NAMES]
        if unknown:
            raise ValueError(f"unknown ResNet out_features {unknown}; expected names in {_STAGE_NAMES}")
        block, layers = _ARCH[depth]
        self.depth = depth
        self.norm = norm
        self.out_features = tuple(out_features)
        norm_layer = lambda c: make_norm(norm, c, norm_eps) if norm == "frozen_bn" else make_norm(norm, c)  # noqa: E731
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.inplanes = 64
        self.layer1 = self._make_layer(block, 64, layers[0], 1, norm_layer)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, norm_layer)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, norm_layer)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, norm_layer)
        widths = {name: w * block.expansion for name, w in zip(_STAGE_NAMES, (64, 128, 256, 512))}
        self.out_channels = [widths[f] for f in self.out_features]
        self.strides = [2 ** (2 + _STAGE_NAMES.index(f)) for f in self.out_features]
        self._init_weights()
        self.freeze(frozen_stages)

    def _make_layer(self, block, planes: int, blocks: int, stride: int, norm_layer) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = ConvNorm(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                norm_layer(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, norm_layer)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None, norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero-init the last norm of each residual branch: every block starts as an identity,
        # which is what lets a deep net train from scratch at a high learning rate (Goyal et al. 2017).
        if self.norm in ("bn", "gn"):
            for m in self.modules():
                last = getattr(m, "bn3", None) if isinstance(m, Bottleneck) else (
                    getattr(m, "bn2", None) if isinstance(m, BasicBlock) else None)
                if last is not None:
                    nn.init.zeros_(last.weight)

    def freeze(self, frozen_stages: int) -> None:
        """Stop gradients into the stem (``>= 1``) and ``layer1 … layer{k-1}`` (``k >= 2``)."""
        modules = [[self.conv1, self.bn1], [self.layer1], [self.layer2], [self.layer3], [self.layer4]]
        self._frozen = [m for group in modules[:max(0, frozen_stages)] for m in group]
        for m in self._frozen:
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "ResNet":
        super().train(mode)
        # A frozen stage is frozen entirely: its BatchNorm statistics must not drift either.
        for m in getattr(self, "_frozen", []):
            m.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(conv_norm(self.conv1, self.bn1, x)))
        outputs = {}
        for name, layer in zip(_STAGE_NAMES, (self.layer1, self.layer2, self.layer3, self.layer4)):
            x = layer(x)
            outputs[name] = x
            if name == self.out_features[-1]:
                break
        return [outputs[f] for f in self.out_features]


def load_torchvision_resnet(model: ResNet, path: str) -> None:
    """Load a torchvision ImageNet ResNet state-dict file into ``model`` with ``strict=True``.

    The file is read with ``weights_only=True`` (no code from the file runs). Its ``fc.*``
    classifier keys are the only ones dropped; every other key must match name and shape.
    """
    state = load_tensors(path, "weights file")
    if not isinstance(state, dict):
        raise WeightsMismatch(f"{path}: expected a state dict, got {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if isinstance(model.bn1, FrozenBatchNorm2d):
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsMismatch(f"{path}: not a torchvision ResNet-{model.depth} state dict: {err}") from None

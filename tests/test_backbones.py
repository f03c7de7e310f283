"""ResNet backbones: torchvision parameter names and shapes, strict weight loading, freezing, FrozenBN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from densedet.backbones.resnet import FrozenBatchNorm2d, ResNet, load_torchvision_resnet, make_norm
from densedet.errors import DensedetError

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn(prefix: str, c: int) -> dict[str, tuple]:
    return {f"{prefix}.{k}": (() if k == "num_batches_tracked" else (c,)) for k in BN}


def _torchvision_resnet18_shapes() -> dict[str, tuple]:
    """torchvision.models.resnet18().state_dict() without fc, written out from its module tree:
    conv1/bn1, then layer1..layer4 of two BasicBlocks (conv1, bn1, conv2, bn2), with
    downsample.0 (1x1 conv) / downsample.1 (BN) on the first block of layer2..layer4."""
    shapes = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    cin = 64
    for li, c in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):
            p = f"layer{li}.{b}"
            first_in = cin if b == 0 else c
            shapes[f"{p}.conv1.weight"] = (c, first_in, 3, 3)
            shapes.update(_bn(f"{p}.bn1", c))
            shapes[f"{p}.conv2.weight"] = (c, c, 3, 3)
            shapes.update(_bn(f"{p}.bn2", c))
            if b == 0 and li > 1:
                shapes[f"{p}.downsample.0.weight"] = (c, cin, 1, 1)
                shapes.update(_bn(f"{p}.downsample.1", c))
        cin = c
    return shapes


RESNET18_KEYS_HEAD = [
    "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
    "layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.bn1.bias", "layer1.0.bn1.running_mean",
    "layer1.0.bn1.running_var", "layer1.0.bn1.num_batches_tracked", "layer1.0.conv2.weight",
]


def test_resnet18_parameter_names_and_shapes_equal_torchvision():
    model = ResNet(18, norm="bn", frozen_stages=0, out_features=("res3", "res4", "res5"))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = _torchvision_resnet18_shapes()
    assert got == expected
    assert len(got) == 120          # torchvision's resnet18 has 122 entries, fc.weight and fc.bias included
    assert list(got)[: len(RESNET18_KEYS_HEAD)] == RESNET18_KEYS_HEAD     # same order too
    assert "layer4.0.downsample.0.weight" in got and "layer1.0.downsample.0.weight" not in got


def test_resnet50_parameter_names_and_shapes_equal_torchvision():
    model = ResNet(50, norm="bn", frozen_stages=0)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # torchvision's resnet50: 53 convs (49 + 4 downsample), 53 BNs x 5 entries = 318, + fc.* = 320.
    assert len(got) == 318
    blocks = {1: 3, 2: 4, 3: 6, 4: 3}
    cin = 64
    for li, width in zip(range(1, 5), (64, 128, 256, 512)):
        for b in range(blocks[li]):
            p = f"layer{li}.{b}"
            assert got[f"{p}.conv1.weight"] == (width, cin if b == 0 else 4 * width, 1, 1)
            assert got[f"{p}.conv2.weight"] == (width, width, 3, 3)
            assert got[f"{p}.conv3.weight"] == (4 * width, width, 1, 1)
            assert got[f"{p}.bn3.running_var"] == (4 * width,)
        assert got[f"layer{li}.0.downsample.0.weight"] == (4 * width, cin, 1, 1)
        assert f"layer{li}.1.downsample.0.weight" not in got
        cin = 4 * width
    assert model.out_channels == [512, 1024, 2048] and model.strides == [8, 16, 32]


def test_resnet_v1_5_puts_the_stride_on_the_3x3_conv():
    model = ResNet(50, norm="bn", frozen_stages=0)
    assert model.layer2[0].conv1.stride == (1, 1)
    assert model.layer2[0].conv2.stride == (2, 2)


def test_resnet_outputs_have_the_documented_strides_and_channels():
    model = ResNet(18, norm="bn", frozen_stages=0, out_features=("res2", "res3", "res4", "res5")).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 16, 24), (1, 128, 8, 12), (1, 256, 4, 6), (1, 512, 2, 3)]


def _torchvision_style_file(tmp_path, depth: int = 18, extra: dict | None = None, drop: str | None = None,
                            randomise: bool = True):
    src = ResNet(depth, norm="bn", frozen_stages=0)
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.rand(v.shape, generator=gen) + 0.5 if v.is_floating_point() and randomise else v)
             for k, v in src.state_dict().items()}
    width = 512 if depth in (18, 34) else 2048
    state["fc.weight"] = torch.randn(1000, width)
    state["fc.bias"] = torch.randn(1000)
    if extra:
        state.update(extra)
    if drop:
        del state[drop]
    path = tmp_path / f"resnet{depth}.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("norm", ["bn", "frozen_bn"])
def test_load_torchvision_resnet_loads_every_key_and_drops_fc(tmp_path, norm):
    path, state = _torchvision_style_file(tmp_path)
    model = ResNet(18, norm=norm, frozen_stages=0)
    load_torchvision_resnet(model, str(path))
    own = model.state_dict()
    for k, v in own.items():
        assert torch.equal(v, state[k]), k
    assert not any(k.startswith("fc.") for k in own)


def test_load_torchvision_resnet_rejects_the_wrong_depth_with_a_clear_error(tmp_path):
    path, _ = _torchvision_style_file(tmp_path, depth=50, randomise=False)
    with pytest.raises(DensedetError, match=r"resnet50\.pth: not a torchvision ResNet-18 state dict"):
        load_torchvision_resnet(ResNet(18, norm="bn", frozen_stages=0), str(path))   # bad input: exit code 2


def test_load_torchvision_resnet_rejects_missing_and_unexpected_keys(tmp_path):
    path, _ = _torchvision_style_file(tmp_path, drop="layer3.1.conv2.weight", randomise=False)
    with pytest.raises(ValueError, match="layer3.1.conv2.weight"):
        load_torchvision_resnet(ResNet(18, norm="bn", frozen_stages=0), str(path))
    path, _ = _torchvision_style_file(tmp_path, extra={"layer5.0.conv1.weight": torch.zeros(1)}, randomise=False)
    with pytest.raises(ValueError, match="layer5.0.conv1.weight"):
        load_torchvision_resnet(ResNet(18, norm="bn", frozen_stages=0), str(path))


def test_load_torchvision_resnet_rejects_a_non_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="expected a state dict"):
        load_torchvision_resnet(ResNet(18, norm="bn", frozen_stages=0), str(path))


@pytest.mark.parametrize("frozen,first_trainable", [(0, 0), (1, 1), (2, 2), (3, 3), (5, 5)])
def test_frozen_stages_freeze_the_stem_then_the_stages_in_order(frozen, first_trainable):
    model = ResNet(18, norm="bn", frozen_stages=frozen)
    groups = [["conv1.", "bn1."], ["layer1."], ["layer2."], ["layer3."], ["layer4."]]
    for gi, prefixes in enumerate(groups):
        params = [p for n, p in model.named_parameters() if n.startswith(tuple(prefixes))]
        assert params
        want = gi >= first_trainable
        assert all(p.requires_grad == want for p in params), (frozen, gi)


def test_frozen_stem_and_res2_get_no_gradient():
    model = ResNet(18, norm="bn", frozen_stages=2)
    model(torch.randn(2, 3, 64, 64))[-1].sum().backward()
    assert model.conv1.weight.grad is None and model.layer1[0].conv1.weight.grad is None
    assert model.layer2[0].conv1.weight.grad is not None


def test_frozen_batchnorm_equals_batchnorm_in_eval_mode():
    gen = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(8, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(8, generator=gen))
        bn.running_mean.copy_(torch.randn(8, generator=gen))
        bn.running_var.copy_(torch.rand(8, generator=gen) + 0.1)
    bn.eval()
    frozen = FrozenBatchNorm2d(8)
    frozen.load_state_dict(bn.state_dict())          # num_batches_tracked is accepted and dropped
    x = torch.randn(4, 8, 5, 7, generator=gen)
    assert torch.allclose(frozen(x), bn(x), atol=1e-5, rtol=1e-5)
    assert sorted(frozen.state_dict()) == ["bias", "running_mean", "running_var", "weight"]
    assert list(frozen.parameters()) == []


def test_make_norm_names():
    assert isinstance(make_norm("gn", 64), nn.GroupNorm) and make_norm("gn", 64).num_groups == 32
    assert isinstance(make_norm("bn", 4), nn.BatchNorm2d)
    assert isinstance(make_norm("frozen_bn", 4), FrozenBatchNorm2d)
    with pytest.raises(ValueError, match="'ln'"):
        make_norm("ln", 4)
    with pytest.raises(ValueError, match="depth must be one of"):
        ResNet(20)

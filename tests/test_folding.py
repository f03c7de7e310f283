"""Conv + constant norm folded at inference by default (densedet.backbones.folding)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from densedet.backbones.folding import ConvNorm, conv_norm, folded_weights, is_constant_norm
from densedet.backbones.resnet import FrozenBatchNorm2d, ResNet
from densedet.models import build_model


def _random_stats_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial statistics and affine in every norm, so folding has something to get wrong."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
            n = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model


def _conv_bn(norm: nn.Module) -> tuple[nn.Conv2d, nn.Module]:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
    return conv, _random_stats_(norm)


@pytest.mark.parametrize("norm", [FrozenBatchNorm2d(8), nn.BatchNorm2d(8).eval()])
def test_folded_conv_equals_conv_then_norm(norm):
    conv, norm = _conv_bn(norm)
    x = torch.randn(2, 3, 11, 13)
    want = norm(conv(x))
    weight, bias = folded_weights(conv, norm)
    got = nn.functional.conv2d(x, weight, bias, padding=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(conv_norm(conv, norm, x), want, rtol=1e-5, atol=1e-5)


def test_only_constant_norms_fold():
    assert is_constant_norm(FrozenBatchNorm2d(4))
    assert is_constant_norm(nn.BatchNorm2d(4).eval())
    assert not is_constant_norm(nn.BatchNorm2d(4).train())
    assert not is_constant_norm(nn.BatchNorm2d(4, track_running_stats=False).eval())
    assert not is_constant_norm(nn.GroupNorm(2, 4))
    assert not is_constant_norm(nn.Identity())


def test_gradients_on_keep_the_two_modules():
    """With autograd recording, the folded cache is not used and the conv weight gets a gradient."""
    conv, norm = _conv_bn(FrozenBatchNorm2d(8))
    conv_norm(conv, norm, torch.randn(1, 3, 8, 8)).sum().backward()
    assert conv.weight.grad is not None and "_densedet_folded" not in conv.__dict__


def test_the_cache_follows_every_change_of_weights_and_statistics():
    conv, norm = _conv_bn(nn.BatchNorm2d(8).eval())
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        first = conv_norm(conv, norm, x)
        assert "_densedet_folded" in conv.__dict__
        torch.testing.assert_close(conv_norm(conv, norm, x), first)      # served from the cache
        conv.weight.mul_(2)                                              # an optimizer step
        torch.testing.assert_close(conv_norm(conv, norm, x), norm(conv(x)), rtol=1e-5, atol=1e-5)
        norm.running_var.mul_(4)                                         # statistics of a training step
        torch.testing.assert_close(conv_norm(conv, norm, x), norm(conv(x)), rtol=1e-5, atol=1e-5)
        other = copy.deepcopy(conv)
        other.weight.normal_()
        conv.load_state_dict(other.state_dict())                         # new weights loaded
        torch.testing.assert_close(conv_norm(conv, norm, x), norm(conv(x)), rtol=1e-5, atol=1e-5)
    norm.train()                                                         # batch statistics again
    with torch.no_grad():
        torch.testing.assert_close(conv_norm(conv, norm, x), norm(conv(x)))


def test_inference_mode_then_no_grad_share_one_cache():
    conv, norm = _conv_bn(FrozenBatchNorm2d(8))
    x = torch.randn(1, 3, 8, 8)
    with torch.inference_mode():
        a = conv_norm(conv, norm, x)
    with torch.no_grad():
        b = conv_norm(conv, norm, x)
    torch.testing.assert_close(a.clone(), b)


def test_channels_last_input_gets_channels_last_weights():
    conv, norm = _conv_bn(FrozenBatchNorm2d(8))
    x = torch.randn(2, 3, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = conv_norm(conv, norm, x)
        assert conv.__dict__["_densedet_folded"][1].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, norm(conv(x)), rtol=1e-5, atol=1e-5)


def test_state_dict_keys_are_unchanged():
    """ConvNorm is a Sequential: ResNet's downsample keys stay torchvision's."""
    model = ResNet(50, norm="frozen_bn")
    assert isinstance(model.layer2[0].downsample, ConvNorm)
    keys = set(model.state_dict())
    assert {"layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_var"} <= keys
    assert not any("folded" in k for k in keys)


# RefineDet decodes twice (the ARM's offsets, then the ODM's on top, each through an exp), 101 layers
# deep with random statistics: the fp32 rounding that differs between a folded conv and a conv then a
# norm moved its boxes by 0.013 px on an AVX-512 CPU (AMD Zen 4); 0.01 held on the AVX2 and AMX hosts.
BOX_TOLERANCE_PX = {"retinanet_r50_fpn_torchvision": 0.01, "refinedet320_r101": 0.05}


@pytest.mark.parametrize("name", ["retinanet_r50_fpn_torchvision", "refinedet320_r101"])
def test_a_detector_in_eval_mode_gives_the_unfolded_detections(name):
    """The default path (eval + inference_mode, folded) against the same model with every conv-norm
    pair run as two modules (grad mode on): scores within 1e-4, boxes within BOX_TOLERANCE_PX."""
    torch.manual_seed(0)
    model = _random_stats_(build_model(name, num_classes=5, detections_per_img=50)).eval()
    images = [torch.rand(3, 192, 256), torch.rand(3, 160, 160)]
    with torch.inference_mode():
        folded = model(images)
    unfolded = model(images)                                  # autograd on: no folding
    for a, b in zip(folded, unfolded):
        assert len(a["boxes"]) == len(b["boxes"]) > 0
        torch.testing.assert_close(a["scores"], b["scores"].detach(), rtol=0, atol=1e-4)
        torch.testing.assert_close(a["boxes"], b["boxes"].detach(), rtol=0, atol=BOX_TOLERANCE_PX[name])
        assert torch.equal(a["labels"], b["labels"])

"""The GEMM weight gradient equals autograd's through nn.Conv2d; switching a model changes no value."""

import copy

import pytest
import torch
from torch import nn

from densedet.conv_grad import GemmGradConv2d, conv2d_weight_grad, use_gemm_weight_grad


def _grads(conv, x, channels_last):
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.clone().requires_grad_(True)
    y = conv(x)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    return y, x.grad, conv.weight.grad, None if conv.bias is None else conv.bias.grad


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("cin, cout, k, stride, padding, bias, size", [
    (16, 24, 3, 1, 1, False, 5),     # ResNet's 3x3
    (16, 24, 3, 2, 1, False, 7),     # a strided entry, odd map
    (8, 12, 1, 2, 0, False, 6),      # a 1x1 downsample
    (3, 8, 7, 2, 3, True, 11),       # a stem-like 7x7 with a bias
    (6, 10, (3, 1), (2, 1), (1, 0), True, 4),   # non-square kernel, stride and padding
])
def test_gemm_weight_grad_equals_autograd(cin, cout, k, stride, padding, bias, size, channels_last):
    torch.manual_seed(0)
    reference = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias)
    gemm = copy.deepcopy(reference)
    gemm.__class__ = GemmGradConv2d
    x = torch.randn(3, cin, size, size + 1)
    expected, got = _grads(reference, x, channels_last), _grads(gemm, x, channels_last)
    for e, g in zip(expected, got):
        if e is None:
            assert g is None
        else:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    # The weight gradient keeps the weight's layout (AccumulateGrad would otherwise copy it).
    assert got[2].stride() == gemm.weight.stride()


def test_weight_grad_in_chunks_equals_one_chunk(monkeypatch):
    torch.manual_seed(1)
    x, g = torch.randn(5, 4, 6, 6), torch.randn(5, 3, 6, 6)
    whole = conv2d_weight_grad(x, g, torch.Size([3, 4, 3, 3]), (1, 1), (1, 1))
    monkeypatch.setattr("densedet.conv_grad._CHUNK_BYTES", 1)     # one image per chunk
    torch.testing.assert_close(conv2d_weight_grad(x, g, torch.Size([3, 4, 3, 3]), (1, 1), (1, 1)), whole)


def test_use_gemm_weight_grad_switches_only_wide_plain_convolutions():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=2),
                          nn.Conv2d(8, 16, 3, padding=2, dilation=2), nn.Conv2d(8, 16, 1), nn.ReLU())
    state = copy.deepcopy(model.state_dict())
    assert use_gemm_weight_grad(model, min_channel_product=32) == 2
    assert [type(m).__name__ for m in model] == ["GemmGradConv2d", "Conv2d", "Conv2d", "GemmGradConv2d", "ReLU"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_switched_resnet_trains_like_the_original():
    """A ResNet-18 whose layer3 and layer4 are switched: same loss, same gradients (float-sum order aside) for a
    training step, and outside training (no_grad) the plain convolution runs."""
    from densedet.backbones.resnet import ResNet
    torch.manual_seed(0)
    reference = ResNet(18, norm="bn", frozen_stages=0).to(memory_format=torch.channels_last)
    for m in reference.modules():     # undo the zero-init of the blocks' last norm: every conv gets a gradient
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
    switched = copy.deepcopy(reference)
    assert use_gemm_weight_grad(switched) == 10   # layer3 and layer4: 8 3x3 convs + 2 1x1 downsamples
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    losses = [sum(f.square().mean() for f in m(x)) for m in (reference, switched)]
    torch.testing.assert_close(losses[1], losses[0])
    for loss in losses:
        loss.backward()
    for (name, a), (_, b) in zip(reference.named_parameters(), switched.named_parameters()):
        assert a.grad.abs().sum() > 0, name
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(switched(x)[-1], reference(x)[-1])

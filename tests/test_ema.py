"""The weight average (``train.ema_decay``): its arithmetic, and the trainer's use of it
(evaluated and saved weights are the average, ``--resume`` continues it exactly)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from densedet.engine.checkpoint import load_checkpoint
from densedet.engine.ema import ModelEMA
from densedet.engine.trainer import train

pytestmark = pytest.mark.usefixtures("no_plots")


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_average_follows_the_ramped_decay_in_float64():
    """Parameters and BatchNorm statistics move as e <- d e + (1 - d) w, d = min(decay, (1+n)/(10+n)),
    computed independently in float64; the step counter of BatchNorm is copied, not averaged."""
    model = small_model()
    ema = ModelEMA(model, decay=0.9)
    expected = {k: v.double().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    generator = torch.Generator().manual_seed(1)
    for n in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator))
        model.train()
        model(torch.randn(4, 3, generator=generator))          # moves the running statistics
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))
        for k, v in model.state_dict().items():
            if k in expected:
                expected[k] = d * expected[k] + (1 - d) * v.double()
    assert ema.updates == 30
    for k, v in expected.items():
        torch.testing.assert_close(ema.state[k].double(), v, rtol=1e-5, atol=1e-6)
    assert int(ema.state["1.num_batches_tracked"]) == 30
    assert not torch.allclose(ema.state["0.weight"], model[0].weight)


def test_applied_swaps_the_average_in_and_the_own_weights_back():
    model = small_model()
    ema = ModelEMA(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.applied(model):
        assert torch.equal(model[0].weight, ema.state["0.weight"])
        assert not torch.equal(model[0].weight, own["0.weight"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, own[k])


def test_state_round_trip_and_mismatch():
    model = small_model()
    ema = ModelEMA(model, decay=0.99)
    with torch.no_grad():
        model[0].bias.add_(2.0)
    ema.update(model)
    other = ModelEMA(small_model(), decay=0.99)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and torch.equal(other.state["0.bias"], ema.state["0.bias"])
    with pytest.raises(ValueError, match="does not match"):
        ModelEMA(nn.Linear(3, 2), 0.99).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(model, 1.0)


def with_ema(cfg):
    cfg.train.ema_decay = 0.8
    return cfg


def test_trainer_saves_the_average_and_resume_continues_it(tiny_config, stop_training_at, restore_torch_globals):
    """model_final.pt holds the average (last.pt keeps the trained weights beside it), and a run
    stopped during iteration 4 and resumed ends with the same average, bit for bit."""
    straight = with_ema(tiny_config("straight"))
    train(straight, log=lambda msg: None)
    out = Path(straight.train.output_dir)
    final, last = load_checkpoint(out / "model_final.pt"), load_checkpoint(out / "last.pt")
    assert last["ema"]["updates"] == 6
    name = "head.classification_head.cls_logits.weight"
    assert torch.equal(final["model"][name], last["ema"]["state"][name])
    assert not torch.equal(final["model"][name], last["model"][name])

    resumed = with_ema(tiny_config("resumed"))
    stop_training_at(3)
    with pytest.raises(KeyboardInterrupt):
        train(resumed, log=lambda msg: None)
    assert load_checkpoint(Path(resumed.train.output_dir) / "last.pt")["ema"]["updates"] == 2
    stop_training_at(None)
    train(resumed, resume=True, log=lambda msg: None)
    again = load_checkpoint(Path(resumed.train.output_dir) / "model_final.pt")["model"]
    differ = [k for k in again if not torch.equal(again[k], final["model"][k])]
    assert not differ, differ[:5]

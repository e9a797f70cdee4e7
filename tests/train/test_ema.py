"""ModelEMA: the decay ramp, weights and buffers following the model, state round trips."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn as nn

from detector.train.ema import ModelEMA


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.SiLU(), nn.Conv2d(4, 2, 1))


def _perturb(model: nn.Module) -> None:
    """One fake training step: new weights and new BatchNorm statistics."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.train()
    model(torch.randn(2, 3, 8, 8) * 3 + 1)


def test_decay_ramp() -> None:
    ema = ModelEMA(_model(), decay=0.9999, tau=2000.0)
    assert ema.decay_at(0) == 0.0
    assert ema.decay_at(2000) == pytest.approx(0.9999 * (1 - math.exp(-1)))
    assert ema.decay_at(1) == pytest.approx(0.9999 * (1 - math.exp(-1 / 2000)))
    assert ema.decay_at(100_000) == pytest.approx(0.9999, rel=1e-12)
    ramp = [ema.decay_at(n) for n in range(0, 20_000, 500)]
    assert ramp == sorted(ramp)


def test_copy_in_eval_mode_without_grad() -> None:
    model = _model().train()
    ema = ModelEMA(model)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert ema.module[0].weight.data_ptr() != model[0].weight.data_ptr()
    assert torch.equal(ema.module[0].weight, model[0].weight)


def test_update_averages_weights_and_buffers() -> None:
    model = _model()
    ema = ModelEMA(model, decay=0.9, tau=1.0)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    _perturb(model)
    ema.update(model)
    d = 0.9 * (1 - math.exp(-1.0))
    after, current = ema.module.state_dict(), model.state_dict()
    for key, value in after.items():
        if key.endswith("num_batches_tracked"):
            assert value.item() == current[key].item() == 1  # integers are copied
        else:
            torch.testing.assert_close(value, d * before[key] + (1 - d) * current[key])
    assert ema.updates == 1
    assert not torch.equal(after["1.running_mean"], before["1.running_mean"])


def test_ema_of_a_constant_model_is_the_model() -> None:
    model = _model()
    ema = ModelEMA(_model(seed=1), decay=0.99, tau=1.0)  # starts elsewhere, must converge onto the model
    for _ in range(3000):
        ema.update(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ema.module.state_dict()[key], value, rtol=1e-5, atol=1e-5)  # fp32 lerp stalls within ulps
    ema = ModelEMA(model)
    for _ in range(5):
        ema.update(model)
    for key, value in model.state_dict().items():
        assert torch.equal(ema.module.state_dict()[key], value)


def test_wrapped_model_is_unwrapped() -> None:
    model = _model()
    ema = ModelEMA(nn.DataParallel(model), decay=0.5, tau=1e-9)  # tau ~ 0: the decay is 0.5 from the first update
    before = ema.module[0].weight.clone()
    _perturb(model)
    ema.update(nn.DataParallel(model))
    torch.testing.assert_close(ema.module[0].weight, 0.5 * before + 0.5 * model[0].weight)


def test_state_round_trip_through_weights_only() -> None:
    model = _model()
    ema = ModelEMA(model, decay=0.999, tau=10.0)
    for _ in range(7):
        _perturb(model)
        ema.update(model)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    restored = ModelEMA(_model(seed=3), decay=0.5, tau=1.0)
    restored.load_state_dict(state)
    assert (restored.updates, restored.decay, restored.tau) == (7, 0.999, 10.0)
    for key, value in ema.module.state_dict().items():
        assert torch.equal(restored.module.state_dict()[key], value)
    _perturb(model)
    ema.update(model)
    restored.update(model)  # continues exactly where the original is
    for key, value in ema.module.state_dict().items():
        assert torch.equal(restored.module.state_dict()[key], value)


def test_another_architecture_is_refused() -> None:
    ema = ModelEMA(_model())
    with pytest.raises(ValueError, match="differ from the averaged copy"):
        ema.update(nn.Sequential(nn.Conv2d(3, 4, 3)))
    renamed = nn.Sequential()  # the same tensors in the same order under other names: still another model
    for name, module in zip(("stem", "norm", "act", "out"), _model()):
        renamed.add_module(name, module)
    with pytest.raises(ValueError, match="differ from the averaged copy"):
        ema.update(renamed)

"""The convolution floor of `detector bench train`: every convolution call of a training forward, replayed alone at
its own input, forward and backward as the step runs it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detector.models.builder import build_model
from detector.tools.bench import conv_floor
from detector.tools.bench.conv_floor import conv_floor_rate, convolution_calls, convolution_step


@pytest.fixture(scope="module")
def model_and_images() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("yolo-ca-n", nc=3).to(memory_format=torch.channels_last)
    return model, torch.rand(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)


def test_every_convolution_call_is_recorded_with_the_input_it_gets(model_and_images) -> None:
    model, images = model_and_images
    taken: list[tuple[int, ...]] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: taken.append(tuple(args[0].shape)))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    model.train()(images)
    for hook in hooks:
        hook.remove()

    calls = convolution_calls(model, images, None)
    # yolo-ca-n: the stem, the C2f/CA-C2f blocks with their Coordinate Attention's 1x1 convs, the decoupled head
    assert [tuple(x.shape) for _, x in calls] == taken and len(calls) > 80
    assert calls[0][1].shape == images.shape and not calls[0][1].requires_grad  # the image needs no gradient
    assert all(x.requires_grad for _, x in calls[1:])  # every later input is an activation: the step back-propagates it
    assert all(conv.in_channels == x.shape[1] for conv, x in calls)
    assert not any(conv._forward_hooks for conv, _ in calls)  # the recorders are gone


def test_a_step_differentiates_what_training_does_in_the_layout_training_has(model_and_images) -> None:
    model, images = model_and_images
    calls = convolution_calls(model, images, None)
    first, later = calls[0], calls[5]

    grads = convolution_step(*first, None)()
    assert [g.shape for g in grads] == [p.shape for p in first[0].parameters()]  # weights only: no image gradient

    conv, x = later
    grads = convolution_step(conv, x, None)()
    assert [g.shape for g in grads] == [x.shape] + [p.shape for p in conv.parameters()]
    assert grads[0].is_contiguous(memory_format=torch.channels_last)  # the output gradient kept the output's layout
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_a_step_under_bf16_autocast_runs_the_convolution_in_bf16(model_and_images) -> None:
    model, images = model_and_images
    conv, x = convolution_calls(model, images, torch.bfloat16)[3]
    seen: list[torch.dtype] = []
    hook = conv.register_forward_hook(lambda _m, _args, out: seen.append(out.dtype))
    try:
        grads = convolution_step(conv, x, torch.bfloat16)()
    finally:
        hook.remove()
    assert torch.bfloat16 in seen and grads[1].dtype == torch.float32  # fp32 weights get fp32 gradients


def test_the_floor_is_the_batch_over_the_sum_of_each_calls_fastest_time(model_and_images,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    model, images = model_and_images
    ran: list[int] = []

    def fake_fastest(step, *, iters: int, warmup: int, device: torch.device) -> float:
        assert (iters, warmup, device) == (3, 1, images.device)
        ran.append(len(step()))  # each step really runs once
        return 0.002 * len(ran)

    monkeypatch.setattr(conv_floor, "fastest_seconds", fake_fastest)
    rate = conv_floor_rate(model, images, None, iters=3, warmup=1)
    n = len(ran)
    assert n == len(convolution_calls(model, images, None))
    assert rate == pytest.approx(images.shape[0] / (0.002 * n * (n + 1) / 2))

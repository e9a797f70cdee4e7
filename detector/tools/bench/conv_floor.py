"""The convolution floor of a training step: each of a model's convolutions timed alone, forward and backward, at
the input shape, memory format and autocast dtype it gets in training, and the times summed.

A step cannot run faster than its convolutions' kernels; BatchNorm, activations, concatenations, the loss and the
optimizer only add to them. So the floor's images/s bounds what fusing or removing everything else could gain,
and, set against another trainer's rate, says whether a per-FLOP target is within reach of the kernels at all
(docs/performance-notes.md, on an AVX2-only CPU). The kernels are the eager ones, also under `compile=true`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from detector.tools.bench.models import fastest_seconds

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d)


def convolution_calls(model: nn.Module, images: torch.Tensor,
                      dtype: torch.dtype | None) -> list[tuple[nn.Module, torch.Tensor]]:
    """Each convolution call of one training-mode forward of `images` (autocast to `dtype` when set), with its input
    detached; the input keeps `requires_grad` where the step would compute its gradient (all but the image's)."""
    calls: list[tuple[nn.Module, torch.Tensor]] = []

    def record(module: nn.Module, args: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        calls.append((module, args[0].detach().requires_grad_(args[0].requires_grad)))

    hooks = [module.register_forward_hook(record) for module in model.modules() if isinstance(module, CONVOLUTIONS)]
    try:
        with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def convolution_step(conv: nn.Module, x: torch.Tensor,
                     dtype: torch.dtype | None) -> Callable[[], tuple[torch.Tensor, ...]]:
    """One call's forward and backward as training runs them: the output's gradient (random, in the output's dtype
    and memory format) back to the input where it needs one, then the weights and the bias (the step's result)."""
    wrt = [x, *conv.parameters()] if x.requires_grad else list(conv.parameters())

    def forward() -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return conv(x)

    grad_output = torch.randn_like(forward())

    def step() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(forward(), wrt, grad_output)
    return step


def conv_floor_rate(model: nn.Module, images: torch.Tensor, dtype: torch.dtype | None, *, iters: int = 5,
                    warmup: int = 2) -> float:
    """Images/s of the convolutions alone: the sum over calls of each one's fastest of `iters` timed forward +
    backward runs, on `model` in training mode (its weights on `images`' device)."""
    model.train()
    seconds = sum(fastest_seconds(convolution_step(conv, x, dtype), iters=iters, warmup=warmup, device=images.device)
                  for conv, x in convolution_calls(model, images, dtype))
    return images.shape[0] / seconds

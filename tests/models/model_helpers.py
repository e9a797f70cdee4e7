"""What the attention and prior tests share: the check that every parameter of a block learns."""

from __future__ import annotations

import torch
from torch import nn

ROUNDING = 1e-5  # a gradient below this share of the module's largest is rounding (a cancelled one: 1e-7 to 0)


def assert_every_parameter_learns(module: nn.Module, x: torch.Tensor, *, cancelled: frozenset[str] = frozenset()) -> None:
    """One backward of a random-weighted sum of `module(x)`: the input and every parameter get a gradient above
    rounding, on any CPU, except the `cancelled` ones (zero by construction, such as a conv bias that a BatchNorm
    right after it cancels), which must stay below it. A cancelled gradient is exactly zero on some CPUs and 1e-9
    to 1e-7 of the largest on others, so `> 0` alone is the machine's call."""
    x = x.detach().requires_grad_(True)
    y = module(x)
    (y * torch.randn_like(y)).sum().backward()  # random weights: a plain sum zeroes BN-affine grads
    assert x.grad is not None and x.grad.abs().sum() > 0
    grads = {name: p.grad for name, p in module.named_parameters()}
    assert all(g is not None for g in grads.values()), "parameters outside the graph"
    largest = max((g.abs().max() for g in grads.values()), default=torch.tensor(0.0))
    for name, g in grads.items():
        learns = bool(g.abs().max() > ROUNDING * largest)
        assert learns != (name in cancelled), f"{name}: gradient {g.abs().max():.1e} of {largest:.1e}"

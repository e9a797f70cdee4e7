"""Exponential moving average of a model's weights and buffers, with the YOLOv5 decay ramp.

`ema = d * ema + (1 - d) * model` after every optimizer step, with `d = decay * (1 - exp(-updates / tau))`: the
average starts as the model itself (d = 0 at update 0) and its memory grows to ~1 / (1 - decay) steps over a
few `tau` updates, so early training is not dragged back to the random initialization. Floating-point
buffers (BatchNorm running mean/var) are averaged like weights; integer ones (`num_batches_tracked`) are copied.

Why not `torch.optim.swa_utils.AveragedModel(use_buffers=True)` with a ramped `multi_avg_fn`: it rebuilds and
regroups its tensor lists on every update (Python work per tensor), keeps its step count in a tensor that it
compares on the host each update (a device sync on GPU), lerps integer buffers through float arithmetic, and
prefixes its state_dict with `module.` plus `n_averaged`, so a checkpoint's EMA would not load into a plain
model. Here the tensor lists are built once and one `torch._foreach_lerp_` per update does all the work.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn as nn

from detector.runtime.checkpoint import load_model_weights
from detector.runtime.device import unwrap_model


class ModelEMA:
    """An averaged copy of `model` (in eval mode, no gradients) for validation and the saved weights.

    Build it after the model is on its device and in its memory format: the tensor lists are captured once and
    `module.to(...)` replaces buffer tensors.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0) -> None:
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        self.module.requires_grad_(False)
        self.decay = decay
        self.tau = tau
        self.updates = updates
        self._float, self._other = _split_state(self.module)
        self._source: nn.Module | None = None
        self._source_float: list[torch.Tensor] = []
        self._source_other: list[torch.Tensor] = []

    def decay_at(self, updates: int) -> float:
        """The effective decay after `updates` updates: 0 at the start, approaching `decay`."""
        return self.decay * (1.0 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights and buffers in (call after each optimizer step; DDP-wrapped is fine)."""
        model = unwrap_model(model)
        if model is not self._source:
            self._bind(model)
        self.updates += 1
        weight = 1.0 - self.decay_at(self.updates)
        torch._foreach_lerp_(self._float, self._source_float, weight)
        if self._other:
            torch._foreach_copy_(self._other, self._source_other)

    def _bind(self, model: nn.Module) -> None:
        names = [name for name, _ in _named_state(model)]
        expected = [name for name, _ in _named_state(self.module)]
        if names != expected:
            raise ValueError(f"EMA: the model's parameters/buffers differ from the averaged copy ({len(names)} vs {len(expected)} tensors)")
        self._source_float, self._source_other = _split_state(model)
        self._source = model

    def state_dict(self) -> dict[str, Any]:
        """Plain types and tensors: {'module': weights+buffers, 'updates', 'decay', 'tau'}."""
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay, "tau": self.tau}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` (in place, so the captured tensor lists stay valid)."""
        load_model_weights(self.module, state["module"], "EMA state")
        self.updates = int(state["updates"])
        self.decay = float(state["decay"])
        self.tau = float(state["tau"])


def _named_state(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


def _split_state(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(floating-point parameters and buffers, the other buffers), detached, in a fixed order."""
    tensors = [t.detach() for _, t in _named_state(model)]
    return [t for t in tensors if t.is_floating_point()], [t for t in tensors if not t.is_floating_point()]

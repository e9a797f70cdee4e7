"""The optimizer with its three parameter groups, the weight-decay scaling, and the lr/momentum schedule.

Groups (each param group carries its `name`): "decay" = conv/linear weights, with weight decay; "no_decay" =
weights of normalization layers, position embeddings and other 1-D parameters (scales, gates), without decay
(decaying them pulls BN scales and learned embeddings towards zero for no regularization benefit); "bias" = every
bias, without decay and with its own warmup (YOLOv5: the bias lr starts high and falls to the scheduled lr).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _NormBase

from detector.errors import DetectorError

LOGGER = logging.getLogger(__name__)

OPTIMIZERS = ("SGD", "Adam", "AdamW")
GROUP_NAMES = ("decay", "no_decay", "bias")
_NORM_TYPES = (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.LocalResponseNorm)
_POSITION_PREFIXES = ("pos_", "position", "rel_pos")
FUSED_DEVICE_TYPES = ("cpu", "cuda")  # the devices we train on; torch has fused SGD/Adam/AdamW kernels for both


def _skips_decay(module: nn.Module, qualified_name: str, param: nn.Parameter) -> bool:
    """Normalization weights, position embeddings and 1-D parameters get no weight decay.

    A position embedding is recognised by type (nn.Embedding), by a module attribute `no_weight_decay = True`
    (any attention module may set it), or by a name part 'pos', 'pos_*', 'position*' or 'rel_pos*' (pos_h, pos_embed).
    """
    return (
        isinstance(module, (*_NORM_TYPES, nn.Embedding))
        or getattr(module, "no_weight_decay", False) is True
        or any(part == "pos" or part.startswith(_POSITION_PREFIXES) for part in qualified_name.split("."))
        or param.ndim <= 1
    )


def param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Split the model's trainable parameters into the "decay", "no_decay" and "bias" groups (shared ones counted
    once; frozen ones, `requires_grad=False`, left out)."""
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in GROUP_NAMES}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:  # frozen rows stay out of the optimizer
                continue
            seen.add(id(param))
            qualified = f"{module_name}.{name}" if module_name else name
            if name == "bias":
                groups["bias"].append(param)
            elif _skips_decay(module, qualified, param):
                groups["no_decay"].append(param)
            else:
                groups["decay"].append(param)
    return groups


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD (Nesterov), Adam or AdamW (betas = (momentum, 0.999)) over the three groups, in GROUP_NAMES order,
    fused (one kernel over all tensors) where torch has the kernel for the parameters' device.

    `weight_decay` applies to the "decay" group only; pass it through `scaled_weight_decay` first. A fused
    optimizer gives every gradient its parameter's layout before each step (`match_grad_layouts`). Why fused: the
    default on CPU is a Python loop over the tensors; the fused AdamW step of the default model (258 tensors)
    took 9.5 ms against 18.5-26 ms on a 2-core Xeon (Sapphire Rapids).
    """
    choice = {n.lower(): n for n in OPTIMIZERS}.get(str(name).lower())
    if choice is None:
        raise DetectorError(f"optimizer: unknown '{name}'; choose one of {', '.join(OPTIMIZERS)}")
    groups = param_groups(model)
    specs = [
        {"params": groups[group], "name": group, "weight_decay": weight_decay if group == "decay" else 0.0}
        for group in GROUP_NAMES
    ]
    fused = fused_kernels_apply([p for group in groups.values() for p in group])
    if choice == "SGD":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(specs, lr=lr, momentum=momentum, nesterov=True, fused=fused)
    elif choice == "Adam":
        optimizer = torch.optim.Adam(specs, lr=lr, betas=(momentum, 0.999), fused=fused)
    else:
        optimizer = torch.optim.AdamW(specs, lr=lr, betas=(momentum, 0.999), fused=fused)
    if fused:
        optimizer.register_step_pre_hook(_match_grad_layouts_before_step)
    LOGGER.info(
        "optimizer: %s(lr=%g, momentum=%g%s) with %d weights (decay=%g), %d no-decay weights, %d biases",
        choice, lr, momentum, ", fused" if fused else "", len(groups["decay"]), weight_decay, len(groups["no_decay"]),
        len(groups["bias"]),
    )
    return optimizer


def fused_kernels_apply(params: list[nn.Parameter]) -> bool:
    """Whether torch's fused optimizer kernels take these parameters: floating point, all on one device of a
    type we train on that has them (`FUSED_DEVICE_TYPES`)."""
    devices = {p.device for p in params}
    return (len(devices) == 1 and next(iter(devices)).type in FUSED_DEVICE_TYPES
            and all(p.is_floating_point() for p in params))


def match_grad_layouts(params: list[nn.Parameter]) -> int:
    """Give every gradient its parameter's memory layout; returns how many gradients were copied.

    Why: torch's fused CPU kernels pair a parameter's and its gradient's elements in memory order, so a gradient
    laid out otherwise (a channels_last weight whose gradient came back contiguous) gets a wrong update, silently
    (measured: 0.09 off after 5 AdamW steps; CUDA's kernel refuses the step instead). Autograd returns gradients in
    the parameter's layout for every bundled model and attention, so this copies nothing there; a custom op may not.
    """
    copied = 0
    for param in params:
        grad = param.grad
        if grad is None or grad.stride() == param.stride():
            continue
        if any(a != b for n, a, b in zip(param.shape, param.stride(), grad.stride()) if n > 1):  # size-1 dims: any
            param.grad = torch.empty_like(param).copy_(grad)  # empty_like keeps a dense parameter's strides
            copied += 1
    return copied


def _match_grad_layouts_before_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """A fused optimizer's step pre-hook: `match_grad_layouts` over its parameters, whoever calls the step."""
    match_grad_layouts([p for group in optimizer.param_groups for p in group["params"]])


def scaled_weight_decay(weight_decay: float, batch_size: int, accumulate: int, nbs: int = 64) -> float:
    """Weight decay for an optimizer step that sees `batch_size * accumulate` images instead of the nominal `nbs`.

    YOLOv5's rule (`accumulate = max(round(nbs / batch_size), 1)`): the decay per step scales with the images per
    step, so the regularization per image stays the same whatever the batch. `batch_size` is the global batch.
    """
    return weight_decay * batch_size * accumulate / nbs


@dataclass(frozen=True)
class LRSchedule:
    """Per-iteration lr and momentum: a linear warmup, then a per-epoch cosine or linear decay from lr0 to lr0*lrf.

    Warmup (the first `warmup_iters` iterations, counted over epochs): the bias group's lr falls from
    `warmup_bias_lr`, the other groups' rise from 0, towards the epoch's scheduled lr; momentum (SGD) or beta1
    (Adam, AdamW) rises from `warmup_momentum` to `momentum`. The decay factor reaches exactly `lrf` in the last
    epoch (epoch `epochs - 1`). Every value is a pure function of (epoch, iteration in the epoch) and these
    fields, so a resumed run needs no scheduler state: the same epoch gives the same lr.
    """

    lr0: float
    lrf: float
    epochs: int
    iters_per_epoch: int
    warmup_iters: int
    momentum: float
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.1
    cos_lr: bool = True

    def factor(self, epoch: int) -> float:
        """The decay multiplier of lr0 for `epoch`: 1 at epoch 0, `lrf` at the last epoch."""
        progress = min(max(epoch / max(self.epochs - 1, 1), 0.0), 1.0)
        if self.cos_lr:
            return 1.0 + (self.lrf - 1.0) * (1.0 - math.cos(math.pi * progress)) / 2.0
        return 1.0 + (self.lrf - 1.0) * progress

    def lr(self, epoch: int, iteration: int, group: str) -> float:
        """The lr of parameter group `group` ("decay", "no_decay" or "bias") at `iteration` of `epoch`."""
        target = self.lr0 * self.factor(epoch)
        ramp = self._warmup_fraction(epoch, iteration)
        if ramp >= 1.0:
            return target
        start = self.warmup_bias_lr if group == "bias" else 0.0
        return start + (target - start) * ramp

    def momentum_at(self, epoch: int, iteration: int) -> float:
        """SGD momentum / Adam beta1 at `iteration` of `epoch`."""
        ramp = self._warmup_fraction(epoch, iteration)
        return self.warmup_momentum + (self.momentum - self.warmup_momentum) * min(ramp, 1.0)

    def _warmup_fraction(self, epoch: int, iteration: int) -> float:
        if self.warmup_iters <= 0:
            return 1.0
        return (epoch * self.iters_per_epoch + iteration) / self.warmup_iters

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int, iteration: int) -> None:
        """Write this iteration's lr and momentum (or beta1) into every param group of `optimizer`."""
        momentum = self.momentum_at(epoch, iteration)
        for group in optimizer.param_groups:
            group["lr"] = self.lr(epoch, iteration, group.get("name", "decay"))
            if "betas" in group:
                group["betas"] = (momentum, group["betas"][1])
            elif "momentum" in group:
                group["momentum"] = momentum

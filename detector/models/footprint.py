"""The memory a model asks for, known before it is allocated, so an absurd YAML row fails in one line.

Three checks, cheapest first:
- row bounds at parse time: at most `MAX_REPEATS` repeats after the depth multiple and `MAX_CHANNELS` output
  channels after the width multiple (the largest published YOLO rows use 12 and 1,280);
- a row whose channel product (times its largest other int arg squared: a kernel size, nc) is large is first
  built on the `meta` device (shapes, no storage) and its parameters counted, and every built row is counted
  too; the running total must leave training room (`TRAIN_BYTES_PER_PARAM`: fp32 weight, gradient, momentum
  and EMA copy) in this machine's memory;
- at train time, `check_training_fits` scales the activations the builder's dry run measured per row to the
  training image size and batch.
Each refusal states the estimate, the machine's memory and the row that asks for the most.
"""

from __future__ import annotations

import math

from collections.abc import Callable

import torch
from torch import nn

from detector import memory
from detector.errors import DetectorError
from detector.memory import gib

MAX_REPEATS = 100
MAX_CHANNELS = 16_384
META_CHECK_ELEMENTS = 2**20  # `row_elements` above which a row is sized on `meta` before it is built
TRAIN_BYTES_PER_PARAM = 16
TRAIN_BYTES_PER_ACTIVATION = 4  # fp32 outputs kept for backward (autocast halves some: this is the bound)


def check_row_bounds(where: str, repeats: int, c_out: int | None) -> None:
    """Refuse repeats or channels no real model uses, before anything is constructed."""
    if repeats > MAX_REPEATS:
        raise DetectorError(f"{where}: {repeats:,} repeats (after depth_multiple) is over the limit of {MAX_REPEATS}")
    if c_out is not None and c_out > MAX_CHANNELS:
        raise DetectorError(f"{where}: {c_out:,} output channels (after width_multiple) is over the limit of "
                            f"{MAX_CHANNELS:,}")


def row_elements(c_in: int, c_out: int | None, copies: int, args: list) -> int:
    """The size a row is judged by before it is built: c_in x c_out x copies, times the square of its largest
    other number arg, since a kernel size (`Conv, [64, 300]`), a class count (`Detect, [nc]`) or an expansion
    (`C2f, [32, False, 1, 10000.0]`) multiplies the parameters as much as the channels do."""
    numbers = [abs(a) for a in args if isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a)]
    return int(c_in * (c_out or 1) * copies * max([1, *numbers]) ** 2)


def sized_construct(where: str, construct: Callable[[], nn.Module], elements: int, params_so_far: int) -> nn.Module:
    """`construct()`, after sizing it on `meta` when `elements` (`row_elements`) is large, so that a row
    of 10^9 channels is refused without allocating it (the builder checks every built row with `check_params`)."""
    if elements > META_CHECK_ELEMENTS:
        with torch.device("meta"):
            params = sum(p.numel() for p in construct().parameters())
        check_params(where, params_so_far + params, params)
    return construct()


def check_params(where: str, total: int, row: int) -> None:
    """Refuse a model of `total` parameters (`row` of them in the row at `where`) that would not train here."""
    need, have = total * TRAIN_BYTES_PER_PARAM, memory.machine_memory_bytes()
    if need > have:
        raise DetectorError(f"{where}: the model would have {total:,} parameters ({row:,} in this row), about "
                            f"{gib(need)} to train, more than this machine's {gib(have)}")


def activation_counter(model: nn.Module, row_of: Callable[[], int], counts: list[int]) -> list:
    """Forward hooks adding every leaf module's output elements to `counts[row_of()]`; returns the handles."""

    def count(module: nn.Module, inputs: tuple, output: object) -> None:
        if isinstance(output, torch.Tensor):
            counts[row_of()] += output.numel()

    return [m.register_forward_hook(count) for m in model.modules() if not any(True for _ in m.children())]


def check_training_fits(model: nn.Module, *, imgsz: int, batch: int, source: str) -> None:
    """Refuse a training run whose weights and kept activations exceed this machine's memory.

    `model.probe_activations` are the leaf-output elements per row of the builder's dry run on one
    `model.probe_px` image; they scale with the pixel count and the batch."""
    per_row = getattr(model, "probe_activations", None)
    if not per_row:
        return
    scale = batch * (imgsz / model.probe_px) ** 2
    params = sum(p.numel() for p in model.parameters())
    need = params * TRAIN_BYTES_PER_PARAM + sum(per_row) * scale * TRAIN_BYTES_PER_ACTIVATION
    have = memory.machine_memory_bytes()
    if need > have:
        worst = max(range(len(per_row)), key=per_row.__getitem__)
        row = model.layer_info[worst]
        raise DetectorError(f"{source}: training at imgsz={imgsz}, batch={batch} needs about {gib(need)} "
                            f"(weights, gradients and kept activations), more than this machine's {gib(have)}; "
                            f"{row.row} ({row.module}) holds the most activations "
                            f"({gib(per_row[worst] * scale * TRAIN_BYTES_PER_ACTIVATION)}): lower imgsz or batch")

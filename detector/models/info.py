"""`detector info`: a model's layer table, parameter count and GFLOPs (2 x multiply-adds, the YOLO convention)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from detector.models.detection_model import DetectionModel
from detector.viz.tables import format_table


def _sdpa_flops(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int], *args: object,
                **kwargs: object) -> int:
    """Q K^T plus (attention) V, each 2 x multiply-adds: 2 * batch * Lq * Lk * (E + Ev); batch = q's leading dims."""
    *batch, lq, e = query_shape
    return 2 * math.prod(batch) * lq * key_shape[-2] * (e + value_shape[-1])


# Fused `scaled_dot_product_attention` forward kernels that torch's own table does not count (in torch 2.14 the
# CPU flash kernel, the one CPU SDPA runs on contiguous inputs, plus the MPS and out-of-tree backends), so they
# would add 0 FLOPs. The CUDA flash / efficient / cuDNN kernels have formulas there; the math fallback
# decomposes into counted bmm. Looked up by name: a kernel missing from this torch build is skipped.
_SDPA_KERNELS = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_attention_math_for_mps",
    "_scaled_dot_product_fused_attention_overrideable",
)
_SDPA_FLOPS = {
    op: _sdpa_flops
    for op in (getattr(torch.ops.aten, name, None) for name in _SDPA_KERNELS)
    if op is not None and op not in flop_registry
}


def forward_flops(model: nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs of one no-grad forward `model(*inputs)` (mode unchanged): convolutions and matrix products, attention
    included whichever SDPA kernel runs, as 2 x multiply-adds."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_SDPA_FLOPS) as counter:
        model(*inputs)
    return counter.get_total_flops()


def count_flops(model: nn.Module, imgsz: int = 640) -> float:
    """GFLOPs of one eval-mode forward pass on a (1, ch, imgsz, imgsz) image.

    Convolutions and matrix products count as 2 x multiply-adds, including the two products of every
    `scaled_dot_product_attention` (Q K^T and attention x V; `mhsa`, `axial`), whose fused CPU kernel
    `FlopCounterMode` alone counts as 0. Norms, activations, softmax, pooling, resampling and element-wise ops
    are not counted (as in the published YOLO figures).
    """
    param = next(model.parameters())
    ch = getattr(model, "yaml", {}).get("ch", 3)
    x = torch.zeros(1, ch, imgsz, imgsz, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        flops = forward_flops(model, x)
    finally:
        model.train(was_training)
    return flops / 1e9


def model_info(model: DetectionModel, imgsz: int = 640) -> str:
    """The layer table (index, from, repeats, params, module, attention, args) and a summary line:
    `<name>: <L> layers, <P> parameters, <G> GFLOPs at <imgsz>x<imgsz>` (L = rows of the table).

    The attention column is what each row was built with ('cbam at output'), so an override's reach is visible."""
    rows = [
        (li.index, str(li.source), li.repeats, sum(p.numel() for p in layer.parameters()), li.module,
         li.attention_label, str(li.args))
        for li, layer in zip(model.layer_info, model.layers)
    ]
    table = format_table(["", "from", "n", "params", "module", "attention", "arguments"], rows)
    params = sum(p.numel() for p in model.parameters())
    gflops = count_flops(model, imgsz)
    summary = f"{model.name}: {len(rows)} layers, {params:,} parameters, {gflops:.1f} GFLOPs at {imgsz}x{imgsz}"
    return f"{table}\n{summary}"

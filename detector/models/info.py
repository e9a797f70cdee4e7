"""`detector info`: a model's layer table, parameter count and GFLOPs (2 x multiply-adds, the YOLO convention)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from detector.models.builder import DetectionModel
from detector.tables import format_table


def count_flops(model: nn.Module, imgsz: int = 640) -> float:
    """GFLOPs of one eval-mode forward pass on a (1, ch, imgsz, imgsz) image.

    `FlopCounterMode` counts convolutions and matrix products (attention included) as 2 x multiply-adds;
    norms, activations, pooling and element-wise ops are not counted (as in the published YOLO figures).
    """
    param = next(model.parameters())
    ch = getattr(model, "yaml", {}).get("ch", 3)
    x = torch.zeros(1, ch, imgsz, imgsz, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9


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

"""Where attention goes: the weights of every attention layer of a model on one image, saved as PNG overlays (drawn
by `viz.attention_plot`).

Forward hooks read what each module computes, without changing the model:
- gates (`AttentionMap` submodules, see attention.py): ca -> mean over channels of a_h * a_w (H x W);
  se, eca -> the channel weights (bar plot) and the channel-weighted activation map mean_c(w_c |x_c|);
  cbam -> the spatial gate (and the channel gate as bars); gate -> its spatial gate; ssa -> the context scores
  (softmax over the H*W tokens).
- the priors (priors.py): edge -> mean over channels of its gate; gc -> its context scores (softmax over H*W);
  coord has no weights: its map is mean_c |coord branch output|, where the coordinate conv adds the most.
- mhsa and axial run fused `scaled_dot_product_attention`, which never materialises its weights: their softmax
  weights are recomputed from the module's input with the module's own projections and position embeddings,
  then averaged over heads and queries (the attention each position receives); axial multiplies its row and
  column maps; mhsa over its `max_kv` bound attends to pooled windows, whose weights are spread back over their
  pixels, so every map is at the module's input resolution.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from detector.models import attention as attn
from detector.viz.attention_plot import plot_attention

LOGGER = logging.getLogger(__name__)


@dataclass
class AttentionCapture:
    """One attention module's weights on one image: `path` in the model (e.g. 'layers.2.attn_output'), `layer`
    (index in model.layers), `kind` (registry name), `spatial` (h, w) map at the module's resolution or None,
    `channels` (C,) channel weights or None."""

    path: str
    layer: int
    kind: str
    spatial: torch.Tensor | None
    channels: torch.Tensor | None


def _kind_of() -> dict[type[nn.Module], str]:
    return {attn.ATTENTIONS.get(name): name for name in attn.ATTENTIONS if name != "none"}


def _weighted_activation(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean_c(w_c |x_c|) of the first image: (h, w)."""
    return (x[0].abs() * weights.reshape(-1, 1, 1)).mean(0)


def _mhsa_received(module: attn.MHSA, x: torch.Tensor) -> torch.Tensor:
    """MHSA's softmax(q (k + r)^T / sqrt(d)) recomputed from `module.project` (the forward's own q, k, v), averaged
    over heads and queries: (h, w) for image 0, summing to 1.

    Over the `max_kv` bound the keys are r x r window means, so the weight of a key is spread evenly over the
    input positions of its window (the effective weight each position's value gets): the map stays at the
    module's resolution, constant inside each window, and sums over a window to that key's weight."""
    _, _, h, w = x.shape
    q, k, _ = module.project(x[:1])
    d = q.shape[-1]
    received = torch.zeros(k.shape[2], device=x.device)
    for head in range(module.heads):  # one (HW, hk * wk) matrix at a time
        received += (q[0, head] @ k[0, head].T * d**-0.5).softmax(-1).mean(0)
    received /= module.heads
    r = attn.kv_pool_factor(h, w, module.max_kv)
    if r == 1:
        return received.view(h, w)
    rows, cols = torch.arange(h, device=x.device) // r, torch.arange(w, device=x.device) // r  # pixel -> key cell
    per_pixel = received.view(-(-h // r), -(-w // r)) / (rows.bincount()[:, None] * cols.bincount()[None, :])
    return per_pixel[rows][:, cols]


def _axis_received(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One axial pass's softmax weights recomputed (as `_AxisAttention.forward` builds them), averaged over heads
    and queries: the attention each position receives from its row (or column), (h, w) for image 0."""
    _, c, h, w = x.shape
    d = c // module.heads
    qkv = module.qkv(x[:1]).reshape(1, 3, module.heads, d, h, w).permute(module._TO_TOKENS[module.axis])
    q, k, _ = qkv.unbind(0)  # (1, heads, other, L, d)
    length = q.shape[3]
    k = k + module.pos(length).reshape(module.heads, 1, d, length).transpose(-1, -2)
    received = (q @ k.transpose(-1, -2) * d**-0.5).softmax(-1).mean((1, 3))[0]  # (other, L)
    return received if module.axis == "row" else received.T


Reader = Callable[[nn.Module, torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor | None, torch.Tensor | None]]

# kind -> (module, its input, its AttentionMap outputs by attribute name) -> (spatial map, channel weights)
READERS: dict[str, Reader] = {
    "ca": lambda m, x, g: ((g["gate_h"][0] * g["gate_w"][0]).mean(0), None),
    "se": lambda m, x, g: (_weighted_activation(x, g["gate"][0]), g["gate"][0].flatten()),
    "eca": lambda m, x, g: (_weighted_activation(x, g["gate"][0]), g["gate"][0].flatten()),
    "cbam": lambda m, x, g: (g["spatial_gate"][0, 0], g["channel_gate"][0].flatten()),
    "gate": lambda m, x, g: (g["gate"][0, 0], None),
    "ssa": lambda m, x, g: (g["scores"][0].view(x.shape[2], x.shape[3]), None),
    "mhsa": lambda m, x, g: (_mhsa_received(m, x), None),
    "axial": lambda m, x, g: (_axis_received(m.row, x) * _axis_received(m.col, m.row(x)), None),
    "edge": lambda m, x, g: (g["gate"][0].mean(0), None),
    "gc": lambda m, x, g: (g["scores"][0].view(x.shape[2], x.shape[3]), None),
    "coord": lambda m, x, g: ((m(x) - x)[0].abs().mean(0), None),
}


@torch.no_grad()
def capture_attention(model: nn.Module, x: torch.Tensor) -> list[AttentionCapture]:
    """Run `model` (eval mode) on `x` (1, 3, H, W) float and return every attention module's weights, in model
    order. Modules of a kind without a reader (a newly registered attention) are skipped with a warning."""
    kinds = _kind_of()
    inputs: dict[str, torch.Tensor] = {}
    gates: dict[str, dict[str, torch.Tensor]] = {}
    found: list[tuple[str, nn.Module, str]] = []
    handles = []
    for path, module in model.named_modules():
        kind = kinds.get(type(module))
        if kind is None:
            continue
        if kind not in READERS:
            LOGGER.warning("attention maps: no reader for '%s' (%s), skipped", kind, path)
            continue
        found.append((path, module, kind))
        handles.append(module.register_forward_hook(lambda m, args, out, p=path: inputs.__setitem__(p, args[0].detach())))
        for name, child in module.named_children():
            if isinstance(child, attn.AttentionMap):
                store = gates.setdefault(path, {})
                handles.append(child.register_forward_hook(lambda m, args, out, s=store, n=name: s.__setitem__(n, out.detach().float())))
    was_training = model.training
    model.eval()
    try:
        model(x)
        captures = []
        for path, module, kind in found:
            if path not in inputs:  # not on the forward path
                continue
            spatial, channels = READERS[kind](module, inputs[path].float(), gates.get(path, {}))
            parts = path.split(".")
            layer = int(parts[1]) if len(parts) > 1 and parts[0] == "layers" and parts[1].isdigit() else -1
            captures.append(AttentionCapture(path, layer, kind, spatial, channels))
        return captures
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def save_attention_maps(model: nn.Module, image: np.ndarray, imgsz: int, out_dir: Path) -> list[Path]:
    """Letterbox `image` (H, W, 3) uint8 RGB to long side `imgsz`, capture every attention layer's weights and save
    one PNG per layer in `out_dir`, named `<layer>_<kind>[_<place>].png` (e.g. 02_ca_attn_output.png)."""
    from detector.data.transforms import letterbox_batch, to_model_input  # lazy: cv2 and albumentations

    param = next(model.parameters())
    batch, _, _ = letterbox_batch([image], imgsz, int(model.stride.max()))
    x = to_model_input(batch, param.device, channels_last=False, dtype=param.dtype)
    captures = capture_attention(model, x)
    if not captures:
        LOGGER.warning("attention maps: the model has no attention layers (attention 'none' everywhere?)")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = batch[0].permute(1, 2, 0).numpy()
    rows = getattr(model, "layer_info", None)
    paths = []
    for cap in captures:
        place = cap.path.split(".", 2)[2] if cap.path.count(".") >= 2 else ""
        name = f"{max(cap.layer, 0):02d}_{cap.kind}" + (f"_{place.replace('.', '-')}" if place else "") + ".png"
        module_name = rows[cap.layer].module if rows is not None and 0 <= cap.layer < len(rows) else ""
        title = f"layer {cap.layer} {module_name} {cap.kind}" + (f" ({place})" if place else "")
        paths.append(plot_attention(shown, cap.spatial, cap.channels, kind=cap.kind, title=title, path=out_dir / name))
    return paths

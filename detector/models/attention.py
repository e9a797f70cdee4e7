"""The attention registry: `ca`, `se`, `cbam`, `eca`, `mhsa`, `axial`, `ssa`, `gate`, `none` live here; the spatial
priors `edge`, `coord` and `gc` live in priors.py and register into the same `ATTENTIONS`.

Every module is `Attention(channels, **kw)` and maps (B, C, H, W) -> (B, C, H, W) at any H, W >= 1.
A new attention is one class plus one `@register_attention("name")` line (and `@register_module()` to also
be a standalone YAML row). `build_attention(name, channels)` is what blocks and `Attn` rows call.

Attention maps for visualisation: modules that materialise weights compute them through an `AttentionMap`
submodule (sigmoid gates, or the softmax of `ssa` and `gc`); a forward hook on every `AttentionMap` in a model
reads them at no cost to ordinary runs. `mhsa` and `axial` use fused `scaled_dot_product_attention`, which never
materialises its weights, so they have no map.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from detector.models.registry import Registry, register_module

ATTENTIONS: Registry[type[nn.Module]] = Registry("attention")


def register_attention(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make `cls` available as `attention: <name>` in model YAMLs and overrides."""

    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        ATTENTIONS.add(name, cls)
        return cls

    return decorate


def build_attention(name: str, channels: int, **kwargs: Any) -> nn.Module:
    """An attention module by registry name; raises `UnknownNameError` (with a suggestion) for a bad name."""
    return ATTENTIONS.get(name)(channels, **kwargs)


def fit_heads(channels: int, heads: int) -> int:
    """The largest head count <= `heads` that divides `channels`, so any channel count works."""
    if heads < 1:
        raise ValueError(f"heads must be >= 1, got {heads}")
    return max(h for h in range(1, heads + 1) if channels % h == 0)


def reduced(channels: int, reduction: int, minimum: int = 8) -> int:
    """Bottleneck width of a squeeze MLP: channels / reduction, at least `minimum`."""
    if reduction < 1 or minimum < 1:
        raise ValueError(f"reduction and min_mid must be >= 1, got {reduction} and {minimum}")
    return max(minimum, channels // reduction)


class AttentionMap(nn.Module):
    """The attention weights: sigmoid of gate logits, or softmax over `softmax_dim`. Hook it to read the map."""

    def __init__(self, softmax_dim: int | None = None) -> None:
        super().__init__()
        self.softmax_dim = softmax_dim

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid() if self.softmax_dim is None else logits.softmax(self.softmax_dim)


def conv_bn(c_in: int, c_out: int, k: int = 1, dilation: int = 1) -> nn.Sequential:
    """A k x k convolution (same padding) and BatchNorm, no activation: the projections the attention blocks and
    spatial priors gate or add, where each block picks its own activation (or none) after it."""
    pad = dilation * (k - 1) // 2
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, 1, pad, dilation=dilation, bias=False), nn.BatchNorm2d(c_out))


@register_attention("ca")
@register_module(channels="same")
class CoordAtt(nn.Module):
    """Coordinate Attention (Hou, Zhou, Feng, CVPR 2021, arXiv 2103.02907).

    Pools over W -> (C, H, 1) and over H -> (C, 1, W), squeezes both through one shared 1x1 conv + BN +
    h-swish (mid = max(min_mid, C / reduction)), then two 1x1 convs and sigmoids give a per-row and a
    per-column gate: out = x * a_h * a_w. Position-aware along each axis at the cost of an SE block.
    """

    def __init__(self, channels: int, reduction: int = 32, min_mid: int = 8) -> None:
        super().__init__()
        mid = reduced(channels, reduction, min_mid)
        self.squeeze = nn.Sequential(nn.Conv2d(channels, mid, 1), nn.BatchNorm2d(mid), nn.Hardswish())
        self.conv_h = nn.Conv2d(mid, channels, 1)
        self.conv_w = nn.Conv2d(mid, channels, 1)
        self.gate_h = AttentionMap()
        self.gate_w = AttentionMap()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pooling and the gate product run on the (B, H, W, C) view of x, which a channels_last x holds
        contiguously: torch reduces over H or W of that view 3-5x faster than over the same axes of the
        channels_last (B, C, H, W) tensor, in the pooling and in the product's backward (the gates' gradients).
        Same values and gradients bit for bit, in either memory format; the four CA blocks of yolo-ca-n at 256 px
        (batch 16, bf16, forward and backward) 31.8 -> 22.0 ms on the Sapphire Rapids Xeon."""
        h, w = x.shape[-2:]
        rows = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        pooled_h = rows.mean(2, keepdim=True).permute(0, 3, 1, 2)  # (B, C, H, 1)
        pooled_w = rows.mean(1, keepdim=True).permute(0, 3, 2, 1)  # (B, C, W, 1)
        y_h, y_w = self.squeeze(torch.cat([pooled_h, pooled_w], 2)).split([h, w], 2)
        a_h = self.gate_h(self.conv_h(y_h))  # (B, C, H, 1)
        a_w = self.gate_w(self.conv_w(y_w.transpose(2, 3)))  # (B, C, 1, W)
        return (rows * a_h.permute(0, 2, 3, 1) * a_w.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@register_attention("se")
@register_module(channels="same")
class SE(nn.Module):
    """Squeeze-and-Excitation (Hu, Shen, Sun, CVPR 2018): GAP, 1x1 C -> C/r, ReLU, 1x1 -> C, sigmoid, scale."""

    def __init__(self, channels: int, reduction: int = 16, min_mid: int = 8) -> None:
        super().__init__()
        mid = reduced(channels, reduction, min_mid)
        self.mlp = nn.Sequential(nn.Conv2d(channels, mid, 1), nn.ReLU(), nn.Conv2d(mid, channels, 1))
        self.gate = AttentionMap()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.mlp(x.mean((2, 3), keepdim=True)))


@register_attention("cbam")
@register_module(channels="same")
class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al., ECCV 2018): channel gate, then spatial gate.

    Channel: one shared MLP (C -> C/r -> C) on the average- and max-pooled vectors, summed, sigmoid.
    Spatial: channel-wise mean and max -> k x k conv + BN -> sigmoid.
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7, min_mid: int = 8) -> None:
        super().__init__()
        mid = reduced(channels, reduction, min_mid)
        self.mlp = nn.Sequential(nn.Conv2d(channels, mid, 1), nn.ReLU(), nn.Conv2d(mid, channels, 1))
        self.channel_gate = AttentionMap()
        self.spatial = conv_bn(2, 1, kernel_size)
        self.spatial_gate = AttentionMap()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.channel_gate(self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True)))
        maps = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)  # (B, 2, H, W)
        return x * self.spatial_gate(self.spatial(maps))


@register_attention("eca")
@register_module(channels="same")
class ECA(nn.Module):
    """Efficient Channel Attention (Wang et al., CVPR 2020): GAP, 1D conv across channels, sigmoid, scale.

    No dimensionality reduction; kernel k = the odd number nearest |log2(C) / gamma + b / gamma|.
    """

    def __init__(self, channels: int, gamma: int = 2, b: int = 1) -> None:
        super().__init__()
        k = int(abs((math.log2(channels) + b) / gamma))
        k = k if k % 2 else k + 1
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)
        self.gate = AttentionMap()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.mean((2, 3)).unsqueeze(1))  # (B, 1, C)
        return x * self.gate(y).transpose(1, 2).unsqueeze(-1)  # (B, C, 1, 1)


class AxisEmbedding(nn.Module):
    """A learned position embedding along one image axis, linearly resampled to any length (any input size)."""

    def __init__(self, channels: int, base_len: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, channels, base_len) * channels**-0.5)

    def forward(self, length: int) -> torch.Tensor:
        """(channels, length)."""
        return F.interpolate(self.weight, size=length, mode="linear", align_corners=False)[0]


def _proj(channels: int) -> nn.Sequential:
    """Output projection of a residual attention branch: 1x1 conv + BN."""
    return conv_bn(channels, channels)


def kv_pool_factor(h: int, w: int, max_kv: int) -> int:
    """The smallest integer r with ceil(h / r) * ceil(w / r) <= max_kv: 1 when h * w <= max_kv."""
    r = max(1, math.isqrt(max(0, h * w - 1) // max_kv))  # a lower bound: ceil(h/r) ceil(w/r) >= hw / r^2
    while -(-h // r) * -(-w // r) > max_kv:
        r += 1
    return r


@register_attention("mhsa")
@register_module(channels="same")
class MHSA(nn.Module):
    """Multi-head self-attention over all H*W positions, as in BoTNet (Srinivas et al., CVPR 2021), with keys and
    values spatially reduced on large maps as in PVT (Wang et al., ICCV 2021, arXiv 2102.12122).

    q, k, v from one 1x1 conv; logits q.(k + pos) with pos = R_h + R_w, learned height and width embeddings
    (BoTNet's split 2D encoding, absolute form), resampled to the key grid so any H, W works; fused
    `F.scaled_dot_product_attention`; output 1x1 conv + BN added to the input. `heads` falls back to the
    largest divisor of `channels` not above it.

    Plain global attention costs O((HW)^2) time and memory: 4,096 tokens at stride 4 of a 256 px image are a
    (4096 x 4096) matrix per head and image. So when H*W > `max_kv`, keys and values come from the input
    average-pooled by the smallest integer factor r with ceil(H/r) * ceil(W/r) <= max_kv (window r, stride r,
    partial windows at the bottom/right edges averaged over their valid pixels), while every position still
    queries: cost O(HW * max_kv). The default 400 is a 20 x 20 map, P5 of a 640 image, where the module stays
    exact global attention. Since the 1x1 conv has no bias it commutes with the pooling, so k and v are the
    qkv conv's k/v weights applied to the pooled input (the parameters are the same as without reduction).

    Pooling is `F.avg_pool2d(x, r, r, ceil_mode=True)`: it exports to ONNX AveragePool (ceil_mode=1, no padding)
    and onnxruntime matches it, partial windows included; the TorchScript exporter rejects `F.adaptive_avg_pool2d`
    to a size that does not divide the input, and any size with dynamic H/W. r is a Python int, so an ONNX graph
    exported with dynamic H/W keeps, per layer, the r (and the choice to reduce or not) of the export size; at
    sizes where `kv_pool_factor` differs it runs a different key grid than PyTorch does (export warns).
    """

    def __init__(self, channels: int, heads: int = 4, base_size: int = 20, max_kv: int = 400) -> None:
        super().__init__()
        if max_kv < 1:
            raise ValueError(f"MHSA: max_kv must be >= 1, got {max_kv}")
        self.heads = fit_heads(channels, heads)
        self.max_kv = max_kv
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=False)
        self.pos_h = AxisEmbedding(channels, base_size)
        self.pos_w = AxisEmbedding(channels, base_size)
        self.proj = _proj(channels)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, heads, HW, d) at every position; k (position term added) and v (B, heads, hk * wk, d) on the key
        grid: (hk, wk) = (H, W) under the bound, else the pooled (ceil(H / r), ceil(W / r))."""
        b, c, h, w = x.shape
        d = c // self.heads
        r = kv_pool_factor(h, w, self.max_kv)
        if r == 1:
            q, k, v = self.qkv(x).reshape(b, 3, self.heads, d, h * w).transpose(-1, -2).unbind(1)
            hk, wk = h, w
        else:
            w_q, w_kv = self.qkv.weight.split([c, 2 * c])
            pooled = F.avg_pool2d(x, r, r, ceil_mode=True)  # (B, C, hk, wk)
            hk, wk = pooled.shape[-2:]
            q = F.conv2d(x, w_q).reshape(b, self.heads, d, h * w).transpose(-1, -2)
            k, v = F.conv2d(pooled, w_kv).reshape(b, 2, self.heads, d, hk * wk).transpose(-1, -2).unbind(1)
        pos = (self.pos_h(hk)[:, :, None] + self.pos_w(wk)[:, None, :]).reshape(self.heads, d, hk * wk)
        return q, k + pos.transpose(-1, -2).to(k.dtype), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        out = F.scaled_dot_product_attention(*self.project(x))  # (B, heads, HW, d)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class _AxisAttention(nn.Module):
    """Multi-head self-attention along one axis (rows: tokens are the W positions of a row; or columns)."""

    # (3, B, heads, d, H, W) -> (3, B, heads, other axis, attended axis, d), and the inverse for the output
    _TO_TOKENS = {"row": (1, 0, 2, 4, 5, 3), "col": (1, 0, 2, 5, 4, 3)}
    _FROM_TOKENS = {"row": (0, 1, 4, 2, 3), "col": (0, 1, 4, 3, 2)}

    def __init__(self, channels: int, heads: int, base_size: int, axis: str) -> None:
        super().__init__()
        self.heads = fit_heads(channels, heads)
        self.axis = axis
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=False)
        self.pos = AxisEmbedding(channels, base_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        d = c // self.heads
        qkv = self.qkv(x).reshape(b, 3, self.heads, d, h, w).permute(self._TO_TOKENS[self.axis])
        q, k, v = qkv.unbind(0)  # (B, heads, other, L, d)
        other, length = q.shape[2:4]
        k = k + self.pos(length).reshape(self.heads, 1, d, length).transpose(-1, -2).to(k.dtype)
        # 4D for the fused kernels (and ONNX): (B, heads * other, L, d)
        out = F.scaled_dot_product_attention(*(t.reshape(b, -1, length, d) for t in (q, k, v)))
        out = out.view(b, self.heads, other, length, d).permute(self._FROM_TOKENS[self.axis])
        return out.reshape(b, c, h, w)


@register_attention("axial")
@register_module(channels="same")
class Axial(nn.Module):
    """Axial attention (Ho et al. 2019, arXiv 1912.12180; Wang et al., Axial-DeepLab, ECCV 2020).

    Self-attention along each row (tokens = the W positions), then along each column (H positions), each
    with a learned 1D position embedding on the keys: a global receptive field at O(HW (H + W)) instead of
    O((HW)^2). Output 1x1 conv + BN added to the input. `heads` as in MHSA.
    """

    def __init__(self, channels: int, heads: int = 4, base_size: int = 20) -> None:
        super().__init__()
        self.row = _AxisAttention(channels, heads, base_size, "row")
        self.col = _AxisAttention(channels, heads, base_size, "col")
        self.proj = _proj(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(self.col(self.row(x)))


@register_attention("ssa")
@register_module(channels="same")
class SSA(nn.Module):
    """Separable self-attention (MobileViTv2; Mehta & Rastegari, TMLR 2023, arXiv 2206.02680), over all HW tokens.

    One 1x1 conv gives a 1-channel query, keys and values; softmax of the query over the tokens gives the
    context scores; context vector = sum(scores * keys) (B, C, 1, 1); out = proj(ReLU(values) * context),
    added to the input. Linear in the number of tokens, element-wise ops only.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.qkv = nn.Conv2d(channels, 1 + 2 * channels, 1)
        self.scores = AttentionMap(softmax_dim=-1)
        self.proj = _proj(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        q, k, v = self.qkv(x).split([1, c, c], 1)
        scores = self.scores(q.flatten(2)).view_as(q)  # softmax over the H*W tokens
        context = (k * scores).sum((2, 3), keepdim=True)  # (B, C, 1, 1)
        return x + self.proj(F.relu(v) * context)


@register_attention("gate")
@register_module(channels="same")
class Gate(nn.Module):
    """A minimal learned spatial gate (this project's baseline, no paper): x * sigmoid(1x1(a(x) + b(x))).

    a and b are 3x3 conv + BN + SiLU branches to max(min_mid, C / reduction) channels, b dilated by 2 so
    the two see different context (summed linear convs alone would collapse into one conv).
    """

    def __init__(self, channels: int, reduction: int = 8, min_mid: int = 8) -> None:
        super().__init__()
        mid = reduced(channels, reduction, min_mid)
        self.local = nn.Sequential(conv_bn(channels, mid, 3), nn.SiLU())
        self.wide = nn.Sequential(conv_bn(channels, mid, 3, dilation=2), nn.SiLU())
        self.fuse = nn.Conv2d(mid, 1, 1)
        self.gate = AttentionMap()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fuse(self.local(x) + self.wide(x)))


@register_attention("none")
class NoAttention(nn.Module):
    """No attention: returns its input unchanged (the ablation baseline)."""

    def __init__(self, channels: int) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@register_module(channels="same", attention=True)
def Attn(channels: int, attention: str = "ca", **kwargs: Any) -> nn.Module:  # noqa: N802 (a YAML row name)
    """The YAML row `Attn`: the attention named by the file's `attention:` key (or a row keyword)."""
    return build_attention(attention, channels, **kwargs)

"""Spatial priors registered beside the attentions: `edge`, `coord`, `gc`.

Each is `Prior(channels, **kw)`, maps (B, C, H, W) -> (B, C, H, W) at any H, W >= 1 and is swapped into a model
like any attention (`attention=edge`, or the `detector ablate` list). They are the study note's spatial priors
besides attention: shape and geometry (`edge`), spatial relationships through a positional encoding (`coord`)
and context dependency through global pooling (`gc`). Gates and softmax weights go through `AttentionMap`
submodules, so attention-map hooks read them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from detector.models.attention import AttentionMap, conv_bn, reduced, register_attention
from detector.models.registry import register_module

# the Sobel operator: d/dx (columns, along W) and its transpose d/dy (rows, along H)
SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


@register_attention("edge")
@register_module(channels="same")
class EdgePrior(nn.Module):
    """An edge prior from the Sobel operator (Sobel & Feldman, "A 3x3 isotropic gradient operator for image
    processing", Stanford AI Project talk, 1968).

    Why: object boundaries carry shape and geometry; a fixed gradient filter hands the network an edge map it
    would otherwise have to learn. Each channel is filtered depthwise by the fixed Sobel kernels (replicate-padded,
    so the image border is no edge), g = sqrt(gx^2 + gy^2 + eps); a learned 1x1 conv + BN (C -> C) and a sigmoid
    turn g into a gate: out = x * sigmoid(BN(conv(g))). The kernels are a buffer: not trained, not in the
    optimizer, moved by `.to()`, not saved in checkpoints.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        sobel_x = torch.tensor(SOBEL_X)
        kernels = torch.stack([sobel_x, sobel_x.T])[:, None].repeat(channels, 1, 1, 1)  # (2C, 1, 3, 3): gx, gy of each
        self.register_buffer("sobel", kernels, persistent=False)
        self.eps = eps
        self.fuse = conv_bn(channels, channels)
        self.gate = AttentionMap()

    def magnitude(self, x: torch.Tensor) -> torch.Tensor:
        """sqrt(gx^2 + gy^2 + eps) of every channel: (B, C, H, W)."""
        b, c, h, w = x.shape
        padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
        grads = F.conv2d(padded, self.sobel, groups=c).view(b, c, 2, h, w)  # (gx, gy) per channel
        return (grads.square().sum(2) + self.eps).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fuse(self.magnitude(x)))


def coordinate_maps(x: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) of x's dtype and device: channel 0 the column coordinate (varies along W), channel 1 the row
    coordinate (varies along H), each from -1 at the first to 1 at the last position (0 on a length-1 axis).

    (2 i - (n - 1)) / max(n - 1, 1) is linspace(-1, 1, n) without a branch on n (and in float32, exact at the
    ends at any dtype): an ONNX graph traced with dynamic H/W stays right where a map has one row or column, where
    linspace's step 2 / (n - 1) would divide by zero."""
    b, _, h, w = x.shape

    def axis(n: int) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float32, device=x.device)
        last = pos[-1:]  # n - 1
        return ((2 * pos - last) / last.clamp(min=1)).to(x.dtype)

    xx = axis(w).view(1, 1, 1, w).expand(b, 1, h, w)
    yy = axis(h).view(1, 1, h, 1).expand(b, 1, h, w)
    return torch.cat([xx, yy], 1)


@register_attention("coord")
@register_module(channels="same")
class CoordConv(nn.Module):
    """CoordConv (Liu et al., "An intriguing failing of convolutional neural networks and the CoordConv solution",
    NeurIPS 2018, arXiv 1807.03247).

    Why: convolutions are translation-equivariant, so they cannot tell where in the image they are; concatenating
    the pixel coordinates is a positional encoding that lets the following conv learn spatial relationships
    (where objects sit, how far apart). out = x + SiLU(BN(conv3x3(cat(x, xx, yy)))) with xx, yy in [-1, 1]
    (`coordinate_maps`), C + 2 -> C channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(conv_bn(channels + 2, channels, 3), nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(torch.cat([x, coordinate_maps(x)], 1))


@register_attention("gc")
@register_module(channels="same")
class GlobalContext(nn.Module):
    """The Global Context block (Cao, Xu, Lin, Wei, Hu, "GCNet: Non-local networks meet squeeze-excitation
    networks and beyond", ICCV-W 2019, arXiv 1904.11492).

    Why: a detector's receptive field stays local, while whether a blob is an object depends on the whole
    image; global (attention) pooling adds that context dependency at the cost of an SE block. Context
    modelling: softmax over the H*W positions of a 1x1 conv (C -> 1), then the weighted sum of x (B, C, 1, 1);
    transform: 1x1 conv C -> C/r, LayerNorm([C/r, 1, 1]), ReLU, 1x1 conv C/r -> C (C/r = `reduced`, at least
    `min_mid`); fusion by addition: out = x + transform(context). The paper zero-initialises the last conv;
    here it keeps PyTorch's default, so every parameter gets a gradient from the first step. The mask conv has no
    bias: it would add one constant to every position's score, which the softmax cancels, so its gradient is zero
    but for rounding (exactly zero on some CPUs) and it could never learn.
    """

    def __init__(self, channels: int, reduction: int = 16, min_mid: int = 8) -> None:
        super().__init__()
        mid = reduced(channels, reduction, min_mid)
        self.mask = nn.Conv2d(channels, 1, 1, bias=False)
        self.scores = AttentionMap(softmax_dim=-1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, mid, 1), nn.LayerNorm([mid, 1, 1]), nn.ReLU(), nn.Conv2d(mid, channels, 1)
        )

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """sum over positions of softmax(mask(x)) * x: (B, C, 1, 1)."""
        scores = self.scores(self.mask(x).flatten(2))  # (B, 1, HW), softmax over the H*W positions
        return (x.flatten(2) @ scores.transpose(1, 2)).unsqueeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.transform(self.context(x))

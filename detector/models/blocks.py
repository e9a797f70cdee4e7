"""Plain building blocks of YOLO models: Conv, Bottleneck, C3, C2f (+ attention variants), SPPF, Concat, Upsample.

Row modules take `(c_in, c_out, *args)` (see registry.py for how the builder feeds each one); YAML args
follow the YOLOv5/YOLOv8 convention, e.g. `[-1, 3, C2f, [128, True]]` is C2f(c_in, 128 * width, n, True).

C2f with attention (`AttnC2f`, and its alias `CA_C2f`) takes the file's `attention:` key (default `ca`), so an
`attention=` override swaps every such block; the standalone rows named for one attention (`CoordAtt`, `SE`,
`CBAM`, ...) keep their kind. It places the attention by `attention_at`:
  output      after the fuse conv (default)
  concat      on the concatenated branches, before the fuse conv
  bottleneck  inside each bottleneck, before its residual add
set file-wide (`attention_at: concat`) or per row by a trailing keyword dict in args:
  `[-1, 6, CA_C2f, [256, True, {attention_at: bottleneck}]]`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from detector.models.attention import build_attention
from detector.models.registry import register_alias, register_module

ATTENTION_PLACES = ("output", "concat", "bottleneck")

# YOLOv5's BatchNorm settings, for every norm of every model (the builder applies them after building, so
# attention and head norms made with torch's defaults get them too); the trainer may override the momentum.
BN_EPS = 1e-3
BN_MOMENTUM = 0.03


def set_batchnorm(model: nn.Module, *, eps: float | None = BN_EPS, momentum: float | None = BN_MOMENTUM) -> int:
    """Set eps and momentum of every BatchNorm in `model` (None leaves that one as it is); returns how many.

    The one place BN settings are written: the builder calls it with the YOLOv5 defaults, the trainer with
    `eps=None, momentum=cfg.bn_momentum`."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if eps is not None:
                module.eps = eps
            if momentum is not None:
                module.momentum = momentum
            count += 1
    return count


class _CatDenseGrads(torch.autograd.Function):
    """torch.cat whose backward hands each input a dense gradient in the output's memory format, not a strided
    channel slice of the output's gradient (what torch.cat's own backward gives)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, dim: int, *tensors: torch.Tensor) -> torch.Tensor:
        out = torch.cat(tensors, dim)
        ctx.dim, ctx.sizes = dim, [t.shape[dim] for t in tensors]
        channels_last = out.dim() == 4 and not out.is_contiguous() and out.is_contiguous(memory_format=torch.channels_last)
        ctx.layout = torch.channels_last if channels_last else torch.contiguous_format
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        pieces = grad.split(ctx.sizes, ctx.dim)
        return None, *(piece.contiguous(memory_format=ctx.layout) if needed else None
                       for piece, needed in zip(pieces, ctx.needs_input_grad[1:]))


def concat(tensors: Sequence[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """torch.cat for the model's blocks: the same output, and in training each input's gradient arrives dense.

    Why: a channel slice of a channels_last gradient sent several CPU backward kernels down slow strided paths
    (2-core AMD EPYC Zen 4, bf16, batch 16 at 256 px): nearest upsampling 7.7 against 2.2 ms, SiLU 5.4 against
    0.7 ms at (16, 32, 64, 64), and the sums of a C2f chunk's gradients. Copying each slice once costs 2 ms a step
    and saved 13 ms of the backward's kernels (README, Benchmarks). Without autograd it is torch.cat itself."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _CatDenseGrads.apply(dim, *tensors)
    return torch.cat(list(tensors), dim)


def autopad(k: int, p: int | None = None, d: int = 1) -> int:
    """'Same' padding for an odd kernel (stride 1 keeps the size; stride s divides it by s). An even kernel gets
    d(k-1)/2 rounded down, so a k=2 s=2 patchify row halves the size exactly; YOLOv5's k//2 makes it H/2 + 1, a
    size the next Concat refuses. Give p= to pad otherwise."""
    return d * (k - 1) // 2 if p is None else p


@register_module()
class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm2d + SiLU. Row args: [c_out, k=1, s=1, p=auto, g=1, d=1, act=True]."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1,
                 d: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, autopad(k, p, d), dilation=d, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def folded_weights(self) -> tuple[nn.Parameter, nn.Parameter]:
        """The conv's weight and bias with its BatchNorm2d's eval statistics folded in (what `fuse` installs)."""
        bn = self.bn
        return fuse_conv_bn_weights(self.conv.weight, self.conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)

    def fuse(self) -> None:
        """Fold the BN (eval statistics) into the conv's weight and bias: same output in eval mode, one op fewer."""
        if isinstance(self.bn, nn.BatchNorm2d):
            self.conv.weight, self.conv.bias = self.folded_weights()
            self.bn = nn.Identity()


class Bottleneck(nn.Module):
    """Two convs (kernels k, hidden width c_out * e) with a residual when `shortcut` and c_in == c_out.

    An attention other than 'none' is applied to the conv output before the residual add.
    """

    def __init__(self, c_in: int, c_out: int, shortcut: bool = True, g: int = 1, k: Sequence[int] = (3, 3),
                 e: float = 0.5, attention: str = "none") -> None:
        super().__init__()
        hidden = int(c_out * e)
        self.cv1 = Conv(c_in, hidden, k[0], 1)
        self.cv2 = Conv(hidden, c_out, k[1], 1, g=g)
        self.attn = build_attention(attention, c_out)
        self.add = shortcut and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn(self.cv2(self.cv1(x)))
        return x + y if self.add else y


@register_module(repeats=True)
class C3(nn.Module):
    """YOLOv5 CSP block: cv3(cat(n bottlenecks(cv1(x)), cv2(x))). Row args: [c_out, shortcut=True, g=1, e=0.5]."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5) -> None:
        super().__init__()
        hidden = int(c_out * e)
        self.cv1 = Conv(c_in, hidden, 1)
        self.cv2 = Conv(c_in, hidden, 1)
        self.cv3 = Conv(2 * hidden, c_out, 1)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, g, k=(1, 3), e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(concat([self.m(self.cv1(x)), self.cv2(x)], 1))


@register_module(repeats=True)
class C2f(nn.Module):
    """YOLOv8 CSP block: cv1 to 2c, split in two, n bottlenecks each on the last chunk, all concatenated, cv2.

    Row args: [c_out, shortcut=False, g=1, e=0.5]. `attention`/`attention_at` (see the module docstring)
    are used by the AttnC2f (CA_C2f) rows; plain C2f has none.
    """

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = False, g: int = 1, e: float = 0.5,
                 *, attention: str = "none", attention_at: str = "output") -> None:
        super().__init__()
        if attention_at not in ATTENTION_PLACES:
            raise ValueError(f"attention_at '{attention_at}' is not one of {', '.join(ATTENTION_PLACES)}")
        self.c = int(c_out * e)
        self.cv1 = Conv(c_in, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c_out, 1)
        inner = attention if attention_at == "bottleneck" else "none"
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut, g, k=(3, 3), e=1.0, attention=inner)
                               for _ in range(n))
        self.attn_concat = build_attention(attention if attention_at == "concat" else "none", (2 + n) * self.c)
        self.attn_output = build_attention(attention if attention_at == "output" else "none", c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.attn_output(self.cv2(self.attn_concat(concat(y, 1))))


@register_module(repeats=True, attention=True, attention_at=True)
class AttnC2f(C2f):
    """C2f with the file's `attention:` (any registry name, default ca) at `attention_at`. Row args as C2f."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = False, g: int = 1, e: float = 0.5,
                 *, attention: str = "ca", attention_at: str = "output") -> None:
        super().__init__(c_in, c_out, n, shortcut, g, e, attention=attention, attention_at=attention_at)


# The name published CA-C2f YAMLs use: a C2f carrying an attention whose default is Coordinate Attention (Hou et
# al., CVPR 2021). It is AttnC2f under another name, so `attention=cbam` puts CBAM in these blocks too, rather
# than training CA while the run records cbam.
register_alias("CA_C2f", "AttnC2f")


@register_module()
class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained k x k max-pools (= SPP with k, 2k-1, 3k-2).

    Row args: [c_out, k=5].
    """

    def __init__(self, c_in: int, c_out: int, k: int = 5) -> None:
        super().__init__()
        hidden = c_in // 2
        self.cv1 = Conv(c_in, hidden, 1)
        self.cv2 = Conv(4 * hidden, c_out, 1)
        self.pool = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(self.pool(y[-1]) for _ in range(3))
        return self.cv2(concat(y, 1))


@register_module(channels="sum", multi_input=True)
class Concat(nn.Module):
    """Concatenate the inputs along `dim` (channels). Row args: [dim=1]."""

    def __init__(self, c_ins: Sequence[int], dim: int = 1) -> None:
        super().__init__()
        if dim not in (1, -3):  # the builder gives the next row the sum of the input channels
            raise ValueError(f"dim must be 1 (the channels, whose counts add up), got {dim!r}")
        self.dim = dim

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return concat(xs, self.dim)


MAX_UPSAMPLE = 32  # one Upsample row's scale; FPN/PAN rows use 2 (a 1000x row would allocate gigabytes when built)


@register_module(channels="same")
class Upsample(nn.Upsample):
    """Resize by `scale_factor` (nearest by default). Row args: [scale_factor=2, mode='nearest'].

    The YOLOv5 spelling `[-1, 1, nn.Upsample, [None, 2, 'nearest']]` is accepted too.
    """

    def __init__(self, c_in: int, scale_factor: float = 2, mode: str = "nearest") -> None:
        if isinstance(scale_factor, bool) or not isinstance(scale_factor, (int, float)) \
                or not 0 < scale_factor <= MAX_UPSAMPLE:  # the builder's dry run would allocate its output
            raise ValueError(f"scale_factor must be a number in (0, {MAX_UPSAMPLE}], got {scale_factor!r}")
        super().__init__(scale_factor=scale_factor, mode=mode)


def _torch_upsample_args(args: list) -> list:
    """nn.Upsample's [size, scale_factor, mode] -> Upsample's [scale_factor, mode] (inputs vary in size)."""
    if args and args[0] is not None:
        raise ValueError(f"nn.Upsample with a fixed size {args[0]!r} is not supported; give [None, scale, mode]")
    return list(args[1:])


register_alias("nn.Upsample", "Upsample", _torch_upsample_args)

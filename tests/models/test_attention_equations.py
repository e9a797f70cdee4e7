"""Every attention in attention.py against its paper's equations, written out here with the module's own weights.

Why: test_attention.py checks shapes and gradients, which a module with swapped gates, a wrong pooling axis or a
missing residual still passes. Here each reference is the equation (1x1 convs as matrix products, eval-mode BN
as its affine formula, softmax / sigmoid written out), in float64 with seeded random weights and randomised BN
statistics so a skipped BN or a wrong fold shows. Inputs are non-square (H=5, W=7) so an H/W mix-up shows.
Modules registered elsewhere (priors.py) have their own tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detector.models.attention import ATTENTIONS, ECA, CoordAtt, build_attention

Tensor = torch.Tensor
H, W = 5, 7
TOL = {"atol": 1e-10, "rtol": 1e-8}


def randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    """float64, eval mode, every parameter and BN statistic drawn at random (BN is no identity, biases nonzero)."""
    g = torch.Generator().manual_seed(seed)
    module = module.double().eval()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
    return module


def sample(channels: int, h: int = H, w: int = W, seed: int = 1) -> Tensor:
    """A seeded float64 (2, C, h, w) input: batch 2 so a mix-up across images shows."""
    return torch.randn(2, channels, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def lin(x: Tensor, conv: nn.Conv2d, weight: Tensor | None = None) -> Tensor:
    """A 1x1 conv as the matrix product y_o = sum_c W_oc x_c (+ b_o) over dim 1; `weight` overrides conv's."""
    wt = (conv.weight if weight is None else weight)[:, :, 0, 0]
    y = torch.einsum("oc,bc...->bo...", wt, x)
    if conv.bias is not None and weight is None:
        y = y + conv.bias.view(1, -1, *[1] * (x.dim() - 2))
    return y


def bn(x: Tensor, norm: nn.BatchNorm2d) -> Tensor:
    """Eval-mode BatchNorm: gamma (x - mean) / sqrt(var + eps) + beta per channel (dim 1)."""
    shape = (1, -1, *[1] * (x.dim() - 2))
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    return (x - norm.running_mean.view(shape)) * scale.view(shape) + norm.bias.view(shape)


def conv_bn(x: Tensor, block: nn.Sequential, dilation: int = 1) -> Tensor:
    """A k x k conv (no bias) with 'same' padding dilation * (k - 1) / 2, then eval BN. The dilation is the
    equation's, not read from the block, so a block built with another one does not match."""
    conv, norm = block
    k = conv.weight.shape[-1]
    return bn(F.conv2d(x, conv.weight, None, 1, dilation * (k - 1) // 2, dilation), norm)


def sigmoid(x: Tensor) -> Tensor:
    """1 / (1 + e^-x), written out so the reference does not share the module's op."""
    return 1 / (1 + torch.exp(-x))


def softmax(x: Tensor, dim: int) -> Tensor:
    """exp(x) / sum exp(x) along `dim` (max-shifted), written out for the same reason."""
    e = torch.exp(x - x.amax(dim, keepdim=True))
    return e / e.sum(dim, keepdim=True)


def ca_ref(m: CoordAtt, x: Tensor, swap: bool = False) -> Tensor:
    """Hou et al. 2021, eqs. 4-9: z^h = mean over W (C, H), z^w = mean over H (C, W); f = h-swish(BN(F1 [z^h, z^w]));
    g^h = sigmoid(F_h f^h), g^w = sigmoid(F_w f^w); y = x * g^h (per row) * g^w (per column).
    `swap` uses F_w for the row gate and F_h for the column gate (a wrong implementation, must not match)."""
    z_h, z_w = x.mean(3), x.mean(2)  # (B, C, H), (B, C, W)
    conv1, norm, _ = m.squeeze
    f = bn(lin(torch.cat([z_h, z_w], 2), conv1), norm)
    f = f * torch.clamp(f + 3, 0, 6) / 6  # h-swish
    f_h, f_w = f[..., : x.shape[2]], f[..., x.shape[2]:]
    conv_h, conv_w = (m.conv_w, m.conv_h) if swap else (m.conv_h, m.conv_w)
    g_h, g_w = sigmoid(lin(f_h, conv_h)), sigmoid(lin(f_w, conv_w))
    return x * g_h[..., :, None] * g_w[..., None, :]


class SwappedCA(CoordAtt):
    """CA with the row and column gate convs exchanged: shapes still work, the equation does not."""

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        pooled = torch.cat([x.mean(3, keepdim=True), x.mean(2, keepdim=True).transpose(2, 3)], 2)
        y_h, y_w = self.squeeze(pooled).split([h, w], 2)
        return x * self.gate_h(self.conv_w(y_h)) * self.gate_w(self.conv_h(y_w.transpose(2, 3)))


def se_ref(m: nn.Module, x: Tensor) -> Tensor:
    """Hu et al. 2018: s = sigmoid(W2 ReLU(W1 GAP(x))), out = s_c * x_c."""
    fc1, _, fc2 = m.mlp
    z = x.mean((2, 3))
    return x * sigmoid(lin(torch.relu(lin(z, fc1)), fc2))[:, :, None, None]


def cbam_ref(m: nn.Module, x: Tensor) -> Tensor:
    """Woo et al. 2018: M_c = sigmoid(MLP(AvgPool x) + MLP(MaxPool x)), x' = M_c x; then
    M_s = sigmoid(BN(conv7([mean_c x'; max_c x']))) (the BN as in the authors' code), out = M_s x'."""
    fc1, _, fc2 = m.mlp

    def mlp(z: Tensor) -> Tensor:
        return lin(torch.relu(lin(z, fc1)), fc2)

    x = x * sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))[:, :, None, None]
    maps = torch.stack([x.mean(1), x.amax(1)], 1)
    return x * sigmoid(conv_bn(maps, m.spatial))


def eca_kernel(c: int, gamma: int = 2, b: int = 1) -> int:
    """Wang et al. 2020, eq. 12: k = |log2(C) / gamma + b / gamma| taken to the nearest odd number (ties upward,
    as in the authors' code)."""
    t = abs(math.log2(c) / gamma + b / gamma)
    return 2 * math.floor(t / 2) + 1


def eca_ref(m: ECA, x: Tensor) -> Tensor:
    """GAP y (B, C); w_c = sigmoid(sum_j k_j y_{c + j - k // 2}) with zeros past the ends; out = w_c x_c."""
    y = x.mean((2, 3))
    k = eca_kernel(x.shape[1])
    taps = m.conv.weight.view(k)
    padded = F.pad(y, (k // 2, k // 2))
    z = sum(taps[j] * padded[:, j: j + y.shape[1]] for j in range(k))
    return x * sigmoid(z)[:, :, None, None]


def heads_split(t: Tensor, heads: int) -> Tensor:
    """(B, C, ...) -> (B, heads, d, ...): head n owns channels n*d .. (n+1)*d - 1."""
    return t.reshape(t.shape[0], heads, t.shape[1] // heads, *t.shape[2:])


def resampled(weight: Tensor, length: int) -> Tensor:
    """A (1, C, base) embedding linearly resampled to `length` (the modules' documented any-size rule), (C, L)."""
    return F.interpolate(weight, size=length, mode="linear", align_corners=False)[0]


def axis_ref(att: nn.Module, x: Tensor, axis: str) -> Tensor:
    """softmax(q (k + p)^T / sqrt(d)) v per head, tokens the positions along `axis` ('row': along W), keys with
    the axis's learned embedding p."""
    n, c = att.heads, x.shape[1]
    d = c // n
    wq, wk, wv = att.qkv.weight.chunk(3)
    q, k, v = (heads_split(lin(x, att.qkv, wt), n) for wt in (wq, wk, wv))  # (B, n, d, H, W)
    length = x.shape[3] if axis == "row" else x.shape[2]
    p = heads_split(resampled(att.pos.weight, length)[None], n)[0]  # (n, d, L)
    if axis == "row":
        logits = torch.einsum("bndhi,bndhj->bnhij", q, k + p[None, :, :, None, :]) / math.sqrt(d)
        return torch.einsum("bnhij,bndhj->bndhi", softmax(logits, -1), v).reshape_as(x)
    logits = torch.einsum("bndiw,bndjw->bnwij", q, k + p[None, :, :, :, None]) / math.sqrt(d)
    return torch.einsum("bnwij,bndjw->bndiw", softmax(logits, -1), v).reshape_as(x)


def axial_ref(m: nn.Module, x: Tensor, order: tuple[str, str] = ("row", "col")) -> Tensor:
    """Ho et al. 2019 / Axial-DeepLab: attention along each row, then along each column; out = x + BN(W_o y)."""
    y = x
    for axis in order:
        y = axis_ref(getattr(m, axis), y, axis)
    conv, norm = m.proj
    return x + bn(lin(y, conv), norm)


def window_mean(x: Tensor, r: int) -> Tensor:
    """r x r windows at stride r, the bottom/right partial windows averaged over their valid pixels only."""
    rows = [torch.stack([x[..., i: i + r, j: j + r].mean((-2, -1)) for j in range(0, x.shape[3], r)], -1)
            for i in range(0, x.shape[2], r)]
    return torch.stack(rows, -2)


def mhsa_ref(m: nn.Module, x: Tensor, r: int) -> Tensor:
    """BoTNet MHSA with PVT key reduction: q = W_q x at every position, k = W_k pool_r(x) + R_h + R_w,
    v = W_v pool_r(x); per head softmax(q k^T / sqrt(d)) v; out = x + BN(W_o y)."""
    b, c, h, w = x.shape
    n = m.heads
    d = c // n
    keys = window_mean(x, r) if r > 1 else x
    hk, wk = keys.shape[-2:]
    wq, wk_, wv = m.qkv.weight.chunk(3)
    pos = resampled(m.pos_h.weight, hk)[:, :, None] + resampled(m.pos_w.weight, wk)[:, None, :]  # (C, hk, wk)
    q = heads_split(lin(x, m.qkv, wq), n).flatten(3)  # (B, n, d, HW)
    k = heads_split(lin(keys, m.qkv, wk_) + pos, n).flatten(3)
    v = heads_split(lin(keys, m.qkv, wv), n).flatten(3)
    attn = softmax(torch.einsum("bndi,bndj->bnij", q, k) / math.sqrt(d), -1)
    y = torch.einsum("bnij,bndj->bndi", attn, v).reshape(b, c, h, w)
    conv, norm = m.proj
    return x + bn(lin(y, conv), norm)


def ssa_ref(m: nn.Module, x: Tensor) -> Tensor:
    """Mehta & Rastegari 2022 (MobileViTv2): c_s = softmax over the HW tokens of W_I x (C -> 1); context
    c_v = sum_i c_s(i) K_i; out = x + BN(W_o (ReLU(V) * c_v)) (the residual and BN as the docstring states)."""
    c = x.shape[1]
    w_i, w_k, w_v = m.qkv.weight.split([1, c, c])
    b_i, b_k, b_v = m.qkv.bias.split([1, c, c])
    scores = softmax(lin(x, m.qkv, w_i).flatten(2) + b_i[0], -1)  # (B, 1, HW)
    keys = (lin(x, m.qkv, w_k) + b_k[:, None, None]).flatten(2)
    context = (scores * keys).sum(-1)  # (B, C)
    values = lin(x, m.qkv, w_v) + b_v[:, None, None]
    conv, norm = m.proj
    return x + bn(lin(torch.relu(values) * context[:, :, None, None], conv), norm)


def gate_ref(m: nn.Module, x: Tensor) -> Tensor:
    """This project's gate: x * sigmoid(W_f (SiLU(BN(conv3 x)) + SiLU(BN(conv3_dilation2 x))) + b_f)."""

    def silu(t: Tensor) -> Tensor:
        return t * sigmoid(t)

    return x * sigmoid(lin(silu(conv_bn(x, m.local[0])) + silu(conv_bn(x, m.wide[0], dilation=2)), m.fuse))


# name -> (module kwargs, channels, reference(module, x))
REFERENCES: dict[str, tuple[dict, int, Callable[[nn.Module, Tensor], Tensor]]] = {
    "ca": ({}, 16, ca_ref),
    "se": ({}, 16, se_ref),
    "cbam": ({}, 16, cbam_ref),
    "eca": ({}, 128, eca_ref),  # k = 5
    "axial": ({"heads": 4}, 16, axial_ref),
    "mhsa": ({"heads": 4}, 16, lambda m, x: mhsa_ref(m, x, 1)),
    "ssa": ({}, 16, ssa_ref),
    "gate": ({}, 16, gate_ref),
    "none": ({}, 16, lambda m, x: x),
}


def test_every_attention_here_has_a_reference() -> None:
    here = {n for n in ATTENTIONS.names() if ATTENTIONS.get(n).__module__ == "detector.models.attention"}
    assert here == set(REFERENCES)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_module_matches_its_equations(name: str) -> None:
    kwargs, channels, reference = REFERENCES[name]
    module = randomized(build_attention(name, channels, **kwargs))
    x = sample(channels)
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference(module, x), **TOL)


def test_ca_test_catches_swapped_gates() -> None:
    module = randomized(CoordAtt(16))
    swapped = randomized(SwappedCA(16))
    x = sample(16)
    with torch.no_grad():
        torch.testing.assert_close(swapped(x), ca_ref(module, x, swap=True), **TOL)  # same weights, same model
        assert not torch.allclose(swapped(x), ca_ref(module, x), **TOL)
        assert not torch.allclose(module(x), ca_ref(module, x, swap=True), **TOL)


def _plain_ca(m: CoordAtt, x: Tensor) -> Tensor:
    """CA written on the (B, C, H, W) axes, as the module was before it pooled and gated the (B, H, W, C) view."""
    h, w = x.shape[-2:]
    pooled = torch.cat([x.mean(3, keepdim=True), x.mean(2, keepdim=True).transpose(2, 3)], 2)
    y_h, y_w = m.squeeze(pooled).split([h, w], 2)
    return x * m.gate_h(m.conv_h(y_h)) * m.gate_w(m.conv_w(y_w.transpose(2, 3)))


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_ca_on_the_channels_last_view_equals_the_plain_axes_bit_for_bit(memory_format: torch.memory_format) -> None:
    """Training as the trainer runs it (train-mode BN, bf16 autocast): same output, same input and weight
    gradients, and the output keeps the input's memory format."""
    torch.manual_seed(0)
    module = CoordAtt(32).to(memory_format=memory_format)
    x = torch.randn(4, 32, 12, 20).contiguous(memory_format=memory_format).requires_grad_()
    results = []
    for forward in (module, lambda t: _plain_ca(module, t)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(x)
        grads = torch.autograd.grad(out.float().square().sum(), [x, *module.parameters()])
        results.append((out, grads))
    (out, grads), (plain_out, plain_grads) = results
    assert out.is_contiguous(memory_format=memory_format)
    assert torch.equal(out, plain_out) and all(torch.equal(a, b) for a, b in zip(grads, plain_grads))


def test_ca_gates_vary_along_their_own_axis() -> None:
    """The row gate must be constant along W, the column gate along H: pooling the wrong axis breaks this."""
    module = randomized(CoordAtt(16))
    x = sample(16)
    gates = []
    for gate in (module.gate_h, module.gate_w):
        gate.register_forward_hook(lambda mod, inp, out: gates.append(out))
    with torch.no_grad():
        module(x)
    assert gates[0].shape == (2, 16, H, 1) and gates[1].shape == (2, 16, 1, W)


@pytest.mark.parametrize(("c", "k"), [(1, 1), (2, 1), (4, 1), (8, 3), (16, 3), (64, 3), (100, 3), (128, 5),
                                      (256, 5), (512, 5), (1000, 5), (1024, 5), (2048, 7)])
def test_eca_kernel_size_rule(c: int, k: int) -> None:
    assert eca_kernel(c) == k
    assert ECA(c).conv.kernel_size == (k,)


@pytest.mark.parametrize("c", [24, 48, 96, 192, 384, 768])
def test_eca_kernel_is_the_nearest_odd(c: int) -> None:
    t = math.log2(c) / 2 + 0.5
    k = ECA(c).conv.kernel_size[0]
    assert k % 2 == 1 and all(abs(k - t) <= abs(o - t) for o in range(1, 16, 2))


def test_axial_order_is_rows_then_columns() -> None:
    module = randomized(build_attention("axial", 16, heads=4))
    x = sample(16)
    with torch.no_grad():
        y = module(x)
        torch.testing.assert_close(y, axial_ref(module, x), **TOL)
        assert not torch.allclose(y, axial_ref(module, x, ("col", "row")), **TOL)


@pytest.mark.parametrize(("h", "w", "max_kv", "r"), [(5, 7, 6, 3), (9, 11, 16, 3), (8, 8, 16, 2), (5, 7, 35, 1)])
def test_mhsa_pooled_keys_match_the_equations(h: int, w: int, max_kv: int, r: int) -> None:
    """Keys and values from r x r window means (partial edge windows over their valid pixels)."""
    module = randomized(build_attention("mhsa", 16, heads=4, max_kv=max_kv))
    x = sample(16, h, w)
    with torch.no_grad():
        torch.testing.assert_close(module(x), mhsa_ref(module, x, r), **TOL)

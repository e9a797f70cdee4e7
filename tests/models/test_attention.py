"""Every registered attention: shape-preserving at any size, trainable, cheap under bf16; `none` is the identity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from detector.models.attention import ATTENTIONS, AttentionMap, build_attention, fit_heads, kv_pool_factor
from detector.models.registry import MODULES, Registry, UnknownNameError
from model_helpers import assert_every_parameter_learns

SIZES = [(20, 13), (7, 5), (1, 1), (1, 9), (9, 1), (16, 16)]


@pytest.mark.parametrize("name", ATTENTIONS.names())
@pytest.mark.parametrize("channels", [24, 33])
def test_shape_preserved_at_any_size(name: str, channels: int) -> None:
    torch.manual_seed(0)
    module = build_attention(name, channels)
    for h, w in SIZES:
        x = torch.randn(2, channels, h, w)
        for train in (True, False):
            module.train(train)
            y = module(x)
            assert y.shape == x.shape and y.dtype == x.dtype, (name, h, w, train)
            assert torch.isfinite(y).all()


# Parameters whose gradient is zero by construction, but for rounding: CA's squeeze conv has a bias that the
# BatchNorm right after it cancels, as in the paper's code; it stays so that checkpoints of the default load.
CANCELLED = {"ca": frozenset({"squeeze.0.bias"})}


@pytest.mark.parametrize("name", ATTENTIONS.names())
def test_gradients_reach_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    assert_every_parameter_learns(build_attention(name, 32), torch.randn(2, 32, 9, 11),
                                  cancelled=CANCELLED.get(name, frozenset()))


def test_none_is_exactly_identity() -> None:
    x = torch.randn(2, 8, 5, 3)
    module = build_attention("none", 8)
    assert module(x) is x
    assert not list(module.parameters())


@pytest.mark.parametrize("name", ATTENTIONS.names())
def test_bf16_autocast_channels_last(name: str) -> None:
    """Under bf16 autocast every attention gives what it gives in fp32, to bf16's precision (no overflow or NaN in
    its softmax or gates)."""
    torch.manual_seed(0)
    module = build_attention(name, 16).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 10, 7).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), module(x), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("name", ["ca", "se", "cbam", "eca", "gate", "ssa", "edge", "gc"])
def test_attention_maps_are_hookable(name: str) -> None:
    module = build_attention(name, 16)
    maps = []
    for m in module.modules():
        if isinstance(m, AttentionMap):
            m.register_forward_hook(lambda mod, inp, out: maps.append(out))
    module(torch.randn(1, 16, 6, 4))
    assert maps and all(((0 <= m) & (m <= 1)).all() for m in maps)


def test_coordinate_attention_defaults() -> None:
    ca = build_attention("ca", 512)
    assert ca.squeeze[0].out_channels == 512 // 32  # r = 32
    assert build_attention("ca", 64).squeeze[0].out_channels == 8  # at least 8 mid channels


def test_eca_adaptive_kernel() -> None:
    assert build_attention("eca", 64).conv.kernel_size == (3,)  # |log2(64)/2 + 1/2| = 3.5 -> 3
    assert build_attention("eca", 256).conv.kernel_size == (5,)  # 4.5 -> 4 -> odd 5


def test_heads_fall_back_to_a_divisor() -> None:
    assert fit_heads(30, 4) == 3
    assert fit_heads(33, 4) == 3
    assert fit_heads(7, 4) == 1
    assert build_attention("mhsa", 30).heads == 3
    assert build_attention("axial", 64, heads=8).row.heads == 8


def explicit_mhsa(module: torch.nn.Module, x: torch.Tensor, r: int = 1) -> torch.Tensor:
    """MHSA written out: k and v from the input average-pooled by r (ceil mode), softmax(q (k + pos)^T / sqrt(d)) v."""
    b, c, h, w = x.shape
    d = c // module.heads
    pooled = F.avg_pool2d(x, r, r, ceil_mode=True) if r > 1 else x
    hk, wk = pooled.shape[-2:]
    w_q, w_k, w_v = module.qkv.weight.chunk(3)
    q = F.conv2d(x, w_q).reshape(b, module.heads, d, h * w)
    k = F.conv2d(pooled, w_k) + module.pos_h(hk)[:, :, None] + module.pos_w(wk)[:, None, :]
    v = F.conv2d(pooled, w_v).reshape(b, module.heads, d, hk * wk)
    logits = q.transpose(-1, -2) @ k.reshape(b, module.heads, d, hk * wk) / d**0.5  # (B, heads, HW, hk * wk)
    weights = logits.softmax(-1)
    out = (weights @ v.transpose(-1, -2)).transpose(-1, -2).reshape(b, c, h, w)
    return x + module.proj(out)


@pytest.mark.parametrize("size", [(20, 20), (7, 13), (1, 1)])
def test_mhsa_under_the_bound_is_global_attention(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    module = build_attention("mhsa", 32).eval()
    x = torch.randn(2, 32, *size)
    with torch.no_grad():
        torch.testing.assert_close(module(x), explicit_mhsa(module, x), atol=1e-5, rtol=1e-4)


def test_kv_pool_factor_is_the_smallest_that_fits() -> None:
    assert kv_pool_factor(20, 20, 400) == 1 and kv_pool_factor(1, 1, 1) == 1
    assert kv_pool_factor(64, 64, 400) == 4  # 16 x 16 = 256 (r = 3: 22 x 22 = 484)
    assert kv_pool_factor(20, 21, 400) == 2  # 10 x 11
    assert kv_pool_factor(33, 47, 400) == 3  # 11 x 16 = 176 (r = 2: 17 x 24 = 408)
    for h, w, max_kv in [(33, 47, 400), (160, 160, 400), (5, 300, 7), (97, 3, 50), (1000, 1, 10)]:
        r = kv_pool_factor(h, w, max_kv)
        assert -(-h // r) * -(-w // r) <= max_kv
        assert r == 1 or -(-h // (r - 1)) * -(-w // (r - 1)) > max_kv


def sdpa_shapes(module: torch.nn.Module, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The (q, k, v) shapes every scaled_dot_product_attention call of `module(x)` receives."""
    shapes: list[tuple[int, ...]] = []
    fused = F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        shapes.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return fused(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    module(x)
    return shapes


@pytest.mark.parametrize("size,keys", [((64, 64), 16 * 16), ((33, 47), 11 * 16), ((20, 20), 400), ((21, 19), 399)])
def test_mhsa_key_count_over_the_bound(size: tuple[int, int], keys: int, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    module = build_attention("mhsa", 16, heads=2)
    x = torch.randn(2, 16, *size)
    (q, k, v), = sdpa_shapes(module, x, monkeypatch)
    assert q == (2, 2, size[0] * size[1], 8) and k == v == (2, 2, keys, 8)
    assert module(x).shape == x.shape


@pytest.mark.parametrize("size,r", [((64, 64), 4), ((33, 47), 3)])
def test_mhsa_over_the_bound_is_attention_to_pooled_keys(size: tuple[int, int], r: int) -> None:
    torch.manual_seed(0)
    module = build_attention("mhsa", 32).eval()
    x = torch.randn(2, 32, *size)
    with torch.no_grad():
        torch.testing.assert_close(module(x), explicit_mhsa(module, x, r), atol=1e-5, rtol=1e-4)


def test_mhsa_max_kv_bounds_a_large_map() -> None:
    """128 x 128 = 16,384 queries against at most 400 keys (r = 7: 19 x 19): forward + backward stays small."""
    torch.manual_seed(0)
    module = build_attention("mhsa", 16, max_kv=400)
    x = torch.randn(2, 16, 128, 128, requires_grad=True)
    y = module(x)
    (y * torch.randn_like(y)).sum().backward()
    assert y.shape == x.shape and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
    with pytest.raises(ValueError, match="max_kv must be >= 1"):
        build_attention("mhsa", 16, max_kv=0)


def test_mhsa_onnx_matches_over_the_bound(tmp_path) -> None:
    """AveragePool with ceil_mode in onnxruntime averages partial edge windows as PyTorch does (33 x 47: r = 3)."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    module = build_attention("mhsa", 16).eval()
    x = torch.randn(1, 16, 33, 47)
    path = tmp_path / "mhsa.onnx"
    with torch.no_grad():
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=18, input_names=["x"])
        expected = module(x).numpy()
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    assert abs(got - expected).max() < 1e-4


def test_standalone_rows_registered() -> None:
    for row in ["CoordAtt", "SE", "CBAM", "ECA", "MHSA", "Axial", "SSA", "Gate", "Attn", "EdgePrior", "CoordConv",
                "GlobalContext"]:
        assert row in MODULES
        assert MODULES.get(row).channels == "same"


def test_unknown_attention_suggests() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown attention 'cbma' \(did you mean 'cbam'\?\)"):
        build_attention("cbma", 8)


def test_registry_rejects_duplicates() -> None:
    reg: Registry[int] = Registry("thing")
    reg.add("a", 1)
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("a", 2)

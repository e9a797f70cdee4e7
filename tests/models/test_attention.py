"""Every registered attention: shape-preserving at any size, trainable, cheap under bf16; `none` is the identity."""

from __future__ import annotations

import pytest
import torch

from detector.models.attention import ATTENTIONS, AttentionMap, build_attention, fit_heads
from detector.models.registry import MODULES, Registry, UnknownNameError

SIZES = [(20, 13), (7, 5), (1, 1), (16, 16)]


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


@pytest.mark.parametrize("name", ATTENTIONS.names())
def test_gradients_reach_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    module = build_attention(name, 32)
    x = torch.randn(2, 32, 9, 11, requires_grad=True)
    y = module(x)
    (y * torch.randn_like(y)).sum().backward()  # random weights: a plain sum zeroes BN-affine grads
    assert x.grad is not None and x.grad.abs().sum() > 0
    for pname, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname} gets no gradient"


def test_none_is_exactly_identity() -> None:
    x = torch.randn(2, 8, 5, 3)
    module = build_attention("none", 8)
    assert module(x) is x
    assert not list(module.parameters())


@pytest.mark.parametrize("name", ATTENTIONS.names())
def test_bf16_autocast_channels_last(name: str) -> None:
    module = build_attention(name, 16).to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 10, 7).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
    assert y.shape == x.shape


@pytest.mark.parametrize("name", ["ca", "se", "cbam", "eca", "gate", "ssa"])
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


def test_standalone_rows_registered() -> None:
    for row in ["CoordAtt", "SE", "CBAM", "ECA", "MHSA", "Axial", "SSA", "Gate", "Attn"]:
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

"""`model_info` and `count_flops`: the layer table, the summary line, 2 x MACs (attention products included)."""

from __future__ import annotations

import re
from contextlib import nullcontext

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from detector.models.attention import MHSA, Axial
from detector.models.builder import build_model
from detector.models.info import _sdpa_flops, count_flops, forward_flops, model_info
from repo_paths import REPO_ROOT

CONFIGS = REPO_ROOT / "configs" / "models"


def test_count_flops_is_two_macs() -> None:
    conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
    macs = 16 * 3 * 3 * 3 * 32 * 32
    assert count_flops(conv, 32) == 2 * macs / 1e9
    assert count_flops(conv.eval(), 32) == 2 * macs / 1e9 and not conv.training  # the mode it came in, either way
    gray = nn.Conv2d(1, 4, 3, bias=False)
    gray.yaml = {"ch": 1}  # a model built for 1-channel images (DetectionModel keeps its yaml): fed 1 channel
    assert count_flops(gray, 8) == 2 * (4 * 1 * 3 * 3 * 6 * 6) / 1e9


def mhsa_flops(c: int, h: int, w: int, hk: int, wk: int) -> int:
    """MHSA by hand: q conv at every position, k/v convs on the (hk, wk) key grid (one qkv conv when unpooled),
    Q K^T and attn V over all heads (heads * d = c), output 1x1 conv. Pooling, BN, softmax: 0."""
    hw, kv = h * w, hk * wk
    convs = 2 * c * c * hw + 2 * (2 * c) * c * kv + 2 * c * c * hw
    return convs + 2 * (2 * hw * kv * c)


def axial_flops(c: int, h: int, w: int) -> int:
    """Axial by hand: a qkv conv per axis, rows (H sequences of W tokens) then columns (W of H), output 1x1 conv."""
    hw = h * w
    convs = 2 * (2 * (3 * c) * c * hw) + 2 * c * c * hw
    return convs + 2 * (2 * h * w * w * c) + 2 * (2 * w * h * h * c)


@pytest.mark.parametrize("backend", [None, SDPBackend.MATH])  # None: the kernel CPU picks (fused flash here)
@pytest.mark.parametrize(("h", "w", "max_kv", "hk", "wk"), [(9, 11, 400, 9, 11), (9, 11, 16, 3, 4), (5, 7, 400, 5, 7)])
def test_mhsa_flops_count_both_attention_products(h: int, w: int, max_kv: int, hk: int, wk: int,
                                                  backend: SDPBackend | None) -> None:
    module = MHSA(16, heads=4, max_kv=max_kv).eval()
    x = torch.randn(1, 16, h, w)
    with sdpa_kernel(backend) if backend else nullcontext():
        assert forward_flops(module, x) == mhsa_flops(16, h, w, hk, wk)


@pytest.mark.parametrize("backend", [None, SDPBackend.MATH])
@pytest.mark.parametrize(("h", "w"), [(9, 11), (5, 7)])
def test_axial_flops_count_both_attention_products(h: int, w: int, backend: SDPBackend | None) -> None:
    module = Axial(24, heads=4).eval()
    x = torch.randn(1, 24, h, w)
    with sdpa_kernel(backend) if backend else nullcontext():
        assert forward_flops(module, x) == axial_flops(24, h, w)


class SDPA(nn.Module):
    """Bare `scaled_dot_product_attention`, as a module for `forward_flops`."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_sdpa_counted_whatever_the_input_layout() -> None:
    """Contiguous q/k/v run CPU's fused flash kernel (uncounted by FlopCounterMode alone), strided ones the math
    fallback: the count must not depend on which."""
    q = torch.randn(2, 3, 10, 4)
    qt = torch.randn(2, 3, 4, 10).transpose(-1, -2)
    k = torch.randn(2, 3, 6, 4)
    expected = 2 * (2 * 2 * 3 * 10 * 6 * 4)
    assert forward_flops(SDPA(), q, k, k) == forward_flops(SDPA(), qt, k, k) == expected
    v = torch.randn(2, 3, 6, 8)  # values wider than the keys: attention x V is 2 x 10 x 6 x 8 per image and head
    assert forward_flops(SDPA(), q, k, v) == forward_flops(SDPA(), qt, k, v) == 2 * 2 * 3 * 10 * 6 * (4 + 8)


def test_the_fused_sdpa_formula_counts_each_product_at_its_own_width() -> None:
    """The formula for the fused kernels torch leaves uncounted: Q K^T is 2 B Lq Lk E, attention x V 2 B Lq Lk Ev."""
    assert _sdpa_flops((2, 3, 10, 4), (2, 3, 6, 4), (2, 3, 6, 8)) == 2 * 6 * 10 * 6 * 4 + 2 * 6 * 10 * 6 * 8  # B = 2 x 3


@pytest.mark.parametrize("imgsz", [8, 12])
def test_count_flops_of_a_model_with_attention(imgsz: int) -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), Axial(16), MHSA(16, max_kv=16)).train()
    r = 2 if imgsz == 8 else 3  # kv_pool_factor: ceil(s / r)^2 <= 16
    hk = -(-imgsz // r)
    expected = 2 * 16 * 3 * 9 * imgsz**2 + axial_flops(16, imgsz, imgsz) + mhsa_flops(16, imgsz, imgsz, hk, hk)
    assert count_flops(model, imgsz) == expected / 1e9
    assert model.training


def test_model_info_table_and_summary() -> None:
    model = build_model(CONFIGS / "yolo-ca-n.yaml", nc=3)
    text = model_info(model, imgsz=320)
    lines = text.splitlines()
    assert lines[0].split() == ["from", "n", "params", "module", "attention", "arguments"]
    assert len(lines) == 2 + len(model.layers) + 1
    assert "CA_C2f" in text and "Detect" in text
    assert [line.split()[4:7] for line in lines[2:] if "CA_C2f" in line] == [["CA_C2f", "ca", "at"]] * 4
    params = sum(p.numel() for p in model.parameters())
    match = re.fullmatch(r"yolo-ca-n: (\d+) layers, ([\d,]+) parameters, (\d+\.\d) GFLOPs at 320x320", lines[-1])
    assert match, lines[-1]
    assert int(match[1]) == len(model.layers) and match[2] == f"{params:,}"
    assert float(match[3]) == round(count_flops(model, 320), 1)
    spans = [m.span() for m in re.finditer(r"-+", lines[1])]  # column extents from the rule line
    start, end = spans[3]
    table_params = sum(int(line[start:end].replace(",", "")) for line in lines[2:-1])
    assert table_params == params
    assert model.training


def test_layer_table_shows_what_an_override_reached() -> None:
    text = model_info(build_model(CONFIGS / "yolo-ca-n.yaml", nc=3, attention="cbam", attention_at="concat"), imgsz=64)
    assert len(re.findall(r"CA_C2f +cbam at concat", text)) == 4

"""Attention maps: every registered attention yields a map (or channel weights) at its own resolution; the weights
recomputed for the fused mhsa/axial kernels are the ones the kernels use; `detector info` writes the PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from detector.infer.attention_maps import READERS, capture_attention
from detector.models.attention import ATTENTIONS, SE, CoordAtt
from detector.models.builder import build_model

KINDS = [name for name in ATTENTIONS if name != "none"]


def test_every_registered_attention_has_a_reader() -> None:
    assert sorted(READERS) == sorted(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_capture_gives_maps_at_the_module_resolution(kind: str) -> None:
    torch.manual_seed(0)
    model = build_model("yolo-attn-n", nc=2, attention=kind).eval()
    inputs: dict[str, tuple[int, int]] = {}
    hooks = [m.register_forward_hook(lambda m, a, o, p=p: inputs.__setitem__(p, tuple(a[0].shape[2:])))
             for p, m in model.named_modules() if isinstance(m, ATTENTIONS.get(kind))]
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    captures = capture_attention(model, x)
    assert [c.path for c in captures] == list(inputs) and len(captures) == 4  # one per AttnC2f
    assert all(c.kind == kind and c.layer in (2, 4, 6, 8) for c in captures)
    for cap in captures:
        assert cap.spatial is not None and tuple(cap.spatial.shape) == inputs[cap.path]
        assert torch.isfinite(cap.spatial).all()
        if kind in ("se", "eca", "cbam"):
            assert cap.channels is not None and ((cap.channels > 0) & (cap.channels < 1)).all()
    if kind in ("ssa", "mhsa", "gc"):  # attention received, averaged over queries: a distribution over positions
        assert all(c.spatial.sum().item() == pytest.approx(1.0, abs=1e-4) for c in captures)


@pytest.mark.parametrize("kind,size", [("mhsa", (64, 64)), ("mhsa", (160, 224)), ("axial", (64, 64))])
def test_recomputed_weights_are_the_fused_kernels_weights(kind: str, size: tuple[int, int],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Record softmax(q k^T / sqrt(d)) inside every scaled_dot_product_attention call and compare. mhsa at 64 x 64:
    every layer under the max_kv = 400 bound; at 160 x 224 P2 (40 x 56, r = 3, partial windows) and P3 (20 x 28,
    r = 2) attend to pooled keys, P4 and P5 are under the bound."""
    torch.manual_seed(0)
    model = build_model("yolo-attn-n", nc=2, attention=kind).eval()
    with torch.no_grad():  # peaked weights, as trained ones are: at initialization they are near uniform at any scale
        for name, weight in model.named_parameters():
            if name.endswith("qkv.weight"):
                weight.mul_(8)
    recorded: list[torch.Tensor] = []
    fused = F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        recorded.append((q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1))
        return fused(q, k, v, *args, **kwargs)

    x = torch.rand(1, 3, *size)
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        model(x)
    monkeypatch.undo()
    captures = capture_attention(model, x)
    if kind == "mhsa":
        # per AttnC2f (P2, P3, P4, P5): the key grid and the pooling factor r
        key_grids = {(64, 64): [((16, 16), 1), ((8, 8), 1), ((4, 4), 1), ((2, 2), 1)],
                     (160, 224): [((14, 19), 3), ((10, 14), 2), ((10, 14), 1), ((5, 7), 1)]}
        assert [tuple(c.spatial.shape) for c in captures] == [(size[0] // s, size[1] // s) for s in (4, 8, 16, 32)]
        for cap, weights, (grid, r) in zip(captures, recorded, key_grids[size], strict=True):
            # (1, heads, HW, keys) -> mean over heads and queries; the map's window sums are the key weights
            assert weights.shape[-2:] == (cap.spatial.numel(), grid[0] * grid[1])
            per_key = F.avg_pool2d(cap.spatial[None], r, r, ceil_mode=True, divisor_override=1)[0]
            torch.testing.assert_close(per_key, weights.mean((1, 2))[0].view(grid), atol=1e-5, rtol=1e-4)
            assert cap.spatial.sum().item() == pytest.approx(1.0, abs=1e-4)
    else:
        for cap, (rows, cols) in zip(captures, zip(recorded[0::2], recorded[1::2])):
            h, w = cap.spatial.shape
            row_map = rows.mean(2).view(1, -1, h, w).mean(1)[0]  # (1, heads*H, W, W) -> (H, W)
            col_map = cols.mean(2).view(1, -1, w, h).mean(1)[0].T
            torch.testing.assert_close(cap.spatial, row_map * col_map, atol=1e-5, rtol=1e-4)


def test_the_ca_map_is_the_channel_mean_of_its_two_gates() -> None:
    """ca's map is mean_c(a_h * a_w), the share of each position in the gate, not its strongest channel."""
    torch.manual_seed(0)
    module = CoordAtt(16).eval()
    gates: dict[str, torch.Tensor] = {}
    for name in ("gate_h", "gate_w"):
        getattr(module, name).register_forward_hook(lambda m, args, out, n=name: gates.__setitem__(n, out))
    x = torch.randn(1, 16, 6, 10)
    model = torch.nn.Sequential(module).train()
    (cap,) = capture_attention(model, x)
    assert model.training  # run in eval mode, handed back as it came
    assert cap.kind == "ca" and cap.layer == -1 and cap.channels is None  # not under `layers.<i>`
    torch.testing.assert_close(cap.spatial, (gates["gate_h"][0] * gates["gate_w"][0]).mean(0))  # (16, 6, 1) x (16, 1, 10)


def test_the_se_map_weighs_each_channels_magnitude_by_its_gate() -> None:
    """se's map is mean_c(w_c |x_c|): where the channels it keeps are strong, whatever their sign."""
    torch.manual_seed(0)
    module = SE(16).eval()
    x = torch.randn(1, 16, 6, 10)
    (cap,) = capture_attention(torch.nn.Sequential(module), x)
    weights = module.gate(module.mlp(x.mean((2, 3), keepdim=True)))[0]  # (16, 1, 1)
    torch.testing.assert_close(cap.channels, weights.flatten())
    torch.testing.assert_close(cap.spatial, (weights * x[0].abs()).mean(0))


@pytest.mark.parametrize("model_cfg,attention", [("yolo-ca-n", ""), ("yolo-attn-n", "cbam")])
def test_info_writes_one_png_per_attention_layer(tmp_path: Path, model_cfg: str, attention: str, capsys) -> None:
    from detector.api import run_info
    from detector.options import InfoOptions

    image = tmp_path / "image.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 100, 3), dtype=np.uint8)).save(image)
    opts = InfoOptions(model=model_cfg, attention=attention, nc=2, imgsz=64, source=str(image), attention_maps=True,
                       project=str(tmp_path / "info"), name=model_cfg)
    text = run_info(opts)
    assert "parameters" in text and "GFLOPs at 64x64" in text
    kind = attention or "ca"
    written = sorted(p.name for p in (tmp_path / "info" / model_cfg).glob("*.png"))
    assert written == [f"{i:02d}_{kind}_attn_output.png" for i in (2, 4, 6, 8)]
    assert "attention maps: 4 PNG(s)" in capsys.readouterr().out
    with Image.open(tmp_path / "info" / model_cfg / written[0]) as png:
        assert png.size[0] > 200 and png.size[1] > 200

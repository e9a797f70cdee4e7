"""The spatial priors (edge, coord, gc): each matches its paper's equation written out here with fixed weights, keeps
(B, C, H, W) at odd sizes and on length-1 axes, trains its learned parts only, and swaps into a bundled model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from detector.models.attention import ATTENTIONS, AttentionMap, build_attention
from detector.models.builder import build_model
from detector.models.priors import CoordConv, EdgePrior, GlobalContext, coordinate_maps
from detector.models.registry import MODULES
from model_helpers import assert_every_parameter_learns
from repo_paths import REPO_ROOT

CONFIGS = REPO_ROOT / "configs" / "models"
PRIORS = {"edge": EdgePrior, "coord": CoordConv, "gc": GlobalContext}


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fixed non-trivial weights everywhere (BN and LayerNorm affine and running stats included), eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return module.eval()


def bn_eval(y: torch.Tensor, bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    """BatchNorm in eval mode written out."""
    shape = (1, -1, 1, 1)
    scale = bn.weight.view(shape) / (bn.running_var.view(shape) + bn.eps).sqrt()
    return (y - bn.running_mean.view(shape)) * scale + bn.bias.view(shape)


def test_registry_lists_the_priors() -> None:
    assert set(PRIORS) <= set(ATTENTIONS.names())
    for name, cls in PRIORS.items():
        assert ATTENTIONS.get(name) is cls
        assert MODULES.get(cls.__name__).channels == "same"  # also a standalone YAML row


# ---- edge: Sobel gradient magnitude -> 1x1 conv + BN -> sigmoid gate


def sobel_by_slicing(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gx, gy of every channel from the Sobel operator's definition, on the input extended by its border pixels."""
    h, w = x.shape[-2:]
    rows = torch.arange(-1, h + 1).clamp(0, h - 1)
    cols = torch.arange(-1, w + 1).clamp(0, w - 1)
    p = x[..., rows, :][..., cols]  # (B, C, H + 2, W + 2), replicated border

    def at(di: int, dj: int) -> torch.Tensor:  # p[i + 1 + di, j + 1 + dj] for every output pixel (i, j)
        return p[..., 1 + di : 1 + di + h, 1 + dj : 1 + dj + w]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    return gx, gy


@pytest.mark.parametrize("size", [(6, 9), (1, 5), (4, 1)])
def test_edge_is_a_sobel_magnitude_gate(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    module = randomize(EdgePrior(5))
    x = torch.randn(2, 5, *size)
    gx, gy = sobel_by_slicing(x)
    magnitude = (gx**2 + gy**2 + module.eps).sqrt()
    conv, bn = module.fuse
    expected = x * torch.sigmoid(bn_eval(F.conv2d(magnitude, conv.weight), bn))
    with torch.no_grad():
        torch.testing.assert_close(module.magnitude(x), magnitude, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=1e-5)


def test_edge_magnitude_of_a_step() -> None:
    """A vertical step 0 -> 1 between columns 2 and 3: |gx| = 4 on both sides of it, gy = 0, and the image border
    (replicated) is no edge."""
    module = EdgePrior(1)
    x = torch.zeros(1, 1, 5, 6)
    x[..., 3:] = 1
    expected = torch.full((1, 1, 5, 6), module.eps).sqrt()
    expected[..., 2:4] = (16 + module.eps) ** 0.5
    torch.testing.assert_close(module.magnitude(x), expected)
    torch.testing.assert_close(module.magnitude(x.transpose(2, 3)), expected.transpose(2, 3))  # gy for the transpose


def test_edge_sobel_kernels_are_buffers() -> None:
    module = EdgePrior(8)
    assert dict(module.named_buffers())["sobel"].shape == (16, 1, 3, 3)  # gx, gy kernels of each of the 8 channels
    assert all("sobel" not in name for name, _ in module.named_parameters())
    assert not module.sobel.requires_grad
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    assert all(p is not module.sobel for group in optimizer.param_groups for p in group["params"])
    assert "sobel" not in module.state_dict()  # a constant: checkpoints do not carry it
    before = module.sobel.clone()
    module(torch.randn(2, 8, 7, 5)).square().mean().backward()
    optimizer.step()
    torch.testing.assert_close(module.sobel, before, rtol=0, atol=0)  # not trained
    assert module.sobel.grad is None
    moved = module.to(torch.float64)
    assert moved.sobel.dtype == torch.float64
    assert moved(torch.randn(2, 8, 3, 3, dtype=torch.float64)).dtype == torch.float64
    assert module.to("meta").sobel.device.type == "meta"  # follows .to(device)


# ---- coord: x + conv(cat(x, xx, yy))


def test_coordinate_maps_at_exact_positions() -> None:
    x = torch.randn(2, 3, 3, 5)
    maps = coordinate_maps(x)
    assert maps.shape == (2, 2, 3, 5)
    for (i, j), xy in {(0, 0): (-1, -1), (2, 4): (1, 1), (0, 4): (1, -1), (2, 0): (-1, 1), (1, 2): (0, 0)}.items():
        assert maps[1, :, i, j].tolist() == list(xy), (i, j)  # (x, y) of row i, column j
    assert maps[0, 0, 1].tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]  # x varies along W ...
    assert (maps[0, 0] == maps[0, 0, :1]).all() and (maps[0, 1] == maps[0, 1, :, :1]).all()  # ... y along H
    assert maps[0, 1, :, 0].tolist() == [-1.0, 0.0, 1.0]
    assert (coordinate_maps(torch.randn(1, 1, 1, 4))[:, 1] == 0).all()  # a length-1 axis sits at its centre
    assert (coordinate_maps(torch.randn(1, 1, 4, 1))[:, 0] == 0).all()
    assert coordinate_maps(torch.randn(1, 1, 1, 1)).tolist() == [[[[0.0]], [[0.0]]]]
    for dtype in (torch.float64, torch.bfloat16):
        assert coordinate_maps(x.to(dtype)).dtype == dtype
    assert coordinate_maps(x.to("meta")).device.type == "meta"


def coordconv_by_hand(module: CoordConv, x: torch.Tensor, swap: bool = False) -> torch.Tensor:
    """x + SiLU(BN(conv3x3(cat(x, xx, yy)))), xx = 2 j / (W - 1) - 1 along W, yy = 2 i / (H - 1) - 1 along H."""
    b, _, h, w = x.shape
    xx = (2 * torch.arange(w) / (w - 1) - 1).view(1, 1, 1, w).expand(b, 1, h, w)
    yy = (2 * torch.arange(h) / (h - 1) - 1).view(1, 1, h, 1).expand(b, 1, h, w)
    coords = [yy, xx] if swap else [xx, yy]
    conv, bn = module.conv[0]
    return x + F.silu(bn_eval(F.conv2d(torch.cat([x, *coords], 1), conv.weight, padding=1), bn))


def test_coord_is_coordconv() -> None:
    torch.manual_seed(0)
    module = randomize(CoordConv(4))
    x = torch.randn(2, 4, 6, 9)
    with torch.no_grad():
        out = module(x)
        torch.testing.assert_close(out, coordconv_by_hand(module, x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out, coordconv_by_hand(module, x, swap=True), atol=1e-3)  # x and y not swapped


def test_coord_weights_on_the_coordinates_train() -> None:
    module = CoordConv(6)
    y = module(torch.randn(2, 6, 5, 7))
    (y * torch.randn_like(y)).sum().backward()
    assert module.conv[0][0].weight.grad[:, 6:].abs().sum() > 0  # the two coordinate input channels


# ---- gc: x + transform(sum_j softmax(mask(x))_j x_j)


def gc_by_hand(module: GlobalContext, x: torch.Tensor) -> torch.Tensor:
    mask = module.mask
    conv1, norm, _, conv2 = module.transform
    logits = torch.einsum("c,bchw->bhw", mask.weight.flatten(), x)  # no bias: the softmax would cancel it
    weights = logits.flatten(1).softmax(1).view_as(logits)  # over the H*W positions
    context = torch.einsum("bchw,bhw->bc", x, weights)
    t = context @ conv1.weight.flatten(1).T + conv1.bias  # (B, C/r)
    t = (t - t.mean(1, keepdim=True)) / (t.var(1, unbiased=False, keepdim=True) + norm.eps).sqrt()
    t = F.relu(t * norm.weight.flatten() + norm.bias.flatten())
    t = t @ conv2.weight.flatten(1).T + conv2.bias  # (B, C)
    return x + t[:, :, None, None]


@pytest.mark.parametrize("size", [(5, 7), (1, 1), (1, 6)])
def test_gc_is_the_global_context_block(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    module = randomize(GlobalContext(16, reduction=2))
    x = torch.randn(3, 16, *size)
    with torch.no_grad():
        torch.testing.assert_close(module(x), gc_by_hand(module, x), atol=1e-5, rtol=1e-5)


def test_gc_scores_are_a_hookable_softmax_over_positions() -> None:
    module = GlobalContext(16)
    assert isinstance(module.scores, AttentionMap) and module.scores.softmax_dim == -1
    maps = []
    module.scores.register_forward_hook(lambda m, args, out: maps.append(out))
    module(torch.randn(2, 16, 5, 3))
    (scores,) = maps
    assert scores.shape == (2, 1, 15)
    torch.testing.assert_close(scores.sum(-1), torch.ones(2, 1))


def test_gc_bottleneck_width() -> None:
    assert GlobalContext(64).transform[0].out_channels == 8  # 64 / 16 = 4, at least 8
    assert GlobalContext(512).transform[0].out_channels == 32
    assert GlobalContext(64, reduction=4).transform[0].out_channels == 16


# ---- all three


@pytest.mark.parametrize("name", PRIORS)
def test_gradients_reach_the_learned_parts(name: str) -> None:
    torch.manual_seed(0)
    module = build_attention(name, 16)
    assert list(module.parameters())
    assert_every_parameter_learns(module, torch.randn(2, 16, 7, 9))


@pytest.mark.parametrize("name", PRIORS)
def test_prior_swaps_into_a_bundled_model(name: str) -> None:
    model = build_model(CONFIGS / "yolo-ca-n.yaml", nc=3, attention=name)
    assert model.yaml["attention"] == name
    assert set(model.attentions.values()) == {f"{name} at output"}
    assert sum(isinstance(m, PRIORS[name]) for m in model.modules()) == len(model.attentions) == 4
    x = torch.rand(1, 3, 64, 96)
    model.train()
    assert len(model(x)) == model.head.nl
    model.eval()
    with torch.no_grad():
        assert model(x).shape[-1] == 5 + 3


@pytest.mark.parametrize("name", PRIORS)
def test_onnx_with_dynamic_sizes_matches(name: str, tmp_path: Path) -> None:
    """Traced at 7 x 9, run at other sizes: no shape or branch is baked in (coord's maps on a length-1 axis too)."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    module = build_attention(name, 8).eval()
    path = tmp_path / f"{name}.onnx"
    with torch.no_grad():
        torch.onnx.export(module, (torch.randn(1, 8, 7, 9),), str(path), dynamo=False, opset_version=18,
                          input_names=["x"], dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}})
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for b, h, w in [(2, 5, 11), (1, 1, 4), (2, 3, 1), (1, 1, 1)]:
            x = torch.randn(b, 8, h, w)
            (got,) = session.run(None, {"x": x.numpy()})
            assert abs(got - module(x).numpy()).max() < 1e-5, (b, h, w)

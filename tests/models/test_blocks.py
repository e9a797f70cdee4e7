"""blocks.concat: torch.cat's output, and in training a dense gradient for each input in the output's layout."""

from __future__ import annotations

import pytest
import torch

from detector.models import blocks
from detector.models.blocks import C2f, Concat, concat


def _grads_seen_by_inputs(tensors: list[torch.Tensor], cat) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The output of `cat` and the gradient tensor each input's consumer receives (captured by a hook)."""
    seen: list[torch.Tensor | None] = [None] * len(tensors)
    for i, t in enumerate(tensors):
        t.register_hook(lambda g, i=i: seen.__setitem__(i, g))
    out = cat(tensors, 1)
    (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out, seen


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_concat_gives_each_input_a_dense_gradient_in_the_outputs_layout(layout: torch.memory_format) -> None:
    def inputs() -> list[torch.Tensor]:
        torch.manual_seed(0)
        return [torch.randn(2, c, 5, 6).contiguous(memory_format=layout).requires_grad_() for c in (3, 4, 2)]

    plain_in, dense_in = inputs(), inputs()
    plain_out, plain_grads = _grads_seen_by_inputs(plain_in, torch.cat)
    dense_out, dense_grads = _grads_seen_by_inputs(dense_in, concat)
    assert torch.equal(plain_out, dense_out)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, dense_grads))
    if layout == torch.channels_last:  # torch.cat's own backward hands out strided channel slices
        assert not any(g.is_contiguous(memory_format=layout) for g in plain_grads)
    assert all(g.is_contiguous(memory_format=layout) for g in dense_grads)


def test_concat_skips_inputs_without_gradients_and_is_torch_cat_without_autograd() -> None:
    frozen, trained = torch.randn(1, 2, 3, 3), torch.randn(1, 3, 3, 3, requires_grad=True)
    out = concat([frozen, trained], 1)
    assert out.grad_fn is not None and "CatDenseGrads" in type(out.grad_fn).__name__
    out.sum().backward()
    assert torch.equal(trained.grad, torch.ones_like(trained))
    with torch.no_grad():
        assert "CatDenseGrads" not in type(concat([frozen, trained], 1).grad_fn).__name__
    assert concat([frozen, frozen], 1).grad_fn is None


def test_blocks_train_through_concat_with_the_gradients_of_torch_cat(monkeypatch: pytest.MonkeyPatch) -> None:
    """A C2f and a Concat row in float64: the same parameter gradients with blocks.concat as with torch.cat."""
    def grads() -> list[torch.Tensor]:
        torch.manual_seed(3)
        c2f, join = C2f(8, 8, n=2), Concat([8, 8])
        x = torch.randn(2, 8, 12, 10, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        c2f = c2f.double().to(memory_format=torch.channels_last)
        join([c2f(x), x]).square().sum().backward()
        return [p.grad for p in c2f.parameters()]

    dense = grads()
    monkeypatch.setattr(blocks, "concat", lambda tensors, dim=1: torch.cat(list(tensors), dim))
    plain = grads()
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(dense, plain))


@pytest.mark.parametrize(("k", "s", "d", "out"), [(1, 1, 1, 24), (3, 1, 1, 24), (5, 2, 1, 12), (3, 1, 2, 24),
                                                  (2, 2, 1, 12), (4, 4, 1, 6), (3, 2, 3, 12)])
def test_a_conv_row_without_p_keeps_the_size_or_divides_it_by_its_stride(k: int, s: int, d: int, out: int) -> None:
    """autopad: odd kernels (dilated too) keep 24 px at stride 1 and give 24 / s otherwise; an even patchify kernel
    (k = s) divides exactly (YOLOv5's k // 2 would give 13 and 7 for the k=2 and k=4 rows)."""
    conv = blocks.Conv(3, 4, k, s, d=d)
    assert conv(torch.zeros(1, 3, 24, 24)).shape == (1, 4, out, out)


# ---- each block's forward written out with its own submodules


def _eval(module: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    return module.eval()


def test_a_bottleneck_adds_its_input_only_when_asked_and_the_widths_match() -> None:
    """Bottleneck = x + cv2(cv1(x)) with shortcut and equal widths, else cv2(cv1(x))."""
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        same = _eval(blocks.Bottleneck(8, 8, shortcut=True))
        torch.testing.assert_close(same(x), x + same.cv2(same.cv1(x)))
        plain = _eval(blocks.Bottleneck(8, 8, shortcut=False))
        torch.testing.assert_close(plain(x), plain.cv2(plain.cv1(x)))
        assert not blocks.Bottleneck(8, 16, shortcut=True).add


def test_c2f_chains_its_bottlenecks_on_the_last_chunk_and_concatenates_every_one() -> None:
    """cv2(cat(a, b, m0(b), m1(m0(b)))) where (a, b) = cv1(x).chunk(2)."""
    c2f = _eval(C2f(8, 8, n=2))
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        a, b = c2f.cv1(x).chunk(2, 1)
        first = c2f.m[0](b)
        torch.testing.assert_close(c2f(x), c2f.cv2(torch.cat([a, b, first, c2f.m[1](first)], 1)))


def test_sppf_is_three_chained_max_pools_of_its_kernel() -> None:
    """cv2(cat(y, p(y), p(p(y)), p(p(p(y))))) with p a k x k stride-1 max-pool padded k // 2, y = cv1(x)."""
    x = torch.randn(1, 8, 9, 9)
    for k in (3, 5):
        sppf = _eval(blocks.SPPF(8, 8, k))
        pool = lambda t: torch.nn.functional.max_pool2d(t, k, 1, k // 2)  # noqa: E731
        with torch.no_grad():
            y = sppf.cv1(x)
            torch.testing.assert_close(sppf(x), sppf.cv2(torch.cat([y, pool(y), pool(pool(y)), pool(pool(pool(y)))], 1)))


def test_fusing_a_conv_twice_keeps_its_output() -> None:
    """Conv.fuse folds the BN once; a second call (a model fused again) changes nothing."""
    conv = _eval(blocks.Conv(3, 4, 3))
    with torch.no_grad():
        conv.bn.running_mean.uniform_(-1, 1)
        x = torch.randn(1, 3, 8, 8)
        expected = conv(x)
        conv.fuse()
        conv.fuse()
        assert isinstance(conv.bn, torch.nn.Identity)
        torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)


def test_an_explicit_padding_is_used_as_given() -> None:
    """A Conv row's p= replaces autopad: p=2 on a 3x3 kernel grows 24 px to 24 + 2 * 2 - 2 = 26."""
    assert blocks.Conv(3, 4, 3, 1, p=2)(torch.zeros(1, 3, 24, 24)).shape == (1, 4, 26, 26)


def test_set_batchnorm_sets_every_batchnorm_and_leaves_a_none_alone() -> None:
    """Every _BatchNorm (2d and 1d) gets eps and momentum, 0 included; None keeps the value; the count is returned."""
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.LayerNorm(4), torch.nn.BatchNorm1d(4), torch.nn.BatchNorm2d(2))
    assert blocks.set_batchnorm(model, eps=0.01, momentum=0.0) == 3
    assert [(m.eps, m.momentum) for m in model if not isinstance(m, torch.nn.LayerNorm)] == [(0.01, 0.0)] * 3
    blocks.set_batchnorm(model, eps=None, momentum=0.5)
    assert [(m.eps, m.momentum) for m in model if not isinstance(m, torch.nn.LayerNorm)] == [(0.01, 0.5)] * 3


def test_blocks_use_yolov5s_batchnorm_settings() -> None:
    """YOLOv5's BatchNorm2d(eps=0.001, momentum=0.03), in every norm of a built model."""
    from detector.models.builder import build_model

    norms = [m for m in build_model("yolo-ca-n", nc=3).modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all((m.eps, m.momentum) == (1e-3, 0.03) for m in norms)


@pytest.mark.parametrize("scale", [64, 0, True, "2"])
def test_an_upsample_scale_outside_0_32_or_not_a_number_is_refused(scale: object) -> None:
    """An Upsample row's scale must be a number in (0, 32]: 64, 0, a bool and a string are refused; 32 is taken."""
    with pytest.raises(ValueError, match=r"scale_factor must be a number in \(0, 32\]"):
        blocks.Upsample(8, scale)
    assert blocks.Upsample(8, 32).scale_factor == 32.0


def test_concat_rows_join_along_the_channels_only() -> None:
    """A Concat row joins along the channels (1 or -3) only: the builder adds up channel counts."""
    with pytest.raises(ValueError, match="dim must be 1"):
        Concat([8, 8], dim=0)
    assert Concat([8, 8], dim=-3).dim == -3

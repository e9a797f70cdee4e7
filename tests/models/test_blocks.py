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

"""The Detect and DecoupledDetect heads: YOLOv5 decode, anchors in stride units, prior biases, fp32 decode."""

from __future__ import annotations

import math

import pytest
import torch

from detector.models.head import DecoupledDetect, Detect, placeholder_anchors


def make_head(nc: int = 2) -> Detect:
    head = Detect([8, 16], nc, [[10, 13, 16, 30], [40, 50, 30, 61]])
    head.set_stride([8, 16])
    return head


def test_anchors_in_stride_units() -> None:
    head = make_head()
    assert head.anchors[0].tolist() == [[10 / 8, 13 / 8], [16 / 8, 30 / 8]]
    assert torch.allclose(head.anchors_px[1], torch.tensor([[30.0, 61.0], [40.0, 50.0]]))  # sorted by area
    assert head.stride.tolist() == [8.0, 16.0]


def test_set_anchors_px_sorts_and_orders() -> None:
    head = make_head()
    head.set_anchors_px(torch.tensor([[[50.0, 60.0], [40.0, 40.0]], [[12.0, 10.0], [5.0, 6.0]]]))
    assert torch.allclose(head.anchors_px, torch.tensor([[[5.0, 6.0], [12.0, 10.0]], [[40.0, 40.0], [50.0, 60.0]]]))


def test_decode_matches_the_formula() -> None:
    torch.manual_seed(0)
    head = make_head().eval()
    xs = [torch.randn(2, 8, 4, 6), torch.randn(2, 16, 2, 3)]
    out = head(xs)
    assert out.shape == (2, 2 * 24 + 2 * 6, 7)
    head.train()
    raw = head(xs)
    assert raw[0].shape == (2, 2, 4, 6, 7)
    # one row by hand: level 1, anchor 1, y 1, x 2
    t = raw[1][1, 1, 1, 2].sigmoid()
    row = out[1, 2 * 24 + 1 * 6 + 1 * 3 + 2]
    assert torch.allclose(row[0], (2 * t[0] - 0.5 + 2) * 16)
    assert torch.allclose(row[1], (2 * t[1] - 0.5 + 1) * 16)
    assert torch.allclose(row[2], (2 * t[2]) ** 2 * 40)  # level 1 anchors sorted by area: (30, 61), (40, 50)
    assert torch.allclose(row[3], (2 * t[3]) ** 2 * 50)
    assert torch.allclose(row[4:], t[4:])


def test_decode_in_fp32_under_autocast() -> None:
    head = make_head().eval()
    xs = [torch.randn(1, 8, 4, 4), torch.randn(1, 16, 2, 2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(xs)
    assert out.dtype == torch.float32


def test_prior_bias_init() -> None:
    head = Detect([8], 5, [[10, 13, 16, 30]])
    before = head.m[0].bias.detach().clone().view(2, 10)
    head.set_stride([8])
    head.init_biases()
    after = head.m[0].bias.detach().view(2, 10)
    assert torch.allclose(after[:, 4] - before[:, 4], torch.full((2,), math.log(8 / (640 / 8) ** 2)))
    assert torch.allclose(after[:, 5:] - before[:, 5:], torch.full((2, 5), math.log(0.6 / (5 - 0.99999))))
    assert torch.equal(after[:, :4], before[:, :4])


@pytest.mark.parametrize("anchors", [[[10, 13, 16]], [[10, 13], [16, 30]], "3", 0, [[10, -13]], [[10, 0]]])
def test_bad_anchors(anchors: object) -> None:
    with pytest.raises(ValueError, match="anchors"):
        Detect([8], 2, anchors)


def test_placeholder_anchors_spread_geometrically_over_2_5_to_6_3_cells() -> None:
    """Anchor i of na is 2 ** (1 + 2 (i + 0.5) / na) cells, square: na=3 gives 2^(4/3), 4, 2^(8/3)."""
    expected = torch.tensor([[2 ** (4 / 3)] * 2, [4.0, 4.0], [2 ** (8 / 3)] * 2])
    assert torch.allclose(placeholder_anchors(3), expected)
    assert placeholder_anchors(1).tolist() == [[4.0, 4.0]]
    head = Detect([8, 16], 2, anchors=3)
    head.set_stride([8, 16])
    assert torch.allclose(head.anchors_px[1, 0], torch.tensor([16 * 2 ** (4 / 3)] * 2))


def make_decoupled(nc: int = 3) -> DecoupledDetect:
    head = DecoupledDetect([8, 16], nc, [[10, 13, 16, 30], [40, 50, 30, 61]])
    head.set_stride([8, 16])
    head.init_biases()
    return head


def test_decoupled_maps_and_decode_layout() -> None:
    """Train maps carry 4 + nc logits (no objectness); eval gives Detect's (B, N, 5 + nc) with obj = 1, so
    NMS's obj * cls score is the class score, and the box columns decode exactly as Detect's do."""
    torch.manual_seed(0)
    head = make_decoupled().eval()
    xs = [torch.randn(2, 8, 4, 6), torch.randn(2, 16, 2, 3)]
    out = head(xs)
    head.training = True  # raw maps from the same eval-mode BatchNorms
    raw = head(xs)
    assert [tuple(m.shape) for m in raw] == [(2, 2, 4, 6, 7), (2, 2, 2, 3, 7)]
    assert out.shape == (2, 2 * 24 + 2 * 6, 8)
    t = raw[1][1, 1, 1, 2].sigmoid()
    row = out[1, 2 * 24 + 1 * 6 + 1 * 3 + 2]
    assert torch.allclose(row[0], (2 * t[0] - 0.5 + 2) * 16) and torch.allclose(row[3], (2 * t[3]) ** 2 * 50)
    assert row[4] == 1.0 and torch.allclose(row[5:], t[4:])


def test_decoupled_branches_are_separate() -> None:
    """The class logits do not depend on the box branch's weights, nor the box on the class branch's."""
    head = make_decoupled()
    xs = [torch.randn(1, 8, 4, 4), torch.randn(1, 16, 2, 2)]
    before = head(xs)
    with torch.no_grad():
        for p in head.cls.parameters():
            p.add_(0.5)
    after = head(xs)
    for b, a in zip(before, after):
        assert torch.equal(b[..., :4], a[..., :4]) and not torch.allclose(b[..., 4:], a[..., 4:])


def test_decoupled_prior_bias_init() -> None:
    head = make_decoupled(nc=5)
    for branch, s in zip(head.cls, (8, 16)):
        assert torch.allclose(branch[-1].bias, torch.full((2 * 5,), math.log(5 / 5 / (640 / s) ** 2)))
    assert all(torch.equal(b[-1].bias, torch.zeros(2 * 4)) for b in head.m)  # boxes start as the anchors


def test_decoupled_box_width() -> None:
    """box_width sets every box branch's width (0: YOLOv8's rule, 64 at nano widths); the class branches keep theirs."""
    default = DecoupledDetect([32, 64, 128], nc=6, anchors=3)
    narrow = DecoupledDetect([32, 64, 128], nc=6, anchors=3, box_width=32)
    assert [b[0].conv.out_channels for b in default.m] == [64, 64, 64]
    assert [b[0].conv.out_channels for b in narrow.m] == [32, 32, 32]
    assert [b[-1].out_channels for b in narrow.m] == [12, 12, 12]
    assert [c[0].conv.out_channels for c in narrow.cls] == [c[0].conv.out_channels for c in default.cls]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="box_width must be an int >= 0"):
            DecoupledDetect([32, 64], nc=6, anchors=3, box_width=bad)


def test_decoupled_class_width_is_the_input_width_or_the_class_count_up_to_100() -> None:
    """YOLOv8's c3 = max(c_in, min(nc, 100)): many classes widen the class branch, but never beyond 100."""
    widths = {nc: DecoupledDetect([32], nc=nc, anchors=1).cls[0][0].conv.out_channels for nc in (10, 50, 200)}
    assert widths == {10: 32, 50: 50, 200: 100}

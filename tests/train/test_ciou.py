"""detector.train.ciou: torchvision's CIoU loss to the bit, forward and backward, without its host sync."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import complete_box_iou_loss as torchvision_ciou

from detector.train.ciou import complete_box_iou_loss
from host_syncs import host_syncs


def random_pairs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n xyxy box pairs: overlapping, disjoint, nested, touching and identical ones among them."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, 4, generator=g) * 20
    a[:, 2:] += a[:, :2] + 0.05
    b = torch.rand(n, 4, generator=g) * 20
    b[:, 2:] += b[:, :2] + 0.05
    b[: n // 8] = a[: n // 8]  # identical
    b[n // 8 : n // 4, 0] = a[n // 8 : n // 4, 2]  # touching edges: zero overlap
    return a, b


@pytest.mark.parametrize("n", [0, 1, 997, 20_000])
def test_the_loss_and_its_gradients_equal_torchvisions_bit_for_bit(n: int) -> None:
    boxes1, boxes2 = random_pairs(n, seed=n)
    weight = torch.linspace(0.1, 2.0, n)
    results = []
    for loss_fn in (torchvision_ciou, complete_box_iou_loss):
        a, b = boxes1.clone().requires_grad_(), boxes2.clone().requires_grad_()
        loss = loss_fn(a, b)
        (loss * weight).sum().backward()
        results.append((loss.detach(), a.grad, b.grad))
    (loss_tv, grad_a_tv, grad_b_tv), (loss_ours, grad_a, grad_b) = results
    assert torch.equal(loss_ours, loss_tv)
    assert torch.equal(grad_a, grad_a_tv) and torch.equal(grad_b, grad_b_tv)


def test_it_runs_no_op_that_waits_for_the_gpu_where_torchvisions_does() -> None:
    boxes1, boxes2 = random_pairs(64, seed=1)
    assert host_syncs(lambda: complete_box_iou_loss(boxes1, boxes2)) == []
    assert any("boolean index" in op for op in host_syncs(lambda: torchvision_ciou(boxes1, boxes2)))


def test_small_boxes_equal_torchvisions_bit_for_bit_too() -> None:
    """Boxes under a pixel equal torchvision's too: there every eps term it adds moves the last bits."""
    boxes1, boxes2 = random_pairs(997, seed=5)
    boxes1, boxes2 = boxes1 / 40, boxes2 / 40
    assert torch.equal(complete_box_iou_loss(boxes1, boxes2), torchvision_ciou(boxes1, boxes2))

"""Complete-IoU box loss (Zheng et al., "Distance-IoU Loss", AAAI 2020, arXiv 1911.08287) without a host sync.

Why not `torchvision.ops.complete_box_iou_loss`: it writes the intersection through a boolean mask
(`intsctk[mask] = ...`), and a boolean index on CUDA is a `nonzero`, which waits for the GPU to learn the count:
one CPU-GPU sync per call, per level per step in `YoloLoss` and once per step in `AlignedLoss`. Here the same
graph runs with `torch.where` in place of the masked write: the loss and its gradients equal torchvision 0.29's bit
for bit (tested), and the step stays queued.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def complete_box_iou_loss(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """1 - CIoU per pair of float xyxy boxes (..., 4) and (..., 4) -> (...), torchvision's `reduction="none"`.

    The operations (and autograd nodes) are torchvision's, in its order, so that gradients accumulate in the same
    order too; only the masked write is a `torch.where` (no gradient reaches a non-overlapping pair's
    intersection in either)."""
    diou_loss, iou = _diou_iou_loss(boxes1, boxes2, eps)
    x1, y1, x2, y2 = boxes1.unbind(dim=-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(dim=-1)
    w_pred, h_pred = x2 - x1, y2 - y1
    w_gt, h_gt = x2g - x1g, y2g - y1g
    v = (4 / (math.pi**2)) * torch.pow((torch.atan(w_gt / h_gt) - torch.atan(w_pred / h_pred)), 2)
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return diou_loss + alpha * v


def _diou_iou_loss(boxes1: Tensor, boxes2: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(1 - DIoU, IoU) per pair: the IoU less the centres' squared distance over the enclosing box's diagonal."""
    inter, union = _inter_union(boxes1, boxes2)
    iou = inter / (union + eps)
    x1, y1, x2, y2 = boxes1.unbind(dim=-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(dim=-1)
    xc1, yc1 = torch.min(x1, x1g), torch.min(y1, y1g)
    xc2, yc2 = torch.max(x2, x2g), torch.max(y2, y2g)
    diagonal_squared = ((xc2 - xc1) ** 2) + ((yc2 - yc1) ** 2) + eps
    x_p, y_p = (x2 + x1) / 2, (y2 + y1) / 2
    x_g, y_g = (x1g + x2g) / 2, (y1g + y2g) / 2
    centres_squared = ((x_p - x_g) ** 2) + ((y_p - y_g) ** 2)
    return 1 - iou + (centres_squared / diagonal_squared), iou


def _inter_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Intersection and union areas per pair, 0 intersection where the boxes do not overlap (no boolean index)."""
    x1, y1, x2, y2 = boxes1.unbind(dim=-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(dim=-1)
    xkis1, ykis1 = torch.max(x1, x1g), torch.max(y1, y1g)
    xkis2, ykis2 = torch.min(x2, x2g), torch.min(y2, y2g)
    overlaps = (ykis2 > ykis1) & (xkis2 > xkis1)
    inter = torch.where(overlaps, (xkis2 - xkis1) * (ykis2 - ykis1), 0.0)  # torchvision: inter[mask] = ..., a sync
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    return inter, union

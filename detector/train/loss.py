"""YOLOv5-style anchor-based detection loss: target assignment, CIoU box loss, objectness and class BCE.

Assignment follows YOLOv5 v7.0: a target matches an anchor of a level when its width and height are both within a
factor `anchor_t` of the anchor's, and each match is given to the target's own cell plus the two neighbouring cells
nearest to its centre (offset 0.5), which the head can reach because it decodes xy = 2*sigmoid - 0.5 in -0.5..1.5.

Shapes stay static: every target gets `na * 5` candidate rows per level (own cell and the four neighbours) with a
`valid` mask, instead of boolean indexing, so the assignment needs no host sync (no `.item()`, no `nonzero`), has no
Python loop over boxes or images, and keeps fixed shapes for `torch.compile`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from detector.errors import DetectorError
from detector.models.head import DecoupledDetect
from detector.train.ciou import complete_box_iou_loss
from detector.train.loss_aligned import AlignedLoss

# Subtracted from a centre (grid units) to reach: own cell, left, up, right, down neighbour.
_CELL_OFFSETS = ((0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (-0.5, 0.0), (0.0, -0.5))
# Objectness weight per level, finest first (YOLOv5: P3-P5 for three levels, P3-P7 otherwise).
_BALANCE_3 = (4.0, 1.0, 0.4)
_BALANCE_5 = (4.0, 1.0, 0.25, 0.06, 0.02)
# Keeps predicted w, h above 0 so CIoU's aspect term w/h stays finite (exp-style decodes can underflow to 0).
_MIN_WH = 1e-6


class AnchorHead(Protocol):
    """What the loss reads from the Detect head: anchors (nl, na, 2) in grid (stride) units and the class count."""

    anchors: Tensor
    nc: int


class LevelTargets(NamedTuple):
    """Candidate assignments of one level: K = M * na * 5 rows, those with `valid` False are padding.

    image, anchor, cell_y, cell_x: (K,) int64 indices into the level's raw map (B, na, H, W, 5 + nc).
    box: (K, 4) [dx, dy, w, h] in grid units, the centre relative to the cell's corner (-0.5..1.5 for neighbours).
    anchor_wh: (K, 2) the row's anchor in grid units. cls: (K,) int64. valid: (K,) bool.
    """

    image: Tensor
    anchor: Tensor
    cell_y: Tensor
    cell_x: Tensor
    box: Tensor
    anchor_wh: Tensor
    cls: Tensor
    valid: Tensor


class TargetConstants(NamedTuple):
    """What `build_targets` multiplies by for one set of grid shapes, on the anchors' device: the cell offsets
    (5, 2) and each level's (W_l, H_l) (nl, 2), float32. Built from Python numbers they are a blocking host-to-
    device copy on CUDA (a CPU-GPU sync point): `YoloLoss` builds them once per device and shapes and keeps them."""

    offsets: Tensor
    sizes: Tensor


def target_constants(grid_hw: Sequence[tuple[int, int]], device: torch.device) -> TargetConstants:
    """The `TargetConstants` of levels of (H_l, W_l) `grid_hw` on `device`."""
    sizes = torch.tensor([[width, height] for height, width in grid_hw], dtype=torch.float32, device=device)
    return TargetConstants(torch.tensor(_CELL_OFFSETS, dtype=torch.float32, device=device), sizes.view(-1, 2))


def build_targets(
    targets: Tensor, anchors: Tensor, grid_hw: Sequence[tuple[int, int]], anchor_t: float = 4.0,
    constants: TargetConstants | None = None,
) -> list[LevelTargets]:
    """Assign targets to (image, anchor, cell) per level, YOLOv5 rules, vectorized over all targets.

    targets: (M, 6) [batch_index, class, cx, cy, w, h], box normalized to the input image; best on the host in
    pinned memory (the loader's), so that the copy to the anchors' device does not wait for the queued forward.
    anchors: (nl, na, 2) anchor w, h in grid units of each level. grid_hw: (H_l, W_l) per level. constants: the
    `target_constants(grid_hw, anchors.device)` (built here when None).
    A target matches an anchor when max(r, 1/r) < anchor_t for both the w and h ratios r. Besides its own cell it
    takes the left (right) neighbour when its centre lies in the left (right) half of the cell and more than one cell
    from that border, likewise up/down; indices are clamped to the grid.
    """
    device = anchors.device
    # non_blocking: a blocking copy to a GPU would wait for the forward queued before it (a CPU-GPU sync point)
    targets = targets.to(dtype=torch.float32).to(device, non_blocking=True)
    anchors = anchors.float()
    num_targets, num_anchors = targets.shape[0], anchors.shape[1]
    offsets, sizes = target_constants(grid_hw, device) if constants is None else constants
    rows = (num_targets, num_anchors, len(_CELL_OFFSETS))
    image = targets[:, 0].long()[:, None, None].expand(rows).reshape(-1)
    cls = targets[:, 1].long()[:, None, None].expand(rows).reshape(-1)
    anchor = torch.arange(num_anchors, device=device)[None, :, None].expand(rows).reshape(-1)

    levels = []
    for (height, width), level_anchors, size in zip(grid_hw, anchors, sizes, strict=True):
        gxy = targets[:, 2:4] * size  # (M, 2) centre in grid units
        gwh = targets[:, 4:6] * size
        ratio = gwh[:, None, :] / level_anchors[None]  # (M, na, 2)
        matched = torch.maximum(ratio, ratio.reciprocal()).amax(2) < anchor_t  # (M, na)
        gxy_from_end = size - gxy
        near_start = (gxy % 1 < 0.5) & (gxy > 1)  # (M, 2): take left / up neighbour
        near_end = (gxy_from_end % 1 < 0.5) & (gxy_from_end > 1)  # right / down
        cell_used = torch.cat((torch.ones_like(near_start[:, :1]), near_start, near_end), 1)  # (M, 5)

        cells = (gxy[:, None, :] - offsets).long()  # (M, 5, 2)
        cell_x = cells[..., 0].clamp(0, width - 1)
        cell_y = cells[..., 1].clamp(0, height - 1)
        dxy = gxy[:, None, :] - torch.stack((cell_x, cell_y), 2)  # (M, 5, 2)
        box = torch.cat((dxy[:, None].expand(*rows, 2), gwh[:, None, None].expand(*rows, 2)), 3)

        levels.append(
            LevelTargets(
                image=image,
                anchor=anchor,
                cell_y=cell_y[:, None].expand(rows).reshape(-1),
                cell_x=cell_x[:, None].expand(rows).reshape(-1),
                box=box.reshape(-1, 4),
                anchor_wh=level_anchors[None, :, None].expand(*rows, 2).reshape(-1, 2),
                cls=cls,
                valid=(matched[:, :, None] & cell_used[:, None, :]).reshape(-1),
            )
        )
    return levels


def objectness_target(map_shape: Sequence[int], level: LevelTargets, iou: Tensor) -> Tensor:
    """Objectness target (B, na, H, W): the detached IoU (clamped at 0) at assigned cells, 0 elsewhere.

    Several targets can land on one (image, anchor, cell); the highest IoU wins (`scatter_reduce` amax), which is
    deterministic on every device, unlike a plain index_put with repeated indices.
    """
    batch, num_anchors, height, width = map_shape[:4]
    flat = ((level.image * num_anchors + level.anchor) * height + level.cell_y) * width + level.cell_x
    values = torch.where(level.valid, iou.detach().float().clamp(min=0), 0.0)
    target = torch.zeros(batch * num_anchors * height * width, device=iou.device)
    return target.scatter_reduce_(0, flat, values, "amax").view(batch, num_anchors, height, width)


def _xyxy(xy: Tensor, wh: Tensor) -> Tensor:
    return torch.cat((xy - wh / 2, xy + wh / 2), 1)


class YoloLoss:
    """The YOLOv5 v7.0 loss over a head's raw maps: box 1 - CIoU, objectness BCE (target = IoU), class BCE.

    Anchors are read from the head at every call, so auto-anchor changes and device moves made after construction
    are seen. Gains are scaled as YOLOv5's train.py does: box by 3/nl, cls by nc/80 * 3/nl, obj by (imgsz/640)^2 * 3/nl.
    """

    def __init__(
        self,
        head: AnchorHead,
        *,
        box: float = 0.05,
        cls: float = 0.5,
        obj: float = 1.0,
        anchor_t: float = 4.0,
        label_smoothing: float = 0.0,
        imgsz: int = 640,
    ) -> None:
        num_levels = head.anchors.shape[0]
        if num_levels > len(_BALANCE_5):
            raise ValueError(f"YoloLoss supports 1 to {len(_BALANCE_5)} output levels, the head has {num_levels}")
        self.head = head
        self.nc = head.nc
        self.anchor_t = anchor_t
        self.balance = _BALANCE_3 if num_levels == 3 else _BALANCE_5[:num_levels]
        self.box_gain = box * 3 / num_levels
        self.cls_gain = cls * head.nc / 80 * 3 / num_levels
        self.obj_gain = obj * (imgsz / 640) ** 2 * 3 / num_levels
        # Label smoothing as in YOLOv5's smooth_BCE: positive 1 - eps/2, negative eps/2.
        self.cls_positive = 1.0 - 0.5 * label_smoothing
        self.cls_negative = 0.5 * label_smoothing
        self._constants: dict[tuple, TargetConstants] = {}  # per (grid shapes, device): a few under multi_scale

    def set_epoch(self, epoch: int) -> None:
        """The trainer's per-epoch call (`AlignedLoss.set_epoch`); YOLOv5's shape-ratio matching is the same in
        every epoch."""

    def __call__(self, raw_maps: Sequence[Tensor], targets: Tensor) -> tuple[Tensor, Tensor]:
        """raw_maps: nl logits maps (B, na, H_l, W_l, 5 + nc); targets: (M, 6) [batch_index, class, cx, cy, w, h].

        Returns (total, parts): total = (box + obj + cls) * B for backward (the gradient scales with batch size, as
        YOLOv5), parts = detached (3,) [box, obj, cls]. Computed in float32 whatever the autocast dtype of the maps.
        """
        anchors = self.head.anchors
        maps = [p.float() for p in raw_maps]
        self._check_maps(maps, anchors)
        shapes = [(p.shape[2], p.shape[3]) for p in maps]
        levels = build_targets(targets, anchors, shapes, self.anchor_t, self._target_constants(shapes, anchors.device))

        loss_box = loss_obj = loss_cls = maps[0].new_zeros(())
        for p, level, balance in zip(maps, levels, self.balance):
            pred = p[level.image, level.anchor, level.cell_y, level.cell_x]  # (K, 5 + nc)
            valid = level.valid.float()
            num_valid = valid.sum().clamp(min=1)

            box_loss = self._box_loss(pred[:, :4], level)  # 1 - CIoU, (K,)
            loss_box = loss_box + (box_loss * valid).sum() / num_valid
            obj_target = objectness_target(p.shape, level, 1.0 - box_loss)
            loss_obj = loss_obj + balance * F.binary_cross_entropy_with_logits(p[..., 4], obj_target)
            if self.nc > 1:  # a single class is carried by objectness alone
                # a scatter, not F.one_hot: one_hot reads the classes' min and max on the host (on the CPU)
                cls_target = pred.new_zeros(pred.shape[0], self.nc).scatter_(1, level.cls[:, None], 1.0)
                cls_target = self.cls_negative + (self.cls_positive - self.cls_negative) * cls_target
                cls_bce = F.binary_cross_entropy_with_logits(pred[:, 5:], cls_target, reduction="none")
                loss_cls = loss_cls + (cls_bce * valid[:, None]).sum() / (num_valid * self.nc)

        loss_box = loss_box * self.box_gain
        loss_obj = loss_obj * self.obj_gain
        loss_cls = loss_cls * self.cls_gain
        total = (loss_box + loss_obj + loss_cls) * maps[0].shape[0]
        return total, torch.stack((loss_box, loss_obj, loss_cls)).detach()

    @staticmethod
    def _box_loss(pred_box: Tensor, level: LevelTargets) -> Tensor:
        """1 - CIoU per row between the decoded prediction and the target, both in grid units around the cell."""
        pred_xy = pred_box[:, :2].sigmoid() * 2 - 0.5
        pred_wh = (pred_box[:, 2:].sigmoid() * 2) ** 2 * level.anchor_wh + _MIN_WH
        # Padding rows may carry degenerate boxes; give them a unit size so no NaN reaches the masked gradient.
        target_wh = torch.where(level.valid[:, None], level.box[:, 2:], 1.0)
        # detector.train.ciou, not torchvision's: its boolean-mask intersection was one host sync per level on CUDA
        return complete_box_iou_loss(_xyxy(pred_xy, pred_wh), _xyxy(level.box[:, :2], target_wh))

    def _target_constants(self, shapes: list[tuple[int, int]], device: torch.device) -> TargetConstants:
        """`target_constants` built at the first step of each set of map shapes on `device`, then kept."""
        key = (tuple(shapes), device)
        if key not in self._constants:
            self._constants[key] = target_constants(shapes, device)
        return self._constants[key]

    def _check_maps(self, maps: Sequence[Tensor], anchors: Tensor) -> None:
        num_levels, num_anchors = anchors.shape[:2]
        if len(maps) != num_levels:
            raise ValueError(f"YoloLoss got {len(maps)} raw maps for a head with {num_levels} levels")
        for i, p in enumerate(maps):
            if p.dim() != 5 or p.shape[1] != num_anchors or p.shape[4] != 5 + self.nc:
                raise ValueError(
                    f"raw map {i} has shape {tuple(p.shape)}, expected (B, {num_anchors}, H, W, {5 + self.nc})"
                )


def build_loss(head: AnchorHead, *, box: float | None = None, cls: float = 0.5, obj: float = 1.0, anchor_t: float = 4.0,
               label_smoothing: float = 0.0, imgsz: int = 640, static_assign_epochs: int = 0) -> YoloLoss | AlignedLoss:
    """The loss a head's raw maps are for: `AlignedLoss` for `DecoupledDetect`, `YoloLoss` for `Detect`.

    `box=None` takes that loss's reference gain (YOLOv5 0.05 for 1 - CIoU averaged per level, YOLOv8 7.5 for the
    soft-label-weighted sum), since the two gains live on different scales. `static_assign_epochs`: the
    `AlignedLoss` warm-up by anchor-box IoU (`Detect`'s matching never looks at the predictions).
    """
    if isinstance(head, DecoupledDetect):
        if label_smoothing:
            raise DetectorError("label_smoothing applies to the YOLOv5 Detect head only; the DecoupledDetect head's "
                             "class targets are soft IoU-aware labels already")
        return AlignedLoss(head, box=7.5 if box is None else box, cls=cls, anchor_t=anchor_t,
                           static_epochs=static_assign_epochs)
    return YoloLoss(head, box=0.05 if box is None else box, cls=cls, obj=obj, anchor_t=anchor_t,
                    label_smoothing=label_smoothing, imgsz=imgsz)

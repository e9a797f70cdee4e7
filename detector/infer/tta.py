"""Test-time augmentation: a batch at three scales, one of them flipped left-right, each pass's decoded rows mapped
back to the input's pixel frame and concatenated, so the ordinary NMS afterwards merges them (YOLOv5's
`augment=True`, Ultralytics' `_predict_augment`).

The passes are YOLOv5's: scale 1, scale 0.83 flipped, scale 0.67. A scaled pass resizes the batch bilinearly to
(int(H r), int(W r)) and pads it on the right and bottom with the letterbox grey to a multiple of the model's
largest stride, so the content keeps its top-left corner and a box in the pass's pixels maps back by dividing by the
actual per-axis ratio (int(W r) / W, not the nominal r); a flipped pass then mirrors x -> W - x. Objectness and class
scores are left as they are: NMS keeps, for each object, the pass that scored it highest.

As in YOLOv5 (`_clip_augmented`), the first (largest) pass drops its coarsest level's rows and the last (smallest) pass
its finest level's: the large objects come from the downscaled images and the small ones from the full-size one.
On the bundled shapes val set this was worth AP +0.003 to +0.010 over keeping every row (README, Benchmarks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from detector.data.transforms import FILL

__all__ = ["TTA_FLIPS", "TTA_SCALES", "augmented_forward", "descale_rows", "drop_level", "flip_rows_lr", "scale_images"]

TTA_SCALES = (1.0, 0.83, 0.67)  # YOLOv5's; padded to stride 32 the three passes are 2.3x the pixels of one at 256 or 320 px
TTA_FLIPS = (False, True, False)  # the middle scale is the flipped one, as in YOLOv5
PAD_VALUE = FILL / 255  # the letterbox grey in model-input units ([0, 1])


def scale_images(images: torch.Tensor, ratio: float, stride: int) -> tuple[torch.Tensor, tuple[float, float]]:
    """(B, 3, H, W) float images -> (the batch resized by `ratio` and padded right/bottom to a multiple of `stride`,
    the actual (x, y) ratios (new_w / W, new_h / H) that box coordinates were multiplied by). Ratio 1 returns the
    batch itself; channels_last input stays channels_last."""
    if ratio == 1.0:
        return images, (1.0, 1.0)
    h, w = images.shape[-2:]
    new_h, new_w = max(1, int(h * ratio)), max(1, int(w * ratio))
    resized = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False)
    pad_h, pad_w = math.ceil(new_h / stride) * stride - new_h, math.ceil(new_w / stride) * stride - new_w
    padded = F.pad(resized, (0, pad_w, 0, pad_h), value=PAD_VALUE)
    if images.is_contiguous(memory_format=torch.channels_last):
        padded = padded.contiguous(memory_format=torch.channels_last)
    return padded, (new_w / w, new_h / h)


def descale_rows(rows: torch.Tensor, ratio_x: float, ratio_y: float) -> torch.Tensor:
    """Decoded rows (..., 4 + k) [cx, cy, w, h, scores...] in a scaled pass's pixels -> the same rows in the
    unscaled input's pixels (x and w divided by `ratio_x`, y and h by `ratio_y`); a new tensor."""
    if ratio_x == 1.0 and ratio_y == 1.0:
        return rows
    # built on the host and sent without waiting: a plain new_tensor is a blocking copy on CUDA, which held the
    # next pass's launch until this pass's forward had finished on the GPU
    ratios = torch.tensor([ratio_x, ratio_y, ratio_x, ratio_y], dtype=rows.dtype).to(rows.device, non_blocking=True)
    return torch.cat([rows[..., :4] / ratios, rows[..., 4:]], dim=-1)


def flip_rows_lr(rows: torch.Tensor, width: float) -> torch.Tensor:
    """Decoded rows (..., 4 + k) [cx, cy, w, h, ...] of a left-right flipped image of `width` px -> the rows of the
    unflipped image (cx -> width - cx; y, w, h and the scores unchanged); a new tensor. Its own inverse."""
    return torch.cat([width - rows[..., :1], rows[..., 1:]], dim=-1)


def drop_level(rows: torch.Tensor, hw: tuple[int, int], strides: Sequence[int], level: int) -> torch.Tensor:
    """Decoded rows (B, N, k) of an (H, W) = `hw` input, level after level in `strides` order with the same number of
    anchors per cell (the `Detect.decode` layout), without the rows of level `level`. Raises ValueError when N is
    not a whole number of anchors per cell of those levels."""
    h, w = int(hw[0]), int(hw[1])
    cells = [(h // s) * (w // s) for s in strides]
    anchors, extra = divmod(rows.shape[1], sum(cells))
    if extra or anchors == 0 or any(h % s or w % s for s in strides):
        raise ValueError(f"{rows.shape[1]} rows are not levels of strides {list(strides)} at {h}x{w}")
    start = anchors * sum(cells[:level])
    return torch.cat([rows[:, :start], rows[:, start + anchors * cells[level] :]], dim=1)


def augmented_forward(
    model: nn.Module,
    images: torch.Tensor,
    *,
    stride: int | None = None,
    scales: Sequence[float] = TTA_SCALES,
    flips: Sequence[bool] = TTA_FLIPS,
    clip_tails: bool = True,
) -> torch.Tensor:
    """The eval-mode `model` on `images` (B, 3, H, W) at each of `scales` (flipped left-right where `flips` says) ->
    (B, N, 5 + nc) decoded rows [cx, cy, w, h, obj, class scores], every box in the pixels of `images`, for
    `non_max_suppression` to merge: every pass's rows concatenated, less (with `clip_tails` and several passes) the
    first pass's coarsest level and the last pass's finest (see the module docstring; `scales` in decreasing order).
    `model.stride` gives the levels; `stride` (default: its largest) is what a scaled pass is padded to. One forward
    per pass; no loop over boxes."""
    if len(scales) != len(flips) or not scales:
        raise ValueError(f"scales and flips must be non-empty and of one length, got {len(scales)} and {len(flips)}")
    strides = [int(s) for s in model.stride.tolist()]  # a host read of a device buffer (a CPU-GPU sync point, once a batch)
    stride = max(strides) if stride is None else int(stride)
    clip = clip_tails and len(scales) > 1 and len(strides) > 1
    width = images.shape[-1]
    parts = []
    for k, (ratio, flip) in enumerate(zip(scales, flips)):  # one pass per scale
        x = images.flip(-1) if flip else images
        x, (ratio_x, ratio_y) = scale_images(x, float(ratio), stride)
        pred = model(x)
        if clip and k in (0, len(scales) - 1):
            level = strides.index(max(strides)) if k == 0 else strides.index(min(strides))
            pred = drop_level(pred, x.shape[-2:], strides, level)
        rows = descale_rows(pred, ratio_x, ratio_y)
        parts.append(flip_rows_lr(rows, width) if flip else rows)
    return torch.cat(parts, dim=1)

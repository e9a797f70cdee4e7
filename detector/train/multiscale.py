"""Multi-scale training (`multi_scale=`): each batch resized, on the device, to a random side in
imgsz x (1 +/- multi_scale), a multiple of the model's largest stride, as YOLOv5 and Ultralytics do with their
`multi_scale` (their fixed +/- 0.5 is multi_scale=0.5 here). The targets are normalised by the image's width and
height, so they hold through any per-axis scaling unchanged. The side comes from (seed, step), not from global
state: a resumed run, and every rank of a DDP run, draws the same sizes. Off by default: multi_scale=0.5 cost
the hard set 0.046 AP over 60 epochs (README, Training recipe)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def largest_side(imgsz: int, stride: int, fraction: float) -> int:
    """The largest side a batch can be drawn at (what the memory check must allow for)."""
    return max(stride, math.floor(imgsz * (1 + fraction) / stride) * stride)


def draw_side(imgsz: int, stride: int, fraction: float, *, seed: int, step: int) -> int:
    """A side drawn uniformly among the multiples of `stride` in imgsz x [1 - fraction, 1 + fraction]."""
    low = max(stride, math.ceil(imgsz * (1 - fraction) / stride) * stride)
    high = max(low, largest_side(imgsz, stride, fraction))
    rng = np.random.default_rng([seed, step])
    return int(rng.integers(low // stride, high // stride + 1)) * stride


def rescale(images: torch.Tensor, side: int, stride: int) -> torch.Tensor:
    """(B, C, H, W) images scaled (bilinear) so that the long side is `side`, each side rounded up to a multiple
    of `stride`; the same tensor when that is its size already."""
    h, w = images.shape[2:]
    factor = side / max(h, w)
    size = [max(stride, math.ceil(x * factor / stride) * stride) for x in (h, w)]
    if size == [h, w]:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)

"""Boxes drawn onto image tensors by torchvision's `draw_bounding_boxes`: the validation batch grid (TensorBoard at
each validation, plots/val_batch0.jpg at the end) and the label font that `detector predict` draws with too.

Pixels, not a figure: the grid takes milliseconds where the matplotlib figure it replaced took 0.3-0.75 s per
validation of a training run (figure and canvas), a few percent of a short epoch.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert
from torchvision.utils import draw_bounding_boxes, make_grid

GT_COLOUR = (0, 255, 0)  # ground truth, labelled with the class name
PREDICTION_COLOUR = (255, 0, 0)  # detections at or above the grid's score threshold, labelled "name score"


@functools.cache
def font_file() -> str | None:
    """A TrueType font that ships with matplotlib (DejaVu Sans), so labels scale with the image; None (PIL's
    fixed-size default font) where it is missing."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    return str(path) if path.is_file() else None


def val_batch_grid(
    images: torch.Tensor,
    targets: torch.Tensor,
    detections: list[torch.Tensor],
    names: list[str],
    *,
    max_images: int = 16,
    conf: float = 0.25,
    tile_px: int | None = None,
) -> torch.Tensor:
    """The first `max_images` letterboxed batch images (uint8 (B, 3, H, W)), each as a pair: its ground truth on
    the left (green; targets rows [b, class, cx, cy, w, h] normalized) and its detections on the right (red; (K, 6)
    [x1, y1, x2, y2, score, class] in input pixels, score >= conf), so a good prediction does not hide its box.
    Pairs in a grid of ceil(sqrt(n)) columns: uint8 (3, rows x H', columns x 2 W'). `tile_px` scales each image's
    long side to it first (None: as the batch is)."""
    count = min(len(images), max_images)
    height, width = images.shape[2:]
    scale = tile_px / max(height, width) if tile_px else 1.0
    pairs = []
    for i in range(count):
        image = images[i].cpu()
        if scale != 1.0:
            size = (round(height * scale), round(width * scale))
            image = F.interpolate(image[None].float(), size=size, mode="area").round().clamp(0, 255).byte()[0]
        h, w = image.shape[1:]
        gt = targets[targets[:, 0] == i].cpu().float()
        gt_xyxy = box_convert(gt[:, 2:6], "cxcywh", "xyxy") * torch.tensor([w, h, w, h])
        det = detections[i].cpu()
        det = det[det[:, 4] >= conf]
        gt_labels = [names[int(c)] for c in gt[:, 1].tolist()]
        det_labels = [f"{names[int(c)]} {s:.2f}" for s, c in zip(det[:, 4].tolist(), det[:, 5].tolist())]
        pairs.append(torch.cat([_boxes_on(image, gt_xyxy, gt_labels, GT_COLOUR),
                                _boxes_on(image, det[:, :4].float() * scale, det_labels, PREDICTION_COLOUR)], 2))
    return make_grid(pairs, nrow=math.ceil(math.sqrt(count)), padding=0)


def _boxes_on(image: torch.Tensor, boxes_xyxy: torch.Tensor, labels: list[str], colour: tuple[int, int, int]) -> torch.Tensor:
    """`image` (uint8 (3, h, w)) with `boxes_xyxy` (n, 4) px outlined and labelled in `colour`."""
    if not len(boxes_xyxy):
        return image
    font = font_file()
    return draw_bounding_boxes(image, boxes_xyxy, labels, [colour] * len(labels), width=1, font=font,
                               font_size=max(8, round(max(image.shape[1:]) / 30)) if font else None)

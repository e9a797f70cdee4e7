"""Post-processing of decoded predictions: confidence filter and multi-label NMS, independent of the decode.

The model (eval mode) gives one tensor (B, N, 5 + nc): [cx, cy, w, h] in input pixels, objectness probability,
class probabilities. The score of a (box, class) pair is obj * cls_prob, as in YOLOv5.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import torch
from torchvision.ops import batched_nms, box_convert

# Candidates per image kept (highest scores) before NMS: bounds the NMS cost of a barely trained model at conf 0.001,
# whose every anchor passes (16,320 anchors x 6 classes at 256 px with P2). Measured on 2 CPU cores, random scores:
# 402 ms per image at 30,000, 18 ms at 5,000; a trained model has far fewer and its AP is the same at either.
MAX_CANDIDATES = 5_000


def non_max_suppression(
    pred: torch.Tensor,
    *,
    conf: float,
    iou: float,
    max_det: int = 300,
    multi_label: bool = True,
    classes: list[int] | None = None,
    agnostic: bool = False,
) -> list[torch.Tensor]:
    """Per-image detections (K, 6) [x1, y1, x2, y2, score, class] in input pixels, sorted by score, K <= max_det.

    `multi_label` keeps a box once per class whose score exceeds `conf` (what COCO mAP wants); otherwise only its
    best class. `classes` keeps only those class indices; `agnostic` suppresses across classes. Vectorized over
    boxes; one `torchvision.ops.batched_nms` call per image, the images on the torch threads when on the CPU.
    """
    if pred.ndim != 3 or pred.shape[-1] < 6:
        raise ValueError(f"pred must be (B, N, 5 + nc), got {tuple(pred.shape)}")
    batch_size, num_rows, width = pred.shape
    pred = pred.float()
    # Every (box, class) pair's score at once, then the pairs above conf. An objectness pre-filter (obj > conf, which
    # any passing pair implies) gathered every row of a head whose objectness is always 1 (DecoupledDetect): this
    # way the same pairs come in the same order with the same scores, 1.33 -> 1.2 ms an image in all (a 3-epoch
    # model's val outputs at 256 px, 4% of the pairs above conf 0.001, the Sapphire Rapids Xeon).
    scores = pred[..., 5:] * pred[..., 4:5]  # (B, N, nc)
    if multi_label:
        image_idx, row_idx, cls = torch.nonzero(scores > conf, as_tuple=True)
        score = scores[image_idx, row_idx, cls]
    else:
        best, best_cls = scores.max(dim=2)
        image_idx, row_idx = torch.nonzero(best > conf, as_tuple=True)
        score, cls = best[image_idx, row_idx], best_cls[image_idx, row_idx]
    if classes is not None:
        keep = torch.isin(cls, torch.as_tensor(classes, device=cls.device))
        image_idx, row_idx, cls, score = image_idx[keep], row_idx[keep], cls[keep], score[keep]
    boxes = box_convert(pred.reshape(-1, width).index_select(0, image_idx * num_rows + row_idx)[:, :4], "cxcywh", "xyxy")
    found = torch.cat([boxes, score[:, None], cls[:, None].float()], dim=1)
    # nonzero() returns row-major indices, so the candidates are already grouped by image.
    counts = torch.bincount(image_idx, minlength=batch_size).tolist()  # a host sync (nonzero and NMS sync too on CUDA)
    suppress = functools.partial(_suppress, iou=iou, max_det=max_det, agnostic=agnostic)
    per_image = torch.split(found, counts)
    threads = min(torch.get_num_threads(), batch_size) if pred.device.type == "cpu" else 1
    if threads < 2:
        return [suppress(f) for f in per_image]
    # torchvision's CPU NMS runs on one core and releases the GIL: images side by side on the torch threads give
    # the same boxes (tested) in less time on 2 cores (a barely trained model: 5.1 -> 2.8 ms an image before the
    # prefix NMS below, 1.7-1.8 -> 1.4-1.5 ms with it)
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(suppress, per_image))


def _suppress(found: torch.Tensor, *, iou: float, max_det: int, agnostic: bool) -> torch.Tensor:
    """NMS within one image's candidates (K, 6); one call per image keeps torchvision's per-class fallback
    (used above a few thousand boxes) linear in the candidates of that image rather than of the whole batch.

    Greedy NMS decides a box by the higher-scoring boxes alone, so the survivors among the top n candidates are
    the first survivors of all of them: once a prefix yields `max_det`, the rest cannot change the answer. The
    prefix grows from 2 x max_det by 4x; a barely trained model, whose thousands of weak boxes rarely overlap,
    stops at the first (1.0 against 5.2 ms an image for 5,000 candidates at 256 px on one core)."""
    if len(found) > MAX_CANDIDATES:
        found = found[found[:, 4].topk(MAX_CANDIDATES).indices]  # sorted by decreasing score
    else:
        found = found[found[:, 4].argsort(descending=True)]
    groups = torch.zeros_like(found[:, 5]) if agnostic else found[:, 5]
    prefix = 2 * max_det
    while True:
        keep = batched_nms(found[:prefix, :4], found[:prefix, 4], groups[:prefix], iou)  # sorted by decreasing score
        if len(keep) >= max_det or prefix >= len(found):
            return found[keep[:max_det]]
        prefix *= 4

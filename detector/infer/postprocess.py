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
    batch_size = pred.shape[0]
    pred = pred.float()
    table, best_cls = _score_table(pred, multi_label=multi_label, classes=classes)
    # The pairs above conf, row-major, as one sorted index into the (B, C) table; each image's share is a slice of
    # it. Only the pairs an image keeps for NMS gather their boxes: a barely trained model passes most pairs (1.9
    # million of a 32-image batch's 3.1 million at 256 px), and gathering every pair's row took 20 ms a batch.
    flat = (table > conf).reshape(-1).nonzero().squeeze(1)  # a CPU-GPU sync point: the count sizes the result
    score = table.reshape(-1).take(flat)
    width = table.shape[1]
    bounds = torch.searchsorted(flat, torch.arange(batch_size + 1, device=flat.device) * width).tolist()  # a host sync
    per_image = [(pred[i], best_cls[i] if best_cls is not None else None, flat[lo:hi] - i * width, score[lo:hi])
                 for i, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]
    suppress = functools.partial(_suppress, iou=iou, max_det=max_det, agnostic=agnostic)
    threads = min(torch.get_num_threads(), batch_size) if pred.device.type == "cpu" else 1
    if threads < 2:
        return [suppress(*image) for image in per_image]
    # torchvision's CPU NMS runs on one core and releases the GIL: images side by side on the torch threads give
    # the same boxes (tested) in less time on 2 cores (a barely trained model: 5.1 -> 2.8 ms an image before the
    # prefix NMS below, 1.7-1.8 -> 1.4-1.5 ms with it)
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda image: suppress(*image), per_image))


def _score_table(pred: torch.Tensor, *, multi_label: bool, classes: list[int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each image's candidate scores (B, C): every (box, class) pair's obj * cls_prob, column row * nc + class,
    with `multi_label`; else each box's best class score, column row, and that class (B, N). Pairs of classes
    outside `classes` (or boxes whose best class is) score -inf."""
    scores = pred[..., 5:] * pred[..., 4:5]  # (B, N, nc)
    allowed = None
    if classes is not None:
        # on the host, then sent without waiting: `as_tensor(classes, device=cuda)` was a blocking copy per batch
        allowed = torch.isin(torch.arange(scores.shape[-1]), torch.as_tensor(classes)).to(pred.device, non_blocking=True)
    if multi_label:
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        return scores.reshape(len(pred), -1), None
    best, best_cls = scores.max(dim=2)
    if allowed is not None:
        best = best.masked_fill(~allowed[best_cls], float("-inf"))
    return best, best_cls


def _suppress(pred: torch.Tensor, best_cls: torch.Tensor | None, column: torch.Tensor, score: torch.Tensor, *,
              iou: float, max_det: int, agnostic: bool) -> torch.Tensor:
    """NMS within one image: `pred` (N, 5 + nc), its candidates' columns in the score table (`_score_table`) and
    scores, row-major. One call per image keeps torchvision's per-class fallback (used above a few thousand
    boxes) linear in the candidates of that image rather than of the whole batch.

    The best MAX_CANDIDATES by score enter, sorted. Greedy NMS decides a box by the higher-scoring boxes alone, so
    the survivors among the top n candidates are the first survivors of all of them: once a prefix yields
    `max_det`, the rest cannot change the answer. The prefix grows from 2 x max_det by 4x; a barely trained
    model, whose thousands of weak boxes rarely overlap, stops at the first (1.0 against 5.2 ms an image for
    5,000 candidates at 256 px on one core)."""
    order = score.topk(MAX_CANDIDATES).indices if len(score) > MAX_CANDIDATES else score.argsort(descending=True)
    column, score = column[order], score[order]
    nc = pred.shape[1] - 5
    row, cls = (column // nc, column % nc) if best_cls is None else (column, best_cls[column])
    boxes = box_convert(pred.index_select(0, row)[:, :4], "cxcywh", "xyxy")
    found = torch.cat([boxes, score[:, None], cls[:, None].float()], dim=1)
    groups = torch.zeros_like(found[:, 5]) if agnostic else found[:, 5]
    # batched_nms keeps classes apart by shifting each by class x (largest coordinate + 1), enough only when no
    # coordinate is negative: a box reaching past the top-left corner could suppress another class's box. IoU does
    # not change under a translation, so the boxes it sees start at 0.
    nms_boxes = found[:, :4] - found[:, :4].min().clamp(max=0) if len(found) else found[:, :4]
    prefix = 2 * max_det
    while True:
        keep = batched_nms(nms_boxes[:prefix], found[:prefix, 4], groups[:prefix], iou)  # sorted by decreasing score
        if len(keep) >= max_det or prefix >= len(found):
            return found[keep[:max_det]]
        prefix *= 4

"""Task-aligned assignment over anchor boxes, and the loss of the `DecoupledDetect` head.

ATSS (Zhang et al., CVPR 2020) showed that the anchor-based / anchor-free gap is mostly the choice of positives.
Here the positives are chosen as TOOD does (Feng et al., ICCV 2021): each target ranks its candidate anchors by
the alignment t = s^alpha * u^beta (s: the predicted score of the target's class, u: the IoU of the predicted box
with the target) and takes the top k. The candidates are anchor boxes, not points: an anchor is a candidate when
its cell centre lies inside the target box (or its cell holds the target's centre, so a box smaller than a cell
still gets one) and its shape is within `anchor_t` of the target's, the range YOLOv5's bounded decode can reach.
An anchor claimed by several targets goes to the one its prediction overlaps most. In the first
`static_epochs` (the trainer's `static_assign_epochs`) the candidates are ranked, and shared, by the IoU of the
anchor boxes themselves instead, with the predicted box's IoU as the soft label: the ATSS-style warm-up that
PP-YOLOE and YOLOv6 run before their task-aligned epochs, since an untrained model's s and u are both near 0.

The class score is trained toward t normalized per target so that its best anchor's target equals that anchor's
IoU (TOOD's soft label, an IoU-aware score as in VFL/QFL), with BCE over every anchor; the box loss is 1 - CIoU on
the positives weighted by the same soft label. Both are divided by the sum of the soft labels.

Everything is vectorized over targets x anchors (targets of the whole batch in one (M, K) matrix, each row
gathering its own image's predictions): no Python loop over boxes or images. K is each target's own window
(`box_windows`): per level, the anchors its shape fits times the cells its box covers, which hold every anchor
that can be its candidate, so the result is the full (M, N) assignment's from far fewer rows (at most 1,156 of
16,320 at 256 px on a hard-set batch). The windows are built on the host from the loader's targets, so their
data-dependent size costs no device sync. The anchor-box first epoch keeps fixed windows sized by each level's
largest anchor (`window_rows`, 4,872 rows), whose top-k picks among tied anchor IoUs its measured runs trained with
(`AlignedLoss._targets`).

The box loss runs over each target's top-k pairs (M x k), not over all B x N rows: a target's positives are
among its top k, so the sum is the same at a fraction of the CIoU work. Only those pairs are decoded with
gradients; the ranking's decode of every row runs without autograd (loss forward + backward 19-28% cheaper, the
same loss to 1 ulp).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_convert

from detector.models.head import decode_boxes
from detector.train.ciou import complete_box_iou_loss

_EPS = 1e-9
_RANK_PAIRS = 2**18  # (target, anchor) pairs ranked at once in the anchor-box epochs (`assign_static`)
_MIN_WH = 1e-2  # px, keeps decoded widths and heights above 0 (1e-6 is below float32 resolution at 256 px)


class AnchorGridHead(Protocol):
    """What the loss reads from the head: class count, per-row width, level strides and the prior grid."""

    nc: int
    no: int
    na: int
    stride: Tensor
    anchors: Tensor
    anchors_px: Tensor

    def cell_priors(self, shapes: Sequence[tuple[int, int]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]: ...


class Priors(NamedTuple):
    """Per anchor row n of the flattened maps: cell (N, 2) x, y; anchor (N, 2) w, h px; stride (N, 1) px."""

    cell: Tensor
    anchor: Tensor
    stride: Tensor


class Assignment(NamedTuple):
    """Per (image, anchor row): `target` (B, N) index into the batch's targets or -1 (background),
    `score` (B, N) the soft class label of that positive (0 for background). Per target, its top-k ranked
    anchors: `rows` (M, k) flat indices into the batch's B * N rows and `soft` (M, k) their soft labels (0 where
    the anchor is not that target's positive), so the box loss runs over M * k pairs, not B * N rows."""

    target: Tensor
    score: Tensor
    rows: Tensor
    soft: Tensor


class _Grid(NamedTuple):
    """What `AlignedLoss` reads from the head for one set of map shapes (`AlignedLoss._grid`)."""

    key: tuple
    strides: list[float]
    anchors_px: Tensor  # (nl, na, 2) on the host
    image_px: Tensor  # (2,) input width, height on the host
    priors: Priors  # on the maps' device
    own_boxes: Tensor  # (N, 4) each anchor's own box (`anchor_boxes`), for the anchor-box epochs' ranking
    window_sizes: list[tuple[int, int, int, int]]  # the static epoch's fixed windows (`window_sizes`)
    unit_box: Tensor  # (4,) xyxy [0, 0, 1, 1] on the maps' device: what the box loss's unweighted pairs score


class _Targets(NamedTuple):
    """A batch's targets as the assignment takes them: boxes (M, 4) px, image and class (M,), windows (M, K)."""

    gt_xyxy: Tensor
    gt_image: Tensor
    gt_cls: Tensor
    rows: Tensor
    real: Tensor | None  # None: every row of `rows` is real (the fixed windows)


def pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Elementwise IoU of broadcastable xyxy boxes (..., 4) and (..., 4) -> (...). Coordinate by coordinate: on
    the assignment's (M, K) pairs an op over x and y together ((M, K, 2) against (M, 1, 2)) ran 3-4x slower on
    CPU than two over (M, K) planes."""
    ax1, ay1, ax2, ay2 = boxes1.unbind(-1)
    bx1, by1, bx2, by2 = boxes2.unbind(-1)
    inter_w = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp(min=0)
    inter = inter_w * (torch.minimum(ay2, by2) - torch.maximum(ay1, by1)).clamp(min=0)
    area1 = (ax2 - ax1) * (ay2 - ay1)
    area2 = (bx2 - bx1) * (by2 - by1)
    return inter / (area1 + area2 - inter + _EPS)


def gather_rows(table: Tensor, index: Tensor) -> Tensor:
    """Rows of `table` (R, C) at `index` (...) -> (..., C). index_select, not `table[index]`: advanced indexing
    took 2-3x as long on CPU for the assignment's (M, K) gathers."""
    return table.index_select(0, index.reshape(-1)).view(*index.shape, table.shape[-1])


def candidate_mask(gt_xyxy: Tensor, priors: Priors, anchor_t: float) -> Tensor:
    """(M, K) anchors a target may take: cell centre inside the box or cell holding its centre, shape in range.
    `priors` hold one row per anchor (N, ...) shared by every target, or each target's own rows (M, K, ...).
    Computed on x and y planes, as `pairwise_iou` is."""
    cell_x, cell_y = priors.cell.unbind(-1)
    anchor_w, anchor_h = priors.anchor.unbind(-1)
    stride = priors.stride[..., 0]
    gx1, gy1, gx2, gy2 = (c[:, None] for c in gt_xyxy.unbind(-1))
    centre_x, centre_y = (cell_x + 0.5) * stride, (cell_y + 0.5) * stride  # px
    inside = (centre_x > gx1) & (centre_x < gx2) & (centre_y > gy1) & (centre_y < gy2)
    own_cell = (torch.floor((gx1 + gx2) / 2 / stride) == cell_x) & (torch.floor((gy1 + gy2) / 2 / stride) == cell_y)
    ratio_w, ratio_h = (gx2 - gx1) / anchor_w, (gy2 - gy1) / anchor_h
    misfit = torch.maximum(torch.maximum(ratio_w, ratio_w.reciprocal()), torch.maximum(ratio_h, ratio_h.reciprocal()))
    return (inside | own_cell) & (misfit < anchor_t)


def window_sizes(anchors_px: Sequence[Sequence[Sequence[float]]], strides: Sequence[float],
                 shapes: Sequence[tuple[int, int]], anchor_t: float) -> list[tuple[int, int, int, int]]:
    """Per level (half_h, half_w, S_h, S_w): the cells around a target's centre cell that hold all its candidates.

    A candidate's box side is under anchor_t x its anchor's, so its box spans under R = anchor_t x the level's
    largest anchor side / stride cells, and a cell whose centre lies inside it is under R / 2 + 1 cells from the
    centre cell: half = ceil(R / 2) + 1 either side holds them all. A window as large as the grid is the grid.
    """
    sizes = []
    for anchors, stride, (h, w) in zip(anchors_px, strides, shapes):
        half_w, half_h = (math.ceil(anchor_t * max(a[i] for a in anchors) / stride / 2) + 1 for i in (0, 1))
        sizes.append((half_h, half_w, min(2 * half_h + 1, h), min(2 * half_w + 1, w)))
    return sizes


def window_rows(gt_xyxy: Tensor, strides: Sequence[float], shapes: Sequence[tuple[int, int]], na: int,
                sizes: Sequence[tuple[int, int, int, int]]) -> Tensor:
    """(M, K) anchor rows (into one image's N flattened rows, level by level, anchor-major as the head lays them
    out) of each target's windows from `window_sizes`: every anchor that can be its candidate, K << N."""
    gt_centre = (gt_xyxy[:, :2] + gt_xyxy[:, 2:]) / 2
    rows, offset = [], 0
    for stride, (h, w), (half_h, half_w, size_h, size_w) in zip(strides, shapes, sizes):
        cell = torch.floor(gt_centre / stride).long()
        x0 = (cell[:, 0].clamp(0, w - 1) - half_w).clamp(0, w - size_w)  # shifted inside the grid, never shrunk
        y0 = (cell[:, 1].clamp(0, h - 1) - half_h).clamp(0, h - size_h)
        xs = x0[:, None] + torch.arange(size_w, device=gt_xyxy.device)  # (M, S_w)
        ys = y0[:, None] + torch.arange(size_h, device=gt_xyxy.device)
        anchor = torch.arange(na, device=gt_xyxy.device) * (h * w)
        level = anchor[None, :, None, None] + ys[:, None, :, None] * w + xs[:, None, None, :]  # (M, na, S_h, S_w)
        rows.append(level.reshape(len(gt_xyxy), na * size_h * size_w) + offset)
        offset += na * h * w
    return torch.cat(rows, 1)


def box_windows(gt_xyxy: Tensor, strides: Sequence[float], shapes: Sequence[tuple[int, int]], anchors_px: Tensor,
                anchor_t: float) -> tuple[Tensor, Tensor]:
    """(M, K) anchor rows (into one image's N flattened rows, level by level, anchor-major as the head lays them
    out) that can be each target's candidates, and (M, K) which are real: a row shorter than the batch's longest
    is padded with row 0, not real. Per level, a target's rows are the anchors whose shape `candidate_mask` can
    accept (tested a hair wider, so rounding never drops one) times the cells its box covers, which hold every
    cell whose centre lies inside the box and the cell holding its centre. On the hard set's batches K is a
    quarter of a fixed window's, sized by the level's largest anchor (1,156 against 4,872), and the real pairs a
    twenty-third. Each target's rows ascend, as the dense rows do.
    gt_xyxy (M, 4) px and anchors_px (nl, na, 2) on the host: the sizes are data, read without a device sync."""
    counts, firsts, widths, cols = [], [], [], []
    box_wh = (gt_xyxy[:, 2:] - gt_xyxy[:, :2])[:, None]  # (M, 1, 2)
    offset = 0
    for stride, (h, w), level_anchors in zip(strides, shapes, anchors_px):
        lo = torch.floor(gt_xyxy[:, :2] / stride).clamp(min=0)
        hi = torch.minimum(torch.floor(gt_xyxy[:, 2:] / stride), gt_xyxy.new_tensor([w - 1, h - 1]))
        span = (hi - lo + 1).clamp(min=0).long()  # (M, 2) cells in x and y
        ratio = box_wh / level_anchors
        fits = torch.maximum(ratio, ratio.reciprocal()).amax(-1) < anchor_t * (1 + 1e-4)  # (M, na)
        counts.append(fits * (span[:, 0] * span[:, 1])[:, None])
        first_cell = offset + (lo[:, 1] * w + lo[:, 0]).long()
        na = len(level_anchors)
        firsts.append(first_cell[:, None] + torch.arange(na) * (h * w))
        widths.append(span[:, :1].expand(-1, na))
        cols.append(torch.full((len(gt_xyxy), na), w))
        offset += na * h * w
    count = torch.cat(counts, 1)  # (M, S): one segment per target, level and anchor
    pair_segment = torch.repeat_interleave(count.reshape(-1))
    segment_start = count.reshape(-1).cumsum(0) - count.reshape(-1)
    index = torch.arange(len(pair_segment)) - segment_start[pair_segment]  # the pair's cell inside its box, row-major
    span_x, grid_w = torch.cat(widths, 1).reshape(-1)[pair_segment], torch.cat(cols, 1).reshape(-1)[pair_segment]
    row = torch.cat(firsts, 1).reshape(-1)[pair_segment] + index // span_x * grid_w + index % span_x
    target = pair_segment // count.shape[1]
    column = (count.cumsum(1) - count).reshape(-1)[pair_segment] + index
    k = max(int(count.sum(1).max()) if len(count) else 0, 1)  # one padded column at least: reductions over K
    rows = torch.zeros(len(gt_xyxy), k, dtype=torch.long)
    real = torch.zeros(len(gt_xyxy), k, dtype=torch.bool)
    rows[target, column] = row
    real[target, column] = True
    return rows, real


def anchor_boxes(priors: Priors) -> Tensor:
    """Each anchor row's own box (N, 4) xyxy px: what the bounded decode gives for sigmoid 0.5 (the anchor
    centred on its cell). The anchor-box epochs rank by its IoU; it depends on the grid alone, so the loss builds
    it once per grid and gathers it with the priors."""
    return box_convert(decode_boxes(priors.anchor.new_full((*priors.anchor.shape[:-1], 4), 0.5), *priors), "cxcywh", "xyxy")


@torch.no_grad()
def assign_aligned(
    pred_scores: Tensor,
    pred_xyxy: Tensor,
    gt_image: Tensor,
    gt_cls: Tensor,
    gt_xyxy: Tensor,
    priors: Priors,
    *,
    topk: int = 10,
    alpha: float = 0.5,
    beta: float = 6.0,
    anchor_t: float = 4.0,
    rows: Tensor | None = None,
    real: Tensor | None = None,
) -> Assignment:
    """Task-aligned positives for a batch. pred_scores (B, N, nc) probabilities; pred_xyxy (B, N, 4) px;
    gt_image, gt_cls (M,) int64; gt_xyxy (M, 4) px; rows (M, K) the anchor rows each target scores, `real`
    (M, K) which of them count (every row when None; `box_windows` gives the same positives from far fewer).
    Returns the `Assignment`, soft labels as TOOD's: t rescaled per target so that its best positive gets that
    positive's IoU."""
    batch, num_rows, nc = pred_scores.shape
    if rows is None:  # every row for every target: the (N, ...) priors broadcast
        rows = torch.arange(num_rows, device=gt_xyxy.device).expand(len(gt_xyxy), num_rows)
    else:
        priors = Priors(*_gather_tables(priors, rows))
    flat = gt_image[:, None] * num_rows + rows  # (M, K) into the batch's B * N rows
    iou = pairwise_iou(gt_xyxy[:, None, :], gather_rows(pred_xyxy.reshape(-1, 4), flat))
    candidate = candidate_mask(gt_xyxy, priors, anchor_t)
    if real is not None:
        candidate &= real
    metric = pred_scores.reshape(-1).take(flat * nc + gt_cls[:, None]).pow(alpha) * iou.pow(beta)
    # Candidates rank above every other anchor even at metric 0, so a target with any candidate gets positives.
    top = torch.where(candidate, metric, -1.0).topk(min(topk, rows.shape[1]), dim=1).indices  # (M, k)
    flat, iou, metric = flat.gather(1, top), iou.gather(1, top), metric.gather(1, top)
    positive, owner = _owned(candidate.gather(1, top), flat, iou, batch * num_rows)
    metric = metric * positive
    peak_iou = (iou * positive).amax(1, keepdim=True)
    soft = metric * peak_iou / (metric.amax(1, keepdim=True) + _EPS)
    return _assignment(owner, flat, soft, batch, num_rows)


@torch.no_grad()
def assign_static(
    pred_xyxy: Tensor,
    gt_image: Tensor,
    gt_xyxy: Tensor,
    priors: Priors,
    own_boxes: Tensor,
    *,
    topk: int = 10,
    anchor_t: float = 4.0,
    rows: Tensor | None = None,
) -> Assignment:
    """The anchor-box epochs' positives (`AlignedLoss.static_epochs`): candidates ranked, and shared, by the IoU of
    the anchor boxes themselves (`own_boxes`, (N, 4) from `anchor_boxes`), not by the predictions; the predicted
    box's IoU is the soft label. Arguments as `assign_aligned`'s. The predictions rank nothing here, so only the
    top k's are read, and the anchors' own boxes come from the grid rather than a decode per pair: the same
    assignment as ranking every pair's predicted and own box, and the loss's forward and backward 65-83 -> 40-43
    ms on hard-set batches of 148-219 targets (2-core AMD EPYC Zen 4, six real batches, bit-identical losses and
    gradients)."""
    batch, num_rows = pred_xyxy.shape[:2]
    if rows is None:
        rows = torch.arange(num_rows, device=gt_xyxy.device).expand(len(gt_xyxy), num_rows)
    k = min(topk, rows.shape[1])
    # Ranked a slice of targets at a time: the same per-target top k, from a gathered table of at most
    # _RANK_PAIRS pairs (9.4 MB). Whole, the hard set's (219, 4,872, 9) table was 38 MB, above glibc's largest
    # mmap threshold, so each step mapped and faulted in 18 MB of fresh pages (4,600 faults).
    chunk = max(1, _RANK_PAIRS // rows.shape[1])
    ranked = [_rank_by_anchor_boxes(gt_xyxy[i:i + chunk], rows[i:i + chunk], (*priors, own_boxes), k, anchor_t)
              for i in range(0, max(len(gt_xyxy), 1), chunk)]  # one empty slice when there are no targets
    top_rows, candidate, overlap = (torch.cat(parts) for parts in zip(*ranked))
    flat = gt_image[:, None] * num_rows + top_rows
    positive, owner = _owned(candidate, flat, overlap, batch * num_rows)
    soft = pairwise_iou(gt_xyxy[:, None, :], gather_rows(pred_xyxy.reshape(-1, 4), flat)).clamp(min=0.0) * positive
    return _assignment(owner, flat, soft, batch, num_rows)


def _rank_by_anchor_boxes(gt_xyxy: Tensor, rows: Tensor, tables: Sequence[Tensor], k: int,
                          anchor_t: float) -> tuple[Tensor, Tensor, Tensor]:
    """Each target's k best anchors of its `rows` (M, K) by the IoU of their own boxes, candidates first: their
    rows, candidacy and IoU (M, k). `tables`: the priors' three and the anchors' own boxes, (N, ...) each."""
    *gathered, own_boxes = _gather_tables(tables, rows)
    candidate = candidate_mask(gt_xyxy, Priors(*gathered), anchor_t)
    overlap = pairwise_iou(gt_xyxy[:, None, :], own_boxes)
    top = torch.where(candidate, overlap, -1.0).topk(k, dim=1).indices
    return rows.gather(1, top), candidate.gather(1, top), overlap.gather(1, top)


def _gather_tables(tables: Sequence[Tensor], rows: Tensor) -> list[Tensor]:
    """Per-row tables (N, C_i) at `rows` (M, K) -> (M, K, C_i) each, by one gather of the tables side by side (a
    5-column index_select took 0.9 ms on the hard set's (148, 4872) rows, three separate ones 2.0 ms)."""
    return list(gather_rows(torch.cat(list(tables), -1), rows).split([t.shape[-1] for t in tables], -1))


def _assignment(owner: Tensor, flat: Tensor, soft: Tensor, batch: int, num_rows: int) -> Assignment:
    """The `Assignment` of (M, k) pairs at batch rows `flat` with their soft labels."""
    score_flat = soft.new_zeros(batch * num_rows).scatter_add_(0, flat.reshape(-1), soft.reshape(-1))
    return Assignment(target=owner.view(batch, num_rows), score=score_flat.view(batch, num_rows), rows=flat, soft=soft)


def _owned(positive: Tensor, flat: Tensor, overlap: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """One target per anchor: of the (M, k) `positive` pairs at batch rows `flat`, the one with the highest
    `overlap` keeps each anchor; ties go to the later target (a deterministic scatter amax). Returns the pairs
    kept (M, k) and each batch row's target (-1: background)."""
    best = overlap.new_full((num_rows,), -1.0)
    best.scatter_reduce_(0, flat.reshape(-1), torch.where(positive, overlap, -1.0).reshape(-1), "amax")
    wins = positive & (overlap >= best[flat])
    target_index = torch.arange(flat.shape[0], device=flat.device)[:, None].expand_as(flat)
    owner = torch.full((num_rows,), -1, dtype=torch.long, device=flat.device)
    owner.scatter_reduce_(0, flat.reshape(-1), torch.where(wins, target_index, -1).reshape(-1), "amax")
    return wins & (owner[flat] == target_index), owner


def _decoded_xyxy(box_logits: Tensor, priors: Priors) -> Tensor:
    """Box logits (..., 4) -> xyxy px by the head's bounded decode, widths and heights at least `_MIN_WH`: a
    sigmoid that underflows to 0 gives a zero width, and CIoU's aspect term w / h a 0 / 0."""
    boxes = decode_boxes(box_logits.sigmoid(), *priors)
    return box_convert(torch.cat((boxes[..., :2], boxes[..., 2:].clamp(min=_MIN_WH)), -1), "cxcywh", "xyxy")


class AlignedLoss:
    """Loss for `DecoupledDetect` maps: task-aligned positives, BCE toward the soft label, weighted 1 - CIoU.

    Gains as YOLOv8 uses for this pair of losses (box 7.5, cls 0.5); the total is multiplied by the batch size,
    as `YoloLoss` is, so the optimizer settings carry over.
    """

    def __init__(self, head: AnchorGridHead, *, box: float = 7.5, cls: float = 0.5, anchor_t: float = 4.0,
                 topk: int = 10, alpha: float = 0.5, beta: float = 6.0, static_epochs: int = 0) -> None:
        self.head = head
        self.box_gain, self.cls_gain = box, cls
        self.assign_kw = dict(topk=topk, alpha=alpha, beta=beta, anchor_t=anchor_t)
        self.static_epochs = static_epochs
        self.set_epoch(0)
        self._grid_cache: _Grid | None = None

    def set_epoch(self, epoch: int) -> None:
        """Choose the assignment for this (0-based) epoch: by the anchor boxes' IoU for the first `static_epochs`,
        task-aligned after. Why: the task-aligned ranking starts from the untrained model's own scores and boxes,
        so the moment its class scores start to learn hangs on float rounding (the same seed's 7-epoch demo ended
        at 0.40 to 0.56 AP); PP-YOLOE and YOLOv6 warm up with ATSS for the same reason."""
        self.static = epoch < self.static_epochs

    def _grid(self, shapes: list[tuple[int, int]], device: torch.device) -> _Grid:
        """The head's strides, anchors and input size on the host and its priors on `device` for maps of
        `shapes`, rebuilt only when the shapes, anchors or strides change: reading them on every step would be a
        device sync, and building the priors took a millisecond."""
        head = self.head
        key = (tuple(shapes), device, head.anchors.data_ptr(), head.anchors._version, head.stride._version)
        if self._grid_cache is None or self._grid_cache.key != key:
            stride_list = head.stride.float().cpu().tolist()
            image_px = torch.tensor([shapes[0][1], shapes[0][0]], dtype=torch.float32) * stride_list[0]
            anchors_px = head.anchors_px.float().cpu()
            priors = Priors(*head.cell_priors(shapes, device))
            self._grid_cache = _Grid(key, stride_list, anchors_px, image_px, priors, anchor_boxes(priors),
                                     window_sizes(anchors_px.tolist(), stride_list, shapes, self.assign_kw["anchor_t"]),
                                     torch.tensor([0.0, 0.0, 1.0, 1.0], device=device))  # a blocking copy, once per grid
        return self._grid_cache

    def _targets(self, targets: Tensor, grid: _Grid, shapes: list[tuple[int, int]], device: torch.device) -> _Targets:
        """The batch's targets in px and each one's anchor window (`box_windows`, or `window_rows` in the anchor-box
        epoch), built on the host and moved to `device`: give host targets, as the trainer does, and no step waits
        on the device."""
        host = targets.detach().to("cpu", torch.float32)
        gt_xyxy = box_convert(host[:, 2:6] * grid.image_px.repeat(2), "cxcywh", "xyxy")
        if self.static:
            # The anchor-box epoch keeps the fixed windows (`window_rows`): its anchor IoUs tie often, top-k's pick
            # among ties depends on the rows' layout, and this layout's picks are the ones every measured run was
            # trained with. Ties broken toward the lower row over the per-target windows instead gave the hard set's
            # 60 epochs AP 0.562 and 0.556 (seeds 0, 1) against 0.585 and 0.565, APl 0.725 and 0.682 against 0.837 and
            # 0.909 (the Sapphire Rapids Xeon, 2026-12-06): one epoch's 2.6% of positives, too close to call noise.
            rows, real = window_rows(gt_xyxy, grid.strides, shapes, self.head.na, grid.window_sizes), None
        else:
            rows, real = box_windows(gt_xyxy, grid.strides, shapes, grid.anchors_px, self.assign_kw["anchor_t"])
        image, cls = host[:, 0].long(), host[:, 1].long()
        # non_blocking: a blocking copy to a GPU waits for the forward queued before it; these host tensors are
        # pageable, so CUDA stages them at once and they may go
        moved = [t.to(device, non_blocking=True) for t in (gt_xyxy, image, cls, rows, real) if t is not None]
        return _Targets(*moved[:4], moved[4] if real is not None else None)

    def __call__(self, raw_maps: Sequence[Tensor], targets: Tensor) -> tuple[Tensor, Tensor]:
        """raw_maps: nl maps (B, na, H_l, W_l, 4 + nc) logits; targets (M, 6) [batch_index, class, cx, cy, w, h]
        normalized, best on the host (`_targets`). Returns (total for backward, detached (3,) [box, obj, cls]) in
        float32, the parts laid out as `YoloLoss`'s for the logs; obj is always 0, the class score carries
        objectness."""
        head = self.head
        batch = raw_maps[0].shape[0]
        # (B, N, 4) and (B, N, nc), each contiguous: a sigmoid or BCE over a strided slice ran 2-4x slower
        box_logits = torch.cat([p[..., :4].reshape(batch, -1, 4) for p in raw_maps], 1).float()
        cls_logits = torch.cat([p[..., 4:].reshape(batch, -1, head.nc) for p in raw_maps], 1).float()
        shapes = [(p.shape[2], p.shape[3]) for p in raw_maps]
        grid = self._grid(shapes, cls_logits.device)
        priors = grid.priors
        gt_xyxy, gt_image, gt_cls, rows, real = self._targets(targets, grid, shapes, cls_logits.device)
        with torch.no_grad():  # every row's box, for the ranking only: the box loss decodes its own rows below
            pred_xyxy = _decoded_xyxy(box_logits, priors)
        if self.static:
            assigned = assign_static(pred_xyxy, gt_image, gt_xyxy, priors, grid.own_boxes, rows=rows,
                                     topk=self.assign_kw["topk"], anchor_t=self.assign_kw["anchor_t"])
        else:
            assigned = assign_aligned(cls_logits.detach().sigmoid(), pred_xyxy, gt_image, gt_cls, gt_xyxy, priors,
                                      rows=rows, real=real, **self.assign_kw)

        owner_cls = gt_cls[assigned.target.clamp(min=0)] if len(gt_cls) else torch.zeros_like(assigned.target)
        cls_target = torch.zeros_like(cls_logits).scatter_(-1, owner_cls[..., None], assigned.score[..., None])
        norm = assigned.score.sum().clamp(min=1.0)
        loss_cls = F.binary_cross_entropy_with_logits(cls_logits, cls_target, reduction="sum") / norm

        # The box loss runs over each target's top-k anchors, weighted by their soft labels; the others score a
        # constant unit box against itself: no gradient reaches them, and no NaN from an arbitrary box either.
        # Decoding only those M x k rows keeps the decode of all B x N rows out of the backward pass.
        weighted = (assigned.soft > 0)[..., None]
        unit = grid.unit_box  # kept with the grid: a new_tensor here was a blocking host-to-device copy per step
        top_priors = Priors(*(gather_rows(p, assigned.rows % box_logits.shape[1]) for p in priors))
        top_boxes = _decoded_xyxy(gather_rows(box_logits.reshape(-1, 4), assigned.rows), top_priors)
        box_pred = torch.where(weighted, top_boxes, unit)
        box_target = torch.where(weighted, gt_xyxy[:, None], unit)
        ciou = complete_box_iou_loss(box_pred.reshape(-1, 4), box_target.reshape(-1, 4))
        loss_box = (ciou * assigned.soft.reshape(-1)).sum() / norm

        loss_box, loss_cls = loss_box * self.box_gain, loss_cls * self.cls_gain
        return (loss_box + loss_cls) * batch, torch.stack((loss_box, torch.zeros_like(loss_box), loss_cls)).detach()

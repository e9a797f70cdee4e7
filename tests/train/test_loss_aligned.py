"""AlignedLoss, assign_aligned and assign_static: hand-computed positives, a perfect prediction, conflicts, empty
batches."""

from __future__ import annotations

import math

import pytest
import torch

from torchvision.ops import box_convert, complete_box_iou_loss

from detector.models.head import DecoupledDetect, Detect, decode_boxes
from detector.train import loss_aligned
from detector.train.loss import YoloLoss, build_loss
from detector.train.loss_aligned import (
    AlignedLoss,
    Priors,
    anchor_boxes,
    assign_aligned,
    assign_static,
    box_windows,
    candidate_mask,
    gather_rows,
    pairwise_iou,
    window_rows,
    window_sizes,
)

ANCHORS_PX = [[16, 16], [48, 48], [128, 128]]  # one square anchor per level
STRIDES = (8.0, 16.0, 32.0)
IMGSZ = 128


def make_head(nc: int = 3) -> DecoupledDetect:
    head = DecoupledDetect([8, 16, 32], nc=nc, anchors=ANCHORS_PX)
    head.set_stride(STRIDES)
    head.init_biases()
    return head


def grid_shapes() -> list[tuple[int, int]]:
    return [(IMGSZ // int(s), IMGSZ // int(s)) for s in STRIDES]


def priors(head: DecoupledDetect) -> Priors:
    return Priors(*head.cell_priors(grid_shapes(), torch.device("cpu")))


def test_a_box_smaller_than_a_cell_still_has_its_own_cell_as_candidate() -> None:
    head = make_head()
    gt = torch.tensor([[41.0, 41.0, 47.0, 47.0]])  # 6x6 px inside P3 cell (5, 5), centre (44, 44)
    mask = candidate_mask(gt, priors(head), anchor_t=4.0)
    rows = mask[0].nonzero().flatten().tolist()
    assert rows == [5 * 16 + 5]  # only the P3 row of cell (x 5, y 5): no cell centre lies inside the box


def test_shape_filter_keeps_anchors_the_bounded_decode_can_reach() -> None:
    head = make_head()
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])  # 100 px: 6.25x the 16 px anchor, 2.1x 48 px, 1.3x 128 px
    mask = candidate_mask(gt, priors(head), anchor_t=4.0)[0]
    n3, n4 = 16 * 16, 8 * 8
    assert not mask[:n3].any()
    assert mask[n3:n3 + n4].any() and mask[n3 + n4:].any()


def test_perfect_prediction_is_positive_with_iou_target_and_gives_near_zero_loss() -> None:
    """A target centred on a P3 cell with the anchor's size; the maps predict exactly that box with class score
    ~1 there, and ~0 everywhere else: that cell is the positive, its soft label is 1, and the loss is ~0."""
    head = make_head(nc=3)
    cell_x, cell_y = 6, 9
    cx, cy = (cell_x + 0.5) * 8, (cell_y + 0.5) * 8
    targets = torch.tensor([[0, 2, cx / IMGSZ, cy / IMGSZ, 16 / IMGSZ, 16 / IMGSZ]])
    maps = [torch.zeros(1, 1, h, w, 4 + 3) for h, w in grid_shapes()]
    for m in maps:
        m[..., 4:] = -30.0  # background everywhere
        m[..., 2:4] = 0.0  # wh = anchor; xy = cell centre (2 * 0.5 - 0.5 + cell + ... = cell + 0.5)
    maps[0][0, 0, cell_y, cell_x, 4 + 2] = 30.0  # the right class, certain
    loss = AlignedLoss(head)
    total, parts = loss(maps, targets)
    assert total.item() < 1e-6 and parts[0].item() < 1e-6 and parts[2].item() < 1e-6

    p = torch.cat([m.reshape(1, -1, 7) for m in maps], 1)
    xyxy = box_convert(decode_boxes(p[..., :4].sigmoid(), *priors(head)), "cxcywh", "xyxy")
    gt = torch.tensor([[cx - 8, cy - 8, cx + 8, cy + 8]])
    assigned = assign_aligned(p[..., 4:].sigmoid(), xyxy, torch.tensor([0]), torch.tensor([2]), gt, priors(head))
    row = cell_y * 16 + cell_x
    assert assigned.target[0, row] == 0
    assert torch.isclose(assigned.score[0, row], torch.tensor(1.0), atol=1e-5)
    assert (assigned.score[0] > 0.5).nonzero().flatten().tolist() == [row]


def test_topk_bounds_the_positives_per_target() -> None:
    head = make_head()
    gt = torch.tensor([[8.0, 8.0, 120.0, 120.0]])
    pr = priors(head)
    n = pr.cell.shape[0]
    xyxy = gt.expand(1, n, 4).clone()  # every anchor predicts the box exactly
    scores = torch.full((1, n, 3), 0.5)
    for k in (1, 4, 10):
        assigned = assign_aligned(scores, xyxy, torch.tensor([0]), torch.tensor([1]), gt, pr, topk=k)
        assert int((assigned.target == 0).sum()) == k


def test_an_anchor_claimed_by_two_targets_goes_to_the_one_it_overlaps_most() -> None:
    head = make_head()
    pr = priors(head)
    n = pr.cell.shape[0]
    pred = torch.tensor([40.0, 40.0, 56.0, 56.0]).expand(1, n, 4).clone()  # every row predicts box A
    gt = torch.tensor([[40.0, 40.0, 56.0, 56.0], [38.0, 38.0, 60.0, 60.0]])  # A, and B overlapping the same cells
    scores = torch.full((1, n, 3), 0.5)
    assigned = assign_aligned(scores, pred, torch.tensor([0, 0]), torch.tensor([0, 1]), gt, pr, topk=10)
    mask_a = candidate_mask(gt[:1], pr, 4.0)[0]
    shared = mask_a & candidate_mask(gt[1:], pr, 4.0)[0]
    assert shared.any()
    assert (assigned.target[0][shared] == 0).all()  # IoU 1 with A beats IoU 0.53 with B
    assert pairwise_iou(gt[1], gt[0]) < 1


def test_targets_of_one_image_never_claim_anchors_of_another() -> None:
    head = make_head()
    maps = [torch.randn(2, 1, h, w, 7) for h, w in grid_shapes()]
    targets = torch.tensor([[1, 0, 0.5, 0.5, 0.2, 0.2]])
    p = torch.cat([m.reshape(2, -1, 7) for m in maps], 1)
    xyxy = box_convert(decode_boxes(p[..., :4].sigmoid(), *priors(head)), "cxcywh", "xyxy")
    gt = torch.tensor([[51.2, 51.2, 76.8, 76.8]])
    assigned = assign_aligned(p[..., 4:].sigmoid(), xyxy, targets[:, 0].long(), targets[:, 1].long(), gt, priors(head))
    assert (assigned.target[0] == -1).all() and (assigned.target[1] == 0).any()


def test_empty_batch_and_gradients_are_finite() -> None:
    head = make_head()
    maps = [torch.randn(2, 1, h, w, 7, requires_grad=True) for h, w in grid_shapes()]
    total, parts = AlignedLoss(head)(maps, torch.zeros(0, 6))
    total.backward()
    assert parts[0] == 0 and parts[2] > 0
    assert all(torch.isfinite(m.grad).all() for m in maps)


def test_loss_falls_when_the_prediction_improves() -> None:
    head = make_head()
    targets = torch.tensor([[0, 1, 0.4, 0.45, 0.3, 0.25], [1, 0, 0.7, 0.3, 0.1, 0.12]])
    maps = [torch.zeros(2, 1, h, w, 7, requires_grad=True) for h, w in grid_shapes()]
    optimizer = torch.optim.Adam(maps, lr=0.1)
    loss = AlignedLoss(head)
    first = None
    for _ in range(30):
        total, _ = loss(maps, targets)
        first = total.item() if first is None else first
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert loss(maps, targets)[0].item() < first / 3


def test_build_loss_picks_the_loss_of_the_head() -> None:
    detect = Detect([8, 16, 32], nc=3, anchors=3)
    detect.set_stride(STRIDES)
    assert isinstance(build_loss(detect), YoloLoss) and math.isclose(build_loss(detect).box_gain, 0.05)
    aligned = build_loss(make_head(), box=None)
    assert isinstance(aligned, AlignedLoss) and aligned.box_gain == 7.5
    assert build_loss(make_head(), box=2.0).box_gain == 2.0


def test_saturated_logits_give_finite_loss_and_gradients() -> None:
    """Box logits far negative decode to zero-size boxes (sigmoid underflows): the loss must stay finite
    (the failure this guards: non-finite steps in bf16 training after a few epochs)."""
    head = make_head()
    maps = [torch.full((2, 1, h, w, 7), -200.0, requires_grad=True) for h, w in grid_shapes()]
    targets = torch.tensor([[0, 1, 0.4, 0.45, 0.3, 0.25], [1, 0, 0.7, 0.3, 0.1, 0.12]])
    total, parts = AlignedLoss(head)(maps, targets)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(parts).all()
    assert all(torch.isfinite(m.grad).all() for m in maps)


def dense_assignment(pred_scores: torch.Tensor, pred_xyxy: torch.Tensor, gt_image: torch.Tensor,
                     gt_cls: torch.Tensor, gt_xyxy: torch.Tensor, pr: Priors, topk: int = 10) -> torch.Tensor:
    """The specification over every anchor row (TOOD top-k of s^0.5 u^6 among the candidates, one target per
    anchor by the highest IoU): (B, N) owner index or -1, written plainly for small cases."""
    batch, n, _ = pred_scores.shape
    owner = torch.full((batch, n), -1)
    best = torch.full((batch, n), -1.0)
    candidates = candidate_mask(gt_xyxy, pr, 4.0)
    for m in range(len(gt_xyxy)):
        b = int(gt_image[m])
        iou = pairwise_iou(gt_xyxy[m], pred_xyxy[b])
        metric = pred_scores[b, :, gt_cls[m]].pow(0.5) * iou.pow(6.0)
        ranked = torch.where(candidates[m], metric, -1.0)
        for row in ranked.topk(topk).indices.tolist():
            if candidates[m, row] and iou[row] >= best[b, row]:
                owner[b, row], best[b, row] = m, iou[row]
    return owner


def test_vectorized_assignment_equals_the_plain_specification() -> None:
    """Twelve targets of many sizes over two images of random predictions: the batched (M, N) assignment gives
    the same owner per anchor row as the specification written target by target."""
    torch.manual_seed(0)
    head = make_head()
    maps = [torch.randn(2, 1, h, w, 7) for h, w in grid_shapes()]
    p = torch.cat([m.reshape(2, -1, 7) for m in maps], 1)
    xyxy = box_convert(decode_boxes(p[..., :4].sigmoid(), *priors(head)), "cxcywh", "xyxy")
    scores = p[..., 4:].sigmoid()
    centre = torch.rand(12, 2) * IMGSZ
    size = torch.tensor([6.0, 10, 14, 20, 30, 40, 60, 80, 9, 24, 50, 70]).unsqueeze(1) * torch.tensor([1.0, 0.8])
    gt = torch.cat((centre - size / 2, centre + size / 2), 1).clamp(0, IMGSZ)
    gt_image, gt_cls = torch.arange(12) % 2, torch.arange(12) % 3
    assigned = assign_aligned(scores, xyxy, gt_image, gt_cls, gt, priors(head))
    expected = dense_assignment(scores, xyxy, gt_image, gt_cls, gt, priors(head))
    assert (expected >= 0).sum() > 40
    assert torch.equal(assigned.target, expected)


def test_box_loss_over_the_top_k_pairs_equals_the_sum_over_every_row() -> None:
    """The box term sums 1 - CIoU x soft label over each target's top-k pairs; written over all B x N rows
    (every positive row against its owner's box) it is the same number."""
    torch.manual_seed(2)
    head = make_head()
    targets = torch.tensor([[0, 1, 0.4, 0.45, 0.3, 0.25], [1, 0, 0.7, 0.3, 0.1, 0.12], [1, 2, 0.2, 0.8, 0.05, 0.06]])
    maps = [torch.randn(2, 1, h, w, 7) for h, w in grid_shapes()]
    _, parts = AlignedLoss(head, box=1.0)(maps, targets)
    p = torch.cat([m.reshape(2, -1, 7) for m in maps], 1)
    xyxy = box_convert(decode_boxes(p[..., :4].sigmoid(), *priors(head)), "cxcywh", "xyxy")
    gt = box_convert(targets[:, 2:] * IMGSZ, "cxcywh", "xyxy")
    assigned = assign_aligned(p[..., 4:].sigmoid(), xyxy, targets[:, 0].long(), targets[:, 1].long(), gt, priors(head))
    positive = assigned.target >= 0
    assert positive.sum() > 3
    ciou = complete_box_iou_loss(xyxy[positive], gt[assigned.target[positive]])
    expected = (ciou * assigned.score[positive]).sum() / assigned.score.sum().clamp(min=1.0)
    assert torch.allclose(parts[0], expected, rtol=1e-5)


def four_level_head() -> tuple[DecoupledDetect, list[tuple[int, int]]]:
    """The default model's layout: P2-P5, three anchors per level, on a 256 x 192 (letterboxed) batch."""
    anchors = [[5, 6, 9, 14, 16, 10], [20, 30, 34, 22, 40, 52], [60, 90, 100, 70, 120, 140], [160, 200, 240, 150, 250, 250]]
    head = DecoupledDetect([8, 8, 16, 32], nc=3, anchors=anchors)
    head.set_stride((4.0, 8.0, 16.0, 32.0))
    return head, [(192 // s, 256 // s) for s in (4, 8, 16, 32)]


def random_targets(n: int, seed: int) -> torch.Tensor:
    """n targets (batch of 2) from 2 px to the whole image, many at the borders: [image, class, cx, cy, w, h]."""
    g = torch.Generator().manual_seed(seed)
    wh = torch.exp(torch.empty(n, 2).uniform_(math.log(2 / 256), 0.0, generator=g))
    centre = torch.rand(n, 2, generator=g)
    centre[: n // 4] = centre[: n // 4].round()  # at a corner or an edge: the window shifts inside the grid
    lo, hi = (centre - wh / 2).clamp(0, 1), (centre + wh / 2).clamp(0, 1)
    keep = ((hi - lo) * torch.tensor([256.0, 192.0]) > 1).all(1)
    box = torch.cat(((lo + hi) / 2, hi - lo), 1)[keep]
    return torch.cat((torch.arange(len(box))[:, None] % 2, torch.arange(len(box))[:, None] % 3, box), 1).float()


def test_each_targets_window_holds_every_candidate_it_has_on_the_grid() -> None:
    head, shapes = four_level_head()
    targets = random_targets(400, seed=3)
    gt = box_convert(targets[:, 2:] * torch.tensor([256.0, 192, 256, 192]), "cxcywh", "xyxy")
    pr = Priors(*head.cell_priors(shapes, torch.device("cpu")))
    dense = candidate_mask(gt, pr, 4.0)
    rows, real = box_windows(gt, head.stride.tolist(), shapes, head.anchors_px, 4.0)
    inside = torch.zeros_like(dense)
    inside[torch.arange(len(gt))[:, None].expand_as(rows)[real], rows[real]] = True
    assert dense.sum() > 5000 and not (dense & ~inside).any()
    assert real.sum() < 3 * dense.sum()  # the windows hug the candidates: 3 x 4,080 rows per target in all
    assert all(len(set(r)) == len(r) for r in rows.masked_fill(~real, -1).tolist() for r in [[i for i in r if i >= 0]])
    assert (rows[~real] == 0).all()


def test_the_fixed_windows_hold_every_candidate_and_serve_the_anchor_box_epoch_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The static epoch ranks over `window_rows` (whose layout its top-k ties were measured with), the task-aligned
    epochs over `box_windows`; both hold every candidate a target has on the grid."""
    head, shapes = four_level_head()
    targets = random_targets(400, seed=3)
    gt = box_convert(targets[:, 2:] * torch.tensor([256.0, 192, 256, 192]), "cxcywh", "xyxy")
    dense = candidate_mask(gt, Priors(*head.cell_priors(shapes, torch.device("cpu"))), 4.0)
    sizes = window_sizes(head.anchors_px.tolist(), head.stride.tolist(), shapes, 4.0)
    rows = window_rows(gt, head.stride.tolist(), shapes, head.na, sizes)
    assert not (dense & ~torch.zeros_like(dense).scatter_(1, rows, True)).any()
    assert all(len(set(r)) == len(r) for r in rows.tolist())

    def refused(*_: object) -> None:
        raise AssertionError("box_windows in the anchor-box epoch")

    monkeypatch.setattr(loss_aligned, "box_windows", refused)
    maps = [torch.randn(2, 3, h, w, 7) for h, w in shapes]
    loss = AlignedLoss(head, static_epochs=1)
    loss(maps, random_targets(20, seed=1))
    loss.set_epoch(1)
    with pytest.raises(AssertionError, match="anchor-box epoch"):
        loss(maps, random_targets(20, seed=1))


def test_windows_of_a_batch_without_targets_or_candidates_keep_one_padded_column() -> None:
    head, shapes = four_level_head()
    for gt in (torch.zeros(0, 4), torch.tensor([[300.0, 10.0, 310.0, 20.0]])):  # none; one outside the grid
        rows, real = box_windows(gt, head.stride.tolist(), shapes, head.anchors_px, 4.0)
        assert rows.shape == (len(gt), 1) and not real.any()


def test_the_windowed_loss_equals_the_loss_over_every_anchor_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same positives, soft labels, loss and gradients as scoring all N rows per target."""
    torch.manual_seed(4)
    head, shapes = four_level_head()
    targets = random_targets(120, seed=5)
    maps = [torch.randn(2, 3, h, w, 7, requires_grad=True) for h, w in shapes]
    loss = AlignedLoss(head)
    windowed, _ = loss(maps, targets)
    grads = torch.autograd.grad(windowed, maps)
    rows = sum(3 * h * w for h, w in shapes)
    monkeypatch.setattr(loss_aligned, "box_windows", lambda gt, *_: (torch.arange(rows).expand(len(gt), rows),
                                                                    torch.ones(len(gt), rows, dtype=torch.bool)))
    dense, _ = loss(maps, targets)
    assert torch.equal(windowed, dense)
    assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(dense, maps)))


def _prior_best_and_exact_elsewhere(head: DecoupledDetect) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """A 16 px target centred on P3 cell (6, 9), whose own 16 px anchor box is the target exactly; every row
    predicts the target exactly but that one, which predicts it 4 px off."""
    pr = priors(head)
    n = pr.cell.shape[0]
    cx, cy = 6.5 * 8, 9.5 * 8
    gt = torch.tensor([[cx - 8, cy - 8, cx + 8, cy + 8]])
    pred = gt.expand(1, n, 4).clone()
    row = 9 * 16 + 6
    pred[0, row] = gt[0] + 4.0
    return gt, pred, torch.full((1, n, 3), 0.5), row


def test_static_assignment_ranks_by_the_anchor_boxes_not_the_predictions() -> None:
    head = make_head()
    gt, pred, scores, row = _prior_best_and_exact_elsewhere(head)
    pr = priors(head)
    aligned = assign_aligned(scores, pred, torch.tensor([0]), torch.tensor([1]), gt, pr, topk=1)
    static = assign_static(pred, torch.tensor([0]), gt, pr, anchor_boxes(pr), topk=1)
    assert aligned.target[0, row] == -1 and int((aligned.target == 0).sum()) == 1  # an exact prediction won
    assert (static.target[0] == 0).nonzero().flatten().tolist() == [row]
    off_iou = pairwise_iou(gt[0], pred[0, row])  # the soft label is the predicted box's IoU: 8x8 / (2 * 16^2 - 64)
    assert torch.isclose(static.score[0, row], off_iou) and math.isclose(off_iou.item(), 144 / 368, rel_tol=1e-6)


def test_static_assignment_takes_the_top_k_anchor_boxes_by_iou() -> None:
    head = make_head()
    pr = priors(head)
    n = pr.cell.shape[0]
    gt = torch.tensor([[42.0, 40.0, 86.0, 90.0]])  # candidates at P3 and P4, anchor boxes of many overlaps
    pred = torch.rand(1, n, 4).cumsum(-1) * 60  # predicted boxes that must not matter
    own_boxes = box_convert(torch.cat(((pr.cell + 0.5) * pr.stride, pr.anchor), -1), "cxcywh", "xyxy")
    assert torch.equal(anchor_boxes(pr), own_boxes)  # the decode at sigmoid 0.5: each anchor centred on its cell
    candidate = candidate_mask(gt, pr, 4.0)[0]
    k = int(candidate.sum()) // 2
    assert k >= 4
    overlap = torch.where(candidate, pairwise_iou(gt, own_boxes)[0], -1.0)
    static = assign_static(pred, torch.tensor([0]), gt, pr, own_boxes, topk=k)
    chosen = static.target[0] == 0
    assert int(chosen.sum()) == k and candidate[chosen].all()
    # the k largest anchor-box IoUs (compared as values: equal-sized anchor boxes inside the target tie)
    assert torch.equal(overlap[chosen].sort().values, overlap.topk(k).values.sort().values)


def test_static_ranking_a_slice_of_targets_at_a_time_gives_the_whole_batchs_assignment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`assign_static` ranks _RANK_PAIRS pairs at a time (a table above glibc's mmap threshold faulted in fresh
    pages every step): slices of 1, 7 and all targets give the same assignment, bit for bit, over the fixed
    windows the anchor-box epoch uses, with targets sharing anchors across the slices' edges."""
    head, shapes = four_level_head()
    targets = random_targets(60, seed=9)
    gt = box_convert(targets[:, 2:] * torch.tensor([256.0, 192, 256, 192]), "cxcywh", "xyxy")
    pr = Priors(*head.cell_priors(shapes, torch.device("cpu")))
    rows = window_rows(gt, head.stride.tolist(), shapes, head.na, window_sizes(head.anchors_px.tolist(), head.stride.tolist(), shapes, 4.0))
    pred = box_convert(torch.rand(2, pr.cell.shape[0], 4) * torch.tensor([256.0, 192, 64, 64]), "cxcywh", "xyxy")
    args = (pred, targets[:, 0].long(), gt, pr, anchor_boxes(pr))
    results = []
    for pairs in (rows.shape[1], 7 * rows.shape[1], 10**9):
        monkeypatch.setattr(loss_aligned, "_RANK_PAIRS", pairs)
        results.append(assign_static(*args, rows=rows))
    assert int((results[-1].target >= 0).sum()) > 60
    for result in results[:-1]:
        assert all(torch.equal(a, b) for a, b in zip(result, results[-1]))
    empty = assign_static(pred, torch.zeros(0, dtype=torch.long), gt[:0], pr, anchor_boxes(pr), rows=rows[:0])
    assert (empty.target == -1).all() and empty.rows.shape == (0, 10) and not empty.score.any()


def test_set_epoch_keeps_the_static_assignment_for_the_first_epochs_only() -> None:
    head = make_head()
    loss = build_loss(head, static_assign_epochs=2)
    assert isinstance(loss, AlignedLoss) and loss.static  # from construction: a caller without set_epoch gets it too
    states = []
    for epoch in range(4):
        loss.set_epoch(epoch)
        states.append(loss.static)
    assert states == [True, True, False, False]
    assert not build_loss(head).static


def test_the_static_epoch_trains_toward_the_anchor_box_positives() -> None:
    """The same maps give a different class loss in the two modes: the loss uses the assignment it is set to."""
    torch.manual_seed(7)
    head = make_head()
    maps = [torch.randn(2, 1, h, w, 7) for h, w in grid_shapes()]
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.25, 0.25], [1, 2, 0.3, 0.6, 0.1, 0.2]])
    loss = AlignedLoss(head, static_epochs=1)
    static_parts = loss(maps, targets)[1]
    loss.set_epoch(1)
    aligned_parts = loss(maps, targets)[1]
    assert not torch.isclose(static_parts[2], aligned_parts[2])
    assert torch.isfinite(static_parts).all()


def test_gather_rows_equals_advanced_indexing() -> None:
    table = torch.arange(30.0).view(10, 3)
    index = torch.tensor([[9, 0, 3, 3], [1, 2, 8, 5]])
    assert torch.equal(gather_rows(table, index), table[index])
    assert gather_rows(table, index[:0]).shape == (0, 4, 3)


@pytest.mark.parametrize("static", [True, False])
def test_the_loss_and_gradients_equal_those_with_torchvisions_ciou(monkeypatch: pytest.MonkeyPatch, static: bool) -> None:
    """detector.train.ciou (no boolean index, so no host sync on CUDA) and the grid's cached unit box give the loss
    and gradients of torchvision's CIoU and a unit box built per call, to the bit, in both assignment modes."""
    torch.manual_seed(6)
    head, shapes = four_level_head()
    targets = random_targets(150, seed=7)
    maps = [torch.randn(2, 3, h, w, 7, requires_grad=True) for h, w in shapes]

    def run() -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        loss = AlignedLoss(head, static_epochs=1 if static else 0)
        total, parts = loss(maps, targets)
        return total, parts, torch.autograd.grad(total, maps)

    now = run()
    monkeypatch.setattr(loss_aligned, "complete_box_iou_loss", complete_box_iou_loss)  # torchvision's
    before = run()
    assert torch.equal(now[0], before[0]) and torch.equal(now[1], before[1])
    assert all(torch.equal(a, b) for a, b in zip(now[2], before[2]))


def test_candidates_are_the_cells_whose_centres_lie_inside_the_box_and_the_ratio_rule_is_strict() -> None:
    """A 20 px box [10, 30]: P3 cell centres (x + 0.5) * 8 = 12, 20, 28 lie inside on each axis (9 cells), P4's
    centre 24 (one cell), P5's 128 px anchor is 6.4x too large. A 64 px box is exactly 4x the 16 px anchor: out."""
    pr = priors(make_head())
    mask = candidate_mask(torch.tensor([[10.0, 10.0, 30.0, 30.0]]), pr, anchor_t=4.0)[0]
    expected = sorted([y * 16 + x for y in (1, 2, 3) for x in (1, 2, 3)] + [256 + 1 * 8 + 1])
    assert mask.nonzero().flatten().tolist() == expected
    mask = candidate_mask(torch.tensor([[32.0, 32.0, 96.0, 96.0]]), pr, anchor_t=4.0)[0]
    assert not mask[:256].any() and mask[256:320].any() and mask[320:].any()


def test_soft_labels_are_the_alignment_rescaled_so_the_best_positive_gets_its_iou() -> None:
    """TOOD: t = s^0.5 u^6 rescaled per target so that its best positive's label is that positive's IoU u1. The
    16 px target's two candidates (P3 and P4 cells) predict it 4 px off (u1 = 144 / 368) and 8 px off (u2 = 64 /
    448), equal scores: labels u1 and (u2 / u1)^6 * u1."""
    head = make_head()
    pr = priors(head)
    n = pr.cell.shape[0]
    gt = torch.tensor([[44.0, 68.0, 60.0, 84.0]])  # centred on P3 cell (6, 9) and P4 cell (3, 4)
    p3_row, p4_row = 9 * 16 + 6, 256 + 4 * 8 + 3
    assert candidate_mask(gt, pr, 4.0)[0].nonzero().flatten().tolist() == [p3_row, p4_row]
    pred = torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(1, n, 4).clone()  # IoU 0 everywhere else
    pred[0, p3_row], pred[0, p4_row] = gt[0] + 4.0, gt[0] + 8.0
    assigned = assign_aligned(torch.full((1, n, 3), 0.5), pred, torch.tensor([0]), torch.tensor([1]), gt, pr)
    u1, u2 = 144 / 368, 64 / 448
    assert assigned.score[0].nonzero().flatten().tolist() == [p3_row, p4_row]
    assert assigned.score[0, p3_row].item() == pytest.approx(u1, rel=1e-5)
    assert assigned.score[0, p4_row].item() == pytest.approx((u2 / u1) ** 6 * u1, rel=1e-4)


def test_the_total_is_the_batch_times_the_gained_box_and_class_terms_on_a_non_square_input() -> None:
    """On a 128 x 64 input (targets normalized by width and height): box = sum(soft * (1 - CIoU)) / S and cls =
    BCE over every row and class toward the soft label at the owner's class / S, S = max(sum of soft labels, 1);
    the parts are 7.5 box, 0, 0.5 cls (YOLOv8's gains) and the total is the batch size times their sum."""
    torch.manual_seed(3)
    head = make_head()
    shapes = [(64 // int(s), 128 // int(s)) for s in STRIDES]
    maps = [torch.randn(2, 1, h, w, 7) for h, w in shapes]
    targets = torch.tensor([[0, 1, 0.3, 0.5, 0.25, 0.5], [1, 2, 0.7, 0.4, 0.2, 0.6], [1, 0, 0.2, 0.3, 0.1, 0.3]])
    total, parts = AlignedLoss(head)(maps, targets)

    pr = Priors(*head.cell_priors(shapes, torch.device("cpu")))
    p = torch.cat([m.reshape(2, -1, 7) for m in maps], 1)
    xyxy = box_convert(decode_boxes(p[..., :4].sigmoid(), *pr), "cxcywh", "xyxy")
    gt = box_convert(targets[:, 2:] * torch.tensor([128.0, 64.0, 128.0, 64.0]), "cxcywh", "xyxy")
    gt_cls = targets[:, 1].long()
    assigned = assign_aligned(p[..., 4:].sigmoid(), xyxy, targets[:, 0].long(), gt_cls, gt, pr)
    positive = assigned.target >= 0
    assert positive.sum() >= 6
    norm = assigned.score.sum().clamp(min=1.0)
    label = torch.zeros_like(p[..., 4:])
    label[positive, gt_cls[assigned.target[positive]]] = assigned.score[positive]
    logits = p[..., 4:]
    bce = -(label * torch.log(torch.sigmoid(logits)) + (1 - label) * torch.log(1 - torch.sigmoid(logits))).sum() / norm
    box = (complete_box_iou_loss(xyxy[positive], gt[assigned.target[positive]]) * assigned.score[positive]).sum() / norm
    torch.testing.assert_close(parts, torch.stack((7.5 * box, torch.zeros(()), 0.5 * bce)), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(total, 2 * (7.5 * box + 0.5 * bce), rtol=1e-4, atol=1e-6)


def test_an_anchor_outside_a_targets_candidates_does_not_take_it_from_the_target_it_is_a_candidate_of() -> None:
    """With top-k over every row, a target's top k holds rows that are not its candidates. Row r (P3 cell (6, 9))
    predicts box B exactly, but B (70 px) is 4.4x its 16 px anchor: not B's candidate. Row r is the candidate of
    the 16 px target A at IoU 256 / 4900 only; that positive is A's, whatever B's overlap."""
    pr = priors(make_head())
    n = pr.cell.shape[0]
    row = 9 * 16 + 6
    gt = torch.tensor([[44.0, 68.0, 60.0, 84.0], [17.0, 41.0, 87.0, 111.0]])  # A, B: both centred at (52, 76)
    mask = candidate_mask(gt, pr, 4.0)
    assert mask[0, row] and not mask[1, row]
    pred = torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(1, n, 4).clone()
    pred[0, row] = gt[1]
    assigned = assign_aligned(torch.full((1, n, 3), 0.5), pred, torch.tensor([0, 0]), torch.tensor([0, 1]), gt, pr, topk=n)
    assert assigned.target[0, row] == 0
    assert assigned.score[0, row] > 0

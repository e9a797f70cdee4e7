"""YoloLoss and build_targets: hand-computed assignments, a perfect prediction, empty batches, bf16, gains."""

from __future__ import annotations

import math

import pytest
import torch

from detector.models.head import Detect
from detector.train import loss as loss_module
from detector.train.loss import LevelTargets, YoloLoss, build_targets, objectness_target, target_constants
from host_syncs import host_syncs
from repo_paths import REPO_ROOT

ANCHORS_PX = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]
STRIDES = (8.0, 16.0, 32.0)
MODEL_YAML = REPO_ROOT / "configs" / "models" / "yolo-ca-n-v5head.yaml"  # the YOLOv5 head


def make_head(nc: int = 3) -> Detect:
    head = Detect([8, 16, 32], nc=nc, anchors=ANCHORS_PX)
    head.set_stride(STRIDES)
    return head


def valid_rows(level: LevelTargets) -> set[tuple]:
    """The valid candidates as (image, anchor, cell_y, cell_x, class, dx, dy, w, h) with the box rounded."""
    keep = level.valid
    columns = [level.image[keep], level.anchor[keep], level.cell_y[keep], level.cell_x[keep], level.cls[keep]]
    rows = set()
    for i in range(int(keep.sum())):
        ints = tuple(int(c[i]) for c in columns)
        rows.add(ints + tuple(round(float(v), 4) for v in level.box[keep][i]))
    return rows


def test_build_targets_matches_hand_computed_assignment() -> None:
    # Level 0: 32x32 grid, anchors 1, 4, 16 cells. Level 1: 16x16 grid, anchors 2, 8, 32 cells.
    anchors = torch.tensor([[[1.0, 1.0], [4.0, 4.0], [16.0, 16.0]], [[2.0, 2.0], [8.0, 8.0], [32.0, 32.0]]])
    targets = torch.tensor(
        [
            # exactly anchor 1 of level 0; centre (10.25, 20.75) cells: in the left half, in the lower half
            [0, 2, 10.25 / 32, 20.75 / 32, 4 / 32, 4 / 32],
            # exactly anchor 0 of level 0, near the bottom-left corner (0.75, 31.25)
            [1, 0, 0.75 / 32, 31.25 / 32, 1 / 32, 1 / 32],
            # exactly anchor 2 of level 0; x < 1 cell from the left border, y on a half cell: no neighbour at all
            [1, 1, 0.25 / 32, 5.5 / 32, 16 / 32, 16 / 32],
        ]
    )
    level0, level1 = build_targets(targets, anchors, [(32, 32), (16, 16)], anchor_t=4.0)

    assert valid_rows(level0) == {
        # target 0, anchor 1 only (ratio 4 to the others is not < 4): own cell, left and lower neighbours
        (0, 1, 20, 10, 2, 0.25, 0.75, 4.0, 4.0),
        (0, 1, 20, 9, 2, 1.25, 0.75, 4.0, 4.0),
        (0, 1, 21, 10, 2, 0.25, -0.25, 4.0, 4.0),
        # target 1, anchor 0: own cell, right neighbour (x < 1 forbids the left one), upper neighbour
        (1, 0, 31, 0, 0, 0.75, 0.25, 1.0, 1.0),
        (1, 0, 31, 1, 0, -0.25, 0.25, 1.0, 1.0),
        (1, 0, 30, 0, 0, 0.75, 1.25, 1.0, 1.0),
        # target 2, anchor 2: own cell only
        (1, 2, 5, 0, 1, 0.25, 0.5, 16.0, 16.0),
    }
    # Level 1 (half the resolution): target 0 is 2 cells = anchor 0; target 1 is 0.5 cell (ratio 4: no match);
    # target 2 is 8 cells = anchor 1 at (0.125, 2.75): lower neighbour only.
    assert valid_rows(level1) == {
        (0, 0, 10, 5, 2, 0.125, 0.375, 2.0, 2.0),
        (0, 0, 10, 4, 2, 1.125, 0.375, 2.0, 2.0),
        (0, 0, 9, 5, 2, 0.125, 1.375, 2.0, 2.0),
        (1, 1, 2, 0, 1, 0.125, 0.75, 8.0, 8.0),
        (1, 1, 3, 0, 1, 0.125, -0.25, 8.0, 8.0),
    }
    assert torch.equal(level0.anchor_wh[level0.valid & (level0.anchor == 1)][0], torch.tensor([4.0, 4.0]))
    assert level0.valid.shape == (3 * 3 * 5,)  # static: M * na * 5 candidate rows per level


def perfect_maps(head: Detect, targets: torch.Tensor, batch: int, imgsz: int, cls_logit: tuple[float, float]):
    """Raw maps whose decoded boxes equal every assigned target box; class logits (positive, negative)."""
    maps = []
    shapes = [(imgsz // int(s), imgsz // int(s)) for s in head.stride.tolist()]
    for level, (h, w) in zip(build_targets(targets, head.anchors, shapes), shapes):
        p = torch.zeros(batch, head.na, h, w, head.no)
        keep = level.valid
        index = (level.image[keep], level.anchor[keep], level.cell_y[keep], level.cell_x[keep])
        raw = torch.cat(
            (
                torch.logit((level.box[keep, :2] + 0.5) / 2),
                torch.logit((level.box[keep, 2:] / level.anchor_wh[keep]).sqrt() / 2),
                torch.full((int(keep.sum()), 1), 5.0),
                torch.where(torch.nn.functional.one_hot(level.cls[keep], head.nc).bool(), *cls_logit),
            ),
            1,
        )
        p[index] = raw
        maps.append(p.requires_grad_())
    return maps


TARGETS = torch.tensor([[0, 1, 0.40, 0.55, 0.30, 0.20], [1, 2, 0.70, 0.30, 0.06, 0.12]])


def test_perfect_prediction_has_near_zero_box_loss() -> None:
    head = make_head()
    maps = perfect_maps(head, TARGETS, batch=2, imgsz=64, cls_logit=(0.0, 0.0))
    total, parts = YoloLoss(head, imgsz=64)(maps, TARGETS)
    assert parts[0] < 1e-5
    assert parts[1] > 0 and parts[2] > 0  # objectness and class were not made perfect
    wrong = [p.detach().clone() for p in maps]
    for p in wrong:
        p[..., 2:4] += 1.0  # every assigned box too large
    assert YoloLoss(head, imgsz=64)(wrong, TARGETS)[1][0] > 1e-2


def test_no_targets_gives_objectness_loss_only_and_a_connected_graph() -> None:
    head = make_head()
    maps = [torch.randn(2, 3, 64 // int(s), 64 // int(s), head.no, requires_grad=True) for s in STRIDES]
    total, parts = YoloLoss(head, imgsz=64)(maps, torch.zeros(0, 6))
    assert parts[0] == 0 and parts[2] == 0 and parts[1] > 0
    total.backward()
    for p in maps:
        assert torch.isfinite(p.grad).all()
        assert p.grad[..., 4].abs().sum() > 0
        assert p.grad[..., [0, 1, 2, 3, 5, 6, 7]].abs().sum() == 0


def test_loss_is_finite_and_differentiable_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    head = make_head(nc=3).train()
    features = [torch.randn(2, c, 64 // int(s), 64 // int(s)) for c, s in zip((8, 16, 32), STRIDES)]
    targets = torch.rand(20, 6) * torch.tensor([0, 0, 1, 1, 0.5, 0.5]) + torch.tensor([0, 0, 0, 0, 0.02, 0.02])
    targets[:, 0] = torch.arange(20) % 2
    targets[:, 1] = torch.arange(20) % 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = head(features)
        assert maps[0].dtype == torch.bfloat16
        total, parts = YoloLoss(head, imgsz=64)(maps, targets)
    assert total.dtype == torch.float32 and torch.isfinite(total) and (parts > 0).all()
    total.backward()
    for conv in head.m:
        assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0


def test_label_smoothing_moves_the_class_target() -> None:
    head = make_head()
    cp, cn = 0.9, 0.1  # label_smoothing 0.2
    maps = perfect_maps(head, TARGETS, batch=2, imgsz=64, cls_logit=(math.log(cp / cn), math.log(cn / cp)))
    loss_smooth = YoloLoss(head, imgsz=64, label_smoothing=0.2)
    loss_plain = YoloLoss(head, imgsz=64)
    assert (loss_smooth.cls_positive, loss_smooth.cls_negative) == pytest.approx((cp, cn))

    loss_smooth(maps, TARGETS)[0].backward()
    grad_smooth = max(p.grad[..., 5:].abs().max() for p in maps)
    for p in maps:
        p.grad = None
    loss_plain(maps, TARGETS)[0].backward()
    grad_plain = max(p.grad[..., 5:].abs().max() for p in maps)
    assert grad_plain > 0 and grad_smooth < 1e-4 * grad_plain  # the logits sit on the smoothed targets


def test_gains_are_scaled_by_levels_classes_and_image_size() -> None:
    head = make_head(nc=3)
    loss = YoloLoss(head, box=0.05, cls=0.5, obj=1.0, imgsz=320)
    assert loss.box_gain == pytest.approx(0.05)
    assert loss.cls_gain == pytest.approx(0.5 * 3 / 80)
    assert loss.obj_gain == pytest.approx(0.25)
    assert loss.balance == (4.0, 1.0, 0.4)

    torch.manual_seed(0)
    maps = [torch.randn(2, 3, 320 // int(s), 320 // int(s), head.no) for s in STRIDES]
    total, parts = loss(maps, TARGETS)
    assert total == pytest.approx(float(parts.sum()) * 2)  # x batch size
    _, doubled = YoloLoss(head, box=0.1, cls=1.0, obj=2.0, imgsz=320)(maps, TARGETS)
    assert torch.allclose(doubled, 2 * parts)
    _, small = YoloLoss(head, imgsz=160)(maps, TARGETS)
    assert small[1] == pytest.approx(float(parts[1]) / 4) and small[0] == pytest.approx(float(parts[0]))


def test_single_class_has_no_class_loss() -> None:
    head = make_head(nc=1)
    maps = [torch.randn(2, 3, 64 // int(s), 64 // int(s), head.no) for s in STRIDES]
    targets = TARGETS.clone()
    targets[:, 1] = 0
    _, parts = YoloLoss(head, imgsz=64)(maps, targets)
    assert parts[2] == 0 and parts[0] > 0


def test_objectness_target_keeps_the_highest_iou_on_shared_cells() -> None:
    index = torch.tensor([0, 0, 0])
    cell = torch.tensor([1, 1, 1])
    level = LevelTargets(
        image=index, anchor=index, cell_y=cell, cell_x=cell, box=torch.zeros(3, 4), anchor_wh=torch.ones(3, 2),
        cls=index, valid=torch.tensor([True, True, False]),
    )
    for iou in (torch.tensor([0.3, 0.8, 0.95]), torch.tensor([0.8, 0.3, 0.95])):
        target = objectness_target((1, 2, 3, 3), level, iou)
        assert target[0, 0, 1, 1] == pytest.approx(0.8)  # the invalid row's 0.95 is ignored
        assert target.sum() == pytest.approx(0.8)
    assert objectness_target((1, 2, 3, 3), level, torch.tensor([-0.2, -0.5, 0.0])).sum() == 0  # clamped at 0


def test_loss_reads_the_heads_current_anchors() -> None:
    head = make_head()
    loss = YoloLoss(head, imgsz=64)
    torch.manual_seed(0)
    maps = [torch.randn(2, 3, 64 // int(s), 64 // int(s), head.no) for s in STRIDES]
    before = loss(maps, TARGETS)[1]
    head.set_anchors_px(head.anchors_px * 1.5)  # what auto-anchor does after the loss was built
    assert not torch.allclose(loss(maps, TARGETS)[1], before)


def test_wrong_map_shape_is_reported() -> None:
    head = make_head(nc=3)
    maps = [torch.zeros(1, 3, 8, 8, 7), torch.zeros(1, 3, 4, 4, 7), torch.zeros(1, 3, 2, 2, 7)]
    with pytest.raises(ValueError, match="raw map 0"):
        YoloLoss(head)(maps, TARGETS)
    with pytest.raises(ValueError, match="2 raw maps"):
        YoloLoss(head)(maps[:2], TARGETS)


def test_loss_backpropagates_through_a_built_model() -> None:
    from detector.models.builder import build_model

    torch.manual_seed(0)
    model = build_model(MODEL_YAML, nc=3).train()
    total, parts = YoloLoss(model.head, imgsz=64)(model(torch.rand(2, 3, 64, 64)), TARGETS)
    assert (parts > 0).all()
    total.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.layers[0].conv.weight.grad.abs().sum() > 0  # reaches the stem


def build_targets_before(targets: torch.Tensor, anchors: torch.Tensor, grid_hw, anchor_t: float = 4.0) -> list[LevelTargets]:
    """build_targets as it was before its constants were cached (a tensor per call and per level): the reference."""
    device = anchors.device
    targets = targets.to(device=device, dtype=torch.float32)
    anchors = anchors.float()
    num_targets, num_anchors = targets.shape[0], anchors.shape[1]
    offsets = torch.tensor(((0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (-0.5, 0.0), (0.0, -0.5)), device=device)
    rows = (num_targets, num_anchors, 5)
    image = targets[:, 0].long()[:, None, None].expand(rows).reshape(-1)
    cls = targets[:, 1].long()[:, None, None].expand(rows).reshape(-1)
    anchor = torch.arange(num_anchors, device=device)[None, :, None].expand(rows).reshape(-1)
    levels = []
    for (height, width), level_anchors in zip(grid_hw, anchors, strict=True):
        size = torch.tensor([width, height], dtype=torch.float32, device=device)
        gxy, gwh = targets[:, 2:4] * size, targets[:, 4:6] * size
        ratio = gwh[:, None, :] / level_anchors[None]
        matched = torch.maximum(ratio, ratio.reciprocal()).amax(2) < anchor_t
        gxy_from_end = size - gxy
        near_start = (gxy % 1 < 0.5) & (gxy > 1)
        near_end = (gxy_from_end % 1 < 0.5) & (gxy_from_end > 1)
        cell_used = torch.cat((torch.ones_like(near_start[:, :1]), near_start, near_end), 1)
        cells = (gxy[:, None, :] - offsets).long()
        cell_x, cell_y = cells[..., 0].clamp(0, width - 1), cells[..., 1].clamp(0, height - 1)
        dxy = gxy[:, None, :] - torch.stack((cell_x, cell_y), 2)
        box = torch.cat((dxy[:, None].expand(*rows, 2), gwh[:, None, None].expand(*rows, 2)), 3)
        levels.append(LevelTargets(
            image=image, anchor=anchor, cell_y=cell_y[:, None].expand(rows).reshape(-1),
            cell_x=cell_x[:, None].expand(rows).reshape(-1), box=box.reshape(-1, 4),
            anchor_wh=level_anchors[None, :, None].expand(*rows, 2).reshape(-1, 2), cls=cls,
            valid=(matched[:, :, None] & cell_used[:, None, :]).reshape(-1),
        ))
    return levels


def random_targets(count: int, batch: int, nc: int, seed: int) -> torch.Tensor:
    """(count, 6) targets spread over the image, a sixth of them on cell borders and image edges (0.0, 1.0)."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(count, 2, generator=g)
    centre[: count // 6] = torch.randint(0, 33, (count // 6, 2), generator=g) / 32  # on cell borders, 0 and 1
    size = torch.rand(count, 2, generator=g) * 0.6 + 0.005
    image = torch.randint(0, batch, (count, 1), generator=g).float()
    cls = torch.randint(0, nc, (count, 1), generator=g).float()
    return torch.cat((image, cls, centre, size), 1)


@pytest.mark.parametrize(("count", "grids"), [
    (0, [(8, 8), (4, 4), (2, 2)]),
    (1, [(32, 32), (16, 16), (8, 8)]),
    (300, [(40, 32), (20, 16), (10, 8)]),  # a non-square multi-scale batch
    (2000, [(80, 80), (40, 40), (20, 20)]),
])
def test_build_targets_equals_the_previous_implementation_on_random_targets(count: int, grids) -> None:
    anchors = make_head().anchors
    for seed in range(3):
        targets = random_targets(count, batch=4, nc=3, seed=seed)
        got = build_targets(targets, anchors, grids)
        cached = build_targets(targets, anchors, grids, constants=target_constants(grids, anchors.device))
        for now, kept, before in zip(got, cached, build_targets_before(targets, anchors, grids), strict=True):
            for name, value in before._asdict().items():
                assert torch.equal(getattr(now, name), value), name
                assert torch.equal(getattr(kept, name), value), name


def test_yolo_loss_and_gradients_equal_the_previous_implementation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cached constants, the scatter class target and detector.train.ciou against the previous build_targets,
    F.one_hot and torchvision's CIoU: the same loss and gradients to the bit."""
    from torchvision.ops import complete_box_iou_loss as torchvision_ciou

    head = make_head(nc=5)
    targets = random_targets(120, batch=2, nc=5, seed=4)
    torch.manual_seed(0)
    maps = [torch.randn(2, 3, 128 // int(s), 96 // int(s), head.no) for s in STRIDES]

    def run() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        leaves = [m.clone().requires_grad_() for m in maps]
        total, parts = YoloLoss(head, imgsz=128, label_smoothing=0.1)(leaves, targets)
        total.backward()
        return total.detach(), parts, [m.grad for m in leaves]

    now = run()
    monkeypatch.setattr(loss_module, "complete_box_iou_loss", torchvision_ciou)
    monkeypatch.setattr(loss_module, "build_targets", lambda t, a, g, anchor_t, _: build_targets_before(t, a, g, anchor_t))
    before = run()
    assert torch.equal(now[0], before[0]) and torch.equal(now[1], before[1])
    assert all(torch.equal(a, b) for a, b in zip(now[2], before[2]))


def test_a_yolo_loss_step_runs_no_op_that_would_wait_for_a_gpu() -> None:
    """After its first call at a set of map shapes (which builds the `target_constants`), the loss and its backward read nothing back to the
    host and build no tensor from Python data: no op that would make a CUDA step wait (`host_syncs`)."""
    head = make_head(nc=3)
    loss = YoloLoss(head, imgsz=64)
    maps = [torch.randn(2, 3, 64 // int(s), 64 // int(s), head.no, requires_grad=True) for s in STRIDES]
    loss(maps, TARGETS)
    assert host_syncs(lambda: loss(maps, TARGETS)[0].backward()) == []


def one_cell_head() -> Detect:
    """One level at stride 8, one 16 px anchor (2 x 2 cells), two classes."""
    head = Detect([8], nc=2, anchors=[[16, 16]])
    head.set_stride([8])
    return head


# one target at (3.5, 3.5) cells of the 8 x 8 grid, 2 x 2 cells: its own cell (3, 3) only (centre on the half cell)
ONE_TARGET = torch.tensor([[0, 1, 3.5 / 8, 3.5 / 8, 2 / 8, 2 / 8]])


def test_box_loss_of_a_shifted_box_is_one_minus_ciou_by_hand() -> None:
    """Prediction = the target box moved 0.5 cell right: IoU (2 - d) / (2 + d) = 0.6, centre distance d^2 = 0.25
    over the enclosing diagonal 2.5^2 + 2^2, no aspect term; box gain 0.05 x 3 / 1 level."""
    head = one_cell_head()
    p = torch.zeros(1, 1, 8, 8, head.no)
    p[0, 0, 3, 3, 0] = torch.logit(torch.tensor(0.75))  # 2 sig - 0.5 = 1.0: centre 0.5 cell right of the target's 0.5
    _, parts = YoloLoss(head, box=0.05, imgsz=64)([p], ONE_TARGET)  # tw = th = 0: (2 * 0.5)^2 x 2 cells = 2 cells
    expected = 1 - 0.6 + 0.25 / (2.5**2 + 2**2)
    assert float(parts[0]) == pytest.approx(0.05 * 3 * expected, rel=1e-5)


def test_class_loss_is_the_bce_averaged_over_classes_and_positives() -> None:
    """With every class logit at 0 the BCE of each class column is log 2, whatever the target: a level with
    positives adds log 2 (the mean over its rows and classes), times the gain cls x nc/80 x 3/nl."""
    head = make_head(nc=3)
    maps = perfect_maps(head, TARGETS, batch=2, imgsz=64, cls_logit=(0.0, 0.0))
    loss = YoloLoss(head, cls=0.5, imgsz=64)
    levels_hit = sum(bool(level.valid.any()) for level in build_targets(TARGETS, head.anchors, [(8, 8), (4, 4), (2, 2)]))
    assert levels_hit >= 1
    assert float(loss(maps, TARGETS)[1][2]) == pytest.approx(0.5 * 3 / 80 * math.log(2) * levels_hit, rel=1e-5)


def test_objectness_target_is_the_iou_of_the_assigned_box() -> None:
    """A perfect box (IoU 1) at objectness logit 5: BCE toward 1 pulls the logit up, by sigmoid(5) - 1 per element
    of the mean, x balance 4 x obj gain (64/640)^2 x 3/1 x batch 1; every other cell is pushed down."""
    head = one_cell_head()
    p = torch.zeros(1, 1, 8, 8, head.no)
    p[..., 4] = 5.0
    p.requires_grad_()
    total, parts = YoloLoss(head, imgsz=64)([p], ONE_TARGET)
    assert float(parts[0]) < 1e-6
    total.backward()
    scale = 4.0 * (64 / 640) ** 2 * 3 / 64
    assert float(p.grad[0, 0, 3, 3, 4]) == pytest.approx(scale * (torch.sigmoid(torch.tensor(5.0)).item() - 1), rel=1e-3)
    assert float(p.grad[0, 0, 0, 0, 4]) == pytest.approx(scale * torch.sigmoid(torch.tensor(5.0)).item(), rel=1e-4)


def test_objectness_target_puts_x_and_y_in_their_own_axes_on_a_wide_map() -> None:
    level = LevelTargets(
        image=torch.tensor([1]), anchor=torch.tensor([1]), cell_y=torch.tensor([2]), cell_x=torch.tensor([4]),
        box=torch.zeros(1, 4), anchor_wh=torch.ones(1, 2), cls=torch.tensor([0]), valid=torch.tensor([True]),
    )
    target = objectness_target((2, 2, 3, 5), level, torch.tensor([0.7]))
    assert target[1, 1, 2, 4] == pytest.approx(0.7) and target.sum() == pytest.approx(0.7)


def test_default_gains_for_one_and_two_levels() -> None:
    """box x 3/nl, cls x nc/80 x 3/nl, obj x (imgsz/640)^2 x 3/nl (YOLOv5's train.py); build_loss's box default is 0.05."""
    from detector.train.loss import build_loss

    head = Detect([8, 16], nc=4, anchors=[[10, 13], [30, 61]])
    head.set_stride([8, 16])
    loss = build_loss(head, cls=0.5, obj=1.0, imgsz=640)
    assert (loss.box_gain, loss.cls_gain, loss.obj_gain) == pytest.approx((0.05 * 1.5, 0.5 * 4 / 80 * 1.5, 1.5))
    assert loss.balance == (4.0, 1.0)
    assert build_loss(one_cell_head()).box_gain == pytest.approx(0.15)


def test_a_zero_size_target_leaves_the_loss_and_gradients_finite() -> None:
    """A degenerate box (a point, w = h = 0) matches no anchor; its padding rows must not carry a NaN (CIoU of an
    empty box) into the masked sums."""
    head = make_head()
    targets = torch.cat([TARGETS, torch.tensor([[0, 0, 0.5, 0.5, 0.0, 0.0]])])
    maps = [torch.randn(2, 3, 64 // int(s), 64 // int(s), head.no, requires_grad=True) for s in STRIDES]
    total, parts = YoloLoss(head, imgsz=64)(maps, targets)
    total.backward()
    assert torch.isfinite(parts).all() and all(torch.isfinite(p.grad).all() for p in maps)

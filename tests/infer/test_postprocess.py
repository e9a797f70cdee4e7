"""non_max_suppression: scores, multi-label, per-image and per-class grouping, max_det, against a plain reference."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_convert, nms

from detector.infer.postprocess import non_max_suppression


def make_pred(rows: list[list[float]], batch: int = 1, image: int = 0, n: int | None = None) -> torch.Tensor:
    """(batch, n, 5 + nc) predictions; `rows` [cx, cy, w, h, obj, cls...] go to `image`, the rest is zero."""
    t = torch.tensor(rows, dtype=torch.float32)
    pred = torch.zeros(batch, n or len(rows), t.shape[1])
    pred[image, : len(rows)] = t
    return pred


def test_score_is_objectness_times_class_probability() -> None:
    out = non_max_suppression(make_pred([[50, 50, 20, 10, 0.5, 0.8, 0.1]]), conf=0.3, iou=0.5)
    assert len(out) == 1
    assert torch.allclose(out[0], torch.tensor([[40.0, 45.0, 60.0, 55.0, 0.4, 0.0]]))


def test_multi_label_keeps_a_box_once_per_class_above_conf() -> None:
    pred = make_pred([[50, 50, 20, 20, 0.9, 0.9, 0.5, 0.0005]])
    multi = non_max_suppression(pred, conf=0.001, iou=0.5)[0]
    assert multi[:, 5].tolist() == [0.0, 1.0]  # class 2 scores 0.00045 < conf
    assert torch.allclose(multi[:, 4], torch.tensor([0.81, 0.45]))
    single = non_max_suppression(pred, conf=0.001, iou=0.5, multi_label=False)[0]
    assert single[:, 5].tolist() == [0.0]


def test_suppression_is_per_class_unless_agnostic() -> None:
    rows = [
        [50, 50, 20, 20, 1.0, 0.9, 0.0],
        [51, 50, 20, 20, 1.0, 0.8, 0.0],  # same class, IoU ~0.9 -> suppressed
        [50, 51, 20, 20, 1.0, 0.0, 0.7],  # other class -> kept
        [150, 150, 20, 20, 1.0, 0.6, 0.0],  # far away -> kept
    ]
    out = non_max_suppression(make_pred(rows), conf=0.01, iou=0.5)[0]
    assert out[:, 4].tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert out[:, 5].tolist() == [0.0, 1.0, 0.0]
    agnostic = non_max_suppression(make_pred(rows), conf=0.01, iou=0.5, agnostic=True)[0]
    assert agnostic[:, 4].tolist() == pytest.approx([0.9, 0.6])


@pytest.mark.parametrize("multi_label", [True, False])
def test_a_box_past_the_top_left_corner_never_suppresses_another_class(multi_label: bool) -> None:
    """torchvision's batched_nms shifts each class by (largest coordinate + 1): a class-1 box from -40 to -8 (a
    centre half a stride outside the image) landed on the class-0 box exactly that far away and removed it."""
    far = 250.0 + 1  # the largest coordinate (the third box's corner) + 1
    rows = [
        [-24, -24, 32, 32, 0.9, 0.0, 1.0],  # class 1: (-40, -40) to (-8, -8)
        [-24 + far, -24 + far, 32, 32, 0.8, 1.0, 0.0],  # class 0: the same box shifted by `far`
        [225, 225, 50, 50, 0.3, 1.0, 0.0],  # class 0: (200, 200) to (250, 250)
    ]
    out = non_max_suppression(make_pred(rows), conf=0.01, iou=0.45, multi_label=multi_label)[0]
    assert out[:, 4].tolist() == pytest.approx([0.9, 0.8, 0.3])


def test_images_never_suppress_each_other_and_empty_images_give_empty_tensors() -> None:
    pred = torch.zeros(3, 4, 6)
    pred[0, 0] = torch.tensor([50, 50, 20, 20, 1.0, 0.9])
    pred[2, 0] = torch.tensor([50, 50, 20, 20, 1.0, 0.8])
    out = non_max_suppression(pred, conf=0.01, iou=0.5)
    assert [len(o) for o in out] == [1, 0, 1]
    assert out[1].shape == (0, 6)
    assert out[2][0, 4].item() == pytest.approx(0.8)


def test_no_candidate_at_all() -> None:
    out = non_max_suppression(torch.zeros(2, 10, 8), conf=0.001, iou=0.6)
    assert [o.shape for o in out] == [(0, 6), (0, 6)]


def test_max_det_keeps_the_highest_scores_per_image() -> None:
    n = 50
    cx = torch.arange(n, dtype=torch.float32) * 30 + 15  # disjoint boxes
    scores = torch.linspace(0.1, 0.9, n)
    pred = torch.zeros(2, n, 6)
    pred[:, :, 0], pred[:, :, 1], pred[:, :, 2:4] = cx, 15.0, 20.0
    pred[:, :, 4], pred[:, :, 5] = 1.0, scores
    out = non_max_suppression(pred, conf=0.001, iou=0.5, max_det=7)
    for o in out:
        assert len(o) == 7
        assert torch.allclose(o[:, 4], scores.flip(0)[:7])


def test_classes_filter() -> None:
    pred = make_pred([[50, 50, 20, 20, 1.0, 0.9, 0.8, 0.7]])
    out = non_max_suppression(pred, conf=0.01, iou=0.5, classes=[2, 0])[0]
    assert sorted(out[:, 5].tolist()) == [0.0, 2.0]


def test_classes_filter_with_one_label_per_box_drops_a_box_whose_best_class_is_left_out() -> None:
    """multi_label=False: a box is its best class or nothing; `classes` does not promote its runner-up."""
    pred = make_pred([[50, 50, 20, 20, 1.0, 0.9, 0.8], [150, 50, 20, 20, 1.0, 0.2, 0.6]])
    out = non_max_suppression(pred, conf=0.01, iou=0.5, multi_label=False, classes=[1])[0]
    assert out.tolist() == [[140.0, 40.0, 160.0, 60.0, pytest.approx(0.6), 1.0]]


def test_a_score_must_exceed_conf() -> None:
    """obj 0.5 x cls 0.5 = 0.25 exactly (binary fractions): kept above conf 0.2, not at conf 0.25; at conf 0 the
    rows scoring 0 stay out."""
    pred = make_pred([[50, 50, 20, 20, 0.5, 0.5, 0.0]], n=4)
    assert [len(non_max_suppression(pred, conf=c, iou=0.5)[0]) for c in (0.2, 0.25)] == [1, 0]
    assert len(non_max_suppression(pred, conf=0.0, iou=0.5)[0]) == 1
    assert len(non_max_suppression(pred, conf=0.0, iou=0.5, multi_label=False)[0]) == 1


def test_matches_a_per_image_per_class_reference() -> None:
    torch.manual_seed(0)
    batch, n, nc = 3, 400, 4
    pred = torch.rand(batch, n, 5 + nc)
    pred[..., :2] *= 200
    pred[..., 2:4] = pred[..., 2:4] * 60 + 5
    pred[..., 4] = pred[..., 4] ** 3
    conf, iou = 0.05, 0.5
    out = non_max_suppression(pred, conf=conf, iou=iou, max_det=10_000)
    for b in range(batch):
        expected = []
        for c in range(nc):
            score = pred[b, :, 4] * pred[b, :, 5 + c]
            keep = score > conf
            boxes = box_convert(pred[b, keep, :4], "cxcywh", "xyxy")
            kept = nms(boxes, score[keep], iou)
            expected += [(c, s) for s in score[keep][kept].tolist()]
        got = sorted(zip(out[b][:, 5].long().tolist(), out[b][:, 4].tolist()))
        assert len(got) == len(expected) > 20
        assert [g[0] for g in got] == [e[0] for e in sorted(expected)]
        assert [g[1] for g in got] == pytest.approx([e[1] for e in sorted(expected)], abs=1e-6)
        assert torch.all(out[b][:-1, 4] >= out[b][1:, 4])  # sorted by score


@pytest.mark.parametrize(("max_det", "clustered_scores"), [(5, False), (40, True), (150, True)])
def test_max_det_keeps_the_first_survivors_of_nms_over_every_candidate(max_det: int, clustered_scores: bool) -> None:
    """NMS runs on a score-ordered prefix of the candidates, grown until it yields max_det: the result must be
    the top max_det of NMS over all of them. 60 objects of 40 near-duplicates each in 2 classes; when an object's
    duplicates share its score level, the first prefix holds a few objects only and must grow."""
    from detector.infer import postprocess

    torch.manual_seed(2)
    pred = torch.zeros(1, 60 * 40, 5 + 2)
    pred[0, :, :2] = (torch.rand(60, 2) * 400).repeat_interleave(40, 0) + torch.randn(2400, 2)
    pred[0, :, 2:4] = 30 + torch.rand(2400, 2) * 4
    pred[0, :, 4] = 1.0
    pred[0, :, 5:] = torch.rand(2400, 2)
    if clustered_scores:
        pred[0, :, 5:] = torch.rand(60, 2).repeat_interleave(40, 0) * 0.9 + pred[0, :, 5:] * 0.05
    (out,) = non_max_suppression(pred, conf=0.01, iou=0.5, max_det=max_det)

    rows = pred[0]
    scores, cls = torch.cat((rows[:, 5], rows[:, 6])), torch.arange(2).repeat_interleave(2400)
    boxes = box_convert(rows[:, :4], "cxcywh", "xyxy").repeat(2, 1)
    keep = scores > 0.01
    boxes, scores, cls = boxes[keep], scores[keep], cls[keep]
    first = scores.argsort(descending=True)[: 2 * max_det]
    grew = len(postprocess.batched_nms(boxes[first], scores[first], cls[first], 0.5)) < max_det
    assert grew == clustered_scores
    full = postprocess.batched_nms(boxes, scores, cls, 0.5)[:max_det]
    assert len(full) == max_det or max_det == 150 and len(full) > 100
    assert torch.equal(out[:, :4], boxes[full]) and torch.equal(out[:, 4], scores[full])


def test_only_the_best_candidates_enter_nms() -> None:
    """Above MAX_CANDIDATES pairs in an image, the highest-scoring ones are kept: NMS cost stays bounded early on."""
    from detector.infer import postprocess

    n = postprocess.MAX_CANDIDATES + 500
    pred = torch.zeros(1, n, 6)
    pred[0, :, 0] = torch.arange(n, dtype=torch.float32) * 10  # disjoint 4 px boxes: NMS removes none
    pred[0, :, 1], pred[0, :, 2:4], pred[0, :, 4] = 5.0, 4.0, 1.0
    pred[0, :, 5] = torch.linspace(0.9, 0.01, n)
    (out,) = non_max_suppression(pred, conf=0.001, iou=0.5, max_det=n)
    assert len(out) == postprocess.MAX_CANDIDATES
    assert out[:, 4].min() == pytest.approx(float(pred[0, postprocess.MAX_CANDIDATES - 1, 5]))


def test_images_suppressed_side_by_side_on_the_torch_threads_give_the_same_boxes(monkeypatch) -> None:
    from detector.infer import postprocess

    torch.manual_seed(1)
    pred = torch.rand(5, 600, 5 + 3)
    pred[..., :2] *= 300
    pred[..., 2:4] = pred[..., 2:4] * 40 + 4
    pools = []

    class RecordingPool(postprocess.ThreadPoolExecutor):
        def __init__(self, workers: int) -> None:
            pools.append(workers)
            super().__init__(workers)

    monkeypatch.setattr(postprocess, "ThreadPoolExecutor", RecordingPool)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = non_max_suppression(pred, conf=0.01, iou=0.5, max_det=300)
        torch.set_num_threads(2)
        side_by_side = non_max_suppression(pred, conf=0.01, iou=0.5, max_det=300)
    finally:
        torch.set_num_threads(threads)
    assert pools == [2]  # one thread: no pool; two: one pool of two
    assert len(alone) == 5 and all(torch.equal(a, b) and len(a) > 50 for a, b in zip(alone, side_by_side))

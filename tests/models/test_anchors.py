"""Auto-anchor: best possible recall, k-means + evolution, and the pre-training check on a real Detect head."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from detector.errors import DetectorError
from detector.models.anchors import best_possible_recall, check_anchors, kmeans_anchors
from detector.models.head import Detect
from repo_paths import REPO_ROOT

ANCHORS_PX = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]
MODEL_YAML = REPO_ROOT / "configs" / "models" / "yolo-c2f-n.yaml"
CENTRES = np.array([[12.0, 9.0], [60.0, 30.0], [200.0, 280.0]])


def make_model() -> SimpleNamespace:
    head = Detect([8, 16, 32], nc=2, anchors=ANCHORS_PX)
    head.set_stride([8.0, 16.0, 32.0])
    return SimpleNamespace(head=head)


def clusters(per_cluster: int = 1000, sigma: float = 0.05, seed: int = 0) -> np.ndarray:
    """Box sizes (3 * per_cluster, 2) log-normally spread around CENTRES."""
    rng = np.random.default_rng(seed)
    return np.concatenate([c * np.exp(rng.normal(0, sigma, (per_cluster, 2))) for c in CENTRES]).astype(np.float32)


def test_best_possible_recall_of_matching_anchors_is_one() -> None:
    anchors = np.array([[10.0, 10.0], [50.0, 50.0], [250.0, 250.0]])  # 5x apart: each box fits one anchor
    bpr, per_box = best_possible_recall(anchors, np.repeat(anchors, 4, axis=0))
    assert (bpr, per_box) == (1.0, 1.0)
    bpr, per_box = best_possible_recall(torch.tensor(anchors), np.array([[10.0, 10.0], [1000.0, 1000.0]]))
    assert bpr == 0.5 and per_box == 0.5
    # the ratio rule is strict, like the loss's: exactly thr times an anchor does not fit
    assert best_possible_recall(anchors[:1], np.array([[40.0, 10.0], [39.0, 10.0]]), thr=4.0)[0] == 0.5


def test_kmeans_recovers_three_separated_clusters() -> None:
    wh = clusters()
    for generations in (0, 1000):
        anchors = kmeans_anchors(wh, 3, imgsz=640, generations=generations)
        assert anchors.shape == (3, 2)
        np.testing.assert_allclose(anchors, CENTRES, rtol=0.05)  # sorted by area, like CENTRES
        assert best_possible_recall(anchors, wh)[0] == 1.0


def test_kmeans_is_deterministic_for_a_seed() -> None:
    wh = clusters(per_cluster=300, sigma=0.4)
    first = kmeans_anchors(wh, 9, imgsz=640, generations=200, seed=3)
    assert np.array_equal(first, kmeans_anchors(wh, 9, imgsz=640, generations=200, seed=3))
    assert np.all(np.diff(first.prod(1)) >= 0) and first.min() >= 2.0


def test_kmeans_ignores_tiny_boxes_and_needs_enough_boxes() -> None:
    wh = np.concatenate([clusters(per_cluster=50), np.full((500, 2), 1.0, dtype=np.float32)])
    anchors = kmeans_anchors(wh, 3, imgsz=640, generations=0)
    np.testing.assert_allclose(anchors, CENTRES, rtol=0.05)
    with pytest.raises(DetectorError, match="too few"):
        kmeans_anchors(np.array([[10.0, 10.0], [1.0, 1.0]]), 3, imgsz=640)
    # a box with one side of at least 2 px is fitted (thin lines): the mean size, its thin side raised to 2 px
    thin = kmeans_anchors(np.tile([[1.0, 60.0], [1.5, 40.0]], (5, 1)), 1, imgsz=640, generations=0)
    np.testing.assert_allclose(thin, [[2.0, 50.0]], rtol=1e-5)


def test_check_anchors_replaces_mismatched_anchors() -> None:
    model = make_model()
    before = model.head.anchors_px.clone()
    rng = np.random.default_rng(0)
    wh = np.stack([rng.uniform(200, 400, 3000), rng.uniform(4, 12, 3000)], 1)  # wide thin boxes: no anchor fits
    assert best_possible_recall(before, wh)[0] < 0.1

    report = check_anchors(model, wh, imgsz=640)
    after = model.head.anchors_px
    assert "replaced" in report
    assert best_possible_recall(after, wh)[0] > 0.98
    assert not torch.allclose(after, before)
    areas = after.prod(-1)
    assert torch.all(areas[:-1].max(1).values <= areas[1:].min(1).values)  # small anchors on fine levels


def test_check_anchors_gives_the_smallest_anchors_to_the_finest_level_whatever_the_level_order() -> None:
    """A head whose levels run coarse to fine (strides 32, 16, 8): the refitted anchors still go by stride."""
    head = Detect([8, 16, 32], nc=2, anchors=ANCHORS_PX[::-1])
    head.set_stride([32.0, 16.0, 8.0])
    model = SimpleNamespace(head=head)
    rng = np.random.default_rng(0)
    wh = np.stack([rng.uniform(200, 400, 3000), rng.uniform(4, 12, 3000)], 1)
    assert "replaced" in check_anchors(model, wh, imgsz=640)
    areas = model.head.anchors_px.prod(-1)  # (level, anchor)
    assert torch.all(areas[2].max() <= areas[1].min()) and torch.all(areas[1].max() <= areas[0].min())


def test_the_recall_check_allows_for_scale_augmentation() -> None:
    """Boxes 3.9x their anchor's width fit (under 4x), but scaled by U(0.9, 1.1) as YOLOv5's check does, those
    scaled by more than 4 / 3.9 do not: about (1.1 - 4 / 3.9) / 0.2 = 37% of them."""
    head = Detect([8], nc=2, anchors=[[10, 10]])
    head.set_stride([8.0])
    wh = np.tile([[39.0, 10.0]], (2000, 1))
    assert best_possible_recall(head.anchors_px, wh)[0] == 1.0
    report = check_anchors(SimpleNamespace(head=head), wh, imgsz=640)
    bpr = float(report.split("best possible recall ")[1][:6])
    assert 0.55 < bpr < 0.70, report


def test_check_anchors_keeps_fitting_anchors_unless_forced() -> None:
    model = make_model()
    before = model.head.anchors_px.clone()
    wh = before.reshape(-1, 2).repeat(100, 1) * torch.linspace(0.8, 1.2, 900)[:, None]
    report = check_anchors(model, wh, imgsz=640)
    assert "kept" in report and "1.0000" in report
    assert torch.equal(model.head.anchors_px, before)

    assert "replaced" in check_anchors(model, wh, imgsz=640, force=True)
    assert not torch.equal(model.head.anchors_px, before)


def test_check_anchors_is_deterministic_for_a_seed() -> None:
    wh = clusters(per_cluster=400, sigma=0.3) * np.array([6.0, 0.5], dtype=np.float32)
    first, second = make_model(), make_model()
    assert check_anchors(first, wh, imgsz=640, seed=1) == check_anchors(second, wh, imgsz=640, seed=1)
    assert torch.equal(first.head.anchors, second.head.anchors)


def test_check_anchors_without_enough_boxes_keeps_anchors() -> None:
    model = make_model()
    before = model.head.anchors_px.clone()
    assert "no training boxes" in check_anchors(model, np.zeros((0, 2)), imgsz=640)
    assert "kept" in check_anchors(model, np.array([[500.0, 3.0]]), imgsz=640)
    assert torch.equal(model.head.anchors_px, before)


def test_check_anchors_fits_a_built_model_with_an_anchor_count() -> None:
    import yaml

    from detector.models.builder import build_model

    with open(MODEL_YAML) as f:
        config = yaml.safe_load(f)
    config["anchors"] = 3  # placeholders: the trainer passes force=True for an int
    model = build_model(config, nc=2)
    wh = clusters(per_cluster=300, sigma=0.3)
    report = check_anchors(model, wh, imgsz=640, force=isinstance(model.yaml["anchors"], int))
    assert "replaced" in report
    assert best_possible_recall(model.head.anchors_px, wh)[0] > 0.98
    torch.testing.assert_close(model.head.anchors * model.stride.view(-1, 1, 1), model.head.anchors_px)


def test_kmeans_clusters_the_sizes_whitened_by_their_spread() -> None:
    """YOLOv5's k-means runs on w / std(w), h / std(h): two groups of heights 6 and 30 px under widths spread
    over 40-400 px split by height (unwhitened, the wide spread of the widths would split them by width)."""
    rng = np.random.default_rng(0)
    tall = np.arange(2000) % 2 == 1
    wh = np.stack([rng.uniform(40, 400, 2000), np.where(tall, 30.0, 6.0) * np.exp(rng.normal(0, 0.05, 2000))], 1)
    anchors = kmeans_anchors(wh.astype(np.float32), 2, imgsz=640, generations=0)
    expected = [wh[~tall].mean(0), wh[tall].mean(0)]  # sorted by area: the short group first
    np.testing.assert_allclose(anchors, expected, rtol=0.02)

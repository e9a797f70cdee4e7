"""Evaluator: the whole path (model output -> NMS -> original pixels and ids -> COCOeval -> files) with fake
models that output the ground truth, then through the real val loader and the real model."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detector.infer.evaluator import Evaluator, detections_to_rows, save_results
from detector.infer.metrics import COCO_KEYS
from detector.viz.plots import confusion_matrix
from detector.errors import DetectorError

IMGSZ = 128
# Gapped category ids; non-square images; a crowd box; images 5 and 6 have no annotations.
CATEGORIES = [{"id": 2, "name": "circle"}, {"id": 5, "name": "square"}, {"id": 9, "name": "triangle"}]
IMAGES = [
    {"id": 1, "file_name": "a.jpg", "width": 200, "height": 100},
    {"id": 2, "file_name": "b.jpg", "width": 90, "height": 160},
    {"id": 3, "file_name": "c.jpg", "width": 128, "height": 128},
    {"id": 5, "file_name": "d.jpg", "width": 150, "height": 60},
    {"id": 6, "file_name": "e.jpg", "width": 64, "height": 96},
    {"id": 8, "file_name": "f.jpg", "width": 300, "height": 180},
]
BOXES = [  # image_id, category_id, x, y, w, h, iscrowd
    (1, 2, 10.0, 20.0, 60.0, 50.0, 0),
    (1, 5, 120.5, 10.25, 40.0, 30.0, 0),
    (1, 2, 150.0, 60.0, 45.0, 35.0, 1),
    (2, 9, 5.0, 30.0, 70.0, 100.0, 0),
    (2, 5, 40.0, 120.0, 20.0, 25.0, 0),
    (3, 2, 0.0, 0.0, 128.0, 128.0, 0),
    (8, 9, 30.0, 20.0, 120.0, 90.0, 0),
    (8, 9, 200.0, 100.0, 12.0, 9.0, 0),
    (8, 2, 180.0, 40.0, 100.0, 120.0, 0),
]


def coco_json() -> dict:
    anns = [
        {"id": 10 + i, "image_id": im, "category_id": c, "bbox": [x, y, w, h], "area": w * h, "iscrowd": crowd}
        for i, (im, c, x, y, w, h, crowd) in enumerate(BOXES)
    ]
    return {"images": copy.deepcopy(IMAGES), "categories": copy.deepcopy(CATEGORIES), "annotations": anns}


class FakeCocoDataset:
    """What the Evaluator reads from a CocoDataset: coco_gt(), names, category_ids (index = contiguous class)."""

    def __init__(self, data: dict) -> None:
        self.data = data
        self.category_ids = [c["id"] for c in data["categories"]]
        self.names = [c["name"] for c in data["categories"]]

    def coco_gt(self) -> COCO:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO()
            coco.dataset = copy.deepcopy(self.data)
            coco.createIndex()
        return coco


class FakeLoader:
    """Batches as the val loader gives them (letterboxed into IMGSZ x IMGSZ, centred padding), built by hand."""

    def __init__(self, data: dict, batch_size: int = 4) -> None:
        self.dataset = FakeCocoDataset(data)
        self.data = data
        self.batch_size = batch_size

    def __iter__(self):
        images = self.data["images"]
        to_class = {c: i for i, c in enumerate(self.dataset.category_ids)}
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            targets, meta = [], []
            for b, im in enumerate(chunk):
                h, w = im["height"], im["width"]
                ratio = IMGSZ / max(h, w)
                pad = ((IMGSZ - w * ratio) / 2, (IMGSZ - h * ratio) / 2)
                meta.append({"image_id": im["id"], "file": im["file_name"], "orig_hw": (h, w), "ratio": ratio, "pad": pad})
                for a in self.data["annotations"]:
                    if a["image_id"] == im["id"] and not a["iscrowd"]:
                        x, y, bw, bh = a["bbox"]
                        cx, cy = (x + bw / 2) * ratio + pad[0], (y + bh / 2) * ratio + pad[1]
                        targets.append([b, to_class[a["category_id"]], cx / IMGSZ, cy / IMGSZ, bw * ratio / IMGSZ, bh * ratio / IMGSZ])
            yield {
                "images": torch.full((len(chunk), 3, IMGSZ, IMGSZ), 114, dtype=torch.uint8),
                "targets": torch.tensor(targets, dtype=torch.float32).reshape(-1, 6),
                "meta": meta,
            }


class TargetsAsPredictions(nn.Module):
    """A 'model' whose eval output (B, N, 5 + nc) is the batch's ground truth (score 1), plus optional noise and
    false positives. The loader hands it each batch's targets through `FeedTargets`."""

    def __init__(self, nc: int, *, noise_px: float = 0.0, false_positives: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.nc, self.noise_px, self.false_positives = nc, noise_px, false_positives
        self.generator = torch.Generator().manual_seed(seed)
        self.scale = nn.Parameter(torch.ones(()))  # so the Evaluator finds a device
        self.targets = torch.zeros(0, 6)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        per_image = [self.targets[self.targets[:, 0] == b] for b in range(batch)]
        n = max([len(t) for t in per_image] + [1]) + self.false_positives
        pred = torch.zeros(batch, n, 5 + self.nc)
        for b, t in enumerate(per_image):
            box = t[:, 2:6] * torch.tensor([width, height, width, height])
            if self.noise_px:
                box = box + torch.randn(box.shape, generator=self.generator) * self.noise_px
            pred[b, : len(t), :4] = box
            pred[b, : len(t), 4] = 1.0 if not self.noise_px else 0.5 + 0.5 * torch.rand(len(t), generator=self.generator)
            pred[b, torch.arange(len(t)), 5 + t[:, 1].long()] = 1.0
            fp = slice(n - self.false_positives, n)
            pred[b, fp, :2] = torch.rand(self.false_positives, 2, generator=self.generator) * min(height, width)
            pred[b, fp, 2:4] = 4 + torch.rand(self.false_positives, 2, generator=self.generator) * 40
            pred[b, fp, 4] = torch.rand(self.false_positives, generator=self.generator) * 0.6
            pred[b, fp, 5:] = torch.rand(self.false_positives, self.nc, generator=self.generator)
        return pred.to(images.device) * self.scale


class FeedTargets:
    """Wraps a loader: before each batch is used, the fake model gets that batch's targets."""

    def __init__(self, loader, model: TargetsAsPredictions) -> None:
        self.loader, self.model, self.dataset = loader, model, loader.dataset

    def __iter__(self):
        for batch in self.loader:
            self.model.targets = batch["targets"]
            yield batch

    def __len__(self) -> int:
        return len(self.loader)


def fake_setup(noise_px: float = 0.0, false_positives: int = 0) -> tuple[FeedTargets, TargetsAsPredictions]:
    model = TargetsAsPredictions(len(CATEGORIES), noise_px=noise_px, false_positives=false_positives)
    return FeedTargets(FakeLoader(coco_json()), model), model


def rescore(annotations_json: dict | Path, predictions: Path, image_ids: list[int] | None = None) -> list[float]:
    """pycocotools from scratch on files, as a user re-scoring predictions.json would."""
    if isinstance(annotations_json, dict):
        gt_file = predictions.parent / "gt_for_rescore.json"
        gt_file.write_text(json.dumps(annotations_json))
    else:
        gt_file = annotations_json
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        ev = COCOeval(gt, gt.loadRes(str(predictions)), "bbox")
        if image_ids is not None:
            ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(s) for s in ev.stats]


# --------------------------------------------------------------------------------------------------
# with hand-made batches (no dependency on detector.data's loader)


def test_ground_truth_as_predictions_scores_one_and_writes_the_files(tmp_path: Path) -> None:
    loader, model = fake_setup()
    result = Evaluator(loader).run(model)
    save_results(result, tmp_path, plots=True)
    metrics = result.metrics
    assert metrics["AP"] == metrics["AP50"] == metrics["AP75"] == metrics["AR100"] == 1.0
    assert list(metrics) == [*COCO_KEYS, "per_class", "speed_ms"]
    assert set(metrics["speed_ms"]) == {"preprocess", "inference", "nms", "metric"}
    assert [(c["category_id"], c["instances"]) for c in metrics["per_class"]] == [(2, 3), (5, 2), (9, 3)]

    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert list(saved) == [*COCO_KEYS, "per_class", "speed_ms"]
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert len(predictions) == sum(1 for a in coco_json()["annotations"] if not a["iscrowd"])
    for p in predictions:
        assert set(p) == {"image_id", "category_id", "bbox", "score"}
        assert p["score"] == 1.0
        assert any(np.allclose(p["bbox"], a["bbox"], atol=0.01) for a in coco_json()["annotations"] if a["image_id"] == p["image_id"] and a["category_id"] == p["category_id"])
    for name in ("pr_curve.png", "confusion_matrix.png", "val_batch0.jpg"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000


class AutocastRecorder(TargetsAsPredictions):
    """TargetsAsPredictions that records whether its forward ran under CPU autocast, and in which dtype."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        return super().forward(images)


@pytest.mark.parametrize("precision", [None, torch.bfloat16])
def test_the_forward_runs_in_the_given_precision(precision: torch.dtype | None) -> None:
    model = AutocastRecorder(len(CATEGORIES))
    result = Evaluator(FeedTargets(FakeLoader(coco_json()), model), precision=precision).run(model)
    assert model.autocast is precision
    assert result.metrics["AP"] == 1.0  # its outputs are fp32 whatever the autocast: the same boxes


def test_samples_are_a_rendered_grid_of_the_first_images_and_are_not_saved(tmp_path: Path) -> None:
    loader, model = fake_setup()
    result = Evaluator(loader).run(model, samples=2)
    save_results(result, tmp_path)
    metrics, samples = result.metrics, result.sample
    # 2 images side by side, 240 px each, each a pair: ground truth | predictions
    assert samples.dtype == torch.uint8 and samples.shape == (3, 240, 960)
    pixels = samples.permute(1, 2, 0).reshape(-1, 3).tolist()
    assert [0, 255, 0] in pixels and [255, 0, 0] in pixels  # GT boxes in green, the (perfect) predictions in red
    assert list(metrics) == [*COCO_KEYS, "per_class", "speed_ms"]
    assert "samples" not in json.loads((tmp_path / "metrics.json").read_text())
    assert not (tmp_path / "plots").exists()  # samples do not turn the plots on
    assert "samples" not in metrics and Evaluator(loader).run(model).sample is None


def test_saved_predictions_rescored_equal_reported_metrics_exactly(tmp_path: Path) -> None:
    loader, model = fake_setup(noise_px=2.0, false_positives=5)
    result = Evaluator(loader, iou=0.6, backend="pycocotools").run(model)
    save_results(result, tmp_path)
    metrics = result.metrics
    assert 0.2 < metrics["AP"] < 0.95
    expected = rescore(coco_json(), tmp_path / "predictions.json", image_ids=[im["id"] for im in IMAGES])
    assert [metrics[k] for k in COCO_KEYS] == expected
    loader, model = fake_setup(noise_px=2.0, false_positives=5)
    auto = Evaluator(loader, iou=0.6).run(model).metrics  # faster-coco-eval when installed: float rounding apart
    assert [auto[k] for k in COCO_KEYS] == pytest.approx(expected, abs=1e-12)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert [saved[k] for k in COCO_KEYS] == expected


def test_faster_backend_gives_the_same_numbers() -> None:
    pytest.importorskip("faster_coco_eval")
    loader, model = fake_setup(noise_px=2.0, false_positives=5)
    slow = Evaluator(loader, backend="pycocotools").run(model).metrics
    loader, model = fake_setup(noise_px=2.0, false_positives=5)
    fast = Evaluator(loader, backend="faster").run(model).metrics
    assert [fast[k] for k in COCO_KEYS] == pytest.approx([slow[k] for k in COCO_KEYS], abs=1e-4)


@pytest.mark.parametrize("backend", ["pycocotools", "auto"])
def test_zero_detections_give_zeros_and_an_empty_predictions_file(tmp_path: Path, backend: str) -> None:
    loader, model = fake_setup()
    evaluator = Evaluator(loader, conf=1.0, backend=backend)  # score 1.0 is not > conf 1.0
    result = evaluator.run(model)
    save_results(result, tmp_path, plots=False)
    metrics = result.metrics
    assert all(metrics[k] == 0.0 for k in COCO_KEYS)
    assert json.loads((tmp_path / "predictions.json").read_text()) == []
    assert not (tmp_path / "plots").exists()
    save_results(evaluator.run(model), tmp_path, plots=True)  # plots of nothing
    assert (tmp_path / "plots" / "pr_curve.png").exists()


@pytest.mark.parametrize("training", [True, False])
def test_model_mode_is_restored(training: bool) -> None:
    loader, model = fake_setup()
    model.train(training)
    Evaluator(loader).run(model)
    assert model.training is training


def test_class_count_mismatch_is_an_error() -> None:
    loader, _ = fake_setup()
    with pytest.raises(DetectorError, match="4 classes but the dataset has 3"):
        Evaluator(loader).run(TargetsAsPredictions(4))


def test_detections_to_rows_maps_pixels_ids_and_rounds() -> None:
    pytest.importorskip("detector.data.transforms")
    meta = [
        {"image_id": 7, "orig_hw": (100, 200), "ratio": 0.5, "pad": (0.0, 25.0)},
        {"image_id": 9, "orig_hw": (50, 50), "ratio": 2.0, "pad": (0.0, 0.0)},
    ]
    dets = [
        torch.tensor([[10.0, 30.0, 20.0, 45.0, 0.123456789, 2.0], [0.0, 25.0, 100.0, 75.0, 0.5, 0.0]]),
        torch.zeros(0, 6),
    ]
    rows = detections_to_rows(dets, meta, torch.tensor([4, 8, 15]))
    expected = np.array([[7, 20.0, 10.0, 20.0, 30.0, 0.12346, 15], [7, 0.0, 0.0, 200.0, 100.0, 0.5, 4]])
    assert rows.dtype == np.float64
    assert np.array_equal(rows, expected)
    assert detections_to_rows([], [], torch.tensor([1])).shape == (0, 7)


def detections_to_rows_before(detections, meta, category_ids) -> np.ndarray:
    """detections_to_rows as it was: each image mapped back on the detections' device (the reference)."""
    from detector.data.transforms import unletterbox_boxes
    from detector.infer.coco_rows import coco_rows

    parts = []
    for det, info in zip(detections, meta):
        boxes = unletterbox_boxes(det[:, :4].float(), info["ratio"], info["pad"], info["orig_hw"])
        image_id = torch.full_like(det[:, 4:5], float(info["image_id"]), dtype=torch.float64)
        parts.append(torch.cat([image_id, boxes.double(), det[:, 4:6].double()], dim=1))
    if not parts:
        return np.zeros((0, 7), dtype=np.float64)
    rows = torch.cat(parts).cpu().numpy()
    return coco_rows(rows[:, 0], rows[:, 1:5], rows[:, 5], category_ids.cpu().numpy()[rows[:, 6].astype(np.int64)])


def test_detections_to_rows_equals_the_per_image_mapping_on_random_batches() -> None:
    """One host copy and one set of calls per batch give the rows the per-image mapping gave, to the bit: random
    letterbox ratios and pads, boxes past the image (clipped), images without detections."""
    g = torch.Generator().manual_seed(0)
    category_ids = torch.tensor([1, 3, 7, 20, 90])
    for _ in range(20):
        meta, dets = [], []
        for i in range(int(torch.randint(1, 9, (1,), generator=g))):
            h, w = (int(v) for v in torch.randint(20, 1500, (2,), generator=g))
            ratio = 320 / max(h, w)
            pad = (float(torch.rand(1, generator=g)) * 40, float(torch.rand(1, generator=g)) * 40)
            meta.append({"image_id": 1000 + i, "orig_hw": (h, w), "ratio": ratio, "pad": pad})
            k = int(torch.randint(0, 300, (1,), generator=g)) if i % 3 else 0
            xy = torch.rand(k, 2, generator=g) * 360 - 20
            box = torch.cat((xy, xy + torch.rand(k, 2, generator=g) * 200), 1)
            score, cls = torch.rand(k, 1, generator=g), torch.randint(0, 5, (k, 1), generator=g).float()
            dets.append(torch.cat((box, score, cls), 1))
        assert np.array_equal(detections_to_rows(dets, meta, category_ids), detections_to_rows_before(dets, meta, category_ids))


def test_confusion_matrix_counts() -> None:
    data = coco_json()
    gt = FakeCocoDataset(data).coco_gt()
    rows = np.array(
        [
            [1, 10, 20, 60, 50, 0.9, 2],  # circle found
            [1, 120.5, 10.25, 40, 30, 0.9, 9],  # square called a triangle
            [1, 152, 62, 40, 30, 0.9, 5],  # on the crowd circle: ignored
            [1, 160, 65, 10, 10, 0.9, 2],  # small, inside the crowd circle (IoU 0.06, all of it covered): ignored too
            [5, 10, 10, 20, 20, 0.25, 5],  # false positive on an empty image, at conf exactly: counted
            [3, 0, 0, 128, 128, 0.1, 2],  # below conf 0.25: not counted
        ]
    )
    matrix = confusion_matrix(rows, gt, [1, 3, 5], [2, 5, 9])
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 0] = 1  # circle -> circle
    expected[2, 1] = 1  # predicted triangle, true square
    expected[3, 0] = 1  # the image-3 circle missed
    expected[1, 3] = 1  # square false positive
    assert np.array_equal(matrix, expected)


def test_confusion_matrix_matches_above_the_iou_and_by_the_best_iou() -> None:
    """IoU must exceed 0.45 (one of exactly 0.45 is no match), and a GT box keeps its best-overlapping detection."""
    gt = FakeCocoDataset(coco_json()).coco_gt()
    rows = np.array(
        [
            [1, 10, 20, 60, 22.5, 0.9, 2],  # inside the 60 x 50 circle: IoU 1350 / 3000 = 0.45 exactly
            [3, 0, 0, 128, 64, 0.9, 5],  # the 128 x 128 circle's top half: IoU 0.5, higher score
            [3, 0, 0, 128, 96, 0.8, 9],  # its top three quarters: IoU 0.75, the match
        ]
    )
    matrix = confusion_matrix(rows, gt, [1, 3], [2, 5, 9])
    expected = np.zeros((4, 4), dtype=np.int64)  # classes circle, square, triangle, background
    expected[3, 0] = expected[3, 1] = 1  # image 1's circle and square missed (its crowd is no GT)
    expected[0, 3] = 1  # the 0.45 detection is a false positive
    expected[2, 0] = 1  # image 3: the circle taken for a triangle by its best-IoU detection
    expected[1, 3] = 1  # the other detection of it is a false positive
    assert np.array_equal(matrix, expected)


def test_pr_curves_keep_each_class_on_its_own_precision_column(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """COCOeval's K axis is in sorted category-id order; a dataset listing its ids unsorted keeps its names on the
    right curves."""
    from detector.viz import plots

    plotted = {}
    monkeypatch.setattr(plots, "plot_pr_curves", lambda precision, names, path: plotted.update(precision=precision))
    monkeypatch.setattr(plots, "plot_confusion_matrix", lambda matrix, names, path: None)
    precision = np.zeros((10, 101, 3, 4, 3))
    precision[0, :, :, 0, -1] = [0.2, 0.5, 0.9]  # ids 2, 5, 9 at IoU 0.5, all areas, 100 detections
    plots.save_validation_plots(tmp_path, precision=precision, rows=np.zeros((0, 7)), gt=FakeCocoDataset(coco_json()).coco_gt(),
                                image_ids=[1], category_ids=[9, 2, 5], names=["triangle", "circle", "square"],
                                first_batch=None)
    assert plotted["precision"][0].tolist() == [0.9, 0.2, 0.5]  # classes 0, 1, 2 are ids 9, 2, 5


# --------------------------------------------------------------------------------------------------
# through the real val loader and the real model (detector.data, detector.models)


def write_dataset(root: Path) -> Path:
    """The same json plus matching JPEGs on disk; returns the annotations path."""
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True)
    for im in IMAGES:
        Image.new("RGB", (im["width"], im["height"]), (90, 120, 150)).save(images / im["file_name"])
    annotations = root / "instances.json"
    annotations.write_text(json.dumps(coco_json()))
    return annotations


@pytest.mark.parametrize("rect", [False, True])
def test_letterbox_round_trip_through_the_real_val_loader(tmp_path: Path, rect: bool) -> None:
    loader_module = pytest.importorskip("detector.data.loader")
    from detector.data.spec import SplitSpec

    annotations = write_dataset(tmp_path / "data")
    split = SplitSpec(images=tmp_path / "data" / "images", annotations=annotations)
    loader = loader_module.build_val_loader(split, imgsz=IMGSZ, batch_size=4, workers=0, rect=rect)
    model = TargetsAsPredictions(len(CATEGORIES))
    result = Evaluator(FeedTargets(loader, model), backend="pycocotools").run(model)
    save_results(result, tmp_path / "val")
    metrics = result.metrics
    assert metrics["AP"] == 1.0 and metrics["AR100"] == 1.0
    predictions = json.loads((tmp_path / "val" / "predictions.json").read_text())
    gt = [a for a in coco_json()["annotations"] if not a["iscrowd"]]
    assert len(predictions) == len(gt)
    for p in predictions:
        err = min(
            np.abs(np.array(p["bbox"]) - a["bbox"]).max()
            for a in gt
            if a["image_id"] == p["image_id"] and a["category_id"] == p["category_id"]
        )
        assert err <= 0.5, (p, err)
    assert rescore(annotations, tmp_path / "val" / "predictions.json") == [metrics[k] for k in COCO_KEYS]


def test_real_model_end_to_end(tmp_path: Path) -> None:
    loader_module = pytest.importorskip("detector.data.loader")
    builder = pytest.importorskip("detector.models.builder")
    from detector.data.spec import SplitSpec
    from detector.models.catalog import resolve_model_path

    annotations = write_dataset(tmp_path / "data")
    split = SplitSpec(images=tmp_path / "data" / "images", annotations=annotations)
    loader = loader_module.build_val_loader(split, imgsz=64, batch_size=4, workers=0)
    torch.manual_seed(0)
    model = builder.build_model(resolve_model_path("yolo-ca-n"), nc=len(CATEGORIES))
    model.train()
    # pycocotools, as the rescoring is: the same numbers to the last digit (faster-coco-eval, the default where
    # installed, sums its precisions in another order: 1 ulp apart on some inputs, see test_val_from_a_checkpoint)
    result = Evaluator(loader, conf=0.001, backend="pycocotools").run(model)
    save_results(result, tmp_path / "val", plots=True)
    metrics = result.metrics
    assert model.training
    assert all(math.isfinite(metrics[k]) for k in COCO_KEYS)
    assert rescore(annotations, tmp_path / "val" / "predictions.json") == [metrics[k] for k in COCO_KEYS]


def test_a_second_run_of_the_same_model_refreshes_its_copy_and_predicts_as_a_new_evaluator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer validates its EMA model each epoch: the first run's BN-folded copy is refreshed with the new
    weights (no second deep copy), and predicts exactly what a new evaluator's copy does."""
    from detector.data.loader import build_val_loader
    from detector.data.spec import SplitSpec
    from detector.infer import evaluator as evaluator_module
    from detector.models.builder import build_model
    from detector.models.catalog import resolve_model_path
    from detector.models.detection_model import inference_copy

    copies = []
    monkeypatch.setattr(evaluator_module, "inference_copy", lambda m: copies.append(m) or inference_copy(m))
    annotations = write_dataset(tmp_path / "data")
    loader = build_val_loader(SplitSpec(images=tmp_path / "data" / "images", annotations=annotations), imgsz=64, batch_size=4, workers=0)
    torch.manual_seed(0)
    model = build_model(resolve_model_path("yolo-ca-n"), nc=len(CATEGORIES))
    evaluator = Evaluator(loader, conf=0.001)
    first = evaluator.run(model).rows
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    second = evaluator.run(model).rows
    assert len(copies) == 1
    fresh = Evaluator(loader, conf=0.001).run(model).rows
    assert len(second) and np.array_equal(second, fresh) and not np.array_equal(first, second)


def write_checkpoint(path: Path, category_ids: list[int]) -> None:
    from detector.runtime.checkpoint import CHECKPOINT_KEYS, FORMAT_VERSION, save_checkpoint
    from detector.models.builder import build_model
    from detector.models.catalog import resolve_model_path

    torch.manual_seed(0)
    model = build_model(resolve_model_path("yolo-ca-n"), nc=len(category_ids))
    state = dict.fromkeys(CHECKPOINT_KEYS)
    state.update(
        format_version=FORMAT_VERSION, version="test", model_yaml=model.yaml, model=model.state_dict(), ema=None, epoch=0,
        train_state={}, rng={}, train_config={"data": ""}, names=[c["name"] for c in CATEGORIES], category_ids=category_ids,
        imgsz=64, run_dir=str(path.parent),
    )
    save_checkpoint(path, state)


def test_val_from_a_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("detector.runtime.checkpoint")
    from detector.api import Detector

    def val(weights: Path | str, **options) -> dict:
        """What `detector val weights=... key=value` runs: the checkpoint's Detector, then its val."""
        return Detector.from_checkpoint(weights, device="cpu").val(project=tmp_path, exist_ok=True, **options)

    annotations = write_dataset(tmp_path / "data")
    data_yaml = tmp_path / "data.yaml"
    split = "{images: data/images, annotations: data/instances.json}"
    data_yaml.write_text(f"train: {split}\nval: {split}\n")
    weights = tmp_path / "best.pt"
    write_checkpoint(weights, [c["id"] for c in CATEGORIES])
    metrics = val(weights, data=data_yaml, batch=4, workers=0, plots=False, name="val")
    assert list(metrics) == [*COCO_KEYS, "per_class", "speed_ms"]
    rescored = rescore(annotations, tmp_path / "val" / "predictions.json")
    assert rescored == pytest.approx([metrics[k] for k in COCO_KEYS], rel=1e-12, abs=1e-15)

    write_checkpoint(weights, [1, 2, 3])
    with pytest.raises(DetectorError, match="category ids"):
        val(weights, data=data_yaml, batch=4, workers=0)
    with pytest.raises(DetectorError, match="data="):
        val(weights, batch=4, workers=0)
    with pytest.raises(DetectorError, match="weights="):  # no checkpoint: the Detector cannot be made
        val("", data=data_yaml)
    with pytest.raises(DetectorError, match="split"):
        val(weights, data=data_yaml, split="test")


# --------------------------------------------------------------------------------------------------
# what `run` reports besides the metrics, and its guards


def test_a_loader_without_a_coco_dataset_is_refused() -> None:
    """A loader whose dataset is not (and has no .coco) CocoDataset is a TypeError naming what is needed."""
    with pytest.raises(TypeError, match="needs a val loader whose dataset is .* a CocoDataset"):
        Evaluator([{"images": torch.zeros(1, 3, IMGSZ, IMGSZ, dtype=torch.uint8)}])


def test_a_loader_that_yields_no_batch_is_an_error() -> None:
    """An empty val loader is a DetectorError, not a crash inside the concatenation of no rows."""
    data = {**coco_json(), "images": []}
    model = TargetsAsPredictions(len(CATEGORIES))
    with pytest.raises(DetectorError, match="the val loader yielded no images"):
        Evaluator(FeedTargets(FakeLoader(data), model)).run(model)


@pytest.mark.parametrize("nc", [2, 4])
def test_a_model_with_fewer_or_more_classes_than_the_dataset_is_an_error(nc: int) -> None:
    """A class-count mismatch is refused in both directions."""
    loader, _ = fake_setup()
    with pytest.raises(DetectorError, match=f"{nc} classes but the dataset has 3"):
        Evaluator(loader).run(TargetsAsPredictions(nc))


def test_first_batch_is_the_loaders_first_batch() -> None:
    """first_batch (val_batch0.jpg, samples) is the loader's first batch with its detections."""
    loader, model = fake_setup()
    images, targets, dets = Evaluator(loader).run(model).first_batch
    first = next(iter(FakeLoader(coco_json())))
    assert len(images) == len(dets) == 4  # the second batch holds the last 2 images
    assert torch.equal(targets, first["targets"])
    assert [len(d) for d in dets] == [2, 2, 1, 0]  # non-crowd boxes of images 1, 2, 3, 5


def test_max_det_caps_the_detections_of_each_image() -> None:
    """max_det=1 keeps one detection per image."""
    loader, model = fake_setup()
    rows = Evaluator(loader, max_det=1).run(model).rows
    assert sorted(rows[:, 0].astype(int).tolist()) == [1, 2, 3, 8]  # the images with ground truth: 2, 2, 1, 3 boxes


def test_save_json_false_writes_the_metrics_only(tmp_path: Path) -> None:
    """save_json=False leaves predictions.json out; metrics.json is still written."""
    loader, model = fake_setup()
    save_results(Evaluator(loader).run(model), tmp_path, save_json=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


class SlowForward(TargetsAsPredictions):
    """TargetsAsPredictions whose forward takes at least `seconds` (a sleep): a known share of the run's time."""

    def __init__(self, nc: int, seconds: float) -> None:
        super().__init__(nc)
        self.seconds = seconds

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return super().forward(images)


def test_speed_is_milliseconds_per_image_of_each_stage() -> None:
    """speed_ms is ms per image of four stages timed apart: they add up to at most the run's wall time."""
    # 6 images in 2 batches, each forward sleeping 0.5 s: inference is at least 1000 ms / 6 per image
    model = SlowForward(len(CATEGORIES), seconds=0.5)
    evaluator = Evaluator(FeedTargets(FakeLoader(coco_json()), model))
    start = time.perf_counter()
    speed = evaluator.run(model).speed_ms
    wall_ms = 1000 * (time.perf_counter() - start)
    assert set(speed) == {"preprocess", "inference", "nms", "metric"}
    assert speed["inference"] >= 1000 / 6
    assert sum(speed.values()) * 6 <= wall_ms


class CountingForward(TargetsAsPredictions):
    """TargetsAsPredictions with one output level of stride 32 that records the size of every input it gets."""

    def __init__(self, nc: int) -> None:
        super().__init__(nc)
        self.register_buffer("stride", torch.tensor([32.0]))
        self.sizes: list[tuple[int, int]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(images.shape[-2:]))
        return super().forward(images)


def test_augment_runs_the_three_test_time_passes_per_batch() -> None:
    """augment=True runs each batch through the three TTA passes; without it, one pass."""
    # scales 1, 0.83 and 0.67 of 128 px, padded to stride 32: 128, int(106.24) = 106 -> 128, int(85.76) = 85 -> 96
    model = CountingForward(len(CATEGORIES))
    Evaluator(FeedTargets(FakeLoader(coco_json()), model), augment=True).run(model)
    assert model.sizes == [(128, 128), (128, 128), (96, 96)] * 2
    model.sizes.clear()
    Evaluator(FeedTargets(FakeLoader(coco_json()), model)).run(model)
    assert model.sizes == [(128, 128)] * 2

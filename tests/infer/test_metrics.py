"""evaluate_coco against pycocotools run independently on the same inputs (via json, as a user would)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detector.errors import DetectorError
from detector.infer.metrics import COCO_KEYS, detections_to_coco_results, evaluate_coco, fitness, format_metrics_table

# Gapped category ids, a crowd box, an image without annotations (id 4), boxes in all three size ranges.
CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 11, "name": "bird"}]
IMAGES = [{"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480} for i in (1, 2, 3, 4)]
BOXES = [  # image_id, category_id, x, y, w, h, iscrowd
    (1, 3, 10, 20, 100, 150, 0),
    (1, 7, 300, 200, 50, 40, 0),
    (2, 7, 30, 30, 20, 15, 0),
    (2, 3, 200, 100, 250, 300, 0),
    (2, 3, 500, 300, 120, 100, 1),
    (3, 3, 400, 50, 60, 70, 0),
]


def annotations() -> dict:
    anns = [
        {"id": i + 1, "image_id": im, "category_id": c, "bbox": [x, y, w, h], "area": float(w * h), "iscrowd": crowd}
        for i, (im, c, x, y, w, h, crowd) in enumerate(BOXES)
    ]
    return {"images": copy.deepcopy(IMAGES), "categories": copy.deepcopy(CATEGORIES), "annotations": anns}


def gt_coco(data: dict | None = None) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(data or annotations())
        coco.createIndex()
    return coco


def gt_as_detections() -> list[list[float]]:
    """Every non-crowd GT box as a detection, scores 1.0, 0.9, 0.8 ... so an extra detection can rank between."""
    rows = [[im, x, y, w, h, 0.0, c] for im, c, x, y, w, h, crowd in BOXES if not crowd]
    for i, row in enumerate(rows):
        row[5] = 1.0 - 0.1 * i
    return rows


def pycocotools_stats(tmp_path: Path, data: dict, detections: list[list[float]]) -> list[float]:
    """The reference: files on disk, COCO(file), loadRes(file), COCOeval(bbox) -- nothing of ours."""
    gt_file, dt_file = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_file.write_text(json.dumps(data))
    dt_file.write_text(json.dumps([{"image_id": int(r[0]), "bbox": list(r[1:5]), "score": r[5], "category_id": int(r[6])} for r in detections]))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        ev = COCOeval(gt, gt.loadRes(str(dt_file)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(s) for s in ev.stats]


def stats(metrics: dict) -> list[float]:
    return [metrics[k] for k in COCO_KEYS]


def test_ground_truth_as_detections_scores_one() -> None:
    metrics, precision = evaluate_coco(gt_coco(), np.array(gt_as_detections()))
    assert metrics["AP"] == metrics["AP50"] == metrics["AP75"] == metrics["AR100"] == 1.0
    assert precision.shape == (10, 101, 3, 4, 3)
    by_name = {c["name"]: c for c in metrics["per_class"]}
    assert by_name["cat"] == {"name": "cat", "category_id": 3, "instances": 3, "AP": 1.0, "AP50": 1.0}
    assert by_name["dog"]["instances"] == 2
    assert by_name["bird"] == {"name": "bird", "category_id": 11, "instances": 0, "AP": None, "AP50": None}
    assert set(metrics) == {*COCO_KEYS, "per_class"}


@pytest.mark.parametrize(
    "case",
    ["shifted_box", "duplicate", "wrong_class", "on_empty_image", "on_crowd", "mixed"],
)
def test_known_answers_equal_pycocotools(case: str, tmp_path: Path) -> None:
    dets = gt_as_detections()
    if case == "shifted_box":
        dets[0] = [1, 30, 35, 100, 150, 1.0, 3]  # IoU ~0.6 with its GT
    elif case == "duplicate":
        dets.append([1, 12, 21, 100, 150, 0.99, 3])
    elif case == "wrong_class":
        dets[1][6] = 3
    elif case == "on_empty_image":
        dets.append([4, 10, 10, 50, 50, 0.95, 7])
    elif case == "on_crowd":
        dets.append([2, 510, 310, 100, 80, 0.99, 3])  # inside the crowd region: ignored, not a false positive
    else:
        rng = np.random.default_rng(0)
        dets = [[d[0], d[1] + rng.normal(0, 4), d[2] + rng.normal(0, 4), d[3], d[4], rng.uniform(0.2, 1), d[6]] for d in dets]
        dets += [[int(rng.integers(1, 5)), *rng.uniform(0, 300, 2), *rng.uniform(5, 200, 2), rng.uniform(0, 0.6), int(rng.choice([3, 7, 11]))] for _ in range(30)]
    expected = pycocotools_stats(tmp_path, annotations(), dets)
    metrics, _ = evaluate_coco(gt_coco(), np.array(dets, dtype=np.float64), backend="pycocotools")
    assert stats(metrics) == expected  # exactly: our path into pycocotools changes no number
    fast, _ = evaluate_coco(gt_coco(), np.array(dets, dtype=np.float64))  # auto: faster-coco-eval when installed
    assert stats(fast) == pytest.approx(expected, abs=1e-12)
    if case != "on_crowd":
        assert metrics["AP"] < 1.0
    # the list-of-dicts input gives the same
    assert stats(evaluate_coco(gt_coco(), detections_to_coco_results(np.array(dets)), backend="pycocotools")[0]) == expected


def test_per_class_ap_equals_pycocotools_restricted_to_that_class(tmp_path: Path) -> None:
    dets = gt_as_detections()
    dets[0] = [1, 30, 35, 100, 150, 1.0, 3]
    dets.append([4, 10, 10, 50, 50, 0.95, 7])
    metrics, _ = evaluate_coco(gt_coco(), np.array(dets))
    for cls in metrics["per_class"]:
        if cls["AP"] is None:
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            gt = gt_coco()
            ev = COCOeval(gt, gt.loadRes([{"image_id": int(d[0]), "bbox": d[1:5], "score": d[5], "category_id": int(d[6])} for d in dets]), "bbox")
            ev.params.catIds = [cls["category_id"]]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert (cls["AP"], cls["AP50"]) == pytest.approx((ev.stats[0], ev.stats[1]), abs=1e-12)


def test_per_class_ap_is_read_at_iou_050_and_100_detections_per_image() -> None:
    """Two cats on image 1 (found exactly): AP 1 only if more than one detection per image counts. The small dog
    is found at IoU 204 / 396 = 0.515 (second by score): a true positive at IoU 0.50 only, so dog AP50 = 1 and
    dog AP = (1 + 9 x 51 / 101) / 10 (at 0.55-0.95 precision 1 up to recall 0.5: 51 of 101 recall points)."""
    data = annotations()
    data["annotations"].append({"id": 7, "image_id": 1, "category_id": 3, "bbox": [400, 300, 80, 60], "area": 4800.0, "iscrowd": 0})
    boxes = [a for a in data["annotations"] if not a["iscrowd"]]
    dets = [[a["image_id"], *a["bbox"], 1.0 - 0.05 * i, a["category_id"]] for i, a in enumerate(boxes)]
    (small_dog,) = [d for d in dets if d[6] == 7 and d[0] == 2]
    small_dog[1] += 6.4  # 20 x 15 box shifted 6.4 px: overlap 13.6 x 15 = 204, union 2 x 300 - 204 = 396
    assert [d[6] for d in dets if d[5] > small_dog[5]].count(7) == 1  # the exact dog ranks first
    by_name = {c["name"]: c for c in evaluate_coco(gt_coco(data), np.array(dets))[0]["per_class"]}
    assert by_name["cat"]["instances"] == 4 and (by_name["cat"]["AP"], by_name["cat"]["AP50"]) == (1.0, 1.0)
    assert by_name["dog"]["AP50"] == 1.0
    assert by_name["dog"]["AP"] == pytest.approx((1 + 9 * 51 / 101) / 10, abs=1e-12)


@pytest.mark.parametrize("backend", ["pycocotools", "faster", "auto"])
def test_zero_detections_score_zero_without_crashing(backend: str) -> None:
    """pycocotools' own loadRes raises on an empty list: each backend is asked for it by name."""
    if backend == "faster":
        pytest.importorskip("faster_coco_eval")
    metrics, _ = evaluate_coco(gt_coco(), np.zeros((0, 7)), backend=backend)
    assert all(metrics[k] == 0.0 for k in COCO_KEYS)
    assert [c["AP"] for c in metrics["per_class"]] == [0.0, 0.0, None]
    assert evaluate_coco(gt_coco(), [], backend=backend)[0]["AP"] == 0.0


def test_a_size_range_without_ground_truth_reads_minus_one_as_in_pycocotools(tmp_path: Path) -> None:
    data = annotations()
    data["annotations"] = [a for a in data["annotations"] if a["area"] >= 96**2]  # only large boxes
    dets = [[a["image_id"], *a["bbox"], 1.0, a["category_id"]] for a in data["annotations"] if not a["iscrowd"]]
    metrics, _ = evaluate_coco(gt_coco(data), np.array(dets))
    assert stats(metrics) == pycocotools_stats(tmp_path, data, dets)
    assert metrics["APs"] == metrics["APm"] == -1.0 and metrics["APl"] == 1.0


def test_image_ids_restrict_the_evaluation() -> None:
    dets = gt_as_detections()
    dets.append([3, 10, 10, 50, 50, 0.95, 7])  # a false positive on image 3
    assert evaluate_coco(gt_coco(), np.array(dets))[0]["AP"] < 1.0
    metrics, _ = evaluate_coco(gt_coco(), np.array([d for d in dets if d[0] != 3]), image_ids=[1, 2, 4])
    assert metrics["AP"] == 1.0
    assert {c["name"]: c["instances"] for c in metrics["per_class"]} == {"cat": 2, "dog": 2, "bird": 0}


def test_detections_on_unknown_images_or_categories_are_our_error() -> None:
    with pytest.raises(DetectorError, match="image id 99"):
        evaluate_coco(gt_coco(), np.array([[99, 0, 0, 10, 10, 0.5, 3]]))
    with pytest.raises(DetectorError, match="image id 3"):
        evaluate_coco(gt_coco(), np.array([[3, 0, 0, 10, 10, 0.5, 3]]), image_ids=[1, 2])
    with pytest.raises(DetectorError, match="category id 5"):
        evaluate_coco(gt_coco(), np.array([[1, 0, 0, 10, 10, 0.5, 5]]))
    with pytest.raises(DetectorError, match="backend"):
        evaluate_coco(gt_coco(), np.zeros((0, 7)), backend="nope")
    for value in (float("nan"), float("inf")):
        with pytest.raises(DetectorError, match="non-finite box or score"):
            evaluate_coco(gt_coco(), np.array([[1, 10, 20, 100, 150, value, 3]]))


def test_faster_backend_equals_pycocotools() -> None:
    pytest.importorskip("faster_coco_eval")
    rng = np.random.default_rng(1)
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 500, "height": 400} for i in range(1, 41)]
    anns, dets = [], []
    for im in images:
        for _ in range(int(rng.integers(0, 6))):
            w, h = rng.uniform(4, 250, 2)
            x, y = rng.uniform(0, 500 - w), rng.uniform(0, 400 - h)
            c = int(rng.choice([3, 7, 11]))
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": c, "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(rng.random() < 0.1)})
            if rng.random() < 0.8:
                dets.append([im["id"], x + rng.normal(0, 3), y + rng.normal(0, 3), w, h, rng.random(), c])
        dets += [[im["id"], *rng.uniform(0, 250, 2), *rng.uniform(4, 200, 2), rng.random() * 0.5, int(rng.choice([3, 7, 11]))] for _ in range(3)]
    data = {"images": images, "categories": copy.deepcopy(CATEGORIES), "annotations": anns}
    det = np.array(dets)
    slow, precision_slow = evaluate_coco(gt_coco(data), det, backend="pycocotools")
    fast, precision_fast = evaluate_coco(gt_coco(data), det, backend="faster")
    assert stats(fast) == pytest.approx(stats(slow), abs=1e-4)
    assert 0.1 < slow["AP"] < 0.9
    for a, b in zip(slow["per_class"], fast["per_class"]):
        assert a["instances"] == b["instances"]
        assert (a["AP"], a["AP50"]) == pytest.approx((b["AP"], b["AP50"]), abs=1e-4)
    assert np.allclose(precision_slow, precision_fast, atol=1e-4)
    empty, _ = evaluate_coco(gt_coco(data), np.zeros((0, 7)), backend="faster")
    assert all(empty[k] == 0.0 for k in COCO_KEYS)


@pytest.mark.parametrize("backend", ["pycocotools", "faster"])
def test_scoring_keeps_the_collector_off_the_objects_alive_before_it(backend: str) -> None:
    """A dict per detection triggers collections; each must skip the process's long-lived objects (in a trainer,
    walking them cost 0.15 s a validation) and they must be collectable again afterwards."""
    import gc

    if backend == "faster":
        pytest.importorskip("faster_coco_eval")
    rng = np.random.default_rng(0)
    det = np.column_stack([rng.choice([1, 2, 3, 4], 5000), rng.uniform(0, 300, (5000, 4)), rng.random(5000),
                           rng.choice([3, 7, 11], 5000)])
    frozen_at_collections: list[int] = []

    def record(phase: str, info: dict) -> None:
        if phase == "start":
            frozen_at_collections.append(gc.get_freeze_count())

    assert gc.get_freeze_count() == 0
    gc.callbacks.append(record)
    try:
        evaluate_coco(gt_coco(), det, backend=backend)
    finally:
        gc.callbacks.remove(record)
    assert len(frozen_at_collections) > 5 and min(frozen_at_collections) > 10_000
    assert gc.get_freeze_count() == 0


def test_auto_backend_is_faster_coco_eval_when_installed(monkeypatch) -> None:
    import importlib.util

    from detector.infer import metrics as metrics_module

    installed = importlib.util.find_spec("faster_coco_eval") is not None
    assert metrics_module.resolve_backend("auto") == ("faster" if installed else "pycocotools")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # as on a machine without the extra
    assert metrics_module.resolve_backend("auto") == "pycocotools"
    assert metrics_module.resolve_backend("faster") == "faster"  # asked for by name: its own import error later
    with pytest.raises(DetectorError, match="valid: auto, pycocotools, faster"):
        metrics_module.resolve_backend("fast")


def test_fitness_and_table() -> None:
    metrics, _ = evaluate_coco(gt_coco(), np.array(gt_as_detections()))
    assert fitness({"AP": 0.5, "AP50": 0.8}) == pytest.approx(0.53)
    table = format_metrics_table(metrics, num_images=4).splitlines()
    assert table[0].split() == ["class", "images", "instances", "AP50", "AP50-95"]
    assert table[2].split() == ["all", "4", "5", "1.000", "1.000"]
    assert [line.split()[0] for line in table[3:5]] == ["cat", "dog"]
    assert len({len(line) for line in table[:5]}) == 1  # aligned
    assert "bird" in table[-1] and "without ground truth" in table[-1]
    assert any(line.startswith("AP 1.000  AP50 1.000  AP75 1.000") for line in table)  # the 12 COCO numbers
    cat = {"name": "cat", "category_id": 3, "instances": 3, "AP": 0.25, "AP50": 0.75}
    mixed = {**dict.fromkeys(COCO_KEYS, 0.0), "AP": 0.5, "AP50": 0.875, "per_class": [cat]}
    lines = format_metrics_table(mixed, num_images=2).splitlines()
    assert lines[2].split() == ["all", "2", "3", "0.875", "0.500"] and lines[3].split() == ["cat", "3", "0.750", "0.250"]

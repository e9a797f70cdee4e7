"""`detector bench val`: validation split into its stages, and the COCO metric's backends scoring alike.

(Named test_bench_val.py: `val` alone would read as the `detector val` command's tests.)"""

from __future__ import annotations

import pytest

from detector.errors import DetectorError
from detector.infer import metrics
from detector.options import BenchValOptions
from detector.runtime.machine import describe_machine
from detector.tools.bench.val import bench_metric, main


def test_bench_val_times_each_stage_and_the_backends_agree(capsys: pytest.CaptureFixture[str]) -> None:
    main(BenchValOptions(models=["yolov5n"], imgsz=[64], batch=4, images=6, device="cpu", metric_images=30,
                         dets_per_image=20, classes=3))
    lines = capsys.readouterr().out.splitlines()
    assert describe_machine().summary() in lines
    row = next(line for line in lines if line.startswith("yolov5n")).split()
    assert row[1:3] == ["64", "6"]  # imgsz, the synthetic val set's images
    rate, preprocess, inference, nms, metric = map(float, row[3:8])
    assert rate > 0 and inference > 0 and min(preprocess, nms, metric) >= 0
    metric_rows = [line.split() for line in lines if line.startswith(("plain pycocotools", "evaluate_coco"))]
    assert len(metric_rows) >= 2  # plain pycocotools and ours through it (and faster-coco-eval when installed)
    assert {row[-1] for row in metric_rows} == {metric_rows[0][-1]}  # one AP, printed to 3 decimals
    assert all(row[-5] == "30" and row[-4] == "600" for row in metric_rows)  # images, detections: 30 x 20 (found + filler)


def test_bench_metric_refuses_backends_that_disagree(monkeypatch: pytest.MonkeyPatch) -> None:
    real = metrics.evaluate_coco

    def off_by_a_little(coco_gt, det, *, backend):  # noqa: ANN001, ANN202
        scores, rest = real(coco_gt, det, backend=backend)
        return {**scores, "AP": scores["AP"] + 0.001}, rest

    monkeypatch.setattr(metrics, "evaluate_coco", off_by_a_little)
    with pytest.raises(DetectorError, match=r"bench val: the backends disagree: \["):
        bench_metric(20, 5, 3)

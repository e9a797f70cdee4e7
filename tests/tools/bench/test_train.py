"""`detector bench train`: model-only and end-to-end training rates on a generated set, and their ratio."""

from __future__ import annotations

import pytest

from detector.tools.bench.train import main
from detector.options import BenchTrainOptions


@pytest.mark.slow
def test_bench_train_prints_both_rates_and_their_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    main(BenchTrainOptions(configs=["yolov5n"], imgsz=64, batch=4, workers=0, images=8))
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("config"))
    assert header.split() == ["config", "GFLOPs@64", "model", "img/s", "end-to-end", "img/s", "ratio", "GFLOP/s"]
    row = next(line for line in out.splitlines() if line.startswith("yolov5n")).split()
    gflops, model_rate, e2e_rate, ratio, sustained = map(float, row[1:])
    assert 0 < gflops < 0.2 and model_rate > 0 and e2e_rate > 0  # yolov5n: 4.1 GFLOPs at 640 -> ~0.04 at 64
    assert ratio == pytest.approx(e2e_rate / model_rate, abs=0.01)
    assert sustained == pytest.approx(e2e_rate * gflops, rel=0.1, abs=0.1)

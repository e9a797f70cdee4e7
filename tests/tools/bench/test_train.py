"""`detector bench train`: model-only and end-to-end training rates on a generated set, and their ratio."""

from __future__ import annotations

import pytest

from detector.options import BenchTrainOptions
from detector.tools.bench.train import main


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


@pytest.mark.slow
def test_bench_train_profile_splits_a_real_epoch_into_the_trainers_stages(
        make_data_yaml, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_data_yaml()
    main(BenchTrainOptions(configs=["yolov5n"], imgsz=64, batch=2, workers=0, data=str(data), profile=True))
    lines = capsys.readouterr().out.splitlines()
    assert any("data " + str(data) in line for line in lines)
    stages = {line.rsplit(None, 3)[0].strip(): line.split()[-3:] for line in lines
              if line.startswith(("data: wait", "forward", "loss", "backward", "optimizer", "progress"))}
    assert set(stages) == {"data: wait for the loader", "forward", "loss + assignment", "backward",
                           "optimizer step + EMA", "progress bar + logging"}
    seconds = {stage: float(values[0]) for stage, values in stages.items()}
    assert seconds["forward"] > 0 and seconds["backward"] > 0 and seconds["loss + assignment"] > 0
    assert sum(float(values[1].rstrip("%")) for values in stages.values()) == pytest.approx(100, abs=3)

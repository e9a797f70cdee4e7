"""`detector bench models`: one row per config and mode, the machine named, torch's threads left as they were.

(Named test_bench_models.py: tests/models/ is a package of its own tests, not this bench's.)"""

from __future__ import annotations

import pytest
import torch

from detector.errors import DetectorError
from detector.models.builder import build_model
from detector.models.info import count_flops
from detector.options import BenchModelsOptions
from detector.tools.bench.models import main


def test_bench_models_prints_a_row_per_config_and_mode(capsys: pytest.CaptureFixture[str]) -> None:
    before = torch.get_num_threads()
    main(BenchModelsOptions(configs=["yolov5n"], imgsz=320, batch=2, iters=1, warmup=0, modes=["fp32", "fp32-cl"],
                            threads=1))
    assert torch.get_num_threads() == before  # threads=1 held for the bench only
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "bench models: imgsz 320, batch 2, 1 timed iterations after 0"
    assert lines[1].startswith("machine: ") and ", 1 thread, torch " in lines[1]  # timed on one thread
    rows = [line.split() for line in lines if line.startswith("yolov5n")]
    assert [row[1] for row in rows] == ["fp32", "fp32-cl"]
    model = build_model("yolov5n")
    for row in rows:
        assert int(row[2].replace(",", "")) == sum(p.numel() for p in model.parameters())
        assert float(row[3]) == pytest.approx(count_flops(model, 320), abs=0.05)  # printed to 0.1
        assert all(float(rate) > 0 for rate in row[4:7])


def test_bench_models_refuses_an_empty_mode_list_before_any_work() -> None:
    with pytest.raises(DetectorError, match=r"bench models: 'modes' is empty; choose from fp32, fp32-cl, bf16-cl"):
        main(BenchModelsOptions(configs=["yolov5n"], modes=[]))

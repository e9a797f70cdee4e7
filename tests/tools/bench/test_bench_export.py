"""`detector bench export`: one latency row per runtime and size, the CPU and threads named, the exports checked.

(Named test_bench_export.py: tests/infer/test_export.py already holds the basename test_export.)"""

from __future__ import annotations

import pytest

from detector.options import BenchExportOptions
from detector.runtime.machine import describe_machine
from detector.tools.bench.export import RUNNERS, available_runtimes, main

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.isolated  # OpenVINO and onnxruntime run in their own pytest process (tests/conftest.py)


def test_bench_export_times_every_runtime_at_every_size(capsys: pytest.CaptureFixture[str]) -> None:
    main(BenchExportOptions(model="yolov5n", imgsz=[64, 96], iters=2, warmup=1, threads=1))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("bench export: yolov5n, batch 1; onnxruntime ")
    assert lines[1].startswith(f"machine: {describe_machine().cpu} (") and ", 1 thread, torch " in lines[1]
    runtimes, skipped = available_runtimes(list(RUNNERS))
    assert "pytorch" in runtimes and "onnxruntime" in runtimes
    rows = [line.split() for line in lines if line.split()[:1] and line.split()[0] in RUNNERS]
    assert [(r[0], int(r[1])) for r in rows] == [(name, size) for size in (64, 96) for name in runtimes]
    for row in rows:
        median, fastest, rate = map(float, row[3:6])
        assert 0 < fastest <= median and rate == pytest.approx(1000 / median, rel=0.05)
    assert any(line.startswith("load average") for line in lines)
    assert all(line in lines for line in skipped)  # a runtime left out says why
    checks = [line for line in lines if " vs PyTorch at " in line]
    assert len(checks) == 2 * 2 * (1 + any(r.startswith("openvino") for r in runtimes))  # 2 batches x 2 sizes x files
    assert all(float(line.split("max abs difference ")[1].split()[0]) < 1e-3 for line in checks)
    assert "onnxruntime-int8: skipped, no calibration images (give data=<dataset YAML> or a trained checkpoint)" in lines


def test_bench_export_times_the_int8_file_in_batches(make_data_yaml, capsys: pytest.CaptureFixture[str]) -> None:
    main(BenchExportOptions(model="yolov5n", imgsz=[64], runtimes=["onnxruntime", "onnxruntime-int8"], batch=4,
                            data=str(make_data_yaml()), iters=2, warmup=1, threads=1))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("bench export: yolov5n, batch 4; ")
    rows = {line.split()[0]: line.split() for line in lines if line.split()[:1] in (["onnxruntime"], ["onnxruntime-int8"])}
    assert rows["onnxruntime"][2] == "fp32" and rows["onnxruntime-int8"][2] == "int8"
    for row in rows.values():
        assert float(row[5]) == pytest.approx(4 * 1000 / float(row[3]), rel=0.05)  # images/s counts the batch
    assert any(line.startswith("export: int8 (onnxruntime) vs PyTorch fp32 on 6 calibration images") for line in lines)
    fp32_checks = [line for line in lines if line.startswith("export: onnxruntime vs PyTorch at ")]
    assert fp32_checks and all(" on images: " in line for line in fp32_checks)  # data= checks both files

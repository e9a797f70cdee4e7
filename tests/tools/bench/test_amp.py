"""`detector bench amp`: fp32 and bf16 trained from the same seed, next to a second fp32 seed."""

from __future__ import annotations

import re

import pytest

from detector.config import load_options
from detector.errors import DetectorError
from detector.options import BenchAmpOptions
from detector.runtime.machine import describe_machine
from detector.tools.bench.amp import compare, main


def rows(losses: list[float], ap: float) -> list[dict[str, str]]:
    out = [{"train/box_loss": str(v), "train/obj_loss": "0", "train/cls_loss": "0", "epoch_time_s": "2.0", "metrics/AP": "", "metrics/AP50": ""} for v in losses]
    out[-1].update({"metrics/AP": str(ap), "metrics/AP50": str(2 * ap)})
    return out


def test_compare_reports_the_gap_against_the_seed_noise() -> None:
    runs = {"fp32 s0": rows([1.0, 0.5], 0.30), "bf16 s0": rows([1.01, 0.52], 0.29), "fp32 s1": rows([1.1, 0.5], 0.25)}
    headers, table, verdict = compare(runs, images=10)
    assert headers == ["epoch", "loss fp32 s0", "loss bf16 s0", "loss fp32 s1"]
    assert table[0] == [1, 1.0, 1.01, 1.1]
    assert table[2] == ["AP", 0.30, 0.29, 0.25]
    assert table[4] == ["img/s", "5.0", "5.0", "5.0"]
    assert "loss gap up to 4.0%, AP -0.0100" in verdict  # bf16: |0.52 - 0.5| / 0.5 at epoch 2
    assert "seed to seed: loss gap up to 10.0%, AP -0.0500" in verdict


@pytest.mark.slow
def test_bench_amp_trains_three_runs_and_prints_one_table(capsys: pytest.CaptureFixture[str]) -> None:
    main(BenchAmpOptions(config="yolov5n", images=8, val_images=4, imgsz=64, epochs=2, batch=4, workers=0))
    out = capsys.readouterr().out
    assert "loss fp32 s0" in out and "loss bf16 s0" in out and "loss fp32 s1" in out
    assert describe_machine().summary() in out.splitlines()  # says whether this CPU has bf16 units
    epoch_rows = [line for line in out.splitlines() if re.match(r"\s*[12]\s", line)]
    assert len(epoch_rows) == 2
    first = [float(v) for v in epoch_rows[0].split()[1:]]
    assert first[0] != first[1]  # bf16 really ran in bf16
    assert abs(first[1] - first[0]) / first[0] < 0.05  # same seed: one step of training apart in rounding only
    gap = float(re.search(r"same seed\): loss gap up to ([\d.]+)%", out).group(1))
    assert gap < 20


def test_bench_amp_names_unknown_options() -> None:
    with pytest.raises(DetectorError, match="unknown key 'imgz' \\(did you mean 'imgsz'\\?\\)"):
        load_options(BenchAmpOptions, {"imgz": "64"})


def test_a_noise_seed_equal_to_the_seed_keeps_all_three_columns(monkeypatch, capsys) -> None:
    """noise_seed=seed (run-to-run noise at one seed) once overwrote the first fp32 run's column with the noise run."""
    from pathlib import Path

    from detector.tools.bench import amp

    trained = {"fp32": rows([1.0, 0.5], 0.30), "bf16": rows([1.01, 0.52], 0.29), "fp32_noise": rows([1.0, 0.55], 0.28)}
    monkeypatch.setattr(amp, "generate_shapes_dataset", lambda *a, **k: Path("unused.yaml"))
    monkeypatch.setattr(amp, "train_once", lambda data, project, name, **k: trained[name])
    main(BenchAmpOptions(seed=0, noise_seed=0, device="cpu"))
    out = capsys.readouterr().out
    assert "loss fp32 s0" in out and "loss bf16 s0" in out and "loss fp32 s0 again" in out
    assert "AP -0.0100; fp32 seed to seed: loss gap up to 10.0%, AP -0.0200" in out

"""`detector bench train`: convolutions-only, model-only, held-batch and end-to-end training rates on a generated
set, and the loader efficiency (end to end over held batch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from detector.options import BenchTrainOptions
from detector.runtime.machine import describe_machine
from detector.tools.bench.train import main
from repo_paths import REPO_ROOT


@pytest.mark.slow
def test_bench_train_prints_the_four_rates_and_the_loader_efficiency(capsys: pytest.CaptureFixture[str]) -> None:
    main(BenchTrainOptions(configs=["yolov5n"], imgsz=64, batch=4, workers=0, images=8))
    out = capsys.readouterr().out
    assert describe_machine().summary() in out.splitlines()
    header = next(line for line in out.splitlines() if line.startswith("config"))
    assert header.split() == ["config", "GFLOPs@64", "convolutions", "img/s", "model", "img/s", "held-batch", "img/s",
                              "end-to-end", "img/s", "loader", "efficiency", "GFLOP/s"]
    row = next(line for line in out.splitlines() if line.startswith("yolov5n")).split()
    gflops, floor_rate, model_rate, held_rate, e2e_rate, efficiency, sustained = map(float, row[1:])
    assert 0 < gflops < 0.2 and model_rate > 0 and held_rate > 0 and e2e_rate > 0  # yolov5n: 4.1 GFLOPs at 640 -> ~0.04 at 64
    assert floor_rate > 0
    # the rates are printed to 0.1 img/s: their ratio carries that rounding (a held batch at 3.0 img/s, from 2.95
    # to 3.05, moves it by 1.7%), on top of the efficiency's own 0.01
    rounding = 0.05 / e2e_rate + 0.05 / held_rate
    assert efficiency == pytest.approx(e2e_rate / held_rate, rel=rounding, abs=0.01)
    assert sustained == pytest.approx(e2e_rate * gflops, rel=0.1, abs=0.1)


@pytest.mark.slow
def test_bench_train_profile_splits_a_real_epoch_into_the_trainers_stages(make_data_yaml) -> None:
    """Run as the CLI in its own process: torch.profiler's native state (kineto) must not outlive the test in the
    pytest process (profiler state left in a long-lived process is a known source of late crashes)."""
    data = make_data_yaml()
    proc = subprocess.run([sys.executable, "-m", "detector", "bench", "train", "configs=yolov5n", "imgsz=64", "batch=2",
                           "workers=0", f"data={data}", "profile=true"], capture_output=True, text=True, timeout=600,
                          cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any("data " + str(data) in line for line in lines)
    table = lines[next(i for i, line in enumerate(lines) if "time per stage" in line) + 3:]  # title, header, rule
    stages = {line.rsplit(None, 3)[0].strip(): line.split()[-3:] for line in table if line.strip()}
    assert set(stages) == {"data: wait for the loader", "forward", "loss + assignment", "backward",
                           "optimizer step + EMA", "progress bar + logging"}
    seconds = {stage: float(values[0]) for stage, values in stages.items()}
    assert seconds["forward"] > 0 and seconds["backward"] > 0 and seconds["loss + assignment"] > 0
    assert sum(float(values[1].rstrip("%")) for values in stages.values()) == pytest.approx(100, abs=3)


def test_the_held_batch_run_feeds_the_trainer_one_batch_and_runs_no_workers(make_data_yaml, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The held-batch rate is the trainer's own epoch (its steps and EMA updates) on the loader's first batch."""
    from detector.tools.bench import train as bench_train
    from detector.train.trainer import Trainer

    fed: list[list[int]] = []
    real_epoch = Trainer.train_epoch

    def recording_epoch(self: Trainer, epoch: int):
        assert self.workers == 0 and isinstance(self.train_loader, bench_train.HeldBatches)
        fed.append([id(batch) for batch in self.train_loader])
        return real_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", recording_epoch)
    opts = BenchTrainOptions(configs=["yolov5n"], imgsz=64, batch=2, workers=2, data=str(make_data_yaml()))
    rate = bench_train.held_batch_rate("yolov5n", Path(opts.data), tmp_path, opts)
    assert rate > 0
    # a few warm-up steps, then the timed epoch's; one batch throughout
    assert len(fed) == 2 and len(fed[0]) == min(bench_train.WARMUP_STEPS, len(fed[1])) and len(fed[1]) > 1
    assert len(set(fed[0] + fed[1])) == 1


def test_device_and_compile_reach_all_three_runs(make_data_yaml, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`device=` and `compile=` go to the model-only loop and to the trainer's runs, and the header names the
    device (on a GPU, its name). torch.compile is replaced by a recorder: compiling takes minutes on 2 cores."""
    import torch

    from detector.tools.bench import train as bench_train
    from detector.train.trainer import Trainer

    compiled: list[str] = []

    def recording_compile(module: torch.nn.Module) -> torch.nn.Module:
        compiled.append(type(module).__name__)
        return module

    devices: list[str] = []
    real_build = Trainer.build

    def recording_build(self: Trainer) -> None:
        devices.append(str(self.device))
        real_build(self)

    monkeypatch.setattr(torch, "compile", recording_compile)
    monkeypatch.setattr(Trainer, "build", recording_build)
    main(BenchTrainOptions(configs=["yolov5n"], imgsz=64, batch=2, workers=0, data=str(make_data_yaml()), device="cpu",
                           compile=True))
    out = capsys.readouterr().out
    assert "compile True, device cpu," in out
    assert devices == ["cpu", "cpu"]  # the held-batch run and the end-to-end run
    assert compiled == ["DetectionModel"] * 3  # the model-only loop's model and each trainer's
    assert bench_train.device_label(torch.device("cpu")) == "cpu"


def test_the_end_to_end_rate_counts_the_images_the_loader_serves(make_data_yaml, tmp_path: Path) -> None:
    """data=: images/s divides the images the train loader serves, not the json's (a missing file is skipped)."""
    import json

    from detector.tools.bench import train as bench_train

    data = make_data_yaml()
    listed = json.loads((data.parent / "train" / "instances.json").read_text())["images"]
    (data.parent / "train" / "images" / listed[0]["file_name"]).unlink()
    _, nc, images = bench_train._dataset(BenchTrainOptions(data=str(data)), tmp_path)
    assert (nc, images) == (3, len(listed) - 1)

"""The rival harness without Ultralytics: argument parsing, scoring a rival's predictions file, the table, reuse."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from detector.data.coco import CocoDataset
from detector.data.spec import load_data_spec
from detector.errors import DetectorError
from detector.runtime.machine import describe_machine
from detector.tools.bench import rivals


def perfect_rows(data_yaml: Path) -> list[dict[str, Any]]:
    """COCO result rows equal to the val ground truth (crowd left out), score 0.9: AP must be 1."""
    data = json.loads((data_yaml.parent / "val" / "instances.json").read_text())
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in data["annotations"] if not a.get("iscrowd")
    ]


def test_parse_args_passes_ours_keys_through_and_names_bad_ones() -> None:
    opts, extra = rivals.parse_args(["epochs=3", "rivals=yolov8n,ours", "ours.lr0=0.002", "ours.model.attention=cbam"])
    assert opts.epochs == 3 and opts.rivals == ["yolov8n", "ours"]
    assert extra == ["lr0=0.002", "model.attention=cbam"]
    with pytest.raises(DetectorError, match="unknown key 'epohcs' .*did you mean 'epochs'"):
        rivals.parse_args(["epohcs=3"])
    with pytest.raises(DetectorError, match=r"^command line: 'rivals' must be one of yolov8n, yolo26n, ours, got 'yolov5n'$"):
        rivals.parse_args(["rivals=yolov5n"])
    with pytest.raises(DetectorError, match=r"^command line: 'rivals' lists 'ours' more than once$"):
        rivals.parse_args(["rivals=ours,yolov8n,ours"])
    with pytest.raises(DetectorError, match="'imgsz' expects an integer"):
        rivals.parse_args(["imgsz=big"])
    with pytest.raises(DetectorError, match=r"ours\.epochs: the harness sets 'epochs' of our detector train itself; give epochs= instead"):
        rivals.parse_args(["epochs=3", "ours.epochs=5"])  # our train would see epochs twice
    with pytest.raises(DetectorError, match=r"ours\.exist_ok: the harness sets 'exist_ok' of our detector train itself$"):
        rivals.parse_args(["ours.exist_ok=false"])


def test_score_predictions_uses_pycocotools_on_our_ids(make_data_yaml, tmp_path: Path) -> None:
    data_yaml = make_data_yaml()
    gt = CocoDataset(load_data_spec(data_yaml).val).coco_gt()
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps(perfect_rows(data_yaml)))
    metrics = rivals.score_predictions(predictions, gt)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AR100"] == pytest.approx(1.0)
    predictions.write_text(json.dumps([]))
    assert rivals.score_predictions(predictions, gt)["AP"] == 0.0
    predictions.write_text(json.dumps([{**perfect_rows(data_yaml)[0], "category_id": 2}]))  # 2 is not a category
    with pytest.raises(DetectorError, match="category id 2"):
        rivals.score_predictions(predictions, gt)
    predictions.write_text("{not json")
    with pytest.raises(DetectorError, match="predictions.json:1: not valid JSON"):
        rivals.score_predictions(predictions, gt)


def test_main_writes_the_table_and_reuses_finished_rivals(make_data_yaml, tmp_path: Path, monkeypatch) -> None:
    data_yaml = make_data_yaml()
    calls: list[str] = []

    def fake_ultralytics(rival: str, opts, export, folder: Path, python: Path) -> dict[str, Any]:
        calls.append(rival)
        assert folder.is_absolute()  # the driver's job names it: Ultralytics reads a relative one under its own runs/
        folder.mkdir(parents=True, exist_ok=True)
        assert export.category_ids == [1, 3, 7] and len(export.images["val"]) == 6
        (folder / "predictions.json").write_text(json.dumps(perfect_rows(data_yaml)))
        return {"wall_s": 10.0, "params": 1234, "gflops": 2.0 if rival == "yolov8n" else 1.0, "resumed": False, "version": "0.0-test",
                "label": f"Ultralytics {rival}", "predictions": str(folder / "predictions.json")}

    monkeypatch.setattr(rivals, "run_ultralytics", fake_ultralytics)
    monkeypatch.setattr(rivals, "ensure_venv", lambda opts, log: Path("/nonexistent/python"))
    monkeypatch.chdir(tmp_path)
    args = [f"data={data_yaml}", "epochs=2", "rivals=yolov8n,yolo26n", "project=runs", "name=t"]
    assert rivals.main(args) == 0
    out = tmp_path / "runs" / "t"
    table = (out / "results.md").read_text()
    assert "| Ultralytics yolov8n | 1,234 | 1.000 | 1.000 |" in table
    # same wall time, half the FLOPs: yolo26n runs at 1.00x yolov8n's images/s and 0.50x its arithmetic per second
    assert table.splitlines()[-1].endswith("| 1.2 | 1.00 | 1.2 | 1.00x | 0.50x |"), table
    assert "NMS IoU 0.65" in table and "ultralytics 0.0-test" in table
    threads = len(os.sched_getaffinity(0))  # threads=0: every CPU this process may run on, each side
    named = replace(describe_machine(), threads=threads).summary()
    assert table.splitlines()[0].startswith(f"{named} (the threads of each side), device ")
    payload = json.loads((out / "results.json").read_text())
    assert payload["machine"]["summary"] == named and payload["machine"]["threads"] == threads
    assert payload["results"][0]["images_per_s"] == pytest.approx(2 * 6 / 10.0)  # epochs x train images / wall
    assert rivals.main(args) == 0 and calls == ["yolov8n", "yolo26n"]  # the rerun reused both result.json
    assert rivals.main([*args[:2], *args[3:], "force=true", "rivals=yolo26n"]) == 0 and calls == ["yolov8n", "yolo26n", "yolo26n"]


def test_markdown_table_marks_a_resumed_run_and_divides_by_the_ultralytics_side() -> None:
    metrics = {k: 0.5 for k in rivals.COCO_KEYS}
    ours = {"model": "ours (yolo-ca-n, amp auto)", "rival": "ours", "params": 2286995, "gflops": 0.83, "metrics": metrics,
            "wall_s": 100.0, "images_per_s": 40.0, "resumed": True, "timed_epochs": 20}
    theirs = {"model": "Ultralytics yolov8n", "rival": "yolov8n", "params": 3012018, "gflops": 1.31, "metrics": metrics,
              "wall_s": 100.0, "images_per_s": 25.0, "resumed": False}
    lines = rivals.markdown_table([ours, theirs]).splitlines()
    assert lines[0] == ("| model | params | AP | AP50 | APs | APm | APl | AR100 | train wall (s) | train img/s | GFLOPs | GFLOP/s"
                        " | img/s vs yolov8n | per FLOP vs yolov8n |")
    # 40 / 25 = 1.60x per image; 40 x 0.83 = 33.2 against 25 x 1.31 = 32.75 GFLOP/s: 1.01x per FLOP
    assert lines[2] == ("| ours (yolo-ca-n, amp auto) | 2,286,995 | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 | 0.500"
                        " | 100 (resumed: its last 20 epochs) | 40.0 | 0.83 | 33.2 | 1.60x | 1.01x |")
    assert lines[3].endswith("| 25.0 | 1.31 | 32.8 | 1.00x | 1.00x |")
    alone = rivals.markdown_table([{**ours, "gflops": None}]).splitlines()  # an old result.json, no Ultralytics side
    assert alone[0].endswith("| GFLOP/s | img/s | per FLOP |") and alone[2].endswith("| 40.0 | - | - | - | - |")


def test_a_resumed_rival_is_rated_on_the_epochs_it_timed(tmp_path: Path) -> None:
    """The driver's clock of a resumed run covers the epochs after the ones its results.csv already held."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rivals_driver", rivals.DRIVER)
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    csv = tmp_path / "results.csv"
    assert driver.epochs_done(csv) == 0
    csv.write_text("epoch,loss\n1,0.5\n2,0.4\n\n")
    assert driver.epochs_done(csv) == 2
    opts = rivals.RivalsOptions(epochs=60)
    run = {"wall_s": 100.0, "params": 1, "resumed": True, "epochs_before": 40, "predictions": "p.json"}
    result = rivals.rival_result("yolov8n", run, {}, opts, train_images=600)
    assert result["timed_epochs"] == 20 and result["images_per_s"] == pytest.approx(20 * 600 / 100)
    assert rivals.rival_result("yolov8n", {**run, "resumed": False, "epochs_before": 0}, {}, opts, 600)["images_per_s"] == 360


def test_the_driver_counts_flops_as_our_counter_does() -> None:
    """The per-FLOP ratio divides the driver's count by ours: the same counter must give the same number."""
    import importlib.util

    from detector.models.builder import build_model
    from detector.models.catalog import resolve_model_path
    from detector.models.info import count_flops

    spec = importlib.util.spec_from_file_location("rivals_driver", rivals.DRIVER)
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert driver.forward_gflops(conv, 32) == pytest.approx(2 * 3 * 8 * 9 * 32 * 32 / 1e9)  # 2 x multiply-adds
    model = build_model(resolve_model_path("yolo-ca-n"), nc=3)
    assert driver.forward_gflops(model, 64) == pytest.approx(count_flops(model, 64), rel=1e-9)
    assert model.training  # counted on a copy


def test_the_driver_the_harness_runs_is_there() -> None:
    """The venv runs this file by path (the folder split once left the path one level short)."""
    assert rivals.DRIVER.is_file() and rivals.DRIVER.parent.name == "scripts"
    compile(rivals.DRIVER.read_text(encoding="utf-8"), str(rivals.DRIVER), "exec")


def test_our_commands_parse_with_our_own_options(tmp_path: Path, monkeypatch) -> None:
    """Every key the harness passes to `detector train` and `detector val` is one they accept (workers=auto once
    reached val, whose workers took only numbers, and stopped the run after training)."""
    from detector.config import TrainConfig, build_options, parse_overrides
    from detector.options import ValOptions

    commands: list[list[str]] = []
    monkeypatch.setattr(rivals, "run_command", lambda cmd, env, log: commands.append(cmd) or 1.0)
    monkeypatch.setattr(rivals, "model_size", lambda weights, imgsz: (1, 1.0))
    monkeypatch.setattr(rivals, "ours_label", lambda run_dir: "ours")
    monkeypatch.setattr(rivals, "trained_seconds", lambda last: 0.5)
    opts, extra = rivals.parse_args(["epochs=2", "rivals=ours", "ours.lr0=0.002"])
    (tmp_path / "ours").mkdir()
    rivals.run_ours(opts, extra, tmp_path / "ours")
    (train_cmd, val_cmd) = commands
    assert train_cmd[3] == "train" and val_cmd[3] == "val"
    assert build_options(TrainConfig, parse_overrides(train_cmd[4:]), "rivals train").plots is False  # as Ultralytics' side
    assert build_options(ValOptions, parse_overrides(val_cmd[4:]), "rivals val").workers == "auto"


def test_our_train_time_is_the_trainers_own_clock(untrained_checkpoint: Path) -> None:
    """As Ultralytics' model.train() is timed: the trainer's train_state.time_s, not the process with its imports."""
    from detector.runtime.checkpoint import load_checkpoint, save_checkpoint

    state = dict(load_checkpoint(untrained_checkpoint))
    state["train_state"] = {"time_s": 48.25, "epoch": 2}
    save_checkpoint(untrained_checkpoint, state)
    assert rivals.trained_seconds(untrained_checkpoint) == 48.25
    state["train_state"] = {}  # a checkpoint that never trained has no clock to read
    save_checkpoint(untrained_checkpoint, state)
    with pytest.raises(DetectorError, match=r"best.pt: train_state.time_s is None, not a positive number of seconds"):
        rivals.trained_seconds(untrained_checkpoint)

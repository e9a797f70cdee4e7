"""The attention ablation: variants, refused settings, the report files, and (slow) two one-epoch runs that a
second invocation skips, and a third with more epochs resumes."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest

from detector.ablate import COLUMNS, Variant, run_ablation, variants, write_reports
from detector.errors import DetectorError
from detector.options import AblateOptions


def test_variants_cross_attentions_with_places_and_run_none_once() -> None:
    assert [v.name for v in variants(["none", "ca", "cbam"], [])] == ["none", "ca", "cbam"]
    crossed = variants(["ca", "none", "se"], ["output", "concat"])
    assert [v.name for v in crossed] == ["ca-output", "ca-concat", "none", "se-output", "se-concat"]
    assert Variant("ca", "output").attention_at == "output"


def test_settings_that_would_break_the_comparison_are_refused(tmp_path: Path) -> None:
    base = {"project": str(tmp_path), "epochs": 1}
    with pytest.raises(DetectorError, match="train= cannot set 'epochs'"):
        run_ablation(AblateOptions(**base, train=["epochs=3"]))
    with pytest.raises(DetectorError, match="the override 'se' reaches no row"):  # C2f rows carry no attention
        run_ablation(AblateOptions(**base, model="configs/models/yolo-c2f-n.yaml", attentions=["se"]))
    with pytest.raises(DetectorError, match="unknown key 'lr'"):
        run_ablation(AblateOptions(**base, train=["lr=0.1"]))
    assert not any(tmp_path.iterdir())  # nothing trained


def test_reports(tmp_path: Path) -> None:
    rows = [
        {"attention": "none", "attention_at": "-", "params": 1000, "GFLOPs": 0.5, "train img/s": 12.0, "infer ms/img": 3.25,
         "AP50": 0.5, "AP50:95": 0.25, "APs": None, "APm": 0.2, "APl": 0.3, "best epoch": 3},
        {"attention": "ca", "attention_at": "-", "params": 1200, "GFLOPs": 0.55, "train img/s": 10.0, "infer ms/img": 3.5,
         "AP50": 0.6, "AP50:95": 0.3, "APs": 0.1, "APm": 0.25, "APl": 0.35, "best epoch": 4},
    ]
    write_reports(tmp_path, rows)
    with (tmp_path / "ablation.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(COLUMNS) and [r["attention"] for r in table] == ["none", "ca"]
    assert table[0]["APs"] == "" and table[1]["AP50:95"] == "0.3"
    md = (tmp_path / "ablation.md").read_text().splitlines()
    assert md[0].startswith("| attention | attention_at | params") and len(md) == 4
    assert "| none | - | 1,000 | 0.500 | 12.0 | 3.2 | 0.5000 | 0.2500 | - |" in md[2]
    assert (tmp_path / "ablation.png").stat().st_size > 1000


@pytest.mark.slow
def test_two_attentions_one_epoch_each_then_a_rerun_skips_them_and_resumes_a_longer_one(tmp_path: Path, caplog, capsys) -> None:
    from detector.data.synthetic import generate_shapes_dataset

    data = generate_shapes_dataset(tmp_path / "shapes", seed=0, n_train=16, n_val=8, imgsz=128)
    opts = AblateOptions(
        model="yolo-attn-n", data=str(data), attentions=["none", "cbam"], epochs=1, imgsz=128, batch=8, workers=0,
        device="cpu", project=str(tmp_path / "ablate"), name="tiny", train=["plots=false", "autoanchor=false"],
    )
    root = run_ablation(opts)
    assert root == tmp_path / "ablate" / "tiny"
    with (root / "ablation.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["attention"] for r in rows] == ["none", "cbam"]
    assert int(rows[1]["params"]) > int(rows[0]["params"]) and all(r["best epoch"] == "1" for r in rows)
    assert all(float(r["train img/s"]) > 0 and float(r["infer ms/img"]) > 0 and r["AP50:95"] != "" for r in rows)
    assert (root / "ablation.md").exists() and (root / "ablation.png").exists()
    assert "| cbam |" in capsys.readouterr().out
    args = (root / "cbam" / "args.yaml").read_text().splitlines()  # the run records what it built
    assert args[0] == "# attention as built: " + ", ".join(f"backbone[{i}] cbam at output" for i in (2, 4, 6, 8))
    assert "attention: cbam" in args
    from detector.engine.checkpoint import load_checkpoint

    assert load_checkpoint(root / "cbam" / "weights" / "best.pt")["model_yaml"]["attention"] == "cbam"

    stamps = {v: (root / v / "weights" / "best.pt").stat().st_mtime_ns for v in ("none", "cbam")}
    with caplog.at_level(logging.INFO, logger="detector.ablate"):
        run_ablation(opts)
    assert sum("finished earlier, skipped" in r.getMessage() for r in caplog.records) == 2
    assert stamps == {v: (root / v / "weights" / "best.pt").stat().st_mtime_ns for v in ("none", "cbam")}

    with pytest.raises(DetectorError, match=r"other settings \(imgsz 128 -> 160\)"):  # would compare unequal runs
        run_ablation(AblateOptions(**{**opts.__dict__, "imgsz": 160}))

    # a longer schedule: the finished one-epoch run is now half-finished and resumes from its last.pt
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="detector.ablate"):
        run_ablation(AblateOptions(**{**opts.__dict__, "attentions": ["cbam"], "epochs": 2}))
    assert any("cbam: resuming" in r.getMessage() for r in caplog.records)
    with (root / "cbam" / "results.csv").open(newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1"]

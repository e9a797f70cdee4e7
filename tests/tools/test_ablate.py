"""The attention ablation: variants, refused settings, the report files, the multi-seed statistics (mean ± std,
the paired 95% interval against the baseline, "within noise") and run-folder layout, and (slow) two one-epoch runs
that a second invocation skips and a third with more epochs resumes, and a two-seed ablation through the CLI."""

from __future__ import annotations

import csv
import logging
import math
import re
from pathlib import Path

import pytest

from detector.tools.ablate import (
    COLUMNS, RUN_COLUMNS, Variant, baseline_key, mean_std, noise_verdict, paired_interval, run_ablation, run_folder, seed_list, t975,
    variants, write_reports,
)
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
    with pytest.raises(DetectorError, match="train= cannot set 'resume'"):  # the ablation resumes its own runs
        run_ablation(AblateOptions(**base, train=["resume=true"]))
    with pytest.raises(DetectorError, match="the override 'se' reaches no row"):  # C2f rows carry no attention
        run_ablation(AblateOptions(**base, model="configs/models/yolo-c2f-n.yaml", attentions=["se"]))
    with pytest.raises(DetectorError, match="unknown key 'lr'"):
        run_ablation(AblateOptions(**base, train=["lr=0.1"]))
    assert not any(tmp_path.iterdir())  # nothing trained


def test_reports(tmp_path: Path) -> None:
    rows = [
        {"attention": "none", "attention_at": "-", "seed": 0, "params": 1000, "GFLOPs": 0.5, "train img/s": 12.0, "infer ms/img": 3.25,
         "AP50": 0.5, "AP50:95": 0.25, "APs": None, "APm": 0.2, "APl": 0.3, "best epoch": 3},
        {"attention": "ca", "attention_at": "-", "seed": 0, "params": 1200, "GFLOPs": 0.55, "train img/s": 10.0, "infer ms/img": 3.5,
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


def test_mean_and_sample_std() -> None:
    mean, std = mean_std([0.2, 0.3, None, 0.4])  # None (no such objects) drops out
    assert mean == pytest.approx(0.3) and std == pytest.approx(0.1)  # sqrt((0.01 + 0 + 0.01) / (3 - 1))
    assert mean_std([0.25]) == (0.25, None) and mean_std([None, None]) == (None, None)


def test_t_quantiles_are_the_published_values_at_any_degrees_of_freedom() -> None:
    """NIST/SEMATECH e-Handbook 1.3.6.7.2 to 4 places; beyond 30 the t quantile, not the normal 1.96 (at 31 that
    made the interval 4% too narrow)."""
    got = [t975(df) for df in (1, 2, 4, 30, 40, 100)]
    assert got == pytest.approx([12.7062, 4.3027, 2.7764, 2.0423, 2.0211, 1.9840], abs=1e-4)
    with pytest.raises(ValueError):
        t975(0)


def student_t_cdf(x: float, df: int, steps: int = 4000) -> float:
    """P(T <= x) for x >= 0: 1/2 plus Simpson's rule over the Student-t density from 0 to x."""
    norm = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def density(t: float) -> float:
        return norm * (1 + t * t / df) ** (-(df + 1) / 2)

    h = x / steps
    inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
    return 0.5 + h / 3 * (density(0.0) + inner + density(x))


def test_every_t_quantile_leaves_2_5_percent_in_the_upper_tail() -> None:
    """Each quantile, checked against the t distribution's own density integrated here (the CDF within 1e-5)."""
    for df in (*range(1, 41), 100):
        assert student_t_cdf(t975(df), df) == pytest.approx(0.975, abs=1e-5), df


def test_paired_interval_marks_a_difference_whose_interval_holds_zero_as_within_noise() -> None:
    mean, half = paired_interval([0.01, 0.02, 0.03])  # sd 0.01; 4.3027 * 0.01 / sqrt(3) = 0.02484
    assert mean == pytest.approx(0.02) and half == pytest.approx(0.024842, abs=1e-6)
    assert noise_verdict(mean, half) == "within noise"
    mean, half = paired_interval([0.05, 0.051, 0.052])  # sd 0.001; half-width 0.00248 < 0.051
    assert mean == pytest.approx(0.051) and half == pytest.approx(0.0024842, abs=1e-7)
    assert noise_verdict(mean, half) == "above noise"
    assert noise_verdict(*paired_interval([-0.05, -0.051, -0.052])) == "below noise"
    assert paired_interval([0.04]) == (0.04, None) and noise_verdict(0.04, None) == "one seed: no interval"


def test_the_baseline_is_none_when_trained_else_the_first_variant() -> None:
    assert baseline_key([("ca", "output"), ("none", "-"), ("se", "-")]) == ("none", "-")
    assert baseline_key([("ca", "-"), ("se", "-")]) == ("ca", "-")


def test_seeds_default_to_the_single_seed_and_may_not_repeat() -> None:
    assert seed_list(AblateOptions(seed=3)) == [3]
    assert seed_list(AblateOptions(seed=3, seeds=[0, 1, 2])) == [0, 1, 2]
    from detector.config import build_options

    with pytest.raises(DetectorError, match=r"^command line: 'seeds' lists 1 more than once$"):
        build_options(AblateOptions, {"seeds": "1,0,1"}, "command line")
    with pytest.raises(DetectorError, match=r"^command line: 'attentions' lists 'ca' more than once$"):
        build_options(AblateOptions, {"attentions": "none,ca,ca"}, "command line")  # trained once, shown once


def test_run_folders_one_seed_flat_several_per_seed_and_an_old_flat_run_is_reused(tmp_path: Path) -> None:
    ca = Variant("ca", "")
    assert run_folder(tmp_path, ca, 0, several_seeds=False) == tmp_path / "ca"  # the layout before seeds=
    assert run_folder(tmp_path, ca, 1, several_seeds=True) == tmp_path / "ca" / "seed1"
    (tmp_path / "ca").mkdir()
    (tmp_path / "ca" / "args.yaml").write_text("# attention as built: none\nseed: 0\nepochs: 1\n")
    assert run_folder(tmp_path, ca, 0, several_seeds=True) == tmp_path / "ca"  # an earlier single-seed run: not retrained
    assert run_folder(tmp_path, ca, 2, several_seeds=True) == tmp_path / "ca" / "seed2"
    assert run_folder(tmp_path, ca, 2, several_seeds=False) == tmp_path / "ca" / "seed2"  # <variant>/ holds seed 0's run


def _fake_run(attention: str, seed: int, ap: float, aps: float | None = 0.1) -> dict:
    return {"attention": attention, "attention_at": "-", "seed": seed, "run": f"{attention}/seed{seed}", "params": 1000 + 100 * (attention != "none"),
            "GFLOPs": 0.5, "train img/s": 10.0 + seed, "infer ms/img": 3.0, "AP50": 2 * ap, "AP50:95": ap, "APs": aps, "APm": 0.2,
            "APl": None, "best epoch": 3 + seed}


def test_reports_over_three_seeds_give_mean_std_and_the_paired_difference(tmp_path: Path) -> None:
    base = [0.30, 0.32, 0.34]
    runs = [_fake_run("ca", s, b + d) for s, (b, d) in enumerate(zip(base, [0.01, 0.02, 0.03]))]  # within noise
    runs += [_fake_run("none", s, b) for s, b in enumerate(base)]  # the baseline, though listed second
    runs += [_fake_run("se", s, b + d, aps=None) for s, (b, d) in enumerate(zip(base, [0.05, 0.051, 0.052]))]  # above noise
    table = write_reports(tmp_path, runs)
    with (tmp_path / "ablation.csv").open(newline="") as f:
        rows = {r["attention"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["ca", "none", "se"] and all(r["n"] == "3" for r in rows.values())
    assert float(rows["none"]["AP50:95"]) == pytest.approx(0.32) and float(rows["none"]["AP50:95 std"]) == pytest.approx(0.02)
    assert float(rows["none"]["AP50 std"]) == pytest.approx(0.04) and rows["none"]["APs std"] == "0.0"
    assert rows["none"]["train img/s"] == "11.0" and rows["none"]["best epoch"] == "3/4/5" and rows["none"]["APl"] == ""
    assert rows["none"]["vs baseline"] == "baseline" and rows["none"]["dAP50:95"] == ""
    assert float(rows["ca"]["dAP50:95"]) == pytest.approx(0.02) and float(rows["ca"]["dAP50:95 ci95"]) == pytest.approx(0.024841, abs=1e-6)
    assert rows["ca"]["vs baseline"] == "within noise" and rows["se"]["vs baseline"] == "above noise"
    assert rows["se"]["APs"] == "" and rows["se"]["APs std"] == ""
    with (tmp_path / "ablation_runs.csv").open(newline="") as f:
        per_run = list(csv.DictReader(f))
    assert list(per_run[0]) == list(RUN_COLUMNS) and len(per_run) == 9 and per_run[1]["seed"] == "1"
    md = (tmp_path / "ablation.md").read_text().splitlines()
    assert md == table.splitlines() and md[0].endswith("| n | best epoch | AP50:95 vs baseline |")
    assert md[2].startswith("| ca | - | 1,100 | 0.500 | 11.0 | 3.0 | 0.6800 ± 0.0600 | 0.3400 ± 0.0300 | 0.1000 ± 0.0000 | 0.2000 | - | 3 | 3/4/5 |")
    assert md[2].endswith("| +0.0200 ± 0.0248 (within noise) |") and md[3].endswith("| baseline |")
    assert md[4].endswith("| +0.0510 ± 0.0025 (above noise) |") and "| - | 0.2000 |" in md[4]


def test_n_counts_the_seeds_the_mean_and_spread_come_from(tmp_path: Path) -> None:
    """A seed without AP50:95 (never evaluated) leaves the mean and std: it must leave `n` too (it said 3 over 2)."""
    runs = [_fake_run("ca", 0, 0.30), _fake_run("ca", 1, 0.34), {**_fake_run("ca", 2, 0.0), "AP50:95": None}]
    write_reports(tmp_path, runs)
    with (tmp_path / "ablation.csv").open(newline="") as f:
        row = next(csv.DictReader(f))
    assert row["n"] == "2" and float(row["AP50:95"]) == pytest.approx(0.32)


def test_one_seed_each_reports_no_interval(tmp_path: Path) -> None:
    table = write_reports(tmp_path, [_fake_run("ca", 0, 0.3), _fake_run("se", 0, 0.25)])  # no `none`: the first is the baseline
    lines = table.splitlines()
    assert lines[2].endswith("| baseline |") and lines[3].endswith("| -0.0500 (one seed: no interval) |")
    assert " ± " not in table


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
    from detector.runtime.checkpoint import load_checkpoint

    assert load_checkpoint(root / "cbam" / "weights" / "best.pt")["model_yaml"]["attention"] == "cbam"

    stamps = {v: (root / v / "weights" / "best.pt").stat().st_mtime_ns for v in ("none", "cbam")}
    with caplog.at_level(logging.INFO, logger="detector.tools.runs"):
        run_ablation(opts)
    assert sum("finished earlier, skipped" in r.getMessage() for r in caplog.records) == 2
    assert stamps == {v: (root / v / "weights" / "best.pt").stat().st_mtime_ns for v in ("none", "cbam")}
    neutral = AblateOptions(**{**opts.__dict__, "workers": 1, "train": [*opts.train, "save_period=5"]})
    run_ablation(neutral)  # where and with what the runs execute: still the same ablation, still skipped
    assert stamps == {v: (root / v / "weights" / "best.pt").stat().st_mtime_ns for v in ("none", "cbam")}

    with pytest.raises(DetectorError, match=r"other settings \(imgsz 128 -> 160\)"):  # would compare unequal runs
        run_ablation(AblateOptions(**{**opts.__dict__, "imgsz": 160}))

    # a longer schedule: the finished one-epoch run is now half-finished and resumes from its last.pt
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="detector.tools.runs"):
        run_ablation(AblateOptions(**{**opts.__dict__, "attentions": ["cbam"], "epochs": 2}))
    assert any("cbam: resuming" in r.getMessage() for r in caplog.records)
    with (root / "cbam" / "results.csv").open(newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1"]


@pytest.mark.slow
def test_two_seeds_through_the_cli_give_mean_std_and_a_paired_difference(tmp_path: Path, capsys) -> None:
    from detector.cli import main
    from detector.data.synthetic import generate_shapes_dataset

    data = generate_shapes_dataset(tmp_path / "shapes", seed=0, n_train=16, n_val=8, imgsz=128)
    argv = ["ablate", "model=yolo-attn-n", f"data={data}", "attentions=none,ca", "seeds=0,1", "epochs=1", "imgsz=96", "batch=8",
            "workers=0", "device=cpu", f"project={tmp_path / 'ablate'}", "name=seeds", "train=plots=false,autoanchor=false"]
    assert main(argv) == 0
    root = tmp_path / "ablate" / "seeds"
    import yaml

    for variant in ("none", "ca"):  # within a seed every variant trains with that seed (same init draw, same data order)
        assert [yaml.safe_load((root / variant / f"seed{s}" / "args.yaml").read_text())["seed"] for s in (0, 1)] == [0, 1]
    with (root / "ablation_runs.csv").open(newline="") as f:
        assert [(r["attention"], r["seed"], r["run"]) for r in csv.DictReader(f)] == [
            ("none", "0", "none/seed0"), ("none", "1", "none/seed1"), ("ca", "0", "ca/seed0"), ("ca", "1", "ca/seed1")]
    with (root / "ablation.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["attention"], r["n"], r["vs baseline"]) for r in rows][0] == ("none", "2", "baseline")
    assert rows[1]["AP50:95 std"] != "" and rows[1]["dAP50:95 ci95"] != ""
    assert rows[1]["vs baseline"] in ("within noise", "above noise", "below noise")
    md = (root / "ablation.md").read_text().splitlines()
    assert md[0].endswith("| AP50:95 vs baseline |") and " ± " in md[2].split(" | ")[7]  # AP50:95 as mean ± std
    assert re.search(r"\| [+-]\d\.\d{4} ± \d\.\d{4} \((within|above|below) noise\) \|$", md[3])
    assert "| ca |" in capsys.readouterr().out
    assert (root / "ablation.png").stat().st_size > 1000

    stamps = sorted(p.stat().st_mtime_ns for p in root.glob("*/seed*/weights/best.pt"))
    assert len(stamps) == 4 and main(argv) == 0  # the same command again: all four runs finished, none retrained
    assert stamps == sorted(p.stat().st_mtime_ns for p in root.glob("*/seed*/weights/best.pt"))


def test_an_interval_ending_at_zero_still_holds_it() -> None:
    assert noise_verdict(0.02, 0.02) == noise_verdict(-0.02, 0.02) == "within noise"


def test_collect_row_reads_the_best_epoch_one_based_the_median_speed_and_no_such_objects(tmp_path: Path,
                                                                                       untrained_checkpoint: Path) -> None:
    from detector.tools.ablate import collect_row

    run_dir = tmp_path / "run"
    (run_dir / "weights").mkdir(parents=True)
    untrained_checkpoint.rename(run_dir / "weights" / "best.pt")
    columns = ["epoch", "fitness", "epoch_time_s", "metrics/AP50", "metrics/AP", "metrics/APs", "metrics/APm", "metrics/APl"]
    rows = [[0, 0.1, 10, 0.2, 0.1, 0.05, 0.1, 0.1], [1, 0.3, 20, 0.5, 0.25, -1, 0.2, 0.3], [2, 0.2, 40, 0.4, 0.2, 0.1, 0.2, 0.2]]
    (run_dir / "results.csv").write_text("\n".join(",".join(map(str, r)) for r in [columns, *rows]) + "\n")
    (run_dir / "metrics.json").write_text('{"speed_ms": {"inference": 3.456}}')
    row = collect_row(run_dir, Variant("ca", ""), imgsz=64, train_images=300)
    assert row["best epoch"] == 2  # epoch index 1 of results.csv, the second epoch
    assert (row["AP50"], row["AP50:95"], row["APs"], row["APl"]) == (0.5, 0.25, None, 0.3)  # -1: no small objects
    assert row["train img/s"] == 15.0 and row["infer ms/img"] == 3.46 and row["attention_at"] == "-"

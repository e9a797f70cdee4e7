"""`detector tune`: the search space file and its refusals, the key ranges' mapping, the evolution step (its parent,
its determinism, its bounds), the train= refusals, and (slow) three one-epoch trials whose reports, cfg file and
resume behave as a user expects."""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from detector.config import TrainConfig, load_train_config
from detector.errors import DetectorError
from detector.options import TuneOptions
from detector.tools.tune import (
    DEFAULT_SPACE, PARENTS, Dimension, Trial, load_space, propose, run_tune, start_values,
)
from detector.yamlfile import load_yaml


def _space(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_the_default_space_holds_the_train_defaults_so_the_first_trial_is_them() -> None:
    dims = load_space(DEFAULT_SPACE)
    keys = [d.key for d in dims]
    assert len(keys) == len(set(keys)) >= 10 and set(keys) <= set(TrainConfig.__dataclass_fields__)
    assert next(d for d in dims if d.key == "lr0").log and not any(d.log for d in dims if d.key != "lr0")
    defaults = TrainConfig()
    assert start_values(defaults, dims) == {d.key: getattr(defaults, d.key) for d in dims}


def test_a_space_key_outside_its_range_starts_at_the_nearest_end_and_one_without_value_in_the_middle(tmp_path: Path) -> None:
    dims = load_space(_space(tmp_path, "lr0: [0.01, 0.1, log]\nbox: [1.0, 9.0]\nclose_mosaic: [0, 5]\n"))
    assert [d.integer for d in dims] == [False, False, True]
    assert start_values(TrainConfig(), dims) == {"lr0": 0.01, "box": 5.0, "close_mosaic": 5}  # 0.003, None, 10


@pytest.mark.parametrize(("text", "message"), [
    ("lr_0: [0.001, 0.01]\n", r"space.yaml:1: unknown train key 'lr_0' \(did you mean 'lr0'"),
    ("cls: [0.5, 1.0]\nhsv_s: 0.5\n", r"space.yaml:2: 'hsv_s' must be \[low, high\] or \[low, high, log\], got 0.5"),
    ("lr0: [0.01, 0.001]\n", r"'lr0' range must have low < high, got \[0.01, 0.001\]"),
    ("lr0: [0.01, 0.01]\n", r"'lr0' range must have low < high, got \[0.01, 0.01\]"),
    ("weight_decay: [0.0, 0.001, log]\n", r"'weight_decay' on a log scale needs low > 0"),
    ("lr0: [0.001, 0.01, linear]\n", r"must be \[low, high\] or \[low, high, log\]"),
    ("translate: [0.0, 1.0]\n", r"'translate' range \[0.0, 1.0\] leaves the key's own bounds \(>= 0 and < 1\)"),
    ("scale: [0.0, .inf]\n", r"'scale' range ends must be finite numbers, got inf"),
    ("mixup: [0.0, true]\n", r"'mixup' range ends must be finite numbers, got True"),
    ("close_mosaic: [1.5, 10]\n", r"'close_mosaic' takes integers, got 1.5"),
    ("epochs: [10, 20]\n", r"'epochs' is not searched: it shapes how a run is carried out"),
    ("seed: [0, 10]\n", r"'seed' is not searched: the seed is set by tune's seed="),
    ("fraction: [0.5, 1]\n", r"'fraction' is not searched: more data scores higher"),
    ("imgsz: [320, 640]\n", r"'imgsz' is not searched: it takes multiples of 32 only"),
    ("optimizer: [1, 2]\n", r"'optimizer' is not searched: it is not a number"),
    ("- lr0\n", r"expected a mapping of train key"),
])
def test_a_bad_space_is_refused_naming_the_file_line_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DetectorError, match=message):
        load_space(_space(tmp_path, text))


def test_a_range_maps_to_0_1_linearly_or_by_log_and_back_rounded_and_clipped() -> None:
    linear, log = Dimension("mixup", 0.0, 1.0), Dimension("lr0", 1e-4, 1e-2, log=True)
    assert linear.to_unit(0.25) == 0.25 and linear.to_unit(2.0) == 1.0 and linear.from_unit(-3.0) == 0.0
    assert log.to_unit(1e-3) == pytest.approx(0.5) and log.from_unit(0.5) == 0.001
    assert log.from_unit(0.123456) == float(f"{1e-4 * 100 ** 0.123456:.4g}")  # 4 significant digits
    assert Dimension("close_mosaic", 0, 10, integer=True).from_unit(0.26) == 3
    assert Dimension("mixup", 0.0, 0.123456).from_unit(1.0) == 0.123456  # rounded up to 0.1235, clipped back


def _trials(fitness: list[float], dims: list[Dimension], seed: int = 1) -> list[Trial]:
    rng = np.random.default_rng(seed)
    return [Trial(i + 1, {d.key: d.from_unit(rng.random()) for d in dims}, f, None, None, Path(f"trial{i + 1}"))
            for i, f in enumerate(fitness)]


def test_a_mutation_starts_from_the_fitness_weighted_mean_of_the_best_trials() -> None:
    dims = [Dimension("mixup", 0.0, 1.0), Dimension("lr0", 1e-4, 1e-2, log=True)]
    trials = _trials([0.1, 0.5, 0.3, 0.4, 0.2, 0.05, 0.35], dims)
    best = sorted(trials, key=lambda t: t.fitness, reverse=True)[:PARENTS]
    weights = np.array([t.fitness for t in best]) - min(t.fitness for t in best) + 1e-6
    for d_index, d in enumerate(dims):
        units = np.array([d.to_unit(t.values[d.key]) for t in best])
        expected = d.from_unit(float(weights @ units / weights.sum()))
        child = propose(trials, dims, 1e-9, seed=0, number=8)  # a step too small to see: the parent itself
        assert child[d.key] == pytest.approx(expected, rel=1e-3), d.key
    assert 0.05 not in [t.fitness for t in best]  # the worst trials are no parents


def test_mutations_are_drawn_from_seed_and_trial_move_a_key_and_stay_in_range() -> None:
    dims = load_space(DEFAULT_SPACE)
    trials = _trials([0.2, 0.3], dims)
    first = propose(trials, dims, 0.2, seed=0, number=3)
    assert first == propose(trials, dims, 0.2, seed=0, number=3)  # a re-run recomputes the same trial
    assert first != propose(trials, dims, 0.2, seed=0, number=4) and first != propose(trials, dims, 0.2, seed=1, number=3)
    parent = propose(trials, dims, 1e-9, seed=0, number=3)
    moved = [k for k in first if not math.isclose(first[k], parent[k], rel_tol=1e-3, abs_tol=1e-9)]
    assert 1 <= len(moved) <= len(dims)
    shares = []  # each key moves with probability MOVE_PROBABILITY = 0.8
    for seed in range(20):
        child = propose(trials, dims, 0.2, seed=seed, number=3)
        shares.append(np.mean([not math.isclose(child[k], parent[k], rel_tol=1e-3, abs_tol=1e-9) for k in child]))
    assert 0.65 <= np.mean(shares) <= 0.95
    one = [Dimension("mixup", 0.0, 1.0)]  # no draw moves its one key with probability 0.2: then it is moved anyway
    few = _trials([0.2, 0.3], one)
    still = propose(few, one, 1e-9, seed=0, number=3)
    assert all(propose(few, one, 0.2, seed=seed, number=3) != still for seed in range(20))
    for seed in range(50):  # a wide step clips at the range's ends
        child = propose(trials, dims, 1.0, seed=seed, number=2)
        assert all(d.low <= child[d.key] <= d.high for d in dims)
    assert load_train_config(dict(first)).lr0 == first["lr0"]  # every value is a valid train key value


def test_train_keys_that_tune_sets_or_searches_are_refused_before_any_training(tmp_path: Path) -> None:
    base = {"project": str(tmp_path), "epochs": 1}
    with pytest.raises(DetectorError, match="train= cannot set 'epochs' \\(use the tune key of that name\\)"):
        run_tune(TuneOptions(**base, train=["epochs=3"]))
    with pytest.raises(DetectorError, match="train= cannot set 'lr0': the space searches it"):
        run_tune(TuneOptions(**base, train=["lr0=0.01"]))
    with pytest.raises(DetectorError, match="unknown key 'lr'"):
        run_tune(TuneOptions(**base, train=["lr=0.1"]))
    with pytest.raises(DetectorError, match="file not found"):
        run_tune(TuneOptions(**base, space=str(tmp_path / "missing.yaml")))
    assert not any(tmp_path.iterdir())  # nothing trained


def test_short_trials_that_would_never_see_mosaic_are_warned_about(caplog) -> None:
    from detector.tools.tune import warn_without_mosaic

    dims = load_space(DEFAULT_SPACE)
    with caplog.at_level(logging.WARNING, logger="detector.tools.tune"):
        assert warn_without_mosaic(load_train_config({"epochs": "10"}), dims)  # close_mosaic 10: no epoch with mosaic
    assert "trials of 10 epochs with close_mosaic=10 train without mosaic" in caplog.text
    assert not warn_without_mosaic(load_train_config({"epochs": "10", "close_mosaic": "2"}), dims)
    assert not warn_without_mosaic(load_train_config({"epochs": "5", "mosaic": "0"}), [d for d in dims if d.key != "mosaic"])


@pytest.mark.slow
def test_three_trials_write_the_reports_and_a_rerun_skips_them_or_continues(tmp_path: Path, caplog, capsys) -> None:
    from detector.data.synthetic import generate_shapes_dataset

    data = generate_shapes_dataset(tmp_path / "shapes", seed=0, n_train=16, n_val=8, imgsz=128)
    space = _space(tmp_path, "lr0: [0.001, 0.01, log]\nmixup: [0.0, 1.0]\nclose_mosaic: [0, 2]\n")
    keys = dict(data=str(data), iterations=3, epochs=1, imgsz=64, batch=8, workers=0, device="cpu", space=str(space),
                sigma=0.3, project=str(tmp_path / "tune"), name="tiny", train=["plots=false", "autoanchor=false", "optimizer=SGD", "fraction=0.5"])
    model = "yolo-c2f-n"
    root = run_tune(TuneOptions(model=model, **keys))
    assert root == tmp_path / "tune" / "tiny"
    with (root / "tune_results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == ["1", "2", "3"] and [r["run"] for r in rows] == [f"trials/trial{i}" for i in (1, 2, 3)]
    assert (rows[0]["lr0"], rows[0]["mixup"], rows[0]["close_mosaic"]) == ("0.003", "0.08", "2")  # trial 1: the defaults, clipped
    assert len({(r["lr0"], r["mixup"], r["close_mosaic"]) for r in rows}) == 3
    for row in rows:
        args, _ = load_yaml(root / row["run"] / "args.yaml")  # each trial trained with its row's values
        assert (args["lr0"], args["mixup"], args["close_mosaic"]) == (float(row["lr0"]), float(row["mixup"]), int(row["close_mosaic"]))
        assert args["optimizer"] == "SGD" and args["fraction"] == 0.5 and float(row["fitness"]) >= 0 and row["AP50:95"] != ""
    best = max(rows, key=lambda r: float(r["fitness"]))
    cfg = load_train_config({"cfg": str(root / "best_hyperparameters.yaml")})  # a cfg file `detector train` reads
    assert (cfg.lr0, cfg.mixup, cfg.close_mosaic, cfg.optimizer) == (float(best["lr0"]), float(best["mixup"]), int(best["close_mosaic"]), "SGD")
    assert cfg.plots is True  # neutral train= keys are no hyperparameters: not written
    assert cfg.fraction == 1.0  # the trials' share of the data is theirs, named in the header only
    assert "# the trials trained with fraction=0.5" in (root / "best_hyperparameters.yaml").read_text()
    assert (root / "tune.png").stat().st_size > 0 and f"best: trial {best['trial']}" in capsys.readouterr().out

    for row in rows:  # a finished trial keeps its best.pt, an inference file, and no last.pt
        assert [p.name for p in (root / row["run"] / "weights").iterdir()] == ["best.pt"]
    stamps = [(root / r["run"] / "weights" / "best.pt").stat().st_mtime_ns for r in rows]
    with caplog.at_level(logging.INFO, logger="detector.tools.runs"):
        run_tune(TuneOptions(model=model, **{**keys, "iterations": 4}))
    assert sum("finished earlier, skipped" in r.getMessage() for r in caplog.records) == 3
    assert any("tune [4/4]: training" in r.getMessage() for r in caplog.records)
    assert stamps == [(root / r["run"] / "weights" / "best.pt").stat().st_mtime_ns for r in rows]
    with (root / "tune_results.csv").open(newline="") as f:
        assert [r["trial"] for r in csv.DictReader(f)] == ["1", "2", "3", "4"]

    with pytest.raises(DetectorError, match=r"tune: .*trial2 was trained with other settings \("):  # another sigma
        run_tune(TuneOptions(model=model, **{**keys, "sigma": 0.05}))
    with (root / "tune_results.csv").open(newline="") as f:  # the refused re-run left the reports as they were
        assert len(list(csv.DictReader(f))) == 4
    assert "the best of 4 trials" in (root / "best_hyperparameters.yaml").read_text()


@pytest.mark.slow
def test_a_trial_that_diverges_scores_0_and_the_search_goes_on(tmp_path: Path, monkeypatch, caplog) -> None:
    from detector.data.synthetic import generate_shapes_dataset
    from detector.train import loss as loss_module
    from detector.train import trainer as trainer_module

    data = generate_shapes_dataset(tmp_path / "shapes", seed=0, n_train=16, n_val=8, imgsz=128)
    real_call, real_train = loss_module.AlignedLoss.__call__, trainer_module.train

    def poisoned(self, raw, targets):  # every loss NaN: the trainer's own stop for non-finite steps ends the run
        total, parts = real_call(self, raw, targets)
        return total * float("nan"), parts

    def train(cfg: TrainConfig) -> dict:
        with monkeypatch.context() as patch:
            if cfg.name == "trial2":
                patch.setattr(loss_module.AlignedLoss, "__call__", poisoned)
            return real_train(cfg)

    monkeypatch.setattr(trainer_module, "train", train)
    opts = TuneOptions(model="yolo-c2f-n", data=str(data), iterations=3, epochs=1, imgsz=64, batch=8, workers=0, device="cpu",
                       space=str(_space(tmp_path, "lr0: [0.001, 0.01, log]\n")), project=str(tmp_path / "tune"), name="nan",
                       train=["plots=false", "autoanchor=false", "max_nonfinite=1"])
    with caplog.at_level(logging.WARNING, logger="detector.tools.tune"):
        root = run_tune(opts)
    with (root / "tune_results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == ["1", "2", "3"]
    assert (rows[1]["fitness"], rows[1]["AP50:95"]) == ("0.0", "") and rows[0]["AP50:95"] != "" and rows[2]["AP50:95"] != ""
    assert any("tune [2/3]: training stopped: 1 non-finite steps in a row" in r.getMessage() and "fitness 0" in r.getMessage()
               for r in caplog.records)
    trained: list[str] = []  # a re-run skips the diverged trial as it skips the finished ones: nothing trains again
    monkeypatch.setattr(trainer_module, "train", lambda cfg: trained.append(cfg.name) or real_train(cfg))
    run_tune(opts)
    with (root / "tune_results.csv").open(newline="") as f:
        assert list(csv.DictReader(f)) == rows and trained == []


def test_a_train_cfg_file_fixes_its_keys_in_every_trial_and_in_the_winners_file(tmp_path: Path, monkeypatch) -> None:
    """train=cfg=<yaml> is a train key like any other: its keys reach the trials and the winner's file (once an
    AttributeError: 'cfg' is no TrainConfig field)."""
    from detector.tools import tune

    seen: list[TrainConfig] = []

    def fake_trial(cfg: TrainConfig, number: int, values: dict, label: str, *, main: bool) -> tuple[Trial, bool]:
        seen.append(cfg)
        return Trial(number, values, 0.1 * number, 0.1, 0.2, Path(cfg.project) / cfg.name), True

    monkeypatch.setattr(tune, "run_trial", fake_trial)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("optimizer: SGD\nlrf: 0.02\nplots: false\n")
    opts = TuneOptions(iterations=2, epochs=1, device="cpu", project=str(tmp_path), name="cfg",
                       space=str(_space(tmp_path, "lr0: [0.001, 0.01, log]\n")), train=[f"cfg={recipe}", "close_mosaic=2"])
    root = run_tune(opts)
    assert all((c.optimizer, c.lrf, c.close_mosaic) == ("SGD", 0.02, 2) for c in seen) and len(seen) == 2
    winner, _ = load_yaml(root / "best_hyperparameters.yaml")
    assert winner == {"lr0": seen[1].lr0, "lrf": 0.02, "optimizer": "SGD"}  # plots: neutral, left out
    # close_mosaic=2 let the 1-epoch trials see mosaic; the long run keeps its own (the default 10)
    assert "# the trials trained with close_mosaic=2" in (root / "best_hyperparameters.yaml").read_text()
    recipe.write_text("lr0: 0.005\n")  # the space searches lr0: the file's value would be overridden by every trial
    with pytest.raises(DetectorError, match=r"train=cfg= file sets 'lr0', which the space searches"):
        run_tune(replace(opts, name="searched"))


def test_the_mosaic_warning_suggests_a_close_mosaic_below_the_trial_length(caplog) -> None:
    """`epochs=1 train=close_mosaic=2` (README's tune line with 1-epoch trials) suggested 'e.g. 2' again."""
    from detector.tools.tune import warn_without_mosaic

    with caplog.at_level(logging.WARNING, logger="detector.tools.tune"):
        assert warn_without_mosaic(load_train_config({"epochs": "1", "close_mosaic": "2"}), load_space(DEFAULT_SPACE))
    assert "pass train=close_mosaic=0\n" in caplog.text + "\n" and "e.g. 2" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="detector.tools.tune"):  # 2 epochs: 1 would leave just one
        assert warn_without_mosaic(load_train_config({"epochs": "2"}), load_space(DEFAULT_SPACE))
    assert "pass train=close_mosaic=0\n" in caplog.text + "\n"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="detector.tools.tune"):
        assert warn_without_mosaic(load_train_config({"epochs": "10"}), load_space(DEFAULT_SPACE))
    assert "pass train=close_mosaic=<fewer than 10> (e.g. 2)" in caplog.text

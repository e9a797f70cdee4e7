"""detector.tools.runs: whether a named run folder holds its run finished (skip), interrupted (resume from last.pt)
or another run (refused), from the files a run leaves: args.yaml, results.csv, weights/best.pt and last.pt."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from detector.config import load_train_config
from detector.errors import DetectorError
from detector.tools import runs


def make_run(run_dir: Path, fitness: list[str], *, best: bool = True, last: bool = False, args: str = "") -> Path:
    """A run folder whose results.csv has one row per epoch with these fitness values ('' = not evaluated)."""
    (run_dir / "weights").mkdir(parents=True)
    rows = [f"{epoch},{value}" for epoch, value in enumerate(fitness)]
    (run_dir / "results.csv").write_text("\n".join(["epoch,fitness", *rows]) + "\n")
    for name, wanted in (("best.pt", best), ("last.pt", last)):
        if wanted:
            (run_dir / "weights" / name).write_bytes(b"")
    if args:
        (run_dir / "args.yaml").write_text(args)
    return run_dir


def config(**keys: str):
    return load_train_config({"epochs": "3", "patience": "0", **keys})


def test_the_best_row_is_the_highest_evaluated_fitness() -> None:
    """best_row is the row of the highest fitness among evaluated epochs; None when none was evaluated."""
    rows = [{"epoch": "0", "fitness": "0.1"}, {"epoch": "1", "fitness": "0.3"}, {"epoch": "2", "fitness": ""}]
    assert runs.best_row(rows)["epoch"] == "1"
    assert runs.best_row([{"epoch": "0", "fitness": ""}]) is None


def test_the_best_row_is_the_trainers_best_epoch_when_fitnesses_agree_to_five_decimals(tmp_path: Path) -> None:
    """The trainer keeps the first epoch of strictly higher fitness; results.csv holds it unrounded, so best_row picks
    the same epoch (rounded to 5 decimals, epochs 0 and 1 tied and the earlier won: a run cut short by patience
    counted from the wrong epoch, and ablate read another epoch's AP than best.pt's)."""
    import torch

    from detector.viz.logger import RunLogger, read_results

    logger = RunLogger(tmp_path, tensorboard=False)
    for epoch, fitness in enumerate([0.4123451, 0.4123454, 0.41, 0.40]):
        logger.epoch(epoch, torch.zeros(3), 0.01, {"AP": fitness}, fitness, 1.0, 0)
    logger.close()
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "best.pt").write_bytes(b"")
    assert runs.best_row(read_results(tmp_path / "results.csv"))["epoch"] == "1"
    assert not runs.finished(tmp_path, config(epochs="10", patience="3"))  # 2 epochs since the best, not 3


def test_a_run_is_finished_at_its_last_epoch_with_a_best_pt(tmp_path: Path) -> None:
    """Three epochs of three (rows 0..2) and best.pt: finished; two rows, or no best.pt: not."""
    assert runs.finished(make_run(tmp_path / "done", ["0.1", "0.2", "0.3"]), config())
    assert not runs.finished(make_run(tmp_path / "half", ["0.1", "0.2"]), config())
    assert not runs.finished(make_run(tmp_path / "no-best", ["0.1", "0.2", "0.3"], best=False), config())
    assert not runs.finished(tmp_path / "empty", config())


def test_a_run_stopped_by_patience_is_finished(tmp_path: Path) -> None:
    """A run whose last epochs did not improve on the best for `patience` epochs is finished; patience 0 never stops."""
    # best at epoch 2, last row epoch 4 of 10: 2 epochs without improvement
    run = make_run(tmp_path / "run", ["0.1", "0.2", "0.5", "0.4", "0.3"])
    assert runs.finished(run, config(epochs="10", patience="2"))
    assert not runs.finished(run, config(epochs="10", patience="3"))
    assert not runs.finished(run, config(epochs="10", patience="0"))


def test_pending_config_skips_resumes_or_trains(tmp_path: Path) -> None:
    """A finished run: None; an interrupted one with last.pt: the config resuming from it; none: the config itself."""
    cfg = config()
    assert runs.pending_config(make_run(tmp_path / "done", ["0.1"] * 3), cfg, command="ablate", free_keys=()) is None
    interrupted = make_run(tmp_path / "cut", ["0.1"], best=True, last=True)
    resumed = runs.pending_config(interrupted, cfg, command="ablate", free_keys=())
    assert resumed.resume == str(interrupted / "weights" / "last.pt") and resumed.epochs == 3
    assert runs.pending_config(tmp_path / "new", cfg, command="ablate", free_keys=()) is cfg
    assert runs.saved_args(tmp_path / "new") is None  # no args.yaml: no run there


def test_a_folder_of_a_run_with_other_settings_is_refused_unless_the_key_is_free(tmp_path: Path) -> None:
    """A run folder trained with another value of a key is refused (naming command and key) unless the key is free."""
    run = make_run(tmp_path / "run", ["0.1"], args="epochs: 3\nlr0: 0.5\n")
    with pytest.raises(DetectorError, match=r"tune: .*run was trained with other settings \(lr0 0.5 -> 0.01\); use another name="):
        runs.check_same_settings(run, config(lr0="0.01"), command="tune", free_keys=())
    runs.check_same_settings(run, config(lr0="0.01"), command="tune", free_keys={"lr0"})
    runs.check_same_settings(run, config(lr0="0.5"), command="tune", free_keys=())


def test_train_or_skip_trains_only_what_is_not_finished(tmp_path: Path, monkeypatch, caplog) -> None:
    """A finished run is skipped (logged, not trained); a new one is trained from scratch."""
    from detector.train import trainer

    trained = []
    monkeypatch.setattr(trainer, "train", lambda cfg: trained.append(cfg))
    with caplog.at_level(logging.INFO, logger=runs.__name__):
        assert not runs.train_or_skip(make_run(tmp_path / "done", ["0.1"] * 3), config(), "[1/2]", command="ablate", free_keys=())
        assert runs.train_or_skip(tmp_path / "new", config(), "[2/2]", command="ablate", free_keys=())
    assert len(trained) == 1 and not trained[0].resume
    assert "[1/2]: finished earlier, skipped" in caplog.text and "[2/2]: training" in caplog.text

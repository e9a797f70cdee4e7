"""A training run kept in a named folder by a command that trains many (`detector ablate`, `detector tune`), so
that re-running the command continues where it stopped: a finished run is skipped, an interrupted one resumes from
its last.pt, and a folder holding a run of other settings is refused rather than silently compared or reused."""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import asdict
from pathlib import Path
from typing import Any

from detector.config import TrainConfig, load_train_config
from detector.errors import DetectorError
from detector.yamlfile import load_yaml

LOGGER = logging.getLogger(__name__)


def train_or_skip(run_dir: Path, cfg: TrainConfig, label: str, *, command: str, free_keys: Collection[str]) -> bool:
    """Skip the run `cfg` describes when `run_dir` holds it finished, resume it from last.pt when interrupted, else
    train it from scratch; `label` starts the log line that says which. Returns whether it trained."""
    from detector.train.trainer import train

    todo = pending_config(run_dir, cfg, command=command, free_keys=free_keys)
    if todo is None:
        LOGGER.info("%s: finished earlier, skipped", label)
        return False
    LOGGER.info("%s: %s", label, "resuming" if todo.resume else "training")
    train(todo)
    return True


def pending_config(run_dir: Path, cfg: TrainConfig, *, command: str, free_keys: Collection[str]) -> TrainConfig | None:
    """None when `run_dir` holds this run finished; else the config that trains it, resuming from last.pt when an
    interrupted run is there. DetectorError (naming `command`) when the folder's run used other settings than
    `cfg`, `free_keys` apart."""
    check_same_settings(run_dir, cfg, command=command, free_keys=free_keys)
    if finished(run_dir, cfg):
        return None
    last = run_dir / "weights" / "last.pt"
    return load_train_config({**as_overrides(cfg), "resume": str(last)}) if last.exists() else cfg


def saved_args(run_dir: Path) -> dict[str, Any] | None:
    """The train config an earlier run in `run_dir` recorded in its args.yaml (None: no run there)."""
    args = run_dir / "args.yaml"
    if not args.exists():
        return None
    saved, _ = load_yaml(args)
    return saved if isinstance(saved, dict) else {}


def check_same_settings(run_dir: Path, cfg: TrainConfig, *, command: str, free_keys: Collection[str]) -> None:
    """A run folder left by an earlier invocation must have used this invocation's settings (else its row would
    compare unequal runs)."""
    saved = saved_args(run_dir)
    if saved is None:
        return
    wanted = asdict(cfg)
    changed = [k for k in wanted if k not in free_keys and k in saved and saved[k] != wanted[k]]
    if changed:
        diffs = ", ".join(f"{k} {saved[k]!r} -> {wanted[k]!r}" for k in changed[:3])
        raise DetectorError(f"{command}: {run_dir} was trained with other settings ({diffs}); use another name= for a new {command} run")


def finished(run_dir: Path, cfg: TrainConfig) -> bool:
    """best.pt exists and results.csv reaches the last epoch (or the early stop that patience would trigger)."""
    from detector.viz.logger import read_results

    rows = read_results(run_dir / "results.csv")
    if not rows or not (run_dir / "weights" / "best.pt").exists():
        return False
    last = int(rows[-1]["epoch"])
    best = best_row(rows)
    stopped = cfg.patience > 0 and best is not None and last - int(best["epoch"]) >= cfg.patience
    return last + 1 >= cfg.epochs or stopped


def best_row(rows: list[dict[str, str]]) -> dict[str, str] | None:
    """The results.csv row of the best fitness (None when no epoch was evaluated)."""
    scored = [r for r in rows if r.get("fitness")]
    return max(scored, key=lambda r: float(r["fitness"])) if scored else None


def as_overrides(cfg: TrainConfig) -> dict[str, Any]:
    """Every key of `cfg` as a `load_train_config` override."""
    return {k: getattr(cfg, k) for k in TrainConfig.__dataclass_fields__}

"""`detector tune`: hyperparameter search by evolution, one short training run per trial.

The scheme is YOLOv5's hyperparameter evolution (`train.py --evolve`; Ultralytics' Tuner follows it too), in our
own form:
- trial 1 trains the starting point: the train defaults with the `train=` keys (a key whose start lies outside
  its range starts at the range's nearest end, one that has no value yet, like box=, at its middle);
- each later trial starts from the fitness-weighted mean of the best trials so far (up to `PARENTS`, weights
  fitness - the lowest of them), taken in each key's range mapped to [0, 1] (log-mapped for a `log` key), and
  moves each key with probability `MOVE_PROBABILITY` by a Gaussian step of `sigma` (a fraction of the range; at
  least one key moves), clipped to the range. Steps in the mapped range, unlike YOLOv5's multiplicative gains,
  also move a key that starts at 0 (mixup, degrees);
- fitness is the trainer's own, 0.1 AP50 + 0.9 AP50:95, of the trial's best epoch (0 when none was evaluated, or
  when the trial diverged: the trainer stopped it for non-finite losses).

Trial k's mutation draws from (seed, k) and its parent comes from the trials before it, so re-running the same
command recomputes the same trials: finished ones are skipped, an interrupted one resumes from its last.pt, and a
changed setting (space, sigma, a train key) is refused with the keys that differ.

Files in <project>/<name>/: trials/trial<k>/ (ordinary run folders; a finished trial keeps best.pt, not last.pt),
tune_results.csv (one row per trial: fitness, AP50:95, AP50 and each searched key), best_hyperparameters.yaml (the
best trial's keys: `detector train cfg=<it>`), tune.png (each key's values against fitness), rewritten after every
trained trial and at the end.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from detector.config import PACKAGE_CONFIGS, TrainConfig, given_keys, load_train_config, neutral_keys, parse_overrides, run_only_keys
from detector.errors import DetectorError, TrainingDiverged, did_you_mean
from detector.options import TuneOptions
from detector.tools.runs import best_row, check_same_settings, train_or_skip
from detector.viz.tables import format_table
from detector.yamlfile import load_yaml

LOGGER = logging.getLogger(__name__)

DEFAULT_SPACE = PACKAGE_CONFIGS / "tune" / "space.yaml"
PARENTS = 5  # the best trials a new one is bred from
MOVE_PROBABILITY = 0.8  # the chance that a key moves in a mutation
DIVERGED_MARKER = "diverged.txt"  # in a trial's folder: the trainer stopped it for non-finite losses
SIGNIFICANT_DIGITS = 4  # a trial's float values, rounded so its files read cleanly and it reproduces from them
NOT_SEARCHED = {
    "seed": "the seed is set by tune's seed=, the same for every trial",
    "fraction": "more data scores higher: set it for every trial with train=fraction=",
}
# train= keys that shape the short trials, not the recipe: left out of the winner's cfg file, named in its header
# (a share of the data; close_mosaic, which a short trial needs below its epochs to see mosaic at all)
TRIAL_ONLY = ("fraction", "close_mosaic")
RESULT_COLUMNS = ("trial", "fitness", "AP50:95", "AP50")


@dataclass(frozen=True)
class Dimension:
    """One searched train key: its range, whether it is stepped on a log scale, whether it takes integers."""

    key: str
    low: float
    high: float
    log: bool = False
    integer: bool = False

    def to_unit(self, value: float) -> float:
        """`value` (clipped to the range) mapped to [0, 1]."""
        value = min(max(float(value), self.low), self.high)
        if self.log:
            return (math.log(value) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (value - self.low) / (self.high - self.low)

    def from_unit(self, unit: float) -> float | int:
        """The key's value at `unit` (clipped to [0, 1]): an int, or a float rounded to SIGNIFICANT_DIGITS."""
        unit = min(max(float(unit), 0.0), 1.0)
        if self.log:
            value = math.exp(math.log(self.low) + unit * (math.log(self.high) - math.log(self.low)))
        else:
            value = self.low + unit * (self.high - self.low)
        if self.integer:
            return int(round(value))
        return min(max(float(f"{value:.{SIGNIFICANT_DIGITS}g}"), self.low), self.high)


@dataclass(frozen=True)
class Trial:
    """A finished trial: its number (from 1), the searched keys' values, its best epoch's scores, its folder."""

    number: int
    values: dict[str, float | int]
    fitness: float
    ap: float | None
    ap50: float | None
    run_dir: Path


# ---------------------------------------------------------------------------------------------- the space


def load_space(path: str | Path) -> list[Dimension]:
    """The searched keys of a space YAML (`key: [low, high]` or `[low, high, log]`), each checked against the train
    key's type and bounds; DetectorError naming the file, line and key otherwise."""
    data, lines = load_yaml(path)
    if not isinstance(data, dict) or not data:
        raise DetectorError(f"{path}: expected a mapping of train key: [low, high] or [low, high, log]")
    return [_dimension(str(key), value, f"{path}:{lines.get(str(key), 1)}") for key, value in data.items()]


def _dimension(key: str, value: Any, where: str) -> Dimension:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if key not in fields:
        raise DetectorError(f"{where}: unknown train key '{key}'{did_you_mean(key, fields)}")
    integer = _numeric_kind(fields[key], where)
    if not isinstance(value, list) or len(value) not in (2, 3) or (len(value) == 3 and value[2] != "log"):
        raise DetectorError(f"{where}: '{key}' must be [low, high] or [low, high, log], got {value!r}")
    low, high = value[:2]
    for end in (low, high):
        if isinstance(end, bool) or not isinstance(end, (int, float)) or not math.isfinite(end):
            raise DetectorError(f"{where}: '{key}' range ends must be finite numbers, got {end!r}")
        if integer and not float(end).is_integer():
            raise DetectorError(f"{where}: '{key}' takes integers, got {end!r}")
    if not low < high:
        raise DetectorError(f"{where}: '{key}' range must have low < high, got [{low}, {high}]")
    log = len(value) == 3
    if log and low <= 0:
        raise DetectorError(f"{where}: '{key}' on a log scale needs low > 0, got {low}")
    bounds = fields[key].metadata.get("bounds")
    if bounds is not None and not (bounds.accepts(low) and bounds.accepts(high)):
        raise DetectorError(f"{where}: '{key}' range [{low}, {high}] leaves the key's own bounds ({bounds.rule()})")
    return Dimension(key, float(low), float(high), log=log, integer=integer)


def _numeric_kind(field: dataclasses.Field, where: str) -> bool:
    """True for an integer key, False for a float one; DetectorError for a key tune cannot search."""
    key = field.name
    if key in NOT_SEARCHED:
        raise DetectorError(f"{where}: '{key}' is not searched: {NOT_SEARCHED[key]}")
    if key in run_only_keys(TrainConfig):
        raise DetectorError(f"{where}: '{key}' is not searched: it shapes how a run is carried out, not what it "
                            f"learns (set it with tune's keys or train=)")
    bounds = field.metadata.get("bounds")
    if bounds is not None and bounds.multiple_of is not None:
        raise DetectorError(f"{where}: '{key}' is not searched: it takes multiples of {bounds.multiple_of} only")
    hint = typing.get_type_hints(TrainConfig)[key]
    kinds = set(typing.get_args(hint)) - {type(None)} or {hint}  # `float | None` (box) searches as a float
    if kinds == {int}:
        return True
    if kinds == {float}:
        return False
    raise DetectorError(f"{where}: '{key}' is not searched: it is not a number")


# ---------------------------------------------------------------------------------------------- evolution


def start_values(base: TrainConfig, dims: list[Dimension]) -> dict[str, float | int]:
    """Trial 1's values: `base`'s, each clipped to its range (a key with no value yet starts at the range's middle)."""
    values = {}
    for d in dims:
        value = getattr(base, d.key)
        values[d.key] = d.from_unit(0.5 if value is None else d.to_unit(value))
    return values


def propose(trials: list[Trial], dims: list[Dimension], sigma: float, seed: int, number: int) -> dict[str, float | int]:
    """The values of trial `number`: a mutation (drawn from (seed, number)) of the fitness-weighted mean of the best
    `PARENTS` of `trials`, in each key's [0, 1] range (see the module docstring)."""
    best = sorted(trials, key=lambda t: t.fitness, reverse=True)[:PARENTS]
    fitness = np.array([t.fitness for t in best])
    weights = fitness - fitness.min() + 1e-6
    units = np.array([[d.to_unit(t.values[d.key]) for d in dims] for t in best])
    parent = weights @ units / weights.sum()
    rng = np.random.default_rng([seed, number])
    moves = rng.random(len(dims)) < MOVE_PROBABILITY
    if not moves.any():
        moves[rng.integers(len(dims))] = True
    child = np.clip(parent + moves * sigma * rng.standard_normal(len(dims)), 0.0, 1.0)
    return {d.key: d.from_unit(u) for d, u in zip(dims, child)}


# ---------------------------------------------------------------------------------------------- the command


def run_tune(opts: TuneOptions) -> Path:
    """Train `opts.iterations` trials (skipping finished ones, resuming an interrupted one), rewriting the reports
    after each; print the best trials and return the tune folder. Under torchrun every rank runs every trial in one
    process group, and rank 0 alone writes the reports and prints."""
    from detector.runtime.device import select_device
    from detector.runtime.distributed import shared_process_group

    dims = load_space(opts.space or DEFAULT_SPACE)
    root = Path(opts.project) / opts.name
    extra = _extra_train_keys(opts, dims)
    base = load_train_config({**_own_settings(opts, 1, root), **extra})  # every key checked before any training
    searched = [d.key for d in dims if d.key in given_keys(base)]  # train= pairs were refused above: a cfg file's
    if searched:
        raise DetectorError(f"tune: the train=cfg= file sets '{searched[0]}', which the space searches (remove it "
                            "from one of them)")
    fixed = fixed_keys(base, dims, opts)  # typed, for the cfg file
    warn_without_mosaic(base, dims)
    trials: list[Trial] = []
    with shared_process_group(select_device(opts.device)) as job:
        for number in range(1, opts.iterations + 1):
            values = start_values(base, dims) if number == 1 else propose(trials, dims, opts.sigma, opts.seed, number)
            cfg = load_train_config({**_own_settings(opts, number, root), **extra, **values})
            trial, trained = run_trial(cfg, number, values, f"tune [{number}/{opts.iterations}]", main=job.is_main)
            trials.append(trial)
            if job.is_main and (trained or number == opts.iterations):  # a re-run refused later leaves them as they were
                write_reports(root, trials, dims, opts, fixed)
    if job.is_main:
        ranked = sorted(trials, key=lambda t: t.fitness, reverse=True)
        print(format_table([*RESULT_COLUMNS, *(d.key for d in dims)], [_row(t, dims) for t in ranked[:10]], floatfmt=".4g"))
        print(f"tune: {root / 'tune_results.csv'}; best: trial {ranked[0].number}, {root / 'best_hyperparameters.yaml'}")
    return root


def run_trial(cfg: TrainConfig, number: int, values: dict[str, float | int], label: str, *, main: bool) -> tuple[Trial, bool]:
    """(the trial, whether it trained now): trained, resumed or skipped as finished; a run the trainer stops for
    non-finite losses scores 0, and is marked so (`DIVERGED_MARKER`) that a re-run of the search skips it as it
    skips a finished one (trained again, it could score otherwise and breed the later trials differently). The
    main process drops a finished trial's last.pt (only a resume would read it)."""
    run_dir = Path(cfg.project) / cfg.name
    marker = run_dir / DIVERGED_MARKER
    if marker.exists():
        check_same_settings(run_dir, cfg, command="tune", free_keys=neutral_keys(TrainConfig))
        LOGGER.info("%s: diverged earlier (%s), skipped; the trial scores fitness 0", label, marker)
        return Trial(number, values, 0.0, None, None, run_dir), False
    try:
        trained = train_or_skip(run_dir, cfg, label, command="tune", free_keys=neutral_keys(TrainConfig))
    except TrainingDiverged as err:  # a recipe that diverges is a bad trial, not the end of the search
        LOGGER.warning("%s: %s; the trial scores fitness 0", label, err)
        if main:
            marker.write_text(f"{err}\n")
        return Trial(number, values, 0.0, None, None, run_dir), True
    if main:
        (run_dir / "weights" / "last.pt").unlink(missing_ok=True)
    return read_trial(run_dir, number, values), trained


def warn_without_mosaic(base: TrainConfig, dims: list[Dimension]) -> bool:
    """Warn (and return True) when the trials would never see mosaic: the trainer turns it off for the last
    close_mosaic epochs, all of a short trial's at the default 10, while mosaic is searched or on."""
    if base.close_mosaic < base.epochs or not (base.mosaic > 0 or any(d.key == "mosaic" for d in dims)):
        return False
    fix = "0" if base.epochs <= 2 else f"<fewer than {base.epochs}> (e.g. 2)"  # 2: mosaic in all but the last 2
    LOGGER.warning("tune: trials of %d epochs with close_mosaic=%d train without mosaic, unlike the long run they "
                   "stand for; pass train=close_mosaic=%s", base.epochs, base.close_mosaic, fix)
    return True


def _own_settings(opts: TuneOptions, number: int, root: Path) -> dict[str, Any]:
    """The train keys tune sets for trial `number` (a train= pair may not set them)."""
    return {
        "model": opts.model, "data": opts.data, "epochs": opts.epochs, "imgsz": opts.imgsz, "batch": opts.batch,
        "workers": opts.workers, "seed": opts.seed, "device": opts.device, "project": str(root / "trials"),
        "name": f"trial{number}", "exist_ok": True, "resume": False,  # `train_or_skip` resumes an interrupted trial
    }


def _extra_train_keys(opts: TuneOptions, dims: list[Dimension]) -> dict[str, str]:
    """The train= pairs, none of them a key tune sets itself or searches."""
    extra = parse_overrides(opts.train)
    own = _own_settings(opts, 1, Path(opts.project))
    for key in extra:
        if key in own:
            raise DetectorError(f"tune: train= cannot set '{key}' (use the tune key of that name)")
        if any(d.key == key for d in dims):
            raise DetectorError(f"tune: train= cannot set '{key}': the space searches it (remove it from the space to fix it)")
    return extra


def fixed_keys(base: TrainConfig, dims: list[Dimension], opts: TuneOptions) -> dict[str, Any]:
    """The keys every trial fixes, as `base` typed them: the train= pairs and the keys of a train=cfg= file, less
    tune's own, the searched and the neutral ones (in TrainConfig's order)."""
    skip = set(_own_settings(opts, 1, Path(opts.project))) | neutral_keys(TrainConfig) | {d.key for d in dims}
    given = given_keys(base)
    return {f.name: getattr(base, f.name) for f in dataclasses.fields(TrainConfig) if f.name in given and f.name not in skip}


def read_trial(run_dir: Path, number: int, values: dict[str, float | int]) -> Trial:
    """A finished trial's scores from its results.csv (its best epoch; fitness 0 when none was evaluated)."""
    from detector.viz.logger import read_results

    best = best_row(read_results(run_dir / "results.csv")) or {}

    def score(key: str) -> float | None:
        value = best.get(key, "")
        return float(value) if value != "" else None

    return Trial(number, values, score("fitness") or 0.0, score("metrics/AP"), score("metrics/AP50"), run_dir)


# ---------------------------------------------------------------------------------------------- the reports


def write_reports(root: Path, trials: list[Trial], dims: list[Dimension], opts: TuneOptions, fixed: dict[str, Any]) -> None:
    """tune_results.csv, best_hyperparameters.yaml (the best trial's keys and the train= keys `fixed`, not neutral
    ones; `TRIAL_ONLY` ones named in its header only) and tune.png in `root` from the trials so far."""
    from detector.viz.plots import plot_tune

    root.mkdir(parents=True, exist_ok=True)
    with (root / "tune_results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*RESULT_COLUMNS, *(d.key for d in dims), "run"])
        writer.writerows([*_row(t, dims), t.run_dir.relative_to(root).as_posix()] for t in trials)
    best = max(trials, key=lambda t: t.fitness)
    header = (f"# detector tune: the best of {_count(len(trials), 'trial')}, trial {best.number} ({best.run_dir}), "
              f"fitness {best.fitness:.4f} (0.1 AP50 + 0.9 AP50:95) after {_count(opts.epochs, 'epoch')} at imgsz "
              f"{opts.imgsz} on {opts.data}\n"
              f"# train with it: detector train cfg=<this file> model={opts.model} data={opts.data}\n")
    trial_only = [f"{k}={v}" for k, v in fixed.items() if k in TRIAL_ONLY]
    if trial_only:
        header += f"# the trials trained with {', '.join(trial_only)} (left out below: it shapes the short trials)\n"
    recipe = {k: v for k, v in fixed.items() if k not in TRIAL_ONLY}
    body = yaml.safe_dump({**best.values, **recipe}, sort_keys=False)
    (root / "best_hyperparameters.yaml").write_text(header + body)
    plot_tune([t.values for t in trials], [t.fitness for t in trials], [d.key for d in dims], root / "tune.png")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _row(trial: Trial, dims: list[Dimension]) -> list[Any]:
    return [trial.number, round(trial.fitness, 5), trial.ap, trial.ap50, *(trial.values[d.key] for d in dims)]

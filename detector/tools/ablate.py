"""`detector ablate`: one training run per attention variant and seed, everything else equal, then one comparison table.

Each variant (an attention, crossed with the insertion points when `attention_at` is given; `none` once) trains
through the ordinary trainer under every seed of `seeds` (default: just `seed`), with the same schedule and
augmentation; within a seed every variant gets the same seed, so the same initialisation draw and data order
(the train loader orders and augments from (seed, epoch)). One seed trains into <project>/<name>/<variant>/ as
before seeds= existed; several train into <project>/<name>/<variant>/seed<k>/, except that a seed whose run
already sits in <variant>/ itself (an earlier single-seed ablation of the same name) is read from there instead of
being trained again. A run that already finished is skipped and an interrupted one resumed from its last.pt, so
re-running the same command continues a half-finished ablation.

The reports are built from the run folders: ablation_runs.csv has one row per variant x seed (params and GFLOPs
from best.pt, AP figures from the best epoch's row of results.csv, train images/s from the median epoch time,
inference ms/image from the last evaluation's metrics.json); ablation.csv, ablation.md and ablation.png (a bar
chart of AP50:95 with std error bars) have one row per variant: the mean over seeds, the sample standard
deviation of AP50, AP50:95 and APs, and the AP50:95 difference to the baseline variant (`none` when it is among
the variants, else the first) paired by seed, with a 95% Student-t interval; a difference whose interval
contains 0 is marked "within noise".
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detector.config import TrainConfig, load_train_config, neutral_keys, parse_overrides
from detector.data.spec import load_data_spec
from detector.errors import DetectorError
from detector.models.catalog import resolve_model_path
from detector.options import AblateOptions
from detector.tools.runs import best_row, saved_args, train_or_skip

LOGGER = logging.getLogger(__name__)

# Keys a run folder may differ in from the current command and still belong to the same ablation: the neutral
# ones (paths, devices, workers, what is saved) and epochs, since raising epochs= continues the runs from last.pt.
FREE_KEYS = neutral_keys(TrainConfig) | {"epochs"}
FORMATS = {"GFLOPs": ".3f", "train img/s": ".1f", "infer ms/img": ".1f"}  # other floats: AP figures, .4f
SPREAD_KEYS = ("AP50", "AP50:95", "APs")  # reported as mean ± sample std over the seeds
MEAN_KEYS = ("train img/s", "infer ms/img", "APm", "APl")  # reported as the mean over the seeds
PAIRED_KEY = "AP50:95"  # the figure compared with the baseline, seed by seed
RUN_COLUMNS = ("attention", "attention_at", "seed", "run", "params", "GFLOPs", "train img/s", "infer ms/img", "AP50", "AP50:95", "APs", "APm", "APl", "best epoch")
COLUMNS = (
    "attention", "attention_at", "params", "GFLOPs", "train img/s", "infer ms/img", "AP50", "AP50 std", "AP50:95", "AP50:95 std",
    "APs", "APs std", "APm", "APl", "n", "best epoch", "dAP50:95", "dAP50:95 ci95", "vs baseline",
)
MD_COLUMNS = ("attention", "attention_at", "params", "GFLOPs", "train img/s", "infer ms/img", "AP50", "AP50:95", "APs", "APm", "APl", "n", "best epoch", "AP50:95 vs baseline")


@dataclass(frozen=True)
class Variant:
    attention: str
    attention_at: str  # '' when not crossed

    @property
    def name(self) -> str:
        return f"{self.attention}-{self.attention_at}" if self.attention_at else self.attention


def variants(attentions: list[str], places: list[str]) -> list[Variant]:
    """The cross product, in the given order; `none` uncrossed (its insertion point changes nothing). The options
    refuse a repeated attention or place, so no variant comes twice."""
    return [Variant(attention, place) for attention in attentions
            for place in ((places or [""]) if attention != "none" else [""])]


def seed_list(opts: AblateOptions) -> list[int]:
    """`seeds` (no seed twice: the options' check), or the single `seed` when none are listed."""
    return list(opts.seeds) or [opts.seed]


def run_folder(root: Path, v: Variant, seed: int, *, several_seeds: bool) -> Path:
    """Where the run of `v` under `seed` lives: <variant>/ itself when it already holds that seed's run (a
    single-seed ablation, the layout before seeds= existed), <variant>/seed<k>/ when several seeds are trained or
    <variant>/ holds another seed's run, else <variant>/ (one seed, the old layout, so old ablations resume)."""
    flat = root / v.name
    nested = flat / f"seed{seed}"
    saved = _saved_seed(flat)
    if saved == seed:
        return flat
    if several_seeds or saved is not None or nested.exists():
        return nested
    return flat


def _saved_seed(run_dir: Path) -> int | None:
    """The seed an earlier run in `run_dir` was trained with (None: no run there)."""
    seed = (saved_args(run_dir) or {}).get("seed")
    return int(seed) if seed is not None else None


def run_ablation(opts: AblateOptions) -> Path:
    """Train every variant under every seed (skipping finished runs), write ablation_runs.csv, ablation.csv,
    ablation.md and ablation.png in <project>/<name>, print the table; returns the ablation folder. Under torchrun
    every rank trains every run in one process group, and rank 0 alone writes the reports and prints."""
    from detector.runtime.device import select_device
    from detector.runtime.distributed import shared_process_group

    if not opts.attentions:
        raise DetectorError("ablate: attentions= lists no variant")
    seeds = seed_list(opts)
    root = Path(opts.project) / opts.name
    extra = _extra_train_keys(opts.train, opts)
    todo = variants(opts.attentions, opts.attention_at)
    runs = [(v, s, run_folder(root, v, s, several_seeds=len(seeds) > 1)) for v in todo for s in seeds]
    configs = [_train_config(opts, v, s, folder, extra) for v, s, folder in runs]
    for v in todo:
        _check_variant(opts.model, v)
    with shared_process_group(select_device(opts.device)) as job:  # one group for every run of a torchrun job
        for i, ((v, s, folder), cfg) in enumerate(zip(runs, configs), 1):
            label = v.name if len(seeds) == 1 else f"{v.name} seed {s}"
            train_or_skip(folder, cfg, f"ablate [{i}/{len(runs)}] {label}", command="ablate", free_keys=FREE_KEYS)
    if not job.is_main:  # rank 0 writes the reports
        return root
    from detector.data.coco import CocoDataset

    fraction = configs[0].fraction  # every run's: a train= key
    train_images = len(CocoDataset(load_data_spec(opts.data).train, fraction=fraction))  # the scan cache makes this cheap
    rows = [
        {**collect_row(folder, v, imgsz=opts.imgsz, train_images=train_images), "seed": s, "run": folder.relative_to(root).as_posix()}
        for v, s, folder in runs
    ]
    print(write_reports(root, rows))
    print(f"ablation: {root / 'ablation.md'}")
    return root


def _extra_train_keys(pairs: list[str], opts: AblateOptions) -> dict[str, str]:
    """The train= pairs, none of them a key the ablation sets itself (those of `_own_settings`)."""
    extra = parse_overrides(pairs)
    own = _own_settings(opts, Variant("none", ""), opts.seed, Path(opts.project) / opts.name)
    taken = [k for k in extra if k in own]
    if taken:
        raise DetectorError(f"ablate: train= cannot set '{taken[0]}' (use the ablate key of that name)")
    return extra


def _own_settings(opts: AblateOptions, v: Variant, seed: int, run_dir: Path) -> dict[str, Any]:
    """The train keys the ablation sets for one run (a train= pair may not set them)."""
    return {
        "model": opts.model, "data": opts.data, "epochs": opts.epochs, "imgsz": opts.imgsz, "batch": opts.batch,
        "workers": opts.workers, "seed": seed, "device": opts.device, "attention": v.attention,
        "attention_at": v.attention_at, "project": str(run_dir.parent), "name": run_dir.name, "exist_ok": True,
        "resume": False,  # `train_or_skip` points it at last.pt to continue an interrupted run
    }


def _train_config(opts: AblateOptions, v: Variant, seed: int, run_dir: Path, extra: dict[str, str]) -> TrainConfig:
    return load_train_config({**_own_settings(opts, v, seed, run_dir), **extra})


def _check_variant(model: str, v: Variant) -> None:
    """Build the variant before anything trains: the builder refuses an attention or place that reaches no row of
    the model (e.g. attention=se on yolo-c2f-n), so a variant that would change nothing stops the whole ablation
    up front instead of after the other variants' runs."""
    from detector.models.builder import build_model

    build_model(resolve_model_path(model), attention=v.attention, attention_at=v.attention_at or None)


# ---------------------------------------------------------------------------------------------- the table


def collect_row(run_dir: Path, v: Variant, *, imgsz: int, train_images: int) -> dict[str, Any]:
    """One table row from a finished run folder; `train_images` is the training split's size."""
    from detector.api import Detector
    from detector.viz.logger import read_results
    from detector.models.info import count_flops

    model = Detector.from_checkpoint(run_dir / "weights" / "best.pt", device="cpu").model
    rows = read_results(run_dir / "results.csv")
    best = best_row(rows) or {}
    epoch_times = [float(r["epoch_time_s"]) for r in rows if r.get("epoch_time_s")]
    metrics_path = run_dir / "metrics.json"
    speed = json.loads(metrics_path.read_text()).get("speed_ms", {}) if metrics_path.exists() else {}

    def metric(key: str) -> float | None:
        value = best.get(f"metrics/{key}", "")
        return float(value) if value != "" and float(value) >= 0 else None  # COCOeval's -1: no such objects

    return {
        "attention": v.attention,
        "attention_at": v.attention_at or "-",
        "params": sum(p.numel() for p in model.parameters()),
        "GFLOPs": round(count_flops(model, imgsz), 3),
        "train img/s": round(train_images / statistics.median(epoch_times), 1) if epoch_times else None,
        "infer ms/img": round(speed["inference"], 2) if "inference" in speed else None,
        "AP50": metric("AP50"),
        "AP50:95": metric("AP"),
        "APs": metric("APs"),
        "APm": metric("APm"),
        "APl": metric("APl"),
        "best epoch": int(best["epoch"]) + 1 if best else None,
    }


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1) of the figures present; std None below two (no spread to see)."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else None


def t975(df: int) -> float:
    """The two-sided 95% Student-t quantile for `df` degrees of freedom (scipy's, exact at any df)."""
    from scipy.stats import t as student_t

    if df < 1:
        raise ValueError("t975: needs at least one degree of freedom")
    return float(student_t.ppf(0.975, df))


def paired_interval(diffs: list[float]) -> tuple[float, float | None]:
    """Mean of the per-seed differences and the half-width t(0.975, n-1) * sd / sqrt(n) of its 95% interval
    (None with one seed: one difference has no spread to judge it by)."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, None
    return mean, t975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))


def noise_verdict(mean: float, half_width: float | None) -> str:
    """'within noise' when the 95% interval contains 0, else which side of 0 it lies on."""
    if half_width is None:
        return "one seed: no interval"
    if abs(mean) <= half_width:
        return "within noise"
    return "above noise" if mean > 0 else "below noise"


def baseline_key(keys: list[tuple[str, str]]) -> tuple[str, str]:
    """The variant every other one is compared with: `none` when it was trained, else the first variant."""
    return next((k for k in keys if k[0] == "none"), keys[0])


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant (in first-seen order) from the per-seed rows of `collect_row` (plus their "seed")."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["attention"], run["attention_at"]), []).append(run)
    base = baseline_key(list(groups))
    return [_summary_row(group, groups[base], is_baseline=key == base) for key, group in groups.items()]


def _summary_row(runs: list[dict[str, Any]], baseline: list[dict[str, Any]], *, is_baseline: bool) -> dict[str, Any]:
    """Params and GFLOPs (the same under every seed), means, spreads and the paired difference to the baseline."""
    first = runs[0]
    row: dict[str, Any] = {k: first[k] for k in ("attention", "attention_at", "params", "GFLOPs")}
    for key in MEAN_KEYS:
        mean, _ = mean_std([r[key] for r in runs])
        row[key] = None if mean is None else round(mean, {"train img/s": 1, "infer ms/img": 2}.get(key, 6))
    for key in SPREAD_KEYS:
        mean, std = mean_std([r[key] for r in runs])
        row[key], row[f"{key} std"] = (None if x is None else round(x, 6) for x in (mean, std))
    row["n"] = sum(r["AP50:95"] is not None for r in runs)  # the seeds the headline figure and its spread come from
    row["best epoch"] = "/".join(str(r["best epoch"]) for r in runs if r["best epoch"] is not None) or None
    row.update(_versus_baseline(runs, baseline, is_baseline=is_baseline))
    return row


def _versus_baseline(runs: list[dict[str, Any]], baseline: list[dict[str, Any]], *, is_baseline: bool) -> dict[str, Any]:
    """The AP50:95 difference to the baseline paired by seed (same seed, same data order), its 95% half-width
    and the verdict; seeds where either run has no AP50:95 drop out of the pairing."""
    if is_baseline:
        return {"dAP50:95": None, "dAP50:95 ci95": None, "vs baseline": "baseline"}
    base_by_seed = {r["seed"]: r[PAIRED_KEY] for r in baseline}
    diffs = [r[PAIRED_KEY] - base_by_seed[r["seed"]] for r in runs if r[PAIRED_KEY] is not None and base_by_seed.get(r["seed"]) is not None]
    if not diffs:
        return {"dAP50:95": None, "dAP50:95 ci95": None, "vs baseline": "no paired seed"}
    mean, half = paired_interval(diffs)
    return {"dAP50:95": round(mean, 6), "dAP50:95 ci95": None if half is None else round(half, 6), "vs baseline": noise_verdict(mean, half)}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The per-variant rows of `summarize` as a markdown table: AP50, AP50:95 and APs as mean ± std when there
    are several seeds, the paired difference as mean ± 95% half-width; '-' where a figure is missing."""

    def cell(column: str, row: dict[str, Any]) -> str:
        if column == "AP50:95 vs baseline":
            return _difference_cell(row)
        value = row[column]
        if value is None:
            return "-"
        if column in SPREAD_KEYS and row.get(f"{column} std") is not None:
            return f"{value:.4f} ± {row[f'{column} std']:.4f}"
        if isinstance(value, float):
            return format(value, FORMATS.get(column, ".4f"))
        return f"{value:,}" if isinstance(value, int) else str(value)

    align = {"attention": "---", "attention_at": "---", "AP50:95 vs baseline": "---"}
    lines = ["| " + " | ".join(MD_COLUMNS) + " |", "|" + "|".join(align.get(c, "---:") for c in MD_COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(c, r) for c in MD_COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def _difference_cell(row: dict[str, Any]) -> str:
    """'baseline', '+0.0200 ± 0.0248 (within noise)', or '+0.0100 (one seed: no interval)'."""
    if row["dAP50:95"] is None:
        return row["vs baseline"]
    spread = "" if row["dAP50:95 ci95"] is None else f" ± {row['dAP50:95 ci95']:.4f}"
    return f"{row['dAP50:95']:+.4f}{spread} ({row['vs baseline']})"


def write_reports(root: Path, runs: list[dict[str, Any]]) -> str:
    """ablation_runs.csv (one row per variant x seed), ablation.csv and ablation.md (one row per variant) and
    ablation.png (AP50:95 per variant, std error bars) in `root`; returns the markdown table."""
    root.mkdir(parents=True, exist_ok=True)
    rows = summarize(runs)
    _write_csv(root / "ablation_runs.csv", RUN_COLUMNS, runs)
    _write_csv(root / "ablation.csv", COLUMNS, rows)
    table = markdown_table(rows)
    (root / "ablation.md").write_text(table + "\n")
    _bar_chart(rows, root / "ablation.png")
    return table


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: ("" if r.get(k) is None else r[k]) for k in columns} for r in rows)


def _bar_chart(rows: list[dict[str, Any]], path: Path) -> None:
    """Mean AP50:95 per variant; the error bars are the std over the seeds (none with one seed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [r["attention"] + ("" if r["attention_at"] == "-" else f"\n{r['attention_at']}") for r in rows]
    values = [r["AP50:95"] or 0.0 for r in rows]
    errors = [r.get("AP50:95 std") or 0.0 for r in rows]
    seeds = max(r.get("n", 1) for r in rows)
    fig = Figure(figsize=(max(4.0, 0.9 * len(rows) + 1.5), 4.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(rows)), values, yerr=errors if seeds > 1 else None, capsize=4, color="tab:blue", ecolor="black")
    for i, (value, error) in enumerate(zip(values, errors)):  # the mean, above its error bar
        ax.annotate(f"{value:.3f}", (i, value + error), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylim(0, max(max(v + e for v, e in zip(values, errors)) * 1.15, 0.05))
    ax.set_ylabel("AP50:95 (best epoch)" + (f", mean ± std of {seeds} seeds" if seeds > 1 else ""))
    ax.set_title("attention ablation")
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path)

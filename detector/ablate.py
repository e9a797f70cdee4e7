"""`detector ablate`: one training run per attention variant, everything else equal, then one comparison table.

Each variant (an attention, crossed with the insertion points when `attention_at` is given; `none` once) trains
through the ordinary trainer into <project>/<name>/<attention>[-<at>]/ with the same seed, data order, schedule and
augmentation. A run that already finished is skipped and an interrupted one resumed from its last.pt, so
re-running the same command continues a half-finished ablation. The table (ablation.csv, ablation.md and a bar
chart of AP50:95) is built from the run folders: params and GFLOPs from best.pt, AP figures from the best epoch's
row of results.csv, train images/s from the median epoch time, inference ms/image from the last evaluation's
metrics.json.
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from detector.config import TrainConfig, load_data_spec, load_train_config, parse_overrides, resolve_model_path
from detector.errors import DetectorError
from detector.options import AblateOptions

LOGGER = logging.getLogger(__name__)

# TrainConfig keys the ablation sets itself (a `train=` pair may not change them)
# keys a run folder may differ in from the current command and still belong to the same ablation
FREE_KEYS = {"resume", "project", "name", "exist_ok", "workers", "device", "epochs", "plots"}
OWN_KEYS = ("model", "data", "attention", "attention_at", "epochs", "imgsz", "batch", "workers", "seed", "device", "project", "name", "exist_ok", "resume")
FORMATS = {"GFLOPs": ".3f", "train img/s": ".1f", "infer ms/img": ".1f"}  # other floats: AP figures, .4f
COLUMNS = ("attention", "attention_at", "params", "GFLOPs", "train img/s", "infer ms/img", "AP50", "AP50:95", "APs", "APm", "APl", "best epoch")


@dataclass(frozen=True)
class Variant:
    attention: str
    attention_at: str  # '' when not crossed

    @property
    def name(self) -> str:
        return f"{self.attention}-{self.attention_at}" if self.attention_at else self.attention


def variants(attentions: list[str], places: list[str]) -> list[Variant]:
    """The cross product, in the given order; `none` once (its insertion point changes nothing)."""
    out: list[Variant] = []
    for attention in attentions:
        for place in (places or [""]) if attention != "none" else [""]:
            if Variant(attention, place) not in out:
                out.append(Variant(attention, place))
    return out


def run_ablation(opts: AblateOptions) -> Path:
    """Train every variant (skipping finished runs), write ablation.csv / ablation.md / ablation.png in
    <project>/<name>, print the table; returns the ablation folder."""
    if not opts.attentions:
        raise DetectorError("ablate: attentions= lists no variant")
    root = Path(opts.project) / opts.name
    extra = _extra_train_keys(opts.train)
    todo = variants(opts.attentions, opts.attention_at)
    configs = {v: _train_config(opts, v, root, extra) for v in todo}
    for v in todo:
        _check_variant(opts.model, v)
    from detector.engine.trainer import train

    for i, v in enumerate(todo, 1):
        run_dir = root / v.name
        cfg = configs[v]
        _check_same_settings(run_dir, cfg)
        if _finished(run_dir, cfg):
            LOGGER.info("ablate [%d/%d] %s: finished earlier, skipped", i, len(todo), v.name)
            continue
        last = run_dir / "weights" / "last.pt"
        if last.exists():
            cfg = load_train_config({**_as_overrides(cfg), "resume": str(last)})
        LOGGER.info("ablate [%d/%d] %s: %s", i, len(todo), v.name, "resuming" if last.exists() else "training")
        train(cfg)
    from detector.data.coco import CocoDataset

    train_images = len(CocoDataset(load_data_spec(opts.data).train))  # the trainer's scan cache makes this cheap
    rows = [collect_row(root / v.name, v, imgsz=opts.imgsz, train_images=train_images) for v in todo]
    write_reports(root, rows)
    print(markdown_table(rows))
    print(f"ablation: {root / 'ablation.md'}")
    return root


def _extra_train_keys(pairs: list[str]) -> dict[str, str]:
    extra = parse_overrides(pairs)
    taken = [k for k in extra if k in OWN_KEYS]
    if taken:
        raise DetectorError(f"ablate: train= cannot set '{taken[0]}' (use the ablate key of that name)")
    return extra


def _train_config(opts: AblateOptions, v: Variant, root: Path, extra: dict[str, str]) -> TrainConfig:
    values = {
        "model": opts.model, "data": opts.data, "epochs": opts.epochs, "imgsz": opts.imgsz, "batch": opts.batch,
        "workers": opts.workers, "seed": opts.seed, "device": opts.device, "attention": v.attention,
        "attention_at": v.attention_at, "project": str(root), "name": v.name, "exist_ok": True, **extra,
    }
    return load_train_config(values)


def _as_overrides(cfg: TrainConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in TrainConfig.__dataclass_fields__}


def _check_variant(model: str, v: Variant) -> None:
    """Build the variant before anything trains: the builder refuses an attention or place that reaches no row of
    the model (e.g. attention=se on yolo-c2f-n), so a variant that would change nothing stops the whole ablation
    up front instead of after the other variants' runs."""
    from detector.models.builder import build_model

    build_model(resolve_model_path(model), attention=v.attention, attention_at=v.attention_at or None)


def _check_same_settings(run_dir: Path, cfg: TrainConfig) -> None:
    """A run folder left by an earlier invocation must have used this invocation's settings (else its row would
    compare unequal runs)."""
    import yaml

    args = run_dir / "args.yaml"
    if not args.exists():
        return
    saved = yaml.safe_load(args.read_text()) or {}
    wanted = asdict(cfg)
    changed = [k for k in wanted if k not in FREE_KEYS and k in saved and saved[k] != wanted[k]]
    if changed:
        diffs = ", ".join(f"{k} {saved[k]!r} -> {wanted[k]!r}" for k in changed[:3])
        raise DetectorError(f"ablate: {run_dir} was trained with other settings ({diffs}); use another name= for a new ablation")


def _finished(run_dir: Path, cfg: TrainConfig) -> bool:
    """best.pt exists and results.csv reaches the last epoch (or the early stop that patience would trigger)."""
    from detector.engine.logger import read_results

    rows = read_results(run_dir / "results.csv")
    if not rows or not (run_dir / "weights" / "best.pt").exists():
        return False
    last = int(rows[-1]["epoch"])
    best = _best_row(rows)
    stopped = cfg.patience > 0 and best is not None and last - int(best["epoch"]) >= cfg.patience
    return last + 1 >= cfg.epochs or stopped


def _best_row(rows: list[dict[str, str]]) -> dict[str, str] | None:
    scored = [r for r in rows if r.get("fitness")]
    return max(scored, key=lambda r: float(r["fitness"])) if scored else None


# ---------------------------------------------------------------------------------------------- the table


def collect_row(run_dir: Path, v: Variant, *, imgsz: int, train_images: int) -> dict[str, Any]:
    """One table row from a finished run folder; `train_images` is the training split's size."""
    from detector.engine.checkpoint import load_checkpoint, model_from_checkpoint
    from detector.engine.logger import read_results
    from detector.models.info import count_flops

    model = model_from_checkpoint(load_checkpoint(run_dir / "weights" / "best.pt"), source=str(run_dir / "weights" / "best.pt"))
    rows = read_results(run_dir / "results.csv")
    best = _best_row(rows) or {}
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


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table ('-' where a figure is missing, e.g. APl without large objects)."""

    def cell(column: str, value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return format(value, FORMATS.get(column, ".4f"))
        return f"{value:,}" if isinstance(value, int) else str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" if c in ("attention", "attention_at") else "---:" for c in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(c, r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def write_reports(root: Path, rows: list[dict[str, Any]]) -> None:
    """ablation.csv, ablation.md (the markdown table) and ablation.png (AP50:95 per variant) in `root`."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / "ablation.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if r[k] is None else r[k]) for k in COLUMNS} for r in rows)
    (root / "ablation.md").write_text(markdown_table(rows) + "\n")
    _bar_chart(rows, root / "ablation.png")


def _bar_chart(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [r["attention"] + ("" if r["attention_at"] == "-" else f"\n{r['attention_at']}") for r in rows]
    values = [r["AP50:95"] or 0.0 for r in rows]
    fig = Figure(figsize=(max(4.0, 0.9 * len(rows) + 1.5), 4.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.bar(range(len(rows)), values, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=8)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylim(0, max(max(values) * 1.15, 0.05))
    ax.set_ylabel("AP50:95 (best epoch)")
    ax.set_title("attention ablation")
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path)

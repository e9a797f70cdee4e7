"""What a training run writes besides weights: results.csv, TensorBoard events, the curves PNG.

Rank 0 only; the trainer never creates this object on other ranks.
"""

from __future__ import annotations

import contextlib
import csv
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from detector.errors import DetectorError, write_failed

if TYPE_CHECKING:
    from detector.viz.event_file import EventFile

COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
LOSS_KEYS = ("box_loss", "obj_loss", "cls_loss")


class RunLogger:
    """One row per epoch in results.csv (appended, so a resumed run continues the file) and TensorBoard scalars."""

    columns = ("epoch", *(f"train/{k}" for k in LOSS_KEYS), "lr", *(f"metrics/{k}" for k in COCO_KEYS), "fitness", "epoch_time_s", "nonfinite_steps", "unreadable_images",
               "val_time_s")  # new columns go last: a resumed run's older header is then a prefix (truncate_after)

    def __init__(self, run_dir: Path, *, tensorboard: bool = True) -> None:
        self.run_dir = run_dir
        self.csv_path = run_dir / "results.csv"
        self.writer: EventFile | None = None
        self._failed = False  # a write failed: `close` (after the error) must not raise it again
        if tensorboard:
            from detector.viz import event_file  # (imports tensorboard: only when it is used)

            with self._writing():
                self.writer = event_file.EventFile(run_dir)

    @contextlib.contextmanager
    def _writing(self, path: Path | None = None) -> Iterator[None]:
        """An OSError (disk full, quota) while writing `path` (None: the events file, named only on an error)
        becomes the one-line DetectorError naming it."""
        try:
            yield
        except OSError as err:
            self._failed = True
            raise write_failed(path or self._events_path(err), err) from err

    def _events_path(self, err: OSError) -> Path:
        """The TensorBoard events file (its name holds the time, host and pid), for errors: the open one, or the
        one that failed while being made."""
        if self.writer is not None:
            return self.writer.path
        return Path(err.filename) if err.filename else self.run_dir / "events.out.tfevents"

    def truncate_after(self, epoch: int) -> None:
        """On resume: drop rows of epochs after the checkpoint's (written before a kill, then redone). A header
        written by an older version with fewer columns is extended, so the rows appended now line up with it."""
        if not self.csv_path.exists():
            return
        with self.csv_path.open(newline="") as f:
            rows = list(csv.reader(f))
        if not rows:  # created, then killed before its first row was written: `epoch` starts it afresh
            return
        header = list(self.columns) if rows[0] == list(self.columns[: len(rows[0])]) else rows[0]
        kept = [header] + [r for r in rows[1:] if r and int(r[0]) <= epoch]
        tmp = self.csv_path.with_suffix(".csv.tmp")
        try:
            with self._writing(self.csv_path):
                with tmp.open("w", newline="") as f:
                    csv.writer(f).writerows(kept)
                tmp.replace(self.csv_path)
        finally:
            tmp.unlink(missing_ok=True)  # (gone after the replace; a half-written one after a failure)

    def step(self, global_step: int, losses: torch.Tensor, lr: float) -> None:
        """Per-iteration scalars (called at log intervals: `losses` is read on the host here)."""
        if self.writer is None:
            return
        with self._writing():
            for key, value in zip(LOSS_KEYS, losses.tolist()):
                self.writer.add_scalar(f"train/{key}", value, global_step)
            self.writer.add_scalar("train/lr", lr, global_step)

    def epoch(self, epoch: int, losses: torch.Tensor, lr: float, metrics: Mapping[str, float] | None, fitness: float | None,
              epoch_time_s: float, nonfinite_steps: int, unreadable_images: int = 0, val_time_s: float = 0.0) -> None:
        """One results.csv row: `epoch_time_s` is the training alone, `val_time_s` the validation after it."""
        metrics = metrics or {}
        row = [epoch, *[round(v, 5) for v in losses.tolist()], f"{lr:.6g}"]
        row += [round(float(metrics[k]), 5) if k in metrics else "" for k in COCO_KEYS]
        # fitness unrounded: ablate and tune pick the best row by it, and must pick the trainer's best epoch
        row += ["" if fitness is None else float(fitness), round(epoch_time_s, 2), nonfinite_steps, unreadable_images,
                round(val_time_s, 2)]
        new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        with self._writing(self.csv_path), self.csv_path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(self.columns)
            writer.writerow(row)
        if self.writer is not None:
            self._epoch_scalars(epoch, losses, metrics, fitness)

    def _epoch_scalars(self, epoch: int, losses: torch.Tensor, metrics: Mapping[str, float], fitness: float | None) -> None:
        with self._writing():
            for key, value in zip(LOSS_KEYS, losses.tolist()):
                self.writer.add_scalar(f"epoch/{key}", value, epoch)
            for key in COCO_KEYS:
                if key in metrics:
                    self.writer.add_scalar(f"metrics/{key}", float(metrics[key]), epoch)
            if fitness is not None:
                self.writer.add_scalar("metrics/fitness", fitness, epoch)

    def images(self, tag: str, images_chw: torch.Tensor, step: int) -> None:
        """A grid of uint8 images (N, 3, H, W)."""
        if self.writer is None:
            return
        from torchvision.utils import make_grid

        with self._writing():
            self.writer.add_image(tag, make_grid(images_chw, nrow=int(math.ceil(math.sqrt(len(images_chw))))), step)

    def close(self) -> None:
        """Close the events file; after a failed write (already raised) the same failure is not raised again."""
        if self.writer is None:
            return
        failed = self._failed
        try:
            with self._writing():
                self.writer.close()
        except DetectorError:
            if not failed:
                raise


def read_results(csv_path: Path) -> list[dict[str, str]]:
    """The rows of a results.csv as dicts keyed by column ('' for a metric not evaluated that epoch); [] if absent."""
    if not csv_path.exists():
        return []
    with csv_path.open(newline="") as f:
        return list(csv.DictReader(f))


def plot_results(csv_path: Path, out_png: Path) -> None:
    """Training curves (losses, lr, AP50, AP) from results.csv, one panel each.

    Matplotlib's object API on the Agg canvas, as in `viz.plots`: no pyplot, no `matplotlib.use`, so training from
    a notebook leaves its backend alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_results(csv_path)
    if not rows:
        return
    epochs = [int(r["epoch"]) for r in rows]
    panels = [f"train/{k}" for k in LOSS_KEYS] + ["lr", "metrics/AP50", "metrics/AP"]
    fig = Figure(figsize=(12, 6), tight_layout=True)
    FigureCanvasAgg(fig)
    for ax, key in zip(fig.subplots(2, 3).ravel(), panels):
        points = [(e, float(r[key])) for e, r in zip(epochs, rows) if r.get(key) not in (None, "")]
        if points:
            ax.plot(*zip(*points), marker=".")
        ax.set_title(key)
        ax.set_xlabel("epoch")
    fig.savefig(out_png, dpi=100)

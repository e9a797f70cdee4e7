"""`detector bench track`: the tracker (`infer/tracker.py`) on simulated detections with known trajectories, so
its accuracy (MOTA, IDF1, id switches: `infer/track_metrics.py`) and its cost per frame are measured apart from
any model. Two rows: ByteTrack as `detector predict track=true` runs it (low boxes from `track_low` keep their
tracks), and the same tracker fed only the boxes from `conf` up, as a tracker without ByteTrack's second match.

The simulation: `objects` boxes (20-80 px a side, 3 classes) move at constant speed (normal, 4 px a frame per
axis) across a 1280x720 frame and bounce off its edges, so they cross each other; the simulated detector misses
`miss` of them, scores `dim` of them between track_low and conf (an occluded or blurred object) and the rest from
conf to 1, shakes every side by `jitter` of the box size, and adds `false_positives` random boxes a frame scored
0.1-0.4. Options: `detector.options.BenchTrackOptions` (`detector bench track --help`).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from detector.infer.track_metrics import Frame, mot_metrics
from detector.infer.tracker import ByteTracker, check_thresholds
from detector.options import BenchTrackOptions
from detector.runtime.machine import describe_machine
from detector.tools.ablate import mean_std
from detector.viz.tables import format_table

FRAME_WH = np.array([1280.0, 720.0])
SIDE_PX = (20.0, 80.0)
CLASSES = 3
SPEED_PX = 4.0


def simulate(opts: BenchTrackOptions, seed: int) -> tuple[list[Frame], list[torch.Tensor]]:
    """One sequence: the truth (ids from 1, boxes) and the detections ((K, 6) rows sorted by score) per frame."""
    rng = np.random.default_rng(seed)
    size = rng.uniform(*SIDE_PX, (opts.objects, 2))
    corner = rng.uniform(0, 1, (opts.objects, 2)) * (FRAME_WH - size)
    velocity = rng.normal(0, SPEED_PX, (opts.objects, 2))
    classes = rng.integers(0, CLASSES, opts.objects)
    ids = np.arange(1, opts.objects + 1)
    truth, detections = [], []
    for _ in range(opts.frames):
        boxes = np.concatenate([corner, corner + size], 1)
        truth.append((ids, boxes))
        detections.append(_detect(rng, opts, boxes, classes))
        corner = corner + velocity
        out = (corner < 0) | (corner > FRAME_WH - size)
        velocity = np.where(out, -velocity, velocity)
        corner = np.clip(corner, 0, FRAME_WH - size)
    return truth, detections


def _detect(rng: np.random.Generator, opts: BenchTrackOptions, boxes: np.ndarray, classes: np.ndarray) -> torch.Tensor:
    """The simulated detector's (K, 6) rows of one frame, sorted by score."""
    n = len(boxes)
    wh = np.tile(boxes[:, 2:] - boxes[:, :2], 2)
    shaken = boxes + rng.normal(0, opts.jitter, (n, 4)) * wh
    dimmed = rng.random(n) < opts.dim
    scores = np.where(dimmed, rng.uniform(opts.track_low, opts.conf, n), rng.uniform(opts.conf, 1.0, n))
    rows = np.concatenate([shaken, scores[:, None], classes[:, None]], 1)[rng.random(n) >= opts.miss]
    k = rng.poisson(opts.false_positives)
    side = rng.uniform(*SIDE_PX, (k, 2))
    corner = rng.uniform(0, 1, (k, 2)) * (FRAME_WH - side)
    false = np.concatenate([corner, corner + side, rng.uniform(0.1, 0.4, (k, 1)), rng.integers(0, CLASSES, (k, 1))], 1)
    rows = np.concatenate([rows, false])
    return torch.from_numpy(rows[np.argsort(-rows[:, 4], kind="stable")]).float()


def run_tracker(detections: list[torch.Tensor], *, high: float, low: float, buffer: int) -> tuple[list[Frame], float]:
    """The tracker's frames (ids, boxes) on one sequence and its milliseconds per frame."""
    tracker = ByteTracker(high=high, low=low, buffer=buffer)
    tracked = []
    started = time.perf_counter()
    for frame in detections:
        kept, ids = tracker.update(frame)
        tracked.append((ids.numpy(), kept[:, :4].double().numpy()))
    return tracked, (time.perf_counter() - started) * 1000 / len(detections)


def main(opts: BenchTrackOptions) -> None:
    """Print one row per tracker setting: the mean and spread of each score over `sequences` simulations."""
    check_thresholds(opts.track_low, opts.conf)  # before the simulation, not at the first tracker
    settings = [(f"ByteTrack (boxes from track_low {opts.track_low})", opts.track_low),
                (f"boxes from conf {opts.conf} only", opts.conf)]
    sequences = [simulate(opts, opts.seed + i) for i in range(opts.sequences)]
    rows = []
    for label, low in settings:
        scores = []
        for truth, detections in sequences:
            tracked, ms = run_tracker(detections, high=opts.conf, low=low, buffer=opts.track_buffer)
            scores.append({**mot_metrics(truth, tracked, opts.min_iou), "ms": ms})
        rows.append([label, *(_spread([s[key] for s in scores], fmt) for key, fmt in _COLUMNS)])
        print(f"  {label}: done", flush=True)
    print(f"{opts.sequences} sequences of {opts.frames} frames, {opts.objects} objects, miss {opts.miss}, dim {opts.dim}, "
          f"{opts.false_positives} false boxes a frame, jitter {opts.jitter}; scored at IoU {opts.min_iou}")
    print(describe_machine().summary())
    print(format_table(["tracker", *(key for key, _ in _COLUMNS)], rows))


_COLUMNS = (("MOTA", ".3f"), ("IDF1", ".3f"), ("id_switches", ".1f"), ("false_positives", ".0f"), ("misses", ".0f"), ("ms", ".2f"))


def _spread(values: list[float], fmt: str) -> str:
    """'mean ± sample standard deviation' over the sequences (the mean alone for one sequence), by ablate's
    `mean_std`, the error bars `detector ablate` reports."""
    mean, std = mean_std(values)
    return format(mean, fmt) if std is None else f"{format(mean, fmt)} ± {format(std, fmt)}"

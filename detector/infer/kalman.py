"""A constant-velocity Kalman filter over many boxes at once, for the tracker (`infer/tracker.py`).

The state and noise model are DeepSORT's (Wojke, Bewley & Paulus, "Simple online and realtime tracking with a
deep association metric", ICIP 2017), which ByteTrack keeps: a box is measured as (cx, cy, a, h), centre, aspect
ratio w / h and height, and its state adds their velocities per frame; process and measurement noise scale with
the box height (1/20 of it for positions, 1/160 for velocities), so a large box may move more pixels than a small
one. Every track's mean (T, 8) and covariance (T, 8, 8) are stacked and stepped in one numpy call each.
"""

from __future__ import annotations

import numpy as np

POSITION_WEIGHT = 1.0 / 20  # DeepSORT's noise on a position, per unit of box height
VELOCITY_WEIGHT = 1.0 / 160  # and on a velocity per frame
MEASURE_DIMS = 4

# x' = F x: each of (cx, cy, a, h) moves by its velocity each frame. The measurement is the first four.
_MOTION = np.eye(2 * MEASURE_DIMS) + np.eye(2 * MEASURE_DIMS, k=MEASURE_DIMS)
_MEASURE = np.eye(MEASURE_DIMS, 2 * MEASURE_DIMS)


def xyxy_to_xyah(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) corners -> (N, 4) centre x, centre y, aspect w / h, height (a zero height is clipped to 1e-6)."""
    wh = boxes[:, 2:4] - boxes[:, :2]
    h = np.maximum(wh[:, 1], 1e-6)
    return np.stack([boxes[:, 0] + wh[:, 0] / 2, boxes[:, 1] + h / 2, wh[:, 0] / h, h], 1)


def xyah_to_xyxy(xyah: np.ndarray) -> np.ndarray:
    """(N, 4+) states or measurements (first four: cx, cy, a, h) -> (N, 4) corners."""
    w = xyah[:, 2] * xyah[:, 3]
    half = np.stack([w / 2, xyah[:, 3] / 2], 1)
    return np.concatenate([xyah[:, :2] - half, xyah[:, :2] + half], 1)


def _diagonal(std: np.ndarray) -> np.ndarray:
    """(N, D) standard deviations -> (N, D, D) diagonal covariances."""
    return np.einsum("nd,de->nde", std**2, np.eye(std.shape[1]))


def _noise(h: np.ndarray, position: float, velocity: float | None, aspect: float) -> np.ndarray:
    """(N, D) standard deviations for heights h: position terms, then (unless velocity is None) velocity terms."""
    ones = np.ones_like(h)
    std = [position * h, position * h, aspect * ones, position * h]
    if velocity is not None:
        std += [velocity * h, velocity * h, 1e-5 * ones, velocity * h]
    return np.stack(std, 1)


def initiate(measured: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (N, 8) and covariance (N, 8, 8) of new tracks from their first (N, 4) xyah measurement, at rest."""
    mean = np.concatenate([measured, np.zeros_like(measured)], 1)
    std = _noise(measured[:, 3], 2 * POSITION_WEIGHT, 10 * VELOCITY_WEIGHT, 1e-2)
    return mean, _diagonal(std)


def predict(mean: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every track one frame ahead: x = F x, P = F P F^T + Q."""
    q = _diagonal(_noise(mean[:, 3], POSITION_WEIGHT, VELOCITY_WEIGHT, 1e-2))
    return mean @ _MOTION.T, _MOTION @ cov @ _MOTION.T + q


def update(mean: np.ndarray, cov: np.ndarray, measured: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tracks (N rows) corrected by their matched (N, 4) xyah measurements: the standard Kalman update."""
    r = _diagonal(_noise(mean[:, 3], POSITION_WEIGHT, None, 1e-1))
    projected_cov = _MEASURE @ cov @ _MEASURE.T + r  # S = H P H^T + R, (N, 4, 4)
    cross = cov @ _MEASURE.T  # P H^T, (N, 8, 4)
    gain = np.linalg.solve(projected_cov, cross.transpose(0, 2, 1)).transpose(0, 2, 1)  # K = P H^T S^-1 (S symmetric)
    innovation = measured - mean[:, :MEASURE_DIMS]
    new_mean = mean + np.einsum("nij,nj->ni", gain, innovation)
    new_cov = cov - gain @ projected_cov @ gain.transpose(0, 2, 1)
    return new_mean, new_cov

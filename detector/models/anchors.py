"""Auto-anchor: how well the head's anchors fit the training boxes, and k-means + evolution when they fit badly.

Metric (YOLOv5 AutoAnchor): for a box and an anchor, x = min(r, 1/r) of the worse of the w and h ratios r; an anchor
can learn a box when x > 1/thr, the loss's own assignment rule (anchor_t). Best possible recall (BPR) is the fraction
of boxes that some anchor can learn. Computed in log space, where x = exp(-max(|log w - log a_w|, |log h - log a_h|)),
so one generation of the evolution is a few passes over an (N, n) array.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
from numpy.typing import ArrayLike

from detector.errors import DetectorError

# Boxes with both sides under this many pixels are left out of the fit (too small to place an anchor on).
_MIN_BOX_PX = 2.0
# Anchors kept when at least this fraction of the boxes is learnable.
_BPR_OK = 0.98
# The fit (k-means, evolution) uses a random subset of this many boxes; BPR is still measured on all of them.
_MAX_FIT_BOXES = 50_000
# Evolution (YOLOv5): each anchor coordinate mutates with this probability, by a normal factor of this sigma ...
_MUTATION_PROB = 0.9
_MUTATION_SIGMA = 0.1
# ... and the multiplier is clipped to this range.
_MUTATION_CLIP = (0.3, 3.0)
_KMEANS_RESTARTS = 5
_KMEANS_MAX_ITER = 100


class AnchoredHead(Protocol):
    """What auto-anchor needs from the Detect head."""

    stride: torch.Tensor

    @property
    def anchors_px(self) -> torch.Tensor: ...

    def set_anchors_px(self, anchors_px: torch.Tensor) -> None: ...


class AnchoredModel(Protocol):
    """A model whose last layer, `head`, holds the anchors (DetectionModel)."""

    head: AnchoredHead


def _as_wh(values: ArrayLike | torch.Tensor) -> np.ndarray:
    """Any (..., 2) array or tensor of widths and heights -> float32 numpy (N, 2)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float32).reshape(-1, 2)


def _log_misfit(log_wh_t: np.ndarray, log_anchors: np.ndarray) -> np.ndarray:
    """(K, N) -log(x): the larger |log ratio| of w and h, boxes given as log sizes (2, N), anchors as (K, 2).

    Sizes are laid out (2, N) so each pass runs over contiguous rows; this is the evolution's hot loop.
    """
    misfit_w = np.abs(log_wh_t[0][None] - log_anchors[:, :1])
    misfit_h = np.abs(log_wh_t[1][None] - log_anchors[:, 1:])
    return np.maximum(misfit_w, misfit_h, out=misfit_w)


def _log_sizes(wh: np.ndarray) -> np.ndarray:
    """(N, 2) sizes -> (2, N) contiguous logs; a zero side gives -inf, a box that fits no anchor."""
    with np.errstate(divide="ignore"):
        return np.ascontiguousarray(np.log(wh).T)


def best_possible_recall(
    anchors_px: ArrayLike | torch.Tensor, wh: ArrayLike | torch.Tensor, thr: float = 4.0
) -> tuple[float, float]:
    """(BPR, anchors above threshold per box) of anchors (K, 2) (or (nl, na, 2)) on box sizes wh (N, 2), pixels."""
    wh = _as_wh(wh)
    if len(wh) == 0:
        raise ValueError("best_possible_recall needs at least one box")
    fits = _log_misfit(_log_sizes(wh), np.log(_as_wh(anchors_px))) < math.log(thr)  # (K, N)
    return float(fits.any(0).mean()), float(fits.sum(0).mean())


def _fitness(log_wh_t: np.ndarray, anchors: np.ndarray, log_thr: float) -> float:
    """YOLOv5 anchor fitness: mean over boxes of the best x, counted only where x > 1/thr."""
    misfit = _log_misfit(log_wh_t, np.log(anchors)).min(0)
    return float(np.where(misfit < log_thr, np.exp(-misfit), 0.0).mean())


def _sq_dist(points_t: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(K, N) squared distances between points laid out (2, N) and centres (K, 2)."""
    return (points_t[0][None] - centres[:, :1]) ** 2 + (points_t[1][None] - centres[:, 1:]) ** 2


def _kmeans_plus_plus(points_t: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each next centre drawn with probability proportional to the squared distance."""
    num_points = points_t.shape[1]
    centres = points_t[:, [rng.integers(num_points)]].T  # (1, 2)
    dist2 = _sq_dist(points_t, centres)[0]
    for _ in range(1, k):
        total = dist2.sum()
        pick = rng.choice(num_points, p=dist2 / total) if total > 0 else rng.integers(num_points)
        centres = np.concatenate((centres, points_t[:, pick][None]))
        dist2 = np.minimum(dist2, _sq_dist(points_t, centres[-1:])[0])
    return centres


def _kmeans(points_t: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Lloyd's k-means of points (2, N) -> centres (k, 2), best of a few k-means++ restarts by mean squared distance.

    Written here rather than taken from scipy.cluster.vq so the package does not depend on scipy for 30 lines,
    and so every random draw comes from the caller's seeded generator.
    """
    best, best_cost = None, math.inf
    for _ in range(_KMEANS_RESTARTS):
        centres = _kmeans_plus_plus(points_t, k, rng)
        for _ in range(_KMEANS_MAX_ITER):
            label = _sq_dist(points_t, centres).argmin(0)
            count = np.bincount(label, minlength=k)[:, None]
            sums = np.stack([np.bincount(label, weights=coord, minlength=k) for coord in points_t], 1)
            updated = np.where(count > 0, sums / np.maximum(count, 1), centres)  # an empty cluster keeps its centre
            converged = np.allclose(updated, centres, rtol=0.0, atol=1e-6)
            centres = updated
            if converged:
                break
        cost = _sq_dist(points_t, centres).min(0).mean()
        if cost < best_cost:
            best, best_cost = centres, cost
    return best


def _evolve(
    anchors: np.ndarray,
    log_wh_t: np.ndarray,
    *,
    thr: float,
    imgsz: int,
    generations: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Hill-climb the fitness with random multiplicative mutations (YOLOv5's genetic step); anchors in [2, imgsz]."""
    log_thr = math.log(thr)
    best = _fitness(log_wh_t, anchors, log_thr)
    for _ in range(generations):
        multiplier = np.ones_like(anchors)
        while (multiplier == 1).all():  # a mutation that changes nothing is drawn again
            mutate = rng.random(anchors.shape) < _MUTATION_PROB
            step = mutate * rng.random() * rng.standard_normal(anchors.shape) * _MUTATION_SIGMA
            multiplier = (1 + step).clip(*_MUTATION_CLIP)
        candidate = (anchors * multiplier).clip(_MIN_BOX_PX, imgsz).astype(np.float32)
        fitness = _fitness(log_wh_t, candidate, log_thr)
        if fitness > best:
            anchors, best = candidate, fitness
    return anchors


def kmeans_anchors(
    wh: ArrayLike | torch.Tensor,
    n: int,
    *,
    imgsz: int,
    thr: float = 4.0,
    generations: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """n anchors (n, 2) in pixels, sorted by area, fitted to box sizes wh (N, 2) in pixels at imgsz.

    k-means on the sizes whitened by their standard deviation, then `generations` steps of evolution of the
    YOLOv5 fitness. Deterministic for a seed. Boxes with both sides under 2 px are ignored.
    """
    rng = np.random.default_rng(seed)
    wh = _as_wh(wh)
    wh = wh[(wh >= _MIN_BOX_PX).any(1)]
    if len(wh) < n:
        raise DetectorError(f"auto-anchor: {len(wh)} training boxes of at least {_MIN_BOX_PX:g} px, "
                            f"too few to fit {n} anchors")
    if len(wh) > _MAX_FIT_BOXES:
        wh = wh[rng.choice(len(wh), _MAX_FIT_BOXES, replace=False)]
    scale = wh.std(0)
    scale[scale == 0] = 1.0
    anchors = _kmeans(np.ascontiguousarray((wh / scale).T), n, rng) * scale
    anchors = anchors.clip(_MIN_BOX_PX, imgsz).astype(np.float32)
    anchors = _evolve(anchors, _log_sizes(wh), thr=thr, imgsz=imgsz, generations=generations, rng=rng)
    return anchors[np.argsort(anchors.prod(1), kind="stable")]


def _format_anchors(anchors: np.ndarray) -> str:
    return ", ".join(f"{w:.0f},{h:.0f}" for w, h in anchors)


def check_anchors(
    model: AnchoredModel,
    wh: ArrayLike | torch.Tensor,
    *,
    thr: float = 4.0,
    imgsz: int,
    seed: int = 0,
    force: bool = False,
) -> str:
    """Check the head's anchors on the training box sizes wh (N, 2) (pixels at imgsz); refit them when they fit badly.

    Anchors are refitted when BPR < 0.98 and replaced (`head.set_anchors_px`, so they reach the checkpoint) when the
    new ones have a higher BPR; `force=True` (the model YAML gave `anchors: <int>`) refits and replaces always.
    BPR is measured with each box scaled by U(0.9, 1.1), as YOLOv5's pre-training check does, to allow for scale
    augmentation. Deterministic for a seed, so every DDP rank computes the same anchors. Returns a one-line report.
    """
    head = model.head
    current = head.anchors_px.detach()
    wh = _as_wh(wh)
    if len(wh) == 0:
        return "AutoAnchor: no training boxes, anchors kept"
    rng = np.random.default_rng(seed)
    wh_jittered = wh * rng.uniform(0.9, 1.1, size=(len(wh), 1)).astype(np.float32)
    bpr, per_box = best_possible_recall(current, wh_jittered, thr)
    report = f"AutoAnchor: {per_box:.2f} anchors/target, best possible recall {bpr:.4f}"
    if bpr >= _BPR_OK and not force:
        return f"{report}: anchors kept"

    num_anchors = current.shape[0] * current.shape[1]
    usable = int((wh >= _MIN_BOX_PX).any(1).sum())
    if usable < num_anchors:
        return f"{report}; only {usable} boxes of at least {_MIN_BOX_PX:g} px for {num_anchors} anchors: anchors kept"
    fitted = kmeans_anchors(wh, num_anchors, imgsz=imgsz, thr=thr, seed=seed)
    new_bpr, new_per_box = best_possible_recall(fitted, wh_jittered, thr)
    if new_bpr <= bpr and not force:
        return f"{report}; refitted anchors reach {new_bpr:.4f}, no better: anchors kept"

    # Smallest anchors to the finest level (the fit is sorted by area).
    order = torch.argsort(head.stride.detach().cpu())
    by_level = torch.empty_like(current, device="cpu")
    by_level[order] = torch.from_numpy(fitted).to(current.dtype).view(current.shape)
    head.set_anchors_px(by_level.to(current.device))
    return (f"{report}; anchors replaced: recall {new_bpr:.4f}, {new_per_box:.2f} anchors/target, "
            f"anchors (px) {_format_anchors(fitted)}")

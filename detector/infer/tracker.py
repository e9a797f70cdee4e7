"""Multi-object tracking by detection on video frames: ByteTrack (Zhang et al., "ByteTrack: Multi-Object Tracking
by Associating Every Detection Box", ECCV 2022, arXiv 2110.06864), with DeepSORT's Kalman filter (`infer/kalman.py`).

Each frame's detections are split by score into high (>= `high`) and low (>= `low`, below `high`):

1. confirmed tracks (tracked or lost), moved one frame by their Kalman filter, are matched to the high boxes;
2. tracked ones left over are matched to the low boxes: a box that dimmed (occluded, blurred) keeps its track
   instead of breaking it, ByteTrack's idea;
3. tentative tracks (born the frame before) are matched to the high boxes still free; the others are dropped;
4. high boxes still free start tentative tracks, and a track lost for more than `buffer` frames is dropped.

Each match is the minimum-cost assignment of 1 - IoU (scipy's `linear_sum_assignment`) in which a pair costs at
most 1 - min IoU (the paper's thresholds: 0.2, 0.5, 0.3) and leaving a box or a track unmatched costs half that,
as ByteTrack's `lap.lapjv(cost_limit=...)` does. Matching is class-aware: a track only takes boxes of its class.
IDs count from 1 and are given when a track is confirmed, on its second frame (at once on the tracker's first
frame), so a one-frame false positive uses up no ID. Every step is a numpy call over all tracks and boxes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_iou

from detector.errors import DetectorError
from detector.infer import kalman

FIRST_MIN_IOU = 0.2  # high boxes to confirmed tracks (ByteTrack's match_thresh 0.8 on 1 - IoU)
SECOND_MIN_IOU = 0.5  # low boxes to tracked tracks
TENTATIVE_MIN_IOU = 0.3  # high boxes to tentative tracks

TENTATIVE, TRACKED, LOST = 0, 1, 2
_FORBIDDEN = 1e6  # a pair that may not match: finite, so the padded assignment below is always feasible


@dataclass
class TrackTable:
    """Every live track, one row each: id (0 while tentative), class, state, the frame it was last matched, and
    its Kalman mean (T, 8) and covariance (T, 8, 8)."""

    ids: np.ndarray
    classes: np.ndarray
    states: np.ndarray
    last_seen: np.ndarray
    mean: np.ndarray
    cov: np.ndarray

    @classmethod
    def empty(cls) -> TrackTable:
        return cls(*(np.zeros(0, np.int64) for _ in range(4)), np.zeros((0, 8)), np.zeros((0, 8, 8)))

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, keep: np.ndarray) -> TrackTable:
        return TrackTable(*(getattr(self, f.name)[keep] for f in fields(self)))

    def append(self, other: TrackTable) -> TrackTable:
        return TrackTable(*(np.concatenate([getattr(self, f.name), getattr(other, f.name)]) for f in fields(self)))


def assign(cost: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the minimum-cost matching in which a pair may cost at most `limit` and each unmatched row
    or column costs limit / 2. Rows and columns with no allowed pair are left out before the solve."""
    allowed = cost <= limit
    rows, cols = np.flatnonzero(allowed.any(1)), np.flatnonzero(allowed.any(0))
    r, c = len(rows), len(cols)
    if not r:
        return rows, cols
    padded = np.zeros((r + c, c + r))
    padded[:r, :c] = np.where(allowed[np.ix_(rows, cols)], cost[np.ix_(rows, cols)], _FORBIDDEN)
    padded[:r, c:] = np.where(np.eye(r, dtype=bool), limit / 2, _FORBIDDEN)  # row i left unmatched
    padded[r:, :c] = np.where(np.eye(c, dtype=bool), limit / 2, _FORBIDDEN)  # column j left unmatched
    i, j = linear_sum_assignment(padded)
    pair = (i < r) & (j < c)
    return rows[i[pair]], cols[j[pair]]


def match(track_boxes: np.ndarray, track_classes: np.ndarray, boxes: np.ndarray, classes: np.ndarray,
          min_iou: float) -> tuple[np.ndarray, np.ndarray]:
    """(track rows, box rows) matched by IoU >= min_iou between boxes of the same class."""
    if not len(track_boxes) or not len(boxes):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    iou = box_iou(torch.from_numpy(track_boxes), torch.from_numpy(boxes)).numpy()
    cost = np.where(track_classes[:, None] == classes[None, :], 1.0 - iou, _FORBIDDEN)
    return assign(cost, 1.0 - min_iou)


def check_thresholds(low: float, high: float) -> None:
    """DetectorError unless 0 <= low <= high <= 1: ByteTrack's low boxes are those scored under its high ones."""
    if not 0 <= low <= high <= 1:
        raise DetectorError(f"track_low ({low}) must be between 0 and conf ({high}): boxes under conf only keep tracks")


class ByteTracker:
    """Track ids for one video's detections, frame by frame: `tracker.update(det) -> (det rows kept, ids)`.

    `det` is the Predictor's (K, 6) [x1, y1, x2, y2, score, class] of one frame, at a confidence of `low` or
    below. Returned: the rows of confirmed tracks matched in this frame (the detector's own boxes and scores, in
    the input's order) and their int64 track ids. `high` also gates new tracks; `buffer` is how many frames a
    lost track waits to be found again.
    """

    def __init__(self, *, high: float = 0.25, low: float = 0.1, buffer: int = 30) -> None:
        check_thresholds(low, high)
        self.high, self.low, self.buffer = high, low, buffer
        self.tracks = TrackTable.empty()
        self.frame = 0
        self.issued = 0  # the last id given

    def update(self, det: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.frame += 1
        det = det[det[:, 4] >= self.low]
        boxes = det[:, :4].double().numpy()
        scores, classes = det[:, 4].numpy(), det[:, 5].long().numpy()
        t = self.tracks
        t.mean[t.states == LOST, 7] = 0.0  # a lost box keeps its drift but not its growth (as ByteTrack)
        t.mean, t.cov = kalman.predict(t.mean, t.cov)
        matched = self._associate(kalman.xyah_to_xyxy(t.mean), boxes, scores >= self.high, classes)
        hit = matched >= 0
        if hit.any():
            t.mean[hit], t.cov[hit] = kalman.update(t.mean[hit], t.cov[hit], kalman.xyxy_to_xyah(boxes[matched[hit]]))
            t.last_seen[hit] = self.frame
        confirming = hit & (t.states == TENTATIVE)
        t.ids[confirming] = self._new_ids(int(confirming.sum()))
        was_confirmed = t.states != TENTATIVE
        t.states = np.where(hit, TRACKED, np.where(was_confirmed, LOST, TENTATIVE))
        alive = (hit | was_confirmed) & (self.frame - t.last_seen <= self.buffer)
        free = np.setdiff1d(np.flatnonzero(scores >= self.high), matched[hit])
        births = self._births(boxes[free], classes[free])
        self.tracks = t.select(alive).append(births)
        rows, ids = matched[hit], t.ids[hit]
        if self.frame == 1:  # the first frame's boxes are confirmed at once
            rows, ids = np.concatenate([rows, free]), np.concatenate([ids, births.ids])
        order = np.argsort(rows, kind="stable")
        return det[torch.from_numpy(rows[order])], torch.from_numpy(ids[order])

    def _associate(self, predicted: np.ndarray, boxes: np.ndarray, high: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """The box row each track takes this frame (-1: none), by the three matches of the module doc."""
        t = self.tracks
        matched = np.full(len(t), -1, np.int64)
        steps = ((t.states != TENTATIVE, np.flatnonzero(high), FIRST_MIN_IOU),
                 (t.states == TRACKED, np.flatnonzero(~high), SECOND_MIN_IOU),
                 (t.states == TENTATIVE, np.flatnonzero(high), TENTATIVE_MIN_IOU))
        for candidates, box_rows, min_iou in steps:
            pool = np.flatnonzero(candidates & (matched < 0))
            box_rows = np.setdiff1d(box_rows, matched)
            ti, bi = match(predicted[pool], t.classes[pool], boxes[box_rows], classes[box_rows], min_iou)
            matched[pool[ti]] = box_rows[bi]
        return matched

    def _births(self, boxes: np.ndarray, classes: np.ndarray) -> TrackTable:
        """New tracks from unmatched high boxes: tentative, or confirmed with ids on the tracker's first frame."""
        n = len(boxes)
        mean, cov = kalman.initiate(kalman.xyxy_to_xyah(boxes))
        first = self.frame == 1
        ids = self._new_ids(n) if first else np.zeros(n, np.int64)
        states = np.full(n, TRACKED if first else TENTATIVE, np.int64)
        return TrackTable(ids, classes.astype(np.int64), states, np.full(n, self.frame, np.int64), mean, cov)

    def _new_ids(self, count: int) -> np.ndarray:
        ids = np.arange(self.issued + 1, self.issued + 1 + count, dtype=np.int64)
        self.issued += count
        return ids

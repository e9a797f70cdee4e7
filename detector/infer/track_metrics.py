"""Scores of a tracker against ground-truth trajectories: CLEAR MOT (Bernardin & Stiefelhagen, "Evaluating
multiple object tracking performance: the CLEAR MOT metrics", EURASIP JIVP 2008) and IDF1 (Ristani et al.,
"Performance measures and a data set for multi-target, multi-camera tracking", ECCV workshops 2016).

A frame is (ids (N,) int64, boxes (N, 4) xyxy) for the truth and for the tracker alike. Per frame, a truth box and
a tracker box correspond when their IoU is at least `min_iou`: correspondences of the frame before are kept while
they still overlap that much, the rest by a minimum-cost assignment on 1 - IoU. MOTA = 1 - (misses + false
positives + id switches) / truth boxes, where an id switch is a truth object matched to another tracker id than
the last one it had. IDF1 = 2 IDTP / (truth boxes + tracker boxes), where IDTP counts, for the best one-to-one
pairing of whole truth and tracker trajectories, the frames in which the two of a pair overlap by `min_iou`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_iou

from detector.infer.tracker import assign

Frame = tuple[np.ndarray, np.ndarray]  # ids (N,), boxes (N, 4) xyxy


def frame_matches(gt_ids: np.ndarray, hyp_ids: np.ndarray, iou: np.ndarray, previous: dict[int, int],
                  min_iou: float) -> tuple[np.ndarray, np.ndarray]:
    """(truth rows, tracker rows) corresponding in one frame, given their (N, M) IoU: the pairs of `previous`
    (truth id -> tracker id) still at IoU >= min_iou first, then an assignment of the rest."""
    if not iou.size:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    was = np.array([previous.get(int(g), -1) for g in gt_ids.tolist()])
    kept = (was[:, None] == hyp_ids[None, :]) & (iou >= min_iou)
    kept_gt, kept_hyp = np.nonzero(kept)
    _, first = np.unique(kept_hyp, return_index=True)  # a tracker id two truth objects once had goes to one of them
    kept_gt, kept_hyp = kept_gt[first], kept_hyp[first]
    free_gt = np.setdiff1d(np.arange(len(gt_ids)), kept_gt)
    free_hyp = np.setdiff1d(np.arange(len(hyp_ids)), kept_hyp)
    rows, cols = assign(1.0 - iou[np.ix_(free_gt, free_hyp)], 1.0 - min_iou)
    return np.concatenate([kept_gt, free_gt[rows]]), np.concatenate([kept_hyp, free_hyp[cols]])


def mot_metrics(truth: Sequence[Frame], tracked: Sequence[Frame], min_iou: float = 0.5) -> dict[str, float]:
    """MOTA, IDF1, id switches, false positives, misses and the counts of truth and tracker boxes over a sequence
    (module doc). Both lists hold one Frame per frame, in order."""
    previous: dict[int, int] = {}
    overlaps: dict[tuple[int, int], int] = {}  # (truth id, tracker id) -> frames overlapping by min_iou
    switches = matched = 0
    for (gt_ids, gt_boxes), (hyp_ids, hyp_boxes) in zip(truth, tracked, strict=True):
        iou = box_iou(torch.from_numpy(gt_boxes).double().reshape(-1, 4), torch.from_numpy(hyp_boxes).double().reshape(-1, 4)).numpy()
        for g, h in zip(*np.nonzero(iou >= min_iou)):
            key = (int(gt_ids[g]), int(hyp_ids[h]))
            overlaps[key] = overlaps.get(key, 0) + 1
        gt_rows, hyp_rows = frame_matches(gt_ids, hyp_ids, iou, previous, min_iou)
        for g, h in zip(gt_ids[gt_rows].tolist(), hyp_ids[hyp_rows].tolist()):
            switches += g in previous and previous[g] != h
            previous[g] = h
        matched += len(gt_rows)
    n_truth = sum(len(ids) for ids, _ in truth)
    n_tracked = sum(len(ids) for ids, _ in tracked)
    misses, false_positives = n_truth - matched, n_tracked - matched
    return {
        "MOTA": 1.0 - (misses + false_positives + switches) / max(n_truth, 1),
        "IDF1": 2.0 * _id_true_positives(overlaps) / max(n_truth + n_tracked, 1),
        "id_switches": switches, "false_positives": false_positives, "misses": misses,
        "truth_boxes": n_truth, "tracker_boxes": n_tracked,
    }


def _id_true_positives(overlaps: dict[tuple[int, int], int]) -> int:
    """The most overlapping frames any one-to-one pairing of truth and tracker trajectories reaches."""
    if not overlaps:
        return 0
    truth_row = {g: i for i, g in enumerate(sorted({g for g, _ in overlaps}))}
    tracker_col = {h: j for j, h in enumerate(sorted({h for _, h in overlaps}))}
    counts = np.zeros((len(truth_row), len(tracker_col)))
    for (g, h), n in overlaps.items():
        counts[truth_row[g], tracker_col[h]] = n
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return int(counts[rows, cols].sum())

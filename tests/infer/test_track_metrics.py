"""CLEAR MOT and IDF1 on hand-made sequences whose scores are worked out in each test's docstring."""

from __future__ import annotations

import numpy as np
import pytest

from detector.infer.track_metrics import mot_metrics


def frame(*objects: tuple[int, float]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, boxes) of 10x10 boxes at x positions: frame((id, x), ...)."""
    ids = np.array([i for i, _ in objects], np.int64)
    boxes = np.array([[x, 0.0, x + 10.0, 10.0] for _, x in objects]).reshape(-1, 4)
    return ids, boxes


def test_an_id_switch_counts_once_and_halves_idf1() -> None:
    """One object over 4 frames, tracked as 7 then 8: 1 switch, MOTA 1 - 1/4; the best pairing (1 with 7 or 8)
    covers 2 of the 4 + 4 boxes: IDF1 = 2 * 2 / 8."""
    truth = [frame((1, x)) for x in range(4)]
    tracked = [frame((7, 0)), frame((7, 1)), frame((8, 2)), frame((8, 3))]
    m = mot_metrics(truth, tracked)
    assert (m["id_switches"], m["misses"], m["false_positives"]) == (1, 0, 0)
    assert m["MOTA"] == pytest.approx(0.75) and m["IDF1"] == pytest.approx(0.5)


def test_misses_false_positives_and_the_iou_threshold() -> None:
    """Frame 0: matched; frame 1: the tracker box is 6 px off (IoU 4/16 < 0.5): a miss and a false positive;
    frame 2: no tracker box: a miss. MOTA = 1 - 3/3 = 0; IDTP 1: IDF1 = 2 / (3 + 2). At min_iou 0.2 frame 1
    matches too."""
    truth = [frame((1, 0)), frame((1, 0)), frame((1, 0))]
    tracked = [frame((5, 0)), frame((5, 6)), frame()]
    m = mot_metrics(truth, tracked)
    assert (m["misses"], m["false_positives"], m["id_switches"]) == (2, 1, 0)
    assert m["MOTA"] == pytest.approx(0.0) and m["IDF1"] == pytest.approx(0.4)
    m = mot_metrics(truth, tracked, min_iou=0.2)
    assert (m["misses"], m["false_positives"]) == (1, 0) and m["IDF1"] == pytest.approx(0.8)


def test_a_kept_correspondence_wins_over_a_closer_box() -> None:
    """CLEAR MOT keeps a pair while it still overlaps: object 1 stays with tracker 7 in frame 1 although
    tracker 8 sits exactly on it (IoU 1 against 0.67), so no switch; 8 is a false positive."""
    truth = [frame((1, 0)), frame((1, 0))]
    tracked = [frame((7, 0)), frame((7, 2), (8, 0))]
    m = mot_metrics(truth, tracked)
    assert (m["id_switches"], m["false_positives"], m["misses"]) == (0, 1, 0)


def test_idf1_pairs_whole_trajectories_one_to_one() -> None:
    """Tracker 7 follows object 1 for 3 frames and object 2 for 1; tracker 8 follows object 2 for 3: the best
    one-to-one pairing (1-7, 2-8) covers 6 of 8 + 8 boxes, not the 7 a greedy count per tracker would claim."""
    truth = [frame((1, 0), (2, 50))] * 4
    tracked = [frame((7, 0), (8, 50))] * 3 + [frame((7, 50), (8, 0))]
    m = mot_metrics(truth, tracked)
    assert m["IDF1"] == pytest.approx(2 * 6 / 16)
    assert m["id_switches"] == 2 and m["MOTA"] == pytest.approx(1 - 2 / 8)


def test_a_tracker_box_is_never_counted_for_two_objects() -> None:
    """Objects 1 and 2 were each last matched to tracker 7 (1 in frame 0, 2 in frame 1); in frame 2 both overlap
    the one box of tracker 7: one of them is matched, the other is a miss."""
    truth = [frame((1, 0)), frame((2, 30)), frame((1, 0), (2, 2))]
    tracked = [frame((7, 0)), frame((7, 30)), frame((7, 1))]
    m = mot_metrics(truth, tracked)
    assert (m["misses"], m["false_positives"]) == (1, 0)


def boxes_frame(*objects: tuple[int, list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, boxes) from (id, [x1, y1, x2, y2]) pairs."""
    return np.array([i for i, _ in objects], np.int64), np.array([b for _, b in objects], float).reshape(-1, 4)


FULL, HALF = [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0]  # IoU exactly 50 / 100 = 0.5


def test_a_kept_correspondence_at_exactly_min_iou_is_kept() -> None:
    """A correspondence whose IoU falls to exactly min_iou is kept (no switch) and counts for IDF1."""
    # object 1 matched to tracker 7 in frame 0; in frame 1 tracker 7 overlaps it by exactly 0.5 and tracker 8 sits on it:
    # the pair is kept and 8 is a false positive. IDF1: 1-7 overlap in both frames, 1-8 in one: IDTP 2, 2 * 2 / (2 + 3)
    truth = [boxes_frame((1, FULL))] * 2
    tracked = [boxes_frame((7, FULL)), boxes_frame((7, HALF), (8, FULL))]
    m = mot_metrics(truth, tracked, min_iou=0.5)
    assert (m["id_switches"], m["false_positives"], m["misses"]) == (0, 1, 0)
    assert m["IDF1"] == pytest.approx(0.8)


def test_a_sequence_without_truth_boxes_scores_its_tracker_boxes_as_false_positives() -> None:
    """Without truth boxes every tracker box is a false positive, and nothing divides by zero."""
    # no truth, two tracker boxes: MOTA = 1 - 2 / max(0, 1) = -1, IDF1 = 0 / 2 = 0
    m = mot_metrics([frame(), frame()], [frame((7, 0)), frame((7, 1))])
    assert (m["truth_boxes"], m["tracker_boxes"], m["false_positives"], m["misses"]) == (0, 2, 2, 0)
    assert m["MOTA"] == -1.0 and m["IDF1"] == 0.0

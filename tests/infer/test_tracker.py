"""ByteTrack over scripted detections (boxes in pixels, one list per frame): ids that hold through crossings,
dimmed boxes and short gaps, what starts a track and what does not, class-aware matching, and the Kalman
filter's batched steps against their textbook single-track form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detector.errors import DetectorError
from detector.infer import kalman
from detector.infer.tracker import ByteTracker, assign


def det(*rows: tuple[float, ...]) -> torch.Tensor:
    """(K, 6) [x1, y1, x2, y2, score, class] as the Predictor gives them, sorted by score."""
    out = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
    return out[out[:, 4].argsort(descending=True)]


def box(x: float, y: float = 10.0, size: float = 20.0, score: float = 0.9, cls: int = 0) -> tuple[float, ...]:
    return x, y, x + size, y + size, score, cls


def run(tracker: ByteTracker, frames: list[torch.Tensor]) -> list[dict[float, int]]:
    """Per frame: {x1 of each kept box: its id}."""
    out = []
    for frame in frames:
        kept, ids = tracker.update(frame)
        assert len(kept) == len(ids) and ids.dtype == torch.int64
        out.append(dict(zip(kept[:, 0].tolist(), ids.tolist())))
    return out


def test_two_objects_that_cross_keep_their_ids() -> None:
    frames = [det(box(10 + 6 * f), box(128 - 6 * f, y=14)) for f in range(20)]  # they pass each other at f = 10
    seen = run(ByteTracker(high=0.5), frames)
    assert all(len(s) == 2 for s in seen)
    assert [s[10 + 6 * f] for f, s in enumerate(seen)] == [1] * 20
    assert [s[128 - 6 * f] for f, s in enumerate(seen)] == [2] * 20


def test_a_dimmed_box_keeps_its_track_through_the_low_match() -> None:
    """Frames 5-7 score 0.3, under high: ByteTrack's second match keeps the track (low=0.1); with low = high the
    box is dropped, the track lost, and it comes back under its id from the first match."""
    frames = [det(box(10 + 4 * f, score=0.3 if 5 <= f <= 7 else 0.9)) for f in range(12)]
    seen = run(ByteTracker(high=0.5, low=0.1), frames)
    assert [list(s.values()) for s in seen] == [[1]] * 12
    seen = run(ByteTracker(high=0.5, low=0.5), frames)
    assert [list(s.values()) for s in seen] == [[1]] * 5 + [[]] * 3 + [[1]] * 4


def test_a_lost_track_waits_buffer_frames_then_its_object_gets_a_new_id() -> None:
    def gap_of(missing: int) -> list[torch.Tensor]:
        return [det(box(10 + 2 * f)) if not 3 <= f < 3 + missing else det() for f in range(3 + missing + 3)]

    assert list(run(ByteTracker(buffer=4), gap_of(4))[-1].values()) == [1]
    last = run(ByteTracker(buffer=4), gap_of(5))
    assert list(last[-3].values()) == []  # tentative again: shown from its second frame, under a new id
    assert list(last[-2].values()) == list(last[-1].values()) == [2]


def test_new_tracks_start_at_high_and_show_from_their_second_frame() -> None:
    """After the first frame, a new box is tentative: a one-frame box (a flicker) is never shown and uses no id;
    a box scored between low and high starts no track at all."""
    tracker = ByteTracker(high=0.5, low=0.1)
    frames = [det(box(10)), det(box(10), box(100)), det(box(12)), det(box(14), box(60, score=0.3)),
              det(box(16), box(60, score=0.3)), det(box(18), box(100)), det(box(20), box(102))]
    seen = run(tracker, frames)
    assert [sorted(s.items()) for s in seen] == [
        [(10, 1)], [(10, 1)], [(12, 1)], [(14, 1)], [(16, 1)], [(18, 1)], [(20, 1), (102, 2)],
    ]


def test_matching_is_class_aware() -> None:
    """Two classes on the same spot: each track follows its class, and a box that changes class starts anew."""
    frames = [det(box(10, cls=0), box(11, cls=1)) for _ in range(3)] + [det(box(10, cls=1)), det(box(10, cls=1))]
    seen = run(ByteTracker(), frames)
    assert [sorted(s.values()) for s in seen[:3]] == [[1, 2]] * 3
    assert seen[3] == {10: 2}  # the class-1 track takes it; the class-0 one is lost


def test_kept_rows_are_the_detectors_own_in_input_order() -> None:
    tracker = ByteTracker(high=0.5)
    frame = det(box(10, score=0.9), box(50, score=0.7), box(90, score=0.6, cls=2))
    kept, ids = tracker.update(frame)
    assert torch.equal(kept, frame) and ids.tolist() == [1, 2, 3]


def test_thresholds_are_checked_naming_the_keys() -> None:
    with pytest.raises(DetectorError, match=r"track_low \(0.6\).*conf \(0.5\)"):
        ByteTracker(high=0.5, low=0.6)


def test_assignment_leaves_a_pair_unmatched_rather_than_take_two_poor_ones() -> None:
    """lapjv(cost_limit) semantics: one good pair (0.1) plus two unmatched (0.4 each at limit 0.8) beats two
    allowed but poor pairs (0.5 + 0.5); pairs over the limit never match; rows or columns with no allowed pair
    drop out."""
    cost = np.array([[0.1, 0.5], [0.5, 9.0]])
    rows, cols = assign(cost, 0.8)
    assert (rows.tolist(), cols.tolist()) == ([0], [0])
    rows, cols = assign(np.array([[0.5, 0.5], [0.5, 0.5]]), 0.8)
    assert sorted(zip(rows.tolist(), cols.tolist())) in ([(0, 0), (1, 1)], [(0, 1), (1, 0)])
    assert assign(np.array([[0.9, 0.85]]), 0.8)[0].size == 0
    rows, cols = assign(np.array([[9.0, 9.0], [9.0, 0.2]]), 0.8)
    assert (rows.tolist(), cols.tolist()) == ([1], [1])


def test_kalman_batched_steps_equal_the_single_track_textbook_form() -> None:
    rng = np.random.default_rng(0)
    boxes = np.array([[10.0, 20.0, 30.0, 60.0], [100.0, 50.0, 180.0, 90.0], [5.0, 5.0, 9.0, 7.0]])
    xyah = kalman.xyxy_to_xyah(boxes)
    np.testing.assert_allclose(kalman.xyah_to_xyxy(xyah), boxes)
    mean, cov = kalman.initiate(xyah)
    mean[:, 4:] = rng.normal(size=(3, 4))
    mean, cov = kalman.predict(mean, cov)
    measured = xyah + rng.normal(size=(3, 4))
    new_mean, new_cov = kalman.update(mean, cov, measured)
    f = np.eye(8) + np.eye(8, k=4)
    h = np.eye(4, 8)
    for i in range(3):
        height = mean[i, 3]
        r = np.diag(np.array([height / 20, height / 20, 0.1, height / 20]) ** 2)
        s = h @ cov[i] @ h.T + r
        gain = cov[i] @ h.T @ np.linalg.inv(s)
        np.testing.assert_allclose(new_mean[i], mean[i] + gain @ (measured[i] - h @ mean[i]), rtol=1e-9)
        np.testing.assert_allclose(new_cov[i], (np.eye(8) - gain @ h) @ cov[i], rtol=1e-7, atol=1e-9)
    moved, _ = kalman.predict(new_mean, new_cov)
    np.testing.assert_allclose(moved, new_mean @ f.T)  # constant velocity: each position moves by its velocity


def test_a_lost_track_is_not_taken_by_a_low_box_only_by_a_high_one() -> None:
    """ByteTrack's second match offers the low boxes to tracks seen in the last frame only: a track missed for a
    frame is not revived by a dim box at its place (frame 3), but is by a confident one (frame 4), under its id."""
    frames = [det(box(10)), det(box(10)), det(), det(box(10, score=0.3)), det(box(10))]
    seen = run(ByteTracker(high=0.5, low=0.1), frames)
    assert [list(s.values()) for s in seen] == [[1], [1], [], [], [1]]


def test_a_confirmed_track_takes_a_high_box_down_to_iou_0_2() -> None:
    """The first match admits IoU >= 0.2 (ByteTrack's match_thresh 0.8): a still object's box that jumps 12 px
    (IoU 8 x 20 / (2 x 400 - 160) = 0.25) keeps its id; one that jumps 14 px (IoU 6 x 20 / 680 = 0.18) does not."""
    for jump, expected in ((12, [1]), (14, [])):
        frames = [det(box(10))] * 4 + [det(box(10 + jump))]
        assert list(run(ByteTracker(high=0.5), frames)[-1].values()) == expected


def test_a_box_taken_by_a_confirmed_track_is_not_offered_to_a_tentative_one() -> None:
    """Frame 2 adds box B next to A's track (a tentative track); frame 3 has one box overlapping both tracks. A's
    track takes it in the first match, so B's tentative track cannot take it too, and is dropped."""
    frames = [det(box(0)), det(box(0), box(6, score=0.8)), det(box(2))]
    seen = run(ByteTracker(high=0.5), frames)
    assert seen == [{0.0: 1}, {0.0: 1}, {2.0: 1}]
    tracker = ByteTracker(high=0.5)
    run(tracker, frames)
    assert len(tracker.tracks) == 1


def test_a_tentative_track_is_confirmed_by_a_high_box_down_to_iou_0_3() -> None:
    """Born on frame 2 (tentative), confirmed on frame 3 by a box 8 px on (IoU 12 / 28 = 0.43), not by one 11 px
    on (IoU 9 / 31 = 0.29): that box starts a tentative track of its own instead."""
    for shift, expected in ((8, [1]), (11, [])):
        frames = [det(), det(box(40)), det(box(40 + shift))]
        assert list(run(ByteTracker(high=0.5), frames)[-1].values()) == expected


def test_kept_rows_come_in_the_input_order_with_their_ids() -> None:
    """Frame 2 lists B before A (by score): the rows returned are the detector's own rows in that order, ids
    alongside, whatever the order of the tracks."""
    tracker = ByteTracker(high=0.5)
    tracker.update(det(box(10, score=0.9), box(60, score=0.8)))  # A gets id 1, B id 2
    frame = det(box(10, score=0.7), box(60, score=0.95))
    kept, ids = tracker.update(frame)
    assert torch.equal(kept, frame) and kept[:, 0].tolist() == [60.0, 10.0] and ids.tolist() == [2, 1]


def test_a_lost_track_stops_growing_so_its_object_is_found_again_at_its_last_size() -> None:
    """A square growing 10 px a frame (20 -> 90 px), missed for 16 frames, back at 90 px: the lost track kept its
    last size (ByteTrack zeroes a lost box's height velocity), so it takes the box under its id. Left growing, its
    box would be about 200 px by then, IoU under 0.2."""
    def square(side: float) -> torch.Tensor:
        return det((200 - side / 2, 200 - side / 2, 200 + side / 2, 200 + side / 2, 0.9, 0))

    frames = [square(20 + 10 * f) for f in range(8)] + [det()] * 16 + [square(90)]
    assert list(run(ByteTracker(high=0.5, buffer=30), frames)[-1].values()) == [1]


def test_kalman_noise_is_deepsorts_scaled_by_the_box_height() -> None:
    """Initial and process noise are DeepSORT's: 1/20 (positions) and 1/160 (velocities) of the box height."""
    # a new 40 px tall track: position std 2 * 40 / 20 = 4, velocity std 10 * 40 / 160 = 2.5, aspect 1e-2, its velocity 1e-5
    mean, cov = kalman.initiate(np.array([[50.0, 60.0, 0.5, 40.0]]))
    np.testing.assert_array_equal(mean, [[50.0, 60.0, 0.5, 40.0, 0, 0, 0, 0]])
    np.testing.assert_allclose(np.diag(cov[0]), [16, 16, 1e-4, 16, 6.25, 6.25, 1e-10, 6.25], rtol=1e-12)
    # one step ahead: F P F^T (positions gain their velocity's variance, P_pv = P_vv) plus Q of std
    # 40 / 20 = 2 (positions), 1e-2 (aspect), 40 / 160 = 0.25 (velocities), 1e-5 (aspect velocity)
    _, moved = kalman.predict(mean, cov)
    position = 16 + 6.25 + 2**2
    np.testing.assert_allclose(np.diag(moved[0]), [position, position, 1e-4 + 1e-10 + 1e-4, position,
                                                   6.25 + 0.25**2, 6.25 + 0.25**2, 2e-10, 6.25 + 0.25**2], rtol=1e-12)
    np.testing.assert_allclose(moved[0, 0, 4], 6.25, rtol=1e-12)  # position-velocity covariance


def test_kalman_takes_a_box_without_height() -> None:
    """A zero-height box is measured with height 1e-6 (a finite aspect ratio, no division by zero)."""
    with np.errstate(divide="raise", invalid="raise"):
        xyah = kalman.xyxy_to_xyah(np.array([[10.0, 20.0, 30.0, 20.0]]))
    assert xyah[0, 0] == 20.0 and xyah[0, 1] == pytest.approx(20.0, abs=1e-3)
    assert xyah[0, 2] == pytest.approx(20 / 1e-6) and xyah[0, 3] == 1e-6

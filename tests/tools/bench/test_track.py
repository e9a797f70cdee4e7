"""`detector bench track`: the simulation's truth and detections, and the table that compares ByteTrack with
the same tracker fed only high boxes (run small)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detector.errors import DetectorError

from detector.options import BenchTrackOptions
from detector.runtime.machine import describe_machine
from detector.tools.bench import track


def test_simulation_is_seeded_and_scores_boxes_as_asked() -> None:
    opts = BenchTrackOptions(frames=50, objects=8, miss=0.1, dim=0.3, false_positives=0.0, jitter=0.0)
    truth, detections = track.simulate(opts, seed=3)
    again = track.simulate(opts, seed=3)[1]
    assert all(torch.equal(a, b) for a, b in zip(detections, again))
    assert len(truth) == len(detections) == 50 and all(ids.tolist() == list(range(1, 9)) for ids, _ in truth)
    boxes = np.concatenate([b for _, b in truth])
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 1280).all() and (boxes[:, 3] <= 720).all()
    rows = torch.cat(detections)
    assert abs(len(rows) / (50 * 8) - 0.9) < 0.06  # miss 0.1
    dimmed = ((rows[:, 4] >= opts.track_low) & (rows[:, 4] < opts.conf)).float().mean().item()
    assert abs(dimmed - 0.3) < 0.07
    assert all((d[:-1, 4] >= d[1:, 4]).all() for d in detections)  # sorted by score, as the Predictor gives them
    moved = truth[1][1] - truth[0][1]
    assert np.abs(moved).max() > 0 and np.allclose(moved[:, :2], moved[:, 2:])  # boxes move, keeping their size


def test_the_table_shows_bytetrack_ahead_when_boxes_dim(capsys) -> None:
    track.main(BenchTrackOptions(sequences=2, frames=60, objects=6, dim=0.4))
    lines = capsys.readouterr().out.strip().splitlines()
    named, header, _, byte, high_only = lines[-5:]
    assert named == describe_machine().summary()
    assert header.split() == ["tracker", "MOTA", "IDF1", "id_switches", "false_positives", "misses", "ms"]
    assert byte.startswith("ByteTrack (boxes from track_low 0.1)") and high_only.startswith("boxes from conf 0.25 only")
    byte_mota = float(byte.split(")")[1].split()[0])
    high_mota = float(high_only.split("only")[1].split()[0])
    assert byte_mota > high_mota + 0.1 and "±" in byte


def test_track_low_above_conf_is_refused_before_any_work() -> None:
    with pytest.raises(DetectorError, match=r"track_low \(0.5\) must be between 0 and conf \(0.25\)"):
        track.main(BenchTrackOptions(track_low=0.5, frames=10_000, objects=500, sequences=100))

"""Which checkpoint, folder and classes a resume continues (`detector.train.resume`), without training: the
end-to-end resumes are in tests/train/test_trainer.py and tests/reliability/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from detector.errors import DetectorError
from detector.train.resume import check_resume_classes, find_resume_checkpoint, resumed_run_dir


def _run(project: Path, name: str, *, last: bool, stamp: int) -> Path:
    """A run folder set up at `stamp` (args.yaml) and, with `last`, checkpointed one second later."""
    run = project / name
    (run / "weights").mkdir(parents=True)
    (run / "args.yaml").write_text("epochs: 3\n")
    os.utime(run / "args.yaml", (stamp, stamp))
    if last:
        (run / "weights" / "last.pt").write_bytes(b"")
        os.utime(run / "weights" / "last.pt", (stamp + 1, stamp + 1))
    return run


def test_resume_true_takes_the_newest_last_pt_unless_a_newer_run_has_none(tmp_path: Path) -> None:
    with pytest.raises(DetectorError, match="nothing to resume: no \\*/weights/last.pt under"):
        find_resume_checkpoint(True, tmp_path)
    _run(tmp_path, "exp", last=True, stamp=1_000)
    newer = _run(tmp_path, "exp2", last=True, stamp=2_000)
    assert find_resume_checkpoint(True, tmp_path) == newer / "weights" / "last.pt"
    killed = _run(tmp_path, "exp3", last=False, stamp=3_000)  # killed in its first epoch
    with pytest.raises(DetectorError, match=f"the newest run {killed} has no weights/last.pt"):
        find_resume_checkpoint(True, tmp_path)
    assert find_resume_checkpoint(str(newer / "weights" / "last.pt"), tmp_path) == newer / "weights" / "last.pt"
    with pytest.raises(DetectorError, match="resume: checkpoint 'gone.pt' not found"):
        find_resume_checkpoint("gone.pt", tmp_path)


def test_a_resume_writes_into_the_run_holding_last_pt_or_the_recorded_one(tmp_path: Path) -> None:
    copy = _run(tmp_path, "exp-copy", last=True, stamp=1_000)
    original = _run(tmp_path, "exp", last=True, stamp=1_000)
    assert resumed_run_dir(copy / "weights" / "last.pt", str(original)) == copy  # a copied run continues in its copy
    lone = tmp_path / "kept" / "last.pt"
    lone.parent.mkdir()
    lone.write_bytes(b"")
    assert resumed_run_dir(lone, str(original)) == original  # a checkpoint kept elsewhere: its recorded run
    assert resumed_run_dir(lone, str(tmp_path / "deleted")) == tmp_path  # ... while that run exists


def test_changed_classes_are_named_at_their_first_difference() -> None:
    ckpt = {"category_ids": [1, 3, 7], "names": ["a", "b", "c"]}
    check_resume_classes(ckpt, [1, 3, 7], ["a", "b", "c"], "last.pt", Path("train.json"))
    with pytest.raises(DetectorError, match=r"other classes than train.json has now \(nc: 3 -> 4; category_ids\[3\]: "
                                            r"\(none\) -> 9; names\[1\]: 'b' -> 'B'\)"):
        check_resume_classes(ckpt, [1, 3, 7, 9], ["a", "B", "c", "d"], "last.pt", Path("train.json"))

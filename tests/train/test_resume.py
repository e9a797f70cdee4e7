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


def test_resume_true_orders_runs_by_time_not_name(tmp_path: Path) -> None:
    """The newest last.pt is the latest written, whatever the folders' names sort as."""
    _run(tmp_path, "zeta", last=True, stamp=1_000)
    alpha = _run(tmp_path, "alpha", last=True, stamp=2_000)
    assert find_resume_checkpoint(True, tmp_path) == alpha / "weights" / "last.pt"


def test_a_newer_args_yaml_beside_its_own_last_pt_is_resumed(tmp_path: Path) -> None:
    """A newest run whose args.yaml is newer than its own last.pt (a resume killed early) is resumed, not refused."""
    _run(tmp_path, "old", last=True, stamp=1_000)
    again = _run(tmp_path, "again", last=True, stamp=2_000)
    os.utime(again / "args.yaml", (3_000, 3_000))
    assert find_resume_checkpoint(True, tmp_path) == again / "weights" / "last.pt"


def _load_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, epoch: int, plan: int | None,
                 optimizer: object = "state", **given: str):
    """load_resume of a stand-in checkpoint of a 10-epoch config, after `epoch`, with `plan` in its train_state."""
    from dataclasses import asdict

    from detector.config import load_train_config
    from detector.train import resume

    last = tmp_path / "last.pt"
    last.write_bytes(b"")
    ckpt = {"optimizer": optimizer, "epoch": epoch, "train_state": {} if plan is None else {"epochs": plan},
            "train_config": asdict(load_train_config({"epochs": "10"}))}
    monkeypatch.setattr(resume.ckpt_io, "load_checkpoint", lambda path: ckpt)
    return resume.load_resume(load_train_config({"resume": str(last), **given}))


def test_a_resume_continues_the_saved_plan_unless_epochs_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The epoch plan is epochs= given now, else the checkpoint's saved plan, else the config's; a finished plan is refused."""
    # the checkpoint's config says 10 epochs, its train_state a budget's refit to 5
    cfg, ckpt = _load_resume(tmp_path, monkeypatch, epoch=2, plan=5)
    assert ckpt["train_state"]["epochs"] == 5 and cfg.resume == str(tmp_path / "last.pt")
    assert _load_resume(tmp_path, monkeypatch, epoch=2, plan=5, epochs="7")[1]["train_state"]["epochs"] == 7
    assert _load_resume(tmp_path, monkeypatch, epoch=2, plan=None)[1]["train_state"]["epochs"] == 10
    with pytest.raises(DetectorError, match="already finished all 5 epochs"):
        _load_resume(tmp_path, monkeypatch, epoch=4, plan=5)
    with pytest.raises(DetectorError, match="is an inference file without optimizer state"):
        _load_resume(tmp_path, monkeypatch, epoch=2, plan=5, optimizer=None)


def test_one_renamed_class_alone_is_refused() -> None:
    """A single difference (same ids and count, one name changed) is enough to refuse the resume."""
    ckpt = {"category_ids": [1, 3, 7], "names": ["a", "b", "c"]}
    with pytest.raises(DetectorError, match=r"\(names\[2\]: 'c' -> 'd'\); start a new run instead"):
        check_resume_classes(ckpt, [1, 3, 7], ["a", "b", "d"], "last.pt", Path("train.json"))

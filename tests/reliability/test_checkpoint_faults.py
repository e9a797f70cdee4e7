"""Checkpoints meeting the trainer and `val`: a full disk mid-run (RELIABILITY row 26), weights of another model or
class count (23), a resume whose model, config or classes changed (28). The unit tests of the writer and the
loader are in tests/runtime/test_checkpoint.py."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from detector.cli import main
from detector.config import TrainConfig
from detector.errors import DetectorError
from detector.models.builder import build_model
from detector.runtime import checkpoint as ck
from detector.train.trainer import Trainer, train
from reliability_helpers import read_results
from tiny_run import TINY, make_config


@pytest.fixture(scope="module")
def disk_full(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, DetectorError, Path]]:
    """A 2-epoch run whose epoch-1 checkpoint write hits ENOSPC halfway. Yields (run folder, the error, a copy of
    the run's last.pt as the error left it)."""
    root = tmp_path_factory.mktemp("disk_full")
    real_save = torch.save

    def half_then_enospc(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 1:
            buffer = io.BytesIO()
            real_save(obj, buffer)
            f.write(buffer.getvalue()[: buffer.tell() // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "save", half_then_enospc)
        with pytest.raises(DetectorError) as info:
            train(make_config(tiny_data, root / "runs", epochs="2"))
    run = root / "runs" / "exp"
    kept = root / "epoch0-last.pt"
    shutil.copy(run / "weights" / "last.pt", kept)
    yield run, info.value, kept


def test_disk_full_names_path_and_size_keeps_the_old_checkpoint_and_resumes(disk_full, tiny_data: Path) -> None:
    run, error, _ = disk_full
    message = str(error)
    assert message.startswith(f"{run / 'weights' / 'last.pt'}: cannot write checkpoint (No space left on device)")
    assert "MiB" in message and "previous last.pt is left intact" in message and "\n" not in message
    assert sorted(p.name for p in (run / "weights").iterdir()) == ["best.pt", "last.pt"]  # no temporary file
    assert ck.load_checkpoint(run / "weights" / "last.pt")["epoch"] == 0
    train(make_config(tiny_data, run.parent, resume=str(run / "weights" / "last.pt")))
    assert [r["epoch"] for r in read_results(run)] == ["0", "1"]
    assert ck.load_checkpoint(run / "weights" / "last.pt")["epoch"] == 1


def test_a_failed_rename_of_the_last_epochs_checkpoint_stops_the_run_with_the_error(tiny_data: Path, tmp_path: Path) -> None:
    """The durable half of the per-epoch save (fsync, rename) runs in the background: its failure still reaches the
    caller of `train`, as the same one-line error, with the previous last.pt kept and no temporary file left."""
    real_replace, renamed = os.replace, []

    def failing_second_last_pt(src, dst):
        if Path(dst).name == "last.pt":
            renamed.append(dst)
            if len(renamed) == 2:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_replace(src, dst)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", failing_second_last_pt)
        with pytest.raises(DetectorError) as info:
            train(make_config(tiny_data, tmp_path / "runs", epochs="2"))
    weights = tmp_path / "runs" / "exp" / "weights"
    assert str(info.value).startswith(f"{weights / 'last.pt'}: cannot write checkpoint (Input/output error)")
    assert ck.load_checkpoint(weights / "last.pt")["epoch"] == 0
    assert sorted(p.name for p in weights.iterdir()) == ["best.pt", "last.pt"]


# ------------------------------------------------------------------------------------------ row 28


def test_resume_with_a_changed_config_lists_every_differing_key(disk_full, tiny_data: Path, tmp_path: Path) -> None:
    _, _, last = disk_full
    cfg = make_config(tiny_data, tmp_path, resume=str(last), model="yolov5n", attention="cbam", lr0="0.02")
    with pytest.raises(DetectorError) as info:
        Trainer(cfg)
    message = str(info.value)
    assert message.startswith(f"resume: {last} was trained with a different config (")
    for diff in ("model: 'yolo-c2f-n' -> 'yolov5n'", f"lr0: {TrainConfig().lr0!r} -> 0.02", "attention: '' -> 'cbam'"):
        assert diff in message
    safe = Trainer(make_config(tiny_data, tmp_path, resume=str(last), batch="4", workers="1", device="cpu", epochs="3"))
    assert (safe.cfg.batch, safe.cfg.workers, safe.cfg.device, safe.cfg.epochs, safe.cfg.model) == (4, 1, "cpu", 3, "yolo-c2f-n")


def test_resume_after_the_dataset_gained_a_class_lists_what_changed(disk_full, tiny_data: Path, tmp_path: Path) -> None:
    _, _, last = disk_full
    data = Path(shutil.copytree(tiny_data.parent, tmp_path / "data")) / tiny_data.name
    train_json = next((data.parent / "train").glob("*.json"))
    for split_json in (train_json, next((data.parent / "val").glob("*.json"))):  # both splits gained it
        coco = json.loads(split_json.read_text())
        coco["categories"].append({"id": 7, "name": "hexagon"})
        coco["annotations"][0]["category_id"] = 7
        split_json.write_text(json.dumps(coco))
    ckpt = ck.load_checkpoint(last)
    ckpt["train_config"]["data"] = str(data)  # the run was trained on this dataset, which has changed since
    ckpt["run_dir"] = str(tmp_path / "run")
    resumable = tmp_path / "run" / "weights" / "last.pt"
    resumable.parent.mkdir(parents=True)
    ck.save_checkpoint(resumable, ckpt)
    with pytest.raises(DetectorError) as info:
        train(make_config(data, tmp_path, resume=str(resumable)))
    assert str(info.value) == (
        f"resume: {resumable} was trained on other classes than {train_json} has now (nc: 6 -> 7; "
        "category_ids[6]: (none) -> 7; names[6]: (none) -> 'hexagon'); start a new run instead"
    )


# ------------------------------------------------------------------------------------------ row 23


def _val(capsys, tmp_path: Path, **options: str) -> str:
    """`detector val key=value ...` in this process; returns its one error line (exit status 2)."""
    args = [f"{k}={v}" for k, v in {"workers": "0", "project": str(tmp_path / "val"), **options}.items()]
    assert main(["val", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("detector val: error: ")
    return lines[0][len("detector val: error: "):]


@pytest.mark.parametrize(
    ("other", "expected"),
    [
        ({"cfg": "yolov5n", "nc": 6}, r"weights do not fit this model \(another model YAML or class count\?\): \d+ missing \(.*\); \d+ unexpected \("),
        # DecoupledDetect: the class convs of the 3 levels (weight and bias) change with nc, 3 anchors x nc rows
        ({"cfg": "yolo-c2f-n", "nc": 3}, r"weights do not fit this model .*: 6 shape mismatches \(layers\.22\.cls\.0\.2\.weight \(9, 64, 1, 1\) vs model \(18, 64, 1, 1\), layers\.22\.cls\.0\.2\.bias \(9,\) vs model \(18,\)"),
    ],
    ids=["other-model", "other-nc"],
)
@pytest.mark.usefixtures("cli_logging")
def test_val_of_weights_from_another_model_lists_the_keys(disk_full, tmp_path: Path, capsys, other: dict, expected: str) -> None:
    _, _, last = disk_full
    ckpt = ck.load_checkpoint(last)  # yolo-c2f-n, 6 classes
    foreign = build_model(other["cfg"], nc=other["nc"]).state_dict()
    ckpt["model"] = foreign
    ckpt["ema"] = dict(ckpt["ema"], module=foreign)
    spliced = tmp_path / "spliced.pt"
    ck.save_checkpoint(spliced, ckpt)
    assert re.match(f"{re.escape(str(spliced))}: {expected}", _val(capsys, tmp_path, weights=str(spliced)))


@pytest.mark.usefixtures("cli_logging")
def test_val_of_a_checkpoint_on_a_dataset_with_other_classes_is_refused(disk_full, make_data_yaml, tmp_path: Path, capsys) -> None:
    _, _, last = disk_full
    data = make_data_yaml()  # categories 1, 3, 7
    message = _val(capsys, tmp_path, weights=str(last), data=str(data), imgsz="64")
    assert re.match(r"val: .*last\.pt and .*instances\.json disagree: category ids \[1, 2, 3, 4, 5, 6\] against \[1, 3, 7\]", message)


# ------------------------------------------------------------------------------------------ row 26, the other files of a run


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FullFile:
    """A file open for writing on a full disk: every write raises ENOSPC (the bytes before it went in)."""

    def __init__(self, f) -> None:
        self._f = f

    def write(self, data):
        _no_space()

    def __getattr__(self, name: str):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


@pytest.mark.usefixtures("cli_logging")
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("target", ["results.csv", "metrics.json", "predictions.json", "args.yaml", "events.out.tfevents"])
def test_disk_full_on_a_run_file_is_one_line_naming_it_and_leaves_no_half_file(
    tiny_data: Path, tmp_path: Path, capfd, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    """ENOSPC while writing results.csv, the TensorBoard events, metrics.json, predictions.json or args.yaml: the
    error names the file, on one line (no traceback, from any thread: TensorBoard's writer thread printed its own
    before ours), and no temporary file is left in the run folder."""
    real_open = io.open

    def full_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return _FullFile(f) if target in str(file) and any(c in mode for c in "wax") else f

    monkeypatch.setattr(io, "open", full_open)
    monkeypatch.setattr("builtins.open", full_open)
    run = tmp_path / "runs" / "exp"
    args = [f"{k}={v}" for k, v in {**TINY, "data": str(tiny_data), "project": str(run.parent), "epochs": "1"}.items()]
    try:
        code = main(["train", *args])
    finally:
        monkeypatch.undo()
    assert code == 2
    lines = [ln for ln in capfd.readouterr().err.strip().splitlines() if ln.strip() and not ln.startswith("epoch ")]  # (the progress bar)
    (line,) = lines
    assert re.match(rf"detector train: error: {re.escape(str(run))}/{re.escape(target)}\S*: cannot write .*\(No space left on device\)", line)
    assert [p.name for p in run.rglob("*") if ".tmp" in p.name] == []

"""Checkpoints: atomic writes under faults (RELIABILITY 25, 26), refused pickles (22), foreign weights (23), RNG."""

from __future__ import annotations

import errno
import io
import os
import pickle
import random
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from detector.errors import DetectorError
from detector.models.builder import build_model
from detector.runtime import checkpoint as ck
from detector.train.ema import ModelEMA
from detector.train.optim import build_optimizer

TINY = {
    "nc": 2,
    "depth_multiple": 1.0,
    "width_multiple": 1.0,
    "anchors": [[10, 13, 16, 30, 33, 23]],
    "backbone": [[-1, 1, "Conv", [8, 3, 2]], [-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [16, 3, 2]]],
    "head": [[[2], 1, "Detect", ["nc", "anchors"]]],
}


def _state(model: nn.Module | None = None, epoch: int = 0) -> dict:
    """A complete checkpoint as the trainer writes it, after one optimizer step."""
    model = model or build_model(TINY)
    optimizer = build_optimizer(model, "SGD", lr=0.01, momentum=0.9, weight_decay=5e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()  # momentum buffers in the optimizer state
    ema = ModelEMA(model)
    ema.update(model)
    return {
        "format_version": ck.FORMAT_VERSION,
        "version": "0.1.0",
        "model_yaml": model.yaml,
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": None,
        "epoch": epoch,
        "train_state": {"epoch": epoch, "best_fitness": 0.25, "best_epoch": epoch, "nonfinite_total": 0},
        "rng": ck.capture_rng_state(),
        "train_config": {"epochs": 3, "lr0": 0.01, "data": "data/shapes.yaml", "cos_lr": True},
        "names": ["circle", "square"],
        "category_ids": [1, 7],
        "imgsz": 32,
        "run_dir": "runs/train/exp",
    }


# ------------------------------------------------------------------------------------------ round trip


def test_keys_are_defined_once() -> None:
    assert set(_state()) == ck.CHECKPOINT_KEYS


def test_round_trip(tmp_path: Path) -> None:
    state = _state()
    path = tmp_path / "weights" / "last.pt"
    path.parent.mkdir()
    ck.save_checkpoint(path, state)
    loaded = ck.load_checkpoint(path)
    assert set(loaded) == ck.CHECKPOINT_KEYS
    assert loaded["names"] == ["circle", "square"] and loaded["category_ids"] == [1, 7]
    assert loaded["model_yaml"] == state["model_yaml"]
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value)
    assert loaded["optimizer"]["param_groups"][0]["name"] == "decay"
    assert os.listdir(path.parent) == ["last.pt"]  # no temporary file left behind


@pytest.mark.skipif(os.name != "posix", reason="a folder is fsynced only on POSIX")
@pytest.mark.parametrize("write", ["save", "link", "copy"])
def test_the_file_is_synced_before_its_rename_and_the_folder_after(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   write: str) -> None:
    """Power lost right after a save must find either the old or the whole new file under the name: the bytes reach
    the disk before the rename, and the rename itself (the folder's entry) reaches it before the call returns."""
    import stat

    path = tmp_path / "last.pt"
    ck.save_checkpoint(tmp_path / "source.pt", _state())
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: os.PathLike, dst: os.PathLike) -> None:
        calls.append(f"rename to {Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    def no_links(*_: object) -> None:
        raise OSError(errno.EXDEV, "no hard links here")

    if write == "save":
        ck.save_checkpoint(path, _state())
    else:
        if write == "copy":
            monkeypatch.setattr(os, "link", no_links)
        ck.copy_checkpoint(tmp_path / "source.pt", path)
    assert calls == ["fsync file", "rename to last.pt", "fsync folder"]


def test_overwrite_replaces(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    ck.save_checkpoint(path, _state(epoch=0))
    ck.save_checkpoint(path, _state(epoch=1))
    assert ck.load_checkpoint(path)["epoch"] == 1


def test_model_from_checkpoint(tmp_path: Path) -> None:
    state = _state()
    state["ema"]["module"] = {k: v + 0.5 if v.is_floating_point() else v for k, v in state["ema"]["module"].items()}
    path = tmp_path / "best.pt"
    ck.save_checkpoint(path, state)
    ckpt = ck.load_checkpoint(path)
    model = ck.model_from_checkpoint(ckpt, source=str(path))
    assert not model.training
    for key, value in ckpt["ema"]["module"].items():
        assert torch.equal(model.state_dict()[key], value)
    raw = ck.model_from_checkpoint(ckpt, use_ema=False)
    for key, value in ckpt["model"].items():
        assert torch.equal(raw.state_dict()[key], value)
    weight = "layers.0.conv.weight"  # the two sets differ (by 0.5), so each load is told apart
    assert not torch.equal(model.state_dict()[weight], raw.state_dict()[weight])
    ckpt["ema"] = None  # no EMA: the raw weights
    assert torch.equal(ck.model_from_checkpoint(ckpt).state_dict()["layers.0.conv.weight"], ckpt["model"]["layers.0.conv.weight"])


def test_an_inference_file_keeps_the_weights_it_is_used_with_and_nothing_a_resume_needs(tmp_path: Path) -> None:
    state = _state()
    ema = state["ema"]["module"]
    state["ema"]["module"] = {k: v + 0.5 if v.is_floating_point() else v for k, v in ema.items()}  # apart from the raw ones
    state["scaler"] = torch.amp.GradScaler("cpu").state_dict() | {"scale": 1024.0, "_growth_tracker": 7}  # fp16 was on
    full, slim = tmp_path / "full.pt", tmp_path / "slim.pt"
    ck.save_checkpoint(full, state)
    ck.save_checkpoint(slim, ck.inference_checkpoint(ck.load_checkpoint(full)))
    loaded = ck.load_checkpoint(slim)  # still a complete checkpoint to the loader
    assert (loaded["ema"], loaded["optimizer"], loaded["scaler"]) == (None, None, None)
    assert loaded["names"] == state["names"] and loaded["train_state"] == state["train_state"]
    a, b = ck.model_from_checkpoint(ck.load_checkpoint(full)), ck.model_from_checkpoint(loaded)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())  # the EMA weights, bit for bit
    assert not all(torch.equal(state["model"][k], v) for k, v in loaded["model"].items())  # not the raw ones
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(a(x)[0], b(x)[0])
    without_ema = {**state, "ema": None}
    assert ck.inference_checkpoint(without_ema)["model"] is state["model"]  # no EMA kept: the raw weights
    assert slim.stat().st_size < full.stat().st_size


# ------------------------------------------------------------------------------------------ faults while writing


def _half_then_fail(exc: BaseException):
    real_save = torch.save

    def fake_save(obj: object, f: io.BufferedWriter) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise exc

    return fake_save


def test_disk_full_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    ck.save_checkpoint(path, _state(epoch=4))
    newer = _state(epoch=5)
    monkeypatch.setattr(torch, "save", _half_then_fail(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(DetectorError) as info:
        ck.save_checkpoint(path, newer)
    message = str(info.value)
    assert str(path) in message and "No space left on device" in message and "MiB" in message
    assert "\n" not in message
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["epoch"] == 4
    assert os.listdir(tmp_path) == ["last.pt"]


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    ck.save_checkpoint(path, _state(epoch=1))
    monkeypatch.setattr(torch, "save", _half_then_fail(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(path, _state(epoch=2))
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


def test_missing_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DetectorError, match="cannot write checkpoint"):
        ck.save_checkpoint(tmp_path / "nowhere" / "last.pt", _state())


def test_temp_file_of_a_killed_writer_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    stale = tmp_path / ".last.pt.tmp-99999999"  # above any pid_max: that writer is gone
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / f".last.pt.tmp-{os.getppid()}"  # a writer still running (this process's parent)
    live.write_bytes(b"being written")
    ck.save_checkpoint(path, _state())
    assert not stale.exists() and live.read_bytes() == b"being written"


def test_temp_file_of_another_users_writer_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Signalling another user's process fails with EPERM: it exists, so its temp file is being written."""
    other = tmp_path / ".last.pt.tmp-4242"
    other.write_bytes(b"being written")
    monkeypatch.setattr(os, "kill", _raises(PermissionError(errno.EPERM, os.strerror(errno.EPERM))))
    ck.save_checkpoint(tmp_path / "last.pt", _state())
    assert other.read_bytes() == b"being written"


def test_copy_is_the_same_checkpoint_and_outlives_the_next_save(tmp_path: Path) -> None:
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    ck.save_checkpoint(last, _state(epoch=3))
    ck.copy_checkpoint(last, best)
    assert best.read_bytes() == last.read_bytes()
    ck.save_checkpoint(last, _state(epoch=4))  # replaces last.pt's name: the shared file stays best.pt's
    assert ck.load_checkpoint(best)["epoch"] == 3 and ck.load_checkpoint(last)["epoch"] == 4
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]


def test_a_save_or_copy_replaces_the_name_and_never_rewrites_the_file_a_reader_has_open(tmp_path: Path) -> None:
    """Atomic replacement: a reader of the previous last.pt or best.pt (an evaluation, a user's copy) still reads
    that whole file after the next save; the copy is a hard link where the filesystem has them (no byte written)."""
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    ck.save_checkpoint(last, _state(epoch=1))
    ck.save_checkpoint(best, _state(epoch=0))
    old_last, old_best = last.read_bytes(), best.read_bytes()
    with open(last, "rb") as reading_last, open(best, "rb") as reading_best:
        ck.save_checkpoint(last, _state(epoch=2))
        ck.copy_checkpoint(last, best)
        assert reading_last.read() == old_last and reading_best.read() == old_best
    assert ck.load_checkpoint(best)["epoch"] == 2 and os.path.samefile(last, best)


def test_copy_without_hard_links_writes_a_file_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    ck.save_checkpoint(last, _state(epoch=2))
    monkeypatch.setattr(os, "link", _raises(OSError(errno.EPERM, os.strerror(errno.EPERM))))  # e.g. FAT, some network shares
    ck.copy_checkpoint(last, best)
    assert best.read_bytes() == last.read_bytes() and best.stat().st_ino != last.stat().st_ino
    assert ck.load_checkpoint(best)["epoch"] == 2


def test_copy_failure_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    best = tmp_path / "best.pt"
    ck.save_checkpoint(best, _state(epoch=1))
    with pytest.raises(DetectorError) as info:
        ck.copy_checkpoint(tmp_path / "gone.pt", best)
    assert str(info.value).startswith(f"{best}: cannot write checkpoint (No such file or directory) from {tmp_path / 'gone.pt'}")
    assert ck.load_checkpoint(best)["epoch"] == 1 and os.listdir(tmp_path) == ["best.pt"]


# ------------------------------------------------------------------------------------------ background saves


def test_a_background_save_keeps_the_state_of_the_call_and_publishes_it_later(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`save` returns with the bytes written but not yet durable nor renamed; tensors changed after it returns do
    not reach the files; `wait` returns once they and the links are in place, renamed in the order given."""
    last, best, kept = tmp_path / "last.pt", tmp_path / "best.pt", tmp_path / "epoch4.pt"
    released = threading.Event()
    real_fsync, real_replace, renamed = os.fsync, os.replace, []
    monkeypatch.setattr(os, "fsync", lambda fd: (released.wait(10), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(Path(dst).name), real_replace(src, dst)))
    state = _state(epoch=3)
    saved = {k: v.clone() for k, v in state["model"].items()}
    writer = ck.CheckpointWriter()
    writer.save({best: ck.inference_checkpoint(state), last: state}, links={kept: last})
    assert not last.exists() and len(list(tmp_path.glob(".*.pt.tmp-*"))) == 2
    for value in state["model"].values():
        value.add_(1)
    released.set()
    writer.wait()
    loaded = ck.load_checkpoint(last)
    assert loaded["epoch"] == 3 and all(torch.equal(loaded["model"][k], v) for k, v in saved.items())
    assert ck.load_checkpoint(best)["optimizer"] is None and os.path.samefile(last, kept)
    assert renamed == ["best.pt", "last.pt", "epoch4.pt"] and sorted(os.listdir(tmp_path)) == ["best.pt", "epoch4.pt", "last.pt"]


def test_a_background_save_waits_for_the_one_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both saves use the same temporary name: the second may only write it once the first is renamed."""
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (time.sleep(0.3), real_fsync(fd)))
    writer = ck.CheckpointWriter()
    writer.save({tmp_path / "last.pt": _state(epoch=1)})
    writer.save({tmp_path / "last.pt": _state(epoch=2)})
    writer.wait()
    assert ck.load_checkpoint(tmp_path / "last.pt")["epoch"] == 2 and os.listdir(tmp_path) == ["last.pt"]


def test_a_background_failure_is_raised_once_by_wait_and_keeps_the_previous_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """best.pt's rename fails: the error names it, and last.pt's new file (not renamed yet) is removed too."""
    path = tmp_path / "last.pt"
    writer = ck.CheckpointWriter()
    writer.save({path: _state(epoch=1)})
    writer.wait()
    monkeypatch.setattr(os, "fsync", _raises(OSError(errno.EIO, os.strerror(errno.EIO))))
    writer.save({tmp_path / "best.pt": _state(epoch=2), path: _state(epoch=2)})  # the failure happens in the background
    with pytest.raises(DetectorError) as info:
        writer.wait()
    assert str(info.value).startswith(f"{tmp_path / 'best.pt'}: cannot write checkpoint (Input/output error) while writing about ")
    assert str(info.value).endswith("MiB; any previous best.pt is left intact")
    writer.wait()  # raised once
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["epoch"] == 1 and os.listdir(tmp_path) == ["last.pt"]
    writer.save({path: _state(epoch=3)})
    writer.wait()
    assert ck.load_checkpoint(path)["epoch"] == 3


def _raises(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc
    return fail


def test_non_plain_value_is_refused_before_writing(tmp_path: Path) -> None:
    state = _state()
    state["train_state"]["best_fitness"] = np.float64(0.5)  # would be pickled as a numpy object
    with pytest.raises(TypeError, match=r"checkpoint.train_state.best_fitness: float64 is not a plain value"):
        ck.save_checkpoint(tmp_path / "last.pt", state)
    state["train_state"]["best_fitness"] = 0.5
    state["train_config"]["data"] = Path("data.yaml")
    with pytest.raises(TypeError, match="checkpoint.train_config.data: PosixPath|WindowsPath"):
        ck.save_checkpoint(tmp_path / "last.pt", state)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ reading


class _Payload:
    """Unpickling this runs code that creates a marker file (what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_payload_is_live_for_plain_pickle(tmp_path: Path) -> None:
    """The crafted payload does run under a normal unpickler, so the next test proves something."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps({"model": _Payload(marker)}))
    assert marker.exists()


@pytest.mark.parametrize(("writer", "reason"), [("torch.save", "GLOBAL exec"), ("pickle-2", "exec"), ("pickle-5", "Unsupported operand")])
def test_malicious_checkpoint_is_refused_not_executed(tmp_path: Path, writer: str, reason: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"format_version": 1, "model": _Payload(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=int(writer[-1])))
    with pytest.raises(DetectorError) as info:
        ck.load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: refused to load it (not a plain checkpoint; weights_only=True): ")
    assert reason in message and "\n" not in message
    assert not marker.exists()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DetectorError, match=f"{tmp_path / 'gone.pt'}: checkpoint not found"):
        ck.load_checkpoint(tmp_path / "gone.pt")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "truncated"])
def test_corrupt_file(tmp_path: Path, content: bytes | str) -> None:
    path = tmp_path / "last.pt"
    if content == "truncated":
        ck.save_checkpoint(path, _state())
        content = path.read_bytes()[:1000]
    path.write_bytes(content)
    with pytest.raises(DetectorError, match=f"{re.escape(str(path))}: (not a readable checkpoint|refused to load it)"):
        ck.load_checkpoint(path)


def test_bare_state_dict_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(build_model(TINY).state_dict(), path)
    with pytest.raises(DetectorError, match="not a detector checkpoint"):
        ck.load_checkpoint(path)


def test_newer_format_and_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    state = _state()
    state["format_version"] = ck.FORMAT_VERSION + 1
    torch.save(state, path)
    with pytest.raises(DetectorError, match="newer than this detector reads"):
        ck.load_checkpoint(path)
    state = _state()
    del state["names"], state["rng"]
    torch.save(state, path)
    with pytest.raises(DetectorError, match="lacks keys names, rng"):
        ck.load_checkpoint(path)


@pytest.mark.parametrize(("edit", "message"), [
    ({"imgsz": float("nan")}, "checkpoint 'imgsz' must be an image size in 1..8192, got nan"),
    ({"imgsz": "abc"}, "checkpoint 'imgsz' must be an image size in 1..8192, got 'abc'"),
    ({"names": ["circle"]}, "checkpoint lists 1 class names but 2 category ids"),
    ({"names": ["circle", 3]}, "checkpoint 'names' must be a non-empty list of class names, got \\['circle', 3\\]"),
    ({"category_ids": [1, 1]}, "checkpoint 'category_ids' must be distinct integers, got \\[1, 1\\]"),
    ({"category_ids": [1, "7"]}, "checkpoint 'category_ids' must be distinct integers, got \\[1, '7'\\]"),
])
def test_the_metadata_inference_reads_is_checked_when_loaded(tmp_path: Path, edit: dict, message: str) -> None:
    """An edited or foreign checkpoint failed later in predict (IndexError) or in the Detector (ValueError)."""
    path = tmp_path / "best.pt"
    torch.save({**_state(), **edit}, path)
    with pytest.raises(DetectorError, match=rf"^{re.escape(str(path))}: {message}$"):
        ck.load_checkpoint(path)


def test_a_format_version_that_is_no_integer_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    state = _state()
    state["format_version"] = "1"
    torch.save(state, path)
    with pytest.raises(DetectorError, match=r"last.pt: not a detector checkpoint \(format_version '1' is not an integer\)"):
        ck.load_checkpoint(path)


# ------------------------------------------------------------------------------------------ foreign weights


def test_other_class_count_lists_shape_mismatches() -> None:
    theirs = build_model(TINY, nc=5).state_dict()
    with pytest.raises(DetectorError) as info:
        ck.load_model_weights(build_model(TINY), theirs, "runs/x/weights/best.pt")
    message = str(info.value)
    assert message.startswith("runs/x/weights/best.pt: weights do not fit this model")
    assert "2 shape mismatches (layers.3.m.0.weight (30, 16, 1, 1) vs model (21, 16, 1, 1), layers.3.m.0.bias (30,) vs model (21,))" in message
    assert "missing" not in message and "unexpected" not in message


def test_other_architecture_lists_keys_with_counts() -> None:
    deeper = dict(TINY, backbone=[*TINY["backbone"], [-1, 1, "Conv", [16, 3, 1]]], head=[[[3], 1, "Detect", ["nc", "anchors"]]])
    theirs = build_model(deeper).state_dict()
    with pytest.raises(DetectorError) as info:
        ck.load_model_weights(build_model(TINY), theirs, "other.pt")
    message = str(info.value)
    assert "4 missing (layers.3.anchors, layers.3.stride, layers.3.m.0.weight, ...)" in message
    assert "10 unexpected (layers.3.conv.weight, layers.3.bn.weight, layers.3.bn.bias, ...)" in message
    assert "\n" not in message


# ------------------------------------------------------------------------------------------ RNG


def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(1).tolist(), [random.random() for _ in range(3)], random.gauss(0, 1)


def test_rng_round_trip_through_a_file(tmp_path: Path) -> None:
    np.random.randn(1)  # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)  # and one in python's
    state = ck.capture_rng_state()
    expected = _draws()
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    _draws()
    ck.restore_rng_state(torch.load(path, weights_only=True))
    assert _draws() == expected

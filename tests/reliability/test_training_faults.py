"""Faults inside a training run: an image that vanishes mid-run (RELIABILITY row 3), a non-finite step (29),
amp=fp16 on a CPU (30), and a resumed run replaying an uninterrupted one exactly (24, with the loader property
it rests on).

One run (`faulty_run`) carries the first three faults at once, so the fast tests share two epochs of training.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from detector.config import TrainConfig
from detector.data import loader as loader_module
from detector.data import transforms as transforms_module
from detector.runtime.checkpoint import load_checkpoint
from detector.train.trainer import Trainer, train
from reliability_helpers import read_results
from tiny_run import make_config

POISONED_CALL = 2  # the input of the 2nd step (epoch 0, iteration 1) holds inf; 2 steps an epoch, 4 in all


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def faulty_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, list[str]]]:
    """Two epochs with amp=fp16 on the CPU, a train image deleted after the scan and one input holding inf (a NaN forward).
    Yields (run folder, deleted file, log messages)."""
    root = tmp_path_factory.mktemp("faulty")
    data = Path(shutil.copytree(tiny_data.parent, root / "data")) / tiny_data.name
    victim = sorted((data.parent / "train" / "images").iterdir())[3]
    real_build, real_input = loader_module.build_train_loader, transforms_module.to_model_input
    calls = {"n": 0}

    def build_then_delete(*args, **kwargs):
        loader = real_build(*args, **kwargs)
        victim.unlink()
        return loader

    def poisoned(*args, **kwargs):
        images = real_input(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == POISONED_CALL:  # an overflowing activation: NaN from the first BatchNorm on, the loss too
            images = images.clone()
            images[0, :, :4, :4] = float("inf")
        return images

    records = _Records()
    logging.getLogger("detector").addHandler(records)
    logging.getLogger("detector").setLevel(logging.INFO)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loader_module, "build_train_loader", build_then_delete)
        mp.setattr(transforms_module, "to_model_input", poisoned)  # the trainer imports it at each epoch
        # cache off: the deleted file must be read from disk mid-run (the RAM cache would hold it from the start)
        cfg = make_config(data, root / "runs", epochs="2", amp="fp16", device="cpu", nbs="8", max_nonfinite="2", cache="")
        try:
            train(cfg)
        finally:
            logging.getLogger("detector").removeHandler(records)
            logging.getLogger("detector").setLevel(logging.NOTSET)
    yield root / "runs" / "exp", victim, records.messages


def test_an_image_vanishing_mid_run_is_replaced_and_named_once(faulty_run) -> None:
    run, victim, messages = faulty_run
    named = [m for m in messages if str(victim) in m and "using another image instead" in m]
    assert len(named) == 1  # the reader's warning comes once per run
    assert [r["epoch"] for r in read_results(run)] == ["0", "1"]  # the run went on
    assert [r["unreadable_images"] for r in read_results(run)] == ["1", "1"]  # counted per epoch in results.csv
    for epoch in (1, 2):  # and the epoch's summary names it each epoch
        assert sum(m.startswith(f"epoch {epoch}: 1 unreadable image(s) replaced") and str(victim) in m for m in messages) == 1


def test_a_nonfinite_step_is_skipped_counted_and_keeps_ema_and_weights_clean(faulty_run) -> None:
    run, _, messages = faulty_run
    assert [r["nonfinite_steps"] for r in read_results(run)] == ["1", "0"]
    assert sum("non-finite loss/gradients at epoch 1 iteration 1: step skipped" in m for m in messages) == 1
    last = load_checkpoint(run / "weights" / "last.pt")
    assert last["train_state"]["nonfinite_total"] == 1
    assert last["ema"]["updates"] == 3  # 4 steps, the NaN one skipped: the EMA saw only finite weights
    for weights in (last["model"], last["ema"]["module"]):  # the BatchNorm statistics too: the skipped forward's
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())  # are undone


def test_amp_fp16_on_the_cpu_is_off_and_said_once(faulty_run) -> None:
    run, _, messages = faulty_run
    assert sum("amp=fp16 ignored on the CPU" in m for m in messages) == 1
    last = load_checkpoint(run / "weights" / "last.pt")
    assert last["scaler"] is None and last["train_config"]["amp"] == "fp16"
    assert all(v.dtype == torch.float32 for v in last["model"].values() if v.is_floating_point())


def test_an_epochs_batches_depend_on_the_seed_and_the_epoch_only(make_coco) -> None:
    """What a resume needs from the loader: epoch e of a fresh loader (fresh workers, empty mosaic buffers) equals
    epoch e of one that already ran epochs 0..e-1 with the same persistent worker."""
    split = make_coco()

    def epochs(loader, which: list[int]) -> list[torch.Tensor]:
        out = []
        for epoch in which:
            loader.set_epoch(epoch)
            out.append(torch.cat([torch.cat([b["images"].flatten().float(), b["targets"].flatten()]) for b in loader]))
        return out

    def build():
        return loader_module.build_train_loader(split, imgsz=64, batch_size=3, workers=1, hyp=TrainConfig(), seed=3)

    ran = epochs(build(), [0, 1, 2])
    (fresh,) = epochs(build(), [2])
    assert torch.equal(fresh, ran[2]) and not torch.equal(ran[1], ran[2])


@pytest.mark.slow
def test_resume_replays_an_uninterrupted_run_exactly(tiny_data: Path, tmp_path: Path, monkeypatch) -> None:
    """Row 24: epoch, LR, EMA, optimizer, RNG and data order continue, so the epoch losses and the final weights
    equal those of a run that was never stopped (CPU, deterministic=true; one persistent worker)."""
    keys = {"epochs": "2", "workers": "1", "deterministic": "true"}
    train(make_config(tiny_data, tmp_path, name="whole", **keys))
    real_epoch = Trainer.train_epoch

    def stop_at_epoch_1(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt  # after epoch 0 was checkpointed, as a kill would be
        return real_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", stop_at_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train(make_config(tiny_data, tmp_path, name="split", **keys))
    monkeypatch.undo()
    train(make_config(tiny_data, tmp_path, workers="1", resume=str(tmp_path / "split" / "weights" / "last.pt")))

    def curve(run: str) -> list[dict[str, str]]:
        return [{k: v for k, v in row.items() if k not in ("epoch_time_s", "val_time_s")} for row in read_results(tmp_path / run)]

    assert curve("split") == curve("whole") and len(curve("whole")) == 2
    whole, split = (load_checkpoint(tmp_path / run / "weights" / "last.pt") for run in ("whole", "split"))
    assert split["ema"]["updates"] == whole["ema"]["updates"]
    for key, value in whole["model"].items():
        assert torch.equal(split["model"][key], value), key
    for key, value in whole["ema"]["module"].items():
        assert torch.equal(split["ema"]["module"][key], value), key

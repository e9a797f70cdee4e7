"""Data that breaks after the scan or arrives in odd formats: RELIABILITY rows 3, 5, 13, 20, 21, 34 where the
tests under tests/data stop short (worker processes, the trainer and CLI paths, channel conversion, `download:`)."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detector.cli import main
from detector.config import TrainConfig
from detector.data import coco as coco_module
from detector.data.coco import CocoDataset
from detector.data.loader import build_train_loader, build_val_loader
from detector.data.spec import load_data_spec
from detector.errors import DetectorError
from detector.models.builder import build_model
from detector.train.trainer import train
from reliability_helpers import shut_down_workers
from repo_paths import REPO_ROOT
from tiny_run import TINY, make_config

NO_MOSAIC = replace(TrainConfig(), mosaic=0.0)


# ------------------------------------------------------------------------------------------ row 3


def test_image_deleted_after_the_scan_is_substituted_inside_workers(make_coco) -> None:
    split = make_coco()
    loader = build_train_loader(split, imgsz=64, batch_size=3, workers=2, hyp=NO_MOSAIC, seed=0)
    (split.images / "img002.jpg").unlink()
    batches = list(loader)  # the worker that meets the missing file decodes another index instead
    assert sum(len(b["images"]) for b in batches) == 6
    named = [f for b in batches for meta in b["meta"] for f in meta["unreadable"]]  # the main process learns of it
    assert named == [str(split.images / "img002.jpg")]


def test_image_corrupted_after_the_scan_is_a_one_line_error_from_a_worker_under_strict(make_coco) -> None:
    split = make_coco()
    loader = build_train_loader(split, imgsz=64, batch_size=3, workers=2, hyp=NO_MOSAIC, seed=0, strict=True)
    victim = split.images / "img004.jpg"
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(DetectorError) as info:
        list(loader)
    shut_down_workers(loader)
    message = str(info.value)
    assert message.startswith(f"cannot read image {victim} (changed since the scan?)") and "\n" not in message


# ------------------------------------------------------------------------------------------ rows 5 and 20


def test_gray_rgba_16bit_reach_the_model_as_three_channels_and_tiny_images_are_skipped(make_coco) -> None:
    split = make_coco(ext="png")
    images = sorted(split.images.iterdir())
    pixels = np.asarray(Image.open(images[0]))
    Image.fromarray(pixels).convert("L").save(images[0])
    Image.fromarray(pixels).convert("RGBA").save(images[1])
    Image.fromarray(pixels[..., 1].astype(np.uint16) * 257).save(images[2])  # mode I;16
    Image.new("RGB", (8, 8)).save(images[3])
    assert Image.open(images[2]).mode == "I;16"
    ds = CocoDataset(split)
    assert ds.summary.problems["image under 10 px"] == [f"{images[3]} (8x8)"] and ds.summary.images_used == 5
    model = build_model("yolo-c2f-n", nc=3)  # ch: 3, as every bundled config
    for loader in (
        build_train_loader(split, imgsz=64, batch_size=5, workers=0, hyp=NO_MOSAIC, seed=0),
        build_val_loader(split, imgsz=64, batch_size=5, workers=0),
    ):
        batch = next(iter(loader))
        assert batch["images"].dtype == torch.uint8 and batch["images"].shape[:2] == (5, 3)
        gray = [i for i, m in enumerate(batch["meta"]) if m["file"] in (str(images[0]), str(images[2]))]
        assert len(gray) == 2
        for i in gray:  # converted by replicating the one channel
            assert torch.equal(batch["images"][i, 0], batch["images"][i, 1])
            assert torch.equal(batch["images"][i, 1], batch["images"][i, 2])
        model.eval()
        assert model(batch["images"].float() / 255).shape[0] == 5


def test_model_with_other_input_channels_is_refused_before_training(tiny_data: Path, tmp_path: Path) -> None:
    yaml_text = (REPO_ROOT / "configs/models/yolo-c2f-n.yaml").read_text()
    one_channel = tmp_path / "gray-model.yaml"
    one_channel.write_text("ch: 1\n" + yaml_text)
    with pytest.raises(DetectorError, match=r"takes ch=1 input channels, but training images are always loaded as 3-channel RGB"):
        train(make_config(tiny_data, tmp_path / "runs", model=str(one_channel), epochs="1"))
    assert not list((tmp_path / "runs").rglob("*.pt"))


# ------------------------------------------------------------------------------------------ row 13 (CLI)


@pytest.mark.usefixtures("cli_logging")
def test_empty_train_set_is_one_line_from_the_cli_before_the_model(make_data_yaml, tmp_path: Path, capsys) -> None:
    data = make_data_yaml(mutate=lambda d: d.update(annotations=[]))
    args = [f"{k}={v}" for k, v in {**TINY, "data": str(data), "project": str(tmp_path / "runs"), "epochs": "1"}.items()]
    assert main(["train", *args]) == 2
    captured = capsys.readouterr()
    train_json = data.parent / "train" / "instances.json"
    assert captured.err.strip().splitlines() == [f"detector train: error: no labelled images in {train_json}"]
    assert "optimizer:" not in captured.out  # stopped before the model and optimizer were built
    assert not list((tmp_path / "runs").rglob("*.*"))


# ------------------------------------------------------------------------------------------ row 21


def test_download_key_is_never_executed(make_data_yaml, tmp_path: Path, caplog) -> None:
    data = make_data_yaml()
    marker = tmp_path / "downloaded"
    script = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')"
    for download in (f"touch {marker}", f"python -c \"{script}\"", f"|\n  {script}\n"):
        data.write_text(data.read_text().split("download:")[0] + f"download: {download}\n")
        with caplog.at_level(logging.WARNING, logger="detector"):
            spec = load_data_spec(data)
        CocoDataset(spec.train)
        assert "'download' is ignored" in caplog.text
        caplog.clear()
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ row 34


def test_exception_in_a_worker_names_the_file(make_coco, monkeypatch) -> None:
    def broken(self, index):
        raise RuntimeError(f"decoder exploded on record {index}")

    monkeypatch.setattr(coco_module.CocoDataset, "load_image", broken)
    loader = build_train_loader(make_coco(), imgsz=64, batch_size=2, workers=2, hyp=TrainConfig(), seed=0)
    with pytest.raises(DetectorError) as info:
        next(iter(loader))
    shut_down_workers(loader)
    message = str(info.value)
    assert "\n" not in message and message.startswith("augmenting ") and ".jpg failed: RuntimeError: decoder exploded" in message


def test_dead_worker_is_a_one_line_error_not_a_hang(make_coco, monkeypatch) -> None:
    monkeypatch.setattr(coco_module.CocoDataset, "load_image", lambda self, index: os._exit(3))  # e.g. the OOM killer
    loader = build_train_loader(make_coco(), imgsz=64, batch_size=2, workers=2, hyp=TrainConfig(), seed=0)
    with pytest.raises(DetectorError, match=r"DataLoader worker \(pid\(s\) [\d, ]+\) exited unexpectedly; workers=0 shows"):
        next(iter(loader))
    shut_down_workers(loader)

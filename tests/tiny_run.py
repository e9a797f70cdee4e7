"""The tiny training run that the trainer, fine-tuning and reliability tests share: its keys, its dataset (a
module-scoped fixture: 16 train and 8 val shapes images of 128 px, 6 classes, registered by tests/conftest.py)
and its config.

Also the overfit run (`overfit`): a model trained until it knows 8 images, which the trainer's learning test and
the INT8 export's accuracy test share through conftest's session fixture `overfit_run` (trained once a session)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from detector.config import TrainConfig, build_options
from detector.data.synthetic import generate_shapes_dataset

TINY = {"model": "yolo-c2f-n", "imgsz": "128", "batch": "8", "workers": "0", "plots": "false", "autoanchor": "false"}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny synthetic dataset's YAML."""
    return generate_shapes_dataset(tmp_path_factory.mktemp("shapes"), seed=1, n_train=16, n_val=8, imgsz=128)


def make_config(data: Path, project: Path, **overrides: str) -> TrainConfig:
    """The tiny config as a TrainConfig (what `detector train key=value ...` builds)."""
    return build_options(TrainConfig, {**TINY, "data": str(data), "project": str(project), **overrides}, "test")


@dataclass(frozen=True)
class OverfitRun:
    """A finished overfit run: its dataset YAML (val = train), its run folder and the final metrics `train` gave."""

    data: Path
    run_dir: Path
    metrics: dict


def overfit(root: Path, model: str) -> OverfitRun:
    """About 120 optimizer steps on 8 images of 128 px, no augmentation, validated on those images at the end:
    enough for a model to detect them."""
    from detector.train.trainer import train

    generate_shapes_dataset(root / "d", seed=7, n_train=8, n_val=8, imgsz=128)
    same = root / "d" / "same.yaml"
    same.write_text("train: {images: train/images, annotations: train/instances_train.json}\n"
                    "val: {images: train/images, annotations: train/instances_train.json}\n")
    no_aug = {k: "0" for k in ("mosaic", "mixup", "hsv_h", "hsv_s", "hsv_v", "translate", "scale", "shear", "fliplr")}
    cfg = make_config(same, root, model=model, epochs="120", nbs="8", optimizer="AdamW", lr0="0.002",
                      momentum="0.9", warmup_bias_lr="0", warmup_min_iters="10", val_interval="1000", **no_aug)
    return OverfitRun(same, root / "exp", train(cfg))

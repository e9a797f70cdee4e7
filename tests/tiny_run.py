"""The tiny training run that the trainer, fine-tuning and reliability tests share: its keys, its dataset (a
module-scoped fixture: 16 train and 8 val shapes images of 128 px, 6 classes) and its config. A test module
imports the fixture by name to use it."""

from __future__ import annotations

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

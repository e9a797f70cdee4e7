"""What the trainer tests share: a tiny run's keys, its dataset (a fixture) and its config."""

from __future__ import annotations

from pathlib import Path

import pytest

from detector.config import TrainConfig, build_options
from detector.data.synthetic import generate_shapes_dataset

TINY = {"model": "yolo-c2f-n", "imgsz": "128", "batch": "8", "workers": "0", "plots": "false", "autoanchor": "false"}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes_dataset(tmp_path_factory.mktemp("shapes"), seed=1, n_train=16, n_val=8, imgsz=128)


def make_config(data: Path, project: Path, **overrides: str) -> TrainConfig:
    values = {**TINY, "data": str(data), "project": str(project), **overrides}
    return build_options(TrainConfig, values, "test")

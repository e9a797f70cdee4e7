"""Fixtures of the reliability tests (the helpers are in reliability_helpers.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from detector.data.synthetic import generate_shapes_dataset


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny synthetic dataset (16 train, 8 val images of 128 px, 6 classes); returns its dataset YAML."""
    return generate_shapes_dataset(tmp_path_factory.mktemp("shapes"), seed=1, n_train=16, n_val=8, imgsz=128)


@pytest.fixture
def cli_logging() -> Iterator[None]:
    """For tests that call `detector.cli.main` in-process: it points the root logger at this test's captured
    stdout (logging.basicConfig(force=True)); put the session's handlers back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)

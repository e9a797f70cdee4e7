"""Fixtures of the reliability tests (the helpers are in reliability_helpers.py, the tiny run in tests/tiny_run.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest



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

"""The CLI surface: help lists every key, bad input gives one line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from detector.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout the tests run in


def test_help_lists_every_train_key(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("epochs=100", "lr0=", "attention=", "close_mosaic=", "amp=auto"):
        assert key in out


def test_unknown_command(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_bad_key_is_one_line_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "detector", "train", "epohcs=3"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["detector train: error: command line: unknown key 'epohcs' (did you mean 'epochs'?)"]
    verbose = subprocess.run([sys.executable, "-m", "detector", "train", "epohcs=3", "--verbose"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr

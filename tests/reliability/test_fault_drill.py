"""The fault drill (RELIABILITY rows 24, 25): SIGKILL a real `detector train` during an epoch, during validation
and during a checkpoint write, resume after each, and check the finished run: every epoch once in results.csv,
every .pt loadable, best.pt there, no half-written file anywhere, and its curve and weights those of the same run
never stopped (deterministic=true).

Each kill point is reached exactly, not by timing: a sitecustomize injected on PYTHONPATH (reliability_helpers.HOOKS)
parks the process at that moment and writes a marker file; the test SIGKILLs it once the marker appears.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from detector.runtime.checkpoint import load_checkpoint
from reliability_helpers import REPO_ROOT, cli_args, hooks_env, read_results, run_until_parked


EPOCHS = 3


@pytest.mark.slow
def test_kill_during_epoch_validation_and_checkpoint_write_then_resume(tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "exp"
    last = run / "weights" / "last.pt"
    marker = tmp_path / "parked"
    fresh = cli_args(tiny_data, tmp_path / "runs", epochs=str(EPOCHS), deterministic="true")
    resume = cli_args(tiny_data, tmp_path / "runs", resume=str(last))

    # 1. mid-epoch: parked after the first optimizer step of epoch 1 (epoch 0 is checkpointed)
    run_until_parked(fresh, hooks_env(tmp_path, DRILL_PARK="step", DRILL_MARKER=str(marker)), marker, tmp_path / "1.log")
    assert load_checkpoint(last)["epoch"] == 0
    assert [r["epoch"] for r in read_results(run)] == ["0"]

    # 2. mid-validation: the resumed run redoes epoch 1 and is parked after its first validation batch
    run_until_parked(resume, hooks_env(tmp_path, DRILL_PARK="val", DRILL_MARKER=str(marker)), marker, tmp_path / "2.log")
    assert load_checkpoint(last)["epoch"] == 0

    # 3. mid-write: epoch 1 done, validated and logged; half of its last.pt is in the temporary file
    run_until_parked(resume, hooks_env(tmp_path, DRILL_PARK="save", DRILL_MARKER=str(marker)), marker, tmp_path / "3.log")
    (half,) = (run / "weights").glob(".last.pt.tmp-*")
    assert 0 < half.stat().st_size < last.stat().st_size
    assert load_checkpoint(last)["epoch"] == 0  # the previous checkpoint is untouched
    assert [r["epoch"] for r in read_results(run)] == ["0", "1"]  # logged before the write; redone on resume

    # 4. resume to the end (the hooks file is there, but no hook is switched on)
    done = subprocess.run(resume, cwd=REPO_ROOT, env=hooks_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

    assert [r["epoch"] for r in read_results(run)] == [str(e) for e in range(EPOCHS)]
    assert load_checkpoint(last)["epoch"] == EPOCHS - 1
    best = load_checkpoint(run / "weights" / "best.pt")
    assert 0 <= best["train_state"]["best_epoch"] < EPOCHS
    for pt in run.rglob("*.pt"):
        load_checkpoint(pt)  # raises on a truncated file
    assert [p.name for p in run.rglob("*") if ".tmp" in p.name] == []

    # 5. the same run never stopped, in one process: the same losses, LR and metrics every epoch, the same weights
    whole = subprocess.run(cli_args(tiny_data, tmp_path / "runs", epochs=str(EPOCHS), deterministic="true", name="whole"),
                           cwd=REPO_ROOT, env=hooks_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, (whole.stdout + whole.stderr)[-3000:]

    def curve(folder: Path) -> list[dict[str, str]]:
        return [{k: v for k, v in row.items() if k not in ("epoch_time_s", "val_time_s")} for row in read_results(folder)]

    assert curve(run) == curve(tmp_path / "runs" / "whole")
    killed, uninterrupted = load_checkpoint(last), load_checkpoint(tmp_path / "runs" / "whole" / "weights" / "last.pt")
    for part in ("model", "ema"):
        own, other = (killed[part], uninterrupted[part]) if part == "model" else (killed[part]["module"], uninterrupted[part]["module"])
        assert all(torch.equal(own[key], value) for key, value in other.items()), part

"""The soak: 30 epochs of the tiny config with 2 data workers. Host memory does not creep (RSS at epoch 30 within
10% of epoch 5, for the training process and for its worker processes) and the run folder holds exactly the
files a run writes, nothing half-written or left over.

RSS is read from /proc by a hook injected into the subprocess (reliability_helpers.HOOKS, DRILL_RSS) at the same
point of every epoch: when its training pass ends, before validation, so the last epoch's plots do not count.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from detector.runtime.checkpoint import load_checkpoint
from reliability_helpers import REPO_ROOT, cli_args, hooks_env, read_results


EPOCHS = 30
BASELINE_EPOCH = 4  # epoch 5, 0-based: start-up allocations (first validation, pycocotools, workers) are done
TOLERANCE = 0.10

RUN_FILES = {
    "args.yaml",
    "results.csv",
    "metrics.json",
    "predictions.json",
    "weights/last.pt",
    "weights/best.pt",
    "plots/results.png",
    "plots/pr_curve.png",
    "plots/confusion_matrix.png",
    "plots/val_batch0.jpg",
}


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RSS from /proc")
def test_thirty_epochs_with_workers_keep_memory_flat_and_the_run_folder_exact(tiny_data: Path, tmp_path: Path) -> None:
    rss_log = tmp_path / "rss.txt"
    cmd = cli_args(tiny_data, tmp_path / "runs", epochs=str(EPOCHS), workers="2", plots="true")
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=hooks_env(tmp_path, DRILL_RSS=str(rss_log)), capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    run = tmp_path / "runs" / "exp"

    samples = {}
    for line in rss_log.read_text().splitlines():
        epoch, main_kb, workers_kb = (int(v) for v in line.split())
        samples[epoch] = (main_kb, workers_kb)
    assert sorted(samples) == list(range(EPOCHS))
    for what, k in (("training process", 0), ("data workers", 1)):
        base, end = samples[BASELINE_EPOCH][k], samples[EPOCHS - 1][k]
        assert base > 0 and abs(end - base) <= TOLERANCE * base, (
            f"{what} RSS {base / 1024:.0f} MiB at epoch 5, {end / 1024:.0f} MiB at epoch 30: "
            f"{[round(s[k] / 1024) for _, s in sorted(samples.items())]}"
        )

    files = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}
    events = {f for f in files if f.startswith("events.out.tfevents.")}
    assert len(events) == 1
    assert files - events == RUN_FILES
    assert [r["epoch"] for r in read_results(run)] == [str(e) for e in range(EPOCHS)]
    assert load_checkpoint(run / "weights" / "last.pt")["epoch"] == EPOCHS - 1
    load_checkpoint(run / "weights" / "best.pt")

"""Helpers of the reliability tests: the tiny training config, `detector train` subprocesses and the
test-only hooks injected into them through a `sitecustomize` on PYTHONPATH (production code has no hooks).

The hooks (`HOOKS` below) are driven by environment variables that only these tests set:
  DRILL_PARK=step|val|save  park the process (sleep until killed) at that moment, after writing DRILL_MARKER:
                            step: after an optimizer step of a run that has a checkpoint (mid-epoch);
                            val:  after the first validation batch's NMS (mid-validation);
                            save: after half of the first checkpoint's bytes went to its temporary file.
  DRILL_RSS=<file>          append "<epoch> <VmRSS kB> <children's VmRSS kB>" when each epoch's training pass
                            ends (the children are the data-loader workers).
  DRILL_SAMPLER=<file>      append "<rank> <epoch> <indices>" for each epoch's sampler order (DDP tests).
  DRILL_WEIGHTS=<folder>    save each rank's final parameters as rank<k>.pt after `fit` (DDP tests).
  DRILL_LATE_LEAVE=<s>      rank 1 waits that long before a trainer closes (DDP tests of several runs in one job:
                            rank 0 starts the next run while rank 1 still holds the last one's process group).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from repo_paths import REPO_ROOT
from tiny_run import TINY


HOOKS = r'''
import io
import os
import time
from pathlib import Path


def _park() -> None:
    Path(os.environ["DRILL_MARKER"]).write_text(str(os.getpid()))
    time.sleep(600)  # the test SIGKILLs us here


def _install() -> None:
    park = os.environ.get("DRILL_PARK")
    if park == "step":
        from detector.train.trainer import Trainer

        real_step = Trainer._optimizer_step

        def step(self, *args):
            outcome = real_step(self, *args)
            if self.state.epoch >= 0:  # a completed epoch, so a checkpoint, exists
                _park()
            return outcome

        Trainer._optimizer_step = step
    elif park == "val":
        import detector.infer.evaluator as evaluator

        real_nms = evaluator.non_max_suppression

        def nms(*args, **kwargs):
            out = real_nms(*args, **kwargs)
            _park()
            return out

        evaluator.non_max_suppression = nms
    elif park == "save":
        import torch

        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            _park()

        torch.save = save
    if os.environ.get("DRILL_RSS"):
        from detector.train.trainer import Trainer

        real_epoch = Trainer.train_epoch

        def rss_kb(pid: str) -> int:
            status = Path(f"/proc/{pid}/status").read_text()
            return int(status.split("VmRSS:")[1].split()[0])

        def train_epoch(self, epoch):
            out = real_epoch(self, epoch)
            children = " ".join(p.read_text() for p in Path("/proc/self/task").glob("*/children")).split()
            with open(os.environ["DRILL_RSS"], "a") as f:
                f.write(f"{epoch} {rss_kb('self')} {sum(rss_kb(pid) for pid in children)}\n")
            return out

        Trainer.train_epoch = train_epoch
    if os.environ.get("DRILL_SAMPLER"):
        from torch.utils.data import DistributedSampler

        real_set_epoch = DistributedSampler.set_epoch

        def set_epoch(self, epoch):
            real_set_epoch(self, epoch)
            with open(os.environ["DRILL_SAMPLER"], "a") as f:
                f.write(f"{self.rank} {epoch} {','.join(map(str, iter(self)))}\n")

        DistributedSampler.set_epoch = set_epoch
    if os.environ.get("DRILL_WEIGHTS"):
        import torch

        from detector.train.trainer import Trainer

        real_fit = Trainer.fit

        def fit(self):
            out = real_fit(self)
            weights = {name: p.detach() for name, p in self.model.named_parameters()}
            torch.save(weights, Path(os.environ["DRILL_WEIGHTS"]) / f"rank{self.dist.rank}.pt")
            return out

        Trainer.fit = fit

    if os.environ.get("DRILL_LATE_LEAVE") and os.environ.get("RANK") == "1":
        from detector.train.trainer import Trainer
        real_close = Trainer.close
        def close(self):
            time.sleep(float(os.environ["DRILL_LATE_LEAVE"]))
            real_close(self)
        Trainer.close = close


if any(os.environ.get(k) for k in ("DRILL_PARK", "DRILL_RSS", "DRILL_SAMPLER", "DRILL_WEIGHTS", "DRILL_LATE_LEAVE")):
    _install()
'''


def cli_args(data: Path, project: Path, **overrides: str) -> list[str]:
    """`python -m detector train` with the tiny config (never the console script: the tests run from a checkout)."""
    values = {**TINY, "data": str(data), "project": str(project), **overrides}
    return [sys.executable, "-m", "detector", "train", *(f"{k}={v}" for k, v in values.items())]


def hooks_env(tmp_path: Path, **variables: str) -> dict[str, str]:
    """Environment for a subprocess with the test-only hooks installed (see the module docstring)."""
    folder = tmp_path / "hooks"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(HOOKS)
    path = os.pathsep.join(p for p in (str(folder), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **variables}


def read_results(run: Path) -> list[dict[str, str]]:
    with (run / "results.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def run_until_parked(cmd: list[str], env: dict[str, str], marker: Path, log: Path, timeout_s: float = 600) -> None:
    """Start `cmd`, wait until its hook writes `marker` (it is then parked at the chosen moment), SIGKILL it."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"never reached the kill point (exit {proc.poll()}):\n{log.read_text()[-3000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    marker.unlink()


def shut_down_workers(loader) -> None:
    """Stop a loader's persistent workers now. Left to the garbage collector after an error, torch's iterator is
    finalized inside a reference cycle and waits 5 s per worker (under pytest; a plain process exits at once)."""
    if loader._iterator is not None:
        loader._iterator._shutdown_workers()

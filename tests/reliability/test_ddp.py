"""DDP on CPU (gloo, torchrun): ranks stay identical, the sampler reshuffles per epoch, only rank 0 writes
(RELIABILITY row 31); no parameter left out of the backward for any attention variant (32); sync_bn=true on a CPU
is ignored with a warning (33); tune and ablate train run after run in one torchrun job."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from detector.errors import DetectorError
from detector.models.attention import ATTENTIONS
from detector.models.blocks import ATTENTION_PLACES, AttnC2f
from detector.models.builder import build_model
from reliability_helpers import REPO_ROOT, hooks_env, read_results
from tiny_run import TINY


ATTENTION_NAMES = sorted(ATTENTIONS.names())


@pytest.mark.parametrize("place", ATTENTION_PLACES)
@pytest.mark.parametrize("attention", ATTENTION_NAMES)
def test_every_parameter_gets_a_gradient_for_every_attention_and_place(attention: str, place: str) -> None:
    """What DDP needs to never stop with "Expected to have finished reduction": every parameter of an attention
    block takes part in the backward, whichever attention sits wherever (tests/models checks whole configs)."""
    block = AttnC2f(16, 32, 2, True, attention=attention, attention_at=place)
    block(torch.rand(2, 16, 16, 16)).square().mean().backward()
    assert [n for n, p in block.named_parameters() if p.grad is None] == []


def test_a_row_whose_output_nobody_reads_is_refused_at_build(tmp_path: Path) -> None:
    """The other way a module goes unused in forward: a dangling row in the YAML."""
    text = (REPO_ROOT / "configs/models/yolov5n.yaml").read_text()
    dangling = text.replace("  - [-1, 1, Conv, [512, 1, 1]]                  # 10", "  - [8, 1, Conv, [512, 1, 1]]                   # 10")
    assert dangling != text
    path = tmp_path / "dangling.yaml"
    path.write_text(dangling)
    with pytest.raises(DetectorError, match=r"backbone\[9\]: the output of SPPF \(layer 9\) is never used"):
        build_model(path)


@pytest.mark.slow
def test_two_gloo_ranks_stay_identical_reshuffle_and_ignore_sync_bn(tiny_data: Path, tmp_path: Path) -> None:
    sampler_log, weights = tmp_path / "sampler.txt", tmp_path / "weights"
    weights.mkdir()
    env = hooks_env(tmp_path, DRILL_SAMPLER=str(sampler_log), DRILL_WEIGHTS=str(weights))
    keys = {**TINY, "data": str(tiny_data), "project": str(tmp_path / "runs"), "epochs": "2", "device": "cpu",
            "model": "yolo-attn-n", "attention": "none", "sync_bn": "true"}
    output = _train_two_ranks(keys, env)
    assert "Expected to have finished reduction" not in output
    assert output.count("sync_bn=true ignored: SyncBatchNorm needs CUDA") == 1  # said once, by rank 0
    _assert_ranks_identical(weights)

    orders: dict[tuple[int, int], list[int]] = {}
    for line in sampler_log.read_text().splitlines():
        rank, epoch, indices = line.split()
        orders[int(rank), int(epoch)] = [int(i) for i in indices.split(",")]
    assert sorted(orders) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for epoch in (0, 1):
        assert sorted(orders[0, epoch] + orders[1, epoch]) == list(range(16))  # disjoint halves of the data
    assert orders[0, 0] != orders[0, 1]  # reshuffled per epoch

    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["exp"]  # only rank 0 writes
    assert [r["epoch"] for r in read_results(tmp_path / "runs" / "exp")] == ["0", "1"]
    assert len(list((tmp_path / "runs" / "exp").glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL and SyncBatchNorm need two GPUs (NCCL takes one rank per GPU)")
def test_two_nccl_ranks_with_sync_bn_stay_identical(tiny_data: Path, tmp_path: Path) -> None:
    """The GPU form of the drill above (#16 item 7): NCCL moves the gradients and the trainer's broadcasts, and
    sync_bn=true converts every BatchNorm, with no warning."""
    weights = tmp_path / "weights"
    weights.mkdir()
    env = hooks_env(tmp_path, DRILL_WEIGHTS=str(weights))
    keys = {**TINY, "data": str(tiny_data), "project": str(tmp_path / "runs"), "epochs": "2", "device": "0,1",
            "model": "yolo-ca-n", "sync_bn": "true", "amp": "bf16"}
    assert "sync_bn=true ignored" not in _train_two_ranks(keys, env)
    _assert_ranks_identical(weights)
    assert [r["epoch"] for r in read_results(tmp_path / "runs" / "exp")] == ["0", "1"]


@pytest.mark.slow
def test_tune_and_ablate_train_run_after_run_in_one_torchrun_job(tiny_data: Path, tmp_path: Path) -> None:
    """Rank 1 leaves each run 2 s after rank 0 (a hook): a trainer that tore its process group down and set a new one
    up for the next run broke the job that way ("Connection reset by peer", or a barrier that hung). Every run
    trains in both ranks; rank 0 alone writes the reports and prints them."""
    env = hooks_env(tmp_path, DRILL_LATE_LEAVE="2")
    common = {"data": str(tiny_data), "epochs": "1", "imgsz": "64", "batch": "8", "workers": "0", "device": "cpu"}
    output = _two_ranks("tune", {**common, "model": "yolo-c2f-n", "iterations": "2", "project": str(tmp_path / "tune"),
                                 "train": "plots=false,autoanchor=false"}, env)
    with (tmp_path / "tune" / "exp" / "tune_results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == ["1", "2"] and all(r["AP50:95"] != "" for r in rows)
    assert output.count("; best: trial") == 1  # printed by rank 0 only
    for k in (1, 2):
        assert [p.name for p in (tmp_path / "tune" / "exp" / "trials" / f"trial{k}" / "weights").iterdir()] == ["best.pt"]

    output = _two_ranks("ablate", {**common, "model": "yolo-attn-n", "attentions": "none,se",
                                   "project": str(tmp_path / "ablate"), "train": "plots=false,autoanchor=false"}, env)
    assert output.count("ablation: ") == 1
    table = (tmp_path / "ablate" / "exp" / "ablation.md").read_text()
    assert "| none |" in table and "| se |" in table


@pytest.mark.slow
def test_an_empty_val_split_stops_both_ranks_at_once(tiny_data: Path, tmp_path: Path) -> None:
    """Rank 0 alone scans the val split: its refusal reaches rank 1, which would otherwise wait for rank 0 in the
    next collective until the process group's timeout (30 minutes on gloo)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data.parent, data)
    spec = data / tiny_data.name
    val_json = data / yaml.safe_load(spec.read_text())["val"]["annotations"]
    coco = json.loads(val_json.read_text())
    val_json.write_text(json.dumps({**coco, "annotations": []}))
    keys = {**TINY, "data": str(spec), "project": str(tmp_path / "runs"), "epochs": "1", "device": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "detector", "train", *(f"{k}={v}" for k, v in keys.items())]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert proc.stderr.count("detector train: error: no labelled images in") == 1  # rank 0's line; rank 1's is its own
    assert "val split refused (rank 0 names why)" in proc.stderr
    assert not (tmp_path / "runs").exists()


def _train_two_ranks(keys: dict[str, str], env: dict[str, str]) -> str:
    """`detector train` with `keys` under torchrun, two ranks on this machine; its output, once it exited 0."""
    return _two_ranks("train", keys, env)


def _two_ranks(command: str, keys: dict[str, str], env: dict[str, str]) -> str:
    """`detector <command>` with `keys` under torchrun, two ranks on this machine; its output, once it exited 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "detector", command, *(f"{k}={v}" for k, v in keys.items())]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def _assert_ranks_identical(weights: Path) -> None:
    """Both ranks' final parameters (the DRILL_WEIGHTS hook's rank<k>.pt) are equal bit for bit."""
    rank0, rank1 = (torch.load(weights / f"rank{r}.pt", weights_only=True, map_location="cpu") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    assert [k for k in rank0 if not torch.equal(rank0[k], rank1[k])] == []

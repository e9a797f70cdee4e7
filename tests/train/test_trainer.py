"""The training loop end to end on tiny synthetic data: learning, resume after SIGKILL, non-finite guard,
TensorBoard tags, DDP through torchrun (gloo)."""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detector.config import TrainConfig, load_train_config
from detector.data.transforms import to_model_input
from detector.errors import DetectorError, TrainingDiverged
from detector.runtime.checkpoint import CheckpointWriter, load_checkpoint, save_checkpoint
from detector.train import trainer as trainer_module
from detector.train.trainer import Trainer, epochs_for_budget, train
from repo_paths import REPO_ROOT
from tiny_run import TINY, make_config



def read_results(run: Path) -> list[dict[str, str]]:
    with (run / "results.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_two_epochs_leave_a_complete_run_folder(tiny_data: Path, tmp_path: Path):
    metrics = train(make_config(tiny_data, tmp_path, epochs="2", plots="true", save_period="1"))
    run = tmp_path / "exp"
    assert {"AP", "AP50", "ARl"} <= set(metrics)
    rows = read_results(run)
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert all(r["metrics/AP"] != "" for r in rows)
    assert all(float(r["val_time_s"]) > 0 and float(r["epoch_time_s"]) > 0 for r in rows)  # validation timed apart
    ckpt = load_checkpoint(run / "weights" / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["names"] == ["circle", "triangle", "square", "star", "cross", "ring"]
    assert (run / "weights" / "best.pt").exists() and (run / "args.yaml").exists()
    assert (run / "plots" / "results.png").exists()
    best = load_checkpoint(run / "weights" / "best.pt")  # an inference file once the run ends
    assert (best["optimizer"], best["ema"], best["scaler"]) == (None, None, None) and ckpt["optimizer"] is not None
    kept = load_checkpoint(run / "weights" / f"epoch{best['train_state']['best_epoch'] + 1}.pt")  # save_period=1
    assert kept["ema"]["module"].keys() == best["model"].keys()  # the best epoch's EMA weights, bit for bit
    assert all(torch.equal(kept["ema"]["module"][k], v) for k, v in best["model"].items())
    assert (run / "weights" / "best.pt").stat().st_size < (run / "weights" / "last.pt").stat().st_size / 2
    with pytest.raises(DetectorError, match="is an inference file without optimizer state .* resume from the run's weights/last.pt"):
        Trainer(make_config(tiny_data, tmp_path, resume=str(run / "weights" / "best.pt")))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/box_loss", "train/obj_loss", "train/cls_loss", "train/lr", "metrics/AP", "metrics/AP50"} <= tags
    assert "train/batch0" in events.Tags()["images"]
    val_images = events.Images("val/predictions")  # one grid of val images with predictions per validation
    assert [e.step for e in val_images] == [0, 1] and all(e.width > 128 for e in val_images)
    # a second run with the same name goes to exp2
    assert Trainer(make_config(tiny_data, tmp_path, epochs="1")).run_dir == tmp_path / "exp2"


@pytest.mark.parametrize("fitnesses", [(0.5, 0.1), (0.1, 0.5)], ids=["first-best", "last-best"])
def test_best_pt_is_the_best_epochs_ema_whether_or_not_it_is_the_last(tiny_data: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch, fitnesses):
    """best.pt holds the best epoch's EMA weights as an inference file, whether that epoch is the first or the last."""
    import detector.infer.metrics as metrics_module

    scores = iter(fitnesses)
    monkeypatch.setattr(metrics_module, "fitness", lambda metrics: next(scores))
    train(make_config(tiny_data, tmp_path, epochs="2", save_period="1"))
    weights = tmp_path / "exp" / "weights"
    best = load_checkpoint(weights / "best.pt")
    best_epoch = fitnesses.index(max(fitnesses))
    assert best["train_state"]["best_epoch"] == best_epoch and best["epoch"] == best_epoch
    kept = load_checkpoint(weights / f"epoch{best_epoch + 1}.pt")["ema"]["module"]
    assert best["optimizer"] is None and kept.keys() == best["model"].keys()
    assert all(torch.equal(kept[k], v) for k, v in best["model"].items())


def test_a_resumed_run_without_a_new_best_makes_an_older_versions_full_best_pt_an_inference_file(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Runs of earlier versions linked best.pt to a full last.pt and stripped it at the end; resumed by this version
    with no better epoch to come, best.pt is stripped at the end as before."""
    import shutil

    import detector.infer.metrics as metrics_module

    scores = iter([0.5, 0.1, 0.1])
    monkeypatch.setattr(metrics_module, "fitness", lambda metrics: next(scores))
    train(make_config(tiny_data, tmp_path, epochs="2", save_period="1"))
    weights = tmp_path / "exp" / "weights"
    ema0 = load_checkpoint(weights / "epoch1.pt")["ema"]["module"]
    os.replace(weights / "epoch1.pt", weights / "last.pt")  # as if killed in epoch 1 (of 2)
    shutil.copyfile(weights / "last.pt", weights / "best.pt")  # best.pt as an earlier version left it
    train(make_config(tiny_data, tmp_path, resume=str(weights / "last.pt")))
    best = load_checkpoint(weights / "best.pt")
    assert best["optimizer"] is None and best["epoch"] == 0 and load_checkpoint(weights / "last.pt")["epoch"] == 1
    assert all(torch.equal(ema0[k], v) for k, v in best["model"].items())


def test_patience_ends_the_run_with_its_final_outputs_and_a_resume_finds_it_finished(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Epoch 1 (0-based) is the best and epochs 2 and 3 do not improve on it: with patience=2 the run stops after
    epoch 3 of 6 and writes what a run that reached its last epoch writes (predictions.json, the plots, the
    per-class table); its plan ends there, so resuming it is refused as finished."""
    import detector.infer.metrics as metrics_module

    scores = iter([0.2, 0.5, 0.3, 0.4, 0.9, 0.9])
    seen: dict[int, float] = {}  # one score per evaluation, however often its fitness is asked
    monkeypatch.setattr(metrics_module, "fitness", lambda metrics: seen.setdefault(id(metrics), next(scores)))
    metrics = train(make_config(tiny_data, tmp_path, epochs="6", patience="2", plots="true"))
    run = tmp_path / "exp"
    rows = list(csv.DictReader((run / "results.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"] and metrics["AP"] >= 0
    assert (run / "predictions.json").exists() and (run / "plots" / "pr_curve.png").exists()
    last = load_checkpoint(run / "weights" / "last.pt")
    assert last["epoch"] == 3 and last["train_state"]["epochs"] == 4 and last["train_state"]["best_epoch"] == 1
    assert load_checkpoint(run / "weights" / "best.pt")["epoch"] == 1
    with pytest.raises(DetectorError, match=r"stopped early \(patience=2\) after 4 of 6 epochs; nothing to resume"):
        Trainer(make_config(tiny_data, tmp_path, resume=str(run / "weights" / "last.pt")))
    longer = Trainer(make_config(tiny_data, tmp_path, resume=str(run / "weights" / "last.pt"), epochs="8"))
    assert longer.epochs == 8 and not longer.resume_ckpt["train_state"]["stopped_early"]
    longer.close()


def test_the_dataset_is_recorded_absolute_so_val_finds_it_from_another_folder(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """data= given relative to the folder of the run: args.yaml and the checkpoints record the file it named, so a
    later `detector val weights=...` (data defaulting to the training set) and a resume work from anywhere."""
    from detector.api import Detector

    monkeypatch.chdir(tiny_data.parent.parent)
    relative = str(tiny_data.relative_to(tiny_data.parent.parent))
    train(make_config(Path(relative), tmp_path, epochs="2", save_period="1"))
    weights = tmp_path / "exp" / "weights"
    assert load_checkpoint(weights / "last.pt")["train_config"]["data"] == str(tiny_data)
    assert f"data: {tiny_data}" in (tmp_path / "exp" / "args.yaml").read_text()
    monkeypatch.chdir(tmp_path)
    metrics = Detector(weights / "best.pt", device="cpu").val(workers=0, plots=False, project=str(tmp_path / "val"))
    assert metrics["AP"] >= 0 and (tmp_path / "val").exists()
    monkeypatch.chdir(tiny_data.parent.parent)
    os.replace(weights / "epoch1.pt", weights / "last.pt")  # as if killed in epoch 1 (of 2)
    resumed = Trainer(make_config(Path(relative), tmp_path, resume=str(weights / "last.pt")))  # the same file, given relative
    assert resumed.cfg.data == str(tiny_data)
    resumed.close()


def test_a_resume_restores_the_gradient_scalers_state(tiny_data: Path, tmp_path: Path):
    """An fp16 run's GradScaler comes back with its scale and growth count (a fresh scale of 65,536 would overflow
    and skip steps again). The scaler is off on a CPU: an enabled CPU GradScaler stands in for CUDA's."""
    train(make_config(tiny_data, tmp_path, epochs="2", save_period="1"))
    weights = tmp_path / "exp" / "weights"
    ckpt = dict(load_checkpoint(weights / "epoch1.pt"))  # as if killed in epoch 1 (of 2)
    ckpt["scaler"] = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                      "_growth_tracker": 7}
    save_checkpoint(weights / "last.pt", ckpt)
    trainer = Trainer(make_config(tiny_data, tmp_path, resume=str(weights / "last.pt")))
    trainer.scaler = torch.amp.GradScaler("cpu")
    try:
        trainer.build()
        assert trainer.scaler.get_scale() == 1024.0 and trainer.scaler.state_dict()["_growth_tracker"] == 7
    finally:
        trainer.close()


def test_fraction_trains_on_a_fixed_share_and_validates_on_all(tiny_data: Path, tmp_path: Path):
    from detector.data.coco import fraction_indices

    trainer = Trainer(make_config(tiny_data, tmp_path, fraction="0.5"))
    try:
        trainer.build()
        coco = trainer.train_set.coco
        assert len(trainer.train_set) == 8 and len(trainer.train_loader) == 1  # 16 images, batch 8
        assert coco.summary.images_usable == 16 and coco.num_classes == 6
        ids = [int(Path(coco.file(i)).stem.split("_")[-1]) for i in range(len(coco))]
        assert ids == fraction_indices(16, 0.5).tolist()  # the synthetic files are numbered in json order
        assert len(trainer.evaluator.loader.dataset) == 8  # all of val
    finally:
        trainer.close()


def test_the_validation_reports_the_names_of_the_data_yaml(tiny_data: Path, tmp_path: Path):
    """A dataset YAML's `names:` overrides the json's category names in the checkpoint and in every validation."""
    data = tmp_path / "named.yaml"
    data.write_text(tiny_data.read_text().replace("train: {images: ", f"path: {tiny_data.parent}\ntrain: {{images: ", 1)
                    + "names: [a, b, c, d, e, f]\n")
    trainer = Trainer(make_config(data, tmp_path))
    try:
        trainer.build()
        assert trainer.names == list("abcdef") and trainer.evaluator.names == list("abcdef")
    finally:
        trainer.close()


def test_nonfinite_losses_are_skipped_then_stop_the_run(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from detector.train import loss as loss_module

    real_call = loss_module.AlignedLoss.__call__  # the loss of yolo-c2f-n's DecoupledDetect head
    calls = {"n": 0}

    def poisoned(self, raw, targets):
        total, parts = real_call(self, raw, targets)
        calls["n"] += 1
        return (total * float("nan") if calls["n"] >= 3 else total), parts

    monkeypatch.setattr(loss_module.AlignedLoss, "__call__", poisoned)
    # epoch 0 (2 steps) is fine and checkpointed; from step 3 every loss is NaN
    cfg = make_config(tiny_data, tmp_path, epochs="3", max_nonfinite="2", nbs="8", warmup_min_iters="0", warmup_epochs="0")
    with pytest.raises(TrainingDiverged, match="2 non-finite steps in a row at epoch 2; last good checkpoint: .*last.pt"):
        train(cfg)
    last = load_checkpoint(tmp_path / "exp" / "weights" / "last.pt")
    assert last["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_a_grad_scaler_overflow_skips_the_step_without_counting_it_and_an_inf_loss_still_counts(
        tiny_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """fp16's GradScaler starts at a scale that overflows the first gradients by design: such a step (finite
    losses) is the scaler's to skip, not a non-finite step that warns and counts toward `max_nonfinite`. The CPU
    run gets a real, enabled GradScaler in place of the CUDA one (the trainer enables it on CUDA alone)."""
    trainer = Trainer(make_config(tiny_data, tmp_path, max_nonfinite="1"))
    try:
        trainer.build()
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        batch = next(iter(trainer.train_loader))
        images = to_model_input(batch["images"], trainer.device)

        def overflowing_step(losses_finite: torch.Tensor) -> str:
            parts, finite = trainer._forward_backward(images, batch["targets"], sync_now=True)
            assert bool(finite) and torch.isfinite(parts).all()
            next(p for p in trainer.model.parameters() if p.grad is not None).grad.fill_(float("inf"))
            return trainer._optimizer_step(losses_finite & finite)

        before = [p.detach().clone() for p in trainer.model.parameters()]
        assert overflowing_step(torch.tensor(True)) == "overflow"
        assert trainer.scaler.get_scale() == 2.0**9  # backed off
        assert all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
        skipped = trainer_module._SkippedSteps()
        caplog.clear()
        with caplog.at_level("WARNING"):
            trainer._count_skipped(skipped, "overflow", 0, 0)
        assert (skipped.in_row, skipped.in_epoch, trainer.state.nonfinite_total) == (0, 0, 0)
        assert [r for r in caplog.records if r.levelname == "WARNING"] == []
        assert overflowing_step(torch.tensor(False)) == "nonfinite"  # an inf or NaN loss is a fault, scaler or not
        with pytest.raises(DetectorError, match="1 non-finite steps in a row at epoch 1"):
            trainer._count_skipped(skipped, "nonfinite", 0, 1)
        assert trainer.state.nonfinite_total == 1
    finally:
        trainer.close()


def test_resume_refuses_a_changed_model_and_a_finished_run(tiny_data: Path, tmp_path: Path):
    train(make_config(tiny_data, tmp_path, epochs="1"))
    last = tmp_path / "exp" / "weights" / "last.pt"
    with pytest.raises(DetectorError, match=r"different config \(model: 'yolo-c2f-n' -> 'yolov5n'\)"):
        Trainer(make_config(tiny_data, tmp_path, resume=str(last), model="yolov5n"))
    with pytest.raises(DetectorError, match="already finished all 1 epochs; nothing to resume"):
        Trainer(make_config(tiny_data, tmp_path, resume=str(last)))
    with pytest.raises(DetectorError, match="nothing to resume"):
        Trainer(make_config(tiny_data, tmp_path / "empty", resume="true"))


def test_resume_false_trains_anew_and_a_yaml_true_finds_the_newest_run(tiny_data: Path, tmp_path: Path):
    """`resume=false` (or `resume: false` in a cfg file) is no resume, not a checkpoint path named 'false'; a cfg
    file's `resume: true` (a YAML boolean) is `resume=true`."""
    train(make_config(tiny_data, tmp_path, epochs="1"))
    fresh = Trainer(make_config(tiny_data, tmp_path, resume="false"))
    assert fresh.cfg.resume is False and fresh.run_dir == tmp_path / "exp2"
    fresh.close()
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text("resume: true\n")
    cfg = load_train_config({"cfg": str(cfg_file), "data": str(tiny_data), "project": str(tmp_path)})
    assert cfg.resume is True
    with pytest.raises(DetectorError, match="already finished all 1 epochs; nothing to resume"):
        Trainer(cfg)


def test_resume_sees_a_key_typed_at_its_default_value(tiny_data: Path, tmp_path: Path):
    """`lr0=0.003` is the default, but typed against a run trained with 0.002 it is a change: refused, not ignored."""
    train(make_config(tiny_data, tmp_path, epochs="2", lr0="0.002", save_period="1"))
    first = tmp_path / "exp" / "weights" / "epoch1.pt"
    assert TrainConfig().lr0 == 0.003
    with pytest.raises(DetectorError, match=r"different config \(lr0: 0.002 -> 0.003\)"):
        Trainer(make_config(tiny_data, tmp_path, resume=str(first), lr0="0.003"))
    resumed = Trainer(make_config(tiny_data, tmp_path, resume=str(first), workers="0", batch="4"))  # run-only keys
    assert resumed.cfg.lr0 == 0.002 and resumed.cfg.batch == 4


def test_a_resumed_run_continues_the_time_budget_and_may_change_it(tiny_data: Path, tmp_path: Path):
    train(make_config(tiny_data, tmp_path, epochs="1", time="0.5"))  # one epoch done, its time saved
    last = tmp_path / "exp" / "weights" / "last.pt"
    spent = load_checkpoint(last)["train_state"]["time_s"]
    assert spent > 0
    trainer = Trainer(make_config(tiny_data, tmp_path, resume=str(last), epochs="3", time="1.0"))
    trainer.build()
    assert trainer.cfg.time == 1.0 and trainer.cfg.epochs == 3
    assert trainer._time_before == spent and trainer._time_spent() > spent  # the clock goes on from the checkpoint's


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "detector", "train", *args]


def test_epochs_for_budget_counts_the_first_epoch_and_what_the_rest_holds():
    assert epochs_for_budget(600, spent_s=100, epoch_s=90) == 6  # 500 s left: 5 more epochs of 90 s
    assert epochs_for_budget(600, spent_s=100, epoch_s=100) == 6
    assert epochs_for_budget(100, spent_s=120, epoch_s=110) == 1  # over budget already: stop after the first


def test_a_budget_smaller_than_one_epoch_ends_the_run_after_it_with_the_final_outputs(tiny_data: Path, tmp_path: Path,
                                                                                       monkeypatch: pytest.MonkeyPatch):
    from detector.infer.evaluator import Evaluator

    runs, real_run = [], Evaluator.run
    monkeypatch.setattr(Evaluator, "run", lambda self, *a, **kw: runs.append(1) or real_run(self, *a, **kw))
    train(make_config(tiny_data, tmp_path, epochs="5", time="0.000001"))  # 3.6 ms
    assert len(runs) == 1  # the epoch's validation gives the final outputs too: the unchanged model is not run twice
    run = tmp_path / "exp"
    assert [r["epoch"] for r in read_results(run)] == ["0"]
    last = load_checkpoint(run / "weights" / "last.pt")
    assert last["train_state"]["epochs"] == 1 and last["train_config"]["epochs"] == 5  # the plan moved, the config did not
    assert (run / "predictions.json").exists()  # epoch 1 was validated as the last one


def test_accumulation_steps_after_as_many_micro_batches_as_it_asks_while_it_ramps(tiny_data: Path, tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch):
    """batch 2, nbs 16: accumulation ramps from 1 to 8 micro-batches over the warmup. Counted from the last step
    (YOLOv5's rule), each step sums as many as asked; `(i + 1) % accumulate` summed up to 1.6x nbs in one step."""
    trainer = Trainer(make_config(tiny_data, tmp_path, epochs="3", batch="2", nbs="16", val_interval="3"))
    step_at: list[int] = []
    monkeypatch.setattr(trainer, "_forward_backward", lambda images, targets, sync_now: (torch.zeros(3), torch.tensor(True)))

    def record(losses_finite: torch.Tensor) -> str:
        step_at.append(trainer._step)
        return "stepped"

    real_accumulate = trainer._accumulate_at

    def watched(step: int) -> int:
        trainer._step = step
        return real_accumulate(step)

    monkeypatch.setattr(trainer, "_optimizer_step", record)
    monkeypatch.setattr(trainer, "_accumulate_at", watched)
    trainer.fit()
    per_epoch = trainer.iters_per_epoch
    assert trainer.schedule.warmup_iters == 12 and per_epoch == 8  # the ramp spans epochs 0 and 1
    previous = -1
    for step in step_at:
        window, epoch_end = step - previous, (step + 1) % per_epoch == 0
        asked = real_accumulate(step)
        assert window == asked or (epoch_end and window < asked), (step, window, asked)
        previous = step
    assert max(real_accumulate(s) for s in step_at) == 8 and step_at[-1] == 3 * per_epoch - 1


def test_a_budget_refits_the_epoch_count_after_each_epoch_but_the_last(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from detector.train import trainer as trainer_module

    calls = []
    holds = iter([3, 2])  # after epoch 1: 3 in all; after epoch 2: it and 2 more... of which one is epoch 3

    def fake_budget(budget_s: float, spent_s: float, epoch_s: float) -> int:
        calls.append((budget_s, spent_s, epoch_s))
        return next(holds)

    monkeypatch.setattr(trainer_module, "epochs_for_budget", fake_budget)
    trainer = Trainer(make_config(tiny_data, tmp_path, epochs="2", time="0.5"))
    trainer.fit()
    assert len(calls) == 2  # not after the last epoch
    assert all(budget == 1800 and 0 < epoch_s <= spent for budget, spent, epoch_s in calls)
    assert calls[1][1] > calls[0][1]  # the time spent keeps counting
    run = tmp_path / "exp"
    assert [r["epoch"] for r in read_results(run)] == ["0", "1", "2"]  # epochs=2 overridden
    assert trainer.schedule.epochs == 3
    cfg, per_epoch = trainer.cfg, trainer.iters_per_epoch
    planned = [min(max(round(cfg.warmup_epochs * per_epoch), cfg.warmup_min_iters), max(n * per_epoch // 2, 1)) for n in (2, 3)]
    assert trainer.schedule.warmup_iters == planned[1] != planned[0]  # capped by the refitted plan, as its resume caps it
    last = load_checkpoint(run / "weights" / "last.pt")
    assert last["epoch"] == 2 and last["train_state"]["epochs"] == 3 and last["train_config"]["epochs"] == 2
    assert last["train_state"]["time_s"] > calls[1][1]  # saved, so a resumed run's budget continues from it
    lrs = [float(r["lr"]) for r in read_results(run)]
    lr0, lrf = trainer.cfg.lr0, trainer.cfg.lrf
    assert lrs[1:] == pytest.approx([lr0 * (1 + lrf) / 2, lr0 * lrf], rel=1e-4)  # a 3-epoch cosine, not epochs=1's


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_finishes_every_epoch_once(tiny_data: Path, tmp_path: Path):
    # 10 short epochs: the kill, right after the first epoch's row, lands while later epochs still run even on a
    # machine that trains an epoch of this tiny set in a fraction of a second (3 epochs could all be done by then)
    args = [f"{k}={v}" for k, v in {**TINY, "data": str(tiny_data), "project": str(tmp_path), "epochs": "10"}.items()]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_cli(*args), cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "exp"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "weights" / "last.pt").exists() and (run / "results.csv").exists() and len(read_results(run)) >= 1:
            break  # epoch 1 logged and checkpointed: the run is into epoch 2
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(run / "weights" / "last.pt")["epoch"] >= 0
    resumed = subprocess.run(_cli(f"resume={run / 'weights' / 'last.pt'}"), cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["epoch"] for r in read_results(run)] == [str(e) for e in range(10)]
    assert load_checkpoint(run / "weights" / "best.pt")["train_config"]["epochs"] == 10
    assert load_checkpoint(run / "weights" / "last.pt")["epoch"] == 9
    assert not list((run / "weights").glob("*.tmp*"))


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tiny_data: Path, tmp_path: Path):
    args = [f"{k}={v}" for k, v in {**TINY, "data": str(tiny_data), "project": str(tmp_path), "epochs": "1", "device": "cpu"}.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "detector", "train", *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    runs = sorted(p.name for p in tmp_path.iterdir())
    assert runs == ["exp"]  # one run folder: only rank 0 writes
    assert len(read_results(tmp_path / "exp")) == 1
    assert len(list((tmp_path / "exp").glob("events.out.tfevents.*"))) == 1
    assert load_checkpoint(tmp_path / "exp" / "weights" / "last.pt")["epoch"] == 0


def test_close_drops_the_ddp_wrapper_before_leaving_the_process_group(monkeypatch: pytest.MonkeyPatch):
    """The DDP wrapper holds the process group: leaving the group while it lives left gloo's threads to end at
    interpreter exit, where one rank once aborted ('terminate called without an active exception')."""
    import detector.train.trainer as trainer_module
    from detector.runtime.distributed import DistInfo

    trainer = Trainer.__new__(Trainer)
    trainer.logger = None
    trainer._held = contextlib.ExitStack()
    trainer._checkpoints = CheckpointWriter()
    trainer.dist = DistInfo(rank=1, world_size=2)
    trainer.model = torch.nn.Linear(2, 2)
    trainer.train_model = torch.nn.Sequential(trainer.model)  # stands in for DistributedDataParallel(model)
    wrapped_at_shutdown = []
    monkeypatch.setattr(trainer_module, "shutdown", lambda dist: wrapped_at_shutdown.append(trainer.train_model is not trainer.model))
    trainer.close()
    assert wrapped_at_shutdown == [False]


def test_build_keeps_the_set_up_run_out_of_the_collector_and_close_gives_it_back(tiny_data: Path, tmp_path: Path):
    """Objects alive after `build` are frozen (full collections skip them); after `close` a cycle of that time
    that has been dropped is collected again, so a process that trains twice does not keep the first run."""
    import gc
    import weakref

    class Node:
        pass

    cycle = Node()
    cycle.self = cycle
    alive = weakref.ref(cycle)
    trainer = Trainer(make_config(tiny_data, tmp_path))
    try:
        trainer.build()
        assert gc.get_freeze_count() > 10_000
        del cycle
        gc.collect()
        assert alive() is not None  # frozen: no collection frees it during the run
    finally:
        trainer.close()
    gc.collect()
    assert gc.get_freeze_count() == 0 and alive() is None


@pytest.mark.slow
@pytest.mark.parametrize("model", ["yolo-ca-n", "yolo-ca-n-v5head"])
def test_overfits_eight_images(overfit_run, model: str):
    """~120 optimizer steps on 8 images (no augmentation, val = train) cut the loss several times over and then
    detect those objects, with either head and its loss. Also guards eval-mode BatchNorm statistics keeping up
    with fast-moving weights."""
    run = overfit_run(model)
    rows = read_results(run.run_dir)
    first = sum(float(rows[0][f"train/{k}"]) for k in ("box_loss", "obj_loss", "cls_loss"))
    last = sum(float(rows[-1][f"train/{k}"]) for k in ("box_loss", "obj_loss", "cls_loss"))
    assert len(rows) == 120 and last < first / 3
    assert run.metrics["AP50"] > 0.8


@pytest.mark.parametrize(("amp", "precision"), [("bf16", torch.bfloat16), ("off", None)])
def test_the_per_epoch_validation_runs_in_the_trainings_precision_on_the_cpu(tiny_data: Path, tmp_path: Path, amp: str,
                                                                            precision: torch.dtype | None):
    trainer = Trainer(make_config(tiny_data, tmp_path, amp=amp, device="cpu"))
    try:
        trainer.build()
        assert trainer.amp_dtype is precision and trainer.evaluator.precision is precision
    finally:
        trainer.close()


def test_the_val_workers_fork_at_build_before_training_grows_the_heap(tiny_data: Path, tmp_path: Path):
    import multiprocessing

    before = set(multiprocessing.active_children())
    trainer = Trainer(make_config(tiny_data, tmp_path, workers="1"))
    try:
        trainer.build()
        assert len(set(multiprocessing.active_children()) - before) == 1  # the val loader's; train's fork at epoch 1
    finally:
        trainer.close()


class _AssignmentRecorder:
    """Stands in for the trainer's criterion: records which assignment each step's loss used."""

    def __init__(self, loss) -> None:
        self.loss, self.static_per_step = loss, []

    def set_epoch(self, epoch: int) -> None:
        self.loss.set_epoch(epoch)

    def __call__(self, raw, targets):
        self.static_per_step.append(self.loss.static)
        return self.loss(raw, targets)


def test_the_first_epochs_assign_by_anchor_boxes_then_task_aligned(tiny_data: Path, tmp_path: Path):
    trainer = Trainer(make_config(tiny_data, tmp_path, model="yolo-ca-n", static_assign_epochs="1", epochs="2"))
    try:
        trainer.build()
        recorder = _AssignmentRecorder(trainer.criterion)
        trainer.criterion = recorder
        for epoch in range(2):
            trainer.train_epoch(epoch)
    finally:
        trainer.close()
    steps = trainer.iters_per_epoch
    assert recorder.static_per_step == [True] * steps + [False] * steps


def _poison_criterion(trainer: Trainer, poisoned_calls, returned: list | None = None) -> None:
    """Replace the trainer's loss by one whose total and parts are NaN at the calls (1-based) `poisoned_calls` accepts;
    the parts each call returns are appended to `returned`, if given."""
    real, calls = trainer.criterion, {"n": 0}

    def criterion(raw, targets):
        total, parts = real(raw, targets)
        calls["n"] += 1
        out = (total * float("nan"), parts * float("nan")) if poisoned_calls(calls["n"]) else (total, parts)
        if returned is not None:
            returned.append(out[1].detach().clone())
        return out

    criterion.set_epoch = real.set_epoch
    trainer.criterion = criterion


def test_a_skipped_nonfinite_step_stays_out_of_the_epochs_mean_losses(tiny_data: Path, tmp_path: Path):
    trainer = Trainer(make_config(tiny_data, tmp_path, nbs="8", max_nonfinite="5"))  # 2 steps an epoch
    try:
        trainer.build()
        returned: list[torch.Tensor] = []
        _poison_criterion(trainer, lambda n: n == 1, returned)
        losses, nonfinite, _, _ = trainer.train_epoch(0)
    finally:
        trainer.close()
    assert nonfinite == 1 and len(returned) == 2 and torch.isnan(returned[0]).all()
    torch.testing.assert_close(losses, returned[1].float().cpu())  # the mean of the one finite step: itself, not NaN or half


def test_nonfinite_steps_in_a_row_are_counted_across_epochs(tiny_data: Path, tmp_path: Path):
    """With fewer steps an epoch than `max_nonfinite`, a run whose every step is NaN must still stop."""
    trainer = Trainer(make_config(tiny_data, tmp_path, nbs="8", max_nonfinite="3"))  # 2 steps an epoch
    try:
        trainer.build()
        _poison_criterion(trainer, lambda n: True)
        assert trainer.train_epoch(0)[1] == 2
        with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row at epoch 2; no epoch finished, so no checkpoint"):
            trainer.train_epoch(1)
    finally:
        trainer.close()


def test_a_resumed_run_scales_its_weight_decay_to_its_new_batch(tiny_data: Path, tmp_path: Path):
    from detector.train.optim import scaled_weight_decay

    trainer = Trainer(make_config(tiny_data, tmp_path, nbs="8"))  # batch 8: no accumulation
    try:
        trainer.build()
        trainer._save(0, is_best=False)
    finally:
        trainer.close()
    resumed = Trainer(make_config(tiny_data, tmp_path, resume=str(tmp_path / "exp" / "weights" / "last.pt"), batch="16"))
    try:
        resumed.build()
        decay = next(g for g in resumed.optimizer.param_groups if g["name"] == "decay")
    finally:
        resumed.close()
    wd = resumed.cfg.weight_decay
    assert decay["weight_decay"] == pytest.approx(scaled_weight_decay(wd, 16, 1, 8)) == pytest.approx(2 * wd)


def test_a_torchrun_rank_trains_on_its_gpu_of_the_device_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """device=2,3: the rank at LOCAL_RANK 1 takes cuda:3 (select_device's choice), not cuda:1 (four GPUs mocked)."""
    from detector.runtime.distributed import DistInfo

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(trainer_module, "init_distributed", lambda device: DistInfo(rank=1, world_size=2, local_world_size=2))
    trainer = Trainer(make_config(tmp_path, tmp_path / "runs", device="2,3", amp="off"))
    assert trainer.device == torch.device("cuda", 3) and chosen == [torch.device("cuda", 3)]


def test_a_copied_run_resumes_into_its_copy_and_a_lone_checkpoint_into_its_run(tiny_data: Path, tmp_path: Path):
    import shutil

    trainer = Trainer(make_config(tiny_data, tmp_path, epochs="2"))
    try:
        trainer.build()
        trainer._save(0, is_best=False)
    finally:
        trainer.close()
    shutil.copytree(tmp_path / "exp", tmp_path / "exp-copy")
    copied = Trainer(make_config(tiny_data, tmp_path, resume=str(tmp_path / "exp-copy" / "weights" / "last.pt")))
    assert copied.run_dir == (tmp_path / "exp-copy").resolve()  # not the original run, whose files it would overwrite
    (tmp_path / "kept").mkdir()
    shutil.copy(tmp_path / "exp" / "weights" / "last.pt", tmp_path / "kept" / "last.pt")
    lone = Trainer(make_config(tiny_data, tmp_path, resume=str(tmp_path / "kept" / "last.pt")))
    assert lone.run_dir.resolve() == (tmp_path / "exp").resolve()


def test_without_clipping_the_finite_check_reads_the_gradients_norm(tiny_data: Path, tmp_path: Path):
    """clip_grad=0: the gradients' norm (`get_total_norm`: foreach norms, not a kernel per parameter) still decides
    the step: a finite one steps, an inf gradient is skipped and leaves the weights as they were."""
    trainer = Trainer(make_config(tiny_data, tmp_path, clip_grad="0"))
    try:
        trainer.build()
        batch = next(iter(trainer.train_loader))
        images = to_model_input(batch["images"], trainer.device)
        _, finite = trainer._forward_backward(images, batch["targets"], sync_now=True)
        assert trainer._optimizer_step(finite) == "stepped"
        _, finite = trainer._forward_backward(images, batch["targets"], sync_now=True)
        next(p for p in trainer.model.parameters() if p.grad is not None).grad.fill_(float("inf"))
        before = [p.detach().clone() for p in trainer.model.parameters()]
        assert trainer._optimizer_step(finite) == "nonfinite"
        assert all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
    finally:
        trainer.close()


@pytest.mark.parametrize("cache", ["ram", ""])
def test_the_val_images_share_the_runs_cache_setting(tiny_data: Path, tmp_path: Path, cache: str) -> None:
    """Every epoch validates the same images: with the cache on they are decoded once for the run, as the train
    split's are; off, neither split keeps them."""
    trainer = Trainer(make_config(tiny_data, tmp_path, cache=cache))
    try:
        trainer.build()
        for loader in (trainer.train_loader, trainer._val_loader):
            assert (loader.dataset.source.ram is not None) is bool(cache)
        decodes = trainer._val_loader.dataset.source.decodes
        for _ in range(2):
            list(trainer._val_loader)
        assert trainer._val_loader.dataset.source.decodes - decodes == (0 if cache else 2 * 8)  # 8 val images
    finally:
        trainer.close()


def test_the_per_epoch_validation_batches_by_aspect_ratio_as_detector_val_does(tiny_data: Path, tmp_path: Path) -> None:
    """Square batches padded every non-square val image to imgsz x imgsz: work for nothing, and per-epoch AP
    (which picks best.pt) measured otherwise than `detector val`'s default rect batches measure it."""
    from detector.data.loader import rect_batch_shapes

    trainer = Trainer(make_config(tiny_data, tmp_path, batch="1"))  # val batches of 2: two of the 8 images landscape
    try:
        trainer.build()
        loader = trainer._val_loader
        shapes = [tuple(batch["images"].shape[2:]) for batch in loader]
        _, expected = rect_batch_shapes(loader.dataset.coco.image_hw, 128, loader.batch_size)
        assert shapes == [tuple(s) for s in expected.tolist()] and any(h != w for h, w in shapes)
    finally:
        trainer.close()

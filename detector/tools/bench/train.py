"""`detector bench train`: end-to-end training throughput next to the model-only rate.

For each config, four rates:
- convolutions only: each of the model's convolutions timed alone, forward and backward, at its training input's
  shape, format and autocast dtype (`conv_floor`): no step can beat it, and its distance from the model-only rate
  is what the rest of the step (BatchNorm, activations, the loss, the optimizer) costs;
- model only: forward + loss + backward + SGD step on one fixed random batch, no data loading (compares models);
- held batch: the trainer's own epoch loop (its AdamW step, accumulation, clipping, EMA, progress bar) fed the
  train loader's first batch over and over, no loader running: the real run without its data loading;
- end to end: the second epoch of a real `detector train` run (the first pays worker start-up), on a generated
  shapes set or `data=`.
End to end over held batch is the loader efficiency: the share of the step's rate left with the loader
running beside it, everything else equal. The last column, end-to-end images/s x GFLOPs per
image at the benchmark's size, is the model arithmetic actually sustained (forward only, as GFLOPs are quoted),
comparable across models and sizes (Ultralytics YOLOv8n on this kind of machine: 29 img/s at 256 px x 8.7
GFLOPs x (256/640)^2 = 40 GFLOP/s).

`data=<dataset YAML>` times a real dataset instead of the generated set, and `profile=true` also splits the
end-to-end run's main process into the trainer's stages (its `record_function` ranges: the wait for the loader,
forward, loss + assignment, backward, optimizer step + EMA, progress + logging), which shows where the time
around the model goes. `device=` runs all four on one GPU (the model-only loop synchronizes it around each
timed step; fp16 goes through a GradScaler as in training) and `compile=true` compiles the model in the last
three, untimed (the convolutions are timed eager).

Options (key=value): `detector.options.BenchTrainOptions`; `detector bench train --help` lists them with their
defaults and ranges.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from detector import memory
from detector.config import TrainConfig, build_options
from detector.data.loader import resolve_workers
from detector.data.spec import load_data_spec
from detector.data.synthetic import generate_shapes_dataset
from detector.errors import DetectorError
from detector.models.builder import build_model
from detector.models.catalog import resolve_model_path
from detector.models.info import count_flops
from detector.options import BenchTrainOptions
from detector.runtime.device import autocast_dtype, device_clock, needs_grad_scaler, select_device
from detector.runtime.machine import describe_machine
from detector.tools.bench.conv_floor import conv_floor_rate
from detector.train.loss import build_loss
from detector.train.trainer import Trainer, train
from detector.viz.logger import read_results
from detector.viz.tables import format_table


def model_only_rate(model_path: Path, *, nc: int, imgsz: int, batch: int, opts: BenchTrainOptions, device: torch.device,
                    iters: int = 5) -> float:
    """Images/s of forward + loss + backward + SGD step on one fixed random batch on `device` (best of `iters`, after
    two untimed steps that pay oneDNN's or cuDNN's set-up and `opts.compile`'s compilation), with the heap held as
    the trainer holds it and fp16 through a GradScaler as the trainer runs it."""
    memory.hold_freed_heap()
    model, images = _model_and_batch(model_path, nc=nc, imgsz=imgsz, batch=batch, opts=opts, device=device)
    criterion = build_loss(model.head, imgsz=imgsz)
    step_model = torch.compile(model) if opts.compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    dtype = autocast_dtype(device, opts.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and needs_grad_scaler(dtype))
    generator = torch.Generator().manual_seed(0)
    n = batch * 4
    targets = torch.cat([torch.arange(n).remainder(batch)[:, None].float(), torch.randint(0, nc, (n, 1), generator=generator).float(),
                         0.2 + 0.6 * torch.rand(n, 2, generator=generator), 0.05 + 0.3 * torch.rand(n, 2, generator=generator)], 1)
    best = float("inf")
    for i in range(iters + 2):
        start = device_clock(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            raw = step_model(images)
        loss, _ = criterion(raw, targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:
            best = min(best, device_clock(device) - start)
    return batch / best


def conv_floor(model_path: Path, *, nc: int, imgsz: int, batch: int, opts: BenchTrainOptions,
               device: torch.device) -> float:
    """Images/s of the model's convolutions alone at the benchmark's batch, format and autocast dtype."""
    model, images = _model_and_batch(model_path, nc=nc, imgsz=imgsz, batch=batch, opts=opts, device=device)
    return conv_floor_rate(model, images, autocast_dtype(device, opts.amp))


def _model_and_batch(model_path: Path, *, nc: int, imgsz: int, batch: int, opts: BenchTrainOptions,
                     device: torch.device) -> tuple[torch.nn.Module, torch.Tensor]:
    """A new model in training mode and one random batch on `device`, both in the benchmark's memory format."""
    fmt = torch.channels_last if opts.channels_last else torch.contiguous_format
    model = build_model(model_path, nc=nc).train().to(device, memory_format=fmt)
    return model, torch.rand(batch, 3, imgsz, imgsz, device=device).contiguous(memory_format=fmt)


def device_label(device: torch.device) -> str:
    """'cpu' or the GPU's name, for the table's header."""
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def _train_values(model: str, data_yaml: Path, project: Path, opts: BenchTrainOptions) -> dict:
    """The `detector train` keys of the timed runs: 2 epochs, validation only after the last, mosaic on."""
    return {"model": model, "data": str(data_yaml), "project": str(project), "name": model, "epochs": 2, "val_interval": 99,
            "imgsz": opts.imgsz, "batch": opts.batch, "workers": opts.workers, "worker_priority": opts.worker_priority,
            "amp": opts.amp, "channels_last": opts.channels_last, "cache": opts.cache, "plots": False, "close_mosaic": 0,
            "warmup_min_iters": 0, "device": opts.device, "compile": opts.compile}


# the `record_function` ranges of the trainer's step (train/trainer.py), in the order a step runs them
STAGES = ("data: wait for the loader", "forward", "loss + assignment", "backward", "optimizer step + EMA",
          "progress bar + logging")


def end_to_end_rate(model: str, data_yaml: Path, project: Path, opts: BenchTrainOptions,
                    images: int) -> tuple[float, list[list]]:
    """Images/s of the second epoch of a real training run (validation only after it) and, with `opts.profile`,
    rows [stage, s, share, ms per step] over both epochs' main process (the first pays the workers' start)."""
    values = _train_values(model, data_yaml, project, opts)
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if opts.profile else None
    with profiler or contextlib.nullcontext():
        train(build_options(TrainConfig, values, "bench train"))
    rows = read_results(project / model / "results.csv")
    rate = images / float(rows[1]["epoch_time_s"])
    return rate, stage_rows(profiler, 2 * math.ceil(images / opts.batch)) if profiler else []


WARMUP_STEPS = 5  # held-batch steps before the timed epoch: the first takes about twice as long, the third on are level


class HeldBatches:
    """One batch `steps` times, in the train loader's place: the trainer's loop with no data loading."""

    def __init__(self, batch: dict, steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __iter__(self) -> Iterator[dict]:
        return itertools.repeat(self.batch, self.steps)

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        """The order is fixed: nothing to reseed."""


def held_batch_rate(model: str, data_yaml: Path, project: Path, opts: BenchTrainOptions) -> float:
    """Images/s of the trainer's second epoch (`Trainer.train_epoch(1)`: the timed epoch's steps, accumulation
    and schedule) fed its loader's first batch each step, built with no workers so nothing runs beside it."""
    values = {**_train_values(model, data_yaml, project, opts), "name": f"{model}-held", "workers": 0}
    trainer = Trainer(build_options(TrainConfig, values, "bench train"))
    try:
        trainer.build()
        batch = next(iter(trainer.train_loader))
        trainer.train_loader = HeldBatches(batch, min(WARMUP_STEPS, trainer.iters_per_epoch))
        trainer.train_epoch(0)  # warm-up: oneDNN's first calls, the allocator
        trainer.train_loader = HeldBatches(batch, trainer.iters_per_epoch)
        started = time.perf_counter()
        trainer.train_epoch(1)
        return trainer.iters_per_epoch * batch["images"].shape[0] / (time.perf_counter() - started)
    finally:
        trainer.close()


def stage_rows(profiler: torch.profiler.profile, steps: int) -> list[list]:
    """The trainer's stages from a profile: total seconds, share of their sum, ms per step."""
    totals = {event.key: event.cpu_time_total / 1e6 for event in profiler.key_averages() if event.key in STAGES}
    total = sum(totals.values()) or 1.0
    return [[stage, round(totals.get(stage, 0.0), 3), f"{totals.get(stage, 0.0) / total:.0%}",
             round(1000 * totals.get(stage, 0.0) / steps, 3)] for stage in STAGES]


def main(opts: BenchTrainOptions) -> None:
    """Print one row per config (`opts` already checked, e.g. by `load_options`), and with `profile=true` each
    config's stage table."""
    if not opts.configs:
        raise DetectorError("bench train: 'configs' is empty")
    imgsz, batch = opts.imgsz, opts.batch
    device = select_device(opts.device)
    rows, profiles = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        data_yaml, nc, images = _dataset(opts, Path(tmp))
        for name in opts.configs:
            path = resolve_model_path(name)
            gflops = count_flops(build_model(path, nc=nc), imgsz)
            floor_rate = conv_floor(path, nc=nc, imgsz=imgsz, batch=batch, opts=opts, device=device)
            model_rate = model_only_rate(path, nc=nc, imgsz=imgsz, batch=batch, opts=opts, device=device)
            held_rate = held_batch_rate(name, data_yaml, Path(tmp) / "runs", opts)
            e2e_rate, profiles[name] = end_to_end_rate(name, data_yaml, Path(tmp) / "runs", opts, images)
            rows.append([name, round(gflops, 2), round(floor_rate, 1), round(model_rate, 1), round(held_rate, 1), round(e2e_rate, 1),
                         round(e2e_rate / held_rate, 2), round(e2e_rate * gflops, 1)])
    workers = resolve_workers(opts.workers, batch_size=batch)
    print(f"\ntraining throughput, imgsz {imgsz}, batch {batch}, workers {workers} ({opts.worker_priority} priority), "
          f"cache {opts.cache or 'off'}, amp {opts.amp}, channels_last {opts.channels_last}, compile {opts.compile}, "
          f"device {device_label(device)}, {torch.get_num_threads()} threads, data {opts.data or 'generated shapes'}")
    print(describe_machine().summary())
    headers = ["config", f"GFLOPs@{imgsz}", "convolutions img/s", "model img/s", "held-batch img/s", "end-to-end img/s", "loader efficiency", "GFLOP/s"]
    print(format_table(headers, rows, floatfmt=".2f"))
    for name, stages in profiles.items():
        if stages:
            print(f"\n{name}: the main process's time per stage over both epochs (torch.profiler ranges)")
            print(format_table(["stage", "s", "share", "ms/step"], stages, floatfmt=".3f"))  # ms on a fast machine


def _dataset(opts: BenchTrainOptions, tmp: Path) -> tuple[Path, int, int]:
    """(dataset YAML, class count, training images): `opts.data`'s, or a generated shapes set of `opts.images`. The
    images are those the train loader serves: the json's, less any the scan skips (a missing or unreadable file)."""
    from detector.data.coco import CocoDataset

    if not opts.data:
        return generate_shapes_dataset(tmp / "shapes", seed=0, n_train=opts.images, n_val=16, imgsz=opts.imgsz), 6, opts.images
    train = CocoDataset(load_data_spec(opts.data).train)  # the scan parses the json once (and caches it)
    return Path(opts.data), train.num_classes, len(train)

"""`detector bench amp`: does bf16 autocast train to the same place as fp32?

Trains one config on a generated shapes set (the bundled set's generator, fewer and smaller images) three
times: fp32 with seed S, bf16 with seed S, and fp32 with seed S+1. The same seed gives the same initial weights,
data order and augmentations, so the fp32/bf16 pair differs only in arithmetic; the second fp32 seed measures
the run-to-run noise that difference has to be judged against. Prints the per-epoch total training loss of the
three runs, their final COCO AP/AP50 and images/s, and one verdict line.

On a CPU without AMX/AVX512-BF16, bf16 is emulated: the numbers are the same as on bf16 hardware (oneDNN
accumulates in fp32 either way) but the bf16 run is several times slower than fp32.

Options (key=value): `detector.options.BenchAmpOptions`; `detector bench amp --help` lists them with their defaults
and ranges.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from detector.config import TrainConfig, build_options
from detector.data.synthetic import generate_shapes_dataset
from detector.options import BenchAmpOptions
from detector.runtime.device import select_device
from detector.runtime.machine import describe_machine
from detector.train.trainer import train
from detector.viz.logger import read_results
from detector.viz.tables import format_table

LOSS_PARTS = ("train/box_loss", "train/obj_loss", "train/cls_loss")


def train_once(data_yaml: Path, project: Path, name: str, *, amp: str, seed: int, opts: BenchAmpOptions) -> list[dict[str, str]]:
    """One training run; returns its results.csv rows."""
    values = {"model": opts.config, "data": str(data_yaml), "project": str(project), "name": name, "exist_ok": True,
              "epochs": opts.epochs, "imgsz": opts.imgsz, "batch": opts.batch, "workers": opts.workers,
              "seed": seed, "amp": amp, "channels_last": opts.channels_last, "plots": False, "device": opts.device}
    train(build_options(TrainConfig, values, "bench amp"))
    return read_results(project / name / "results.csv")


def total_losses(rows: list[dict[str, str]]) -> list[float]:
    return [sum(float(row[k]) for k in LOSS_PARTS) for row in rows]


def max_relative_gap(a: list[float], b: list[float]) -> float:
    """Largest |a - b| / a over the epochs."""
    return max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))


def compare(runs: dict[str, list[dict[str, str]]], images: int) -> tuple[list[str], list[list[object]], str]:
    """Per-epoch table of total losses and the final metrics, plus the verdict line."""
    names = list(runs)
    losses = {name: total_losses(rows) for name, rows in runs.items()}
    headers = ["epoch", *[f"loss {name}" for name in names]]
    table = [[e + 1, *[losses[name][e] for name in names]] for e in range(len(losses[names[0]]))]
    for key in ("AP", "AP50"):
        table.append([key, *[float(runs[name][-1][f"metrics/{key}"]) for name in names]])
    table.append(["img/s", *[f"{images / (sum(float(r['epoch_time_s']) for r in runs[name]) / len(runs[name])):.1f}" for name in names]])
    fp32, bf16 = names[0], names[1]
    ap = {name: float(runs[name][-1]["metrics/AP"]) for name in names}
    verdict = f"bf16 vs fp32 (same seed): loss gap up to {max_relative_gap(losses[fp32], losses[bf16]):.1%}, AP {ap[bf16] - ap[fp32]:+.4f}"
    if len(names) > 2:
        noise = names[2]
        verdict += f"; fp32 seed to seed: loss gap up to {max_relative_gap(losses[fp32], losses[noise]):.1%}, AP {ap[noise] - ap[fp32]:+.4f}"
    return headers, table, verdict


def main(opts: BenchAmpOptions) -> None:
    """Train the three runs and print their table and the verdict (`opts` already checked, e.g. by `load_options`)."""
    seed = opts.seed
    noise_seed = seed + 1 if opts.noise_seed is None else opts.noise_seed
    with tempfile.TemporaryDirectory() as tmp:
        data_yaml = generate_shapes_dataset(Path(tmp) / "shapes", seed=seed, n_train=opts.images, n_val=opts.val_images, imgsz=opts.imgsz)
        project = Path(tmp) / "runs"
        runs = {f"fp32 s{seed}": train_once(data_yaml, project, "fp32", amp="off", seed=seed, opts=opts),
                f"bf16 s{seed}": train_once(data_yaml, project, "bf16", amp="bf16", seed=seed, opts=opts)}
        if noise_seed >= 0:  # the same seed again (run-to-run noise alone) needs a label of its own
            label = f"fp32 s{noise_seed}" + (" again" if noise_seed == seed else "")
            runs[label] = train_once(data_yaml, project, "fp32_noise", amp="off", seed=noise_seed, opts=opts)
    headers, table, verdict = compare(runs, opts.images)
    device = select_device(opts.device)
    where = f"on {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "on the CPU"
    print(f"\nbf16 autocast against fp32: {opts.config}, {opts.images} images at {opts.imgsz} px, {opts.epochs} epochs, "
          f"batch {opts.batch}, {where}\n{describe_machine().summary()}")
    print(format_table(headers, table, floatfmt=".4f"))
    print(verdict)

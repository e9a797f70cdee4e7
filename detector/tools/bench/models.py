"""`detector bench models`: parameters, GFLOPs and throughput of model configs, one row per config and mode.

Throughput in images/s of random inputs (the fastest of `iters` timed iterations): eval forward (`torch.inference_mode`, decode included) at batch 1 and
`batch`, and a train step (forward + backward of a stand-in loss) at `batch`, after `warmup` untimed iterations.
Modes: fp32 (NCHW), fp32-cl (channels_last), bf16-cl (bf16 autocast + channels_last). bf16 is fast only where
the hardware computes it natively (AMX / AVX512-BF16 CPUs, recent GPUs); the header line says which.

Options (key=value): `detector.options.BenchModelsOptions`; `detector bench models --help` lists them with their
defaults and ranges.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from detector.errors import DetectorError
from detector.options import BenchModelsOptions
from detector.runtime.device import device_clock
from detector.runtime.machine import describe_machine
from detector.viz.tables import format_table

MODES = {"fp32": (None, False), "fp32-cl": (None, True), "bf16-cl": (torch.bfloat16, True)}


def fastest_seconds(step: Callable[[], object], *, iters: int, warmup: int, device: torch.device) -> float:
    """Run `step` warmup + iters times; the seconds of the fastest timed iteration (robust on a shared machine)."""
    for _ in range(warmup):
        step()
    best = float("inf")
    for _ in range(iters):
        start = device_clock(device)
        step()
        best = min(best, device_clock(device) - start)
    return best


def images_per_second(step: Callable[[], None], images: int, *, iters: int, warmup: int,
                      device: torch.device) -> float:
    """Images/s of the fastest of `iters` timed runs of `step` (after `warmup` untimed ones)."""
    return images / fastest_seconds(step, iters=iters, warmup=warmup, device=device)


def measure(model: torch.nn.Module, mode: str, *, imgsz: int, batch: int, iters: int, warmup: int,
            device: torch.device) -> tuple[float, float, float]:
    """(eval images/s at batch 1, eval images/s at `batch`, train images/s at `batch`) in `mode`."""
    dtype, channels_last = MODES[mode]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=fmt)

    def inputs(n: int) -> torch.Tensor:
        return torch.rand(n, 3, imgsz, imgsz, device=device).contiguous(memory_format=fmt)

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def eval_step(x: torch.Tensor) -> Callable[[], None]:
        def step() -> None:
            with torch.inference_mode(), autocast():
                model(x)
        return step

    x_train = inputs(batch)

    def train_step() -> None:
        with autocast():
            maps = model(x_train)
        sum(m.float().square().mean() for m in maps).backward()  # a stand-in loss touching every output
        model.zero_grad(set_to_none=True)

    model.eval()
    rates = [images_per_second(eval_step(inputs(n)), n, iters=iters, warmup=warmup, device=device)
             for n in (1, batch)]
    model.train()
    rates.append(images_per_second(train_step, batch, iters=iters, warmup=warmup, device=device))
    return rates[0], rates[1], rates[2]


def _gpu_note(device: torch.device) -> str:
    """On CUDA, the timed GPU and whether its bf16 is native; '' on the CPU (the machine line names it)."""
    if device.type != "cuda":
        return ""
    bf16 = "native" if torch.cuda.is_bf16_supported(including_emulation=False) else "emulated"
    return f", on {torch.cuda.get_device_name(device)} (bf16 {bf16})"


def main(opts: BenchModelsOptions) -> None:
    """Print one row per config and mode (`opts` already checked, e.g. by `load_options`)."""
    if not opts.modes:
        raise DetectorError(f"bench models: 'modes' is empty; choose from {', '.join(MODES)}")
    try:
        device = torch.device(opts.device)
    except RuntimeError as err:
        raise DetectorError(f"bench models: device: {err}") from None
    previous = torch.get_num_threads()
    torch.set_num_threads(opts.threads or previous)
    try:
        _print_table(opts, device)
    finally:  # a bench called from Python leaves torch's threads as it found them
        torch.set_num_threads(previous)


def _print_table(opts: BenchModelsOptions, device: torch.device) -> None:
    from detector.models.catalog import MODEL_CONFIGS, resolve_model_path
    from detector.models.builder import build_model
    from detector.models.info import count_flops

    imgsz, batch, iters, warmup = opts.imgsz, opts.batch, opts.iters, opts.warmup
    paths = [resolve_model_path(n) for n in opts.configs] or sorted(MODEL_CONFIGS.glob("*.yaml"))
    print(f"bench models: imgsz {imgsz}, batch {batch}, {iters} timed iterations after {warmup}{_gpu_note(device)}")
    print(describe_machine().summary())
    rows = []
    for path in paths:
        model = build_model(path)
        params = sum(p.numel() for p in model.parameters())
        gflops = count_flops(model, imgsz)
        for mode in opts.modes:
            b1, bn, train = measure(model, mode, imgsz=imgsz, batch=batch, iters=iters, warmup=warmup, device=device)
            rows.append([model.name, mode, params, gflops, b1, bn, train])
    headers = ["model", "mode", "params", f"GFLOPs@{imgsz}", "eval b1 img/s", f"eval b{batch} img/s",
               f"train b{batch} img/s"]
    print(format_table(headers, rows, floatfmt=".1f"))

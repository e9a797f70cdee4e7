"""`detector bench export`: CPU latency of one model in each deployment runtime, at each image size (batch 1 by
default; `batch=N` times batches of N, the throughput of batched serving).

At each imgsz the model is exported with fixed H/W through `Detector.export`, to ONNX and to OpenVINO IR in a
temporary folder (each file checked against PyTorch as `detector export` checks it; those lines are printed under
the table); then each runtime runs one random (batch, 3, imgsz, imgsz) input `warmup` times untimed and `iters`
times timed. The table gives the median and the fastest run in ms, and the images/s of the median.

- pytorch: the BN-folded channels_last copy that `detector val` and `predict` run
  (`models.detection_model.inference_copy`), fp32, under `torch.inference_mode`.
- onnxruntime: CPUExecutionProvider, its default (full) graph optimizations.
- onnxruntime-int8: the same on `detector export int8=true`'s file (QDQ, calibrated on `data`'s train images or
  the checkpoint's training set; skipped without either).
- openvino: the CPU plugin with the LATENCY hint, f32 inference precision.
- openvino-bf16: the same in bf16, OpenVINO's own default on CPUs with bf16 units; skipped on other CPUs.
- opencv: `cv2.dnn.readNetFromONNX` on the ONNX file, its default backend (OpenCV's own) on the CPU.

Every runtime gets the same number of threads. The header names the runtimes' versions and the machine (the CPU
as lscpu names it, its CPUs, its bf16 units, the threads, torch: `runtime.machine`); the load average before and
after shows whether something else shared the cores.

Options (key=value): `detector.options.BenchExportOptions`; `detector bench export --help` lists them with their
defaults and ranges.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.api import Detector
from detector.errors import DetectorError
from detector.models.detection_model import inference_copy
from detector.options import BenchExportOptions
from detector.runtime.machine import describe_machine
from detector.viz.tables import format_table

Runner = Callable[[np.ndarray], Any]
PACKAGES = {"onnxruntime": "onnxruntime", "onnxruntime-int8": "onnxruntime", "openvino": "openvino", "openvino-bf16": "openvino", "opencv": "cv2"}


def main(opts: BenchExportOptions) -> None:
    """Export, time and print the table (`opts` already checked, e.g. by `load_options`)."""
    if not opts.imgsz or not opts.runtimes:
        raise DetectorError("bench export: 'imgsz' and 'runtimes' must not be empty")
    threads = opts.threads or torch.get_num_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        detector = Detector(opts.model, device="cpu")
        runtimes, notes = available_runtimes(opts.runtimes, calibration=opts.data or detector.train_data)
        print(header(detector, opts.batch))
        load_before = os.getloadavg()
        rows, checks = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for imgsz in opts.imgsz:
                files, lines = export_files(detector, imgsz, Path(tmp), runtimes, data=opts.data)
                checks += lines
                image = np.random.default_rng(0).random((opts.batch, 3, imgsz, imgsz), dtype=np.float32)
                for runtime in runtimes:
                    precision, run = RUNNERS[runtime](detector, files, threads)
                    times = time_runs(run, image, iters=opts.iters, warmup=opts.warmup)
                    median = statistics.median(times)
                    rows.append([runtime, imgsz, precision, median, min(times), 1000 * opts.batch / median])
    finally:
        torch.set_num_threads(previous)
    # two decimals: a small model at a small size runs in under a millisecond
    print(format_table(["runtime", "imgsz", "precision", "median ms", "min ms", "images/s"], rows, floatfmt=".2f"))
    load_after = os.getloadavg()
    print(f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after, on {os.cpu_count()} CPUs")
    for line in notes + checks:
        print(line)


def header(detector: Detector, batch: int = 1) -> str:
    """Two lines: the model, the batch and the runtimes' versions; the machine (CPU, bf16 units, threads, torch)."""
    versions = []
    for name, module in (("onnxruntime", "onnxruntime"), ("openvino", "openvino"), ("opencv", "cv2")):
        if importlib.util.find_spec(module) is not None:
            versions.append(f"{name} {__import__(module).__version__.split('-')[0]}")  # openvino's has a build tag
    runtimes = f"; {', '.join(versions)}" if versions else ""
    return f"bench export: {detector.model.name}, batch {batch}{runtimes}\n{describe_machine().summary()}"


def available_runtimes(requested: list[str], *, calibration: str = "") -> tuple[list[str], list[str]]:
    """The requested runtimes that can run here, in order, and a note for each one left out (`calibration`: the
    dataset YAML that onnxruntime-int8 is calibrated on, '' for none)."""
    runtimes, notes = [], []
    for runtime in dict.fromkeys(requested):
        package = PACKAGES.get(runtime)
        if package is not None and importlib.util.find_spec(package) is None:
            notes.append(f"{runtime}: skipped, the '{package}' package is not installed (pip install 'detector[export]')")
        elif runtime == "openvino-bf16" and not _openvino_has_bf16():
            notes.append("openvino-bf16: skipped, this CPU has no bf16 units (OpenVINO would emulate it)")
        elif runtime == "onnxruntime-int8" and not calibration:
            notes.append("onnxruntime-int8: skipped, no calibration images (give data=<dataset YAML> or a trained checkpoint)")
        else:
            runtimes.append(runtime)
    return runtimes, notes


def _openvino_has_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def export_files(detector: Detector, imgsz: int, folder: Path, runtimes: list[str], *,
                 data: str = "") -> tuple[dict[str, Path], list[str]]:
    """The ONNX files and the OpenVINO .xml at `imgsz` (fixed H/W) that `runtimes` need, exported by the Detector
    (checked on `data`'s train images and the INT8 file calibrated on them; '' for the training set), and the check
    lines the exports printed."""
    formats = {"onnx": {"onnxruntime", "opencv"}, "int8": {"onnxruntime-int8"}, "openvino": {"openvino", "openvino-bf16"}}
    names = {"onnx": f"{imgsz}.onnx", "int8": f"{imgsz}_int8.onnx", "openvino": f"m{imgsz}_openvino_model"}
    files, lines = {}, []
    for fmt, users in formats.items():
        if not users & set(runtimes):
            continue
        keys = {"format": "onnx", "int8": True} if fmt == "int8" else {"format": fmt}
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), _quiet("detector.infer"):
            files[fmt] = detector.export(**keys, data=data, imgsz=imgsz, out=str(folder / names[fmt]))
        lines += [line for line in printed.getvalue().splitlines() if " vs PyTorch " in line]
    return files, lines


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """The exporters' INFO lines (temporary paths) left out of the bench's output; warnings still show."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        log.setLevel(level)


def time_runs(run: Runner, image: np.ndarray, *, iters: int, warmup: int) -> list[float]:
    """Milliseconds of each of `iters` calls of `run(image)`, after `warmup` untimed calls."""
    for _ in range(warmup):
        run(image)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        run(image)
        times.append((time.perf_counter() - start) * 1000)
    return times


def pytorch_runner(detector: Detector, files: dict[str, Path], threads: int) -> tuple[str, Runner]:
    model = inference_copy(detector.model)

    def run(image: np.ndarray) -> Any:
        with torch.inference_mode():
            return model(torch.from_numpy(image).contiguous(memory_format=torch.channels_last))

    return "fp32", run


def onnxruntime_runner(file: str) -> Callable[[Detector, dict[str, Path], int], tuple[str, Runner]]:
    """A runner of the ONNX file `file` ('onnx' fp32, 'int8' quantized) in onnxruntime on the CPU."""
    def make(detector: Detector, files: dict[str, Path], threads: int) -> tuple[str, Runner]:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(files[file]), options, providers=["CPUExecutionProvider"])
        return ("fp32" if file == "onnx" else file), lambda image: session.run(None, {"images": image})

    return make


def openvino_runner(precision: str) -> Callable[[Detector, dict[str, Path], int], tuple[str, Runner]]:
    """A runner of the OpenVINO IR on the CPU with `precision` ('f32' or 'bf16') as its inference precision."""
    def make(detector: Detector, files: dict[str, Path], threads: int) -> tuple[str, Runner]:
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision}
        request = ov.Core().compile_model(str(files["openvino"]), "CPU", config).create_infer_request()
        return ("fp32" if precision == "f32" else precision), lambda image: request.infer({"images": image})

    return make


def opencv_runner(detector: Detector, files: dict[str, Path], threads: int) -> tuple[str, Runner]:
    import cv2

    cv2.setNumThreads(threads)
    net = cv2.dnn.readNetFromONNX(str(files["onnx"]))  # its default backend and target: OpenCV's own, the CPU
    names = net.getUnconnectedOutLayersNames()

    def run(image: np.ndarray) -> Any:
        net.setInput(image)
        return net.forward(names)

    return "fp32", run


RUNNERS: dict[str, Callable[[Detector, dict[str, Path], int], tuple[str, Runner]]] = {
    "pytorch": pytorch_runner,
    "onnxruntime": onnxruntime_runner("onnx"),
    "onnxruntime-int8": onnxruntime_runner("int8"),
    "openvino": openvino_runner("f32"),
    "openvino-bf16": openvino_runner("bf16"),
    "opencv": opencv_runner,
}

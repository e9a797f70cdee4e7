"""`detector <command> key=value ...`: parse, validate, call the API. Nothing here computes anything.

Bad input exits with status 2 and one line naming the file, key or row; `--verbose` adds the traceback.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from detector.config import TrainConfig, describe_options, load_options, load_train_config, parse_overrides
from detector.errors import DetectorError, did_you_mean
from detector.options import (AblateOptions, BenchAmpOptions, BenchDataOptions, BenchExportOptions, BenchModelsOptions, BenchTrackOptions, BenchTrainOptions,
                               BenchValOptions, CheckOptions, ConvertOptions, EnvOptions, ExportOptions, InfoOptions, PredictOptions, SynthOptions,
                               TuneOptions, ValOptions)


@dataclass(frozen=True)
class Command:
    options: type | None
    run: Callable[[dict[str, str]], object]
    summary: str


def _train(overrides: dict[str, str]) -> None:
    from detector.train.trainer import train

    train(load_train_config(overrides))


def _val(overrides: dict[str, str]) -> None:
    from detector.api import Detector

    opts = load_options(ValOptions, overrides)
    Detector.from_checkpoint(opts.weights, device=opts.device).val(opts)


def _predict(overrides: dict[str, str]) -> None:
    from detector.api import Detector

    opts = load_options(PredictOptions, overrides)
    for _ in Detector.from_checkpoint(opts.weights, device=opts.device).predict(opts, save=True, stream=True):
        pass  # frame by frame: a long video or a camera keeps nothing in memory


def _export(overrides: dict[str, str]) -> None:
    from detector.api import Detector

    opts = load_options(ExportOptions, overrides)
    Detector.from_checkpoint(opts.weights, device="cpu").export(opts)  # exported from a CPU copy in any case


def _info(overrides: dict[str, str]) -> None:
    from detector.api import run_info

    run_info(load_options(InfoOptions, overrides))


def _ablate(overrides: dict[str, str]) -> None:
    from detector.tools.ablate import run_ablation

    run_ablation(load_options(AblateOptions, overrides))


def _tune(overrides: dict[str, str]) -> None:
    from detector.tools.tune import run_tune

    run_tune(load_options(TuneOptions, overrides))


def _data_synth(overrides: dict[str, str]) -> None:
    from pathlib import Path

    from detector.data.synthetic import generate_shapes_dataset
    from detector.data.stats import format_stats
    from detector.data.synthetic_common import load_stats
    from detector.data.synthetic_hard import generate_hard_dataset
    from detector.data.synthetic_photo import generate_photo_dataset

    opts = load_options(SynthOptions, overrides)  # profile: easy, hard or photo, checked by its choices
    default_out = {"easy": "data/shapes", "hard": "data/shapes-hard", "photo": "data/photo-objects"}
    out = Path(opts.out or default_out[opts.profile])
    counts = {k: v for k, v in (("n_train", opts.n_train), ("n_val", opts.n_val)) if v}  # 0: the generator's default
    if opts.profile == "easy":
        print(generate_shapes_dataset(out, seed=opts.seed, imgsz=opts.imgsz, **counts))
        return
    generate = generate_hard_dataset if opts.profile == "hard" else generate_photo_dataset
    yaml_path = generate(out, seed=opts.seed, **counts)
    print(format_stats(load_stats(out)))
    print(f"statistics: {out / 'stats.json'}")
    print(yaml_path)


def _data_check(overrides: dict[str, str]) -> int:
    from pathlib import Path

    from detector.data.check import data_check

    opts = load_options(CheckOptions, overrides)
    return data_check(Path(opts.data), strict=opts.strict, save_dir=Path(opts.save_dir), imgsz=opts.imgsz)


def _data_convert(overrides: dict[str, str]) -> None:
    from pathlib import Path

    from detector.data.yolo_import import convert_yolo_dataset

    opts = load_options(ConvertOptions, overrides)
    if not opts.data:
        raise DetectorError("convert: data=<Ultralytics data.yaml> is required")
    print(convert_yolo_dataset(Path(opts.data), Path(opts.out) if opts.out else None))


def _env(overrides: dict[str, str]) -> None:
    from detector.runtime.environment import environment_report

    print(environment_report(load_options(EnvOptions, overrides).format))


BENCHES: dict[str, tuple[type, str]] = {
    "models": (BenchModelsOptions, "parameters, GFLOPs, eval and train images/s of model configs (prints a table)"),
    "data": (BenchDataOptions, "train-pipeline images/s per imgsz, workers and mosaic (prints a table)"),
    "train": (BenchTrainOptions, "convolutions-only, model-only and end-to-end training images/s and their ratio (prints a table)"),
    "val": (BenchValOptions, "validation ms per image by stage, and the COCO metric's speed (prints a table)"),
    "amp": (BenchAmpOptions, "bf16 autocast against fp32 training, next to the seed-to-seed noise (prints a table)"),
    "export": (BenchExportOptions, "batch-1 CPU latency of PyTorch (fused), onnxruntime, OpenVINO, OpenCV DNN (prints a table)"),
    "track": (BenchTrackOptions, "the tracker on simulated detections: MOTA, IDF1, id switches, ms per frame (prints a table)"),
}


def _bench(name: str, options: type) -> Callable[[dict[str, str]], None]:
    """Check the keys here (one line naming the key and "command line"), then import the bench: torch loads only now."""
    def run(overrides: dict[str, str]) -> None:
        import importlib

        opts = load_options(options, overrides)
        importlib.import_module(f"detector.tools.bench.{name}").main(opts)

    return run


COMMANDS: dict[str, Command] = {
    "train": Command(TrainConfig, _train, "train a detector (model=<yaml> data=<yaml> epochs=N ...)"),
    "val": Command(ValOptions, _val, "COCO mAP of a checkpoint on a dataset split"),
    "predict": Command(PredictOptions, _predict, "detect objects in images or a video, save drawn copies and a JSON"),
    "export": Command(ExportOptions, _export, "export a checkpoint to ONNX or OpenVINO, checked against PyTorch (onnxruntime, OpenVINO CPU)"),
    "info": Command(InfoOptions, _info, "layer table, parameters and GFLOPs of a model (and attention maps)"),
    "ablate": Command(AblateOptions, _ablate, "train one run per attention variant and print one table"),
    "tune": Command(TuneOptions, _tune, "search hyperparameters by evolution: one short run per trial, the best as a cfg file"),
    "env": Command(EnvOptions, _env, "what this installation runs on: versions, CPU and bf16 units, GPUs, amp=auto's pick, memory"),
    "data synth": Command(SynthOptions, _data_synth, "generate a synthetic dataset (profile=easy, the bundled shapes; hard or photo, the benchmark sets)"),
    "data check": Command(CheckOptions, _data_check, "scan a dataset, print statistics, save augmented previews"),
    "data convert": Command(ConvertOptions, _data_convert, "convert an Ultralytics data.yaml + labels/*.txt to COCO json and a dataset YAML of ours"),
    **{f"bench {b}": Command(cls, _bench(b, cls), summary) for b, (cls, summary) in BENCHES.items()},
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: detector <command> [key=value ...] [--help] [--verbose]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {cmd.summary}" for name, cmd in COMMANDS.items()]
    return "\n".join(lines)


def _split_command(args: list[str]) -> tuple[str | None, list[str]]:
    if not args:
        return None, []
    if args[0] in ("data", "bench") and len(args) > 1 and f"{args[0]} {args[1]}" in COMMANDS:
        return f"{args[0]} {args[1]}", args[2:]
    return args[0], args[1:]


def _group(name: str) -> list[str]:
    """The commands of a group (`data`, `bench`): ['synth', 'check', ...]; [] for any other name."""
    return [n.split(" ", 1)[1] for n in COMMANDS if n.startswith(f"{name} ")]


def _unknown_command(args: list[str]) -> str:
    """The error for a command not in COMMANDS: a group (`data`, `bench`) lists its own, a typo gets a did-you-mean."""
    group = _group(args[0])
    if group and (len(args) == 1 or "=" in args[1]):
        return f"'{args[0]}' needs a command: {', '.join(group)}"
    name = " ".join(args[:2]) if group else args[0]
    return f"unknown command '{name}'{did_you_mean(name, COMMANDS)}"


def _setup_logging(verbose: bool) -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s", stream=sys.stdout, force=True)
    if verbose:
        logging.getLogger("detector").setLevel(logging.DEBUG)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `detector` console script and `python -m detector`."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in args
    args = [a for a in args if a != "--verbose"]
    wants_help = any(a in ("-h", "--help") for a in args)
    args = [a for a in args if a not in ("-h", "--help")]
    name, rest = _split_command(args)
    if name in (None, "help"):
        print(_usage())
        return 0
    if name not in COMMANDS:
        group_help = wants_help and len(args) == 1 and bool(_group(name))
        print(_usage(), file=sys.stdout if wants_help else sys.stderr)
        if group_help:  # `detector bench --help`: the usage lists the group's commands
            return 0
        print(f"detector: error: {_unknown_command(args)}", file=sys.stderr)
        return 2
    command = COMMANDS[name]
    if wants_help:
        print(f"usage: detector {name} [key=value ...]\n\n{command.summary}\n")
        if command.options is not None:
            print(describe_options(command.options))
        return 0
    _setup_logging(verbose)
    try:
        result = command.run(parse_overrides(rest))
    except DetectorError as err:
        if verbose:
            traceback.print_exc()
        print(f"detector {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"detector {name}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as err:  # a loader worker's death, raised by torch's SIGCHLD handler outside any loader
        from detector.data.loader import worker_death_error

        died = worker_death_error(err)
        if died is None:
            raise
        if verbose:
            traceback.print_exc()
        print(f"detector {name}: error: {died}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


def run() -> int:
    """The program's entry (the `detector` console script, `python -m detector`, `torchrun -m detector`): `main`,
    then its objects frozen out of the garbage collector, so the interpreter's exit skips the collections that would
    walk torch's and the run's object graph (measured: 1.0 s -> 0.35 s from the last log line to the exit of a
    training run, the Sapphire Rapids Xeon). Everything else of a normal exit still runs: threads are joined,
    `atexit` handlers and finalizers run, files are flushed. Tests call `main`, which leaves the collector as it is.
    A reader that leaves early (`detector train --help | head`) ends the program quietly, as other tools do."""
    try:
        code = main()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
        return 141  # 128 + SIGPIPE, the shell's status for a program its reader left
    gc.freeze()
    return code

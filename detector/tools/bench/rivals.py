"""`python scripts/rivals.py`: ours against Ultralytics YOLOv8n / YOLO26n on the same COCO data, side by side.

Each side trains from scratch with the same data, epochs, imgsz, batch, seed and thread count, with its own recipe
(our defaults; Ultralytics' defaults, optimizer=auto). Both sides' val predictions (conf, NMS IoU and max_det as set
here) are scored by OUR pycocotools path (`detector.infer.metrics.evaluate_coco`) against the val json, so the
numbers compare. Ultralytics is AGPL: it is pip-installed into its own venv (system site-packages, so torch is
reused) and run as a separate program, `scripts/rivals_driver.py`; nothing here imports it. Its data is our COCO
json exported by our own `detector.data.yolo_txt`.

Output folder `<project>/<name>/`: yolo/ (the export), one folder per rival with its `result.json` (a rival whose
result.json exists is not run again; `force=true` reruns), and results.json + results.md with the table.
Train wall time is the training call alone on both sides, per-epoch validation included, imports and the
interpreter's exit left out: Ultralytics' `model.train()` call as the driver times it, and our trainer's own clock
(from its construction to its last epoch's checkpoint: `train_state.time_s` in last.pt, which also spans a resume).
Our whole `detector train` process, a few seconds more, is kept in train.json as `process_s`. images/s is epochs x
train images / the train wall time. Both sides train with plots off (Ultralytics' would download a font), so
neither pays for drawing them.
GFLOPs are one eval forward at imgsz counted by torch's FlopCounterMode on both sides; the ratio columns divide
each side's images/s, and its images/s x GFLOPs (arithmetic per second), by the first Ultralytics side's, so one
run prints the per-image and the per-FLOP speed-ups.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detector.config import build_options, describe_options, option, parse_overrides, workers_option
from detector.data.spec import load_data_spec
from detector.data.yolo_txt import YoloExport, reuse_or_export
from detector.errors import DetectorError

if TYPE_CHECKING:
    from pycocotools.coco import COCO

ULTRALYTICS_MODELS = {"yolov8n": "yolov8n.yaml", "yolo26n": "yolo26n.yaml"}
OURS = "ours"
TABLE_KEYS = ("AP", "AP50", "APs", "APm", "APl", "AR100")
COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
DRIVER = Path(__file__).resolve().parents[3] / "scripts" / "rivals_driver.py"  # the checkout's scripts/


@dataclass
class RivalsOptions:
    data: str = option("data/shapes.yaml", "dataset YAML (COCO json splits)")
    rivals: list[str] = option([*ULTRALYTICS_MODELS, OURS], "comma list of: yolov8n, yolo26n, ours", choices=[*ULTRALYTICS_MODELS, OURS])
    epochs: int = option(60, "epochs, every side", ge=1, le=100_000)
    imgsz: int = option(256, "train and val image size, every side", ge=32, le=8192, multiple_of=32)
    batch: int = option(16, "batch size, every side", ge=1, le=4096)
    seed: int = option(0, "seed, every side", ge=0, le=2**32 - 1)
    threads: int = option(0, "torch threads, every side (0: the CPUs this process may use)", ge=0, le=1024)
    device: str = option("cpu", "device for every side: cpu, or a CUDA index such as 0 ('' lets each tool pick)")
    model: str = option("", "our model YAML (default: detector train's default)")
    workers: int | str = workers_option("our data-loading workers, auto as in detector train (Ultralytics forces 0 on CPU by its own choice)")
    conf: float = option(0.001, "confidence threshold of the scored predictions", ge=0, le=1)
    iou: float = option(0.65, "NMS IoU of the scored predictions (0.65: what README's COCO figures use)", ge=0, le=1)
    max_det: int = option(300, "detections kept per image", ge=1, le=100_000)
    venv: str = option("~/.cache/detector/rivals-venv", "the Ultralytics venv (created on first use)")
    ultralytics: str = option("ultralytics", "pip requirement for Ultralytics (e.g. ultralytics==8.4.190)")
    project: str = option("runs/rivals", "parent folder")
    name: str = option("exp", "output folder name (a rerun with the same name reuses finished results)")
    force: bool = option(False, "rerun rivals whose result.json exists")


# what `run_ours` passes `detector train` itself: an ours.<key> of these would be a key given twice
HARNESS_TRAIN_KEYS = frozenset(("data", "epochs", "imgsz", "batch", "seed", "workers", "device", "project", "name",
                                "exist_ok", "plots", "model", "resume"))


def parse_args(argv: list[str]) -> tuple[RivalsOptions, list[str]]:
    """key=value args -> (options, our extra `detector train` args given as ours.key=value)."""
    ours_extra = [arg[len("ours."):] for arg in argv if arg.startswith("ours.")]
    taken = sorted(set(parse_overrides(ours_extra)) & HARNESS_TRAIN_KEYS)  # also the key=value check of each
    if taken:
        key = taken[0]
        instead = f"; give {key}= instead" if key in RivalsOptions.__dataclass_fields__ else ""
        raise DetectorError(f"command line: ours.{key}: the harness sets '{key}' of our detector train itself{instead}")
    values = parse_overrides([arg for arg in argv if not arg.startswith("ours.")])
    return build_options(RivalsOptions, values, "command line"), ours_extra  # rivals: known names, none twice


def thread_count(opts: RivalsOptions) -> int:
    return opts.threads if opts.threads > 0 else len(os.sched_getaffinity(0))


def machine_info(threads: int) -> dict[str, Any]:
    """The machine as `runtime.machine` names it (what decides whether ours' amp=auto trains in bf16), with the
    threads each side gets and Python's version, for results.json."""
    from detector.runtime.machine import describe_machine  # torch loads only here: the script's start stays quick

    machine = replace(describe_machine(), threads=threads)
    return {**asdict(machine), "python": platform.python_version(), "summary": machine.summary()}


def run_command(cmd: list[str], *, env: dict[str, str], log: Path) -> float:
    """Run `cmd` with its output both shown and kept in `log`; returns its wall time; an error names the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    with log.open("a") as sink, subprocess.Popen(cmd, env=env, **pipe) as proc:  # type: ignore[call-overload]
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sink.write(line)
    if proc.returncode != 0:
        raise DetectorError(f"'{cmd[0]} {cmd[1] if len(cmd) > 1 else ''}' exited with status {proc.returncode}; see {log}")
    return time.perf_counter() - start


def thread_env(threads: int, **extra: str) -> dict[str, str]:
    """The environment for a child: the thread count pinned (OpenMP and MKL read it when torch starts)."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **extra}


def ensure_venv(opts: RivalsOptions, log: Path) -> Path:
    """The venv's python, creating the venv and installing Ultralytics on first use (marker file: .rivals-ready)."""
    venv = Path(opts.venv).expanduser()
    python = venv / "bin" / "python"
    marker = venv / ".rivals-ready"
    if marker.exists() and python.exists() and marker.read_text().strip() == opts.ultralytics:
        return python
    start = time.perf_counter()
    env = thread_env(1)
    if not python.exists():
        run_command([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], env=env, log=log)
    # torch and torchvision come from the system site-packages (and pip's constraints); nothing here pins them
    run_command([str(python), "-m", "pip", "install", "-q", opts.ultralytics], env=env, log=log)
    marker.write_text(opts.ultralytics + "\n")
    print(f"rivals venv {venv} ready in {time.perf_counter() - start:.0f} s", flush=True)
    return python


def run_ultralytics(rival: str, opts: RivalsOptions, export: YoloExport, folder: Path, python: Path) -> dict[str, Any]:
    """Train and predict with the driver in the venv; returns its train.json plus the predictions path."""
    threads = thread_count(opts)
    job = {
        "model": ULTRALYTICS_MODELS[rival], "data_yaml": str(export.data_yaml), "out": str(folder),
        "epochs": opts.epochs, "imgsz": opts.imgsz, "batch": opts.batch, "seed": opts.seed, "device": opts.device,
        "threads": threads, "conf": opts.conf, "iou": opts.iou, "max_det": opts.max_det,
        "category_ids": export.category_ids, "val_images": export.images["val"],
    }
    folder.mkdir(parents=True, exist_ok=True)
    job_file = folder / "job.json"
    job_file.write_text(json.dumps(job, indent=1))
    # offline: no analytics, no update checks; its settings file lives in the venv, not in the user's home
    env = thread_env(threads, YOLO_OFFLINE="true", YOLO_CONFIG_DIR=str(python.parent.parent / "ultralytics-config"))
    run_command([str(python), str(DRIVER), str(job_file)], env=env, log=folder / "log.txt")
    info = json.loads((folder / "train.json").read_text())
    return {**info, "predictions": str(folder / "predictions.json")}


def run_ours(opts: RivalsOptions, ours_extra: list[str], folder: Path) -> dict[str, Any]:
    """`detector train` then `detector val` (best.pt, the scored conf / iou / max_det) as subprocesses."""
    threads = thread_count(opts)
    env, log = thread_env(threads), folder / "log.txt"
    detector = [sys.executable, "-m", "detector"]
    run_dir = folder / "train"
    last, best, train_json = run_dir / "weights" / "last.pt", run_dir / "weights" / "best.pt", folder / "train.json"
    if not train_json.exists():
        resumed = last.exists()
        if resumed:
            cmd = [*detector, "train", f"resume={last}"]
        else:
            shared = [f"data={opts.data}", f"epochs={opts.epochs}", f"imgsz={opts.imgsz}", f"batch={opts.batch}"]
            cmd = [*detector, "train", *shared, f"seed={opts.seed}", f"workers={opts.workers}", f"device={opts.device}",
                   f"project={folder}", "name=train", "exist_ok=true", "plots=false",
                   *([f"model={opts.model}"] if opts.model else []),
                   *ours_extra]
        process_s = run_command(cmd, env=env, log=log)
        params, gflops = model_size(best, opts.imgsz)
        info = {"wall_s": trained_seconds(last), "process_s": process_s, "process_resumed": resumed,
                "resumed": False,  # the trainer's clock spans the resume: the whole run, not its last part
                "params": params, "gflops": gflops, "label": ours_label(run_dir)}
        train_json.write_text(json.dumps(info, indent=1))
    val = [f"weights={best}", f"data={opts.data}", f"imgsz={opts.imgsz}", f"conf={opts.conf}", f"iou={opts.iou}",
           f"max_det={opts.max_det}", f"device={opts.device}", f"workers={opts.workers}"]
    run_command([*detector, "val", *val, f"project={folder}", "name=val", "exist_ok=true", "plots=false"], env=env, log=log)
    info = json.loads(train_json.read_text())
    return {**info, "weights": str(best), "predictions": str(folder / "val" / "predictions.json")}


def ours_label(run_dir: Path) -> str:
    """'ours (yolo-ca-n, amp auto)' from the run's args.yaml, so the table says which of our configs ran."""
    from detector.yamlfile import load_yaml

    args = load_yaml(run_dir / "args.yaml")[0] if (run_dir / "args.yaml").exists() else {}
    args = args if isinstance(args, dict) else {}
    return f"ours ({Path(str(args.get('model', '?'))).stem}, amp {args.get('amp', '?')})"


def trained_seconds(last: Path) -> float:
    """Our training call's wall time by the trainer's own clock (`train_state.time_s` of its last checkpoint: from
    the trainer's construction to the last epoch's save, resumes included), what the driver's timer around
    Ultralytics' `model.train()` measures on its side."""
    from detector.runtime.checkpoint import load_checkpoint

    seconds = load_checkpoint(last)["train_state"].get("time_s")
    if not isinstance(seconds, (int, float)) or not seconds > 0:
        raise DetectorError(f"{last}: train_state.time_s is {seconds!r}, not a positive number of seconds")
    return float(seconds)


def model_size(weights: Path, imgsz: int) -> tuple[int, float]:
    """Parameters of our checkpoint's model (buffers such as anchors and BN statistics not counted) and its
    GFLOPs at imgsz, counted as the driver counts Ultralytics'."""
    from detector.api import Detector
    from detector.models.info import count_flops

    model = Detector(weights, device="cpu").model
    return int(sum(p.numel() for p in model.parameters())), count_flops(model, imgsz)


def score_predictions(predictions: Path, gt: COCO) -> dict[str, float]:
    """The COCO numbers of a predictions.json (COCO result rows) by our pycocotools path."""
    from detector.infer.metrics import evaluate_coco

    if not predictions.exists():
        raise DetectorError(f"{predictions}: missing (the run did not write its predictions)")
    try:
        rows = json.loads(predictions.read_text())
    except json.JSONDecodeError as err:
        raise DetectorError(f"{predictions}:{err.lineno}: not valid JSON ({err.msg})") from err
    if not isinstance(rows, list):
        raise DetectorError(f"{predictions}: expected a list of COCO result rows")
    metrics, _ = evaluate_coco(gt, rows, backend="pycocotools")
    return {k: float(metrics[k]) for k in COCO_KEYS}


def rival_result(rival: str, run: dict[str, Any], metrics: dict[str, float], opts: RivalsOptions, train_images: int) -> dict[str, Any]:
    """One table row's data, as result.json stores it. A resumed Ultralytics run timed only the epochs after its
    `epochs_before`: its rate counts those."""
    wall_s = float(run["wall_s"])
    timed = opts.epochs - int(run.get("epochs_before", 0))
    return {
        "model": run.get("label", rival), "rival": rival, "params": int(run["params"]), "gflops": run.get("gflops"),
        "metrics": metrics, "wall_s": wall_s, "timed_epochs": timed,
        "images_per_s": timed * train_images / wall_s if wall_s > 0 else 0.0, "train_images": train_images,
        "epochs": opts.epochs, "resumed": bool(run.get("resumed", False)), "predictions": run["predictions"],
        "version": run.get("version", ""),
    }


def speed_cells(result: dict[str, Any], reference: dict[str, Any] | None) -> list[str]:
    """GFLOPs, GFLOP/s sustained (train images/s x forward GFLOPs) and the per-image and per-FLOP ratios to the
    reference side ('-' where a figure is missing: a result.json from before GFLOPs were recorded)."""
    gflops = result.get("gflops")
    rate = result["images_per_s"]
    cells = [f"{gflops:.2f}" if gflops else "-", f"{rate * gflops:.1f}" if gflops else "-"]
    if reference is None or not reference["images_per_s"]:
        return [*cells, "-", "-"]
    per_flop = "-"
    if gflops and reference.get("gflops"):
        per_flop = f"{rate * gflops / (reference['images_per_s'] * reference['gflops']):.2f}x"
    return [*cells, f"{rate / reference['images_per_s']:.2f}x", per_flop]


def markdown_table(results: list[dict[str, Any]]) -> str:
    """The side-by-side table: model, params, the COCO numbers, train wall time, images/s, GFLOPs, GFLOP/s and
    the speed ratios to the first Ultralytics side (per image and per FLOP)."""
    reference = next((r for r in results if r.get("rival", OURS) != OURS), None)
    vs = f" vs {reference['rival']}" if reference else ""
    headers = ["model", "params", *TABLE_KEYS, "train wall (s)", "train img/s", "GFLOPs", "GFLOP/s", f"img/s{vs}", f"per FLOP{vs}"]
    align = ["---", "---:", *["---:"] * (len(headers) - 2)]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    for r in results:
        wall = f"{r['wall_s']:.0f}" + (f" (resumed: its last {r.get('timed_epochs', '?')} epochs)" if r["resumed"] else "")
        cells = [r["model"], f"{r['params']:,}", *(f"{r['metrics'][k]:.3f}" for k in TABLE_KEYS), wall,
                 f"{r['images_per_s']:.1f}", *speed_cells(r, reference)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_header(info: dict[str, Any], opts: RivalsOptions, versions: dict[str, str]) -> str:
    """Where and how the table was made: machine, budget, scoring settings."""
    used = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    return (
        f"{info['summary']} (the threads of each side), device {opts.device or 'auto'}"
        + (f"; {used}" if used else "") + ".\n"
        f"Data {opts.data}: {opts.epochs} epochs, imgsz {opts.imgsz}, batch {opts.batch}, seed {opts.seed}, from scratch. "
        f"Scored by pycocotools on the val json: conf {opts.conf}, NMS IoU {opts.iou} (YOLO26 is NMS-free: its own top-k), "
        f"max_det {opts.max_det}."
    )


def run_rival(rival: str, opts: RivalsOptions, ours_extra: list[str], out: Path, export: YoloExport, gt: COCO) -> dict[str, Any]:
    """One rival's result, reused from its result.json unless `force`."""
    folder = out / rival
    result_file = folder / "result.json"
    if result_file.exists() and not opts.force:
        print(f"{rival}: reusing {result_file}", flush=True)
        return json.loads(result_file.read_text())
    if rival == OURS:
        run = run_ours(opts, ours_extra, folder)
    else:
        python = ensure_venv(opts, out / "venv-log.txt")
        run = run_ultralytics(rival, opts, export, folder, python)
    result = rival_result(rival, run, score_predictions(Path(run["predictions"]), gt), opts, len(export.images["train"]))
    result_file.write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str]) -> int:
    """Export the data, run every rival in turn, print and save the table."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.split("\n\n")[0] + "\n\nkeys (key=value; ours.<key>=<value> goes to our `detector train`):")
        print(describe_options(RivalsOptions))
        return 0
    opts, ours_extra = parse_args(argv)
    # absolute: Ultralytics files a relative `project` under its own runs folder, not the working directory
    out = (Path(opts.project) / opts.name).resolve()
    spec = load_data_spec(opts.data)  # checks the YAML before anything long starts
    export = reuse_or_export(spec, out / "yolo")  # shared by concurrent invocations of the same name
    from detector.data.coco import CocoDataset

    gt = CocoDataset(spec.val, names=spec.names).coco_gt()
    info = machine_info(thread_count(opts))
    results = [run_rival(rival, opts, ours_extra, out, export, gt) for rival in opts.rivals]
    versions = {"ultralytics": next((r["version"] for r in results if r.get("version")), "")}
    text = report_header(info, opts, versions) + "\n\n" + markdown_table(results)
    print("\n" + text)
    (out / "results.md").write_text(text + "\n")
    payload = {"machine": info, "options": asdict(opts), "ours_extra": ours_extra, "results": results}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {out / 'results.md'} and {out / 'results.json'}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """Entry point of scripts/rivals.py: a DetectorError is one line and status 2, as in the project CLI."""
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except DetectorError as err:
        print(f"rivals: error: {err}", file=sys.stderr)
        return 2

"""Configuration: YAML files and ``key=value`` overrides into validated dataclasses.

YAML is read by `detector.yamlfile.load_yaml` (``yaml.safe_load`` semantics, bounded in size, depth and nodes).

Every option class is a plain dataclass whose fields carry their help text, so `--help`, validation and
the defaults come from one place. Values from the command line are strings typed by the field's type;
values from YAML keep theirs (an int for a float key is widened, never a bool for a number), and a YAML string
is typed as the command line's would be (PyYAML reads `lr0: 1e-3` as a string). Any error names its source:
the file and line of a YAML key, or "command line" for an override, with a did-you-mean for misspelled keys.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from detector.errors import DetectorError, did_you_mean
from detector.yamlfile import load_yaml

T = TypeVar("T")


@dataclass(frozen=True)
class Bounds:
    """What values a key accepts: a numeric range (with a step), or a set of strings.

    Checked by `build_options` on every value from the command line, a YAML file or the Python API, before any
    work starts, after its own check that every float is finite (`_check_bounds`); `rule()` says it in words for
    the error and for `--help`."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    multiple_of: int | None = None
    choices: tuple[str, ...] | None = None
    words: tuple[str, ...] = ()  # strings a numeric key also takes (workers=auto)

    def accepts(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        if isinstance(value, str):
            return value in self.words
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt)
                and (self.multiple_of is None or value % self.multiple_of == 0))

    def rule(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) if c == "" else c for c in self.choices)
        parts = [f"{op} {_number(v)}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if v is not None]
        if self.multiple_of is not None:
            parts.append(f"a multiple of {self.multiple_of}")
        return ", ".join(self.words) + " or " * bool(self.words) + " and ".join(parts)


def _number(value: float) -> str:
    return f"{value:,}" if float(value).is_integer() and abs(value) >= 10_000 else f"{value:g}"


def option(default: Any, help: str, *, run_only: bool = False, neutral: bool = False, **bounds: Any) -> Any:
    """A dataclass field with its `--help` text and its `Bounds` (ge=, gt=, le=, lt=, multiple_of=, choices=);
    list defaults are copied per instance, and a list's bounds apply to each item. `run_only`: the key shapes
    how a run is carried out, not what it trains (batch, workers, epochs ...), so a resumed run may change it.
    `neutral` (implies run_only): the key says only where and with what a run executes (paths, devices, worker
    processes, what it saves and plots), so two runs that differ in neutral keys alone are the same experiment."""
    for name in ("choices", "words"):
        if name in bounds:
            bounds[name] = tuple(bounds[name])
    metadata = {"help": help, "bounds": Bounds(**bounds) if bounds else None, "run_only": run_only or neutral,
                "neutral": neutral}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def workers_option(help: str, **flags: Any) -> Any:
    """The data-loading worker count every command shares: a number, or "auto" (`data.loader.resolve_workers`)."""
    return option("auto", help, ge=0, le=64, words=["auto"], **flags)


def worker_priority_option(**flags: Any) -> Any:
    """The loader workers' scheduling priority, shared by the commands that load data
    (`data.loader.resolve_worker_priority`)."""
    return option("auto", "loader workers' CPU priority: auto (idle when the model runs on the CPU, so the workers use only the cycles it leaves), idle, normal (for a machine busy with other work)",
                  choices=["auto", "idle", "normal"], **flags)


# --------------------------------------------------------------------------------------------------
# typed options


OVERRIDE_SECTIONS = ("model", "train")  # `model.attention=cbam` reads as `attention=cbam`


def parse_overrides(args: typing.Sequence[str]) -> dict[str, str]:
    """['epochs=10', 'model.attention=cbam'] -> {'epochs': '10', 'attention': 'cbam'} (a leading section is dropped).

    A key given twice is an error (`epochs=10 ... epochs=20`, `attention=se model.attention=cbam`): one value would
    be dropped without a word. So is a section other than `model.` or `train.`, and a key written with dashes
    (`--epochs=3`), where the key named would not be the one meant."""
    out: dict[str, str] = {}
    given: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise DetectorError(f"command line: '{arg}' is not key=value")
        if key.startswith("-"):
            raise DetectorError(f"command line: '{arg}': keys are written without dashes ({key.lstrip('-')}={value})")
        *sections, name = key.split(".")
        if len(sections) > 1 or (sections and sections[0] not in OVERRIDE_SECTIONS):
            shown = ".".join(sections)
            raise DetectorError(f"command line: '{arg}': unknown section '{shown}' (model. or train., or none)"
                                f"{did_you_mean(shown, OVERRIDE_SECTIONS)}")
        name = name.replace("-", "_")
        if name in out:
            raise DetectorError(f"command line: '{name}' is given twice ('{given[name]}' and '{arg}')")
        out[name], given[name] = value, arg
    return out


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    """Type `value` (a string from the command line, or a YAML value) as the field's `hint`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
            return None
        options = [a for a in args if a is not type(None)]
        for option_type in options[:-1]:  # int | str: a number when it reads as one, else the word (bounds check it)
            try:
                return _coerce(value, option_type, key, where)
            except DetectorError:
                continue
        return _coerce(value, options[-1], key, where)
    if origin is list:
        (item_type,) = typing.get_args(hint) or (str,)
        if isinstance(value, str):
            items: list[Any] = [v.strip() for v in value.strip().removesuffix(",").split(",")] if value.strip() else []
            if "" in items:  # 1,,2: a value left out, not one item fewer (a trailing comma is fine)
                raise DetectorError(f"{where}: '{key}' has an empty item in {value!r}")
        elif isinstance(value, (list, tuple)):
            items = list(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            items = [value]  # `freeze: 3` in a YAML or freeze=3 in the API reads as freeze=3 does on the command line
        else:
            raise DetectorError(f"{where}: '{key}' expects a list, got {value!r}")
        return [_coerce(v, item_type, key, where) for v in items]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise DetectorError(f"{where}: '{key}' expects true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise DetectorError(f"{where}: '{key}' expects a number, got {value!r}")
        if isinstance(value, (int, float)) and not (hint is int and isinstance(value, float) and not value.is_integer()):
            return hint(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None and (hint is float or number.is_integer()):
                return hint(number)
        raise DetectorError(f"{where}: '{key}' expects {'an integer' if hint is int else 'a number'}, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise DetectorError(f"{where}: '{key}' expects a string, got {value!r}")
    return value


def build_options(cls: type[T], values: dict[str, Any], where: str | dict[str, str]) -> T:
    """Validate `values` against dataclass `cls`: unknown keys and wrong types are errors naming their source.

    `where` is one source for all keys ("command line") or a map key -> source ("file.yaml:12").
    """
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    typed: dict[str, Any] = {}
    for key, value in values.items():
        source = where if isinstance(where, str) else where.get(key, "config")
        if key not in hints:
            raise DetectorError(f"{source}: unknown key '{key}'{did_you_mean(key, names)}")
        typed[key] = _coerce(value, hints[key], key, source)
        _check_bounds(cls, key, typed[key], value, source)
    options = cls(**typed)
    object.__setattr__(options, "_given", frozenset(typed))  # not a field: never saved, never compared
    return options


def given_keys(options: Any) -> frozenset[str]:
    """The keys a user set (on the command line, in a cfg file or in the API call), defaults or not, for options
    made by `build_options`; every field for options constructed directly."""
    return getattr(options, "_given", frozenset(f.name for f in dataclasses.fields(options)))


def run_only_keys(cls: type) -> frozenset[str]:
    """The fields declared `run_only` (a resumed run may change them)."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("run_only"))


def neutral_keys(cls: type) -> frozenset[str]:
    """The fields declared `neutral` (runs that differ only in them are the same experiment)."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("neutral"))


def _check_bounds(cls: type, key: str, value: Any, given: Any, source: str) -> None:
    """Refuse a typed `value` outside field `key`'s `Bounds` (each item of a list); the error shows it as `given`."""
    bounds = next(f for f in dataclasses.fields(cls) if f.name == key).metadata.get("bounds")
    if isinstance(value, list):
        repeated = next((item for i, item in enumerate(value) if item in value[:i]), None)
        if repeated is not None:  # no list key means anything by a repeat: freeze=0,0, seeds=0,0, attentions=ca,ca
            raise DetectorError(f"{source}: '{key}' lists {repeated!r} more than once")
    for item in value if isinstance(value, list) else [value]:
        shown = item if isinstance(value, list) or isinstance(given, (list, tuple)) else given
        if isinstance(item, float) and not math.isfinite(item):
            raise DetectorError(f"{source}: '{key}' must be a finite number, got {shown!r}")
        if bounds is not None and item is not None and not bounds.accepts(item):
            raise DetectorError(f"{source}: '{key}' must be {bounds.rule()}, got {shown!r}")


def describe_options(cls: type) -> str:
    """The `--help` text: every key, its default and its meaning."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        bounds = f.metadata.get("bounds")
        rule = f" [{bounds.rule()}]" if bounds is not None and bounds.choices is None else ""
        rows.append((f"{f.name}={shown}", f.metadata.get("help", "") + rule))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {key.ljust(width)}  {text}" for key, text in rows)


# the model YAMLs, the default train config and the tune space ship inside the package (the checkout's configs/
# links to them); a filesystem install is assumed (a zipped package would need importlib.resources.as_file)
PACKAGE_CONFIGS = Path(str(importlib.resources.files("detector").joinpath("configs")))


def shipped_if_missing(path: str) -> str:
    """A config path as given, or, when no such file exists and it names one of the package's own configs
    (`configs/train/default.yaml`), the YAML shipped inside the package: an installed package has no checkout."""
    given = Path(path)
    if given.exists() or len(given.parts) < 3 or given.parts[-3] != "configs":
        return path
    shipped = PACKAGE_CONFIGS.joinpath(*given.parts[-2:])
    return str(shipped) if shipped.is_file() else path


def load_options(cls: type[T], overrides: dict[str, str], *, file_key: str | None = None) -> T:
    """Options from an optional YAML file (named by `overrides[file_key]`) updated by command-line overrides."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    overrides = dict(overrides)
    cfg_file = overrides.pop(file_key, None) if file_key else None
    if cfg_file:
        cfg_file = shipped_if_missing(cfg_file)
        data, lines = load_yaml(cfg_file)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise DetectorError(f"{cfg_file}: expected a mapping of key: value")
        values.update(data)
        sources.update({k: f"{cfg_file}:{lines.get(k, 1)}" for k in data})
    values.update(overrides)
    sources.update({k: "command line" for k in overrides})
    return build_options(cls, values, sources)


# --------------------------------------------------------------------------------------------------
# training


@dataclass
class TrainConfig:
    """Every training hyperparameter (configs/train/default.yaml documents the same keys and defaults)."""

    model: str = option("configs/models/yolo-ca-n.yaml", "model YAML (path, or a name in configs/models)")
    data: str = option("data/shapes.yaml", "dataset YAML; the bundled data/shapes.yaml is generated on first use")
    epochs: int = option(100, "number of epochs", ge=1, le=100_000, run_only=True)
    time: float = option(0.0, "time budget in hours (0: off); overrides epochs: after each epoch the count is refitted to what the budget holds", ge=0, le=10_000, run_only=True)
    batch: int = option(16, "global batch size (split across DDP ranks)", ge=1, le=4096, run_only=True)
    imgsz: int = option(640, "training and validation image size (pixels, multiple of 32)", ge=32, le=8192, multiple_of=32)
    workers: int | str = workers_option("data-loading worker processes per rank; auto: the CPUs this process may use, split over the ranks on this machine, at most 8 and the per-rank batch", neutral=True)
    worker_priority: str = worker_priority_option(neutral=True)
    device: str = option("", "'' (auto), cpu, cuda, 0, 0,1 ...", neutral=True)
    seed: int = option(0, "seed for torch, numpy, random and the data workers", ge=0, le=2**32 - 1)
    deterministic: bool = option(False, "use deterministic algorithms (slower)")
    project: str = option("runs/train", "parent folder of the run folder", neutral=True)
    name: str = option("exp", "run folder name (auto-incremented unless exist_ok)", neutral=True)
    exist_ok: bool = option(False, "reuse an existing run folder", neutral=True)
    resume: bool | str = option(False, "true: the newest run's weights/last.pt under project; or a path to a last.pt", neutral=True)
    weights: str = option("", "fine-tune: start a new run from this checkpoint's (EMA) weights, matched by name and shape (model=<checkpoint.pt> does the same with its architecture)")
    freeze: list[int] = option([], "freeze rows: N (the first N rows) or a comma list of row indices (0,1,2): no gradients, BN in eval mode", ge=0, le=10_000)
    # optimisation
    optimizer: str = option("AdamW", "AdamW, SGD or Adam (AdamW learns far faster from scratch in short runs; see README)", choices=["SGD", "AdamW", "Adam"])
    lr0: float = option(0.003, "initial learning rate (SGD wants about 0.01)", gt=0, le=1)
    lrf: float = option(0.01, "final learning rate as a fraction of lr0", gt=0, le=1)
    momentum: float = option(0.75, "Adam beta1 / SGD momentum (YOLOv5 SGD: 0.937)", ge=0, lt=1)
    weight_decay: float = option(6e-4, "weight decay on conv/linear weights (scaled by batch/nbs)", ge=0, lt=1)
    warmup_epochs: float = option(1.5, "warmup length in epochs", ge=0, le=10_000)
    warmup_min_iters: int = option(50, "warmup lasts at least this many iterations (capped at half the run)", ge=0, le=1_000_000)
    warmup_momentum: float = option(0.8, "momentum at the start of warmup", ge=0, lt=1)
    warmup_bias_lr: float = option(0.0, "bias learning rate at the start of warmup (YOLOv5 SGD: 0.1)", ge=0, le=1)
    cos_lr: bool = option(True, "cosine decay (false: linear)")
    nbs: int = option(16, "nominal batch size: gradients are accumulated up to it (YOLOv5: 64)", ge=1, le=4096)
    clip_grad: float = option(10.0, "max gradient norm (0: off)", ge=0, le=1e6)
    bn_momentum: float = option(0.1, "BatchNorm running-stat momentum (YOLOv5: 0.03); higher keeps eval-mode stats up with fast-moving weights in short runs", ge=0, le=1)
    ema: bool = option(True, "keep an exponential moving average of the weights (evaluated and saved)")
    ema_decay: float = option(0.9999, "EMA decay, ramped by 1 - exp(-updates / ema_tau)", ge=0, lt=1)
    ema_tau: float = option(2000.0, "EMA ramp length in updates", gt=0, le=1e9)
    # loss
    box: float | None = option(None, "box loss gain (default: the head's own, 0.05 for Detect, 7.5 for DecoupledDetect)", ge=0, le=1000)
    cls: float = option(0.75, "class loss gain", ge=0, le=1000)
    obj: float = option(1.0, "objectness loss gain (Detect only)", ge=0, le=1000)
    anchor_t: float = option(4.0, "anchor-target size ratio threshold", gt=1, le=100)
    static_assign_epochs: int = option(1, "first epochs whose positives are ranked by the anchor boxes' IoU before "
                                          "the task-aligned assignment (DecoupledDetect)", ge=0, le=100000)
    label_smoothing: float = option(0.0, "class label smoothing epsilon (Detect only)", ge=0, lt=1)
    autoanchor: bool = option(True, "check anchors before training and evolve them when recall < 0.98")
    # augmentation
    hsv_h: float = option(0.015, "hue jitter (fraction)", ge=0, le=1)
    hsv_s: float = option(0.9, "saturation jitter (fraction)", ge=0, le=1)
    hsv_v: float = option(0.14, "value jitter (fraction)", ge=0, le=1)
    degrees: float = option(0.0, "rotation (+/- degrees)", ge=0, le=180)
    translate: float = option(0.2, "translation (+/- fraction)", ge=0, lt=1)
    scale: float = option(0.65, "scale jitter (+/- gain)", ge=0, lt=1)
    shear: float = option(1.5, "shear (+/- degrees)", ge=0, lt=90)
    fliplr: float = option(0.5, "horizontal flip probability", ge=0, le=1)
    flipud: float = option(0.0, "vertical flip probability", ge=0, le=1)
    mosaic: float = option(0.9, "mosaic probability", ge=0, le=1)
    mixup: float = option(0.08, "mixup probability of a mosaic sample (as YOLOv5: none once mosaic is off)", ge=0, le=1)
    multi_scale: float = option(0.0, "train each batch at a random size in imgsz x (1 +/- multi_scale), a multiple of the stride (0: off; Ultralytics' multi_scale=True is 0.5)", ge=0, lt=1)
    close_mosaic: int = option(10, "turn mosaic off for the last N epochs (a run of N epochs or fewer trains without mosaic)", ge=0, le=100_000)
    fraction: float = option(1.0, "train on this share of the training images (the same ones in every run: one fixed shuffle's first share; validation uses all)", gt=0, le=1)
    cache: str = option("auto", "'ram' keeps the decoded training images (and the val images, validated every epoch) in memory, 'auto' when each split takes at most a quarter of the available memory, '' off (the samples are the same either way)", choices=["auto", "ram", ""], neutral=True)
    # precision and speed
    amp: str = option("auto", "auto (bf16 on AMX CPUs and bf16 GPUs, fp16 on older GPUs), bf16, fp16, off", choices=["auto", "bf16", "fp16", "off"])
    channels_last: bool = option(True, "channels_last memory format")
    compile: bool = option(False, "torch.compile the model", neutral=True)
    sync_bn: bool = option(False, "SyncBatchNorm under DDP on GPU")
    # validation, checkpoints, logging
    val_interval: int = option(1, "evaluate every N epochs (and always after the last)", ge=1, le=100_000, run_only=True)
    val_conf: float = option(0.001, "confidence threshold for validation", ge=0, le=1)
    val_iou: float = option(0.6, "NMS IoU threshold for validation", ge=0, le=1)
    max_det: int = option(300, "detections kept per image", ge=1, le=100_000)
    patience: int = option(50, "stop after N epochs without fitness improvement (0: never)", ge=0, le=100_000, run_only=True)
    save_period: int = option(0, "also keep weights/epochN.pt every N epochs (0: off)", ge=0, le=100_000, neutral=True)
    max_nonfinite: int = option(20, "stop after this many non-finite losses in a row", ge=1, le=1_000_000, neutral=True)
    strict: bool = option(False, "treat every skipped image or box in the dataset as an error")
    plots: bool = option(True, "save the training curves and the validation plots (PR curves, confusion matrix, example images)", neutral=True)
    attention: str = option("", "override the model YAML's attention: any name of the attention registry (ca, se, cbam, eca, mhsa, axial, ssa, gate, none, and the priors edge, coord, gc)")
    attention_at: str = option("", "override the attention place in AttnC2f/CA_C2f: output, concat, bottleneck", choices=["", "output", "concat", "bottleneck"])


def load_train_config(overrides: dict[str, str]) -> TrainConfig:
    """Defaults, then an optional `cfg=<yaml>` of train keys, then the command-line overrides."""
    return load_options(TrainConfig, overrides, file_key="cfg")

"""Configuration: YAML files and ``key=value`` overrides into validated dataclasses.

YAML is read by `detector.yamlfile.load_yaml` (``yaml.safe_load`` semantics, bounded in size, depth and nodes).

Every option class is a plain dataclass whose fields carry their help text, so `--help`, validation and
the defaults come from one place. Values from the command line are strings typed by the field's type;
values from YAML must already have the right type. Any error names its source: the file and line of a
YAML key, or "command line" for an override, with a did-you-mean for misspelled keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from detector.errors import DetectorError
from detector.yamlfile import load_yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
LOGGER = logging.getLogger(__name__)
T = TypeVar("T")


def option(default: Any, help: str) -> Any:
    """A dataclass field with its `--help` text; list defaults are copied per instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def did_you_mean(name: str, choices: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --------------------------------------------------------------------------------------------------
# typed options


def parse_overrides(args: typing.Sequence[str]) -> dict[str, str]:
    """['epochs=10', 'model.attention=cbam'] -> {'epochs': '10', 'attention': 'cbam'} (a leading section is dropped)."""
    out: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise DetectorError(f"command line: '{arg}' is not key=value")
        out[key.split(".")[-1].replace("-", "_")] = value
    return out


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    """Type `value` (a string from the command line, or a YAML value) as the field's `hint`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(value, options[0], key, where)
    if origin is list:
        (item_type,) = typing.get_args(hint) or (str,)
        if isinstance(value, str):
            items: list[Any] = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
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
    return cls(**typed)


def describe_options(cls: type) -> str:
    """The `--help` text: every key, its default and its meaning."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        rows.append((f"{f.name}={shown}", f.metadata.get("help", "")))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {key.ljust(width)}  {text}" for key, text in rows)


def load_options(cls: type[T], overrides: dict[str, str], *, file_key: str | None = None) -> T:
    """Options from an optional YAML file (named by `overrides[file_key]`) updated by command-line overrides."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    overrides = dict(overrides)
    cfg_file = overrides.pop(file_key, None) if file_key else None
    if cfg_file:
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
    epochs: int = option(100, "number of epochs")
    time: float = option(0.0, "time budget in hours (0: off); overrides epochs: after each epoch the count is refitted to what the budget holds")
    batch: int = option(16, "global batch size (split across DDP ranks)")
    imgsz: int = option(640, "training and validation image size (pixels, multiple of 32)")
    workers: int = option(2, "data-loading worker processes per rank")
    device: str = option("", "'' (auto), cpu, cuda, 0, 0,1 ...")
    seed: int = option(0, "seed for torch, numpy, random and the data workers")
    deterministic: bool = option(False, "use deterministic algorithms (slower)")
    project: str = option("runs/train", "parent folder of the run folder")
    name: str = option("exp", "run folder name (auto-incremented unless exist_ok)")
    exist_ok: bool = option(False, "reuse an existing run folder")
    resume: str = option("", "'true' for the newest run, or a path to weights/last.pt")
    # optimisation
    optimizer: str = option("AdamW", "AdamW, SGD or Adam (AdamW learns far faster from scratch in short runs; see README)")
    lr0: float = option(0.004, "initial learning rate (SGD wants about 0.01)")
    lrf: float = option(0.01, "final learning rate as a fraction of lr0")
    momentum: float = option(0.9, "Adam beta1 / SGD momentum (YOLOv5 SGD: 0.937)")
    weight_decay: float = option(5e-4, "weight decay on conv/linear weights (scaled by batch/nbs)")
    warmup_epochs: float = option(1.0, "warmup length in epochs")
    warmup_min_iters: int = option(50, "warmup lasts at least this many iterations (capped at half the run)")
    warmup_momentum: float = option(0.8, "momentum at the start of warmup")
    warmup_bias_lr: float = option(0.0, "bias learning rate at the start of warmup (YOLOv5 SGD: 0.1)")
    cos_lr: bool = option(True, "cosine decay (false: linear)")
    nbs: int = option(16, "nominal batch size: gradients are accumulated up to it (YOLOv5: 64)")
    clip_grad: float = option(10.0, "max gradient norm (0: off)")
    bn_momentum: float = option(0.1, "BatchNorm running-stat momentum (YOLOv5: 0.03); higher keeps eval-mode stats up with fast-moving weights in short runs")
    ema: bool = option(True, "keep an exponential moving average of the weights (evaluated and saved)")
    ema_decay: float = option(0.9999, "EMA decay, ramped by 1 - exp(-updates / ema_tau)")
    ema_tau: float = option(2000.0, "EMA ramp length in updates")
    # loss
    box: float | None = option(None, "box loss gain (default: the head's own, 0.05 for Detect, 7.5 for DecoupledDetect)")
    cls: float = option(0.5, "class loss gain")
    obj: float = option(1.0, "objectness loss gain (Detect only)")
    anchor_t: float = option(4.0, "anchor-target size ratio threshold")
    label_smoothing: float = option(0.0, "class label smoothing epsilon (Detect only)")
    autoanchor: bool = option(True, "check anchors before training and evolve them when recall < 0.98")
    # augmentation
    hsv_h: float = option(0.015, "hue jitter (fraction)")
    hsv_s: float = option(0.7, "saturation jitter (fraction)")
    hsv_v: float = option(0.4, "value jitter (fraction)")
    degrees: float = option(0.0, "rotation (+/- degrees)")
    translate: float = option(0.1, "translation (+/- fraction)")
    scale: float = option(0.5, "scale jitter (+/- gain)")
    shear: float = option(0.0, "shear (+/- degrees)")
    fliplr: float = option(0.5, "horizontal flip probability")
    flipud: float = option(0.0, "vertical flip probability")
    mosaic: float = option(1.0, "mosaic probability")
    mixup: float = option(0.0, "mixup probability")
    close_mosaic: int = option(10, "turn mosaic off for the last N epochs (a run of N epochs or fewer trains without mosaic)")
    cache: str = option("", "'ram' keeps decoded training images in memory")
    # precision and speed
    amp: str = option("auto", "auto (bf16 on AMX CPUs and bf16 GPUs, fp16 on older GPUs), bf16, fp16, off")
    channels_last: bool = option(True, "channels_last memory format")
    compile: bool = option(False, "torch.compile the model")
    sync_bn: bool = option(False, "SyncBatchNorm under DDP on GPU")
    # validation, checkpoints, logging
    val_interval: int = option(1, "evaluate every N epochs (and always after the last)")
    val_conf: float = option(0.001, "confidence threshold for validation")
    val_iou: float = option(0.6, "NMS IoU threshold for validation")
    max_det: int = option(300, "detections kept per image")
    patience: int = option(50, "stop after N epochs without fitness improvement (0: never)")
    save_period: int = option(0, "also keep weights/epochN.pt every N epochs (0: off)")
    max_nonfinite: int = option(20, "stop after this many non-finite losses in a row")
    strict: bool = option(False, "treat every skipped image or box in the dataset as an error")
    plots: bool = option(True, "save training curves, labels and validation plots")
    attention: str = option("", "override the model YAML's attention (ca, se, cbam, eca, mhsa, axial, ssa, gate, none)")
    attention_at: str = option("", "override the attention place in AttnC2f/CA_C2f: output, concat, bottleneck")


def load_train_config(overrides: dict[str, str]) -> TrainConfig:
    """Defaults, then an optional `cfg=<yaml>` of train keys, then the command-line overrides."""
    config = load_options(TrainConfig, overrides, file_key="cfg")
    _check_train_config(config)
    return config


def _check_train_config(cfg: TrainConfig) -> None:
    checks = [
        (cfg.epochs >= 1, "epochs must be >= 1"),
        (cfg.time >= 0, f"time must be >= 0 hours, got {cfg.time}"),
        (cfg.batch >= 1, "batch must be >= 1"),
        (cfg.imgsz >= 32 and cfg.imgsz % 32 == 0, f"imgsz must be a multiple of 32, got {cfg.imgsz}"),
        (cfg.workers >= 0, "workers must be >= 0"),
        (cfg.optimizer in ("SGD", "AdamW", "Adam"), f"optimizer must be SGD, AdamW or Adam, got '{cfg.optimizer}'"),
        (cfg.amp in ("auto", "bf16", "fp16", "off"), f"amp must be auto, bf16, fp16 or off, got '{cfg.amp}'"),
        (cfg.cache in ("", "ram"), f"cache must be '' or ram, got '{cfg.cache}'"),
        (cfg.val_interval >= 1, "val_interval must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise DetectorError(f"config: {message}")


def resolve_model_path(model: str) -> Path:
    """A model YAML path as given, or a bare name ('yolo-ca-n') looked up in the repository's configs/models."""
    given = Path(model)
    if given.exists():
        return given
    for candidate in (REPO_ROOT / "configs" / "models" / given.name, REPO_ROOT / "configs" / "models" / f"{model}.yaml"):
        if candidate.exists():
            return candidate
    known = sorted(p.stem for p in (REPO_ROOT / "configs" / "models").glob("*.yaml"))
    raise DetectorError(f"model: '{model}' not found{did_you_mean(given.stem, known)}; known: {', '.join(known)}")


# --------------------------------------------------------------------------------------------------
# datasets


@dataclass(frozen=True)
class SplitSpec:
    """One split of a COCO-format dataset: an image folder and its instances json (absolute paths)."""

    images: Path
    annotations: Path


@dataclass(frozen=True)
class DataSpec:
    """A dataset YAML: `train` and `val` splits and optional class-name overrides."""

    path: Path
    train: SplitSpec
    val: SplitSpec
    names: list[str] | None = None


_DATA_KEYS = ("path", "train", "val", "names", "download")


def load_data_spec(path: str | Path) -> DataSpec:
    """Parse a dataset YAML; relative paths are relative to the YAML's folder (or its `path:` key).

    A `download:` key (common in other tools' YAMLs) is never executed: it is ignored with a warning.
    """
    path = Path(path)
    data, lines = load_yaml(path)
    if not isinstance(data, dict):
        raise DetectorError(f"{path}: expected a mapping with 'train' and 'val'")
    for key in data:
        if key not in _DATA_KEYS:
            raise DetectorError(f"{path}:{lines.get(str(key), 1)}: unknown key '{key}'{did_you_mean(key, _DATA_KEYS)}")
    if "download" in data:
        LOGGER.warning("%s: 'download' is ignored (detector never runs scripts from a YAML)", path)
    root = path.resolve().parent
    if data.get("path") is not None:
        root = (root / str(data["path"])).resolve()
    splits = {}
    for split in ("train", "val"):
        if split not in data:
            raise DetectorError(f"{path}: missing key '{split}' ({{images: <dir>, annotations: <instances json>}})")
        entry = data[split]
        where = f"{path}:{lines.get(split, 1)}"
        for key in entry if isinstance(entry, dict) else ():
            if key not in ("images", "annotations"):
                line = lines.get(f"{split}.{key}", lines.get(split, 1))
                raise DetectorError(f"{path}:{line}: unknown key '{split}.{key}'{did_you_mean(key, ('images', 'annotations'))}")
        if not isinstance(entry, dict) or set(entry) != {"images", "annotations"}:
            raise DetectorError(f"{where}: '{split}' must be {{images: <dir>, annotations: <instances json>}}, got {entry!r}")
        splits[split] = SplitSpec(images=(root / str(entry["images"])).resolve(), annotations=(root / str(entry["annotations"])).resolve())
    names = data.get("names")
    if names is not None:
        if isinstance(names, dict):
            names = [names[k] for k in sorted(names)]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DetectorError(f"{path}:{lines.get('names', 1)}: 'names' must be a list of strings")
    return DataSpec(path=path.resolve(), train=splits["train"], val=splits["val"], names=names)

"""Model YAML -> `DetectionModel`: the only code that reads model rows.

A YAML has `backbone:` and `head:` lists of rows `[from, repeats, module, args]` (YOLOv5/YOLOv8 format, so
classic YOLOv5 v6+ files load unchanged):
- `from`: -1 (the previous row), a row index, a negative offset, or a list of them (multi-input rows).
- `repeats`: scaled to max(round(n * depth_multiple), 1) when n > 1; passed to repeat-taking blocks (C3, C2f,
  ...), otherwise the module is stacked n times.
- `module`: a name registered in registry.py (`nn.Upsample` is an alias of `Upsample`).
- `args`: constructor args after the input channels; a module whose args[0] is its output channel count gets
  make_divisible(min(args[0], max_channels) * width_multiple, 8). The strings `nc`, `anchors` and `None` stand
  for the file's `nc`, `anchors` and Python None. A trailing mapping is passed as keywords
  (`[256, True, {attention_at: concat}]`).
Top-level keys: nc, depth_multiple, width_multiple, or `scales: {n: [depth, width, max_channels], ...}` with
`scale:` (default: the file name's last letter, as in `yolov8n.yaml`), attention, attention_at, anchors (pixels,
or an int: placeholder anchors for auto-anchor, see head.placeholder_anchors), activation (e.g. `nn.SiLU()`),
ch (input channels), channel_multiple (8), name (defaults to the file's stem), backbone, head.
Overrides (`build_model(..., attention="cbam")`) win over the file and over row keywords; the resolved config
is kept as `model.yaml` (plain types) so `build_model(model.yaml)` rebuilds the same architecture.

Attention keys: `attention` reaches every row that takes it (`Attn`, `AttnC2f` and its alias `CA_C2f`; default
ca), `attention_at` every C2f carrying one (default output); rows named for one attention (`CoordAtt`, `SE`, ...)
keep their kind. An override that reaches no row is an error, not a silent no-op (a file key that reaches none is
warned of and dropped), and `model.yaml` records the resolved file-wide values, so a run's checkpoint says what
was built (`model.attentions` gives it per row).
A `Detect` row without anchors (Ultralytics' anchor-free files, `Detect, [nc]`) builds this project's
anchor-based head with fitted anchors, and says so in one warning.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detector.errors import DetectorError, did_you_mean
from detector.models import attention as _attention  # importing the block modules registers them
from detector.models import blocks as _blocks
from detector.models import footprint
from detector.models.blocks import ATTENTION_PLACES
from detector.models.catalog import resolve_model_path
from detector.models.detection_model import DetectionModel, LayerInfo
from detector.models.head import Detect
from detector.models.registry import MODULES, RowModule, UnknownNameError
from detector.yamlfile import load_yaml

KNOWN_KEYS = ("nc", "depth_multiple", "width_multiple", "scales", "scale", "attention", "attention_at", "anchors",
              "activation", "ch", "channel_multiple", "name", "backbone", "head")
SYMBOLS = ("nc", "anchors", "None")
DEFAULT_ATTENTION = "ca"
DEFAULT_ATTENTION_AT = "output"
STRIDE_PROBE_PX = 256
ACTIVATIONS: dict[str, Callable[..., nn.Module]] = {
    "silu": nn.SiLU, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "hardswish": nn.Hardswish, "mish": nn.Mish,
    "gelu": nn.GELU, "relu6": nn.ReLU6, "identity": nn.Identity,
}
LOGGER = logging.getLogger(__name__)


def make_divisible(x: float, divisor: int = 8) -> int:
    """The smallest multiple of `divisor` >= x."""
    return int(math.ceil(x / divisor) * divisor)


def build_model(cfg: str | Path | dict, *, nc: int | None = None, attention: str | None = None,
                attention_at: str | None = None) -> DetectionModel:
    """Build a model from a YAML path (or a bare name from configs/models) or an already-loaded dict.

    Overrides replace the file's `nc`, `attention` and `attention_at` (and row keywords of the same name).
    Every user error is a one-line DetectorError naming the file and the row or key.
    """
    raw, label, lines = _load(cfg)
    spec = _resolve(raw, label, lines, nc=nc, attention=attention, attention_at=attention_at)
    layers, sources, info = _build_layers(spec, label, lines)
    _check_outputs_used(sources, info, label, lines)
    _settle_attention_keys(spec, info, label, lines, attention=attention, attention_at=attention_at)
    model = DetectionModel(layers, sources, info, spec)
    _finalize(model, spec, label, lines)
    _settle_default_anchors(model, spec, label)
    return model


def _load(cfg: str | Path | dict) -> tuple[dict, str, dict[str, int]]:
    """The config, the file's label for errors and the line of each key and row ('backbone[4]' -> 23)."""
    if isinstance(cfg, dict):
        return copy.deepcopy(cfg), str(cfg.get("name") or "model config"), {}
    if not isinstance(cfg, (str, Path)):
        raise DetectorError(f"model: expected a model YAML path, a name in configs/models or a dict, got {cfg!r:.80}")
    path = Path(cfg)
    if not path.exists():
        path = resolve_model_path(str(cfg))
    try:
        label = str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        label = str(path)
    data, lines = load_yaml(label)  # errors name the file relative to the working directory, as rows do
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    return data, label, lines


def _at(label: str, lines: dict[str, int], key: str) -> str:
    """'x.yaml:23' for a key or row the file has a line for, else the label alone (a dict config, an override)."""
    return f"{label}:{lines[key]}" if key in lines else label


def _resolve(raw: Any, label: str, lines: dict[str, int], *, nc: int | None, attention: str | None,
             attention_at: str | None) -> dict:
    """Validate the top level and apply overrides; returns the config `model.yaml` will hold."""
    if not isinstance(raw, dict):
        raise DetectorError(f"{label}: a model config is a mapping (nc, backbone, head, ...), got {type(raw).__name__}")
    for key in raw:
        if key not in KNOWN_KEYS:
            raise DetectorError(f"{_at(label, lines, str(key))}: unknown key '{key}'{did_you_mean(key, KNOWN_KEYS)}")
    if "backbone" not in raw:
        raise DetectorError(f"{label}: missing 'backbone' (a list of [from, repeats, module, args] rows)")
    for section in ("backbone", "head"):
        if not isinstance(raw.get(section, []), list):
            raise DetectorError(f"{_at(label, lines, section)}: {section}: expected a list of rows, got {type(raw[section]).__name__}")
    spec = raw
    lines = dict(lines)
    for key, value in (("nc", nc), ("attention", attention), ("attention_at", attention_at)):
        if value is None:
            continue
        spec[key] = value
        lines.pop(key, None)  # an error in an override's value is not on the file's line
        if key != "nc":  # an override swaps every row: drop row keywords of the same name
            for row in spec["backbone"] + spec.get("head", []):
                if isinstance(row, list) and len(row) == 4 and isinstance(row[3], list) and row[3] \
                        and isinstance(row[3][-1], dict):
                    row[3][-1].pop(key, None)
    if "scale" in spec and "scales" not in spec:
        raise DetectorError(f"{_at(label, lines, 'scale')}: scale: given without a 'scales:' table to pick from")
    if "scales" in spec:
        where = _at(label, lines, "scales")
        if "depth_multiple" in spec or "width_multiple" in spec:
            raise DetectorError(f"{where}: give either 'scales' + 'scale' or depth_multiple/width_multiple, not both")
        scales = spec["scales"]
        if not isinstance(scales, dict) or not scales:
            raise DetectorError(f"{where}: scales: expected a mapping like {{n: [0.33, 0.25, 1024]}}")
        if "scale" not in spec:
            guess = str(spec.get("name", ""))[-1:]
            if guess not in scales:
                raise DetectorError(f"{where}: scales given but no 'scale:' key (one of {', '.join(map(str, scales))})")
            spec["scale"] = guess
        if spec["scale"] not in scales:
            hint = did_you_mean(spec["scale"], map(str, scales))
            raise DetectorError(f"{_at(label, lines, 'scale')}: scale: '{spec['scale']}' is not in scales{hint}")
    _check_value(spec, label, lines)
    return spec


def _check_value(spec: dict, label: str, lines: dict[str, int]) -> None:
    """Type checks of the top-level scalars, with the attention names checked against the registry."""

    def positive(key: str, kind: type | tuple[type, ...]) -> None:
        v = spec.get(key)
        if v is not None and (not isinstance(v, kind) or isinstance(v, bool) or not 0 < v < math.inf):
            raise DetectorError(f"{_at(label, lines, key)}: {key}: expected a positive number, got {v!r}")

    positive("nc", int)
    positive("ch", int)
    positive("channel_multiple", int)
    positive("depth_multiple", (int, float))
    positive("width_multiple", (int, float))
    if "scales" in spec:
        entry = spec["scales"][spec["scale"]]
        numbers = isinstance(entry, list) and all(_is_number(v) and 0 < v < math.inf for v in entry)
        if not numbers or len(entry) not in (2, 3):
            where = _at(label, lines, f"scales.{spec['scale']}")
            raise DetectorError(f"{where}: scales.{spec['scale']}: expected [depth, width] or [depth, width, max_ch]")
    if "attention" in spec:
        try:
            _attention.ATTENTIONS.get(spec["attention"])
        except UnknownNameError as err:
            raise DetectorError(f"{_at(label, lines, 'attention')}: attention: {err}") from None
    if "attention_at" in spec and spec["attention_at"] not in ATTENTION_PLACES:
        places = ", ".join(ATTENTION_PLACES)
        where = _at(label, lines, "attention_at")
        raise DetectorError(f"{where}: attention_at: '{spec['attention_at']}' is not one of {places}")
    if "activation" in spec:
        _activation(spec["activation"], _at(label, lines, "activation"))


def _activation(text: Any, label: str) -> Callable[[], nn.Module]:
    """`nn.SiLU()`, `SiLU`, `nn.LeakyReLU(0.1)` ... -> a module factory (no eval)."""
    match = re.fullmatch(r"\s*(?:nn\.)?(\w+)\s*(?:\(\s*([-+.\deE]*)\s*\))?\s*", str(text))
    name = match.group(1).lower() if match else ""
    if name not in ACTIVATIONS:
        raise DetectorError(f"{label}: activation: unknown '{text}'{did_you_mean(name, ACTIVATIONS)}; "
                            f"known: {', '.join(ACTIVATIONS)}")
    arg = match.group(2)
    if arg:
        try:
            value = float(arg)
        except ValueError:
            raise DetectorError(f"{label}: activation: bad argument in '{text}'") from None
        if name != "leakyrelu" or not math.isfinite(value):  # the others' first parameter is `inplace` or a mode
            raise DetectorError(f"{label}: activation: only LeakyReLU takes an argument (its finite negative "
                                f"slope), got '{text}'")
        return lambda: ACTIVATIONS[name](value)
    return ACTIVATIONS[name]


@dataclass
class _Scaling:
    depth: float
    width: float
    max_channels: float
    divisor: int


def _scaling(spec: dict) -> _Scaling:
    if "scales" in spec:
        depth, width, *rest = spec["scales"][spec["scale"]]
        max_channels = rest[0] if rest else math.inf
    else:
        depth, width, max_channels = spec.get("depth_multiple", 1.0), spec.get("width_multiple", 1.0), math.inf
    return _Scaling(depth, width, max_channels, spec.get("channel_multiple", 8))


def _build_layers(spec: dict, label: str, lines: dict[str, int]) -> tuple[list[nn.Module], list[int | list[int]], list[LayerInfo]]:
    rows = [("backbone", j, r) for j, r in enumerate(spec["backbone"])]
    rows += [("head", j, r) for j, r in enumerate(spec.get("head") or [])]
    if not rows:
        raise DetectorError(f"{label}: backbone: no rows")
    scaling = _scaling(spec)
    channels: list[int | None] = []  # output channels per layer; None: no feature map (the head)
    layers, sources, info = [], [], []
    params = 0
    for i, (section, j, row) in enumerate(rows):
        where = _at(label, lines, f"{section}[{j}]")
        module, source, layer_info, c_out = _build_row(i, f"{section}[{j}]", row, where, spec, scaling, channels, params)
        row_params = sum(p.numel() for p in module.parameters())
        params += row_params
        footprint.check_params(f"{where}: {section}[{j}]", params, row_params)
        layers.append(module)
        sources.append(source)
        info.append(layer_info)
        channels.append(c_out)
    if not isinstance(layers[-1], Detect):
        section, j, _ = rows[-1]
        where = _at(label, lines, f"{section}[{j}]")
        raise DetectorError(f"{where}: {section}[{j}]: the last row must be the Detect head, got {info[-1].module}")
    return layers, sources, info


def _build_row(i: int, row_name: str, row: Any, label: str, spec: dict, scaling: _Scaling,
               channels: list[int | None], params_so_far: int) -> tuple[nn.Module, int | list[int], LayerInfo, int | None]:
    """One row -> (module, absolute source(s), table info, output channels); sized before it is allocated."""
    where = f"{label}: {row_name}"
    if not isinstance(row, list) or len(row) != 4:
        raise DetectorError(f"{where}: a row is [from, repeats, module, args], got {row!r}")
    src, n, name, args = row
    try:
        entry = MODULES.get(name)
    except UnknownNameError as err:
        raise DetectorError(f"{where}: {err}") from None
    absolute = _sources(i, src, where, entry, channels)
    c_ins = [spec.get("ch", 3) if a < 0 else channels[a] for a in absolute]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise DetectorError(f"{where}: repeats must be a positive int, got {n!r}")
    n = max(round(n * scaling.depth), 1) if n > 1 else n
    args, kwargs = _row_args(args, where, spec)
    for key in ("attention", "attention_at"):  # plain C2f takes them, but its rows are not swapped or recorded
        if key in kwargs and not getattr(entry, key):
            raise DetectorError(f"{where}: {name}: unexpected keyword argument '{key}' ({_rows_taking(key)} rows "
                                "take it)")
    if entry.adapt_args is not None:
        try:
            args = entry.adapt_args(args)
        except ValueError as err:
            raise DetectorError(f"{where}: {name}: {err}") from None
    c_in = c_ins if entry.multi_input else c_ins[0]
    if entry.channels == "arg0":
        if not args or not isinstance(args[0], int) or isinstance(args[0], bool) or args[0] < 1:
            raise DetectorError(f"{where}: {name}: args[0] must be the output channel count, got {args!r}"
                                f"; args are {_usage(entry)}")
        c_out = make_divisible(min(args[0], scaling.max_channels) * scaling.width, scaling.divisor)
        call, rest = [c_in, c_out], args[1:]
    else:
        c_out = {"same": c_in, "sum": sum(c_ins), "none": None}[entry.channels]
        call, rest = [c_in], args
    if entry.repeats:
        call.append(n)
    if entry.attention:
        kwargs.setdefault("attention", spec.get("attention", DEFAULT_ATTENTION))
    if entry.attention_at:
        kwargs.setdefault("attention_at", spec.get("attention_at", DEFAULT_ATTENTION_AT))
    copies = 1 if entry.repeats else n
    if copies > 1 and entry.channels not in ("arg0", "same"):
        raise DetectorError(f"{where}: {name} cannot be repeated (repeats must be 1)")
    footprint.check_row_bounds(where, n, c_out)

    def construct() -> nn.Module:
        module = _construct(entry, [*call, *rest], kwargs, where, args)
        if copies == 1:
            return module
        again = [c_out, c_out] if entry.channels == "arg0" else [c_out]
        return nn.Sequential(module, *(_construct(entry, [*again, *rest], kwargs, where, args) for _ in range(copies - 1)))

    elements = footprint.row_elements(sum(c_ins), c_out, n, [*rest, *kwargs.values()])
    module = footprint.sized_construct(where, construct, elements, params_so_far)
    shown = [*call, *rest] + ([kwargs] if kwargs else [])
    layer_info = LayerInfo(i, row_name, src, n, name, shown, *_row_attention(entry, kwargs))
    return module, absolute if entry.multi_input else absolute[0], layer_info, c_out


def _row_attention(entry: RowModule, kwargs: dict) -> tuple[str, str]:
    """(attention, attention_at) a row carries: the keywords it was built with, or the registry name of a
    standalone attention row (`CoordAtt` -> 'ca'); ('', '') for a row without one."""
    if entry.attention:
        return str(kwargs["attention"]), str(kwargs.get("attention_at", ""))
    named = [name for name in _attention.ATTENTIONS if _attention.ATTENTIONS.get(name) is entry.factory]
    return (named[0], "") if named else ("", "")


def _rows_taking(flag: str) -> str:
    """'Attn, AttnC2f and CA_C2f': the registered modules that take the key `flag`, for error messages."""
    names = [name for name in MODULES if getattr(MODULES.get(name), flag)]
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else "".join(names)


def _settle_attention_keys(spec: dict, info: list[LayerInfo], label: str, lines: dict[str, int], *,
                           attention: str | None, attention_at: str | None) -> None:
    """Refuse an override that reaches no row (it would change nothing while the run records it), warn of and
    drop a file key that reaches none, and write the file-wide defaults the rows used into `spec`, so
    `model.yaml` states what was built."""
    for key, override, default in (("attention", attention, DEFAULT_ATTENTION),
                                   ("attention_at", attention_at, DEFAULT_ATTENTION_AT)):
        if any(getattr(MODULES.get(li.module), key) for li in info):
            spec.setdefault(key, default)
        elif override is not None:
            raise DetectorError(f"{label}: {key}: the override '{override}' reaches no row ({_rows_taking(key)} "
                                f"rows take the {key} key; {Path(label).name} has none)")
        elif key in spec:  # a warning, not an error: checkpoints may record such a key
            LOGGER.warning("%s: %s: '%s' reaches no row (%s rows take the %s key; %s has none): ignored",
                           _at(label, lines, key), key, spec.pop(key), _rows_taking(key), key, Path(label).name)


def _check_outputs_used(sources: list[int | list[int]], info: list[LayerInfo], label: str,
                        lines: dict[str, int]) -> None:
    """A row whose output no later row reads would hold parameters without gradients: wasted compute, and
    DistributedDataParallel stops with "Expected to have finished reduction" at the second step."""
    read = {j for s in sources for j in (s if isinstance(s, list) else [s])}
    for layer in info[:-1]:
        if layer.index not in read:
            raise DetectorError(f"{_at(label, lines, layer.row)}: {layer.row}: the output of {layer.module} (layer "
                                f"{layer.index}) is never used: no later row takes it as input ('from')")


def _sources(i: int, src: Any, where: str, entry: RowModule, channels: list[int | None]) -> list[int]:
    froms = src if isinstance(src, list) else [src]
    if not froms or not all(isinstance(f, int) and not isinstance(f, bool) for f in froms):
        raise DetectorError(f"{where}: 'from' must be an int or a list of ints, got {src!r}")
    if not entry.multi_input and len(froms) != 1:
        raise DetectorError(f"{where}: {entry.name} takes one input, got 'from' {src!r}")
    absolute = []
    for f in froms:
        a = i + f if f < 0 else f
        if not (0 <= a < i or (i == 0 and a == -1)):
            valid = "-1 (the image)" if i == 0 else f"0..{i - 1} or -1..-{i}"
            raise DetectorError(f"{where}: 'from' index {f} points forward/out of range (row {i} can use {valid})")
        if a >= 0 and channels[a] is None:
            raise DetectorError(f"{where}: 'from' index {f} is the head (layer {a}), which has no feature map")
        absolute.append(a)
    return absolute


def _row_args(args: Any, where: str, spec: dict) -> tuple[list, dict]:
    """Row args with the symbols `nc`, `anchors`, `None` resolved, and a trailing mapping split off as keywords."""
    if not isinstance(args, list):
        raise DetectorError(f"{where}: args must be a list, got {args!r}")
    kwargs = {}
    if args and isinstance(args[-1], dict):
        kwargs = dict(args[-1])
        args = args[:-1]
        bad = [k for k in kwargs if not isinstance(k, str)]
        if bad:
            raise DetectorError(f"{where}: keyword names must be strings, got {bad!r}")
    out = []
    for a in args:
        if a in SYMBOLS and isinstance(a, str):
            if a == "None":
                a = None
            elif a not in spec:
                raise DetectorError(f"{where}: args use '{a}' but the file has no top-level '{a}:' key")
            else:
                a = copy.deepcopy(spec[a])
        out.append(a)
    return out, kwargs


def _usage(entry: RowModule) -> str:
    """The row args a module takes, e.g. '[c_out, shortcut=False, g=1, e=0.5]'."""
    params = list(inspect.signature(entry.factory).parameters.values())
    fed = 1 + (entry.channels == "arg0") + entry.repeats  # c_in, c_out, n come from the builder
    shown = ["c_out"] if entry.channels == "arg0" else []
    for p in params[fed:]:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            shown.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    keywords = _row_keywords(entry)
    return f"[{', '.join(shown)}]" + (f" + keywords {{{', '.join(keywords)}}}" if keywords else "")


def _row_keywords(entry: RowModule) -> list[str]:
    """The keywords a row of `entry` may set in its args mapping; `attention`/`attention_at` only where the module
    takes them as the file's keys do."""
    taken = {"attention": entry.attention, "attention_at": entry.attention_at}
    return [p.name for p in inspect.signature(entry.factory).parameters.values()
            if p.kind == p.KEYWORD_ONLY and taken.get(p.name, True)]


def _construct(entry: RowModule, call: list, kwargs: dict, where: str, row_args: list) -> nn.Module:
    """The row's module, its arguments bound and typed first; whatever its constructor refuses (a negative kernel
    size, a zero reduction) is a DetectorError naming the row."""
    try:
        bound = inspect.signature(entry.factory).bind(*call, **kwargs)
    except TypeError as err:
        params = list(inspect.signature(entry.factory).parameters.values())[len(call):]
        named = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD] + _row_keywords(entry)
        unknown = next((key for key in kwargs if key not in named), None)
        if unknown is not None and "unexpected keyword" in str(err):
            raise DetectorError(f"{where}: {entry.name}: unknown keyword '{unknown}'{did_you_mean(unknown, named)}"
                                f"; args are {_usage(entry)}") from None
        raise DetectorError(f"{where}: {entry.name} {row_args}: {err}; args are {_usage(entry)}") from None
    _check_arg_types(bound, entry, where)
    try:
        return entry.factory(*call, **kwargs)
    except (ValueError, TypeError, UnknownNameError) as err:  # the constructors' own checks, which name the arg
        raise DetectorError(f"{where}: {entry.name}: {err}") from err
    except (ArithmeticError, RuntimeError) as err:  # torch's or Python's, which do not: the row's args and usage
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DetectorError(f"{where}: {entry.name} {row_args}: {message}; args are {_usage(entry)}") from err


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_arg_types(bound: inspect.BoundArguments, entry: RowModule, where: str) -> None:
    """Each bound argument against its parameter's plain annotation (bool, int, float: a finite number), so that
    `[32, "no"]` is not a truthy shortcut and `e: .inf` not a width; other annotations are the constructor's."""
    checks = {"bool": lambda v: isinstance(v, bool), "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "float": lambda v: _is_number(v) and math.isfinite(v)}
    wants = {"bool": "true or false", "int": "an integer", "float": "a finite number"}
    parameters = inspect.signature(entry.factory).parameters
    for name, value in bound.arguments.items():
        annotation = parameters[name].annotation
        kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
        if kind in checks and not checks[kind](value):
            raise DetectorError(f"{where}: {entry.name}: '{name}' must be {wants[kind]}, got {value!r}; "
                                f"args are {_usage(entry)}")


def _finalize(model: DetectionModel, spec: dict, label: str, lines: dict[str, int]) -> None:
    """Activation and BN conventions, then the strides from a dry run, then anchors and prior biases."""
    if "activation" in spec:
        make_act = _activation(spec["activation"], label)
        for m in model.modules():
            if isinstance(m, _blocks.Conv) and isinstance(m.act, nn.SiLU):
                m.act = make_act()
    _blocks.set_batchnorm(model)  # YOLOv5's BN eps and momentum, for every norm in the model
    feats = _dry_run(model, spec.get("ch", 3), label, lines)
    head = model.head
    strides = [STRIDE_PROBE_PX / f.shape[-2] for f in feats]
    head.set_stride(strides)
    head.init_biases()


def _settle_default_anchors(model: DetectionModel, spec: dict, label: str) -> None:
    """A Detect row that leaves `anchors` to its default (Ultralytics' anchor-free `Detect, [nc]`) gets this
    project's anchor-based head: warn once, and record the anchor count in the row, so a rebuild from
    `model.yaml` is silent and the same. Whenever the head's anchors are an anchor count (placeholders), the count
    is also the top-level `anchors` of `spec`, which is what asks the trainer to fit them."""
    row = (spec.get("head") or spec["backbone"])[-1]
    info = model.layer_info[-1]
    *positional, last = info.args  # [c_ins, *row args] and a trailing keyword dict, if the row has one
    keywords = last if isinstance(last, dict) else {}
    if not isinstance(last, dict):
        positional.append(last)
    arguments = inspect.signature(type(model.head)).bind(*positional, **keywords).arguments
    if "anchors" in arguments:
        if isinstance(arguments["anchors"], int):  # `[nc, 3]` or `anchors: 3`: placeholders to fit
            spec["anchors"] = model.head.na
        return
    na = model.head.na
    LOGGER.warning("%s: %s: %s has no anchors: the head is this project's anchor-based one, with %d anchors "
                   "per level fitted by auto-anchor at train time", label, info.row, info.module, na)
    spec["anchors"] = na  # a top-level list the row does not use would leave the placeholders unfitted
    if row[3] and isinstance(row[3][-1], dict):
        row[3][-1]["anchors"] = na
    else:
        row[3].append({"anchors": na})


def _dry_run(model: DetectionModel, ch: int, label: str, lines: dict[str, int]) -> list[torch.Tensor]:
    """Run the layers once on a zero image, so shape mismatches surface now, naming their row; records the
    activation elements per row (`model.probe_activations`) that `footprint.check_training_fits` scales."""
    current = [0]

    def mark(index: int) -> Callable:
        return lambda module, inputs: current.__setitem__(0, index)

    hooks = [layer.register_forward_pre_hook(mark(i)) for i, layer in enumerate(model.layers)]
    model.probe_px, model.probe_activations = STRIDE_PROBE_PX, [0] * len(model.layers)
    hooks += footprint.activation_counter(model, lambda: current[0], model.probe_activations)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model.forward_features(torch.zeros(1, ch, STRIDE_PROBE_PX, STRIDE_PROBE_PX))
    except (RuntimeError, TypeError, ValueError, ArithmeticError) as err:  # a module's own op refusing its input
        info = model.layer_info[current[0]]
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DetectorError(f"{_at(label, lines, info.row)}: {info.row}: {info.module} (layer {info.index}, from "
                            f"{info.source}) fails on its inputs in a dry run at {STRIDE_PROBE_PX}x{STRIDE_PROBE_PX}: "
                            f"{message}") from err
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)

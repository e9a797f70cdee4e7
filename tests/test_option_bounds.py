"""Every numeric key of every command has bounds, and every out-of-range or non-finite value is refused at load,
in one line naming the key, the value, the rule and where the value came from."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from detector import options
from detector.config import Bounds, TrainConfig, build_options, describe_options, load_options
from detector.errors import DetectorError
from detector.tools.bench.rivals import RivalsOptions

CLASSES = [TrainConfig, RivalsOptions] + [c for c in vars(options).values()
                                          if dataclasses.is_dataclass(c) and c.__module__ == options.__name__]
NUMBERS = (int, float)


def numeric_type(cls: type, name: str) -> type | None:
    """int or float for a numeric field (list items and Optional included), else None."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    inner = typing.get_args(args[0]) if typing.get_origin(args[0]) is list else args
    return inner[0] if inner and inner[0] in NUMBERS else None


def out_of_range(bounds: Bounds, kind: type) -> list[float]:
    """Values just outside each side of the range (and off the step)."""
    step = 1 if kind is int else 1e-3
    bad = [b - step for b in (bounds.ge,) if b is not None] + [b for b in (bounds.gt, bounds.lt) if b is not None]
    bad += [b + step for b in (bounds.le,) if b is not None]
    if bounds.multiple_of:
        bad.append(bounds.multiple_of * 2 + 1)
    return [kind(v) for v in bad]


FIELDS = [(cls, f) for cls in CLASSES for f in dataclasses.fields(cls)]


@pytest.mark.parametrize(("cls", "field"), FIELDS, ids=[f"{c.__name__}.{f.name}" for c, f in FIELDS])
def test_every_numeric_key_is_bounded_and_refuses_bad_values(cls: type, field: dataclasses.Field) -> None:
    kind = numeric_type(cls, field.name)
    bounds = field.metadata.get("bounds")
    if kind is None:
        return  # strings and switches: their own checks (choices, paths) are tested where they are used
    assert bounds is not None, f"{cls.__name__}.{field.name} has no bounds: give its option() a range"
    assert bounds.ge is not None or bounds.gt is not None, f"{cls.__name__}.{field.name}: no lower bound"
    assert bounds.le is not None or bounds.lt is not None, f"{cls.__name__}.{field.name}: no upper bound"
    is_list = typing.get_origin(typing.get_type_hints(cls)[field.name]) is list
    bad = out_of_range(bounds, kind) + ([float("nan"), float("inf"), float("-inf")] if kind is float else [])
    for value in bad:
        given = [value] if is_list else value
        with pytest.raises(DetectorError, match=rf"^Detector\.x\(\): '{field.name}' must be ") as info:
            build_options(cls, {field.name: given}, "Detector.x()")
        assert "\n" not in str(info.value) and repr(value) in str(info.value)
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    build_options(cls, {field.name: default}, "Detector.x()")  # the default is inside its own range


def test_values_from_the_command_line_and_files_name_their_source(tmp_path: Path) -> None:
    with pytest.raises(DetectorError, match=r"^command line: 'lr0' must be a finite number, got 'nan'$"):
        load_options(TrainConfig, {"lr0": "nan"})
    with pytest.raises(DetectorError, match=r"^command line: 'momentum' must be >= 0 and < 1, got '1.5'$"):
        load_options(TrainConfig, {"momentum": "1.5"})
    cfg = tmp_path / "train.yaml"
    cfg.write_text("epochs: 3\nmosaic: 2\n")
    with pytest.raises(DetectorError, match=rf"^{cfg}:2: 'mosaic' must be >= 0 and <= 1, got 2$"):
        load_options(TrainConfig, {"cfg": str(cfg)}, file_key="cfg")
    with pytest.raises(DetectorError, match=r"'imgsz' must be >= 32 and <= 8192 and a multiple of 32, got '33'"):
        load_options(TrainConfig, {"imgsz": "33"})
    with pytest.raises(DetectorError, match=r"'optimizer' must be one of SGD, AdamW, Adam, got 'sgd'"):
        load_options(TrainConfig, {"optimizer": "sgd"})


@pytest.mark.parametrize("pair", ["lr0=nan", "momentum=1.5", "mosaic=2", "val_iou=-1", "val_conf=inf", "warmup_epochs=-3",
                                  "label_smoothing=1", "max_det=0", "ema_decay=2", "imgsz=33", "batch=0", "epochs=-1"])
def test_the_issue_cases_are_refused_before_any_work(pair: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Through the real CLI: refused in one line, nothing written (no run folder, no dataset generated)."""
    from detector.cli import main

    monkeypatch.chdir(tmp_path)
    key = pair.split("=")[0]
    assert main(["train", pair, f"project={tmp_path / 'runs'}"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"detector train: error: command line: '{key}' must be ")
    assert list(tmp_path.iterdir()) == []


def test_help_shows_the_ranges() -> None:
    text = describe_options(TrainConfig)
    assert "initial learning rate (SGD wants about 0.01) [> 0 and <= 1]" in text
    assert "[>= 32 and <= 8192 and a multiple of 32]" in text


def test_command_ranges_and_defaults_agree_with_the_code_that_uses_them() -> None:
    """Bounds refuse at load what the command would refuse after its set-up (an opset the exporter does not write,
    vid_stride 0); `detector val` scores a checkpoint as its training run's validation did; a tracked predict's
    low boxes sit below its conf."""
    from detector.infer.export import OPSETS

    for opset in (OPSETS.start, OPSETS.stop - 1):
        assert build_options(options.ExportOptions, {"opset": opset}, "x").opset == opset
    for bad in ({"opset": OPSETS.start - 1}, {"opset": OPSETS.stop}):
        with pytest.raises(DetectorError, match="'opset' must be"):
            build_options(options.ExportOptions, bad, "x")
    with pytest.raises(DetectorError, match="'vid_stride' must be >= 1"):
        build_options(options.PredictOptions, {"vid_stride": 0}, "x")
    val, train = options.ValOptions(), TrainConfig()
    assert (val.conf, val.iou, val.max_det) == (train.val_conf, train.val_iou, train.max_det)
    predict = options.PredictOptions()
    assert predict.track_low < predict.conf

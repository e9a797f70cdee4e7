"""`detector bench <name>`: --help lists every key of the bench's options class, and bad keys or values are
refused by the CLI in one line naming the key, before the bench imports torch or starts any work."""

from __future__ import annotations

import dataclasses

import pytest

from detector.cli import BENCHES, main


def shown(field: dataclasses.Field) -> str:
    """A default as --help prints it: lists comma-joined."""
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    return ",".join(map(str, default)) if isinstance(default, list) else str(default)


@pytest.mark.parametrize("bench", list(BENCHES))
def test_help_lists_every_key_with_its_default(bench: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", bench, "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    options, _ = BENCHES[bench]
    for field in dataclasses.fields(options):
        assert any(line.split()[:1] == [f"{field.name}={shown(field)}"] for line in lines), field.name
    assert lines[0] == f"usage: detector bench {bench} [key=value ...]"


@pytest.mark.parametrize(("bench", "pair", "message"), [
    ("train", "imgsz=-1", "'imgsz' must be >= 32 and <= 8192 and a multiple of 32, got '-1'"),
    ("models", "batch=nan", "'batch' expects an integer, got 'nan'"),
    ("models", "modes=fp32,fp16", "'modes' must be one of fp32, fp32-cl, bf16-cl, got 'fp16'"),
    ("data", "workers=0,-1", "'workers' must be >= 0 and <= 64, got -1"),
    ("val", "metric_images=1e9", "'metric_images' must be >= 0 and <= 100,000, got '1e9'"),
    ("amp", "noise_seed=-2", "'noise_seed' must be >= -1 and <= 4,294,967,295, got '-2'"),
    ("amp", "channels_last=maybe", "'channels_last' expects true or false, got 'maybe'"),
    ("export", "runtimes=pytorch,tensorrt", "'runtimes' must be one of pytorch, onnxruntime, onnxruntime-int8, openvino, openvino-bf16, opencv, got 'tensorrt'"),
    ("export", "imgsz=320,600", "'imgsz' must be >= 32 and <= 8192 and a multiple of 32, got 600"),
    ("val", "imgs=64", "unknown key 'imgs' (did you mean 'imgsz'?)"),
    ("train", "config=yolov5n", "unknown key 'config' (did you mean 'configs'?)"),
    ("track", "frames=20000", "'frames' must be >= 2 and <= 10,000, got '20000'"),
])
def test_bad_values_and_unknown_keys_are_one_line_naming_the_key(bench: str, pair: str, message: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", bench, pair]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"detector bench {bench}: error: command line: {message}"]
    assert captured.out == ""  # refused before the bench printed (or computed) anything


def test_every_bench_has_its_own_options_class() -> None:
    assert list(BENCHES) == ["models", "data", "train", "val", "amp", "export", "track"]
    assert len({options for options, _ in BENCHES.values()}) == 7


def test_scripts_bench_usage_names_every_bench() -> None:
    """scripts/bench.py without a bench prints a usage naming each one (it once left out export and track)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[3] / "scripts" / "bench.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1 and f"usage: python scripts/bench.py {'|'.join(BENCHES)} " in done.stderr
    assert {"export", "track"} <= set(BENCHES)


@pytest.mark.parametrize("pair", ["imgsz=", "workers="])
def test_bench_data_refuses_an_empty_list_naming_it(pair: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty imgsz or workers list once printed an empty table after minutes of set-up (scale=coco: a ValueError
    from max())."""
    assert main(["bench", "data", pair, "scale=coco"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"detector bench data: error: bench data: '{pair[:-1]}' is empty"]


def test_bench_train_refuses_a_config_listed_twice(capsys: pytest.CaptureFixture[str]) -> None:
    """The second run of a twice-listed config went to an auto-numbered folder while the first's files were read
    (refused by the options' check that no list key repeats an item)."""
    assert main(["bench", "train", "configs=yolov5n,yolo-c2f-n,yolov5n", "images=16"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "detector bench train: error: command line: 'configs' lists 'yolov5n' more than once"]

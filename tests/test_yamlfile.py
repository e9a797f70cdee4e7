"""The one YAML reader refuses hostile files fast, in one line naming the file, for every kind of YAML."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from detector.config import load_train_config
from detector.data.spec import load_data_spec
from detector.errors import DetectorError
from detector.models.builder import build_model
from detector.yamlfile import MAX_BYTES, MAX_DEPTH, MAX_NODES, load_yaml

ALIAS_BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x, x]"]
                       + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]" for i in range(8)]) + "\n"
DEEP = "k: " + "[" * 10_000 + "]" * 10_000 + "\n"

READERS: dict[str, Callable[[Path], object]] = {
    "yaml": load_yaml,
    "model": build_model,
    "data": load_data_spec,
    "train": lambda path: load_train_config({"cfg": str(path)}),
}


def refused(path: Path, reader: Callable[[Path], object], pattern: str) -> str:
    start = time.perf_counter()
    with pytest.raises(DetectorError, match=pattern) as info:
        reader(path)
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.mark.parametrize("reader", READERS, ids=str)
def test_alias_bomb_is_refused(tmp_path: Path, reader: str) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)  # 10^9 scalars once expanded, 400 bytes on disk
    assert path.stat().st_size < 1000
    refused(path, READERS[reader], rf"bomb\.yaml:\d+: YAML expands to more than {MAX_NODES:,} nodes")


@pytest.mark.parametrize("reader", READERS, ids=str)
def test_deep_nesting_is_refused(tmp_path: Path, reader: str) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text(DEEP)
    refused(path, READERS[reader], rf"deep\.yaml:1: YAML nested deeper than {MAX_DEPTH} levels")


def test_large_file_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    with path.open("wb") as f:
        f.truncate(MAX_BYTES + 1)
    refused(path, load_yaml, rf"big\.yaml: {MAX_BYTES + 1:,} bytes is too large for a YAML config")


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("nc: 3\nnames: [caf\u00e9]\n".encode("latin-1"))
    refused(path, load_yaml, r"latin1\.yaml:2: not UTF-8 text \(byte 17 is 0xe9\)")


def test_bounds_leave_ordinary_files_alone(tmp_path: Path) -> None:
    """Anchors, a BOM, nesting up to the limit and many nodes below it read as before, with their lines."""
    path = tmp_path / "ok.yaml"
    nested = "[" * (MAX_DEPTH - 1) + "1" + "]" * (MAX_DEPTH - 1)
    many = ", ".join(["1"] * (MAX_NODES // 2))
    path.write_text(f"\ufeffbase: &b {{lr0: 0.01}}\nuse: *b\nnested: {nested}\nmany: [{many}]\n", encoding="utf-8")
    data, lines = load_yaml(path)
    assert data["use"] == {"lr0": 0.01} and len(data["many"]) == MAX_NODES // 2
    assert lines["use"] == 2 and lines["many"] == 4


def test_a_directory_is_named(tmp_path: Path) -> None:
    refused(tmp_path, load_yaml, "is a directory, not a YAML file")


@pytest.mark.parametrize("reader", READERS, ids=str)
@pytest.mark.parametrize("text", ["epochs: &x [1, *x]\n", "nc: &m {names: *m}\n"], ids=["list", "mapping"])
def test_a_collection_that_contains_itself_is_refused(tmp_path: Path, reader: str, text: str) -> None:
    """PyYAML builds `&x [*x]` as a list that holds itself; walking it recursed until a RecursionError traceback."""
    path = tmp_path / "loop.yaml"
    path.write_text(text)
    refused(path, READERS[reader], r"loop\.yaml:1: YAML alias \*\w refers to a collection that contains it")


@pytest.mark.parametrize("reader", READERS, ids=str)
@pytest.mark.parametrize("value, problem", [("2024-13-01", "month must be in 1..12"), ("1" * 5000, "Exceeds the limit")])
def test_a_scalar_the_constructor_cannot_build_is_one_line(tmp_path: Path, reader: str, value: str, problem: str) -> None:
    """PyYAML raises a bare ValueError (not a YAMLError) for a date out of range or an int too long to convert."""
    path = tmp_path / "scalar.yaml"
    path.write_text(f"epochs: {value}\n")
    refused(path, READERS[reader], rf"scalar\.yaml: invalid YAML: {problem}")


@pytest.mark.parametrize("reader", READERS, ids=str)
def test_a_key_written_twice_is_refused_but_a_merged_key_may_be_overridden(tmp_path: Path, reader: str) -> None:
    """safe_load keeps the last of two equal keys: a model's second `head:` would drop the first without a word."""
    path = tmp_path / "twice.yaml"
    path.write_text("nc: 3\nepochs: 1\nnames: {a: 1}\nepochs: 2\n")
    refused(path, READERS[reader], r"twice\.yaml:4: key 'epochs' is given twice \(first on line 2\)")
    path.write_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\nlist: [{k: 1}, {k: 2, j: 0, j: 1}]\n")
    assert refused(path, load_yaml, r"twice\.yaml:5: key 'j' is given twice \(first on line 5\)")
    path.write_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n")
    assert load_yaml(path)[0]["other"] == {"x": 3, "y": 2}
    path.write_text("names:\n  0: circle\n  0x0: star\n")  # two spellings of one key: circle was dropped silently
    assert refused(path, load_yaml, r"twice\.yaml:3: key '0x0' is given twice \(first on line 2, read as 0\)")
    path.write_text("names: {'0': circle, 0: star, yes: ring}\n")  # the string '0', the int 0 and True differ
    assert load_yaml(path)[0]["names"] == {"0": "circle", 0: "star", True: "ring"}


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="a character device without end")
def test_a_file_without_a_size_is_read_only_up_to_the_limit() -> None:
    """stat() gives a device or a pipe size 0, so the size check passed and read_bytes() ran until MemoryError."""
    refused(Path("/dev/zero"), load_yaml, rf"/dev/zero: more than {MAX_BYTES:,} bytes is too large for a YAML config")


def test_each_limit_is_inclusive(tmp_path: Path) -> None:
    """MAX_DEPTH nested collections, MAX_NODES nodes and MAX_BYTES bytes are read; one more of each is refused."""
    path = tmp_path / "edge.yaml"
    path.write_text("[" * MAX_DEPTH + "]" * MAX_DEPTH + "\n")
    assert load_yaml(path)[0] is not None
    path.write_text("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + "\n")
    refused(path, load_yaml, f"nested deeper than {MAX_DEPTH} levels")
    path.write_text("[" + "0," * (MAX_NODES - 2) + "0]\n")  # the sequence and MAX_NODES - 1 scalars
    assert len(load_yaml(path)[0]) == MAX_NODES - 1
    path.write_text("[" + "0," * (MAX_NODES - 1) + "0]\n")
    refused(path, load_yaml, f"more than {MAX_NODES:,} nodes")
    text = "a: 1\n#"
    path.write_text(text + "x" * (MAX_BYTES - len(text) - 1) + "\n")
    assert path.stat().st_size == MAX_BYTES and load_yaml(path)[0] == {"a": 1}

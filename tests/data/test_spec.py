"""load_data_spec: bad values of a dataset YAML of ours are one-line errors naming the file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from detector.data.spec import load_data_spec
from detector.errors import DetectorError

SPLITS = "train: {images: a, annotations: a.json}\nval: {images: b, annotations: b.json}\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (SPLITS + "names: {0: circle, x: star}\n", r"d\.yaml:3: 'names' keys must be class indices, got \[0, 'x'\]"),
        ("train: {images: null, annotations: a.json}\nval: {images: b, annotations: b.json}\n",
         r"d\.yaml:1: 'train\.images' must be a path \(a string\), got None"),
        ("path: [data]\n" + SPLITS, r"d\.yaml:1: 'path' must be a path \(a string\), got \['data'\]"),
    ],
)
def test_bad_names_keys_and_non_string_paths_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "d.yaml").write_text(text)
    with pytest.raises(DetectorError, match=message):
        load_data_spec(tmp_path / "d.yaml")


def test_names_keyed_by_index_are_read_in_key_order(tmp_path: Path) -> None:
    (tmp_path / "d.yaml").write_text(SPLITS + "names: {1: star, 0: circle}\n")
    spec = load_data_spec(tmp_path / "d.yaml")
    assert spec.names == ["circle", "star"] and spec.train.images == (tmp_path / "a").resolve()


def test_a_folder_named_by_a_number_is_that_folder(tmp_path: Path) -> None:
    (tmp_path / "d.yaml").write_text("train: {images: 2017, annotations: a.json}\nval: {images: b, annotations: b.json}\n")
    assert load_data_spec(tmp_path / "d.yaml").train.images == (tmp_path / "2017").resolve()

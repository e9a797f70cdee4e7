"""Ultralytics data.yaml + labels/*.txt -> COCO: exact boxes (round trip to 0.01 px), stable ids, EXIF sizes,
polygons as boxes, negatives, bad rows named by file:line, the conversion cache, and the CLI."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector.cli import main
from detector.data.coco import CocoDataset
from detector.data.spec import load_data_spec
from detector.data import yolo_import
from detector.data.yolo_import import convert_yolo_dataset, label_path
from detector.data.yolo_txt import export_yolo_txt
from detector.errors import DetectorError
from data_helpers import coco_boxes

UNORDERED = [{"id": 12, "name": "ring"}, {"id": 3, "name": "circle"}, {"id": 7, "name": "star"}]
NAMES = ["circle", "star", "ring"]


def sub_pixel_boxes(data: dict) -> None:
    for k, ann in enumerate(data["annotations"]):
        x, y, w, h = ann["bbox"]
        ann["bbox"] = [x + 0.37 + 0.01 * k, y + 0.21, w - 0.5, h - 0.13]


def rotate_with_exif(path: Path) -> None:
    """Store the JPEG turned a quarter, with EXIF orientation 6 turning it back on display."""
    stored = Image.open(path).transpose(Image.Transpose.ROTATE_90)
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(path, exif=exif, quality=95)


def write_yolo(root: Path, labels: dict[str, str | None], *, names: str = "[circle, star, ring]",
               sizes_wh: dict[str, tuple[int, int]] | None = None, extra: str = "") -> Path:
    """An Ultralytics dataset: images/{train,val}/<name>.jpg, labels/.../<name>.txt (None: no file), data.yaml."""
    for split in ("train", "val"):
        for stem, text in labels.items():
            w, h = (sizes_wh or {}).get(stem, (80, 60))
            image = root / "images" / split / f"{stem}.jpg"
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(image)
            if text is not None:
                label_path(image).parent.mkdir(parents=True, exist_ok=True)
                label_path(image).write_text(text)
    path = root / "data.yaml"
    path.write_text(f"path: .\ntrain: images/train\nval: images/val\nnames: {names}\n{extra}")
    return path


@pytest.fixture
def coco_yaml(make_data_yaml) -> Path:
    path = make_data_yaml(categories=UNORDERED, mutate=sub_pixel_boxes, boxes_per_image=3)
    for split in ("train", "val"):
        rotate_with_exif(path.parent / split / "images" / "img000.jpg")
    return path


def test_round_trip_coco_yolo_coco_keeps_every_box_to_a_hundredth_of_a_pixel(coco_yaml: Path, tmp_path: Path) -> None:
    export = export_yolo_txt(load_data_spec(coco_yaml), tmp_path / "yolo")
    result = convert_yolo_dataset(export.data_yaml, tmp_path / "coco")
    assert "dataset YAML: " + str(tmp_path / "coco" / "data-coco.yaml") in str(result)
    ours = load_data_spec(result.data_yaml)
    assert ours.names == NAMES
    for split in ("train", "val"):
        want = coco_boxes(coco_yaml.parent / split / "instances.json")
        got = coco_boxes(result.annotations[split])
        assert sorted(got) == sorted(want)
        for name, rows in got.items():
            assert [export.category_ids[c] for c, _ in rows] == [c for c, _ in want[name]]
            np.testing.assert_allclose([b for _, b in rows], [b for _, b in want[name]], atol=0.01, rtol=0)
        original, again = CocoDataset(getattr(load_data_spec(coco_yaml), split)), CocoDataset(getattr(ours, split))
        assert [(r.width, r.height) for r in again.records] == [(r.width, r.height) for r in original.records]
        assert (again.records[0].width, again.records[0].height) == (96, 64)  # displayed size: stored 64x96, EXIF 6
        assert Image.open(again.records[0].file).size == (64, 96)


def test_read_directly_the_yaml_gives_the_converted_splits_and_the_same_ids(coco_yaml: Path, tmp_path: Path) -> None:
    export = export_yolo_txt(load_data_spec(coco_yaml), tmp_path / "yolo")
    spec = load_data_spec(export.data_yaml)
    assert spec.path == export.data_yaml and spec.names == NAMES
    assert spec.train.images == tmp_path / "yolo" / "images" / "train"
    converted = convert_yolo_dataset(export.data_yaml, tmp_path / "coco")
    for split in ("train", "val"):
        cached = json.loads(getattr(spec, split).annotations.read_text())
        assert cached == json.loads(converted.annotations[split].read_text())  # one conversion, same ids
        assert [im["id"] for im in cached["images"]] == list(range(1, 7))
        assert [im["file_name"] for im in cached["images"]] == sorted(im["file_name"] for im in cached["images"])
        assert [c["id"] for c in cached["categories"]] == [0, 1, 2]
    first = converted.annotations["train"].read_bytes()
    assert convert_yolo_dataset(export.data_yaml, tmp_path / "coco").annotations["train"].read_bytes() == first


def test_the_cache_is_reused_until_a_label_or_the_converter_changes(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_yolo(tmp_path / "ds", {"a": "0 0.5 0.5 0.25 0.5\n", "b": "1 0.5 0.5 0.5 0.5\n"})
    caplog.set_level(logging.INFO, logger="detector")
    spec = load_data_spec(path)
    assert sum("converted" in r.message and "first use" in r.message for r in caplog.records) == 2
    written = spec.train.annotations.stat().st_mtime_ns
    caplog.clear()
    assert load_data_spec(path) == spec and not any("converted" in r.message for r in caplog.records)
    assert spec.train.annotations.stat().st_mtime_ns == written
    label = tmp_path / "ds" / "labels" / "train" / "a.txt"
    label.write_text("0 0.5 0.5 0.25 0.5\n2 0.25 0.25 0.5 0.5\n")
    os.utime(label, ns=(written + 10**9, written + 10**9))
    load_data_spec(path)
    assert [r.message for r in caplog.records if "converted" in r.message][0].count("images or labels changed") == 1
    boxes = coco_boxes(spec.train.annotations)["a.jpg"]
    assert boxes == [(0, (30.0, 15.0, 50.0, 45.0)), (2, (0.0, 0.0, 40.0, 30.0))]
    assert not list(spec.train.annotations.parent.glob("*.tmp"))
    caplog.clear()
    monkeypatch.setattr(yolo_import, "CONVERTER_VERSION", yolo_import.CONVERTER_VERSION + 1)  # a converter that changed
    load_data_spec(path)
    assert sum("converted" in r.message for r in caplog.records) == 2  # converts again, though no file changed


def test_a_read_only_dataset_converts_into_the_users_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dataset folder cannot take `.detector-coco/`: the json goes to $XDG_CACHE_HOME/detector/yolo-coco; with no
    home either, an error names the dataset's folder and the way out."""
    path = write_yolo(tmp_path / "ds", {"a": "0 0.5 0.5 0.25 0.5\n"})
    (tmp_path / "ds" / ".detector-coco").write_text("a file: no folder can be made here, even as root")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    spec = load_data_spec(path)
    assert spec.train.annotations.parent.parent == tmp_path / "xdg" / "detector" / "yolo-coco"
    assert coco_boxes(spec.train.annotations)["a.jpg"] == [(0, (30.0, 15.0, 50.0, 45.0))]
    monkeypatch.delenv("XDG_CACHE_HOME")

    def no_home(cls) -> Path:  # noqa: ANN001
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", classmethod(no_home))
    with pytest.raises(DetectorError, match=r"no writable folder for the converted annotations .*detector data convert"):
        load_data_spec(path)


def test_conversions_in_the_users_cache_that_no_run_used_for_long_are_removed(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A conversion into the user's cache removes the conversions there unused for UNUSED_DAYS days, keeps a young
    one, and its own folder stays however old it was: using it marks it used."""
    import time

    from detector.data.user_cache import UNUSED_DAYS

    path = write_yolo(tmp_path / "ds", {"a": "0 0.5 0.5 0.25 0.5\n"})
    (tmp_path / "ds" / ".detector-coco").write_text("a file: no folder can be made here, even as root")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    own = load_data_spec(path).train.annotations.parent
    users = own.parent
    old = time.time() - (UNUSED_DAYS + 1) * 86400
    for name in ("gone-0123456789", own.name):
        (users / name).mkdir(exist_ok=True)
        os.utime(users / name, (old, old))
    (users / "young-0123456789").mkdir()
    load_data_spec(path)
    assert sorted(p.name for p in users.iterdir()) == sorted([own.name, "young-0123456789"])
    assert time.time() - own.stat().st_mtime < 86400


def test_polygon_rows_become_their_box_and_a_missing_label_file_is_a_negative(tmp_path: Path) -> None:
    polygon = "2 0.1 0.2 0.5 0.2 0.3 0.6 0.15 0.4\n"
    path = write_yolo(tmp_path / "ds", {"a": polygon, "b": None, "c": "", "d": "0 0.5 0.5 0.5 0.5\n"})
    result = convert_yolo_dataset(path)
    assert result.data_yaml == tmp_path / "ds" / "data-coco.yaml"
    stats = result.stats["train"]
    assert (stats.images, stats.negatives, stats.missing_labels, stats.boxes, stats.from_polygons) == (4, 2, 1, 2, 1)
    boxes = coco_boxes(result.annotations["train"])
    assert boxes["b.jpg"] == [] and boxes["c.jpg"] == []
    np.testing.assert_allclose(boxes["a.jpg"][0][1], (8.0, 12.0, 40.0, 36.0), atol=1e-9)
    dataset = CocoDataset(load_data_spec(result.data_yaml).train)
    assert len(dataset) == 4 and dataset.summary.negatives == 2


def test_an_exif_rotated_jpeg_gets_its_displayed_size(tmp_path: Path) -> None:
    path = write_yolo(tmp_path / "ds", {"r": "0 0.25 0.5 0.5 0.2\n"}, sizes_wh={"r": (120, 40)})
    for split in ("train", "val"):
        rotate_with_exif(tmp_path / "ds" / "images" / split / "r.jpg")  # stored 40x120, displayed 120x40
    data = json.loads(load_data_spec(path).train.annotations.read_text())
    assert (data["images"][0]["width"], data["images"][0]["height"]) == (120, 40)
    assert data["annotations"][0]["bbox"] == pytest.approx([0.0, 16.0, 60.0, 8.0])


def test_every_image_format_this_pil_decodes_is_read_and_the_others_are_named(tmp_path: Path,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    """AVIF and JPEG 2000 (which Ultralytics reads) were left out of folders without a word; a .heic, which needs
    a plugin PIL lacks, is left out with a warning naming it."""
    from detector.data.image_files import IMAGE_SUFFIXES, read_rgb

    path = write_yolo(tmp_path / "ds", {"a": "0 0.5 0.5 0.5 0.5\n"})
    folder = tmp_path / "ds" / "images" / "train"
    formats = {".avif": "AVIF", ".jp2": "JPEG2000"}
    for suffix, kind in formats.items():
        if suffix in IMAGE_SUFFIXES:
            Image.new("RGB", (80, 60), (90, 90, 90)).save(folder / f"b{suffix}", kind)
            label_path(folder / f"b{suffix}").write_text("1 0.25 0.5 0.5 0.2\n")
    (folder / "c.heic").write_bytes(b"not decodable here")
    with caplog.at_level(logging.WARNING, logger="detector.data.yolo_import"):
        result = convert_yolo_dataset(path)
    decodable = sorted(f"b{s}" for s in formats if s in IMAGE_SUFFIXES)
    assert len(decodable) == 2  # this install's PIL reads both, so the test cannot pass vacuously
    boxes = coco_boxes(result.annotations["train"])
    assert sorted(boxes) == ["a.jpg", *decodable]
    for name in decodable:
        assert read_rgb(folder / name).shape == (60, 80, 3)
        np.testing.assert_allclose(boxes[name][0][1], (0.0, 24.0, 40.0, 36.0), atol=1e-9)  # xyxy
    assert "1 images left out, no decoder for them here: " + str(folder / "c.heic") in caplog.text


def test_rows_of_zero_size_and_repeated_rows_are_left_out_naming_the_file_and_line(tmp_path: Path,
                                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A box of zero width, or a polygon whose points lie on one line, has nothing to learn or find: it was passed
    on and dropped by the scan naming only an annotation id of the converted json. A repeated row is left out as
    Ultralytics leaves it out (in val, its second copy could never be matched: a miss for every model)."""
    rows = "0 0.5 0.5 0.0 0.2\n1 0.25 0.5 0.5 0.2\n2 0.1 0.2 0.3 0.2 0.5 0.2\n1 0.25 0.5  0.5 0.2\n2 0.25 0.5 0.5 0.2\n"
    path = write_yolo(tmp_path / "ds", {"a": rows})
    with caplog.at_level(logging.WARNING, logger="detector.data.yolo_import"):
        result = convert_yolo_dataset(path)
    label = tmp_path / "ds" / "labels" / "train" / "a.txt"
    assert f"2 label rows of zero width or height left out: {label}:1, {label}:3" in caplog.text
    assert f"1 label rows repeating an earlier row of their file left out: {label}:4" in caplog.text
    assert result.stats["train"].boxes == 2 and "2 rows of zero size left out, 1 repeated rows left out" in str(result.stats["train"])
    assert [c for c, _ in coco_boxes(result.annotations["train"])["a.jpg"]] == [1, 2]  # same box, other class: kept
    dataset = CocoDataset(load_data_spec(result.data_yaml).train)
    assert dataset.summary.boxes_kept == 2 and not any(dataset.summary.problems.values())


def test_png_sizes_are_read_from_the_header_without_decoding_the_pixels(tmp_path: Path, monkeypatch) -> None:
    """The conversion reads every image's size: a PNG's getexif() would decode all its pixels."""
    from PIL import PngImagePlugin

    from detector.data.yolo_import import image_size

    Image.new("RGB", (120, 40)).save(tmp_path / "a.png")
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: pytest.fail("pixels decoded"))
    assert image_size(tmp_path / "a.png") == (120, 40)


BAD_ROWS = [
    ("0 0.5 0.5 0.2", r"4 fields; a row is 'class cx cy w h' \(5\) or a polygon"),
    ("0 0.1 0.1 0.2 0.2 0.3", r"6 fields"),
    ("3 0.5 0.5 0.2 0.2", r"class 3 is outside names \(0\.\.2\)"),
    ("-1 0.5 0.5 0.2 0.2", r"class -1 is outside names"),
    ("0.5 0.5 0.5 0.2 0.2", r"class 0\.5 is outside names"),
    ("0 1.5 0.5 0.2 0.2", r"coordinate 1\.5 is outside \[0, 1\]"),
    ("0 0.5 -0.1 0.2 0.2", r"coordinate -0\.1 is outside \[0, 1\]"),
    ("0 nan 0.5 0.2 0.2", r"coordinate nan is not finite"),
    ("0 0.5 0.5 inf 0.2", r"coordinate inf is not finite"),
    ("0 0.5 0.5 0.2 x", r"'x' is not a number"),
    ("1 0.1 0.2 0.5 0.2 1.3 0.6", r"coordinate 1\.3 is outside \[0, 1\]"),
]


@pytest.mark.parametrize(("row", "message"), BAD_ROWS, ids=[r for r, _ in BAD_ROWS])
def test_a_bad_row_is_an_error_naming_the_file_and_line(tmp_path: Path, row: str, message: str) -> None:
    path = write_yolo(tmp_path / "ds", {"a": "0 0.5 0.5 0.2 0.2\n", "b": f"1 0.5 0.5 0.2 0.2\n\n{row}\n"})
    label = tmp_path / "ds" / "labels" / "train" / "b.txt"
    with pytest.raises(DetectorError, match=rf"^{label}:3: {message}") as info:
        load_data_spec(path)
    assert "\n" not in str(info.value)
    with pytest.raises(DetectorError, match=rf"^{label}:3: "):
        convert_yolo_dataset(path)


@pytest.mark.parametrize(("names", "extra", "message"), [
    ("{0: a, 2: b}", "", r"data\.yaml:4: 'names' keys must be the class indices 0\.\.1, got \[0, 2\]"),
    ("[a, b]", "nc: 3\n", r"data\.yaml:5: 'nc' is 3 but 'names' lists 2 classes"),
    ("[]", "", r"data\.yaml:4: 'names' must be a non-empty list"),
    ("[a, b]", "nmaes: [c]\n", r"data\.yaml:5: unknown key 'nmaes' \(did you mean 'names'\?\)"),
])
def test_bad_names_and_keys_name_the_yaml_line(tmp_path: Path, names: str, extra: str, message: str) -> None:
    path = write_yolo(tmp_path / "ds", {"a": "0 0.5 0.5 0.2 0.2\n"}, names=names, extra=extra)
    with pytest.raises(DetectorError, match=message):
        load_data_spec(path)


def test_dict_names_sorted_by_key_and_a_txt_list_of_images(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    path = write_yolo(root, {"a": "1 0.5 0.5 0.5 0.5\n", "b": "0 0.5 0.5 0.5 0.5\n"}, names="{1: dog, 0: cat}")
    (root / "val.txt").write_text("./images/val/b.jpg\nimages/val/a.jpg\n\n")
    path.write_text(path.read_text().replace("val: images/val", "val: val.txt"))
    spec = load_data_spec(path)
    assert spec.names == ["cat", "dog"] and spec.val.images == root / "images" / "val"
    data = json.loads(spec.val.annotations.read_text())
    assert [(im["id"], im["file_name"]) for im in data["images"]] == [(1, "a.jpg"), (2, "b.jpg")]
    assert [c["name"] for c in data["categories"]] == ["cat", "dog"]
    (root / "val.txt").write_text("images/val/a.png.txt\n")
    with pytest.raises(DetectorError, match=rf"^{root / 'val.txt'}:1: 'images/val/a.png.txt' is not an image"):
        load_data_spec(path)
    path.write_text(path.read_text().replace("val: val.txt", "val: images/nowhere"))
    with pytest.raises(DetectorError, match=r"data\.yaml:3: 'val': .*nowhere is neither an image folder nor a \.txt list"):
        load_data_spec(path)


def test_label_and_list_files_saved_with_a_byte_order_mark_read_as_without(tmp_path: Path) -> None:
    """Windows editors save UTF-8 with a BOM: its first row is still 'class cx cy w h', not '\\ufeff0' ..."""
    root = tmp_path / "ds"
    path = write_yolo(root, {"a": "1 0.5 0.5 0.5 0.5\n"})
    for split in ("train", "val"):
        (root / "labels" / split / "a.txt").write_text("\ufeff1 0.5 0.5 0.5 0.5\n", encoding="utf-8")
    (root / "val.txt").write_text("\ufeffimages/val/a.jpg\n", encoding="utf-8")
    path.write_text(path.read_text().replace("val: images/val", "val: val.txt"))
    spec = load_data_spec(path)
    data = json.loads(spec.val.annotations.read_text())
    assert [im["file_name"] for im in data["images"]] == ["a.jpg"]
    assert [a["category_id"] for a in data["annotations"]] == [data["categories"][1]["id"]]


def test_cli_convert_prints_where_and_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_yolo(tmp_path / "ds", {"a": "0 0.5 0.5 0.2 0.2\n"})
    assert main(["data", "convert", f"data={path}", f"out={tmp_path / 'out'}"]) == 0
    out = capsys.readouterr().out
    assert f"train: {tmp_path / 'out' / 'instances_train.json'}  1 images" in out
    assert f"dataset YAML: {tmp_path / 'out' / 'data-coco.yaml'}" in out
    assert main(["data", "convert", "--help"]) == 0
    listing = capsys.readouterr().out
    assert [line.split()[0] for line in listing.splitlines() if line.startswith("  ") and "=" in line.split()[0]] == ["data=", "out="]
    (tmp_path / "ds" / "labels" / "val" / "a.txt").write_text("0 0.5 0.5 0.2\n")
    assert main(["data", "convert", f"data={path}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"detector data convert: error: {tmp_path / 'ds' / 'labels' / 'val' / 'a.txt'}:1: 4 fields; a row is "
        "'class cx cy w h' (5) or a polygon 'class x1 y1 x2 y2 ...' (an odd count >= 7)"]
    assert main(["data", "convert", "data=", f"out={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip() == "detector data convert: error: convert: data=<Ultralytics data.yaml> is required"


@pytest.mark.slow
def test_train_and_val_on_an_ultralytics_yaml_end_to_end(coco_yaml: Path, tmp_path: Path) -> None:
    export = export_yolo_txt(load_data_spec(coco_yaml), tmp_path / "yolo")
    args = ["epochs=1", "imgsz=64", "batch=4", "workers=0", "plots=false", "model=yolo-c2f-n", "autoanchor=false",
            "device=cpu", f"project={tmp_path / 'runs'}", "name=exp"]
    assert main(["train", f"data={export.data_yaml}", *args]) == 0
    best = tmp_path / "runs" / "exp" / "weights" / "best.pt"
    assert best.is_file()
    assert main(["val", f"weights={best}", f"data={export.data_yaml}", "imgsz=64", "workers=0", "plots=false",
                 "device=cpu", f"project={tmp_path / 'val'}"]) == 0


def test_label_path_swaps_the_last_images_folder_only() -> None:
    assert label_path(Path("/d/images/set/images/a.jpg")) == Path("/d/images/set/labels/a.txt")
    assert label_path(Path("/d/photos/a.png")) == Path("/d/photos/a.txt")


def test_rows_reaching_the_image_edge_convert_with_their_area(tmp_path: Path) -> None:
    """Coordinates of exactly 0 and 1 are inside the image; the area is the box's w x h in pixels (80 x 60 image)."""
    path = write_yolo(tmp_path / "ds", {"a": "1 0.5 0.2 1.0 0.2 1.0 1.0\n0 0.75 0.5 0.5 1.0\n"})
    result = convert_yolo_dataset(path)
    data = json.loads(result.annotations["train"].read_text())
    boxes = [(a["bbox"], a["area"]) for a in data["annotations"]]
    assert boxes[0][0] == pytest.approx([40.0, 12.0, 40.0, 48.0]) and boxes[0][1] == pytest.approx(40.0 * 48.0)
    assert boxes[1][0] == pytest.approx([40.0, 0.0, 40.0, 60.0]) and boxes[1][1] == pytest.approx(40.0 * 60.0)


def test_a_row_past_the_edge_by_float_rounding_converts_and_trains(tmp_path: Path) -> None:
    """RELIABILITY row 10 in Ultralytics form: cx + w / 2 = 1.0000001 is a box to the right edge, not an error."""
    from detector.config import TrainConfig
    from detector.data.loader import TrainDataset

    path = write_yolo(tmp_path / "ds", {"a": "0 0.9 0.5 0.2000002 0.2\n"})
    x, _, w, _ = json.loads(convert_yolo_dataset(path).annotations["train"].read_text())["annotations"][0]["bbox"]
    assert x + w == pytest.approx(80.0, abs=1e-4)
    train = CocoDataset(load_data_spec(path).train)
    assert (train.summary.boxes_kept, train.summary.boxes_dropped) == (1, 0)
    labels = TrainDataset(train, imgsz=64, hyp=TrainConfig(mosaic=0.0), seed=0)[0]["labels"]
    assert labels.shape == (1, 5) and bool(((labels[:, 1:] >= 0) & (labels[:, 1:] <= 1)).all())


def test_a_split_without_a_box_or_an_image_names_the_users_files(tmp_path: Path) -> None:
    """RELIABILITY row 13 in Ultralytics form: the error names the data.yaml and the label or image folder, not
    the converted json (a file of ours the user never made)."""
    path = write_yolo(tmp_path / "unlabelled", {"a": "", "b": None})
    labels = tmp_path / "unlabelled" / "labels" / "train"
    message = (rf"^{path}: 'train': no labelled images \(2 images \(2 negatives, 1 without a label file\), 0 boxes "
               rf"\(0 from polygons\)\); labels are read from {labels}$")
    with pytest.raises(DetectorError, match=message):
        load_data_spec(path)
    with pytest.raises(DetectorError, match=message):
        convert_yolo_dataset(path)
    path = write_yolo(tmp_path / "empty", {"a": "0 0.5 0.5 0.2 0.2\n"})
    (tmp_path / "empty" / "images" / "val" / "a.jpg").unlink()
    with pytest.raises(DetectorError, match=rf"^{path}:3: 'val': no images \(.*\) in images/val$"):
        load_data_spec(path)


def test_a_download_script_in_an_ultralytics_yaml_is_never_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """RELIABILITY row 21 where real download scripts live: Ultralytics data.yaml files."""
    marker = tmp_path / "downloaded"
    script = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')"
    for download in (f"touch {marker}", f"|\n  {script}"):
        path = write_yolo(tmp_path / "ds", {"a": "0 0.5 0.5 0.2 0.2\n"}, extra=f"download: {download}\n")
        with caplog.at_level(logging.WARNING, logger="detector"):
            CocoDataset(load_data_spec(path).train)
            convert_yolo_dataset(path)
        assert "'download' is ignored" in caplog.text
        caplog.clear()
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations_that_transpose_swap_width_and_height(tmp_path: Path, orientation: int, suffix: str) -> None:
    """EXIF 5-8 turn the stored image a quarter (5, 7 also mirror it), 1-4 keep its axes; a TIFF's size, which PIL
    turns itself, is not swapped twice."""
    from detector.data.image_files import read_rgb
    from detector.data.yolo_import import image_size

    image = Image.new("RGB", (120, 40))
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(tmp_path / f"a{suffix}", exif=exif)
    assert image_size(tmp_path / f"a{suffix}") == ((40, 120) if orientation >= 5 else (120, 40))
    assert read_rgb(tmp_path / f"a{suffix}").shape[1::-1] == image_size(tmp_path / f"a{suffix}")

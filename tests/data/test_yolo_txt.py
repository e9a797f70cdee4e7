"""COCO -> YOLO-txt export: boxes round-trip exactly, crowd boxes left out, category ids mapped, any image mode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from detector.data.spec import load_data_spec
from detector.data.yolo_txt import export_yolo_txt
from detector.errors import DetectorError
from data_helpers import coco_boxes
from yolo_labels import read_label_file

# non-contiguous ids listed out of order: class i must be the i-th smallest id
UNORDERED = [{"id": 12, "name": "ring"}, {"id": 3, "name": "circle"}, {"id": 7, "name": "star"}]


def sub_pixel_boxes(data: dict) -> None:
    """Move every box by a fraction of a pixel, so the check covers non-integer boxes."""
    for k, ann in enumerate(data["annotations"]):
        x, y, w, h = ann["bbox"]
        ann["bbox"] = [x + 0.37 + 0.01 * k, y + 0.21, w - 0.5, h - 0.13]


def restyle_images(root: Path) -> None:
    """Split `root`: img001 gray PNG, img002 RGBA PNG, img000 a JPEG stored rotated with EXIF orientation 6."""
    images, json_path = root / "images", root / "instances.json"
    data = json.loads(json_path.read_text())
    for index, mode in ((1, "L"), (2, "RGBA")):
        old = images / data["images"][index]["file_name"]
        Image.open(old).convert(mode).save(old.with_suffix(".png"))
        old.unlink()
        data["images"][index]["file_name"] = old.with_suffix(".png").name
    first = images / data["images"][0]["file_name"]
    displayed = Image.open(first)
    stored = displayed.transpose(Image.Transpose.ROTATE_90)  # orientation 6 turns it back on display
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(first, exif=exif, quality=95)
    json_path.write_text(json.dumps(data))


@pytest.fixture
def data_yaml(make_data_yaml) -> Path:
    path = make_data_yaml(categories=UNORDERED, mutate=sub_pixel_boxes, boxes_per_image=3)
    for split in ("train", "val"):
        restyle_images(path.parent / split)
    return path


def test_boxes_round_trip_crowd_excluded_and_ids_mapped(data_yaml: Path, tmp_path: Path) -> None:
    export = export_yolo_txt(load_data_spec(data_yaml), tmp_path / "yolo")
    assert export.category_ids == [3, 7, 12] and export.names == ["circle", "star", "ring"]
    assert yaml.safe_load(export.data_yaml.read_text())["names"] == {0: "circle", 1: "star", 2: "ring"}
    for split in ("train", "val"):
        expected = coco_boxes(data_yaml.parent / split / "instances.json")
        assert sorted(Path(row["file"]).name for row in export.images[split]) == sorted(expected)
        for row in export.images[split]:
            link = Path(row["yolo_file"])
            assert link.is_symlink() and link.resolve() == Path(row["file"])
            with Image.open(row["file"]) as im:
                width, height = im.size
                if im.getexif().get(0x0112) == 6:
                    width, height = height, width  # labels are in the displayed frame
            classes, xyxy = read_label_file(tmp_path / "yolo" / "labels" / split / (link.stem + ".txt"), width, height)
            got = sorted((export.category_ids[c], tuple(b)) for c, b in zip(classes.tolist(), xyxy.tolist()))
            want = expected[Path(row["file"]).name]
            assert [c for c, _ in got] == [c for c, _ in want]
            np.testing.assert_allclose([b for _, b in got], [b for _, b in want], atol=0.01, rtol=0)


def test_negative_image_gets_an_empty_label_file_and_modes_are_kept(data_yaml: Path, tmp_path: Path) -> None:
    export = export_yolo_txt(load_data_spec(data_yaml), tmp_path / "yolo")
    labels = tmp_path / "yolo" / "labels" / "val"
    assert (labels / "img005.txt").read_text() == ""  # the last image has no annotations
    assert (labels / "img001.txt").read_text() and (labels / "img002.txt").read_text()  # gray, RGBA
    index = json.loads((tmp_path / "yolo" / "index.json").read_text())
    assert index["category_ids"] == [3, 7, 12] and len(index["images"]["val"]) == len(export.images["val"]) == 6


def written(out: Path) -> tuple[dict[str, str], dict[str, Path]]:
    """Every label file's text and every image link's target under `out`, keyed by the path relative to it."""
    labels = {str(p.relative_to(out)): p.read_text() for p in sorted((out / "labels").rglob("*.txt"))}
    links = {str(p.relative_to(out)): p.resolve() for p in sorted((out / "images").rglob("*")) if p.is_symlink()}
    return labels, links


def test_rerun_replaces_stale_links_labels_and_caches(data_yaml: Path, tmp_path: Path) -> None:
    """A rerun removes what an earlier export (or another tool) left, and writes the same export again: a rerun
    that only cleaned up would leave the other tool without labels."""
    out = tmp_path / "yolo"
    export = export_yolo_txt(load_data_spec(data_yaml), out)
    first_labels, first_links = written(out)
    rows = [row for split in ("train", "val") for row in export.images[split]]
    assert first_links == {str(Path(row["yolo_file"]).relative_to(export.root)): Path(row["file"]) for row in rows}
    stems = {str(Path("labels", Path(link).parent.name, Path(link).stem + ".txt")) for link in first_links}
    assert set(first_labels) == stems  # one label file a link
    assert len(rows) == 12 and any(first_labels.values())  # 6 images a split, boxes in some
    (out / "labels" / "train.cache").write_text("stale")
    (out / "labels" / "train" / "gone.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (out / "images" / "train" / "gone.jpg").symlink_to(next(iter(first_links.values())))
    export_yolo_txt(load_data_spec(data_yaml), out)
    assert not (out / "labels" / "train.cache").exists() and not (out / "labels" / "train" / "gone.txt").exists()
    assert not (out / "images" / "train" / "gone.jpg").is_symlink()
    assert written(out) == (first_labels, first_links)


def test_categories_must_agree_between_splits(make_data_yaml, tmp_path: Path) -> None:
    path = make_data_yaml()
    val_json = path.parent / "val" / "instances.json"
    data = json.loads(val_json.read_text())
    data["categories"].append({"id": 99, "name": "extra"})
    val_json.write_text(json.dumps(data))
    with pytest.raises(DetectorError, match="differ from the train split"):
        export_yolo_txt(load_data_spec(path), tmp_path / "yolo")


def test_an_export_of_the_same_annotations_is_reused_untouched(data_yaml: Path, tmp_path: Path) -> None:
    """A second harness invocation must not rewrite the export a running rival is training from."""
    from detector.data.yolo_txt import reuse_or_export

    out = tmp_path / "yolo"
    first = reuse_or_export(load_data_spec(data_yaml), out)
    label = next((out / "labels" / "train").glob("*.txt"))
    before = label.stat().st_mtime_ns
    again = reuse_or_export(load_data_spec(data_yaml), out)
    assert again == first and label.stat().st_mtime_ns == before
    digest = json.loads((out / "index.json").read_text())["sources"]["train"]
    spec = load_data_spec(data_yaml)
    spec.train.annotations.write_text(spec.train.annotations.read_text() + " ")  # another source: a new export
    reuse_or_export(spec, out)
    assert json.loads((out / "index.json").read_text())["sources"]["train"] != digest
    assert next((out / "labels" / "train").glob("*.txt")).stat().st_mtime_ns != before


def test_label_rows_keep_a_large_image_box_to_well_under_a_hundredth_of_a_pixel(tmp_path: Path) -> None:
    """9 decimals of the image size: a 4000 px image's box comes back within 1e-4 px; a score keeps 5 decimals."""
    from detector.data.yolo_txt import format_label_file, normalised_rows

    box = [1234.5671, 2345.6782, 3456.7893, 3999.1234]
    rows = normalised_rows([2], [box], 4000, 3000)
    (tmp_path / "a.txt").write_text(format_label_file(rows))
    classes, boxes = read_label_file(tmp_path / "a.txt", 4000, 3000)
    assert classes.tolist() == [2] and np.abs(boxes[0] - box).max() < 1e-4
    assert format_label_file(rows, np.array([0.1234567])).endswith(" 0.12346\n")


def test_images_of_the_same_name_in_sub_folders_get_their_own_links(make_data_yaml, tmp_path: Path) -> None:
    """'a/x.jpg' and 'b/x.jpg' become images/<split>/a__x.jpg and b__x.jpg, each with its own label file."""
    path = make_data_yaml()
    for split in ("train", "val"):
        root = path.parent / split
        data = json.loads((root / "instances.json").read_text())
        for folder, image in zip("ab", data["images"][:2]):
            (root / "images" / folder).mkdir()
            (root / "images" / image["file_name"]).rename(root / "images" / folder / "x.jpg")
            image["file_name"] = f"{folder}/x.jpg"
        (root / "instances.json").write_text(json.dumps(data))
    export = export_yolo_txt(load_data_spec(path), tmp_path / "yolo")
    links = sorted(Path(row["yolo_file"]).name for row in export.images["train"])
    assert links[:2] == ["a__x.jpg", "b__x.jpg"]
    assert (tmp_path / "yolo" / "labels" / "train" / "a__x.txt").is_file()

"""CocoDataset: id mapping, crowd, negatives, every bad input of the scan (RELIABILITY rows 1-2, 4-11, 13),
strict mode, the scan cache, coco_gt."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector.data.coco import CocoDataset
from detector.data.image_files import inspect_image
from detector.data.scan_cache import CACHE_VERSION
from detector.data.spec import SplitSpec
from detector.errors import DetectorError


def edit_json(split: SplitSpec, edit) -> None:
    data = json.loads(split.annotations.read_text())
    edit(data)
    split.annotations.write_text(json.dumps(data))


def add_ann(data: dict, image_index: int, bbox: list, category_id: int = 3, iscrowd: int = 0) -> int:
    ann_id = max(a["id"] for a in data["annotations"]) + 1
    data["annotations"].append(
        {"id": ann_id, "image_id": data["images"][image_index]["id"], "category_id": category_id,
         "bbox": bbox, "area": 1.0, "iscrowd": iscrowd}
    )
    return ann_id


def test_gapped_category_ids_round_trip_and_names(make_coco) -> None:
    split = make_coco()
    ds = CocoDataset(split)
    assert ds.category_ids == [1, 3, 7] and ds.names == ["circle", "square", "triangle"] and ds.num_classes == 3
    data = json.loads(split.annotations.read_text())
    by_id = {a["id"]: a for a in data["annotations"] if not a["iscrowd"]}
    # every training box maps back to its file annotation's category id
    for record in ds.records:
        file_anns = [a for a in by_id.values() if a["image_id"] == record.image_id]
        assert sorted(ds.category_ids[c] for c in record.classes) == sorted(a["category_id"] for a in file_anns)
        for a in file_anns:
            x, y, w, h = a["bbox"]
            assert any(np.allclose(b, [x, y, x + w, y + h]) for b in record.boxes_xyxy)
    assert CocoDataset(split, names=["a", "b", "c"]).names == ["a", "b", "c"]
    with pytest.raises(DetectorError, match="names: 2 given"):
        CocoDataset(split, names=["a", "b"])


def test_crowd_kept_apart_and_negatives_kept(make_coco) -> None:
    ds = CocoDataset(make_coco())
    first = ds.records[0]
    assert len(first.crowd_xyxy) == 1 and len(first.boxes_xyxy) == 2  # crowd never a training target
    assert ds.summary.crowd_kept == 1 and ds.summary.boxes_kept == 10
    assert len(ds.records) == 6 and len(ds.records[-1].boxes_xyxy) == 0 and ds.summary.negatives == 1
    gt = ds.coco_gt()
    crowd = [a for a in gt.dataset["annotations"] if a["iscrowd"]]
    assert len(crowd) == 1 and len(gt.dataset["images"]) == 6
    assert {c["id"] for c in gt.dataset["categories"]} == {1, 3, 7}
    assert ds.train_box_wh(320).shape == (10, 2)


def test_coco_gt_area_from_file_or_box(make_coco) -> None:
    def edit(d: dict) -> None:
        d["annotations"][0].pop("area")
        d["annotations"][2]["area"], d["annotations"][3]["area"] = 0, -5.0  # not an area: the box's is used

    split = make_coco(mutate=edit)
    gt = CocoDataset(split).coco_gt()
    anns = {a["id"]: a for a in gt.dataset["annotations"]}
    for ann_id in (100, 102, 103):
        box = anns[ann_id]["bbox"]
        assert anns[ann_id]["area"] == pytest.approx(box[2] * box[3]) and box[2] * box[3] > 0
    second = anns[101]
    assert second["area"] == json.loads(split.annotations.read_text())["annotations"][1]["area"]


@pytest.mark.parametrize("backend", ["pycocotools", "faster"])
@pytest.mark.parametrize("first_id", [0, -3])
def test_annotation_ids_from_zero_still_match(make_coco, backend: str, first_id: int) -> None:
    """pycocotools marks a matched gt by its id, so a gt of id 0 never counted as found (AP 0.25 for two perfect
    detections); ids below 1, as some exporters write, are renumbered 1..n in json order, other ids kept."""
    from detector.infer.metrics import evaluate_coco

    if backend == "faster":
        pytest.importorskip("faster_coco_eval")

    def from_first_id(d: dict) -> None:
        for k, a in enumerate(d["annotations"]):
            a["id"] = first_id + k

    gt = CocoDataset(make_coco(mutate=from_first_id)).coco_gt()
    anns = gt.dataset["annotations"]
    assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))
    rows = np.array([[a["image_id"], *a["bbox"], 0.9, a["category_id"]] for a in anns if not a["iscrowd"]])
    metrics, _ = evaluate_coco(gt, rows, backend=backend)
    assert metrics["AP"] == metrics["AR100"] == 1.0


def test_truncated_jpeg_is_skipped_named_and_never_rewritten(make_coco) -> None:
    split = make_coco()
    victim = split.images / "img001.jpg"
    victim.write_bytes(victim.read_bytes()[:-100])
    before = victim.read_bytes()
    ds = CocoDataset(split)
    assert victim.read_bytes() == before
    assert ds.summary.images_used == 5
    (item,) = ds.summary.problems["unreadable image"]
    assert str(victim) in item and str(victim) in str(ds.summary)
    assert ds.summary.boxes_kept == 8  # its 2 boxes go; nothing else is lost
    assert len(ds.summary.problems["annotation on a skipped image"]) == 2
    with pytest.raises(DetectorError, match="img001.jpg"):
        CocoDataset(split, strict=True)


@pytest.mark.parametrize("content", [b"", b"not an image"])
def test_zero_byte_and_non_image_files_are_unreadable(make_coco, content: bytes) -> None:
    split = make_coco()
    (split.images / "img002.jpg").write_bytes(content)
    ds = CocoDataset(split)
    assert len(ds.summary.problems["unreadable image"]) == 1 and ds.summary.images_used == 5


def test_missing_image_file(make_coco) -> None:
    split = make_coco()
    (split.images / "img003.jpg").unlink()
    ds = CocoDataset(split)
    assert ds.summary.problems["missing image file"] == [f"{split.images / 'img003.jpg'} (image id 19)"]
    with pytest.raises(DetectorError, match=r"missing image file: .*img003\.jpg \(image id 19\) \(strict=true\)"):
        CocoDataset(split, strict=True)


def test_bad_boxes_dropped_clipped_and_counted(make_coco) -> None:
    split = make_coco()
    ids = {}

    def edit(d):
        ids["negative"] = add_ann(d, 0, [10, 10, -5, 8])
        ids["zero"] = add_ann(d, 0, [10, 10, 0, 8])
        ids["nan"] = add_ann(d, 0, [float("nan"), 10, 5, 8])
        ids["inf"] = add_ann(d, 0, [10, 10, float("inf"), 8])
        ids["outside"] = add_ann(d, 0, [200, 10, 20, 20])  # image is 96 x 64
        ids["clipped"] = add_ann(d, 0, [80, 50, 40, 40])
        ids["rounding"] = add_ann(d, 0, [86, 10, 10.0000001, 10])  # x2 = W + 1e-7
        ids["sliver"] = add_ann(d, 0, [95.5, 10, 5, 10])  # 0.5 px wide after clipping
        ids["flat"] = add_ann(d, 0, [10, 10, 8, 0])  # zero height
        ids["below"] = add_ann(d, 0, [10, 70, 20, 20])  # under the image's bottom edge

    edit_json(split, edit)
    ds = CocoDataset(split)
    p = ds.summary.problems
    assert p["bbox of zero or negative size"] == [f"annotation {ids[k]}" for k in ("negative", "zero", "flat")]
    assert p["non-finite bbox"] == [f"annotation {ids['nan']}", f"annotation {ids['inf']}"]
    assert p["bbox outside the image"] == [f"annotation {ids['outside']}", f"annotation {ids['below']}"]
    assert p["bbox under 1 px after clipping"] == [f"annotation {ids['sliver']}"]
    (clipped,) = p["bbox clipped to the image (past the border by > 1 px)"]
    assert clipped.startswith(f"annotation {ids['clipped']} by 26.0 px")
    boxes = ds.records[0].boxes_xyxy
    assert len(boxes) == 4  # 2 good + clipped + rounding
    assert np.allclose(boxes[2], [80, 50, 96, 64]) and np.allclose(boxes[3], [86, 10, 96, 20])
    assert ds.summary.boxes_dropped == 8 and ds.summary.boxes_kept == 12
    with pytest.raises(DetectorError, match=f"non-finite bbox: annotation {ids['nan']} \\(strict=true\\)"):
        CocoDataset(split, strict=True)


def test_annotation_for_missing_image_and_unknown_category(make_coco) -> None:
    split = make_coco()

    def edit(d):
        add_ann(d, 0, [1, 1, 5, 5], category_id=42)
        d["annotations"].append({"id": 999, "image_id": 12345, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0})

    edit_json(split, edit)
    ds = CocoDataset(split)
    assert ds.summary.problems["annotation for a missing image id"] == ["annotation 999 names image id 12345"]
    assert ds.summary.problems["unknown category id"] == ["annotation 111 has category_id 42"]
    assert ds.summary.boxes_kept == 10 and ds.num_classes == 3
    with pytest.raises(DetectorError, match="annotation 999 names image id 12345"):
        CocoDataset(split, strict=True)


@pytest.mark.parametrize("what", ["images", "annotations", "categories"])
def test_duplicate_ids_are_always_errors(make_coco, what: str) -> None:
    split = make_coco(mutate=lambda d: d[what].append(dict(d[what][0])))
    with pytest.raises(DetectorError, match=r"instances\.json: duplicate (image|annotation|category) id"):
        CocoDataset(split)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("images"), "no 'images' list"),
        (lambda d: d["annotations"][0].pop("bbox"), "annotation 100: 'bbox' must be"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, "3", 4]), "annotation 100: 'bbox' must be"),
        (lambda d: d["annotations"][0].update(image_id="10"), r"annotations\[0\] needs integer"),
        (lambda d: d["images"][1].pop("file_name"), r"images\[1\] needs"),
        (lambda d: d["images"][1].update(file_name="img000.jpg"), "listed by two images"),
        (lambda d: d["categories"][1].update(name={"en": "star"}), r"categories\[1\] needs an integer 'id' and a string 'name'"),
    ],
)
def test_malformed_json_names_the_item(make_coco, edit, message: str) -> None:
    with pytest.raises(DetectorError, match=message):
        CocoDataset(make_coco(mutate=edit))


def test_invalid_json_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('{"images": [')
    with pytest.raises(DetectorError, match=r"bad\.json:1: invalid JSON"):
        CocoDataset(SplitSpec(images=tmp_path, annotations=tmp_path / "bad.json"))
    with pytest.raises(DetectorError, match="annotations file not found"):
        CocoDataset(SplitSpec(images=tmp_path, annotations=tmp_path / "none.json"))
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)  # a RecursionError traceback before
    with pytest.raises(DetectorError, match=r"deep\.json: invalid JSON \(nested too deeply to be a COCO file\)$"):
        CocoDataset(SplitSpec(images=tmp_path, annotations=tmp_path / "deep.json"))


def test_an_oversized_json_warns_before_parsing(make_coco, caplog: pytest.LogCaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Over 1 MiB of JSON per image (here without the 16 MiB of slack): a warning naming the file and the image
    count, then the scan goes on."""
    from detector.data import coco_json

    monkeypatch.setattr(coco_json, "JSON_SLACK_BYTES", 0)
    split = make_coco()
    with split.annotations.open("a") as f:
        f.write(" " * (7 << 20))  # 6 images; trailing whitespace keeps it valid JSON
    with caplog.at_level("WARNING", logger="detector.data.coco_json"):
        ds = CocoDataset(split)
    assert len(ds.records) == 6
    assert any(str(split.annotations) in r.getMessage() and "for 6 entries in" in r.getMessage() for r in caplog.records)


def test_a_json_too_large_to_parse_is_refused_unread(make_coco, monkeypatch: pytest.MonkeyPatch) -> None:
    from detector import memory
    from detector.data import coco_scan

    split = make_coco()
    monkeypatch.setattr(memory, "machine_memory_bytes", lambda: split.annotations.stat().st_size * 4)
    monkeypatch.setattr(coco_scan, "read_json", lambda path: pytest.fail("parsed anyway"))
    with pytest.raises(DetectorError, match=rf"^{split.annotations}: .* of JSON needs about .* to parse, more than "):
        CocoDataset(split)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(annotations=[]),
        lambda d: d.update(images=[], annotations=[]),
        lambda d: [a.update(iscrowd=1) for a in d["annotations"]],
    ],
)
def test_empty_dataset_is_an_error(make_coco, mutate) -> None:
    split = make_coco(mutate=mutate)
    with pytest.raises(DetectorError, match=f"no labelled images in {split.annotations}"):
        CocoDataset(split)


def test_all_images_unreadable_is_an_error(make_coco) -> None:
    split = make_coco()
    for f in split.images.iterdir():
        f.write_bytes(b"")
    with pytest.raises(DetectorError, match="no labelled images"):
        CocoDataset(split)


def _exif_image(path: Path, orientation: int, size_wh: tuple[int, int]) -> np.ndarray:
    """Save stored pixels with an EXIF orientation; return the pixels as displayed (what a viewer shows)."""
    stored = np.zeros((size_wh[1], size_wh[0], 3), np.uint8)
    stored[5:15, 10:40] = (255, 0, 0)  # a red bar near the stored top-left
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, exif=exif, quality=95)
    transpose = {6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90}[orientation]
    return np.asarray(image.transpose(transpose))


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_swaps_size_and_boxes_match_pixels(make_coco, orientation: int) -> None:
    split = make_coco()
    displayed = _exif_image(split.images / "img000.jpg", orientation, (96, 64))
    red = (displayed[..., 0] > 128) & (displayed[..., 1] < 100)
    ys, xs = np.nonzero(red)
    box = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]

    def edit(d):
        d["images"][0].update(width=64, height=96)  # the displayed frame, as annotation tools record it
        d["annotations"] = [a for a in d["annotations"] if a["image_id"] != d["images"][0]["id"]]
        add_ann(d, 0, box)

    edit_json(split, edit)
    ds = CocoDataset(split)
    record = ds.records[0]
    assert (record.width, record.height) == (64, 96)
    assert not ds.summary.problems["json width/height differ from the file (the file's are used)"]
    pixels = ds.load_image(0)
    assert pixels.shape == (96, 64, 3)
    x1, y1, x2, y2 = record.boxes_xyxy[0].astype(int)
    loaded_red = (pixels[..., 0] > 128) & (pixels[..., 1] < 100)
    ys, xs = np.nonzero(loaded_red)
    assert xs.min() >= x1 - 1 and xs.max() < x2 + 1 and ys.min() >= y1 - 1 and ys.max() < y2 + 1
    assert loaded_red[y1:y2, x1:x2].mean() > 0.9


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "I;16", "CMYK"])
def test_image_modes_become_rgb_uint8(make_coco, mode: str) -> None:
    split = make_coco()
    path = split.images / "img002.png"
    rgb = np.zeros((80, 80, 3), np.uint8)
    rgb[20:40, 20:60] = 200
    if mode == "I;16":
        image = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    else:
        image = Image.fromarray(rgb).convert(mode)
    image.save(path if mode != "CMYK" else path.with_suffix(".jpg"))
    name = path.name if mode != "CMYK" else "img002.jpg"
    edit_json(split, lambda d: d["images"][2].update(file_name=name))
    ds = CocoDataset(split)
    index = [r.file.name for r in ds.records].index(name)
    pixels = ds.load_image(index)
    assert pixels.shape == (80, 80, 3) and pixels.dtype == np.uint8
    assert pixels[30, 30].min() > 150 and pixels[5, 5].max() < 60


def test_a_dark_16_bit_image_stays_dark(tmp_path: Path) -> None:
    """Every value of a dark 16-bit frame is under 256: it is still 16-bit (1/257 of the 8-bit scale), not 8-bit."""
    from detector.data.image_files import read_rgb

    dark = np.full((8, 8), 200, np.uint16)
    dark[2:4, 2:4] = 255 * 257
    Image.fromarray(dark).save(tmp_path / "dark.png")
    pixels = read_rgb(tmp_path / "dark.png")
    assert pixels[0, 0].tolist() == [0, 0, 0] and pixels[2, 2].tolist() == [255, 255, 255]
    dark[2:4, 2:4] = 200
    Image.fromarray(dark).save(tmp_path / "darker.png")
    assert read_rgb(tmp_path / "darker.png").max() == 0


def test_tiny_images_are_skipped(make_coco) -> None:
    split = make_coco()
    Image.new("RGB", (9, 30)).save(split.images / "img004.jpg")
    edit_json(split, lambda d: d["images"][4].update(width=9, height=30))
    ds = CocoDataset(split)
    assert ds.summary.problems["image under 10 px"] == [f"{split.images / 'img004.jpg'} (9x30)"]
    assert len(ds) == 5
    Image.new("RGB", (10, 30)).save(split.images / "img004.jpg")  # exactly 10 px: usable
    edit_json(split, lambda d: d["images"][4].update(width=10, height=30))
    ds = CocoDataset(split)
    assert not ds.summary.problems["image under 10 px"] and len(ds) == 6


def test_json_width_and_height_that_differ_from_the_file_are_named_and_the_files_used(make_coco) -> None:
    split = make_coco(mutate=lambda d: d["images"][0].update(width=100, height=70))  # the file is 96 x 64
    ds = CocoDataset(split)
    kind = "json width/height differ from the file (the file's are used)"
    assert ds.summary.problems[kind] == [f"{split.images / 'img000.jpg'} (json 100x70, file 96x64)"]
    assert ds.size_hw(0) == (64, 96) and (ds.boxes(0)[:, 2:] <= [96, 64]).all()


def test_summary_fits_a_screen_and_names_the_first_few(make_coco) -> None:
    split = make_coco()
    edit_json(split, lambda d: [add_ann(d, 0, [10, 10, -1, 1]) for _ in range(12)])
    text = str(CocoDataset(split).summary)
    assert len(text.splitlines()) < 25 and max(map(len, text.splitlines())) < 200
    assert "bbox of zero or negative size: 12 (annotation 111, annotation 112" in text
    assert "... and 7 more" in text
    assert "circle 3  square 4  triangle 3" in text


def _read_cache(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return json.loads(arrays.pop("meta").tobytes()), arrays


def _write_cache(path: Path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)


def test_scan_cache_is_reused_and_rebuilt_when_stale_or_corrupt(make_coco, monkeypatch) -> None:
    split = make_coco()
    cache = split.annotations.parent / ".instances.json.scan-cache.npz"
    CocoDataset(split)
    assert cache.exists() and _read_cache(cache)[0]["version"] == CACHE_VERSION
    calls = []
    import detector.data.coco_scan as coco_scan
    import detector.data.image_files as image_files

    real, real_read_json = image_files.inspect_image, coco_scan.read_json
    monkeypatch.setattr(image_files, "inspect_image", lambda p: calls.append(p.name) or real(p))
    monkeypatch.setattr(coco_scan, "read_json", lambda path: pytest.fail("json parsed again"))
    again = CocoDataset(split)
    assert calls == []  # unchanged: nothing decoded again, the json not even parsed
    assert [r.file for r in again.records] == [split.images / f"img{i:03d}.jpg" for i in range(6)]
    monkeypatch.setattr(coco_scan, "read_json", real_read_json)
    victim = split.images / "img001.jpg"
    victim.write_bytes(victim.read_bytes()[:-100])  # size changes: this one image is re-checked
    assert len(CocoDataset(split).summary.problems["unreadable image"]) == 1 and calls == ["img001.jpg"]
    cache.write_bytes(b"PK not a zip")
    calls.clear()
    assert len(CocoDataset(split).summary.problems["unreadable image"]) == 1 and len(calls) == 6
    meta, arrays = _read_cache(cache)
    listed = bytes(arrays["listed_names"]).decode()
    index = [listed[a:b] for a, b in zip(arrays["listed_name_offsets"][:-1], arrays["listed_name_offsets"][1:])].index("img001.jpg")
    arrays["listed_status"][index] = 0  # a tampered entry for a changed file is not trusted ...
    arrays["listed_stat"][index, 1] += 1  # ... once its key no longer matches
    _write_cache(cache, meta, arrays)
    calls.clear()
    CocoDataset(split)
    assert calls == ["img001.jpg"]


def test_scan_cache_notices_same_size_edits_by_their_mtime(make_coco) -> None:
    """The cache is keyed by size and mtime: a json or an image rewritten to the same size, but later, is read anew."""
    split = make_coco()
    CocoDataset(split)
    later = split.annotations.stat().st_mtime_ns + 5_000_000_000
    text = split.annotations.read_text()
    split.annotations.write_text(text.replace('"square"', '"sqvare"'))  # same size
    os.utime(split.annotations, ns=(later, later))
    assert CocoDataset(split).names == ["circle", "sqvare", "triangle"]
    victim = split.images / "img002.jpg"
    victim.write_bytes(b"\0" * victim.stat().st_size)  # same size, no longer an image
    os.utime(victim, ns=(later, later))
    assert len(CocoDataset(split).summary.problems["unreadable image"]) == 1


def test_a_cache_whose_string_table_does_not_add_up_is_not_used(make_coco) -> None:
    """Offsets that run past their string buffer (a truncated or forged cache): the scan is made again."""
    split = make_coco()
    cache = split.annotations.parent / ".instances.json.scan-cache.npz"
    CocoDataset(split)
    meta, arrays = _read_cache(cache)
    arrays["names"] = arrays["names"][:-1]  # the last file name loses its last byte
    _write_cache(cache, meta, arrays)
    assert [r.file.name for r in CocoDataset(split).records] == [f"img{i:03d}.jpg" for i in range(6)]


def test_a_scan_cached_by_an_older_version_is_made_again(make_coco, monkeypatch) -> None:
    split = make_coco()
    cache = split.annotations.parent / ".instances.json.scan-cache.npz"
    CocoDataset(split)
    meta, arrays = _read_cache(cache)
    _write_cache(cache, {**meta, "version": CACHE_VERSION - 1}, arrays)
    import detector.data.coco_scan as coco_scan

    parsed, real_read_json = [], coco_scan.read_json
    monkeypatch.setattr(coco_scan, "read_json", lambda path: parsed.append(path) or real_read_json(path))
    CocoDataset(split)
    assert parsed == [split.annotations] and _read_cache(cache)[0]["version"] == CACHE_VERSION


def test_scan_cache_holds_no_pickle(make_coco) -> None:
    split = make_coco()
    CocoDataset(split)
    cache = split.annotations.parent / ".instances.json.scan-cache.npz"
    meta, arrays = _read_cache(cache)  # allow_pickle=False: it would raise on an object array
    assert all(a.dtype != object for a in arrays.values())
    arrays["boxes"] = np.array([object()] * 4, dtype=object).reshape(1, 4)  # a forged pickled array ...
    with open(cache, "wb") as f:
        np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays, allow_pickle=True)
    assert len(CocoDataset(split)) == 6  # ... is never unpickled: the cache counts as none and is rebuilt
    assert _read_cache(cache)[1]["boxes"].dtype == np.float32


def test_scan_cache_goes_to_cache_dir_when_the_json_folder_is_not_writable(make_coco, tmp_path: Path) -> None:
    split = make_coco()
    (split.annotations.parent / ".instances.json.scan-cache.npz").mkdir()  # writes there fail, even as root
    CocoDataset(split, cache_dir=tmp_path / "run")
    assert len(list((tmp_path / "run").glob("instances-*.scan-cache.npz"))) == 1


def test_inspect_image_reads_size_after_exif(tmp_path: Path) -> None:
    _exif_image(tmp_path / "a.jpg", 6, (50, 20))
    assert inspect_image(tmp_path / "a.jpg") == ("ok", 20, 50, "", False)  # rotated: decoded by PIL, not cv2


def test_train_and_val_of_one_read_only_json_parse_it_once(make_coco, monkeypatch, tmp_path: Path) -> None:
    """The second split of the same json reads the first one's cache under cache_dir, not the json."""
    import detector.data.coco_scan as coco_scan

    split = make_coco()
    (split.annotations.parent / ".instances.json.scan-cache.npz").mkdir()  # beside the json: not writable
    parsed = []
    real = coco_scan.read_json
    monkeypatch.setattr(coco_scan, "read_json", lambda path: parsed.append(path) or real(path))
    first, second = CocoDataset(split, cache_dir=tmp_path), CocoDataset(split, cache_dir=tmp_path)
    assert parsed == [split.annotations] and len(first) == len(second) == 6


def test_the_process_pool_scan_finds_what_the_inline_one_does(make_coco, monkeypatch) -> None:
    import detector.data.image_files as image_files

    split = make_coco()
    victim = split.images / "img001.jpg"
    victim.write_bytes(victim.read_bytes()[:-100])
    (split.images / "img003.jpg").unlink()
    inline = CocoDataset(split)
    (split.annotations.parent / ".instances.json.scan-cache.npz").unlink()
    monkeypatch.setattr(image_files, "POOL_MIN_IMAGES", 0)
    monkeypatch.setattr(image_files, "SCAN_CHUNK", 2)
    pooled = CocoDataset(split)
    assert str(pooled.summary) == str(inline.summary) and pooled.image_hw.tolist() == inline.image_hw.tolist()
    assert len(pooled.summary.problems["unreadable image"]) == 1 and len(pooled.summary.problems["missing image file"]) == 1


def test_records_are_views_of_flat_arrays_and_coco_gt_keeps_the_json_order(make_coco) -> None:
    def shuffle(d):
        d["annotations"].reverse()  # the json's annotation order is not image order

    ds = CocoDataset(make_coco(mutate=shuffle))
    assert not any(isinstance(v, list) and len(v) == len(ds) for v in vars(ds).values())  # no per-image objects
    record = ds.records[0]
    assert record.boxes_xyxy.dtype == np.float32 and record.classes.dtype == np.int64
    assert np.array_equal(record.boxes_xyxy, ds.boxes(0)) and record.file == ds.file(0)
    assert (ds.records[-1].image_id, len(ds.records[1:3])) == (ds.image_id(len(ds) - 1), 2)
    with pytest.raises(IndexError):
        ds.records[len(ds)]
    assert not ds.image_hw.flags.writeable and not ds.boxes(0).flags.writeable  # shared pages stay clean
    data = json.loads(ds.annotations.read_text())
    kept = [a["id"] for a in data["annotations"]]
    assert [a["id"] for a in ds.coco_gt().dataset["annotations"]] == kept


def _insert_png_chunk(path: Path, kind: bytes, payload: bytes) -> None:
    """Insert a chunk just before IEND (after the image data)."""
    import struct
    import zlib

    data = path.read_bytes()
    chunk = struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    end = data.rindex(b"IEND") - 4
    path.write_bytes(data[:end] + chunk + data[end:])


def test_png_orientation_after_the_image_data_is_read_without_decoding(tmp_path: Path) -> None:
    path = tmp_path / "late.png"
    Image.new("RGB", (50, 20), (200, 0, 0)).save(path)
    exif = Image.Exif()
    exif[0x0112] = 6
    _insert_png_chunk(path, b"eXIf", exif.tobytes())
    assert inspect_image(path) == ("ok", 20, 50, "", False)
    from detector.data.image_files import read_rgb

    assert read_rgb(path).shape == (50, 20, 3)  # the pixels agree with the size the scan recorded


def test_jpeg_with_data_after_its_end_marker_is_usable(tmp_path: Path) -> None:
    path = tmp_path / "trailer.jpg"
    Image.new("RGB", (40, 30), (0, 90, 0)).save(path)
    path.write_bytes(path.read_bytes() + b"\x01" * 10_000)  # e.g. a phone's appended data
    assert inspect_image(path) == ("ok", 40, 30, "", True)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size - 10_100])
    assert inspect_image(truncated)[0] == "corrupt"


# ------------------------------------------------------------------------------------------------ fraction=


def test_fraction_indices_are_fixed_sorted_and_nested() -> None:
    from detector.data.coco import fraction_indices

    half, quarter = fraction_indices(1000, 0.5), fraction_indices(1000, 0.25)
    assert len(half) == 500 and len(quarter) == 250 and len(np.unique(half)) == 500
    assert np.all(np.diff(half) > 0)  # json order
    assert np.array_equal(half, fraction_indices(1000, 0.5))  # the same images every run
    assert set(quarter) <= set(half)  # a smaller share inside a larger one
    assert 0.3 < half.mean() / 999 < 0.7 and half.min() < 100 and half.max() > 900  # a sample of all, not a prefix
    assert len(fraction_indices(3, 0.01)) == 1 and np.array_equal(fraction_indices(5, 1.0), np.arange(5))
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(DetectorError, match="fraction must be > 0 and <= 1"):
            fraction_indices(10, bad)


def test_a_fraction_keeps_whole_images_with_their_boxes_crowd_and_ground_truth(make_coco) -> None:
    from detector.data.coco import fraction_indices

    split = make_coco(sizes_wh=[(96, 64), (64, 96), (80, 80), (120, 72), (72, 120), (100, 60)] * 3, boxes_per_image=3)
    full = CocoDataset(split)
    part = CocoDataset(split, fraction=0.5)
    keep = fraction_indices(len(full), 0.5)
    assert len(part) == 9 == len(keep) and part.category_ids == full.category_ids
    for i, k in enumerate(keep):
        a, b = part.record(i), full.record(int(k))
        assert (a.image_id, a.file, a.width, a.height, a.fast_decode) == (b.image_id, b.file, b.width, b.height, b.fast_decode)
        assert np.array_equal(a.boxes_xyxy, b.boxes_xyxy) and np.array_equal(a.classes, b.classes)
        assert np.array_equal(a.crowd_xyxy, b.crowd_xyxy)
        assert np.array_equal(part.load_image(i), full.load_image(int(k)))
    assert part.summary.boxes_kept == int(full.boxes_per_image()[keep].sum()) == len(part.train_boxes_xyxy)
    assert part.summary.instances == dict(zip(part.names, np.bincount(part._arrays["classes"], minlength=3).tolist()))
    assert "9 used (fraction=0.5 of 18 usable)" in str(part.summary) and "fraction=" not in str(full.summary)
    # the subset's ground truth is the full one's, image for image
    ids = {full.image_id(int(k)) for k in keep}
    whole, kept = full.coco_gt().dataset, part.coco_gt().dataset
    assert [im["id"] for im in kept["images"]] == [im["id"] for im in whole["images"] if im["id"] in ids]
    assert kept["annotations"] == [a for a in whole["annotations"] if a["image_id"] in ids]
    assert all(not a.flags.writeable for a in part._arrays.values())


def test_a_fraction_cuts_every_array_of_the_scan_result() -> None:
    """A key added to the scan's result must be cut by `fraction` too, or it would silently describe other images."""
    from detector.data.coco import PER_IMAGE_KEYS, RUN_KEYS
    from detector.data.scan_cache import RESULT_SCHEMA

    cut = [*PER_IMAGE_KEYS, *RUN_KEYS, *(key for keys in RUN_KEYS.values() for key in keys)]
    assert sorted(cut) == sorted(RESULT_SCHEMA) and len(set(cut)) == len(cut)


def test_a_fraction_without_labelled_images_says_so(make_coco) -> None:
    split = make_coco(sizes_wh=[(96, 64)] * 5, empty_image=False, mutate=lambda d: d["annotations"].clear())
    with pytest.raises(DetectorError, match="no labelled images .* among the 1 images fraction=0.1 keeps"):
        CocoDataset(split, fraction=0.1)


def test_annotations_without_any_image_are_the_empty_dataset_error_not_an_index_error(make_coco) -> None:
    split = make_coco(mutate=lambda d: d.update(images=[]))  # annotations left, naming image ids now gone
    with pytest.raises(DetectorError, match=f"no labelled images in {split.annotations}"):
        CocoDataset(split)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["images"][2].update(id=2**70), r"images\[2\] 'id' 1180591620717411303424 is outside the 64-bit"),
        (lambda d: d["annotations"][1].update(category_id=-(2**64)), r"annotations\[1\] 'category_id' .* outside the 64-bit"),
        (lambda d: d["annotations"][0].update(bbox=[0, 0, 10**400, 5]), r"annotation 100: 'bbox' holds a number outside"),
        (lambda d: d["annotations"][3].update(area=10**400), r"annotation 103: 'area' holds a number outside"),
    ],
)
def test_numbers_beyond_int64_or_float64_name_the_item(make_coco, edit, message: str) -> None:
    with pytest.raises(DetectorError, match=message):
        CocoDataset(make_coco(mutate=edit))


@pytest.mark.parametrize("value", ["0", None, 2, True, 1.0])
def test_iscrowd_other_than_0_or_1_is_an_error_not_a_silent_crowd_box(make_coco, value) -> None:
    split = make_coco(mutate=lambda d: d["annotations"][4].update(iscrowd=value))
    with pytest.raises(DetectorError, match=rf"annotation 104: 'iscrowd' must be 0 or 1, got {value!r}"):
        CocoDataset(split)


def test_class_counts_of_categories_sharing_a_name_are_all_shown(make_coco) -> None:
    shared = [{"id": 1, "name": "shape"}, {"id": 3, "name": "shape"}, {"id": 7, "name": "triangle"}]
    ds = CocoDataset(make_coco(categories=shared))
    counts = np.bincount(ds._arrays["classes"], minlength=3).tolist()
    assert ds.summary.instances == {"shape (id 1)": counts[0], "shape (id 3)": counts[1], "triangle": counts[2]}
    assert sum(ds.summary.instances.values()) == ds.summary.boxes_kept


def test_a_clipped_crowd_box_is_not_counted_as_a_clipped_training_box(make_coco) -> None:
    def crowd_past_the_border(d):
        d["annotations"] = [a for a in d["annotations"] if not a["iscrowd"]]
        add_ann(d, 0, [80, 40, 40, 20], iscrowd=1)  # image 0 is 96 px wide: 24 px past its right edge

    ds = CocoDataset(make_coco(mutate=crowd_past_the_border))
    line = next(ln for ln in str(ds.summary).splitlines() if ln.lstrip().startswith("boxes"))
    assert f"{ds.summary.boxes_kept} kept, 1 crowd (never trained on: ignore regions in scoring), 1 of these clipped" in line

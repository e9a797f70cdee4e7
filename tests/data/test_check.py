"""`detector data check` and `detector bench data` on datasets built by the test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from detector.config import load_options
from detector.data.check import PALETTE, data_check, draw_batch, label_stats
from detector.data.coco import CocoDataset
from detector.data.spec import load_data_spec
from detector.errors import DetectorError
from detector.options import BenchDataOptions
from detector.runtime.machine import describe_machine
from detector.tools.bench.data import main as bench_main


def test_data_check_prints_statistics_and_saves_previews(make_data_yaml, tmp_path: Path, capsys) -> None:
    data = make_data_yaml()
    assert data_check(data, save_dir=tmp_path / "check", imgsz=64, batches=2, batch_size=4) == 0
    out = capsys.readouterr().out
    assert "[train] scan of" in out and "[val] scan of" in out and "boxes per image" in out
    assert "box size sqrt(w*h) in pixels at imgsz=64" in out and "aspect ratio" in out
    pngs = sorted((tmp_path / "check").glob("train_batch*.png"))
    assert [p.name for p in pngs] == ["train_batch0.png", "train_batch1.png"]
    assert Image.open(pngs[0]).size == (4 * 64, 64)
    assert "[val] scan of" in (tmp_path / "check" / "check.txt").read_text()


def test_each_preview_batch_draws_distinct_images_and_a_small_set_whole(make_data_yaml, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A preview batch never shows one image twice; asked for more images than the set has, it shows each once."""
    from detector.data import check

    drawn: list[list[int]] = []
    monkeypatch.setattr(check, "draw_batch",
                        lambda batch, names, path: drawn.append([m["image_id"] for m in batch["meta"]]))
    data = make_data_yaml()
    images = len(CocoDataset(load_data_spec(data).train))
    assert check.data_check(data, save_dir=tmp_path / "small", imgsz=64, batches=3, batch_size=16) == 0
    assert len(drawn) == 3 and all(sorted(ids) == sorted(drawn[0]) and len(ids) == images for ids in drawn)
    assert len(set(drawn[0])) == images
    drawn.clear()
    assert check.data_check(data, save_dir=tmp_path / "part", imgsz=64, batches=4, batch_size=images - 1, seed=1) == 0
    assert all(len(set(ids)) == images - 1 for ids in drawn)
    assert len({tuple(ids) for ids in drawn}) > 1  # each batch its own draw


def _three_boxes(data: dict) -> None:
    """Image 0 (128 x 64) gets a 32 x 32 and a 16 x 4 box, image 1 (128 x 128) a 96 x 96 one, image 2 none."""
    boxes = {data["images"][0]["id"]: [[0, 0, 32, 32], [8, 8, 16, 4]], data["images"][1]["id"]: [[0, 0, 96, 96]]}
    data["annotations"] = [{"id": 100 + k, "image_id": image_id, "category_id": 1, "bbox": box, "area": box[2] * box[3],
                            "iscrowd": 0}
                           for k, (image_id, box) in enumerate((i, b) for i, bs in boxes.items() for b in bs)]


def test_label_stats_bins_are_half_open_and_count_in_percent(make_coco) -> None:
    """A value on a bin edge counts in the bin that starts there, as the labels [lo, hi) and '>= lo' say."""
    coco = CocoDataset(make_coco(sizes_wh=[(128, 64), (128, 128), (32, 32)], mutate=_three_boxes))
    text = label_stats(coco, 128)  # long sides are 128 already: sizes are the boxes' own
    lines = text.splitlines()

    def rows(title: str) -> list[list[str]]:
        """The rows of the table under the line starting with `title`, split on 2+ spaces."""
        start = next(i for i, line in enumerate(lines) if line.startswith(title)) + 3  # title, header, dashes
        end = start
        while end < len(lines) and (lines[end][:1].isdigit() or lines[end].startswith(">=")):
            end += 1
        return [re.split(r"\s{2,}", line.strip()) for line in lines[start:end]]

    # boxes per image 2, 1, 0: bins 0, 1, 2 hold one image each (integer bins labelled by their one value)
    assert rows("boxes per image") == [["0", "1", "33.3"], ["1", "1", "33.3"], ["2", "1", "33.3"]]
    # sqrt(w * h) = 32, 8, 96: on the edges 8 and 32; the empty bin before the first is left out, inner ones kept
    assert rows("box size") == [["8 - 16", "1", "33.3"], ["16 - 32", "0", "0.0"], ["32 - 64", "1", "33.3"],
                                ["64 - 128", "1", "33.3"]]
    assert rows("box aspect ratio") == [["1 - 2", "2", "66.7"], ["2 - 4", "0", "0.0"], [">= 4", "1", "33.3"]]  # 1, 4, 1
    # areas 1024 = 32^2 (medium, as in COCOeval), 64 (small), 9216 = 96^2 (large)
    assert re.search(r"^small \(< 32\^2 px\)\s+1\nmedium\s+1\nlarge \(>= 96\^2 px\)\s+1$", text, re.MULTILINE)


def test_draw_batch_tiles_the_images_left_to_right_with_their_boxes(tmp_path: Path) -> None:
    """Two images in a grid of up to four columns: one row of two tiles, each image in its own tile."""
    images = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    images[0, 0], images[1, 2] = 255, 255  # red, blue
    targets = torch.tensor([[1, 1, 0.5, 0.5, 0.5, 0.5]])  # image 1, class 1: x 4..12, y 4..12 px
    draw_batch({"images": images, "targets": targets}, ["a", "b"], tmp_path / "grid.png", columns=4)
    grid = Image.open(tmp_path / "grid.png").convert("RGB")
    assert grid.size == (32, 16)  # columns = min(4, 2 images)
    assert grid.getpixel((8, 8)) == (255, 0, 0) and grid.getpixel((16 + 2, 8)) == (0, 0, 255)
    assert grid.getpixel((16 + 4, 8)) == PALETTE[1]  # the box's left edge, in its class colour
    assert grid.getpixel((0, 0)) == grid.getpixel((16, 15)) == (255, 255, 255)  # each tile's white frame


def test_data_check_strict_fails_on_anything_skipped(make_data_yaml, tmp_path: Path) -> None:
    data = make_data_yaml()
    (data.parent / "val" / "images" / "img001.jpg").unlink()
    assert data_check(data, save_dir=tmp_path / "a", imgsz=64, batches=0) == 0  # usable: a warning only
    with pytest.raises(DetectorError, match=r"missing image file: .*img001\.jpg"):
        data_check(data, strict=True, save_dir=tmp_path / "b", imgsz=64, batches=0)


def test_a_refused_check_of_read_only_json_folders_leaves_no_save_dir(make_data_yaml, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan caches went to save_dir when the json folders could not be written: a refused check left it behind."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    data = make_data_yaml()
    for split in ("train", "val"):
        (data.parent / split / ".instances.json.scan-cache.npz").mkdir()  # beside the json: not writable, even as root
    (data.parent / "val" / "images" / "img001.jpg").unlink()
    with pytest.raises(DetectorError, match=r"missing image file: .*img001\.jpg"):
        data_check(data, strict=True, save_dir=tmp_path / "check", imgsz=64, batches=0)
    assert not (tmp_path / "check").exists()
    assert len(list((tmp_path / "xdg" / "detector" / "scans").glob("instances-*.scan-cache.npz"))) == 2


def test_bench_data_prints_a_table(make_data_yaml, capsys) -> None:
    bench_main(load_options(BenchDataOptions, {"data": str(make_data_yaml()), "imgsz": "64", "workers": "0", "batch": "2", "batches": "2"}))
    out = capsys.readouterr().out
    assert "images/s" in out and len([ln for ln in out.splitlines() if ln.startswith("   64")]) == 2
    assert describe_machine().summary() in out.splitlines()  # the machine named above the table
    with pytest.raises(DetectorError, match="unknown key 'imgs'"):
        load_options(BenchDataOptions, {"imgs": "64"})

"""The hard synthetic profile: same seed same bytes, awkward-but-valid COCO (odd category ids, crowds, negatives,
gray and RGBA files, non-square sizes), boxes that match the visible pixels, offline photos, statistics."""

from __future__ import annotations

import contextlib
import io
import json
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

import detector.data.synthetic_common as common
import detector.data.synthetic_hard as hard
from detector.cli import main
from detector.data.coco import CocoDataset
from detector.data.spec import load_data_spec
from detector.data.stats import format_stats
from data_helpers import tree_bytes


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A moderate set (the same seed the benchmark uses), big enough for crowds, negatives and every file mode."""
    return hard.generate_hard_dataset(tmp_path_factory.mktemp("hard"), seed=0, n_train=100, n_val=4, workers=2)


def test_same_seed_same_bytes_whatever_the_process_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "CHUNK", 4)  # several jobs per split, so workers=2 renders in a process pool
    hard.generate_hard_dataset(tmp_path / "a", seed=3, n_train=12, n_val=4, workers=1)
    hard.generate_hard_dataset(tmp_path / "b", seed=3, n_train=12, n_val=4, workers=2)
    hard.generate_hard_dataset(tmp_path / "c", seed=4, n_train=12, n_val=4, workers=1)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    assert tree_bytes(tmp_path / "a") != tree_bytes(tmp_path / "c")


def test_photos_load_without_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    bank = common.PhotoBank()
    for name in hard.PHOTOS:
        photo = bank.get(name)
        assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3 and min(photo.shape[:2]) >= 64, name


def test_categories_are_non_contiguous_and_unordered(dataset: Path) -> None:
    data = json.loads((dataset.parent / "train" / "instances_train.json").read_text())
    ids = [c["id"] for c in data["categories"]]
    assert sorted(ids) == [3, 5, 8, 11, 17, 42] and ids != sorted(ids)
    assert {c["name"] for c in data["categories"]} == set(hard.CLASSES)
    assert {a["category_id"] for a in data["annotations"]} == set(ids)


def test_images_sizes_modes_crowds_and_negatives(dataset: Path) -> None:
    root = dataset.parent / "train"
    data = json.loads((root / "instances_train.json").read_text())
    modes = set()
    for im in data["images"]:
        with Image.open(root / "images" / im["file_name"]) as f:
            assert f.size == (im["width"], im["height"])
            modes.add((f.format, f.mode))
    sides = np.array([[im["width"], im["height"]] for im in data["images"]])
    assert sides.min() >= 192 and sides.max() <= 512 and (sides[:, 0] != sides[:, 1]).mean() > 0.9
    assert {("JPEG", "RGB"), ("PNG", "RGBA")} <= modes and any(mode == "L" for _, mode in modes)
    crowds = [a for a in data["annotations"] if a["iscrowd"]]
    assert crowds and all(a["area"] == a["bbox"][2] * a["bbox"][3] for a in crowds)
    annotated = {a["image_id"] for a in data["annotations"]}
    assert 0 < sum(im["id"] not in annotated for im in data["images"]) <= 10


def test_boxes_are_the_visible_pixels() -> None:
    """Re-render with the owner map exposed: every box is the tight box of its object's visible pixels."""
    bank = common.PhotoBank()
    for i in range(8):
        data, _, w, h, anns = hard.render_hard_image((0, 0, i, hard.PROFILE_SALT), bank)
        for a in anns:
            x, y, bw, bh = a["bbox"]
            assert x >= 0 and y >= 0 and x + bw <= w and y + bh <= h and min(bw, bh) >= 1
            assert 0 < a["area"] <= bw * bh
    rng = np.random.default_rng(0)
    image = np.full((200, 300, 3), 128, np.float32)
    owner = np.full((200, 300), -1, np.int16)
    areas: list[int] = []
    windows: list[common.Window] = []
    for k in range(6):
        placed = hard._place(rng, image, owner, areas, k, crowd=False)
        if placed:
            win, solid = placed
            owner[win][solid] = len(areas)
            areas.append(int(solid.sum()))
            windows.append(win)
    # the whole image as every window, and the windows the objects were drawn in (offset from the image's corner:
    # a box must be moved back by its window's start)
    assert len(areas) >= 3 and any(w[0].start > 0 for w in windows) and any(w[1].start > 0 for w in windows)
    for wins in ([(slice(0, 200), slice(0, 300))] * len(areas), windows):
        for k, (bbox, area) in enumerate(common.visible_boxes(owner, wins)):
            ys, xs = np.nonzero(owner == k)
            assert bbox == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] and area == len(xs)
            assert area >= hard.MIN_VISIBLE * areas[k]  # occluded, but never below the floor


def test_loads_with_pycocotools_and_passes_our_scan(dataset: Path) -> None:
    spec = load_data_spec(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(spec.train.annotations))
    assert len(gt.getImgIds()) == 100 and sorted(gt.getCatIds()) == [3, 5, 8, 11, 17, 42]
    coco = CocoDataset(spec.train, strict=True)
    s = coco.summary
    assert s.images_used == 100 and s.images_skipped == 0 and s.boxes_dropped == 0 and s.boxes_clipped == 0
    assert s.crowd_kept > 0 and coco.category_ids == [3, 5, 8, 11, 17, 42]
    assert coco.load_image(0).shape[2] == 3 and all(coco.load_image(i).ndim == 3 for i in range(len(coco)))


def test_stats_describe_the_files(dataset: Path) -> None:
    stats = common.load_stats(dataset.parent)
    train = stats["train"]
    data = json.loads((dataset.parent / "train" / "instances_train.json").read_text())
    assert train["images"] == 100 and train["crowd"] == sum(a["iscrowd"] for a in data["annotations"])
    assert train["objects"] == sum(train["sqrt_area_histogram"].values()) == len(data["annotations"]) - train["crowd"]
    assert 5 <= train["objects_per_image"]["mean"] <= 9 and train["objects_per_image"]["max"] <= hard.MAX_OBJECTS
    shares = train["coco_size_share"]
    assert abs(sum(shares.values()) - 1) < 1e-9 and shares["small"] > 0.3 and shares["medium"] > 0.2
    assert sum(train["image_modes"].values()) == 100
    assert "small share %" in format_stats(stats)


def test_cli_hard_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "synth", "profile=hard", f"out={tmp_path}", "n_train=3", "n_val=2"]) in (0, None)
    printed = capsys.readouterr().out
    assert "objects/image mean" in printed and printed.strip().endswith(str(tmp_path / "dataset.yaml"))
    assert len(CocoDataset(load_data_spec(tmp_path / "dataset.yaml").val)) == 2

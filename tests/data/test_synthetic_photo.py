"""The photo synthetic profile: same seed same bytes, built offline from scikit-image's photographs, every class drawn,
boxes that match the visible pixels, occlusion and border floors kept, valid COCO that our strict scan accepts."""

from __future__ import annotations

import contextlib
import io
import json
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

import detector.data.synthetic_common as common
import detector.data.synthetic_photo as photo
from detector.cli import main
from detector.data.coco import CocoDataset
from detector.data.spec import load_data_spec
from detector.data.synthetic_common import load_stats, visible_boxes
from data_helpers import tree_bytes


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return photo.generate_photo_dataset(tmp_path_factory.mktemp("photo"), seed=0, n_train=80, n_val=4, workers=2)


def test_same_seed_same_bytes_whatever_the_process_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "CHUNK", 4)  # several jobs per split, so workers=2 renders in a process pool
    photo.generate_photo_dataset(tmp_path / "a", seed=3, n_train=12, n_val=4, workers=1)
    photo.generate_photo_dataset(tmp_path / "b", seed=3, n_train=12, n_val=4, workers=2)
    photo.generate_photo_dataset(tmp_path / "c", seed=4, n_train=12, n_val=4, workers=1)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    assert tree_bytes(tmp_path / "a") != tree_bytes(tmp_path / "c")


def test_cutouts_build_without_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    bank = photo.CutoutBank()
    assert len(bank.objects) == len(photo.CLASSES) and len(bank.objects[photo.CLASSES.index("face")]) == 100
    coins = bank.objects[photo.CLASSES.index("coin")]
    assert len(coins) >= 20  # each coin of `coins` segmented on its own
    for c in coins:  # round, filling its box as a disc does (pi / 4): no strip of background merged with a coin
        h, w = c.mask.shape
        assert max(h, w) <= 1.3 * min(h, w) and 0.7 < (c.mask == 255).mean() < 0.86
    assert len(bank.clutter_faces) == 100 - len(photo.FACE_LIKE_NON_FACES)
    for cutouts in bank.objects:
        for c in cutouts:
            assert c.pixels.dtype == np.uint8 and c.pixels.shape == (*c.mask.shape, 3)
            assert 0.3 < (c.mask == 255).mean() < 0.95  # a shape inside its box, not the box and not a sliver
    for name in photo.BACKGROUNDS:
        assert bank.photos.get(name).shape[2] == 3


def test_patches_land_with_matching_windows_even_when_larger_than_the_image() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        hw = tuple(int(v) for v in rng.integers(20, 60, 2))
        patch_hw = tuple(int(v) for v in rng.integers(3, 120, 2))
        win, part = photo._window(rng, hw, patch_hw)
        image_part = np.zeros(hw)[win]
        assert image_part.shape == np.zeros(patch_hw)[part].shape
        assert all(s.start >= 0 and s.stop <= n for s, n in zip(win, hw))


def test_the_painted_pixels_are_the_solid_mask_through_resize_flip_and_rotation() -> None:
    """A cut-out whose pixels are its mask, on a black image: what turned bright is the mask `_place` returns (give
    or take the anti-aliased edge), so pixels and mask cannot drift apart under the flips and rotations."""
    rng = np.random.default_rng(2)
    mask = np.zeros((30, 50), np.uint8)
    mask[5:25, 10:30] = 255
    mask[10:20, 30:45] = 255  # an asymmetric shape: a flip or rotation applied to one array only would show
    cutout = photo.Cutout(np.repeat(mask[..., None], 3, axis=2), mask)  # white inside the mask, black outside
    checked = 0
    for _ in range(40):
        image = np.zeros((160, 200, 3), np.float32)
        owner = np.full((160, 200), -1, np.int16)
        placed = photo._place(rng, image, owner, [], cutout)
        assert placed is not None
        win, solid = placed
        expected = np.zeros((160, 200), bool)
        expected[win] = solid
        painted = image.max(axis=2)  # alpha x the cut-out's jittered colour (at least 255 x 0.52 - 30) on black
        assert ((painted > 1) & ~expected).sum() <= 8 * expected.sum() ** 0.5 + 4  # outside: only the soft edge
        interior = cv2.erode(expected.astype(np.uint8), np.ones((5, 5), np.uint8), borderValue=0).astype(bool)  # past the soft edge
        assert (painted[interior] >= 0.45 * painted.max()).all()  # inside: the cut-out's white, not its black
        checked += int(interior.sum() > 20)
    assert checked >= 20  # most placements were big enough to have an interior


def test_boxes_are_the_visible_pixels_and_floors_hold() -> None:
    bank = photo.CutoutBank()
    rng = np.random.default_rng(1)
    image = np.full((240, 320, 3), 128, np.float32)
    owner = np.full((240, 320), -1, np.int16)
    areas: list[int] = []
    windows = []
    for k in range(12):
        cutouts = bank.objects[k % len(photo.CLASSES)]
        placed = photo._place(rng, image, owner, areas, cutouts[0])
        if placed:
            win, solid = placed
            assert solid.sum() >= photo.MIN_PIXELS
            owner[win][solid] = len(areas)
            areas.append(int(solid.sum()))
            windows.append(win)
    assert len(areas) >= 8 and (image != 128).any()
    occluded = 0
    for k, (bbox, area) in enumerate(visible_boxes(owner, windows)):
        ys, xs = np.nonzero(owner == k)
        assert bbox == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] and area == len(xs)
        assert area >= photo.MIN_VISIBLE * areas[k]
        occluded += area < areas[k]
    assert occluded >= 1  # the floor was exercised, not vacuous


def test_every_class_appears_and_our_strict_scan_accepts_it(dataset: Path) -> None:
    spec = load_data_spec(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(spec.train.annotations))
    assert len(gt.getImgIds()) == 80 and sorted(gt.getCatIds()) == list(range(1, 8))
    assert [c["name"] for c in gt.loadCats(gt.getCatIds())] == list(photo.CLASSES)
    assert all(gt.getAnnIds(catIds=[c]) for c in gt.getCatIds())
    coco = CocoDataset(spec.train, strict=True)
    assert coco.summary.images_used == 80 and coco.summary.boxes_dropped == 0 and coco.summary.boxes_clipped == 0
    data = json.loads(spec.train.annotations.read_text())
    for a in data["annotations"]:
        im = gt.imgs[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"] and 0 < a["area"] <= w * h


def test_stats_show_a_small_object_set(dataset: Path) -> None:
    train = load_stats(dataset.parent)["train"]
    assert train["images"] == 80 and train["crowd"] == 0
    assert train["coco_size_share"]["small"] > 0.4 and train["coco_size_share"]["medium"] > 0.2
    assert 3 <= train["objects_per_image"]["mean"] <= 8 and train["objects_per_image"]["max"] <= photo.MAX_OBJECTS


def test_cli_photo_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "synth", "profile=photo", f"out={tmp_path}", "n_train=3", "n_val=2"]) in (0, None)
    printed = capsys.readouterr().out
    assert "objects/image mean" in printed and printed.strip().endswith(str(tmp_path / "dataset.yaml"))
    assert len(CocoDataset(load_data_spec(tmp_path / "dataset.yaml").val)) == 2

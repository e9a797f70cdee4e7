"""The bundled-dataset generator: same seed same bytes, valid COCO, exact boxes, generated on first use."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

import detector.data.synthetic as synthetic
from detector.data.synthetic_common import Window
from detector.data.coco import CocoDataset
from detector.data.spec import load_data_spec
from detector.errors import DetectorError
from data_helpers import tree_bytes


def test_same_seed_same_bytes_whatever_the_process_count(tmp_path: Path) -> None:
    a = synthetic.generate_shapes_dataset(tmp_path / "a", seed=5, n_train=60, n_val=3, imgsz=96, workers=1)
    synthetic.generate_shapes_dataset(tmp_path / "b", seed=5, n_train=60, n_val=3, imgsz=96, workers=2)
    synthetic.generate_shapes_dataset(tmp_path / "c", seed=6, n_train=60, n_val=3, imgsz=96, workers=1)
    assert a == tmp_path / "a" / "dataset.yaml"
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    assert tree_bytes(tmp_path / "a") != tree_bytes(tmp_path / "c")
    assert not any(p.name.startswith(".") for p in (tmp_path / "a").iterdir())  # no temporary folders left


def test_output_is_valid_coco_with_exact_boxes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each written box is the tight box of its shape's visible pixels, recomputed from the owner map that
    render_image builds (recorded on its way into visible_boxes), over the whole image, not the shape's window."""
    owners: list[np.ndarray] = []
    real = synthetic.visible_boxes

    def recording(owner: np.ndarray, windows: list[Window]) -> list[tuple[list[int], int]]:
        owners.append(owner.copy())
        return real(owner, windows)

    monkeypatch.setattr(synthetic, "visible_boxes", recording)
    yaml_path = synthetic.generate_shapes_dataset(tmp_path, seed=0, n_train=80, n_val=4, imgsz=96, workers=1)
    spec = load_data_spec(yaml_path)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(spec.train.annotations))
    assert [c["name"] for c in gt.loadCats(gt.getCatIds())] == list(synthetic.CLASSES)
    sizes = {(im["width"], im["height"]) for im in gt.dataset["images"]}
    assert {(96, 72), (72, 96)} & sizes and any(w != h for w, h in sizes)  # non-square images
    empty = sum(not gt.getAnnIds(imgIds=[i]) for i in gt.getImgIds())
    assert 0 < empty < 12  # about 5%
    for ann in gt.dataset["annotations"]:
        x, y, w, h = ann["bbox"]
        im = gt.imgs[ann["image_id"]]
        assert x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"]
        assert 0 < ann["area"] <= w * h and min(w, h) >= 1
    assert len(owners) == 80 + 4  # one owner map an image, train first, in image order (workers=1)
    away = 0
    for image_id in sorted(gt.imgs):
        owner, im = owners[image_id - 1], gt.imgs[image_id]
        assert owner.shape == (im["height"], im["width"])
        anns = sorted(gt.imgToAnns[image_id], key=lambda a: a["id"])
        assert len(anns) == owner.max() + 1  # every placed shape keeps visible pixels and gets one box
        for k, ann in enumerate(anns):
            ys, xs = np.nonzero(owner == k)
            tight = [int(xs.min()), int(ys.min()), int(xs.max() + 1 - xs.min()), int(ys.max() + 1 - ys.min())]
            assert ann["bbox"] == tight and ann["area"] == len(xs), (image_id, k, ann, tight)
            away += int(tight[0] > 0 and tight[1] > 0)
    assert away > 50  # most shapes lie away from the top-left corner: a window's offset matters
    coco = CocoDataset(spec.train)
    assert coco.summary.images_used == 80 and coco.summary.boxes_dropped == 0 and coco.summary.boxes_clipped == 0
    assert set(coco.summary.instances) == set(synthetic.CLASSES)


@pytest.mark.parametrize("name", synthetic.CLASSES)
def test_shape_masks_are_where_the_geometry_says(name: str) -> None:
    center, radius = np.array([40.3, 30.7]), 15.0
    mask = synthetic.draw_mask((64, 80), name, center, radius, 0.0, 0.5) >= 128
    ys, xs = np.nonzero(mask)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    outline = np.concatenate(synthetic._polygon(name, radius)) if name not in ("circle", "ring") else None
    half = np.array([radius, radius]) if outline is None else np.abs(outline).max(axis=0)
    lo = center - (half if outline is None else -outline.min(axis=0))
    hi = center + (half if outline is None else outline.max(axis=0))
    # cv2's anti-aliased fill is ~0.6 px fatter than the geometry; boxes are taken from the drawn pixels anyway
    assert np.abs(box - np.concatenate([lo, hi])).max() <= 1.5, (name, box, lo, hi)
    if name == "ring":
        assert not mask[int(center[1]), int(center[0])]  # the hole


def test_colour_does_not_identify_the_class() -> None:
    hues: dict[int, list[int]] = {}
    for i in range(60):
        data, _, _, anns = synthetic.render_image((0, 0, i), 128)
        hsv = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2HSV)
        for a in anns:
            x, y, w, h = a["bbox"]
            if a["category_id"] != 6 and min(w, h) >= 8:  # a ring's centre is its hole
                hues.setdefault(a["category_id"], []).append(int(hsv[y + h // 2, x + w // 2, 0]))
    assert sorted(hues) == [1, 2, 3, 4, 5]
    for values in hues.values():  # each class comes in colours all around the hue circle
        assert len(set(np.array(values) // 30)) >= 5, values


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "mine.txt").write_text("keep me")
    with pytest.raises(DetectorError, match="was not written by `detector data synth`"):
        synthetic.generate_shapes_dataset(tmp_path, n_train=2, n_val=1, imgsz=64, workers=1)
    assert (tmp_path / "train" / "mine.txt").read_text() == "keep me"
    synthetic.generate_shapes_dataset(tmp_path / "x", n_train=2, n_val=1, imgsz=64, workers=1)
    synthetic.generate_shapes_dataset(tmp_path / "x", n_train=3, n_val=1, imgsz=64, workers=1)  # ours: replaced
    assert len(list((tmp_path / "x" / "train" / "images").iterdir())) == 3


def test_bundled_dataset_is_generated_on_first_use_only(tmp_path: Path, monkeypatch) -> None:
    repo = tmp_path / "repo"  # any working directory: a checkout or a user's folder
    (repo / "data").mkdir(parents=True)
    bundled = repo / "data" / "shapes.yaml"
    bundled.write_text(synthetic.BUNDLED_YAML_TEXT)
    monkeypatch.chdir(repo)
    calls = []
    real = synthetic.generate_shapes_dataset
    monkeypatch.setattr(
        synthetic, "generate_shapes_dataset", lambda out: calls.append(out) or real(out, n_train=3, n_val=2, imgsz=64, workers=1)
    )
    other = tmp_path / "other.yaml"
    other.write_text(bundled.read_text())
    synthetic.ensure_bundled_dataset(other)  # not the bundled YAML: left alone
    assert calls == [] and not (tmp_path / "shapes").exists()
    synthetic.ensure_bundled_dataset(bundled)
    assert calls == [repo / "data" / "shapes"]
    assert len(CocoDataset(load_data_spec(bundled).train)) == 3
    synthetic.ensure_bundled_dataset(bundled)
    assert len(calls) == 1
    empty = tmp_path / "empty"  # a folder without data/: the YAML is written too, then the images
    empty.mkdir()
    monkeypatch.chdir(empty)
    synthetic.ensure_bundled_dataset(Path("data/shapes.yaml"))
    assert (empty / "data" / "shapes.yaml").read_text() == synthetic.BUNDLED_YAML_TEXT and calls[-1] == empty / "data" / "shapes"

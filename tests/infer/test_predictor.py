"""Predictor: sources, letterboxed batches, boxes back in original pixels (a model that finds a white rectangle),
and `detector predict` on a folder with a corrupt image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detector.infer.predictor import Predictor, letterbox_batch, list_images, predict_source
from detector.errors import DetectorError
from infer_helpers import BrightBoxModel
from yolo_labels import read_label_file

RECT_XYXY = (50, 20, 150, 60)  # the white rectangle of `rect_image`, original pixels


def rect_image(width: int = 200, height: int = 90) -> np.ndarray:
    image = np.zeros((height, width, 3), np.uint8)
    x1, y1, x2, y2 = RECT_XYXY
    image[y1:y2, x1:x2] = 255
    return image


def write_checkpoint(path: Path, *, model_cfg: str = "yolo-c2f-n", names: tuple[str, ...] = ("circle", "square", "triangle")) -> Path:
    """An inference checkpoint of an untrained model (seeded), as the trainer would write it."""
    from detector.runtime.checkpoint import CHECKPOINT_KEYS, FORMAT_VERSION, save_checkpoint
    from detector.models.builder import build_model

    torch.manual_seed(0)
    model = build_model(model_cfg, nc=len(names))
    state = dict.fromkeys(CHECKPOINT_KEYS)
    state.update(
        format_version=FORMAT_VERSION, version="test", model_yaml=model.yaml, model=model.state_dict(), ema=None,
        epoch=0, train_state={}, rng={}, train_config={"data": ""}, names=list(names),
        category_ids=[1, 3, 7][: len(names)], imgsz=64, run_dir=str(path.parent),
    )
    save_checkpoint(path, state)
    return path


def test_list_images_file_folder_glob(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("b.jpg", "a.PNG", "sub/c.webp", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.PNG", "b.jpg", "c.webp"]
    assert [p.name for p in list_images(str(tmp_path / "*.jpg"))] == ["b.jpg"]
    assert [p.name for p in list_images(str(tmp_path / "**" / "*.webp"))] == ["c.webp"]
    assert list_images(tmp_path / "notes.txt") == [tmp_path / "notes.txt"]  # a file named directly is taken
    with pytest.raises(DetectorError, match="not found"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DetectorError, match="no images"):
        list_images(tmp_path / "empty")


def test_letterbox_batch_pads_to_the_smallest_stride_multiple() -> None:
    landscape = [np.zeros((90, 200, 3), np.uint8), np.zeros((50, 100, 3), np.uint8)]
    batch, ratios, pads = letterbox_batch(landscape, 128, 32)
    assert batch.shape == (2, 3, 64, 128) and batch.dtype == torch.uint8  # not padded to a square
    assert ratios == pytest.approx([0.64, 1.28])
    assert pads[0] == (0, 3)  # 90 * 0.64 = 57.6 -> 58 rows, centred in 64
    mixed, _, _ = letterbox_batch([landscape[0], np.zeros((200, 90, 3), np.uint8)], 128, 32)
    assert mixed.shape == (2, 3, 128, 128)


def test_boxes_land_in_original_pixels_on_a_non_square_image(tmp_path: Path) -> None:
    predictor = Predictor(BrightBoxModel(), imgsz=128, conf=0.25)
    small = rect_image()
    big = np.kron(small, np.ones((3, 3, 1), np.uint8))  # same scene at 600x270: a different ratio in one batch
    dets = predictor([small, big])
    assert dets[0].shape == (1, 6) and dets[1].shape == (1, 6)
    assert dets[0][0, :4].tolist() == pytest.approx(RECT_XYXY, abs=2.0)  # one letterboxed pixel is 1.56 px here
    assert dets[1][0, :4].tolist() == pytest.approx([3 * v for v in RECT_XYXY], abs=5.0)
    assert dets[0][0, 4].item() == pytest.approx(0.9 * 0.95) and dets[0][0, 5].item() == 1

    assert Predictor(BrightBoxModel(), imgsz=128, classes=[0])([small])[0].shape == (0, 6)
    with pytest.raises(DetectorError, match="classes"):
        Predictor(BrightBoxModel(), imgsz=128, classes=[5])

    Image.fromarray(small).save(tmp_path / "rect.png")
    results = predict_source(predictor, [tmp_path / "rect.png"], tmp_path / "out", names=["a", "b"], category_ids=[4, 9])
    assert results[0]["names"] == ["b"] and results[0]["category_ids"].tolist() == [9]
    (entry,) = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert entry["file_name"] == "rect.png" and (entry["width"], entry["height"]) == (200, 90)
    assert entry["category_id"] == 9 and entry["image_id"] == 0
    x1, y1, x2, y2 = RECT_XYXY
    assert entry["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=2.0)
    drawn = np.asarray(Image.open(tmp_path / "out" / "rect.png"))
    assert drawn.shape == small.shape and (drawn != small).any()  # same size, boxes drawn


def test_predict_folder_with_a_corrupt_image_writes_the_others_and_names_it(tmp_path: Path, capsys, caplog) -> None:
    from detector.api import Detector
    from detector.options import PredictOptions

    weights = write_checkpoint(tmp_path / "best.pt")
    source = tmp_path / "images"
    (source / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.jpg": (48, 80), "b.png": (70, 40), "sub/c.jpg": (64, 64)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(source / name)
    (source / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (source / "readme.txt").write_text("not an image")
    out = tmp_path / "runs"
    opts = PredictOptions(weights=str(weights), source=str(source), conf=0.0, max_det=5, project=str(out), name="run", batch=2, device="cpu")
    results = Detector.from_checkpoint(opts.weights, device=opts.device).predict(opts, save=True)  # as `detector predict`
    assert [Path(r["file"]).name for r in results] == ["a.jpg", "b.png", "c.jpg"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"{source / 'bad.jpg'}: unreadable image skipped (cannot identify image file)" in warnings  # the path once
    assert any("1 unreadable file(s) skipped" in w for w in warnings)
    run = out / "run"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(run / "predictions.json")
    assert {p.relative_to(run).as_posix() for p in run.rglob("*.*")} == {"a.jpg", "b.png", "sub/c.jpg", "predictions.json"}
    entries = json.loads((run / "predictions.json").read_text())
    assert {e["file_name"] for e in entries} == {"a.jpg", "b.png", "sub/c.jpg"}
    assert all(e["category_id"] in (1, 3, 7) and len(e["bbox"]) == 4 for e in entries)
    sizes = {e["file_name"]: (e["width"], e["height"]) for e in entries}
    assert sizes == {"a.jpg": (80, 48), "b.png": (40, 70), "sub/c.jpg": (64, 64)}


def test_save_txt_writes_yolo_labels_that_read_back_as_the_returned_boxes(tmp_path: Path) -> None:
    from detector.api import Detector
    weights = write_checkpoint(tmp_path / "best.pt")
    source = tmp_path / "images"
    (source / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = {"a.jpg": (48, 80), "sub/c.png": (64, 40)}
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(source / name)
    detector = Detector(weights, device="cpu")
    results = detector.predict(str(source), save=True, conf=0.0, max_det=5, save_txt=True, save_conf=True,
                               save_images=False, project=str(tmp_path / "runs"), name="run")
    labels = tmp_path / "runs" / "run" / "labels"
    assert sorted(p.relative_to(labels).as_posix() for p in labels.rglob("*")) == ["a.txt", "sub", "sub/c.txt"]
    for result, (name, (h, w)) in zip(results, sizes.items()):
        path = (labels / name).with_suffix(".txt")
        classes, xyxy = read_label_file(path, w, h)
        assert len(classes) == 5 and classes.tolist() == result["classes"].tolist()
        np.testing.assert_allclose(xyxy, result["boxes_xyxy"], atol=1e-4)  # 9 decimals of the normalised values
        scores = [float(row.split()[5]) for row in path.read_text().splitlines()]
        np.testing.assert_allclose(scores, result["scores"], atol=5e-6)

    detector.predict(str(source), save=True, conf=1.0, save_txt=True, project=str(tmp_path / "runs"), name="none")
    assert [p.read_text() for p in sorted((tmp_path / "runs" / "none" / "labels").rglob("*.txt"))] == ["", ""]


def test_agnostic_nms_keeps_one_box_where_two_classes_overlap() -> None:
    class TwoClassesOneObject(torch.nn.Module):
        nc = 2

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("stride", torch.tensor([8.0, 16.0, 32.0]))
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rows = torch.tensor([[64.0, 64.0, 40.0, 40.0, 0.9, 0.9, 0.1],  # class 0, score 0.81
                                 [66.0, 64.0, 40.0, 40.0, 0.9, 0.2, 0.8]])  # the same object as class 1, 0.72
            return rows.expand(len(x), 2, 7)

    image = np.zeros((128, 128, 3), np.uint8)
    per_class = Predictor(TwoClassesOneObject(), imgsz=128, conf=0.25)([image])[0]
    agnostic = Predictor(TwoClassesOneObject(), imgsz=128, conf=0.25, agnostic=True)([image])[0]
    assert per_class[:, 5].tolist() == [0, 1]
    assert agnostic[:, 5].tolist() == [0] and agnostic[0, 4].item() == pytest.approx(0.81)


def test_label_file_keys_are_refused_where_no_label_file_is_written(tmp_path: Path) -> None:
    from detector.api import Detector

    detector = Detector(write_checkpoint(tmp_path / "best.pt"), device="cpu")
    with pytest.raises(DetectorError, match="save_conf adds the score to save_txt's label rows"):
        detector.predict(rect_image(), save_conf=True)
    with pytest.raises(DetectorError, match="save_txt writes files per image; a video's boxes are in its .jsonl"):
        detector.predict(str(tmp_path / "clip.mp4"), save=True, save_txt=True)
    with pytest.raises(DetectorError, match="save_crop writes files per image; a video's boxes are in its .jsonl"):
        detector.predict(str(tmp_path / "clip.mp4"), save=True, save_crop=True)
    with pytest.raises(DetectorError, match="save_txt writes files: pass save=True"):
        detector.predict(rect_image(), save_txt=True)
    with pytest.raises(DetectorError, match="save_crop writes files: pass save=True"):
        detector.predict(rect_image(), save_crop=True)


def test_crop_boxes_round_outward_and_clip() -> None:
    from detector.infer.predictor import crop_boxes

    image = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    boxes = torch.tensor([[1.2, 2.5, 4.0, 6.0], [-3.0, 8.5, 20.0, 30.0], [3.0, 3.0, 3.0, 3.0]])
    inside, border, empty = crop_boxes(image, boxes)
    np.testing.assert_array_equal(inside, image[2:6, 1:4])
    np.testing.assert_array_equal(border, image[8:10, 0:12])
    assert empty.size == 0


def test_save_crop_writes_each_box_under_its_class(tmp_path: Path) -> None:
    from detector.infer.predictor import SavedFiles

    Image.fromarray(rect_image()).save(tmp_path / "rect.png")
    predictor = Predictor(BrightBoxModel(), imgsz=128, conf=0.25)
    (det,) = predictor([rect_image()])
    predict_source(predictor, [tmp_path / "rect.png"], tmp_path / "out", names=["a", "b/c"], category_ids=[4, 9],
                   saved=SavedFiles(images=False, crops=True))
    files = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.*"))
    assert files == ["crops/b_c/rect_0.png", "predictions.json"]  # a '/' in a class name makes no sub-folder
    x1, y1, x2, y2 = det[0, :4].tolist()
    crop = np.asarray(Image.open(tmp_path / "out" / "crops" / "b_c" / "rect_0.png"))
    assert crop.shape == (int(np.ceil(y2)) - int(y1), int(np.ceil(x2)) - int(x1), 3)
    assert (crop > 0).mean() > 0.8  # mostly the white rectangle, up to the letterbox's rounding at its edges


def test_symlinked_images_keep_their_own_names(tmp_path: Path) -> None:
    """Images listed through symlinks are drawn and named as listed: two links to one file are two outputs."""
    (tmp_path / "pool").mkdir()
    (tmp_path / "view").mkdir()
    Image.fromarray(rect_image()).save(tmp_path / "pool" / "target.png")
    for name in ("a.png", "b.png"):
        (tmp_path / "view" / name).symlink_to(tmp_path / "pool" / "target.png")
    predictor = Predictor(BrightBoxModel(), imgsz=128, conf=0.25)
    predict_source(predictor, list_images(tmp_path / "view"), tmp_path / "out", names=["a", "b"], category_ids=[4, 9])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png", "predictions.json"]
    entries = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [(e["image_id"], e["file_name"]) for e in entries] == [(0, "a.png"), (1, "b.png")]


def test_a_file_of_any_suffix_is_drawn_and_no_files_write_an_empty_json(tmp_path: Path) -> None:
    """A file named directly may have a suffix PIL cannot write (or none): its drawing is a PNG under its name."""
    for name in ("frame", "shot.dat", "scan.psd"):  # .psd: a format PIL reads but cannot write
        Image.fromarray(rect_image()).save(tmp_path / name, format="PNG")
    predictor = Predictor(BrightBoxModel(), imgsz=128, conf=0.25)
    results = predict_source(predictor, [tmp_path / "frame", tmp_path / "shot.dat", tmp_path / "scan.psd"], tmp_path / "out",
                             names=["a", "b"], category_ids=[4, 9])
    assert len(results) == 3
    for name in ("frame", "shot.dat", "scan.psd"):
        with Image.open(tmp_path / "out" / name) as drawn:
            assert drawn.format == "PNG" and drawn.size == (200, 90)
    assert predict_source(predictor, [], tmp_path / "none", names=["a", "b"], category_ids=[4, 9]) == []
    assert json.loads((tmp_path / "none" / "predictions.json").read_text()) == []


def test_save_true_refuses_an_unreadable_file_named_directly(tmp_path: Path) -> None:
    """As without save: a folder's unreadable files are skipped, a file named directly (or listed) is an error."""
    from detector.api import Detector

    detector = Detector(write_checkpoint(tmp_path / "best.pt"), device="cpu")
    (tmp_path / "images").mkdir()
    broken = tmp_path / "images" / "broken.jpg"
    broken.write_bytes(b"not an image")
    Image.fromarray(rect_image()).save(tmp_path / "images" / "ok.png")
    for source in (str(broken), [str(tmp_path / "images" / "ok.png"), str(broken)]):
        with pytest.raises(DetectorError, match="broken.jpg: cannot read image"):
            detector.predict(source, save=True, project=str(tmp_path / "runs"), conf=0.0)
    results = detector.predict(str(tmp_path / "images"), save=True, project=str(tmp_path / "runs"), conf=0.0)
    assert [Path(r["file"]).name for r in results] == ["ok.png"]


def test_draw_detections_takes_a_reversed_channel_view() -> None:
    """`bgr[..., ::-1]` (the usual BGR -> RGB) is a negative-stride view, which torch.from_numpy refuses."""
    from detector.infer.predictor import draw_detections

    image = rect_image()
    det = torch.tensor([[50.0, 20.0, 150.0, 60.0, 0.9, 1.0]])
    np.testing.assert_array_equal(draw_detections(image[..., ::-1], det, ["a", "b"]),
                                  draw_detections(np.ascontiguousarray(image[..., ::-1]), det, ["a", "b"]))


def test_a_double_star_glob_descends_any_number_of_folders(tmp_path: Path) -> None:
    """`**` in a glob source is recursive: it finds an image three folders down (a plain `*` matches one)."""
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.png").write_bytes(b"x")
    assert [p.name for p in list_images(str(tmp_path / "**" / "*.png"))] == ["deep.png"]


@pytest.mark.parametrize("array", [np.zeros((0, 5, 3), np.uint8), np.zeros((4, 4, 4), np.uint8),
                                   np.zeros((4, 4, 3), np.float32), np.zeros(12, np.uint8)])
def test_a_malformed_image_array_is_refused_naming_it(array: np.ndarray) -> None:
    """Only (H, W, 3) uint8 arrays of at least one pixel pass: empty, 4-channel, float and flat ones are errors."""
    from detector.infer.predictor import check_image_array

    with pytest.raises(DetectorError, match=r"images\[3\]: expected an \(H, W, 3\) uint8 RGB array"):
        check_image_array(array, "images[3]")


def test_a_gray_array_is_repeated_to_three_channels() -> None:
    """An (H, W) uint8 array is taken as gray: its one channel repeated to three."""
    from detector.infer.predictor import check_image_array

    gray = np.arange(6, dtype=np.uint8).reshape(2, 3)
    rgb = check_image_array(gray, "images[0]")
    assert rgb.shape == (2, 3, 3) and all((rgb[..., c] == gray).all() for c in range(3))


def test_imgsz_below_the_stride_and_classes_outside_the_model_are_refused() -> None:
    """imgsz must reach the largest stride (32); `classes` must be indices 0..nc-1 (nc = 2 here)."""
    with pytest.raises(DetectorError, match="imgsz must be at least the model stride 32, got 16"):
        Predictor(BrightBoxModel(), imgsz=16)
    assert Predictor(BrightBoxModel(), imgsz=32).imgsz == 32
    for bad in (2, -1):
        with pytest.raises(DetectorError, match=rf"classes: {bad} is not a class index of this model \(0..1\)"):
            Predictor(BrightBoxModel(), imgsz=64, classes=[0, bad])
    assert Predictor(BrightBoxModel(), imgsz=64, classes=[1, 0]).classes == [1, 0]


class OneBoxTwoClasses(torch.nn.Module):
    """One box at (32, 32, 16, 16) on a stride-32 grid, objectness 1, class scores 0.9 and 0.8; records its inputs."""

    nc = 2

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("stride", torch.tensor([32.0]))
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape[-2:]))
        return torch.tensor([[32.0, 32.0, 16.0, 16.0, 1.0, 0.9, 0.8]]).expand(len(x), 1, 7)


def test_each_box_is_kept_once_with_its_best_class() -> None:
    """Predictor rows are one per box, its best class (validation keeps one per class above conf)."""
    (det,) = Predictor(OneBoxTwoClasses(), imgsz=64, conf=0.25)([np.zeros((64, 64, 3), np.uint8)])
    assert det[:, 4:].tolist() == [[pytest.approx(0.9), 0.0]]


def test_augment_runs_the_three_test_time_passes() -> None:
    """augment=True runs the image through the three TTA passes; without it, one pass."""
    model = OneBoxTwoClasses()  # scales 1, 0.83, 0.67 of 128 px padded to stride 32: 128, 106 -> 128, 85 -> 96
    Predictor(model, imgsz=128, augment=True)([np.zeros((128, 128, 3), np.uint8)])
    assert model.sizes == [(128, 128), (128, 128), (96, 96)]
    model.sizes.clear()
    Predictor(model, imgsz=128)([np.zeros((128, 128, 3), np.uint8)])
    assert model.sizes == [(128, 128)]


def test_batches_hold_only_readable_images_and_skipped_files_are_listed(tmp_path: Path) -> None:
    """A batch whose files are all unreadable is not yielded (no empty forward); the skipped files are listed."""
    from detector.infer.predictor import iter_batches

    bad = [tmp_path / "bad1.jpg", tmp_path / "bad2.jpg"]
    for path in bad:
        path.write_bytes(b"not an image")
    Image.fromarray(rect_image()).save(tmp_path / "ok.png")
    skipped: list[str] = []
    batches = list(iter_batches([*bad, tmp_path / "ok.png"], 2, skip_unreadable=True, skipped=skipped))
    assert [b.files for b in batches] == [[str(tmp_path / "ok.png")]]
    assert skipped == [str(p) for p in bad]


def test_the_progress_bar_counts_files_skipped_after_the_last_readable_one(tmp_path: Path, capsys) -> None:
    """The bar ends at the file count when the last batches hold only unreadable files (3/3, not 1/3)."""
    Image.fromarray(rect_image()).save(tmp_path / "a.png")
    for name in ("b.jpg", "c.jpg"):
        (tmp_path / name).write_bytes(b"not an image")
    predictor = Predictor(BrightBoxModel(), imgsz=128)
    predict_source(predictor, list_images(tmp_path), tmp_path / "out", names=["a", "b"], category_ids=[1, 2], batch_size=1)
    assert "3/3" in capsys.readouterr().err


def test_the_skip_warning_names_five_files_and_counts_the_rest(tmp_path: Path, caplog) -> None:
    """The skip summary names the first five unreadable files and counts the rest ('and 2 more' of seven)."""
    (tmp_path / "in").mkdir()
    Image.fromarray(rect_image()).save(tmp_path / "in" / "ok.png")
    for i in range(7):
        (tmp_path / "in" / f"bad{i}.jpg").write_bytes(b"not an image")
    predictor = Predictor(BrightBoxModel(), imgsz=128)
    predict_source(predictor, list_images(tmp_path / "in"), tmp_path / "out", names=["a", "b"], category_ids=[1, 2])
    shown = ", ".join(str(tmp_path / "in" / f"bad{i}.jpg") for i in range(5))
    assert f"predict: 7 unreadable file(s) skipped: {shown} and 2 more" in caplog.text


def test_class_colours_are_distinct_golden_ratio_hues() -> None:
    """Class colours are HSV hues spaced by the golden ratio: 80 classes, 80 different colours."""
    from detector.infer.predictor import class_colour

    assert class_colour(0) == (242, 36, 36)  # hue 0, saturation 0.85, value 0.95: (0.95, 0.1425, 0.1425) * 255
    assert len({class_colour(i) for i in range(80)}) == 80


def test_labels_are_black_on_light_colours_and_white_on_dark_ones() -> None:
    """A label is black on a light class colour (sum past 380) and white on a dark one."""
    # class 2's colour (156, 242, 36) sums to 434: black text; class 0's (242, 36, 36) to 314: white text
    from detector.infer.predictor import draw_detections

    grey = np.full((1280, 1280, 3), 128, np.uint8)  # a 26 px font: solid strokes
    pixels = {c: draw_detections(grey, torch.tensor([[100.0, 100.0, 600.0, 600.0, 0.9, c]]), ["a", "b", "c"]).reshape(-1, 3)
              for c in (0, 2)}
    assert (pixels[2] == 0).all(1).any() and not (pixels[2] == 255).all(1).any()
    assert (pixels[0] == 255).all(1).any() and not (pixels[0] == 0).all(1).any()


def test_box_lines_are_one_pixel_per_320_of_the_long_side() -> None:
    """Box lines are round(long side / 320) px wide, inside the box: 4 px on a 1280 px image."""
    from detector.infer.predictor import class_colour, draw_detections

    drawn = draw_detections(np.zeros((1280, 1280, 3), np.uint8), torch.tensor([[100.0, 100.0, 600.0, 600.0, 0.9, 0.0]]), ["a"])
    edge = (drawn[400, 90:110] == class_colour(0)).all(1)
    assert np.flatnonzero(edge).tolist() == [10, 11, 12, 13]  # columns 100..103


def test_drawn_jpegs_are_saved_at_quality_95(tmp_path: Path) -> None:
    """Drawn JPEGs are written at quality 95."""
    # libjpeg scales its base luminance table (DC step 16) by 200 - 2 * 95 = 10 %: (16 * 10 + 50) // 100 = 2
    Image.fromarray(rect_image()).save(tmp_path / "rect.jpg", quality=100)
    predict_source(Predictor(BrightBoxModel(), imgsz=128), [tmp_path / "rect.jpg"], tmp_path / "out", names=["a", "b"],
                   category_ids=[1, 2])
    with Image.open(tmp_path / "out" / "rect.jpg") as drawn:
        assert drawn.quantization[0][0] == 2


def test_a_box_that_covers_no_pixel_writes_no_crop(tmp_path: Path) -> None:
    """A box that covers no pixel (0 px wide: x1 = x2 = 40) writes no crop file; the other box's is written."""
    from detector.infer.predictor import SavedFiles

    class TwoBoxes(OneBoxTwoClasses):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rows = torch.tensor([[32.0, 32.0, 16.0, 16.0, 1.0, 0.9, 0.1], [40.0, 40.0, 0.0, 8.0, 1.0, 0.8, 0.1]])
            return rows.expand(len(x), 2, 7)

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "img.png")
    predict_source(Predictor(TwoBoxes(), imgsz=64, iou=0.99), [tmp_path / "img.png"], tmp_path / "out", names=["a", "b"],
                   category_ids=[1, 2], saved=SavedFiles(images=False, crops=True))
    assert sorted(p.name for p in (tmp_path / "out" / "crops" / "a").iterdir()) == ["img_0.png"]

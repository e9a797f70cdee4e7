"""The Python API: `Detector` from a YAML or a checkpoint, predict on arrays and paths, errors that name the input,
and (slow) train one epoch -> val -> predict, with `detector predict` run as a subprocess on the trained weights."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detector import Detector
from detector.infer.metrics import COCO_KEYS
from detector.errors import DetectorError
from repo_paths import REPO_ROOT


RESULT_KEYS = {"boxes_xyxy", "scores", "classes", "category_ids", "names", "file"}


def write_checkpoint(path: Path, names: tuple[str, ...] = ("cat", "dog")) -> Path:
    """An inference checkpoint of an untrained, seeded yolo-c2f-n (the trainer's keys)."""
    from detector.runtime.checkpoint import CHECKPOINT_KEYS, FORMAT_VERSION, save_checkpoint
    from detector.models.builder import build_model

    torch.manual_seed(0)
    model = build_model("yolo-c2f-n", nc=len(names))
    state = dict.fromkeys(CHECKPOINT_KEYS)
    state.update(
        format_version=FORMAT_VERSION, version="test", model_yaml=model.yaml, model=model.state_dict(), ema=None,
        epoch=0, train_state={}, rng={}, train_config={"data": ""}, names=list(names), category_ids=[5, 9][: len(names)],
        imgsz=64, run_dir=str(path.parent),
    )
    save_checkpoint(path, state)
    return path


def test_detector_from_a_yaml_predicts_arrays() -> None:
    det = Detector("yolo-c2f-n", device="cpu")
    assert det.weights is None and det.model.nc == 80 and len(det.names) == 80
    image = np.random.default_rng(0).integers(0, 255, (50, 90, 3), dtype=np.uint8)
    (result,) = det.predict(image, conf=0.0, max_det=3, imgsz=64)
    assert set(result) == RESULT_KEYS and result["file"] is None
    k = len(result["scores"])
    assert 1 <= k <= 3
    assert result["boxes_xyxy"].shape == (k, 4) and result["boxes_xyxy"].dtype == np.float32
    assert result["classes"].dtype == np.int64 and len(result["names"]) == k
    assert (result["boxes_xyxy"] >= 0).all() and (result["boxes_xyxy"][:, [0, 2]] <= 90).all() and (result["boxes_xyxy"][:, [1, 3]] <= 50).all()
    assert len(det.predict(np.stack([image, image]), conf=0.0, imgsz=64)) == 2
    assert len(det.predict([image, image[:30]], conf=0.0, imgsz=64)) == 2
    with pytest.raises(DetectorError, match=r"images\[0\]: expected an \(H, W, 3\) uint8"):
        det.predict(image.astype(np.float32))
    assert "GFLOPs at 64x64" in det.info(imgsz=64)
    with pytest.raises(DetectorError, match="not found"):
        Detector("yolo-nope")


def test_detector_from_a_checkpoint(tmp_path: Path, caplog) -> None:
    det = Detector(write_checkpoint(tmp_path / "best.pt"), device="cpu")
    assert det.names == ["cat", "dog"] and det.category_ids == [5, 9] and det.imgsz == 64
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.full((40, 70, 3), 90, np.uint8)).save(folder / "ok.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING):
        results = det.predict(folder, conf=0.0)  # a folder: unreadable files are skipped, named in a warning
    assert [Path(r["file"]).name for r in results] == ["ok.png"]
    assert set(results[0]["category_ids"].tolist()) <= {5, 9} and set(results[0]["names"]) <= {"cat", "dog"}
    assert any("broken.jpg" in r.getMessage() for r in caplog.records)
    with pytest.raises(DetectorError, match="broken.jpg"):  # named directly: an error
        det.predict([folder / "ok.png", folder / "broken.jpg"])
    missing = Path("data.yaml").absolute()  # a run records (and names) its dataset by absolute path
    with pytest.raises(DetectorError, match=f"^{missing}: file not found"):  # a checkpoint's train() fine-tunes from it
        det.train(data="data.yaml", epochs=1)


def test_predict_expands_a_folder_or_glob_inside_a_list(tmp_path: Path, caplog) -> None:
    """A list may mix files, folders and globs (as Ultralytics' sources do): each is expanded in place; unreadable
    files of a folder are skipped with a warning, a file named in the list must read; save=True writes them all."""
    det = Detector(write_checkpoint(tmp_path / "best.pt"), device="cpu")
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, stems in ((first, ("a", "b")), (second, ("c", "d"))):
        folder.mkdir()
        for stem in stems:
            Image.fromarray(np.full((40, 70, 3), 90, np.uint8)).save(folder / f"{stem}.png")
    (first / "broken.jpg").write_bytes(b"not an image")
    lone = tmp_path / "lone.png"
    Image.fromarray(np.full((30, 30, 3), 10, np.uint8)).save(lone)
    with caplog.at_level(logging.WARNING):
        results = det.predict([lone, first, str(second / "*.png")], conf=0.0)
    assert [Path(r["file"]).name for r in results] == ["lone.png", "a.png", "b.png", "c.png", "d.png"]
    assert any("broken.jpg" in r.getMessage() for r in caplog.records)
    saved = det.predict([str(first), lone], save=True, project=str(tmp_path / "runs"), conf=0.0)
    assert [Path(r["file"]).name for r in saved] == ["a.png", "b.png", "lone.png"]
    rows = json.loads((tmp_path / "runs" / "exp" / "predictions.json").read_text())
    assert {row["file_name"] for row in rows} == {"first/a.png", "first/b.png", "lone.png"}
    with pytest.raises(DetectorError, match="broken.jpg"):  # named in the list itself: an error
        det.predict([first / "broken.jpg", second])
    with pytest.raises(DetectorError, match="no images"):
        det.predict([lone, _empty(tmp_path)])


def _empty(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


@pytest.mark.parametrize(("made_on", "trains_on"), [("cpu", "cpu"), ("", "")])
def test_train_runs_on_the_detectors_device(monkeypatch: pytest.MonkeyPatch, made_on: str, trains_on: str) -> None:
    """Detector(device="cpu").train() trained on the default device (CUDA when there is one); a call's device= wins."""
    from detector.train import trainer as trainer_module

    configs = []

    def capture(self, cfg) -> None:
        configs.append(cfg)
        raise KeyboardInterrupt  # stop before any training

    monkeypatch.setattr(trainer_module.Trainer, "__init__", capture)
    det = Detector("yolo-c2f-n", device=made_on)
    for overrides in ({}, {"device": "cpu"}):
        with pytest.raises(KeyboardInterrupt):
            det.train(data="unused.yaml", **overrides)
    assert [c.device for c in configs] == [trains_on, "cpu"]


@pytest.mark.slow
def test_train_one_epoch_then_val_and_predict(tmp_path: Path) -> None:
    from detector.data.synthetic import generate_shapes_dataset

    data = generate_shapes_dataset(tmp_path / "shapes", seed=0, n_train=16, n_val=8, imgsz=128)
    det = Detector("yolo-ca-n", device="cpu")
    metrics = det.train(data=data, epochs=1, imgsz=128, batch=8, workers=0, project=tmp_path / "runs", plots=False, autoanchor=False)
    assert set(COCO_KEYS) <= set(metrics)
    assert det.weights == tmp_path / "runs" / "exp" / "weights" / "best.pt" and det.run_dir == tmp_path / "runs" / "exp"
    assert det.model.nc == 6 and det.imgsz == 128 and len(det.names) == 6
    assert det.model_yaml is None and "best.pt" in repr(det)  # a second train() fine-tunes from it, not from the YAML

    val = det.val(batch=8, workers=0, project=str(tmp_path / "val"), plots=False)  # the training data by default
    assert set(COCO_KEYS) <= set(val) and all(isinstance(val[k], float) for k in COCO_KEYS)
    assert (tmp_path / "val" / "exp" / "metrics.json").exists()

    image = sorted((data.parent / "val" / "images").iterdir())[0]
    (result,) = det.predict(image, conf=0.001)
    assert result["file"] == str(image) and set(result) == RESULT_KEYS

    proc = subprocess.run(
        [sys.executable, "-m", "detector", "predict", f"weights={det.weights}", f"source={image.parent}", "conf=0.001",
         f"project={tmp_path / 'predict'}", "device=cpu"],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    predictions = tmp_path / "predict" / "exp" / "predictions.json"
    assert proc.stdout.strip().splitlines()[-1] == str(predictions)
    assert {e["file_name"] for e in json.loads(predictions.read_text())} <= {p.name for p in image.parent.iterdir()}


def _coco_split(root: Path, names: tuple[str, str]) -> Path:
    """Two 64 px images, one box of each category (ids 5 and 9, named `names` in the json)."""
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for k in range(2):
        Image.fromarray(np.full((64, 64, 3), 60 + 40 * k, np.uint8)).save(root / "images" / f"{k}.png")
        images.append({"id": k + 1, "file_name": f"{k}.png", "width": 64, "height": 64})
        annotations.append({"id": k + 1, "image_id": k + 1, "category_id": (5, 9)[k], "bbox": [8, 8, 30, 30], "area": 900, "iscrowd": 0})
    categories = [{"id": cid, "name": name} for cid, name in zip((5, 9), names)]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root


def test_options_built_by_hand_are_checked_as_the_command_line_checks_them(tmp_path: Path) -> None:
    """README shows `det.val(ValOptions(...))`: such an object was used unchecked (iou=nan scored, batch=0 divided by
    zero, conf=2 predicted nothing). It gets the keywords' checks; the keys it was given stay its own."""
    from detector.api import _options
    from detector.config import build_options, given_keys
    from detector.options import PredictOptions, ValOptions

    det = Detector(write_checkpoint(tmp_path / "best.pt"), device="cpu")
    cases = [(det.val, ValOptions(iou=float("nan")), r"^Detector.val\(\): 'iou' must be a finite number, got nan$"),
             (det.val, ValOptions(batch=0), r"^Detector.val\(\): 'batch' must be >= 1 and <= 4096, got 0$"),
             (det.predict, PredictOptions(source=str(tmp_path), conf=2.0), r"'conf' must be >= 0 and <= 1, got 2.0$"),
             (det.predict, PredictOptions(source=str(tmp_path), imgsz=33), r"'imgsz' must be .* a multiple of 32, got 33$")]
    for call, opts, message in cases:
        with pytest.raises(DetectorError, match=message):
            call(opts)
    with pytest.raises(TypeError, match=r"Detector.val\(\): expects a ValOptions, got PredictOptions"):
        det.val(PredictOptions())
    from_file = build_options(ValOptions, {"conf": 0.1}, "cfg.yaml:1")
    assert given_keys(_options(ValOptions, from_file, {}, "Detector.val()")) == {"conf"}


def test_api_arguments_of_the_wrong_kind_are_one_line_errors_not_tracebacks_or_ignored(tmp_path: Path) -> None:
    """Detector(123) and predict(1.5) were pathlib TypeErrors, predict(image, source=other) predicted the image and
    ignored source, save='no' saved (truthy), info(imgsz=33) failed inside the FLOP count."""
    from detector.models.builder import build_model

    for call in (lambda: Detector(123), lambda: Detector(None), lambda: Detector("")):
        with pytest.raises(DetectorError, match=r"^Detector\(\): model must be a model YAML, its name or a checkpoint path"):
            call()
    with pytest.raises(DetectorError, match=r"^model: expected a model YAML path, a name in configs/models or a dict, got 123$"):
        build_model(123)
    det = Detector(write_checkpoint(tmp_path / "best.pt"), device="cpu")
    image = np.zeros((64, 64, 3), np.uint8)
    cases = [(lambda: det.predict(1.5), r"images must be a path, .* got float 1\.5$"),
             (lambda: det.predict(True), r"images must be a path, .* got bool True$"),
             (lambda: det.predict([image, 3]), r"images must be a path, .* got int 3$"),
             (lambda: det.predict(image, source=str(tmp_path)), r"give the images or source=, not both$"),
             (lambda: det.predict(image, save="no"), r"'save' expects true or false, got 'no'$"),
             (lambda: det.info(imgsz=33), r"^Detector\.info\(\): 'imgsz' must be .* a multiple of 32, got 33$")]
    for call, message in cases:
        with pytest.raises(DetectorError, match=message):
            call()
    assert det.predict([]) == [] and len(det.predict([image, image])) == 2  # still accepted


def test_a_checkpoint_naming_more_classes_than_its_model_predicts_is_refused(tmp_path: Path) -> None:
    weights = write_checkpoint(tmp_path / "best.pt")  # a 2-class model
    state = torch.load(weights, weights_only=True)
    torch.save({**state, "names": ["cat", "dog", "cow"], "category_ids": [5, 9, 11]}, weights)
    with pytest.raises(DetectorError, match=r"best\.pt: checkpoint lists 3 class names for a model of 2 classes$"):
        Detector(weights, device="cpu")


def test_val_refuses_data_whose_names_sit_at_other_category_ids(tmp_path: Path) -> None:
    """The checkpoint's cat (id 5) and dog (id 9) swapped in the json: a relabelled table, scored silently near AP 0
    before; other names at the same ids are a rename, and score (the next test)."""
    split = _coco_split(tmp_path / "coco", ("dog", "cat"))
    data = tmp_path / "swapped.yaml"
    split_entry = f"{{images: {split / 'images'}, annotations: {split / 'instances.json'}}}"
    data.write_text(f"train: {split_entry}\nval: {split_entry}\n")
    det = Detector(write_checkpoint(tmp_path / "best.pt"), device="cpu")
    with pytest.raises(DetectorError, match=r"^val: .*best\.pt and .*instances\.json disagree: 'cat' is category id 5 "
                                            r"against 9 \(2 of 2 names at other ids\) \(another dataset or labelling"):
        det.val(data=str(data), imgsz=64, workers=0, plots=False, project=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_val_reports_the_names_of_the_data_yaml(tmp_path: Path) -> None:
    """A dataset YAML's `names:` overrides the json's category names (README, Your own COCO dataset): `detector
    val data=...` reports them in its per-class table, not the json's."""
    split = _coco_split(tmp_path / "coco", ("json_a", "json_b"))
    data = tmp_path / "mine.yaml"
    split_entry = f"{{images: {split / 'images'}, annotations: {split / 'instances.json'}}}"
    data.write_text(f"train: {split_entry}\nval: {split_entry}\nnames: [kitten, puppy]\n")
    det = Detector(write_checkpoint(tmp_path / "best.pt"), device="cpu")
    metrics = det.val(data=str(data), imgsz=64, workers=0, plots=False, project=str(tmp_path / "runs"))
    assert [c["name"] for c in metrics["per_class"]] == ["kitten", "puppy"]

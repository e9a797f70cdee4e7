"""Data that breaks after the scan or arrives in odd formats: RELIABILITY rows 2, 3, 5, 8, 13, 20, 21, 34 where the
tests under tests/data stop short (worker processes, the trainer and CLI paths, channel conversion, `download:`)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detector.cli import main
from detector.config import TrainConfig
from detector.data import coco as coco_module
from detector.data.coco import CocoDataset
from detector.data.loader import build_train_loader, build_val_loader
from detector.data.scan_cache import scans_cache_dir
from detector.data.spec import load_data_spec
from detector.errors import DetectorError
from detector.models.builder import build_model
from detector.train.trainer import train
from reliability_helpers import shut_down_workers
from repo_paths import REPO_ROOT
from tiny_run import TINY, make_config

NO_MOSAIC = replace(TrainConfig(), mosaic=0.0)


# ------------------------------------------------------------------------------------------ row 3


def test_image_deleted_after_the_scan_is_substituted_inside_workers(make_coco) -> None:
    split = make_coco()
    loader = build_train_loader(split, imgsz=64, batch_size=3, workers=2, hyp=NO_MOSAIC, seed=0)
    (split.images / "img002.jpg").unlink()
    batches = list(loader)  # the worker that meets the missing file decodes another index instead
    assert sum(len(b["images"]) for b in batches) == 6
    named = [f for b in batches for meta in b["meta"] for f in meta["unreadable"]]  # the main process learns of it
    assert named == [str(split.images / "img002.jpg")]


def test_image_corrupted_after_the_scan_is_a_one_line_error_from_a_worker_under_strict(make_coco) -> None:
    split = make_coco()
    loader = build_train_loader(split, imgsz=64, batch_size=3, workers=2, hyp=NO_MOSAIC, seed=0, strict=True)
    victim = split.images / "img004.jpg"
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(DetectorError) as info:
        list(loader)
    shut_down_workers(loader)
    message = str(info.value)
    assert message.startswith(f"cannot read image {victim} (changed since the scan?)") and "\n" not in message


@pytest.mark.parametrize("workers", [0, 2])
def test_a_dataset_gone_after_the_scan_stops_with_one_line_not_an_endless_search(make_coco, workers: int) -> None:
    """Every image deleted after the scan (a moved dataset): the substitutes run out after MAX_SUBSTITUTES in a row,
    in the main process or a worker, with one line naming the last file tried."""
    from detector.data.loader import MAX_SUBSTITUTES

    split = make_coco()
    loader = build_train_loader(split, imgsz=64, batch_size=3, workers=workers, hyp=NO_MOSAIC, seed=0, cache="")
    for image in split.images.iterdir():
        image.unlink()
    with pytest.raises(DetectorError) as info:
        next(iter(loader))
    shut_down_workers(loader)
    message = str(info.value)
    assert re.fullmatch(rf"{MAX_SUBSTITUTES} images in a row unreadable, last {re.escape(str(split.images))}/img00\d\.jpg; "
                        r"was the dataset moved\?", message)
    if workers == 0:  # (a worker's list stays in the worker)
        assert loader.dataset.failed_files and all(f.startswith(str(split.images)) for f in loader.dataset.failed_files)


# ------------------------------------------------------------------------------------------ rows 2 and 8 (what is named)


@pytest.mark.parametrize("content", [b"", b"not an image"])
def test_a_non_image_or_empty_file_is_named_in_the_summary_and_left_alone(make_coco, content: bytes) -> None:
    split = make_coco()
    victim = split.images / "img002.jpg"
    victim.write_bytes(content)
    ds = CocoDataset(split)
    (item,) = ds.summary.problems["unreadable image"]
    assert item.startswith(f"{victim} (image id 16") and str(victim) in str(ds.summary)
    assert victim.read_bytes() == content and ds.summary.images_used == 5


@pytest.mark.parametrize(("what", "kind", "first_id"), [("images", "image id", 10), ("annotations", "annotation id", 100),
                                                        ("categories", "category id", 1)])
def test_a_duplicate_id_names_its_kind_and_value(make_coco, what: str, kind: str, first_id: int) -> None:
    split = make_coco(mutate=lambda d: d[what].append(dict(d[what][0])))
    with pytest.raises(DetectorError) as info:
        CocoDataset(split)
    assert str(info.value) == f"{split.annotations}: duplicate {kind} {first_id}"


# ------------------------------------------------------------------------------------------ rows 5 and 20


def test_gray_rgba_16bit_reach_the_model_as_three_channels_and_tiny_images_are_skipped(make_coco) -> None:
    split = make_coco(ext="png")
    images = sorted(split.images.iterdir())
    pixels = np.asarray(Image.open(images[0]))
    Image.fromarray(pixels).convert("L").save(images[0])
    Image.fromarray(pixels).convert("RGBA").save(images[1])
    Image.fromarray(pixels[..., 1].astype(np.uint16) * 257).save(images[2])  # mode I;16
    Image.new("RGB", (8, 8)).save(images[3])
    assert Image.open(images[2]).mode == "I;16"
    ds = CocoDataset(split)
    assert ds.summary.problems["image under 10 px"] == [f"{images[3]} (8x8)"] and ds.summary.images_used == 5
    model = build_model("yolo-c2f-n", nc=3)  # ch: 3, as every bundled config
    for loader in (
        build_train_loader(split, imgsz=64, batch_size=5, workers=0, hyp=NO_MOSAIC, seed=0),
        build_val_loader(split, imgsz=64, batch_size=5, workers=0),
    ):
        batch = next(iter(loader))
        assert batch["images"].dtype == torch.uint8 and batch["images"].shape[:2] == (5, 3)
        gray = [i for i, m in enumerate(batch["meta"]) if m["file"] in (str(images[0]), str(images[2]))]
        assert len(gray) == 2
        for i in gray:  # converted by replicating the one channel
            assert torch.equal(batch["images"][i, 0], batch["images"][i, 1])
            assert torch.equal(batch["images"][i, 1], batch["images"][i, 2])
        model.eval()
        assert model(batch["images"].float() / 255).shape[0] == 5


def test_model_with_other_input_channels_is_refused_before_training(tiny_data: Path, tmp_path: Path) -> None:
    yaml_text = (REPO_ROOT / "configs/models/yolo-c2f-n.yaml").read_text()
    one_channel = tmp_path / "gray-model.yaml"
    one_channel.write_text("ch: 1\n" + yaml_text)
    with pytest.raises(DetectorError, match=r"takes ch=1 input channels, but training images are always loaded as 3-channel RGB"):
        train(make_config(tiny_data, tmp_path / "runs", model=str(one_channel), epochs="1"))
    assert not (tmp_path / "runs").exists()  # refused before training: no run folder


# ------------------------------------------------------------------------------------------ row 13 (CLI)


@pytest.mark.usefixtures("cli_logging")
def test_empty_train_set_is_one_line_from_the_cli_before_the_model(make_data_yaml, tmp_path: Path, capsys) -> None:
    data = make_data_yaml(mutate=lambda d: d.update(annotations=[]))
    args = [f"{k}={v}" for k, v in {**TINY, "data": str(data), "project": str(tmp_path / "runs"), "epochs": "1"}.items()]
    assert main(["train", *args]) == 2
    captured = capsys.readouterr()
    train_json = data.parent / "train" / "instances.json"
    assert captured.err.strip().splitlines() == [f"detector train: error: no labelled images in {train_json}"]
    assert "optimizer:" not in captured.out  # stopped before the model and optimizer were built
    assert not (tmp_path / "runs").exists()  # no run folder, not even an empty exp/weights


@pytest.mark.usefixtures("cli_logging")
@pytest.mark.parametrize("split", ["val", "val-images"])
def test_empty_val_set_is_one_line_from_the_cli_before_the_model(make_data_yaml, tmp_path: Path, capsys, split: str) -> None:
    """Row 13 for the val split: refused with the train split's scan, before a model, anchors or optimizer."""
    data = make_data_yaml()
    val_json = data.parent / "val" / "instances.json"
    coco = json.loads(val_json.read_text())
    coco.update(annotations=[], **({"images": []} if split == "val-images" else {}))
    val_json.write_text(json.dumps(coco))
    args = [f"{k}={v}" for k, v in {**TINY, "data": str(data), "project": str(tmp_path / "runs"), "epochs": "1"}.items()]
    assert main(["train", *args]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"detector train: error: no labelled images in {val_json}")
    assert "autoanchor" not in captured.out and "optimizer:" not in captured.out
    assert not (tmp_path / "runs").exists()


@pytest.mark.usefixtures("cli_logging")
@pytest.mark.parametrize("change", ["names moved", "ids shifted", "a category fewer"])
def test_a_val_split_whose_categories_disagree_is_one_line_before_the_model(make_data_yaml, tmp_path: Path, capsys,
                                                                           monkeypatch, change: str) -> None:
    """Every validation scores class c as the train split's c-th category id: a val json with other ids, or with
    the same names at other ids (a relabelled table), scored AP near 0 silently or failed after the first epoch.
    Refused before the val images are decoded for the RAM cache."""
    from detector.data.coco import CocoDataset

    decoded: list[Path] = []
    load_image = CocoDataset.load_image
    monkeypatch.setattr(CocoDataset, "load_image", lambda self, i: decoded.append(self.annotations) or load_image(self, i))
    data = make_data_yaml()  # categories 1 circle, 3 square, 7 triangle in both splits
    val_json = data.parent / "val" / "instances.json"
    coco = json.loads(val_json.read_text())
    if change == "names moved":
        coco["categories"] = [dict(c, name=n) for c, n in zip(coco["categories"], ["triangle", "square", "circle"])]
        expected = "'circle' is category id 1 against 7 (2 of 3 names at other ids)"
    elif change == "ids shifted":
        coco["categories"] = [dict(c, id=c["id"] + 100) for c in coco["categories"]]
        coco["annotations"] = [dict(a, category_id=a["category_id"] + 100) for a in coco["annotations"]]
        expected = "category ids [1, 3, 7] against [101, 103, 107]"
    else:
        coco["categories"] = coco["categories"][:2]
        coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] != 7]
        expected = "category ids [1, 3, 7] against [1, 3]"
    val_json.write_text(json.dumps(coco))
    args = [f"{k}={v}" for k, v in {**TINY, "data": str(data), "project": str(tmp_path / "runs"), "epochs": "1", "cache": "ram"}.items()]
    assert main(["train", *args]) == 2
    assert decoded and val_json not in decoded  # the train split's cache was filled, the refused val split's not
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        f"detector train: error: {val_json}: its categories disagree with the train split's "
        f"{data.parent / 'train' / 'instances.json'}: {expected}"]
    assert "autoanchor" not in captured.out and "optimizer:" not in captured.out
    assert not (tmp_path / "runs").exists()


def test_a_dataset_yamls_names_relabel_both_splits_alike_and_are_not_refused(make_data_yaml, tmp_path: Path) -> None:
    """`names:` in the dataset YAML renames the classes of both splits (README); the val check compared them with
    the train json's own names, and refused this documented rename as names moved to other ids."""
    from detector.train.trainer import Trainer
    from tiny_run import make_config

    data = make_data_yaml()  # json names circle, square, triangle at ids 1, 3, 7
    data.write_text(data.read_text() + "names: [triangle, square, circle]\n")
    trainer = Trainer(make_config(data, tmp_path / "runs", epochs="1"))
    try:
        trainer.build()
        assert trainer.names == trainer._val_loader.dataset.coco.names == ["triangle", "square", "circle"]
    finally:
        trainer.close()


@pytest.mark.usefixtures("cli_logging")
def test_a_strict_refusal_leaves_no_run_folder(make_data_yaml, tmp_path: Path, capsys) -> None:
    """E before training (here strict=true and an unknown category id) writes nothing: a later run is `exp`, not `exp2`."""
    data = make_data_yaml()
    train_json = data.parent / "train" / "instances.json"
    coco = json.loads(train_json.read_text())
    coco["annotations"][0]["category_id"] = 42
    train_json.write_text(json.dumps(coco))
    args = [f"{k}={v}" for k, v in {**TINY, "data": str(data), "project": str(tmp_path / "runs"), "epochs": "1"}.items()]
    assert main(["train", *args, "strict=true"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"detector train: error: {train_json}: unknown category id: annotation ") and "category_id 42" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.usefixtures("cli_logging")
def test_a_refusal_with_read_only_json_folders_leaves_no_run_folder(make_data_yaml, tmp_path: Path, capsys,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan cache of a json folder that cannot be written went into the run folder, which a run refused at
    set-up (here an empty val split) then left behind; it goes to the user's cache folder, where the next scan
    finds it."""
    import detector.data.coco_scan as coco_scan

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    data = make_data_yaml()
    val_json = data.parent / "val" / "instances.json"
    val_json.write_text(json.dumps({**json.loads(val_json.read_text()), "annotations": []}))
    for split in ("train", "val"):
        (data.parent / split / ".instances.json.scan-cache.npz").mkdir()  # beside the json: not writable, even as root
    args = [f"{k}={v}" for k, v in {**TINY, "data": str(data), "project": str(tmp_path / "runs"), "epochs": "1"}.items()]
    assert main(["train", *args]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"detector train: error: no labelled images in {val_json}")
    assert not (tmp_path / "runs").exists()
    assert len(list((tmp_path / "xdg" / "detector" / "scans").glob("instances-*.scan-cache.npz"))) == 2  # train, val
    monkeypatch.setattr(coco_scan, "read_json", lambda path: pytest.fail(f"{path} parsed again: no cache found"))
    assert len(CocoDataset(load_data_spec(data).train, cache_dir=scans_cache_dir())) == 6


# ------------------------------------------------------------------------------------------ rows 1 and 7, val split


def _break_val_split(data: Path) -> tuple[Path, Path]:
    """Cut the end off one val image and point one val annotation at an unknown category: (image, val json)."""
    val_json = data.parent / "val" / "instances.json"
    coco = json.loads(val_json.read_text())
    victim = data.parent / "val" / "images" / coco["images"][1]["file_name"]
    victim.write_bytes(victim.read_bytes()[:-100])
    coco["annotations"][-1]["category_id"] = 42
    val_json.write_text(json.dumps(coco))
    return victim, val_json


@pytest.mark.usefixtures("cli_logging")
def test_what_the_scans_skipped_is_named_by_train_and_val(make_data_yaml, untrained_checkpoint: Path, tmp_path: Path,
                                                            capsys) -> None:
    """A val image or box the scan leaves out changes the metric: `detector train` prints both splits' summaries and
    `detector val` the val split's, each naming every item left out."""
    data = make_data_yaml()
    victim, val_json = _break_val_split(data)
    train_victim = next((data.parent / "train" / "images").iterdir())
    train_victim.write_bytes(train_victim.read_bytes()[:-100])
    args = [f"{k}={v}" for k, v in {**TINY, "data": str(data), "project": str(tmp_path / "runs"), "epochs": "1"}.items()]
    assert main(["train", *args]) == 0
    trained = capsys.readouterr().out
    train_scan = trained[trained.index(f"scan of {data.parent / 'train' / 'instances.json'}"):trained.index(f"scan of {val_json}")]
    assert f"warning unreadable image: 1 ({train_victim}" in train_scan
    assert main(["val", f"weights={untrained_checkpoint}", f"data={data}", "imgsz=64", "workers=0", "plots=false",
                 f"project={tmp_path / 'val'}"]) == 0
    validated = capsys.readouterr().out
    for out in (trained, validated):
        scan = out[out.index(f"scan of {val_json}"):]
        assert f"warning unreadable image: 1 ({victim}" in scan
        assert "warning unknown category id: 1 (annotation " in scan and "category_id 42" in scan
        assert out.count(f"scan of {val_json}") == 1


# ------------------------------------------------------------------------------------------ row 21


def test_download_key_is_never_executed(make_data_yaml, tmp_path: Path, caplog) -> None:
    data = make_data_yaml()
    marker = tmp_path / "downloaded"
    script = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')"
    for download in (f"touch {marker}", f"python -c \"{script}\"", f"|\n  {script}\n"):
        data.write_text(data.read_text().split("download:")[0] + f"download: {download}\n")
        with caplog.at_level(logging.WARNING, logger="detector"):
            spec = load_data_spec(data)
        CocoDataset(spec.train)
        assert "'download' is ignored" in caplog.text
        caplog.clear()
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ row 34


def test_exception_in_a_worker_names_the_file(make_coco, monkeypatch) -> None:
    def broken(self, index):
        raise RuntimeError(f"decoder exploded on record {index}")

    monkeypatch.setattr(coco_module.CocoDataset, "load_image", broken)
    loader = build_train_loader(make_coco(), imgsz=64, batch_size=2, workers=2, hyp=TrainConfig(), seed=0)
    with pytest.raises(DetectorError) as info:
        next(iter(loader))
    shut_down_workers(loader)
    message = str(info.value)
    assert "\n" not in message and message.startswith("augmenting ") and ".jpg failed: RuntimeError: decoder exploded" in message


def test_dead_worker_is_a_one_line_error_not_a_hang(make_coco, monkeypatch) -> None:
    monkeypatch.setattr(coco_module.CocoDataset, "load_image", lambda self, index: os._exit(3))  # e.g. the OOM killer
    loader = build_train_loader(make_coco(), imgsz=64, batch_size=2, workers=2, hyp=TrainConfig(), seed=0)
    with pytest.raises(DetectorError, match=r"DataLoader worker \(pid\(s\) [\d, ]+\) exited unexpectedly \(.*\); workers=0 shows"):
        next(iter(loader))
    shut_down_workers(loader)


def _sigkill_in_a_worker(self, index):
    """What the kernel's OOM killer does to a worker: SIGKILL, no exception, no exit code of its own."""
    if torch.utils.data.get_worker_info() is not None:
        os.kill(os.getpid(), signal.SIGKILL)
    return REAL_LOAD_IMAGE(self, index)


REAL_LOAD_IMAGE = coco_module.CocoDataset.load_image


def test_a_worker_killed_by_sigkill_is_a_one_line_error(make_coco, monkeypatch) -> None:
    monkeypatch.setattr(coco_module.CocoDataset, "load_image", _sigkill_in_a_worker)
    loader = build_train_loader(make_coco(), imgsz=64, batch_size=2, workers=2, hyp=TrainConfig(), seed=0)
    with pytest.raises(DetectorError) as info:
        next(iter(loader))
    shut_down_workers(loader)
    message = str(info.value)
    assert re.match(r"DataLoader worker \(pid\(?s?\)? ?[\d, ]+\) (is killed by signal: Killed|exited unexpectedly)", message)
    assert "out of memory?" in message and "workers=0 shows the failing file" in message and "\n" not in message


@pytest.mark.usefixtures("cli_logging")
def test_a_worker_killed_by_sigkill_mid_run_is_one_line_from_the_cli(tiny_data: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """Row 34 as the OOM killer does it: torch's SIGCHLD handler raises wherever the main process is (here often
    while it sets up validation, the train workers already prefetching), not only inside the loader."""
    from detector.viz import logger as logger_module

    real_init, outside = logger_module.RunLogger.__init__, []

    def slow_init(self, *args, **kwargs):  # right after the val workers start (and die): a slow import, say
        try:
            time.sleep(10)
        except RuntimeError:  # torch's SIGCHLD handler, raising in whatever the main thread runs
            outside.append(True)
            raise
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(coco_module.CocoDataset, "load_image", _sigkill_in_a_worker)
    monkeypatch.setattr(logger_module.RunLogger, "__init__", slow_init)
    args = [f"{k}={v}" for k, v in {**TINY, "data": str(tiny_data), "project": str(tmp_path / "runs"), "epochs": "1",
                                    "workers": "2", "cache": ""}.items()]
    assert main(["train", *args]) == 2
    assert outside == [True]
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip() and not ln.startswith("epoch ")]
    assert len(lines) == 1 and lines[0].startswith("detector train: error: DataLoader worker (pid")
    assert "out of memory?" in lines[0] and lines[0].endswith("; workers=0 shows the failing file")

"""`detector data check` and `detector bench data` on datasets built by the test."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from detector.config import load_options
from detector.data.check import data_check
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

"""Where the scan cache of a json folder that cannot be written goes: the user's cache folder (`data/user_cache.py`),
or nowhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from detector.data.coco import CocoDataset
from detector.data.scan_cache import scans_cache_dir
from detector.data.user_cache import user_cache_dir


def test_the_user_cache_folder_follows_xdg_then_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert scans_cache_dir() == tmp_path / "xdg" / "detector" / "scans"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # not absolute: ignored, as the XDG spec asks
    assert user_cache_dir("yolo-coco") == tmp_path / "home" / ".cache" / "detector" / "yolo-coco"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert scans_cache_dir() == tmp_path / "home" / ".cache" / "detector" / "scans"

    def no_home(cls) -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", classmethod(no_home))
    assert scans_cache_dir() is None  # no cache beyond the json's folder, as with cache_dir=None


def test_an_unwritable_user_cache_folder_only_skips_the_cache(make_coco, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    split = make_coco()
    (split.annotations.parent / ".instances.json.scan-cache.npz").mkdir()  # beside the json: not writable, even as root
    (tmp_path / "home").write_text("a file, not a folder")  # no folder can be made under it, even as root
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
    for _ in range(2):  # no cache written, none read: scanned again, no error
        assert len(CocoDataset(split, cache_dir=scans_cache_dir())) == 6

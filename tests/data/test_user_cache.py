"""The user's cache folder is pruned: entries nobody used for `UNUSED_DAYS` days go when a new one is written, the
ones in use (their modification time refreshed on each use) stay."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from detector.data import user_cache
from detector.data.coco import CocoDataset
from detector.data.scan_cache import scans_cache_dir
from detector.data.user_cache import UNUSED_DAYS, mark_used, prune_unused

DAY = 86400.0


def _age(path: Path, days: float) -> Path:
    """Set path's modification time `days` days back (os.utime does not follow a link's target here)."""
    stamp = time.time() - days * DAY
    os.utime(path, (stamp, stamp), follow_symlinks=False)
    return path


def _file(path: Path, days: float) -> Path:
    """A small file last modified `days` days ago."""
    path.write_bytes(b"x")
    return _age(path, days)


def test_entries_unused_past_the_limit_go_and_the_rest_stay(tmp_path: Path) -> None:
    """Old files and folders matching the pattern go (a folder with what it holds); a young one, `keep` (however
    old), other names and a link (not its target) stay."""
    (tmp_path / "old-dir.npz").mkdir()
    (tmp_path / "old-dir.npz" / "inside.json").write_text("{}")
    _age(tmp_path / "old-dir.npz", UNUSED_DAYS + 1)
    _file(tmp_path / "old.npz", UNUSED_DAYS + 1)
    _file(tmp_path / "young.npz", UNUSED_DAYS - 1)
    _file(tmp_path / "mid.npz", 45)  # a month and a half: within the two months' limit
    _file(tmp_path / "kept.npz", 1000)
    _file(tmp_path / "other.txt", 1000)
    (tmp_path / "target").mkdir()
    (tmp_path / "link.npz").symlink_to(tmp_path / "target")
    _age(tmp_path / "link.npz", 1000)
    (tmp_path / "file-link.npz").symlink_to(tmp_path / "other.txt")  # a link to an old file stays too
    _age(tmp_path / "file-link.npz", 1000)
    removed = prune_unused(tmp_path, "*.npz", keep=tmp_path / "kept.npz")
    assert removed == [tmp_path / "old-dir.npz", tmp_path / "old.npz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file-link.npz", "kept.npz", "link.npz", "mid.npz", "other.txt",
                                                          "target", "young.npz"]


def test_an_entry_used_exactly_the_limit_ago_stays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only entries unused for more than UNUSED_DAYS days go."""
    now = 2_000_000_000.0
    monkeypatch.setattr(user_cache.time, "time", lambda: now)
    entry = tmp_path / "a.npz"
    entry.write_bytes(b"x")
    os.utime(entry, (now - UNUSED_DAYS * DAY, now - UNUSED_DAYS * DAY))
    assert prune_unused(tmp_path, "*.npz", keep=tmp_path / "b.npz") == [] and entry.exists()
    os.utime(entry, (now - UNUSED_DAYS * DAY - 1, now - UNUSED_DAYS * DAY - 1))
    assert prune_unused(tmp_path, "*.npz", keep=tmp_path / "b.npz") == [entry]


def test_marking_an_entry_used_makes_it_young_again(tmp_path: Path) -> None:
    """mark_used resets the clock of an old entry; a missing entry is no error."""
    entry = _file(tmp_path / "a.npz", UNUSED_DAYS + 5)
    mark_used(entry)
    mark_used(tmp_path / "gone.npz")
    assert time.time() - entry.stat().st_mtime < DAY
    assert prune_unused(tmp_path, "*.npz", keep=tmp_path / "b.npz") == []


def test_scans_in_the_user_cache_are_kept_while_used_and_pruned_after(make_coco, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only json's scan cache in the user's folder: reading it marks it used; writing a new one there removes
    a scan nobody read for UNUSED_DAYS days and a writer's temp file left that long."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    first, second = make_coco("one"), make_coco("two")
    for split in (first, second):
        (split.annotations.parent / ".instances.json.scan-cache.npz").mkdir()  # beside the json: not writable
    CocoDataset(first)
    folder = scans_cache_dir()
    (cache,) = folder.glob("instances-*.scan-cache.npz")
    _age(cache, UNUSED_DAYS + 1)
    CocoDataset(first)  # read from the cache: used again
    assert time.time() - cache.stat().st_mtime < DAY
    _age(cache, UNUSED_DAYS + 1)
    _file(folder / f"{cache.name}.host.123.tmp", UNUSED_DAYS + 1)
    CocoDataset(second)  # a new scan cache written there
    (new,) = folder.iterdir()
    assert new != cache and new.name.startswith("instances-") and new.name.endswith(".scan-cache.npz")

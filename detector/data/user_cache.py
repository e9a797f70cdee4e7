"""The user's cache folder for what the data tools cannot keep beside a read-only dataset: the scan cache of a
json whose folder cannot be written, and the COCO json converted from a YOLO-format dataset. Per user and outside
any run folder, so every run of such a dataset finds the last one's work, and a run refused at set-up leaves
nothing behind.

It holds one entry per dataset ever read, so it would only grow: each use of an entry sets its modification time
(`mark_used`), and each new entry written there removes the entries nobody used for `UNUSED_DAYS` days
(`prune_unused`), as a dataset deleted or moved leaves its entry unused for good."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path

LOGGER = logging.getLogger(__name__)
UNUSED_DAYS = 60.0


def user_cache_dir(name: str) -> Path | None:
    """`$XDG_CACHE_HOME/detector/<name>` (an absolute one, as the XDG spec asks), else `~/.cache/detector/<name>`;
    None without a home."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # no HOME and no passwd entry
            return None
    return Path(base) / "detector" / name


def mark_used(entry: Path) -> None:
    """Set an entry's modification time to now, so `prune_unused` keeps it; an entry that cannot be touched (a
    read-only or vanished one) is left as it is."""
    with contextlib.suppress(OSError):
        os.utime(entry)


def prune_unused(folder: Path, pattern: str, *, keep: Path, days: float = UNUSED_DAYS) -> list[Path]:
    """Remove the entries of `folder` matching `pattern` (files or folders) last used more than `days` days ago,
    except `keep`; returns those removed. What cannot be removed (another user's, one removed meanwhile) stays."""
    cutoff = time.time() - days * 86400
    removed = []
    for entry in sorted(folder.glob(pattern)):
        try:
            if entry == keep or entry.is_symlink() or entry.stat().st_mtime >= cutoff:
                continue
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        except OSError as err:
            LOGGER.debug("cache entry %s not pruned: %s", entry, err)
            continue
        removed.append(entry)
    if removed:
        LOGGER.info("%s: removed %d cache entr%s unused for %g days", folder, len(removed),
                    "y" if len(removed) == 1 else "ies", days)
    return removed

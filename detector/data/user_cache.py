"""The user's cache folder for what the data tools cannot keep beside a read-only dataset: the scan cache of a
json whose folder cannot be written, and the COCO json converted from a YOLO-format dataset. Per user and outside
any run folder, so every run of such a dataset finds the last one's work, and a run refused at set-up leaves
nothing behind."""

from __future__ import annotations

import os
from pathlib import Path


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

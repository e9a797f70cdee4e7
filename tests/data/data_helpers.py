"""Helpers shared by the data tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path


def tree_bytes(root: Path) -> dict[str, bytes]:
    """relative path -> bytes of every file under `root`: a generator's whole output, to compare two runs."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def coco_boxes(json_path: Path) -> dict[str, list[tuple[int, tuple[float, ...]]]]:
    """file name -> sorted (category id, xyxy) of its non-crowd boxes."""
    data = json.loads(json_path.read_text())
    names = {im["id"]: Path(im["file_name"]).name for im in data["images"]}
    out: dict[str, list] = {name: [] for name in names.values()}
    for ann in data["annotations"]:
        if not ann.get("iscrowd"):
            x, y, w, h = ann["bbox"]
            out[names[ann["image_id"]]].append((ann["category_id"], (x, y, x + w, y + h)))
    return {name: sorted(rows) for name, rows in out.items()}

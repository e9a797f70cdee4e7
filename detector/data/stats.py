"""Statistics of a COCO split straight from its json and image headers: what a benchmark set is made of
(objects per image, object sizes by sqrt(area), COCO's small/medium/large shares, crowds, negatives, image modes).

Read from the files rather than from the scan so it describes exactly what was written, crowds included; the
generators print it and `detector data check` can reuse it on any COCO split.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from detector.viz.tables import format_table

SQRT_AREA_BINS_PX = (0, 8, 16, 32, 64, 96, 128)  # last bin is open: >= 128
COCO_SMALL_PX2, COCO_LARGE_PX2 = 32**2, 96**2  # COCOeval's area ranges


def _size_histogram(areas: np.ndarray) -> dict[str, int]:
    """Counts per sqrt(area) bin, labelled '0-8' ... '128+'."""
    edges = SQRT_AREA_BINS_PX
    labels = [f"{lo}-{hi}" for lo, hi in zip(edges, edges[1:])] + [f"{edges[-1]}+"]
    counts = np.bincount(np.digitize(np.sqrt(areas), edges[1:]), minlength=len(edges))
    return {label: int(c) for label, c in zip(labels, counts)}


def split_stats(annotations: Path, images_dir: Path) -> dict[str, Any]:
    """Statistics of one split (a JSON-ready dict); `area` is the json's (visible pixels for our generators)."""
    coco = json.loads(Path(annotations).read_text())
    images, anns = coco["images"], coco["annotations"]
    normal = [a for a in anns if not a.get("iscrowd", 0)]
    per_image = Counter(a["image_id"] for a in normal)
    counts = np.array([per_image.get(im["id"], 0) for im in images], dtype=np.int64)
    with_any = {a["image_id"] for a in anns}
    areas = np.array([a["area"] for a in normal], dtype=np.float64)
    modes: Counter[str] = Counter()
    for im in images:
        with Image.open(Path(images_dir) / im["file_name"]) as f:  # header only, no decode
            modes[f"{f.format} {f.mode}"] += 1
    n = max(len(areas), 1)
    return {
        "images": len(images),
        "objects": int(counts.sum()),
        "objects_per_image": {"mean": float(counts.mean()) if len(counts) else 0.0,
                              "min": int(counts.min()) if len(counts) else 0, "max": int(counts.max(initial=0))},
        "sqrt_area_histogram": _size_histogram(areas),
        "coco_size_share": {
            "small": float((areas < COCO_SMALL_PX2).sum() / n),
            "medium": float(((areas >= COCO_SMALL_PX2) & (areas < COCO_LARGE_PX2)).sum() / n),
            "large": float((areas >= COCO_LARGE_PX2).sum() / n),
        },
        "crowd": sum(1 for a in anns if a.get("iscrowd", 0)),
        "negatives": sum(1 for im in images if im["id"] not in with_any),
        "image_sizes": {"min_side": min((min(im["width"], im["height"]) for im in images), default=0),
                        "max_side": max((max(im["width"], im["height"]) for im in images), default=0)},
        "image_modes": dict(sorted(modes.items())),
        "category_ids": [c["id"] for c in coco["categories"]],
    }


def format_stats(stats: dict[str, dict[str, Any]]) -> str:
    """One text table per aspect, a column per split (`stats` maps split name -> split_stats())."""
    splits = list(stats)
    rows: list[list[object]] = [
        ["images", *(stats[s]["images"] for s in splits)],
        ["objects", *(stats[s]["objects"] for s in splits)],
        *([f"objects/image {k}", *(stats[s]["objects_per_image"][k] for s in splits)] for k in ("mean", "min", "max")),
        ["crowd regions", *(stats[s]["crowd"] for s in splits)],
        ["negatives", *(stats[s]["negatives"] for s in splits)],
        ["shortest side px", *(stats[s]["image_sizes"]["min_side"] for s in splits)],
        ["longest side px", *(stats[s]["image_sizes"]["max_side"] for s in splits)],
        *([f"{k} share %", *(100 * stats[s]["coco_size_share"][k] for s in splits)] for k in ("small", "medium", "large")),
        *([f"sqrt(area) {b} px", *(stats[s]["sqrt_area_histogram"][b] for s in splits)]
          for b in stats[splits[0]]["sqrt_area_histogram"]),
    ]
    modes = sorted({m for s in splits for m in stats[s]["image_modes"]})
    rows += [[f"files {m}", *(stats[s]["image_modes"].get(m, 0) for s in splits)] for m in modes]
    return format_table(["", *splits], rows, floatfmt=".1f")

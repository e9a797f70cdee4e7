"""Reading a COCO instances json: bounded by the machine's memory before parsing, parsed with the cyclic GC
paused, and its structure checked where pycocotools silently trusts it (ids, types, duplicates, int64 range).
Every refusal names the file and the item."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from detector import memory
from detector.errors import DetectorError
from detector.memory import gib

LOGGER = logging.getLogger(__name__)
JSON_BYTES_PER_IMAGE = 1 << 20
JSON_SLACK_BYTES = 16 << 20
JSON_PARSE_FACTOR = 8
NUMBER_TYPES = frozenset((int, float))  # json.load's number types, checked exactly (bool is not a number here)


def check_json_size(path: Path, images_dir: Path) -> None:
    """Before parsing: refuse a JSON whose parsed objects cannot fit in memory (Python's objects take about
    `JSON_PARSE_FACTOR` x the text), and warn when it is far larger than its images could need (COCO's
    instances_train2017, polygons included, is 3.8 KB per image; `JSON_BYTES_PER_IMAGE` is 1 MiB)."""
    try:
        size = path.stat().st_size
        n_images = sum(1 for _ in os.scandir(images_dir)) if images_dir.is_dir() else 0
    except OSError:
        return  # `read_json` and the image scan name the file
    need, have = size * JSON_PARSE_FACTOR, memory.machine_memory_bytes()
    if need > have:
        raise DetectorError(f"{path}: {gib(size)} of JSON needs about {gib(need)} to parse, more than this machine's "
                            f"{gib(have)}; split it, or drop what training does not read (segmentation polygons)")
    if size > JSON_SLACK_BYTES + JSON_BYTES_PER_IMAGE * n_images:
        LOGGER.warning("%s: %s for %d entries in %s, far more than annotations need (parsing it takes about %s)",
                       path, gib(size), n_images, images_dir, gib(need))


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic GC off while millions of objects that form no cycles are made (json.load of a COCO file runs
    twice as fast), back on after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def read_json(path: Path) -> Any:
    """The parsed json; a missing, unreadable or malformed file is an error naming it (bad JSON with its line)."""
    try:
        with open(path, "rb") as f, gc_paused():
            return json.load(f)
    except FileNotFoundError:
        raise DetectorError(f"{path}: annotations file not found") from None
    except json.JSONDecodeError as err:
        raise DetectorError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    except RecursionError:  # '[' * 100000: deeper than the parser's stack, and than any COCO file
        raise DetectorError(f"{path}: invalid JSON (nested too deeply to be a COCO file)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DetectorError(f"{path}: cannot read ({err})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_coco(data: Any, path: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """Check the structure pycocotools silently trusts; return (images, categories, annotations)."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DetectorError(f"{path}: not a COCO instances file (no 'images' list)")
    if not isinstance(data.get("categories"), list) or not data["categories"]:
        raise DetectorError(f"{path}: no 'categories' list")
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        raise DetectorError(f"{path}: 'annotations' must be a list")
    images, categories = data["images"], data["categories"]
    if not images:
        raise DetectorError(f"no labelled images in {path} (its 'images' list is empty)")
    for i, im in enumerate(images):
        if not isinstance(im, dict) or not _is_int(im.get("id")) or not isinstance(im.get("file_name"), str):
            raise DetectorError(f"{path}: images[{i}] needs an integer 'id' and a 'file_name'")
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise DetectorError(f"{path}: categories[{i}] needs an integer 'id' and a string 'name'")
    # exact types, as json.load makes them (bool is not int here), checked inline: 544k annotations take 1 s
    for i, a in enumerate(anns):
        if not (isinstance(a, dict) and type(a.get("id")) is int and type(a.get("image_id")) is int
                and type(a.get("category_id")) is int):
            raise DetectorError(f"{path}: annotations[{i}] needs integer 'id', 'image_id' and 'category_id'")
        if not (_is_int(a.get("iscrowd", 0)) and a.get("iscrowd", 0) in (0, 1)):  # "0" would be truthy: a crowd box
            raise DetectorError(f"{path}: annotation {a['id']}: 'iscrowd' must be 0 or 1, got {a['iscrowd']!r}")
        bbox = a.get("bbox")
        if not (type(bbox) is list and len(bbox) == 4 and type(bbox[0]) in NUMBER_TYPES
                and type(bbox[1]) in NUMBER_TYPES and type(bbox[2]) in NUMBER_TYPES and type(bbox[3]) in NUMBER_TYPES):
            raise DetectorError(f"{path}: annotation {a['id']}: 'bbox' must be [x, y, width, height] numbers")
    for what, items in (("image id", images), ("category id", categories), ("annotation id", anns)):
        ids = np.array([x["id"] for x in items], dtype=np.int64)
        unique, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise DetectorError(f"{path}: duplicate {what} {unique[counts > 1][0]}")
    repeated = [name for name, count in Counter(im["file_name"] for im in images).items() if count > 1]
    if repeated:
        raise DetectorError(f"{path}: file_name '{repeated[0]}' is listed by two images")
    return images, categories, anns


def out_of_range(data: dict[str, Any], err: OverflowError) -> str:
    """The first id outside int64, or bbox/area number outside float64, of a parsed COCO dict (error path only)."""
    limit = 2**63
    for what, keys in (("images", ("id",)), ("categories", ("id",)), ("annotations", ("id", "image_id", "category_id"))):
        for i, item in enumerate(data.get(what) or []):
            for key in keys:
                if _is_int(item.get(key)) and not -limit <= item[key] < limit:
                    return f"{what}[{i}] '{key}' {item[key]} is outside the 64-bit integer range"
    for a in data.get("annotations") or []:
        for key, values in (("bbox", a.get("bbox") or []), ("area", [a.get("area", 0)])):
            if any(_is_int(v) and abs(v) > sys.float_info.max for v in values):
                return f"annotation {a['id']}: '{key}' holds a number outside the float64 range"
    return f"a number is out of range ({err})"



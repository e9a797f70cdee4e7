"""The scan of a COCO split: the json's images and annotations checked against each other and against the image
files, into flat per-image arrays and a `ScanSummary` of every problem found (named by file and id).

The first scan reads image headers only (never the pixels) in a process pool; the result and the per-image checks
are cached as arrays (`detector.data.scan_cache`) keyed by the json's and each image's size and mtime, so a re-scan
of an unchanged split parses no json, and one with changed images re-checks only those.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detector.data.coco_json import NUMBER_TYPES, check_json_size, gc_paused, out_of_range, parse_coco, read_json
from detector.data.image_files import inspect_many
from detector.data.scan_cache import (
    CACHE_VERSION,
    STATUS,
    cache_paths,
    load_cache,
    pack_strings,
    save_cache,
    unpack_strings,
)
from detector.errors import DetectorError

MIN_IMAGE_SIDE_PX = 10  # smaller images are skipped: nothing useful survives the stride-32 network
CLIP_TOLERANCE_PX = 1.0  # a box past the border by less than this is float rounding: clipped silently
MIN_BOX_SIDE_PX = 1.0  # boxes narrower or lower than this after clipping are dropped
NAMED_PER_KIND = 5  # problems named in the summary before "... and N more"

# Problem kinds in the order the scan finds them; the bool says whether strict=True makes it an error.
PROBLEMS: dict[str, bool] = {
    "missing image file": True,
    "unreadable image": True,
    f"image under {MIN_IMAGE_SIDE_PX} px": True,
    "annotation for a missing image id": True,
    "unknown category id": True,
    "annotation on a skipped image": False,  # already reported as the image's problem
    "non-finite bbox": True,
    "bbox of zero or negative size": True,
    "bbox outside the image": True,
    f"bbox under {MIN_BOX_SIDE_PX:g} px after clipping": True,
    f"bbox clipped to the image (past the border by > {CLIP_TOLERANCE_PX:g} px)": True,
    "json width/height differ from the file (the file's are used)": False,
}
_DROPPED_KINDS = (
    "annotation for a missing image id",
    "unknown category id",
    "annotation on a skipped image",
    "non-finite bbox",
    "bbox of zero or negative size",
    "bbox outside the image",
    f"bbox under {MIN_BOX_SIDE_PX:g} px after clipping",
)
_SKIPPED_IMAGE_KINDS = ("missing image file", "unreadable image", f"image under {MIN_IMAGE_SIDE_PX} px")


def named_few(items: list[str]) -> str:
    """The first NAMED_PER_KIND items, comma-separated, then "... and N more" when there are more."""
    more = f" ... and {len(items) - NAMED_PER_KIND:,} more" if len(items) > NAMED_PER_KIND else ""
    return ", ".join(items[:NAMED_PER_KIND]) + more


@dataclass
class ScanSummary:
    """Counts of what the scan found; `str()` is the one-screen report, `problems` names every item."""

    annotations: Path
    images_dir: Path
    images_listed: int = 0
    images_used: int = 0
    negatives: int = 0
    boxes_kept: int = 0
    crowd_kept: int = 0
    fraction: float = 1.0  # of the usable images kept (`CocoDataset(fraction=)`)
    images_usable: int = 0  # before `fraction`
    instances: dict[str, int] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=lambda: {kind: [] for kind in PROBLEMS})

    @property
    def images_skipped(self) -> int:
        return sum(len(self.problems[k]) for k in _SKIPPED_IMAGE_KINDS)

    @property
    def boxes_dropped(self) -> int:
        return sum(len(self.problems[k]) for k in _DROPPED_KINDS)

    @property
    def boxes_clipped(self) -> int:
        """Kept boxes, training and crowd, clipped by more than CLIP_TOLERANCE_PX."""
        return len(self.problems[f"bbox clipped to the image (past the border by > {CLIP_TOLERANCE_PX:g} px)"])

    def first_strict_error(self) -> str | None:
        """The first problem that `strict=True` refuses, as an error message naming the file and item."""
        for kind, strict in PROBLEMS.items():
            if strict and self.problems[kind]:
                return f"{self.annotations}: {kind}: {self.problems[kind][0]} (strict=true)"
        return None

    def __str__(self) -> str:
        share = f" (fraction={self.fraction:g} of {self.images_usable:,} usable)" if self.fraction < 1 else ""
        lines = [
            f"scan of {self.annotations} (images in {self.images_dir})",
            f"  images  {self.images_listed:,} listed, {self.images_used:,} used{share} "
            f"({self.negatives:,} negatives without boxes), {self.images_skipped:,} skipped",
            f"  boxes   {self.boxes_kept:,} kept, {self.crowd_kept:,} crowd (never trained on: ignore regions in scoring), "
            f"{self.boxes_clipped:,} of these clipped, {self.boxes_dropped:,} dropped",
        ]
        for kind, items in self.problems.items():
            if items:
                lines.append(f"  warning {kind}: {len(items):,} ({named_few(items)})")
        cells = [f"{name} {count:,}" for name, count in self.instances.items()]
        row: list[str] = []
        for cell in cells:
            if row and len("  ".join(row + [cell])) > 96:
                lines.append("  classes " + "  ".join(row))
                row = []
            row.append(cell)
        if row:
            lines.append("  classes " + "  ".join(row))
        return "\n".join(lines)


def scan(annotations: Path, images_dir: Path, cache_dir: Path | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(meta, arrays) of the split: from the cache when the json and every image it lists are unchanged (no json
    parse then), else scanned (the unchanged images' checks reused from the cache) and cached."""
    key = {"version": CACHE_VERSION, "annotations": list(_stat_key(annotations) or (0, 0)),
           "images_dir": str(images_dir.resolve())}
    paths = cache_paths(annotations, cache_dir)
    cached = load_cache(paths, key)
    listed: tuple[list[str], np.ndarray, dict[str, np.ndarray]] | None = None
    if cached is not None:
        meta, arrays = cached
        names = unpack_strings(arrays["listed_names"], arrays["listed_name_offsets"])
        stats = _stat_keys(images_dir, names)
        if meta.get("given") == str(images_dir) and np.array_equal(stats, arrays["listed_stat"]):
            return meta, arrays
        listed = names, stats, arrays
    with gc_paused():  # millions of json objects: a collection would walk them all, many times over
        meta, arrays = _scan_json(annotations, images_dir, listed)
    meta.update(key)
    save_cache(paths, meta, arrays)  # train and val of one json: the second split reads this, not the json
    return meta, arrays


def _scan_json(
    annotations: Path, images_dir: Path, listed: tuple[list[str], np.ndarray, dict[str, np.ndarray]] | None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Parse and check the json and its images (`listed`: the cache's names, their current stat keys and arrays,
    whose unchanged images are not inspected again); (meta, read-only arrays)."""
    check_json_size(annotations, images_dir)
    data = read_json(annotations)
    try:
        images, categories, anns = parse_coco(data, annotations)
        file_names = [im["file_name"] for im in images]
        if listed is not None and listed[0] == file_names:
            stats, reuse = listed[1], listed[2]
        else:
            stats, reuse = _stat_keys(images_dir, file_names), None
        checks = _check_images(file_names, stats, images_dir, reuse)
        problems: dict[str, list[str]] = {kind: [] for kind in PROBLEMS}
        table = _image_table(images, checks, images_dir, problems)
        categories = sorted(categories, key=lambda c: c["id"])
        category_ids = [c["id"] for c in categories]
        arrays = {**_listed_arrays(file_names, stats, checks),
                  **_result_arrays(images, anns, table, category_ids, problems)}
    except OverflowError as err:  # an integer beyond int64 / float64: name the item
        raise DetectorError(f"{annotations}: {out_of_range(data, err)}") from None
    for a in arrays.values():
        a.flags.writeable = False
    meta = {"given": str(images_dir), "images_listed": len(images), "problems": problems,
            "categories": categories}
    return meta, arrays


def _stat_keys(images_dir: Path, names: list[str]) -> np.ndarray:
    """(m, 2) int64 size and mtime (ns) of each file, (-1, -1) where it cannot be read."""
    base = os.fspath(images_dir)
    keys = []
    for name in names:
        try:
            st = os.stat(os.path.join(base, name))
            keys.append((st.st_size, st.st_mtime_ns))
        except (OSError, ValueError):  # ValueError: a NUL byte in the name
            keys.append((-1, -1))
    return np.array(keys, np.int64).reshape(-1, 2)


def _listed_arrays(names: list[str], stats: np.ndarray, checks: dict[str, Any]) -> dict[str, np.ndarray]:
    name_bytes, name_offsets = pack_strings(names)
    reason_bytes, reason_offsets = pack_strings(checks["reasons"])
    return {
        "listed_names": name_bytes, "listed_name_offsets": name_offsets, "listed_stat": stats,
        "listed_status": checks["status"], "listed_wh": checks["wh"], "listed_fast": checks["fast"],
        "listed_reasons": reason_bytes, "listed_reason_offsets": reason_offsets,
    }


def _result_arrays(
    images: list[dict], anns: list[dict], table: dict[str, np.ndarray], category_ids: list[int],
    problems: dict[str, list[str]],
) -> dict[str, np.ndarray]:
    """The arrays of RESULT_SCHEMA: usable images in json order, each one's boxes in annotation order."""
    checked = _check_annotations(anns, table, category_ids, problems)
    alive, img_idx = checked["alive"], checked["img_idx"]
    classes = np.searchsorted(np.array(category_ids, dtype=np.int64), checked["category_ids"]).astype(np.int64)
    area = _gt_area(anns, alive, checked["boxes"])
    usable = np.flatnonzero(table["usable"])
    position = np.cumsum(table["usable"]) - 1  # json image index -> index among the usable images
    names, name_offsets = pack_strings([images[i]["file_name"] for i in usable])
    out = {
        "image_id": table["ids"][usable], "hw": np.stack([table["heights"], table["widths"]], 1)[usable].astype(np.int64),
        "file_size": table["file_sizes"][usable], "fast": table["fast"][usable], "names": names, "name_offsets": name_offsets,
    }
    for prefix, boxes_key, chosen in (("box", "boxes", alive & ~checked["crowd"]), ("crowd", "crowd", alive & checked["crowd"])):
        index = np.flatnonzero(chosen)
        index = index[np.argsort(img_idx[index], kind="stable")]
        counts = np.bincount(position[img_idx[index]], minlength=len(usable))
        out[f"{prefix}_offsets"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        out[boxes_key] = checked["boxes"][index].reshape(-1, 4)
        out["classes" if prefix == "box" else "crowd_classes"] = classes[index]
        out[f"{prefix}_ann"] = checked["ann_ids"][index]
        out[f"{prefix}_area"] = area[index]
        out[f"{prefix}_order"] = index.astype(np.int64)
    return out


def _image_table(
    images: list[dict], checks: dict[str, Any], images_dir: Path, problems: dict[str, list[str]]
) -> dict[str, np.ndarray]:
    """Per json image: ids, widths, heights (after EXIF), usable, file_sizes, fast; image problems recorded."""
    n = len(images)
    table = {
        "ids": np.array([im["id"] for im in images], dtype=np.int64),
        "widths": np.zeros(n, np.float64),
        "heights": np.zeros(n, np.float64),
        "usable": np.zeros(n, bool),
        "file_sizes": np.zeros(n, np.int64),
        "fast": np.zeros(n, bool),
    }
    statuses, sizes, reasons = checks["status"].tolist(), checks["wh"].tolist(), checks["reasons"]
    for i, im in enumerate(images):
        status, (width, height), reason = STATUS[statuses[i]], sizes[i], reasons[i]
        if status == "ok" and min(width, height) >= MIN_IMAGE_SIDE_PX:
            table["usable"][i] = True
            table["widths"][i], table["heights"][i] = width, height
            json_size = (im.get("width"), im.get("height"))
            if json_size == (width, height) or json_size == (None, None):
                continue
        path = images_dir / im["file_name"]
        if status == "missing":
            problems["missing image file"].append(f"{path} (image id {im['id']})")
        elif status == "corrupt":
            problems["unreadable image"].append(f"{path} (image id {im['id']}: {reason})")
        elif min(width, height) < MIN_IMAGE_SIDE_PX:
            problems[f"image under {MIN_IMAGE_SIDE_PX} px"].append(f"{path} ({width}x{height})")
        else:
            problems["json width/height differ from the file (the file's are used)"].append(
                f"{path} (json {json_size[0]}x{json_size[1]}, file {width}x{height})"
            )
    table["file_sizes"] = np.where(table["usable"], checks["file_sizes"], 0)
    table["fast"] = table["usable"] & checks["fast"]
    return table


def _check_annotations(
    anns: list[dict], table: dict[str, np.ndarray], category_ids: list[int], problems: dict[str, list[str]]
) -> dict[str, np.ndarray]:
    """Vectorised box checks. Each annotation is dropped for the first problem it has (in PROBLEMS order) or kept
    (`alive`), boxes clipped to their image. Returns alive, boxes (n, 4) xyxy float32, img_idx, category_ids,
    ann_ids, crowd; problems recorded with the annotation ids."""
    n = len(anns)
    ann_ids = np.array([a["id"] for a in anns], dtype=np.int64)
    ann_image = np.array([a["image_id"] for a in anns], dtype=np.int64)
    ann_cat = np.array([a["category_id"] for a in anns], dtype=np.int64)
    xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(n, 4)
    crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)

    order = np.argsort(table["ids"], kind="stable")
    img_idx = order[np.clip(np.searchsorted(table["ids"][order], ann_image), 0, len(order) - 1)]
    W, H = table["widths"][img_idx], table["heights"][img_idx]
    with np.errstate(invalid="ignore"):
        x1, y1 = xywh[:, 0], xywh[:, 1]
        x2, y2 = x1 + xywh[:, 2], y1 + xywh[:, 3]
        overshoot = np.max(np.stack([-x1, -y1, x2 - W, y2 - H]), axis=0)
        clipped_xyxy = np.stack([np.clip(x1, 0, W), np.clip(y1, 0, H), np.clip(x2, 0, W), np.clip(y2, 0, H)], 1)
        clipped_wh = clipped_xyxy[:, 2:] - clipped_xyxy[:, :2]
        drops = [
            ("annotation for a missing image id", table["ids"][img_idx] != ann_image),
            ("unknown category id", ~np.isin(ann_cat, np.array(category_ids, dtype=np.int64))),
            ("annotation on a skipped image", ~table["usable"][img_idx]),
            ("non-finite bbox", ~np.isfinite(xywh).all(axis=1)),
            ("bbox of zero or negative size", (xywh[:, 2] <= 0) | (xywh[:, 3] <= 0)),
            ("bbox outside the image", (x2 <= 0) | (y2 <= 0) | (x1 >= W) | (y1 >= H)),
            (f"bbox under {MIN_BOX_SIDE_PX:g} px after clipping", (clipped_wh < MIN_BOX_SIDE_PX).any(axis=1)),
        ]
    alive = np.ones(n, bool)
    for kind, bad in drops:
        hit = alive & bad
        alive &= ~hit
        problems[kind].extend(_describe_annotations(kind, np.flatnonzero(hit), ann_ids, ann_image, ann_cat))
    clipped = np.flatnonzero(alive & (overshoot > CLIP_TOLERANCE_PX))
    problems[f"bbox clipped to the image (past the border by > {CLIP_TOLERANCE_PX:g} px)"].extend(
        f"annotation {ann_ids[i]} by {overshoot[i]:.1f} px" for i in clipped
    )
    return {
        "alive": alive,
        "boxes": clipped_xyxy.astype(np.float32).reshape(n, 4),
        "img_idx": img_idx,
        "category_ids": ann_cat,
        "ann_ids": ann_ids,
        "crowd": crowd,
    }


def _describe_annotations(
    kind: str, hits: np.ndarray, ann_ids: np.ndarray, ann_image: np.ndarray, ann_cat: np.ndarray
) -> list[str]:
    if kind == "annotation for a missing image id":
        return [f"annotation {ann_ids[i]} names image id {ann_image[i]}" for i in hits]
    if kind == "unknown category id":
        return [f"annotation {ann_ids[i]} has category_id {ann_cat[i]}" for i in hits]
    return [f"annotation {ann_ids[i]}" for i in hits]


def _gt_area(anns: list[dict], alive: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(n,) float64 COCOeval `area` of each kept annotation: the file's when a positive finite number, else the
    clipped box's w * h; NaN for dropped annotations."""
    nan = float("nan")
    given = [v if type(v) in NUMBER_TYPES else nan for v in (a.get("area") for a in anns)]  # json's exact types
    with np.errstate(invalid="ignore"):
        area = np.array(given, dtype=np.float64).reshape(-1)
        area[~(np.isfinite(area) & (area > 0))] = np.nan
    xyxy = boxes.astype(np.float64)
    computed = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
    return np.where(alive & np.isnan(area), computed, area)


def _stat_key(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _check_images(
    names: list[str], stats: np.ndarray, images_dir: Path, cached: dict[str, np.ndarray] | None
) -> dict[str, Any]:
    """Per listed image: status (int8 codes of scan_cache.STATUS), wh (m, 2) after EXIF, reasons, fast,
    file_sizes; from `cached` (the same names' earlier checks) where a file's size and mtime still match."""
    m = len(names)
    present = stats[:, 0] >= 0
    checks = {
        "status": np.where(present, 0, STATUS.index("missing")).astype(np.int8),
        "wh": np.zeros((m, 2), np.int64),
        "reasons": [""] * m,
        "fast": np.zeros(m, bool),
        "file_sizes": stats[:, 0].copy(),
    }
    reuse = np.zeros(m, bool)
    if cached is not None:
        reuse = present & (stats == cached["listed_stat"]).all(axis=1) & (cached["listed_status"] != STATUS.index("missing"))
        for key in ("status", "wh", "fast"):
            checks[key][reuse] = cached[f"listed_{key}"][reuse]
        reasons = unpack_strings(cached["listed_reasons"], cached["listed_reason_offsets"])
        for i in np.flatnonzero(reuse & (checks["status"] != 0)).tolist():
            checks["reasons"][i] = reasons[i]
    todo = np.flatnonzero(present & ~reuse).tolist()
    for i, (status, width, height, reason, fast) in zip(todo, inspect_many([images_dir / names[i] for i in todo], images_dir)):
        checks["status"][i] = STATUS.index(status)
        checks["wh"][i] = width, height
        checks["reasons"][i] = reason
        checks["fast"][i] = fast
    return checks

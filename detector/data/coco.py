"""A COCO instances json and its image folder, scanned once into validated per-image arrays.

What the scan checks that pycocotools does not: duplicate image or annotation ids (always an error), annotations
naming a missing image id or an unknown category, boxes that are non-finite, empty, outside the image or clipped,
and image files that are missing, undecodable (a truncated JPEG included) or tiny. Each problem is counted and
named in the one-screen `summary`; under `strict=True` the first one is an error naming the file and the id.

Frames: boxes in the json are taken to be in the *displayed* frame, after the EXIF orientation is applied (as
COCO tools and annotation tools assume). Image sizes are read with the orientation applied (tags 5-8 swap width
and height) and `load_image` returns the transposed pixels, so boxes and pixels agree. Boxes are stored as
float32 `[x1, y1, x2, y2]` in original pixels, pixel edges at integers (a box `[0, 0, w, h]` covers the image).

The scanned split is a few flat numpy arrays (no per-image Python objects, see `CocoDataset`), so forked data
workers share its pages. The first scan reads image headers only (never the pixels) in a process pool over the
machine's cores, with a progress bar on a terminal. The result and the per-image checks are cached as arrays in
one `.npz` (never pickle; `detector.data.scan_cache`) keyed by the json's and each image's size and mtime,
beside the json when that folder is writable, else under `cache_dir`: a re-scan of an unchanged split loads the
arrays and parses no json (train and val from one file parse it once), one with changed images re-checks those.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from detector import memory
from detector.data.image_files import inspect_many, read_rgb
from detector.data.scan_cache import (
    CACHE_VERSION,
    STATUS,
    cache_paths,
    load_cache,
    pack_strings,
    save_cache,
    string_at,
    unpack_strings,
)
from detector.errors import DetectorError
from detector.memory import gib

if TYPE_CHECKING:
    from pycocotools.coco import COCO

    from detector.data.spec import SplitSpec

LOGGER = logging.getLogger(__name__)
JSON_BYTES_PER_IMAGE = 1 << 20
JSON_SLACK_BYTES = 16 << 20
JSON_PARSE_FACTOR = 8

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


@dataclass(frozen=True)
class ImageRecord:
    """One usable image: size after EXIF, training boxes (n, 4) xyxy float32 with contiguous classes (n,) int64,
    and crowd boxes (k, 4) kept apart (never training targets)."""

    image_id: int
    file: Path
    width: int
    height: int
    boxes_xyxy: np.ndarray
    classes: np.ndarray
    crowd_xyxy: np.ndarray
    file_size: int = -1  # bytes at scan time; a file of another size is decoded by the careful path
    fast_decode: bool = False  # plain RGB/gray JPEG or PNG without EXIF rotation: cv2 may decode it


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
            f"  boxes   {self.boxes_kept:,} kept for training, {self.crowd_kept:,} crowd (evaluation only), "
            f"{self.boxes_clipped:,} of these clipped, {self.boxes_dropped:,} dropped",
        ]
        for kind, items in self.problems.items():
            if items:
                named = ", ".join(items[:NAMED_PER_KIND])
                more = f" ... and {len(items) - NAMED_PER_KIND:,} more" if len(items) > NAMED_PER_KIND else ""
                lines.append(f"  warning {kind}: {len(items):,} ({named}{more})")
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


def _unique_labels(names: list[str], category_ids: list[int]) -> list[str]:
    """The class names, a name that several categories share followed by each one's id ('car (id 3)')."""
    counts = Counter(names)
    return [f"{name} (id {cid})" if counts[name] > 1 else name for name, cid in zip(names, category_ids)]


class Records(Sequence[ImageRecord]):
    """`CocoDataset.records`: an `ImageRecord` per usable image, made when indexed (from the flat arrays), so the
    dataset holds no per-image Python objects."""

    def __init__(self, dataset: CocoDataset) -> None:
        self._dataset = dataset

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index: int) -> ImageRecord:  # type: ignore[override]
        if isinstance(index, slice):
            return [self._dataset.record(i) for i in range(len(self))[index]]  # type: ignore[return-value]
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"record {index} of {n}")
        return self._dataset.record(index % n)


class CocoDataset:
    """A scanned COCO split: per-image arrays, contiguous class index <-> original category id, names, summary.

    `names` overrides the category names (one per category, in category-id order). Class index i is the i-th
    smallest category id; `category_ids[i]` maps it back. `fraction` < 1 keeps that share of the usable images
    (`fraction_indices`); the categories stay all of the json's.

    Storage: a few flat, read-only numpy arrays (`detector.data.scan_cache.RESULT_SCHEMA`): image ids, sizes, file
    sizes, the file names as one string table, the training boxes and classes with per-image offsets, the crowd
    boxes likewise, and each box's annotation id, area and position in the json (for `coco_gt`). Forked data
    workers share these pages; no per-image Python object exists for their reference counts or the cyclic GC to
    write into. `records[i]` / `record(i)` builds an `ImageRecord` view when asked.
    """

    def __init__(
        self,
        split: SplitSpec,
        *,
        strict: bool = False,
        cache_dir: Path | None = None,
        names: Sequence[str] | None = None,
        fraction: float = 1.0,
    ) -> None:
        self.images_dir = Path(split.images)
        self.annotations = Path(split.annotations)
        self.strict = strict
        meta, self._arrays = _scan(self.annotations, self.images_dir, cache_dir)
        usable = len(self)
        if fraction != 1:
            self._arrays = _take_images(self._arrays, fraction_indices(usable, fraction))
        self._categories: list[dict[str, Any]] = meta["categories"]
        self.category_ids: list[int] = [int(c["id"]) for c in self._categories]
        self.names: list[str] = [str(c["name"]) for c in self._categories]
        if names is not None:
            if len(names) != len(self.names):
                raise DetectorError(
                    f"names: {len(names)} given but {self.annotations} has {len(self.names)} categories"
                )
            self.names = [str(n) for n in names]
        self.summary = self._summary(meta)
        self.summary.fraction, self.summary.images_usable = fraction, usable
        error = self.summary.first_strict_error()
        if strict and error:
            raise DetectorError(error)
        if len(self) == 0 or self.summary.boxes_kept == 0:
            kept = f" among the {len(self):,} images fraction={fraction:g} keeps" if fraction < 1 else ""
            raise DetectorError(f"no labelled images in {self.annotations}{kept}")

    def _summary(self, meta: dict[str, Any]) -> ScanSummary:
        a = self._arrays
        summary = ScanSummary(self.annotations, self.images_dir, images_listed=int(meta["images_listed"]))
        for kind in PROBLEMS:
            summary.problems[kind] = list(meta["problems"].get(kind, []))
        summary.images_used = len(self)
        summary.negatives = int((self.boxes_per_image() == 0).sum())
        summary.boxes_kept, summary.crowd_kept = len(a["boxes"]), len(a["crowd"])
        counts = np.bincount(a["classes"], minlength=self.num_classes)
        summary.instances = {name: int(c) for name, c in zip(_unique_labels(self.names, self.category_ids), counts)}
        return summary

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self._arrays["image_id"])

    # ------------------------------------------------------------------------------------ per image

    @property
    def records(self) -> Records:
        """Sequence of `ImageRecord`, one per usable image (built on access)."""
        return Records(self)

    def record(self, index: int) -> ImageRecord:
        """Image `index` as an `ImageRecord` (its arrays are copies: the dataset's stay untouched)."""
        a = self._arrays
        height, width = self.size_hw(index)
        return ImageRecord(
            image_id=self.image_id(index),
            file=self.file(index),
            width=width,
            height=height,
            boxes_xyxy=self.boxes(index).copy(),
            classes=self.classes(index).copy(),
            crowd_xyxy=self.crowd(index).copy(),
            file_size=int(a["file_size"][index]),
            fast_decode=bool(a["fast"][index]),
        )

    def image_id(self, index: int) -> int:
        return int(self._arrays["image_id"][index])

    def size_hw(self, index: int) -> tuple[int, int]:
        """(height, width) of image `index` after EXIF."""
        height, width = self._arrays["hw"][index].tolist()
        return height, width

    def file(self, index: int) -> Path:
        return self.images_dir / string_at(self._arrays["names"], self._arrays["name_offsets"], index)

    def boxes(self, index: int) -> np.ndarray:
        """(n, 4) float32 xyxy training boxes of image `index`, original pixels (a read-only view)."""
        offsets = self._arrays["box_offsets"]
        return self._arrays["boxes"][offsets[index] : offsets[index + 1]]

    def classes(self, index: int) -> np.ndarray:
        """(n,) int64 contiguous classes of image `index`'s training boxes (a read-only view)."""
        offsets = self._arrays["box_offsets"]
        return self._arrays["classes"][offsets[index] : offsets[index + 1]]

    def crowd(self, index: int) -> np.ndarray:
        """(k, 4) float32 xyxy crowd boxes of image `index` (evaluation only; a read-only view)."""
        offsets = self._arrays["crowd_offsets"]
        return self._arrays["crowd"][offsets[index] : offsets[index + 1]]

    # ------------------------------------------------------------------------------------ whole split

    @property
    def image_ids(self) -> np.ndarray:
        """(n,) int64 image ids (read-only)."""
        return self._arrays["image_id"]

    @property
    def image_hw(self) -> np.ndarray:
        """(n, 2) int64 height, width of each image after EXIF (read-only)."""
        return self._arrays["hw"]

    @property
    def train_boxes_xyxy(self) -> np.ndarray:
        """(N, 4) float32 every training box, image by image (`boxes_per_image` long runs; read-only)."""
        return self._arrays["boxes"]

    def boxes_per_image(self) -> np.ndarray:
        """(n,) int64 training boxes of each image."""
        return np.diff(self._arrays["box_offsets"])

    def load_image(self, index: int) -> np.ndarray:
        """Decode image `index` as (H, W, 3) uint8 RGB with EXIF applied; OSError/ValueError if unreadable.

        Files the scan found plain (see ImageRecord.fast_decode) and whose size is unchanged go through
        cv2.imdecode, about twice as fast as PIL here; everything else, and any cv2 failure, through `read_rgb`.
        """
        path = self.file(index)
        if self._arrays["fast"][index]:
            data = path.read_bytes()
            if len(data) == self._arrays["file_size"][index]:
                flags = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
                image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
                if image is not None and image.shape[:2] == self.size_hw(index):
                    return image
        return read_rgb(path)

    def train_box_wh(self, imgsz: int) -> np.ndarray:
        """(N, 2) float32 pixel width, height of every training box once its image's long side is `imgsz`
        (what the network sees before augmentation; used by auto-anchor)."""
        boxes = self._arrays["boxes"]
        if len(self) == 0:
            return np.zeros((0, 2), np.float32)
        scales = (imgsz / self._arrays["hw"].max(axis=1)).astype(np.float32)
        return ((boxes[:, 2:] - boxes[:, :2]) * np.repeat(scales, self.boxes_per_image())[:, None]).astype(np.float32)

    def coco_gt(self) -> COCO:
        """In-memory ground truth for COCOeval, built now from the arrays (call it in the process that scores):
        the usable images, their kept annotations in the json's order (crowd included, boxes clipped, original
        category ids, `area` from the file or w*h when absent) and all categories."""
        from pycocotools.coco import COCO

        dataset = {
            "images": self._gt_images(),
            "annotations": self._gt_annotations(),
            "categories": [{**c, "name": name} for c, name in zip(self._categories, self.names)],
        }
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
            coco = COCO()
            coco.dataset = dataset
            coco.createIndex()
        return coco

    def _gt_images(self) -> list[dict[str, Any]]:
        a = self._arrays
        names = unpack_strings(a["names"], a["name_offsets"])
        return [
            {"id": image_id, "file_name": (self.images_dir / name).name, "width": w, "height": h}
            for image_id, name, (h, w) in zip(a["image_id"].tolist(), names, a["hw"].tolist())
        ]

    def _gt_annotations(self) -> list[dict[str, Any]]:
        a = self._arrays
        image = np.concatenate([np.repeat(np.arange(len(self)), np.diff(a[f"{p}_offsets"])) for p in ("box", "crowd")])
        order = np.argsort(np.concatenate([a["box_order"], a["crowd_order"]]), kind="stable")
        xyxy = np.concatenate([a["boxes"], a["crowd"]]).astype(np.float64)[order]
        columns = {
            "id": np.concatenate([a["box_ann"], a["crowd_ann"]])[order].tolist(),
            "image_id": a["image_id"][image[order]].tolist(),
            "category_id": np.array(self.category_ids, np.int64)[np.concatenate([a["classes"], a["crowd_classes"]])][order].tolist(),
            "bbox": np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1).tolist(),
            "area": np.concatenate([a["box_area"], a["crowd_area"]])[order].tolist(),
            "iscrowd": np.repeat([0, 1], [len(a["boxes"]), len(a["crowd"])])[order].tolist(),
        }
        keys = list(columns)
        return [dict(zip(keys, row)) for row in zip(*columns.values())]


# ---------------------------------------------------------------------------------------------- a fraction

PER_IMAGE_KEYS = ("image_id", "hw", "file_size", "fast")
RUN_KEYS = {  # per-image offsets -> the arrays they cut into runs, one run per image
    "name_offsets": ("names",),
    "box_offsets": ("boxes", "classes", "box_ann", "box_area", "box_order"),
    "crowd_offsets": ("crowd", "crowd_classes", "crowd_ann", "crowd_area", "crowd_order"),
}


def fraction_indices(n: int, fraction: float) -> np.ndarray:
    """Which of n images `fraction` keeps: the first round(n * fraction) (at least one) of one fixed shuffle, in
    their json order. Fixed, so a run, its resume and every tune trial train on the same images; one shuffle, so a
    smaller fraction's images are among a larger one's; a shuffle, so a json sorted by source or class still gives
    a sample of all of it."""
    if not 0 < fraction <= 1:
        raise DetectorError(f"fraction must be > 0 and <= 1, got {fraction!r}")
    count = max(1, round(n * fraction)) if n else 0
    return np.sort(np.random.default_rng(0).permutation(n)[:count])


def _take_images(arrays: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    """The result arrays of images `keep` (sorted indices) only, read-only; the scan cache's listed_* arrays as
    they were."""
    taken = dict(arrays)
    for key in PER_IMAGE_KEYS:
        taken[key] = arrays[key][keep]
    for offsets_key, keys in RUN_KEYS.items():
        positions, taken[offsets_key] = _gather_runs(arrays[offsets_key], keep)
        for key in keys:
            taken[key] = arrays[key][positions]
    for a in taken.values():
        a.flags.writeable = False
    return taken


def _gather_runs(offsets: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions of runs `keep`'s items, in order; the kept runs' offsets), run i being items
    offsets[i]:offsets[i + 1], with no Python loop over the runs."""
    starts = offsets[keep]
    lengths = offsets[keep + 1] - starts
    new_offsets = np.zeros(len(keep) + 1, np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    positions = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
    return positions, new_offsets


# ---------------------------------------------------------------------------------------------- the scan


def _scan(annotations: Path, images_dir: Path, cache_dir: Path | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
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
    with _gc_paused():  # millions of json objects: a collection would walk them all, many times over
        meta, arrays = _scan_json(annotations, images_dir, listed)
    meta.update(key)
    save_cache(paths, meta, arrays)  # train and val of one json: the second split reads this, not the json
    return meta, arrays


def _scan_json(
    annotations: Path, images_dir: Path, listed: tuple[list[str], np.ndarray, dict[str, np.ndarray]] | None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Parse and check the json and its images (`listed`: the cache's names, their current stat keys and arrays,
    whose unchanged images are not inspected again); (meta, read-only arrays)."""
    _check_json_size(annotations, images_dir)
    data = _read_json(annotations)
    try:
        images, categories, anns = _parse_coco(data, annotations)
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
        raise DetectorError(f"{annotations}: {_out_of_range(data, err)}") from None
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
    given = [v if type(v) in _NUMBER_TYPES else nan for v in (a.get("area") for a in anns)]  # json's exact types
    with np.errstate(invalid="ignore"):
        area = np.array(given, dtype=np.float64).reshape(-1)
        area[~(np.isfinite(area) & (area > 0))] = np.nan
    xyxy = boxes.astype(np.float64)
    computed = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
    return np.where(alive & np.isnan(area), computed, area)


# ---------------------------------------------------------------------------------------------- json


def _check_json_size(path: Path, images_dir: Path) -> None:
    """Before parsing: refuse a JSON whose parsed objects cannot fit in memory (Python's objects take about
    `JSON_PARSE_FACTOR` x the text), and warn when it is far larger than its images could need (COCO's
    instances_train2017, polygons included, is 3.8 KB per image; `JSON_BYTES_PER_IMAGE` is 1 MiB)."""
    try:
        size = path.stat().st_size
        n_images = sum(1 for _ in os.scandir(images_dir)) if images_dir.is_dir() else 0
    except OSError:
        return  # `_read_json` and the image scan name the file
    need, have = size * JSON_PARSE_FACTOR, memory.machine_memory_bytes()
    if need > have:
        raise DetectorError(f"{path}: {gib(size)} of JSON needs about {gib(need)} to parse, more than this machine's "
                            f"{gib(have)}; split it, or drop what training does not read (segmentation polygons)")
    if size > JSON_SLACK_BYTES + JSON_BYTES_PER_IMAGE * n_images:
        LOGGER.warning("%s: %s for %d entries in %s, far more than annotations need (parsing it takes about %s)",
                       path, gib(size), n_images, images_dir, gib(need))


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic GC off while millions of objects that form no cycles are made (json.load of a COCO file runs
    twice as fast), back on after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read_json(path: Path) -> Any:
    try:
        with open(path, "rb") as f, _gc_paused():
            return json.load(f)
    except FileNotFoundError:
        raise DetectorError(f"{path}: annotations file not found") from None
    except json.JSONDecodeError as err:
        raise DetectorError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DetectorError(f"{path}: cannot read ({err})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_NUMBER_TYPES = frozenset((int, float))


def _parse_coco(data: Any, path: Path) -> tuple[list[dict], list[dict], list[dict]]:
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
        if a.get("iscrowd", 0) not in (0, 1):  # "0" would be truthy: a crowd box, silently no training target
            raise DetectorError(f"{path}: annotation {a['id']}: 'iscrowd' must be 0 or 1, got {a['iscrowd']!r}")
        bbox = a.get("bbox")
        if not (type(bbox) is list and len(bbox) == 4 and type(bbox[0]) in _NUMBER_TYPES
                and type(bbox[1]) in _NUMBER_TYPES and type(bbox[2]) in _NUMBER_TYPES and type(bbox[3]) in _NUMBER_TYPES):
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


def _out_of_range(data: dict[str, Any], err: OverflowError) -> str:
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

"""A COCO instances json and its image folder, scanned once into validated per-image records.

What the scan checks that pycocotools does not: duplicate image or annotation ids (always an error), annotations
naming a missing image id or an unknown category, boxes that are non-finite, empty, outside the image or clipped,
and image files that are missing, undecodable (a truncated JPEG included) or tiny. Each problem is counted and
named in the one-screen `summary`; under `strict=True` the first one is an error naming the file and the id.

Frames: boxes in the json are taken to be in the *displayed* frame, after the EXIF orientation is applied (as
COCO tools and annotation tools assume). Image sizes are read with the orientation applied (tags 5-8 swap width
and height) and `load_image` returns the transposed pixels, so boxes and pixels agree. Boxes are stored as
float32 `[x1, y1, x2, y2]` in original pixels, pixel edges at integers (a box `[0, 0, w, h]` covers the image).

Re-scans are fast: the per-image checks are cached in a JSON file (never pickle) keyed by the json's and each
image's size and mtime, beside the json when that folder is writable, else under `cache_dir`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from PIL import Image, ImageOps

from detector import memory
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
CACHE_VERSION = 1
EXIF_ORIENTATION = 0x0112
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
        return len(self.problems[f"bbox clipped to the image (past the border by > {CLIP_TOLERANCE_PX:g} px)"])

    def first_strict_error(self) -> str | None:
        """The first problem that `strict=True` refuses, as an error message naming the file and item."""
        for kind, strict in PROBLEMS.items():
            if strict and self.problems[kind]:
                return f"{self.annotations}: {kind}: {self.problems[kind][0]} (strict=true)"
        return None

    def __str__(self) -> str:
        lines = [
            f"scan of {self.annotations} (images in {self.images_dir})",
            f"  images  {self.images_listed:,} listed, {self.images_used:,} used "
            f"({self.negatives:,} negatives without boxes), {self.images_skipped:,} skipped",
            f"  boxes   {self.boxes_kept:,} kept for training ({self.boxes_clipped:,} clipped), "
            f"{self.crowd_kept:,} crowd (evaluation only), {self.boxes_dropped:,} dropped",
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


class CocoDataset:
    """A scanned COCO split: `records`, contiguous class index <-> original category id, names, summary.

    `names` overrides the category names (one per category, in category-id order). Class index i is the i-th
    smallest category id; `category_ids[i]` maps it back.
    """

    def __init__(
        self,
        split: SplitSpec,
        *,
        strict: bool = False,
        cache_dir: Path | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        self.images_dir = Path(split.images)
        self.annotations = Path(split.annotations)
        self.strict = strict
        _check_json_size(self.annotations, self.images_dir)
        data = _read_json(self.annotations)
        images, categories, anns = _parse_coco(data, self.annotations)
        self.category_ids: list[int] = sorted(c["id"] for c in categories)
        by_id = {c["id"]: c for c in categories}
        self._categories = [by_id[i] for i in self.category_ids]
        self.names: list[str] = [str(c["name"]) for c in self._categories]
        if names is not None:
            if len(names) != len(self.names):
                raise DetectorError(
                    f"names: {len(names)} given but {self.annotations} has {len(self.names)} categories"
                )
            self.names = [str(n) for n in names]
        self.summary = ScanSummary(self.annotations, self.images_dir, images_listed=len(images))
        checks = _check_images(images, self.images_dir, self.annotations, cache_dir)
        self.records: list[ImageRecord] = []
        self._gt_annotations: list[dict[str, Any]] = []
        self._build(images, anns, checks)
        error = self.summary.first_strict_error()
        if strict and error:
            raise DetectorError(error)
        if not self.records or self.summary.boxes_kept == 0:
            raise DetectorError(f"no labelled images in {self.annotations}")

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def image_hw(self) -> np.ndarray:
        """(n, 2) int64 height, width of each record after EXIF."""
        return np.array([(r.height, r.width) for r in self.records], dtype=np.int64).reshape(-1, 2)

    def load_image(self, index: int) -> np.ndarray:
        """Decode record `index` as (H, W, 3) uint8 RGB with EXIF applied; OSError/ValueError if unreadable.

        Files the scan found plain (see ImageRecord.fast_decode) and whose size is unchanged go through
        cv2.imdecode, about twice as fast as PIL here; everything else, and any cv2 failure, through `read_rgb`.
        """
        record = self.records[index]
        if record.fast_decode:
            data = record.file.read_bytes()
            if len(data) == record.file_size:
                flags = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
                image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
                if image is not None and image.shape[:2] == (record.height, record.width):
                    return image
        return read_rgb(record.file)

    def train_box_wh(self, imgsz: int) -> np.ndarray:
        """(N, 2) float32 pixel width, height of every training box once its image's long side is `imgsz`
        (what the network sees before augmentation; used by auto-anchor)."""
        if not self.records:
            return np.zeros((0, 2), np.float32)
        scales = np.array([imgsz / max(r.width, r.height) for r in self.records], np.float32)
        counts = np.array([len(r.boxes_xyxy) for r in self.records])
        boxes = np.concatenate([r.boxes_xyxy for r in self.records]).reshape(-1, 4)
        return ((boxes[:, 2:] - boxes[:, :2]) * np.repeat(scales, counts)[:, None]).astype(np.float32)

    def coco_gt(self) -> COCO:
        """In-memory ground truth for COCOeval: the usable images, their kept annotations (crowd included,
        boxes clipped, original category ids, `area` from the file or w*h when absent) and all categories."""
        from pycocotools.coco import COCO

        dataset = {
            "images": [
                {"id": r.image_id, "file_name": r.file.name, "width": r.width, "height": r.height}
                for r in self.records
            ],
            "annotations": [dict(a) for a in self._gt_annotations],
            "categories": [
                {**c, "name": name} for c, name in zip(self._categories, self.names)
            ],
        }
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
            coco = COCO()
            coco.dataset = dataset
            coco.createIndex()
        return coco

    # ------------------------------------------------------------------------------------------ the scan

    def _build(self, images: list[dict], anns: list[dict], checks: dict[str, tuple]) -> None:
        if not images:
            return
        table = _image_table(images, checks, self.images_dir, self.summary.problems)
        checked = _check_annotations(anns, table, self.category_ids, self.summary.problems)
        alive, boxes, img_idx = checked["alive"], checked["boxes"], checked["img_idx"]
        classes = np.searchsorted(np.array(self.category_ids, dtype=np.int64), checked["category_ids"])
        train, crowd = alive & ~checked["crowd"], alive & checked["crowd"]
        self._gt_annotations = _gt_annotations(anns, np.flatnonzero(alive), boxes)
        per_image_train = _group(np.flatnonzero(train), img_idx, len(images))
        per_image_crowd = _group(np.flatnonzero(crowd), img_idx, len(images))
        for i in np.flatnonzero(table["usable"]):
            t, c = per_image_train[i], per_image_crowd[i]
            self.records.append(
                ImageRecord(
                    image_id=int(table["ids"][i]),
                    file=self.images_dir / images[i]["file_name"],
                    width=int(table["widths"][i]),
                    height=int(table["heights"][i]),
                    boxes_xyxy=boxes[t],
                    classes=classes[t].astype(np.int64),
                    crowd_xyxy=boxes[c],
                    file_size=int(table["file_sizes"][i]),
                    fast_decode=bool(table["fast"][i]),
                )
            )
        s = self.summary
        s.images_used = len(self.records)
        s.negatives = sum(len(r.boxes_xyxy) == 0 for r in self.records)
        s.boxes_kept = int(train.sum())
        s.crowd_kept = int(crowd.sum())
        counts = np.bincount(classes[train], minlength=self.num_classes)
        s.instances = {name: int(c) for name, c in zip(self.names, counts)}


def _image_table(
    images: list[dict], checks: dict[str, tuple], images_dir: Path, problems: dict[str, list[str]]
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
    for i, im in enumerate(images):
        status, width, height, reason, table["file_sizes"][i], table["fast"][i] = checks[im["file_name"]]
        path = images_dir / im["file_name"]
        if status == "missing":
            problems["missing image file"].append(f"{path} (image id {im['id']})")
        elif status == "corrupt":
            problems["unreadable image"].append(f"{path} (image id {im['id']}: {reason})")
        elif min(width, height) < MIN_IMAGE_SIDE_PX:
            problems[f"image under {MIN_IMAGE_SIDE_PX} px"].append(f"{path} ({width}x{height})")
        else:
            table["usable"][i] = True
            table["widths"][i], table["heights"][i] = width, height
            json_size = (im.get("width"), im.get("height"))
            if json_size != (None, None) and json_size != (width, height):
                problems["json width/height differ from the file (the file's are used)"].append(
                    f"{path} (json {json_size[0]}x{json_size[1]}, file {width}x{height})"
                )
    return table


def _check_annotations(
    anns: list[dict], table: dict[str, np.ndarray], category_ids: list[int], problems: dict[str, list[str]]
) -> dict[str, np.ndarray]:
    """Vectorised box checks. Each annotation is dropped for the first problem it has (in PROBLEMS order) or kept
    (`alive`), boxes clipped to their image. Returns alive, boxes (n, 4) xyxy float32, img_idx, category_ids,
    crowd; problems recorded with the annotation ids."""
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
        "crowd": crowd,
    }


def _group(ann_index: np.ndarray, img_idx: np.ndarray, n_img: int) -> list[np.ndarray]:
    """Split annotation indices by their image index: list of n_img index arrays (annotation order kept)."""
    order = ann_index[np.argsort(img_idx[ann_index], kind="stable")]
    counts = np.bincount(img_idx[ann_index], minlength=n_img)
    return np.split(order, np.cumsum(counts)[:-1])


def _describe_annotations(
    kind: str, hits: np.ndarray, ann_ids: np.ndarray, ann_image: np.ndarray, ann_cat: np.ndarray
) -> list[str]:
    if kind == "annotation for a missing image id":
        return [f"annotation {ann_ids[i]} names image id {ann_image[i]}" for i in hits]
    if kind == "unknown category id":
        return [f"annotation {ann_ids[i]} has category_id {ann_cat[i]}" for i in hits]
    return [f"annotation {ann_ids[i]}" for i in hits]


def _gt_annotations(anns: list[dict], kept: np.ndarray, boxes: np.ndarray) -> list[dict[str, Any]]:
    out = []
    for i in kept:
        a = anns[i]
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        w, h = x2 - x1, y2 - y1
        area = a.get("area")
        if not isinstance(area, (int, float)) or isinstance(area, bool) or not np.isfinite(area) or area <= 0:
            area = w * h
        out.append(
            {
                "id": a["id"],
                "image_id": a["image_id"],
                "category_id": a["category_id"],
                "bbox": [x1, y1, w, h],
                "area": float(area),
                "iscrowd": int(bool(a.get("iscrowd", 0))),
            }
        )
    return out


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


def _read_json(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DetectorError(f"{path}: annotations file not found") from None
    except json.JSONDecodeError as err:
        raise DetectorError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DetectorError(f"{path}: cannot read ({err})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
    for i, im in enumerate(images):
        if not isinstance(im, dict) or not _is_int(im.get("id")) or not isinstance(im.get("file_name"), str):
            raise DetectorError(f"{path}: images[{i}] needs an integer 'id' and a 'file_name'")
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or "name" not in cat:
            raise DetectorError(f"{path}: categories[{i}] needs an integer 'id' and a 'name'")
    for i, a in enumerate(anns):
        if not isinstance(a, dict) or not all(_is_int(a.get(k)) for k in ("id", "image_id", "category_id")):
            raise DetectorError(f"{path}: annotations[{i}] needs integer 'id', 'image_id' and 'category_id'")
        bbox = a.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
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


# -------------------------------------------------------------------------------------- image checks


def read_rgb(path: Path) -> np.ndarray:
    """Decode an image file as (H, W, 3) uint8 RGB, EXIF orientation applied; gray, palette, RGBA, CMYK and
    16-bit images are converted (16-bit scaled to 8 bits). Raises OSError/ValueError when undecodable."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            wide = np.asarray(im, dtype=np.int64) if im.mode == "I" else np.asarray(im).astype(np.int64)
            gray = np.clip(wide, 0, 65535) // 257 if wide.max(initial=0) > 255 else np.clip(wide, 0, 255)
            return np.repeat(gray.astype(np.uint8)[:, :, None], 3, axis=2)
        if im.mode == "F":
            gray = np.clip(np.asarray(im), 0, 255).astype(np.uint8)
            return np.repeat(gray[:, :, None], 3, axis=2)
        if im.mode != "RGB":
            im = im.convert("RGB")
        return np.asarray(im)


def inspect_image(path: Path) -> tuple[str, int, int, str, bool]:
    """(status, width, height, reason, fast_decode); status is ok or corrupt; size after EXIF orientation.

    `verify()` checks the container; a full decode (JPEGs at 1/8 scale through libjpeg's DCT scaling, which still
    reads every byte of entropy-coded data) catches a truncated file. The file is never modified.
    """
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            width, height = im.size
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
            if orientation in (5, 6, 7, 8):
                width, height = height, width
            fast = im.format in ("JPEG", "PNG") and im.mode in ("RGB", "L") and orientation == 1
            if im.format == "JPEG":
                im.draft(None, (max(im.size[0] // 8, 1), max(im.size[1] // 8, 1)))
            im.load()
    except Exception as err:  # any decoder failure (OSError, SyntaxError, struct.error, bombs ...) = corrupt
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return "corrupt", 0, 0, reason, False
    return "ok", width, height, "", fast


def _stat_key(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _cache_paths(annotations: Path, cache_dir: Path | None) -> list[Path]:
    paths = [annotations.parent / f".{annotations.name}.scan-cache.json"]
    if cache_dir is not None:
        digest = hashlib.sha1(str(annotations.resolve()).encode()).hexdigest()[:12]
        paths.append(Path(cache_dir) / f"{annotations.stem}-{digest}.scan-cache.json")
    return paths


def _load_cache(paths: list[Path], json_key: list[int], images_dir: Path) -> dict[str, list]:
    """Per-image entries of the first valid cache; a stale, foreign or unreadable cache counts as none."""
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (
            isinstance(data, dict)
            and data.get("version") == CACHE_VERSION
            and data.get("annotations") == json_key
            and data.get("images_dir") == str(images_dir.resolve())
            and isinstance(data.get("images"), dict)
        ):
            return data["images"]
    return {}


def _save_cache(paths: list[Path], payload: dict) -> None:
    """Write atomically (temp file + os.replace) to the first writable candidate; no cache is not an error."""
    text = json.dumps(payload, separators=(",", ":"))
    for path in paths:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
            return
        except OSError as err:
            LOGGER.debug("scan cache not written to %s: %s", path, err)
            with contextlib.suppress(OSError):
                tmp.unlink()


def _valid_entry(entry: Any, key: tuple[int, int]) -> bool:
    return (
        isinstance(entry, list)
        and len(entry) == 7
        and entry[:2] == list(key)
        and entry[2] in ("ok", "corrupt")
        and all(_is_int(v) for v in entry[3:5])
        and isinstance(entry[5], str)
        and isinstance(entry[6], bool)
    )


def _check_images(
    images: list[dict], images_dir: Path, annotations: Path, cache_dir: Path | None
) -> dict[str, tuple[str, int, int, str, int, bool]]:
    """file_name -> (status, width, height, reason, file_size, fast_decode), status ok, corrupt or missing;
    from the cache where each file's size+mtime still match."""
    json_key = list(_stat_key(annotations) or (0, 0))
    paths = _cache_paths(annotations, cache_dir)
    cached = _load_cache(paths, json_key, images_dir)
    checks: dict[str, tuple[str, int, int, str, bool]] = {}
    keys: dict[str, tuple[int, int]] = {}
    todo: list[str] = []
    for im in images:
        name = im["file_name"]
        key = _stat_key(images_dir / name)
        if key is None:
            continue
        keys[name] = key
        if _valid_entry(cached.get(name), key):
            checks[name] = tuple(cached[name][2:])  # type: ignore[assignment]
        else:
            todo.append(name)
    if todo:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
            checks.update(zip(todo, pool.map(inspect_image, [images_dir / name for name in todo])))
    if todo or not cached:
        payload = {
            "version": CACHE_VERSION,
            "annotations": json_key,
            "images_dir": str(images_dir.resolve()),
            "images": {name: [*key, *checks[name]] for name, key in keys.items()},
        }
        _save_cache(paths, payload)
    results = {}
    for im in images:
        name = im["file_name"]
        if name in keys:
            status, width, height, reason, fast = checks[name]
            results[name] = (status, width, height, reason, keys[name][0], fast)
        else:
            results[name] = ("missing", 0, 0, "not found", 0, False)
    return results

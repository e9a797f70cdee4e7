"""A scanned COCO split as a dataset: validated per-image arrays, class index <-> category id, names, the
ground truth for COCOeval, and the decoded images.

The scan itself (what it checks that pycocotools does not, its cache, its summary) is `detector.data.coco_scan`;
reading and checking the json's structure is `detector.data.coco_json`.

Frames: boxes in the json are taken to be in the *displayed* frame, after the EXIF orientation is applied (as
COCO tools and annotation tools assume). Image sizes are read with the orientation applied (tags 5-8 swap width
and height) and `load_image` returns the transposed pixels, so boxes and pixels agree. Boxes are stored as
float32 `[x1, y1, x2, y2]` in original pixels, pixel edges at integers (a box `[0, 0, w, h]` covers the image).

The scanned split is a few flat numpy arrays (no per-image Python objects, see `CocoDataset`), so forked data
workers share its pages.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from detector.data.coco_scan import PROBLEMS, ScanSummary, scan
from detector.data.image_files import read_rgb
from detector.data.scan_cache import string_at, unpack_strings
from detector.errors import DetectorError

if TYPE_CHECKING:
    from pycocotools.coco import COCO

    from detector.data.spec import SplitSpec


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


def category_difference(ids: Sequence[int], names: Sequence[str], other_ids: Sequence[int],
                        other_names: Sequence[str]) -> str:
    """How two category lists (contiguous class c = ids[c], named names[c]) disagree, '' when they do not: other
    ids, or a name both lists use at another id (the same classes relabelled, as a permuted category table). A
    name only one list has is a rename, not a disagreement. Two splits, or a checkpoint and a split, that disagree
    score the predictions of one class against another's ground truth: AP silently near 0."""
    ids, other_ids = [int(c) for c in ids], [int(c) for c in other_ids]
    if ids != other_ids:
        return f"category ids [{_show_ids(ids)}] against [{_show_ids(other_ids)}]"
    at, other_at = _id_of_unique_names(ids, names), _id_of_unique_names(other_ids, other_names)
    moved = [(name, cid, other_at[name]) for name, cid in at.items() if other_at.get(name, cid) != cid]
    if not moved:
        return ""
    name, cid, other = moved[0]
    return f"'{name}' is category id {cid} against {other} ({len(moved)} of {len(ids)} names at other ids)"


def _id_of_unique_names(ids: list[int], names: Sequence[str]) -> dict[str, int]:
    """name -> its category id, for the names that only one category has."""
    counts = Counter(map(str, names))
    return {str(name): cid for cid, name in zip(ids, names) if counts[str(name)] == 1}


def _show_ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids[:8])) + (f", ... ({len(ids)} in all)" if len(ids) > 8 else "")


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
    (`fraction_indices`); the categories stay all of the json's. `cache_dir` takes the scan cache when the json's
    folder cannot be written (None: the user's cache folder, `scan_cache.scans_cache_dir`).

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
        meta, self._arrays = scan(self.annotations, self.images_dir, cache_dir)
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
        ids = np.concatenate([a["box_ann"], a["crowd_ann"]])[order]
        if len(ids) and ids.min() < 1:  # pycocotools marks a matched gt by its id: one of id 0 (or below) never matches
            ids = np.arange(1, len(ids) + 1)  # so such a file's boxes are numbered 1..n in json order
        columns = {
            "id": ids.tolist(),
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

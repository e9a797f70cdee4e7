"""Ultralytics-style YOLO datasets (a data.yaml with images and labels/*.txt) read as COCO instances json.

The inverse of `detector.data.yolo_txt`. A data.yaml of the Ultralytics kind

    path: ../datasets/coco8      # the dataset root (relative to the YAML's folder); default: the YAML's folder
    train: images/train          # an image folder (searched recursively), a .txt list of image paths, or a list
    val: images/val
    names: {0: person, 1: bicycle}   # or a list; class index = position (dict keys must be 0..nc-1)

finds each image's labels by Ultralytics' rule: the last `/images/` of the image path becomes `/labels/` and the
suffix `.txt`. A label row is `class cx cy w h` normalised to the image size, or a polygon `class x1 y1 x2 y2 ...`
(an odd field count >= 7), which becomes its bounding box. A missing or empty label file is a negative image.

The conversion is exact: a box becomes pixels with the image's size after EXIF orientation (tags 5-8 swap width
and height, read from the header, nothing decoded); category ids are 0..nc-1 in `names` order; image ids are
1..n in the order of the sorted relative paths, so the same files always get the same ids. A bad row (a wrong
field count, a class outside `names`, a coordinate outside [0, 1] or not finite) is an error naming file:line.

`load_yolo_spec` (what `load_data_spec` calls for such a YAML) converts once into a cache beside the dataset,
keyed by every image's and label file's size and mtime, and rewrites it atomically when stale;
`convert_yolo_dataset` (`detector data convert from=yolo`) writes the json files and a dataset YAML of ours.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from PIL import Image

from detector.data.coco_scan import named_few
from detector.data.image_files import FOLDER_IMAGE_SUFFIXES, IMAGE_SUFFIXES, exif_orientation
from detector.data.spec import DataSpec, SplitSpec, check_keys, is_yolo_layout
from detector.data.user_cache import prune_unused, user_cache_dir
from detector.errors import DetectorError
from detector.yamlfile import load_yaml

LOGGER = logging.getLogger(__name__)
SPLITS = ("train", "val")
CONVERTER_VERSION = 2  # 2: TIFF sizes not swapped twice, rows of zero size and repeated rows left out, AVIF/JPEG 2000 read
YOLO_KEYS = ("path", "train", "val", "test", "names", "nc", "download", "roboflow")  # roboflow: export metadata
CACHE_FOLDER = ".detector-coco"


@dataclass(frozen=True)
class YoloSplit:
    """One split's images: absolute paths (symlinks kept, so labels follow the link's path), sorted by their
    path relative to `images_dir`, the folder COCO file_names are relative to."""

    images_dir: Path
    files: list[Path]


@dataclass(frozen=True)
class YoloSource:
    """A parsed Ultralytics data.yaml."""

    yaml_path: Path
    root: Path
    names: list[str]
    splits: dict[str, YoloSplit]


@dataclass
class SplitStats:
    """What converting one split found (for the report)."""

    images: int = 0
    negatives: int = 0
    missing_labels: int = 0
    boxes: int = 0
    from_polygons: int = 0
    unreadable: list[str] = field(default_factory=list)
    empty_rows: list[str] = field(default_factory=list)  # path:line of the rows of zero width or height
    repeated_rows: list[str] = field(default_factory=list)  # path:line of the rows equal to an earlier one

    def __str__(self) -> str:
        text = (f"{self.images:,} images ({self.negatives:,} negatives, {self.missing_labels:,} without a label file), "
                f"{self.boxes:,} boxes ({self.from_polygons:,} from polygons)")
        text += f", {len(self.empty_rows):,} rows of zero size left out" if self.empty_rows else ""
        text += f", {len(self.repeated_rows):,} repeated rows left out" if self.repeated_rows else ""
        return text + (f", {len(self.unreadable):,} unreadable images left out" if self.unreadable else "")


@dataclass(frozen=True)
class YoloConversion:
    """What `convert_yolo_dataset` wrote."""

    data_yaml: Path
    annotations: dict[str, Path]
    stats: dict[str, SplitStats]

    def __str__(self) -> str:
        rows = [f"{split}: {self.annotations[split]}  {self.stats[split]}" for split in SPLITS]
        return "\n".join(rows + [f"dataset YAML: {self.data_yaml}"])


# ------------------------------------------------------------------------------------------ the YAML


def read_yolo_source(path: Path, data: dict[str, Any], lines: dict[str, int]) -> YoloSource:
    """Check an Ultralytics data.yaml's keys and list its splits' images; errors name the file, line and key."""
    check_keys(path, data, lines, YOLO_KEYS)
    root = path.resolve().parent
    if data.get("path") is not None:
        root = Path(os.path.abspath(root / str(data["path"])))
    names = _read_names(path, data, lines)
    splits = {}
    for split in SPLITS:
        if data.get(split) is None:
            raise DetectorError(f"{path}: missing key '{split}' (an image folder such as images/{split}, or a .txt list)")
        splits[split] = _split_images(data[split], root, f"{path}:{lines.get(split, 1)}", split)
    return YoloSource(yaml_path=path.resolve(), root=root, names=names, splits=splits)


def _read_names(path: Path, data: dict[str, Any], lines: dict[str, int]) -> list[str]:
    """Class names in class-index order: a list, or a dict whose keys are exactly 0..nc-1; `nc` must agree."""
    names, nc = data.get("names"), data.get("nc")
    where = f"{path}:{lines.get('names', lines.get('nc', 1))}"
    if nc is not None and (not isinstance(nc, int) or isinstance(nc, bool) or nc < 1):
        raise DetectorError(f"{path}:{lines.get('nc', 1)}: 'nc' must be a positive integer, got {nc!r}")
    if names is None:
        if nc is None:
            raise DetectorError(f"{path}: missing key 'names' (a list of class names, or {{0: name, 1: name ...}})")
        names = [f"class{i}" for i in range(nc)]
    if isinstance(names, dict):
        keys = list(names)
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in keys) or sorted(keys) != list(range(len(keys))):
            raise DetectorError(f"{where}: 'names' keys must be the class indices 0..{len(keys) - 1}, got {keys}")
        names = [names[k] for k in range(len(keys))]
    if not isinstance(names, list) or not names or not all(isinstance(n, (str, int, float)) for n in names):
        raise DetectorError(f"{where}: 'names' must be a non-empty list of class names or a dict index: name")
    if nc is not None and nc != len(names):
        raise DetectorError(f"{path}:{lines.get('nc', 1)}: 'nc' is {nc} but 'names' lists {len(names)} classes")
    return [str(n) for n in names]


def _split_images(entry: Any, root: Path, where: str, split: str) -> YoloSplit:
    """The images one `train`/`val` entry names: folders searched recursively (hidden names skipped, as
    Ultralytics' glob does) and .txt lists (relative lines are relative to the list's folder)."""
    entries = entry if isinstance(entry, list) else [entry]
    if not entries or not all(isinstance(e, str) and e for e in entries):
        raise DetectorError(f"{where}: '{split}' must be an image folder, a .txt list of images or a list of them, got {entry!r}")
    files: set[Path] = set()
    folders = []
    for item in entries:
        source = Path(os.path.abspath(root / item))
        if not source.exists() and item.startswith("../"):  # Roboflow's exports, as Ultralytics reads them
            source = Path(os.path.abspath(root / item[3:]))
        if source.is_dir():
            folders.append(source)
            files.update(_walk_images(source))
        elif source.is_file() and source.suffix == ".txt":
            files.update(_listed_images(source))
        else:
            raise DetectorError(f"{where}: '{split}': {source} is neither an image folder nor a .txt list of images")
    if not files:
        raise DetectorError(f"{where}: '{split}': no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, entries))}")
    images_dir = folders[0] if len(entries) == 1 and folders else Path(os.path.commonpath([f.parent for f in files]))
    return YoloSplit(images_dir=images_dir, files=sorted(files, key=lambda f: _relative_name(f, images_dir)))


def _walk_images(folder: Path) -> list[Path]:
    """The images under `folder` that this PIL decodes; those of another image suffix Ultralytics reads (.heic,
    .dng without their plugins) are left out with a warning naming them."""
    out, undecodable = [], []
    for parent, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        suffixes = [(n, Path(n).suffix.lower()) for n in names if not n.startswith(".")]
        out += [Path(parent) / n for n, s in suffixes if s in IMAGE_SUFFIXES]
        undecodable += [Path(parent) / n for n, s in suffixes if s in FOLDER_IMAGE_SUFFIXES and s not in IMAGE_SUFFIXES]
    if undecodable:
        LOGGER.warning("%s: %d images left out, no decoder for them here: %s", folder, len(undecodable),
                       named_few([str(f) for f in undecodable]))
    return out


def _listed_images(list_file: Path) -> list[Path]:
    out = []
    for number, row in enumerate(list_file.read_text(encoding="utf-8-sig").splitlines(), 1):
        row = row.strip()
        if not row:
            continue
        image = Path(os.path.abspath(list_file.parent / row))
        if image.suffix.lower() not in IMAGE_SUFFIXES:
            raise DetectorError(f"{list_file}:{number}: '{row}' is not an image ({', '.join(IMAGE_SUFFIXES)})")
        out.append(image)
    return out


def _relative_name(file: Path, images_dir: Path) -> str:
    return Path(os.path.relpath(file, images_dir)).as_posix()


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last '/images/' of the path becomes '/labels/', the suffix '.txt'."""
    text, images, labels = str(image), f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if images in text:
        text = labels.join(text.rsplit(images, 1))
    return Path(text).with_suffix(".txt")


# ------------------------------------------------------------------------------------------ label rows


class LabelRows(NamedTuple):
    """One label file: its boxes as (class, x1, y1, x2, y2) normalised, how many came from polygons, and the
    `path:line` of the rows left out: of zero width or height (no box to learn or to find) and repeats of an
    earlier row (as Ultralytics drops them: a second copy of a val box could never be matched)."""

    rows: list[tuple[int, float, float, float, float]]
    polygons: int
    empty: list[str]
    repeated: list[str]


def read_yolo_labels(path: Path, num_classes: int) -> LabelRows | None:
    """The rows of one label file; None when the file does not exist. A bad row is a DetectorError naming
    `path:line`."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise DetectorError(f"{path}: cannot read ({err})") from None
    rows, polygons, empty, repeated, seen = [], 0, [], [], set()
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        row = parse_label_row(fields, num_classes, f"{path}:{number}")
        if row[3] <= row[1] or row[4] <= row[2]:
            empty.append(f"{path}:{number}")
        elif row in seen:
            repeated.append(f"{path}:{number}")
        else:
            seen.add(row)
            rows.append(row)
            polygons += len(fields) > 5
    return LabelRows(rows, polygons, empty, repeated)


def parse_label_row(fields: list[str], num_classes: int, where: str) -> tuple[int, float, float, float, float]:
    """`class cx cy w h` or `class x1 y1 x2 y2 ...` -> (class, x1, y1, x2, y2), normalised."""
    if not (len(fields) == 5 or (len(fields) >= 7 and len(fields) % 2 == 1)):
        raise DetectorError(f"{where}: {len(fields)} fields; a row is 'class cx cy w h' (5) "
                            "or a polygon 'class x1 y1 x2 y2 ...' (an odd count >= 7)")
    values = []
    for token in fields:
        try:
            values.append(float(token))
        except ValueError:
            raise DetectorError(f"{where}: '{token}' is not a number") from None
    cls = values[0]
    if not (math.isfinite(cls) and cls.is_integer() and 0 <= cls < num_classes):
        raise DetectorError(f"{where}: class {fields[0]} is outside names (0..{num_classes - 1})")
    coords = values[1:]
    for token, value in zip(fields[1:], coords):
        if not math.isfinite(value):
            raise DetectorError(f"{where}: coordinate {token} is not finite")
        if not 0 <= value <= 1:
            raise DetectorError(f"{where}: coordinate {token} is outside [0, 1] (rows are normalised to the image size)")
    if len(fields) == 5:
        cx, cy, w, h = coords
        return int(cls), cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    xs, ys = coords[0::2], coords[1::2]
    return int(cls), min(xs), min(ys), max(xs), max(ys)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header only; OSError/ValueError when unreadable."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            if exif_orientation(im, path) in (5, 6, 7, 8):  # a PNG's getexif() would decode its pixels
                width, height = height, width
    except Exception as err:  # any decoder failure (OSError, SyntaxError, struct.error, bombs ...)
        raise OSError(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
    return width, height


# ------------------------------------------------------------------------------------------ conversion


def convert_split(split: YoloSplit, names: list[str]) -> tuple[dict[str, Any], SplitStats]:
    """The COCO instances dict of one split (boxes in pixels, [x, y, w, h]) and what was found."""
    images, annotations, stats = [], [], SplitStats()
    for image_id, file in enumerate(split.files, 1):
        try:
            width, height = image_size(file)
        except OSError as err:
            stats.unreadable.append(f"{file} ({err})")
            continue
        labels = read_yolo_labels(label_path(file), len(names))
        rows, polygons, empty, repeated = labels if labels is not None else ([], 0, [], [])
        images.append({"id": image_id, "file_name": _relative_name(file, split.images_dir), "width": width, "height": height})
        for cls, x1, y1, x2, y2 in rows:
            box = [x1 * width, y1 * height, (x2 - x1) * width, (y2 - y1) * height]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cls, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0})
        stats.images += 1
        stats.negatives += not rows
        stats.missing_labels += labels is None
        stats.boxes += len(rows)
        stats.from_polygons += polygons
        stats.empty_rows += empty
        stats.repeated_rows += repeated
    for items, what in ((stats.unreadable, "unreadable images"), (stats.empty_rows, "label rows of zero width or height"),
                        (stats.repeated_rows, "label rows repeating an earlier row of their file")):
        if items:
            LOGGER.warning("%d %s left out: %s", len(items), what, named_few(items))
    categories = [{"id": i, "name": name} for i, name in enumerate(names)]
    return {"images": images, "annotations": annotations, "categories": categories}, stats


def _convert_labelled(source: YoloSource, split: str) -> tuple[dict[str, Any], SplitStats]:
    """`convert_split` of one of `source`'s splits; a split without a single box is refused here, naming the user's
    data.yaml and label folder rather than the converted json it would become (a file of ours)."""
    coco, stats = convert_split(source.splits[split], source.names)
    if stats.boxes == 0:
        labels = label_path(source.splits[split].files[0]).parent
        raise DetectorError(f"{source.yaml_path}: '{split}': no labelled images ({stats}); labels are read from {labels}")
    return coco, stats


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def convert_yolo_dataset(data_yaml: Path, out: Path | None = None) -> YoloConversion:
    """`detector data convert from=yolo`: instances_train.json, instances_val.json and `<stem>-coco.yaml` (ours,
    pointing at them and at the image folders) under `out` (default: the data.yaml's folder)."""
    source = load_yolo_source(Path(data_yaml))
    out = Path(out).resolve() if out else source.yaml_path.parent
    annotations, stats, entries = {}, {}, {}
    for split in SPLITS:
        coco, stats[split] = _convert_labelled(source, split)
        annotations[split] = out / f"instances_{split}.json"
        _write_json_atomic(annotations[split], coco)
        entries[split] = {"images": os.path.relpath(source.splits[split].images_dir, out),
                          "annotations": annotations[split].name}
    ours = out / f"{source.yaml_path.stem}-coco.yaml"
    header = f"# COCO form of {source.yaml_path} (detector data convert from=yolo)\n"
    ours.write_text(header + yaml.safe_dump({"path": ".", **entries, "names": source.names}, sort_keys=False))
    return YoloConversion(data_yaml=ours, annotations=annotations, stats=stats)


def load_yolo_source(path: Path) -> YoloSource:
    """Read and check an Ultralytics data.yaml (not one of ours)."""
    data, lines = load_yaml(path)
    if not isinstance(data, dict) or not is_yolo_layout(data):
        raise DetectorError(f"{path}: not an Ultralytics data.yaml (train: and val: an image folder or a .txt list)")
    return read_yolo_source(path, data, lines)


# ------------------------------------------------------------------------------------------ the cache


def load_yolo_spec(path: Path, data: dict[str, Any], lines: dict[str, int]) -> DataSpec:
    """The DataSpec of an Ultralytics data.yaml, its splits converted into cached instances json files."""
    source = read_yolo_source(path, data, lines)
    cache = _cache_folder(source)
    manifest_file = cache / "manifest.json"
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    manifest = manifest if isinstance(manifest, dict) else {}
    splits = {}
    for split in SPLITS:
        annotations = cache / f"instances_{split}.json"
        key = _source_key(source, split)
        if manifest.get(split) != key or not annotations.is_file():
            reason = "first use" if split not in manifest else "images or labels changed"
            coco, stats = _convert_labelled(source, split)
            _write_json_atomic(annotations, coco)
            manifest = {**manifest, split: key}
            _write_json_atomic(manifest_file, manifest)
            LOGGER.info("%s: %s split converted to %s (%s): %s", source.yaml_path, split, annotations, reason, stats)
        splits[split] = SplitSpec(images=source.splits[split].images_dir, annotations=annotations)
    return DataSpec(path=source.yaml_path, train=splits["train"], val=splits["val"], names=source.names)


def _source_key(source: YoloSource, split: str) -> str:
    """sha256 over what a split's conversion reads: names, the images folder, each image's and label file's
    relative path, size and mtime (-1 for a missing label file)."""
    digest = hashlib.sha256(json.dumps([CONVERTER_VERSION, source.names, str(source.splits[split].images_dir)]).encode())
    for file in source.splits[split].files:
        row = [_relative_name(file, source.splits[split].images_dir), *_stat(file), *_stat(label_path(file))]
        digest.update(json.dumps(row).encode())
    return digest.hexdigest()


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _cache_folder(source: YoloSource) -> Path:
    """`<dataset root>/.detector-coco/<yaml stem>-<hash of the YAML's path>`, or in the user's cache
    (`user_cache.user_cache_dir`) when the dataset folder is not writable; the probe written there marks the folder
    used, and the conversions there that no run used for `user_cache.UNUSED_DAYS` days are removed."""
    digest = hashlib.sha1(str(source.yaml_path).encode()).hexdigest()[:10]
    name = f"{source.yaml_path.stem}-{digest}"
    user = user_cache_dir("yolo-coco")
    candidates = [source.root / CACHE_FOLDER / name, *([user / name] if user is not None else [])]
    for folder in candidates:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".probe.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            if user is not None and folder.parent == user:
                prune_unused(user, "*", keep=folder)
            return folder
        except OSError as err:
            LOGGER.debug("yolo conversion cache not in %s: %s", folder, err)
    raise DetectorError(f"{source.yaml_path}: no writable folder for the converted annotations ({candidates[0]}); "
                        "use detector data convert from=yolo out=<folder>")

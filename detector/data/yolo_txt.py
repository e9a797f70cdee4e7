"""Export a COCO dataset (our dataset YAML) to the YOLO-txt layout other trainers read; the label-file format is
also what `detector predict save_txt=true` writes.

Used by the rival harness (`detector.tools.bench.rivals`) so that another tool trains on exactly the boxes we train on:
the scan of `detector.data.coco.CocoDataset` decides everything (skipped images, dropped and clipped boxes, crowd
boxes set apart, image sizes after EXIF), and this module only writes it out. Layout under `out`:

    images/{train,val}/<name>        symlinks to the original files (a file_name's sub-folders joined by '__')
    labels/{train,val}/<stem>.txt    one row per non-crowd box: class cx cy w h, normalised to the image size
    data.yaml                        path, train, val, names (class index = rank of the category id)
    index.json                       per split: image_id, original file, yolo image path; and category_ids

Class i is the i-th smallest category id (as in our trainer), so non-contiguous, unordered ids map back through
`category_ids[i]`. Crowd regions are never labels: the other tool learns them as background, as ours does not
train on them either. Rows carry 9 decimals, so a box survives the round trip to well under 0.01 px.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from detector.data.spec import DataSpec
from detector.data.coco import CocoDataset, ImageRecord
from detector.errors import DetectorError

SPLITS = ("train", "val")


@dataclass(frozen=True)
class YoloExport:
    """What `export_yolo_txt` wrote: the data.yaml to hand the other tool and the maps back to our ids."""

    root: Path
    data_yaml: Path
    names: list[str]
    category_ids: list[int]
    images: dict[str, list[dict[str, Any]]]  # split -> [{image_id, file, yolo_file}]


def yolo_rows(record: ImageRecord) -> np.ndarray:
    """(n, 5) float64 [class, cx, cy, w, h] of the record's training boxes, normalised by its size after EXIF."""
    return normalised_rows(record.classes, record.boxes_xyxy, record.width, record.height)


def normalised_rows(classes: Any, boxes_xyxy: Any, width: int, height: int) -> np.ndarray:
    """(n, 5) float64 [class, cx, cy, w, h]: pixel xyxy boxes normalised by the image's width and height."""
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    size = np.array([width, height, width, height], dtype=np.float64)
    cxcywh = np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], axis=1) / size
    return np.concatenate([np.asarray(classes, dtype=np.float64).reshape(-1, 1), cxcywh], axis=1)


def format_label_file(rows: np.ndarray, scores: np.ndarray | None = None) -> str:
    """The text of one labels/*.txt (empty for a negative image); with `scores`, each row ends with its score
    (5 decimals, as predictions.json), as `detector predict save_conf=true` writes."""
    if scores is None:
        return "".join(f"{int(r[0])} {r[1]:.9f} {r[2]:.9f} {r[3]:.9f} {r[4]:.9f}\n" for r in rows.tolist())
    return "".join(f"{int(r[0])} {r[1]:.9f} {r[2]:.9f} {r[3]:.9f} {r[4]:.9f} {s:.5f}\n"
                   for r, s in zip(rows.tolist(), np.asarray(scores, dtype=np.float64).tolist()))


def export_yolo_txt(spec: DataSpec, out: Path, *, strict: bool = False) -> YoloExport:
    """Write `spec`'s train and val splits under `out`; earlier images/ and labels/ there (and the label caches
    another tool keeps beside them, which could go stale) are removed first."""
    out = Path(out).resolve()
    for folder in ("images", "labels"):
        if (out / folder).is_dir():
            shutil.rmtree(out / folder)
    images: dict[str, list[dict[str, Any]]] = {}
    category_ids: list[int] | None = None
    names: list[str] = []
    for split in SPLITS:
        dataset = CocoDataset(getattr(spec, split), strict=strict, names=spec.names)
        if category_ids is None:
            category_ids, names = list(dataset.category_ids), list(dataset.names)
        elif dataset.category_ids != category_ids:
            raise DetectorError(
                f"{dataset.annotations}: categories {dataset.category_ids} differ from the train split's {category_ids}"
            )
        images[split] = _write_split(dataset, out, split)
    assert category_ids is not None
    data_yaml = out / "data.yaml"
    content = {"path": str(out), "train": "images/train", "val": "images/val", "names": dict(enumerate(names))}
    data_yaml.write_text(yaml.safe_dump(content, sort_keys=False))
    index = {"category_ids": category_ids, "names": names, "images": images, "sources": source_digests(spec)}
    (out / "index.json").write_text(json.dumps(index, indent=1))  # last: its presence marks a complete export
    return YoloExport(root=out, data_yaml=data_yaml, names=names, category_ids=category_ids, images=images)


def source_digests(spec: DataSpec) -> dict[str, str]:
    """sha256 of each split's annotation file (and the class names given), what an export was made from."""
    digests = {split: hashlib.sha256(getattr(spec, split).annotations.read_bytes()).hexdigest() for split in SPLITS}
    return digests | {"names": hashlib.sha256(json.dumps(spec.names).encode()).hexdigest()}


def reuse_or_export(spec: DataSpec, out: Path) -> YoloExport:
    """The complete export already at `out` when it was made from the same annotation files, else a new one.

    Another process may be training from the existing one: rewriting it would delete the images under it."""
    out = Path(out).resolve()
    index_file = out / "index.json"
    if index_file.exists():
        index = json.loads(index_file.read_text())
        if index.get("sources") == source_digests(spec):
            return YoloExport(root=out, data_yaml=out / "data.yaml", names=index["names"],
                              category_ids=index["category_ids"], images=index["images"])
    return export_yolo_txt(spec, out)


def _write_split(dataset: CocoDataset, out: Path, split: str) -> list[dict[str, Any]]:
    """Links and label files of one split; returns its index rows."""
    rows = []
    for folder in ("images", "labels"):
        (out / folder / split).mkdir(parents=True, exist_ok=True)
    for record in dataset.records:
        name = _link_name(record.file, dataset.images_dir, dataset.annotations)
        image_link = out / "images" / split / name
        label_file = (out / "labels" / split / name).with_suffix(".txt")
        if image_link.is_symlink() or label_file.exists():
            raise DetectorError(f"{dataset.annotations}: two images map to the link or label name '{name}'")
        os.symlink(record.file.resolve(), image_link)
        label_file.write_text(format_label_file(yolo_rows(record)))
        rows.append({"image_id": record.image_id, "file": str(record.file.resolve()), "yolo_file": str(image_link)})
    return rows


def _link_name(file: Path, images_dir: Path, annotations: Path) -> str:
    """file_name relative to the images folder, sub-folders flattened ('a/b.jpg' -> 'a__b.jpg'), so every link
    sits directly in images/<split>/ and its label path is unambiguous; a name climbing out is refused."""
    relative = Path(os.path.relpath(file, images_dir))
    if relative.is_absolute() or ".." in relative.parts:
        raise DetectorError(f"{annotations}: file_name '{file}' lies outside the images folder {images_dir}")
    return "__".join(relative.parts)

"""A dataset YAML: its `train` and `val` splits (image folder + COCO instances json) and class-name overrides;
or an Ultralytics data.yaml (image folders with labels/*.txt), read through `detector.data.yolo_import`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detector.errors import DetectorError, did_you_mean
from detector.yamlfile import load_yaml

if TYPE_CHECKING:
    from collections.abc import Sequence

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitSpec:
    """One split of a COCO-format dataset: an image folder and its instances json (absolute paths)."""

    images: Path
    annotations: Path


@dataclass(frozen=True)
class DataSpec:
    """A dataset YAML: `train` and `val` splits and optional class-name overrides."""

    path: Path
    train: SplitSpec
    val: SplitSpec
    names: list[str] | None = None


_DATA_KEYS = ("path", "train", "val", "names", "download")


def is_yolo_layout(data: dict) -> bool:
    """True for an Ultralytics data.yaml: `train` or `val` is a path (or a list of paths), not {images, annotations}."""
    return any(isinstance(data.get(split), (str, list)) for split in ("train", "val"))


def check_keys(path: Path, data: dict[str, Any], lines: dict[str, int], known: Sequence[str]) -> None:
    """Refuse a dataset YAML key outside `known` (file, line, did-you-mean); say that 'download' is ignored."""
    for key in data:
        if key not in known:
            raise DetectorError(f"{path}:{lines.get(str(key), 1)}: unknown key '{key}'{did_you_mean(key, known)}")
    if "download" in data:
        LOGGER.warning("%s: 'download' is ignored (detector never runs scripts from a YAML)", path)


def _path_value(path: Path, lines: dict[str, int], key: str, value: Any) -> str:
    """`value` of `key` as a path: a non-empty string, or an integer folder name (`images: 2017`); a null would
    otherwise become a folder named 'None', a list one named "['a']"."""
    if type(value) is int:
        return str(value)
    if not isinstance(value, str) or not value:
        raise DetectorError(f"{path}:{lines.get(key, 1)}: '{key}' must be a path (a string), got {value!r}")
    return value


def load_data_spec(path: str | Path) -> DataSpec:
    """Parse a dataset YAML; relative paths are relative to the YAML's folder (or its `path:` key).

    A `download:` key (common in other tools' YAMLs) is never executed: it is ignored with a warning. An
    Ultralytics data.yaml (`train:`/`val:` an image folder or a .txt list, labels/*.txt beside images/) is converted
    once into cached COCO json files (`detector.data.yolo_import`) and read as those.
    """
    path = Path(path)
    data, lines = load_yaml(path)
    if not isinstance(data, dict):
        raise DetectorError(f"{path}: expected a mapping with 'train' and 'val'")
    if is_yolo_layout(data):
        from detector.data.yolo_import import load_yolo_spec  # it builds on DataSpec: imported here, when needed

        return load_yolo_spec(path, data, lines)
    check_keys(path, data, lines, _DATA_KEYS)
    root = path.resolve().parent
    if data.get("path") is not None:
        root = (root / _path_value(path, lines, "path", data["path"])).resolve()
    splits = {}
    for split in ("train", "val"):
        if split not in data:
            raise DetectorError(f"{path}: missing key '{split}' ({{images: <dir>, annotations: <instances json>}})")
        entry = data[split]
        where = f"{path}:{lines.get(split, 1)}"
        for key in entry if isinstance(entry, dict) else ():
            if key not in ("images", "annotations"):
                line = lines.get(f"{split}.{key}", lines.get(split, 1))
                raise DetectorError(f"{path}:{line}: unknown key '{split}.{key}'{did_you_mean(key, ('images', 'annotations'))}")
        if not isinstance(entry, dict) or set(entry) != {"images", "annotations"}:
            raise DetectorError(f"{where}: '{split}' must be {{images: <dir>, annotations: <instances json>}}, got {entry!r}")
        images, annotations = (_path_value(path, lines, f"{split}.{key}", entry[key])
                               for key in ("images", "annotations"))
        splits[split] = SplitSpec(images=(root / images).resolve(), annotations=(root / annotations).resolve())
    names = data.get("names")
    if names is not None:
        if isinstance(names, dict):
            keys = list(names)
            if not all(isinstance(k, int) and not isinstance(k, bool) for k in keys) or sorted(keys) != list(range(len(keys))):
                raise DetectorError(f"{path}:{lines.get('names', 1)}: 'names' keys must be the class indices "
                                    f"0..{len(keys) - 1}, got {keys}")
            names = [names[k] for k in range(len(keys))]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DetectorError(f"{path}:{lines.get('names', 1)}: 'names' must be a list of strings")
    return DataSpec(path=path.resolve(), train=splits["train"], val=splits["val"], names=names)

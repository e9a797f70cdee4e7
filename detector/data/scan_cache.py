"""The scan cache of `detector.data.coco_scan`: one `.npz` of flat arrays (numpy, `allow_pickle=False`: never pickle),
written atomically beside the json when that folder is writable, else under `cache_dir`, by default the user's cache
folder (`scans_cache_dir`): never a run folder, which a run refused at set-up must not leave behind, and found again
by every later run, `detector val` and `detector data check` of the same json.

It holds two things, both valid only for the json of the same size and modification time:
- the per-image checks of every image the json lists (`listed_*`: file name, size + mtime when checked, status,
  size after EXIF, why unreadable, plain enough for cv2), reused for each file whose size and mtime still match;
- the scan's result (the arrays a `CocoDataset` is made of, see `RESULT_SCHEMA`, with the summary and categories
  in `meta`), reused whole when every listed file is unchanged, so a cached re-scan parses no json at all.

Strings are stored as a string table: one uint8 buffer of UTF-8 bytes and int64 offsets (n + 1).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detector.data.user_cache import mark_used, prune_unused, user_cache_dir

LOGGER = logging.getLogger(__name__)
CACHE_VERSION = 6  # 3: iscrowd must be 0 or 1 (a cached scan of 2 may hold "0" as a crowd box); 4: unreadable-image
# reasons without the path (image_files.read_failure: a cache of 3 would keep saying the path twice); 5: iscrowd an
# int (a cache of 4 may hold true or 1.0 as a crowd box); 6: a TIFF turned by its EXIF orientation is sized as it
# decodes (a cache of 5 holds its size swapped twice)

# name: (dtype kind, trailing shape) of the per-listed-image checks and of the scan's result
LISTED_SCHEMA: dict[str, tuple[str, tuple[int, ...]]] = {
    "listed_names": ("u", ()), "listed_name_offsets": ("i", ()), "listed_stat": ("i", (2,)),
    "listed_status": ("i", ()), "listed_wh": ("i", (2,)), "listed_fast": ("b", ()),
    "listed_reasons": ("u", ()), "listed_reason_offsets": ("i", ()),
}
RESULT_SCHEMA: dict[str, tuple[str, tuple[int, ...]]] = {
    "image_id": ("i", ()), "hw": ("i", (2,)), "file_size": ("i", ()), "fast": ("b", ()),
    "names": ("u", ()), "name_offsets": ("i", ()),
    "box_offsets": ("i", ()), "boxes": ("f", (4,)), "classes": ("i", ()), "box_ann": ("i", ()),
    "box_area": ("f", ()), "box_order": ("i", ()),
    "crowd_offsets": ("i", ()), "crowd": ("f", (4,)), "crowd_classes": ("i", ()), "crowd_ann": ("i", ()),
    "crowd_area": ("f", ()), "crowd_order": ("i", ()),
}
STATUS = ("ok", "corrupt", "missing")  # listed_status codes
CACHE_SUFFIX = ".scan-cache.npz"


def pack_strings(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """A string table: (uint8 UTF-8 bytes, int64 offsets (n + 1)); any str round-trips (surrogates too)."""
    encoded = [s.encode("utf-8", "surrogatepass") for s in strings]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), np.uint8), offsets


def unpack_strings(buffer: np.ndarray, offsets: np.ndarray) -> list[str]:
    data = buffer.tobytes()
    bounds = offsets.tolist()
    return [data[a:b].decode("utf-8", "surrogatepass") for a, b in zip(bounds[:-1], bounds[1:])]


def string_at(buffer: np.ndarray, offsets: np.ndarray, index: int) -> str:
    return buffer[offsets[index] : offsets[index + 1]].tobytes().decode("utf-8", "surrogatepass")


def scans_cache_dir() -> Path | None:
    """The user's folder for the scan caches of json folders that cannot be written (None without a home)."""
    return user_cache_dir("scans")


def cache_paths(annotations: Path, cache_dir: Path | None) -> list[Path]:
    """Where the cache may be: beside the json first, then under cache_dir (None: the user's, `scans_cache_dir`),
    named by the json's resolved path."""
    paths = [annotations.parent / f".{annotations.name}{CACHE_SUFFIX}"]
    cache_dir = cache_dir if cache_dir is not None else scans_cache_dir()
    if cache_dir is not None:
        digest = hashlib.sha1(str(annotations.resolve()).encode()).hexdigest()[:12]
        paths.append(Path(cache_dir) / f"{annotations.stem}-{digest}{CACHE_SUFFIX}")
    return paths


def _schema_ok(arrays: dict[str, np.ndarray], schema: dict[str, tuple[str, tuple[int, ...]]]) -> bool:
    for name, (kind, tail) in schema.items():
        a = arrays.get(name)
        if a is None or a.dtype.kind != kind or a.shape[1:] != tail:
            return False
    return True


def _tables_ok(arrays: dict[str, np.ndarray], pairs: list[tuple[str, str, str]]) -> bool:
    """Each (offsets, data, count) pair: offsets of count + 1, from 0, non-decreasing, ending at len(data)."""
    for offsets_name, data_name, count_name in pairs:
        offsets, n = arrays[offsets_name], len(arrays[count_name])
        if offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != len(arrays[data_name]):
            return False
        if (np.diff(offsets) < 0).any():
            return False
    return True


def _consistent(arrays: dict[str, np.ndarray]) -> bool:
    m = len(arrays["listed_status"])
    if any(len(arrays[k]) != m for k in ("listed_stat", "listed_wh", "listed_fast")):
        return False
    n = len(arrays["image_id"])
    if any(len(arrays[k]) != n for k in ("hw", "file_size", "fast")):
        return False
    if any(len(arrays[k]) != len(arrays["boxes"]) for k in ("classes", "box_ann", "box_area", "box_order")):
        return False
    if any(len(arrays[k]) != len(arrays["crowd"]) for k in ("crowd_classes", "crowd_ann", "crowd_area", "crowd_order")):
        return False
    return _tables_ok(arrays, [("listed_name_offsets", "listed_names", "listed_status"),
                               ("listed_reason_offsets", "listed_reasons", "listed_status"),
                               ("name_offsets", "names", "image_id"), ("box_offsets", "boxes", "image_id"),
                               ("crowd_offsets", "crowd", "image_id")])


def load_cache(paths: list[Path], key: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """(meta, arrays) of the first cache whose meta matches `key` (version, json size + mtime, images folder) and
    whose arrays have the expected names, types and lengths; a stale, foreign or unreadable cache counts as none.
    A cache found under the cache folder (not beside the json) is marked used, so pruning keeps it."""
    for index, path in enumerate(paths):
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
            meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
        except Exception as err:  # a truncated zip, a foreign file, pickled objects refused ...: no cache
            LOGGER.debug("scan cache %s not used: %s", path, err)
            continue
        if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in key.items()):
            continue
        if not (_schema_ok(arrays, LISTED_SCHEMA) and _schema_ok(arrays, RESULT_SCHEMA) and _consistent(arrays)):
            continue
        for a in arrays.values():
            a.flags.writeable = False
        if index:
            mark_used(path)
        return meta, arrays
    return None


def save_cache(paths: list[Path], meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write atomically (temp file + os.replace) to the first writable candidate; no cache is not an error. A cache
    written to the cache folder removes the caches there that no scan used for `user_cache.UNUSED_DAYS` days."""
    payload = {**arrays, "meta": np.frombuffer(json.dumps(meta, separators=(",", ":")).encode("utf-8"), np.uint8)}
    for index, path in enumerate(paths):
        # host and pid: a name no other writer has (DDP ranks on several hosts may share a home and a pid number);
        # open(), not mkstemp: the cache of a shared dataset stays readable by its other users (umask, not 0600)
        tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                np.savez(f, **payload)
            os.replace(tmp, path)
            if index:  # the temp files of killed writers too
                prune_unused(path.parent, f"*{CACHE_SUFFIX}*", keep=path)
            return
        except OSError as err:
            LOGGER.debug("scan cache not written to %s: %s", path, err)
            with contextlib.suppress(OSError):
                tmp.unlink()

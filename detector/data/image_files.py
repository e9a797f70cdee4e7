"""Image files: decoded to RGB with the EXIF orientation applied, and inspected from their headers (size after the
orientation, truncation) without decoding the pixels, one by one or many in a process pool. The COCO scan
(`detector.data.coco_scan`) checks every listed image through `inspect_many`; the datasets, `detector predict` and the
API decode through `read_rgb`."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import re
import struct
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, features
from tqdm import tqdm

# the image suffixes Ultralytics reads; those whose decoder this PIL lacks are found in folders but not read
FOLDER_IMAGE_SUFFIXES = (".avif", ".bmp", ".dng", ".heic", ".jp2", ".jpeg", ".jpeg2000", ".jpg", ".mpo", ".png", ".tif",
                         ".tiff", ".webp")
PIL_FEATURE_OF_SUFFIX = {".avif": "avif", ".jp2": "jpg_2000", ".jpeg2000": "jpg_2000", ".dng": None, ".heic": None}
IMAGE_SUFFIXES = tuple(
    s for s in FOLDER_IMAGE_SUFFIXES
    if s not in PIL_FEATURE_OF_SUFFIX or (PIL_FEATURE_OF_SUFFIX[s] and features.check(PIL_FEATURE_OF_SUFFIX[s]))
)  # what `read_rgb` decodes here: the files a folder of images is read for
EXIF_ORIENTATION = 0x0112
TIFF_WIDTH, TIFF_HEIGHT = 256, 257  # the stored size's tags (ImageWidth, ImageLength)
JPEG_TAIL_BYTES = 4096  # read from a JPEG's end: it must end with the end-of-image marker (padding allowed)
POOL_MIN_IMAGES = 2000  # fewer images to check are inspected in this process (a pool costs more to start)
MAX_SCAN_PROCESSES = 16
SCAN_CHUNK = 256  # images per pool task
PROGRESS_MIN_IMAGES = 1000  # a first scan of fewer images shows no progress bar


def read_failure(err: BaseException, path: Path | str) -> str:
    """Why `path` could not be read, without the path: OSError's and PIL's messages hold it, and the warnings and
    errors that show this reason name the file once, themselves."""
    if isinstance(err, OSError) and err.strerror:  # "[Errno 2] No such file or directory: '<path>'"
        return err.strerror
    first = str(err).splitlines()[0] if str(err) else ""
    for spelling in sorted({str(path), str(Path(path))}, key=len, reverse=True):  # './a.jpg' reaches PIL as 'a.jpg'
        first = first.replace(repr(spelling), "")  # PIL: "cannot identify image file '<path>'"
        first = re.sub(rf"(?<!\S){re.escape(spelling)}(?!\S)", "", first)  # a whole word only: path 'e' keeps 'error'
    return " ".join(first.split()).rstrip(":") or type(err).__name__


def read_rgb(path: Path) -> np.ndarray:
    """Decode an image file as (H, W, 3) uint8 RGB, EXIF orientation applied; gray, palette, RGBA, CMYK and
    16-bit images are converted (16-bit scaled to 8 bits: always for the I;16 modes, so a dark frame stays as dark
    as its sensor's others; for 32-bit "I" only when a value passes 255). Raises OSError/ValueError when undecodable."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            wide = np.asarray(im, dtype=np.int64) if im.mode == "I" else np.asarray(im).astype(np.int64)
            sixteen_bit = im.mode != "I" or wide.max(initial=0) > 255
            gray = np.clip(wide, 0, 65535) // 257 if sixteen_bit else np.clip(wide, 0, 255)
            return np.repeat(gray.astype(np.uint8)[:, :, None], 3, axis=2)
        if im.mode == "F":
            gray = np.clip(np.asarray(im), 0, 255).astype(np.uint8)
            return np.repeat(gray[:, :, None], 3, axis=2)
        if im.mode != "RGB":
            im = im.convert("RGB")
        return np.asarray(im)


def _png_late_exif(path: Path) -> bytes | None:
    """The eXIf chunk of a PNG that stores it after the image data (PIL reads it only by decoding the pixels):
    found by walking the chunk headers."""
    with open(path, "rb") as f:
        f.seek(8)
        while True:
            head = f.read(8)
            if len(head) < 8:
                return None
            length, kind = struct.unpack(">I4s", head)
            if kind == b"eXIf":
                return f.read(length)
            if kind == b"IEND":
                return None
            f.seek(length + 4, os.SEEK_CUR)


def exif_orientation(im: Image.Image, path: Path) -> int:
    """EXIF orientation (1-8) still to apply to `im.size`, from the headers; a PNG's getexif() would decode the
    pixels, so its eXIf chunk is looked up directly. PIL turns a TIFF's size itself at open (Pillow 13; its pixels on
    load): then 1, or the size would be swapped twice."""
    if im.format == "TIFF" and im.size != (im.tag_v2.get(TIFF_WIDTH), im.tag_v2.get(TIFF_HEIGHT)):
        return 1
    if im.format == "PNG":
        if "exif" not in im.info:
            late = _png_late_exif(path)
            if late:
                im.info["exif"] = b"Exif\x00\x00" + late
        return Image.Image.getexif(im).get(EXIF_ORIENTATION, 1)
    return im.getexif().get(EXIF_ORIENTATION, 1)


def _jpeg_complete(f: Any) -> bool:
    """True when the open file `f` ends with the end-of-image marker (trailing padding allowed): not truncated."""
    size = f.seek(0, os.SEEK_END)
    f.seek(max(size - JPEG_TAIL_BYTES, 0))
    return f.read().rstrip(b"\x00\r\n\t ").endswith(b"\xff\xd9")


def _decode_small(path: Path) -> None:
    """Decode at 1/8 scale (libjpeg's DCT scaling): fails on a truncated JPEG."""
    with Image.open(path) as im:
        im.draft(None, (max(im.size[0] // 8, 1), max(im.size[1] // 8, 1)))
        im.load()


def inspect_image(path: Path) -> tuple[str, int, int, str, bool]:
    """(status, width, height, reason, fast_decode); status is ok or corrupt; size after EXIF orientation.

    Reads headers, never the pixels: PIL's open (size, mode, EXIF), `verify()` (a PNG's chunk checksums up to IEND;
    nothing for JPEG) and, for a JPEG, its last bytes: one that does not end with the end-of-image marker
    (truncated, or with data appended after it) is decoded at 1/8 scale, which a truncated file fails. The file is
    never modified. A file damaged inside its data but complete is found when it is decoded (see the loaders).
    """
    try:
        with Image.open(path) as im:
            width, height = im.size
            fmt, mode = im.format, im.mode
            orientation = exif_orientation(im, path)
            complete = fmt not in ("JPEG", "MPO") or _jpeg_complete(im.fp)  # PIL's own file: no second open
            im.verify()
        if not complete:
            _decode_small(path)
    except Exception as err:  # any decoder failure (OSError, SyntaxError, struct.error, bombs ...) = corrupt
        return "corrupt", 0, 0, read_failure(err, path), False
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    fast = fmt in ("JPEG", "PNG") and mode in ("RGB", "L") and orientation == 1
    return "ok", width, height, "", fast


def _inspect_chunk(paths: list[str]) -> list[tuple[str, int, int, str, bool]]:
    """A pool task: `inspect_image` of each path."""
    return [inspect_image(Path(p)) for p in paths]


def _progress(total: int, images_dir: Path) -> Any:
    """A tqdm bar on stderr for a first scan of many images (none for a few, or when stderr is not a terminal)."""
    disable = True if total < PROGRESS_MIN_IMAGES else None  # None: tqdm's "only on a terminal"
    return tqdm(total=total, desc=f"scanning {images_dir}", unit="img", disable=disable, dynamic_ncols=True)


def inspect_many(paths: list[Path], images_dir: Path) -> list[tuple[str, int, int, str, bool]]:
    """`inspect_image` of each path: here for a few, else in a process pool over the machine's cores (header
    parsing is Python code, so threads would queue on the GIL)."""
    workers = min(os.cpu_count() or 1, MAX_SCAN_PROCESSES)
    if len(paths) < POOL_MIN_IMAGES or workers < 2 or mp.current_process().daemon:  # a daemon has no children
        with _progress(len(paths), images_dir) as bar:
            results = []
            for path in paths:
                results.append(inspect_image(path))
                bar.update()
            return results
    chunks = [[str(p) for p in paths[i : i + SCAN_CHUNK]] for i in range(0, len(paths), SCAN_CHUNK)]
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    results = []
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        frozen = gc.get_freeze_count() == 0
        gc.freeze()  # the parsed json is in the permanent generation: the children's GC never writes into its pages
        try:
            futures = [pool.submit(_inspect_chunk, chunk) for chunk in chunks]  # with fork, the children start here
        finally:
            if frozen:
                gc.unfreeze()
        with _progress(len(paths), images_dir) as bar:
            for future, chunk in zip(futures, chunks):
                results += future.result()
                bar.update(len(chunk))
    return results

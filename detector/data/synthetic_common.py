"""What the synthetic generators share: the image type they render, the occlusion and visible-box rules, the
process pool, the atomic split writer, a profile's files (splits, stats.json, dataset.yaml), and the photographic
pieces of the hard profiles (scikit-image's photographs, paint, degrade, encode).

The generators themselves: `synthetic.py` (the bundled easy shapes), `synthetic_hard.py` (shapes made hard) and
`synthetic_photo.py` (textured objects cut from photographs). Each image is drawn from its own seed, so nothing here
may depend on the process count.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from detector.data.stats import split_stats
from detector.errors import DetectorError
from detector.folders import check_output_folder

SPLIT_IDS = {"train": 0, "val": 1}
CHUNK = 50  # images per process-pool job
GRAY_FRACTION, RGBA_FRACTION = 0.12, 0.10  # of the hard profiles' files (encode_image)

Window = tuple[slice, slice]
# one rendered image as the split writer takes it: (file bytes, file suffix, width, height, [annotation fields])
Rendered = tuple[bytes, str, int, int, list[dict[str, Any]]]


def keeps_visible(owner: np.ndarray, win: Window, solid: np.ndarray, areas: Sequence[int], min_visible: float) -> bool:
    """Whether drawing `solid` (a mask over `win`) on top leaves every earlier shape at least `min_visible` of its
    `areas` pixels; `owner` (H, W) int16 holds the topmost shape index per pixel, -1 for none."""
    covered = np.bincount(owner[win][solid] + 1, minlength=len(areas) + 1)[1:]
    visible = np.bincount(owner.ravel() + 1, minlength=len(areas) + 1)[1:] if len(areas) else covered
    return bool((visible - covered >= min_visible * np.array(areas, dtype=np.int64)).all())


def visible_boxes(owner: np.ndarray, windows: Sequence[Window]) -> list[tuple[list[int], int]]:
    """([x, y, w, h] tight box, pixel count) of each shape's visible pixels (owner == its index) within its window."""
    boxes = []
    for k, win in enumerate(windows):
        visible = owner[win] == k
        ys, xs = np.nonzero(visible)
        x1, y1 = int(xs.min()) + win[1].start, int(ys.min()) + win[0].start
        x2, y2 = int(xs.max()) + 1 + win[1].start, int(ys.max()) + 1 + win[0].start
        boxes.append(([x1, y1, x2 - x1, y2 - y1], int(visible.sum())))
    return boxes


def render_jobs(render_many: Callable[[Any], list[Rendered]], jobs: Sequence[Any], workers: int) -> list[Rendered]:
    """Run `render_many` over `jobs` (in order) in `workers` processes; each image has its own seed, so the
    process count never changes the output."""
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            return [r for part in pool.map(render_many, jobs) for r in part]
    return [r for job in jobs for r in render_many(job)]


def write_split(
    out: Path, split: str, rendered: Callable[[], list[Rendered]], *, info: dict[str, Any], categories: list[dict[str, Any]]
) -> None:
    """Write the images of `rendered()` and instances_<split>.json into a temporary folder, then move it to
    out/<split> in one rename. A folder there is replaced only if a generator with `info["description"]` wrote it."""
    final = out / split
    if final.exists() and not _is_ours(final / f"instances_{split}.json", info["description"]) and any(final.iterdir()):
        raise DetectorError(f"{final} exists and was not written by `detector data synth`; not overwriting it")
    tmp = out / f".{split}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    images, annotations = [], []
    for i, (data, suffix, w, h, anns) in enumerate(rendered()):
        name = f"{i:06d}{suffix}"
        (tmp / "images" / name).write_bytes(data)
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        for a in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "iscrowd": 0, **a})
    coco = {"info": info, "images": images, "annotations": annotations, "categories": categories}
    (tmp / f"instances_{split}.json").write_text(json.dumps(coco, separators=(",", ":")))
    if final.exists():
        old = out / f".{split}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def _is_ours(annotations: Path, tag: str) -> bool:
    try:
        return json.loads(annotations.read_text()).get("info", {}).get("description") == tag
    except (OSError, ValueError, AttributeError):
        return False


class PhotoBank:
    """scikit-image photographs as (H, W, 3) uint8 RGB, each decoded once per bank (one bank per render job)."""

    def __init__(self) -> None:
        self._photos: dict[str, np.ndarray] = {}

    def get(self, name: str) -> np.ndarray:
        if name not in self._photos:
            import skimage.data

            photo = np.asarray(getattr(skimage.data, name)())
            self._photos[name] = np.repeat(photo[..., None], 3, axis=2) if photo.ndim == 2 else photo[..., :3]
        return self._photos[name]


def _jitter(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Colour jitter: channel swap, per-channel gain, saturation, contrast and brightness; float32 in, out."""
    image = image[..., rng.permutation(3)] * rng.uniform(0.85, 1.15, 3).astype(np.float32)
    gray = image.mean(axis=2, keepdims=True)
    image = gray + (image - gray) * np.float32(rng.uniform(0.2, 1.4))
    mean = np.float32(image.mean())
    return mean + (image - mean) * np.float32(rng.uniform(0.5, 1.3)) + np.float32(rng.uniform(-40, 40))


def photo_background(rng: np.random.Generator, bank: PhotoBank, h: int, w: int, names: tuple[str, ...]) -> np.ndarray:
    """A random crop of one of the photographs `names`, zoomed 0.6-2.5x, maybe flipped, colour-jittered; float32
    (H, W, 3)."""
    photo = bank.get(names[int(rng.integers(len(names)))])
    ph, pw = photo.shape[:2]
    zoom = math.exp(rng.uniform(math.log(0.6), math.log(2.5)))  # output pixels per photo pixel
    ch, cw = min(ph, max(8, round(h / zoom))), min(pw, max(8, round(w / zoom)))
    y0, x0 = int(rng.integers(ph - ch + 1)), int(rng.integers(pw - cw + 1))
    crop = cv2.resize(photo[y0 : y0 + ch, x0 : x0 + cw], (w, h), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.2:
        crop = crop[::-1]
    return _jitter(rng, crop.astype(np.float32))


def paint(image: np.ndarray, coverage: np.ndarray, win: Window, colour: np.ndarray) -> None:
    """Alpha-blend `colour` (3,) or pixels (h, w, 3) into image[win] by `coverage` (uint8, 255 = opaque), in place."""
    alpha = (coverage.astype(np.float32) * np.float32(1 / 255))[..., None]
    patch = image[win]
    image[win] = patch + (colour - patch) * alpha


def degrade(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Sometimes lower the contrast, blur and add noise; uint8 (H, W, 3) out."""
    if rng.random() < 0.1:
        mean = np.float32(image.mean())
        image = mean + (image - mean) * np.float32(rng.uniform(0.35, 0.7))
    if rng.random() < 0.25:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.6, 1.8))
    if rng.random() < 0.5:
        image = image + rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(2, 14))
    return np.clip(image, 0, 255).astype(np.uint8)


def encode_image(rng: np.random.Generator, pixels: np.ndarray) -> tuple[bytes, str]:
    """File bytes and suffix: grayscale (JPEG or PNG), RGBA PNG (maybe with JPEG artefacts) or RGB JPEG of
    quality 30-95. Fixed encoder settings, so the bytes depend on the pixels only."""
    u, quality = rng.random(), int(rng.integers(30, 96))
    jpeg, png = [cv2.IMWRITE_JPEG_QUALITY, quality], [cv2.IMWRITE_PNG_COMPRESSION, 3]
    if u < GRAY_FRACTION:
        gray = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
        suffix = ".png" if rng.random() < 0.5 else ".jpg"
        return cv2.imencode(suffix, gray, png if suffix == ".png" else jpeg)[1].tobytes(), suffix
    bgr = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    if u < GRAY_FRACTION + RGBA_FRACTION:
        if rng.random() < 0.3:
            bgr = cv2.imdecode(cv2.imencode(".jpg", bgr, jpeg)[1], cv2.IMREAD_COLOR)
        return cv2.imencode(".png", cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA), png)[1].tobytes(), ".png"
    return cv2.imencode(".jpg", bgr, jpeg)[1].tobytes(), ".jpg"


def generate_profile(
    out: Path,
    profile: str,
    tag: str,
    title: str,
    categories: list[dict[str, Any]],
    render_many: Callable[[tuple[int, int, int, int]], list[Rendered]],
    *,
    seed: int,
    n_train: int,
    n_val: int,
    workers: int | None,
) -> Path:
    """A benchmark profile's files: each split rendered by `render_many((seed, split id, start, stop))` in
    `workers` processes and marked with `tag` (only a folder so marked is replaced), its statistics in
    out/stats.json and out/dataset.yaml (its first line names `title`); return the YAML's path."""
    if n_train < 1 or n_val < 1:
        raise DetectorError(f"synth: need n_train >= 1 and n_val >= 1 (got {n_train}, {n_val})")
    out = check_output_folder(out, "out")
    out.mkdir(parents=True, exist_ok=True)
    workers = min(os.cpu_count() or 1, 4) if workers is None else workers
    info = {"description": tag, "seed": seed, "profile": profile}
    stats = {}
    for split, count in (("train", n_train), ("val", n_val)):
        jobs = [(seed, SPLIT_IDS[split], s, min(s + CHUNK, count)) for s in range(0, count, CHUNK)]
        write_split(out, split, lambda: render_jobs(render_many, jobs, workers), info=info, categories=categories)
        stats[split] = split_stats(out / split / f"instances_{split}.json", out / split / "images")
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    yaml_path = out / "dataset.yaml"
    yaml_path.write_text(
        f"# {title}, {profile} profile (seed={seed}), written by `detector data synth profile={profile}`\n"
        "train: {images: train/images, annotations: train/instances_train.json}\n"
        "val: {images: val/images, annotations: val/instances_val.json}\n"
    )
    return yaml_path


def load_stats(out: Path) -> dict[str, dict[str, Any]]:
    """The statistics a generation wrote (out/stats.json), per split."""
    return json.loads((Path(out) / "stats.json").read_text())

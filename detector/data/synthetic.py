"""The bundled dataset: coloured shapes on textured, noisy backgrounds, written as COCO (deterministic, seeded).

Six classes (category ids 1..6): circle, triangle, square, star, cross, ring. The shape decides the class; colour,
size (8 px to half the short side), rotation and position are random for every object, so colour alone cannot
solve it. Images are 320x320, 320x240, 240x320, 320x256 or 256x320 (at imgsz=320); about 5% have no objects.
Later shapes may partly cover earlier ones; a placement that would leave an earlier shape less than 60% visible
is redrawn. Boxes are exact: the tight box of the shape's *visible* pixels (coverage >= 50%, not covered by a
later shape), as COCO boxes are; `area` is the visible pixel count, as COCO's mask area is.

Every image is drawn from its own seed (seed, split, index), so the output is the same bytes whatever the number of
processes; JPEG quality 90, no optimisation, fixed settings.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from detector.data.synthetic_common import CHUNK, SPLIT_IDS, Rendered, keeps_visible, render_jobs, visible_boxes, write_split
from detector.errors import DetectorError
from detector.folders import check_output_folder

LOGGER = logging.getLogger(__name__)

CLASSES = ("circle", "triangle", "square", "star", "cross", "ring")
GENERATOR_TAG = "detector synthetic shapes"
MIN_SIZE_PX = 8
MIN_VISIBLE = 0.6  # an occluded shape keeps at least this fraction of its pixels
EMPTY_FRACTION = 0.05
MAX_OBJECTS = 8
SUBPIXEL_BITS = 4  # cv2 drawing with 1/16 px vertex precision


def _polygon(name: str, radius: float) -> list[np.ndarray]:
    """Outline(s) of a shape of circumradius `radius` centred at 0, unrotated, as (k, 2) float arrays."""
    if name == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        return [radius * np.stack([np.cos(angles), np.sin(angles)], 1)]
    if name == "square":
        angles = np.deg2rad([45, 135, 225, 315])
        return [radius * np.stack([np.cos(angles), np.sin(angles)], 1)]
    if name == "star":
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
        return [np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)]
    if name == "cross":
        a, b = radius / math.sqrt(1 + (1 / 3) ** 2), radius / math.sqrt(1 + (1 / 3) ** 2) / 3
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
        return [np.array(pts, dtype=np.float64)]
    raise ValueError(name)


def draw_mask(
    shape: tuple[int, int], name: str, center: np.ndarray, radius: float, angle: float, hole: float, aspect: float = 1.0
) -> np.ndarray:
    """Anti-aliased coverage (H, W) uint8 of one shape centred at `center` (continuous pixels); 255 = covered.

    `aspect` > 1 squeezes the shape's own y axis by that factor before the rotation (circles become ellipses)."""
    mask = np.zeros(shape, np.uint8)
    scale = 1 << SUBPIXEL_BITS
    c = (center - 0.5) * scale  # cv2 puts pixel centres at integers; the continuous frame has them at +0.5
    if name in ("circle", "ring") and aspect != 1.0:
        centre, degrees = (round(c[0]), round(c[1])), math.degrees(angle)
        for fill, r in ((255, radius), (0, hole * radius)) if name == "ring" else ((255, radius),):
            axes = (round(r * scale), round(r / aspect * scale))
            cv2.ellipse(mask, centre, axes, degrees, 0, 360, fill, -1, cv2.LINE_AA, SUBPIXEL_BITS)
        return mask
    if name in ("circle", "ring"):
        cv2.circle(mask, (round(c[0]), round(c[1])), round(radius * scale), 255, -1, cv2.LINE_AA, SUBPIXEL_BITS)
        if name == "ring":
            cv2.circle(mask, (round(c[0]), round(c[1])), round(hole * radius * scale), 0, -1, cv2.LINE_AA, SUBPIXEL_BITS)
        return mask
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    outlines = _polygon(name, radius)
    if aspect != 1.0:
        outlines = [p * np.array([1.0, 1.0 / aspect]) for p in outlines]
    polys = [np.round((p @ rot.T) * scale + c).astype(np.int32) for p in outlines]
    cv2.fillPoly(mask, polys, 255, cv2.LINE_AA, SUBPIXEL_BITS)
    return mask


def textured_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Gradient + smooth colour blobs + stripes + pixel noise, float32 (H, W, 3) in about 0..255."""
    c0, c1 = rng.uniform(30, 225, 3).astype(np.float32), rng.uniform(30, 225, 3).astype(np.float32)
    theta, phi = rng.uniform(0, 2 * math.pi, 2)
    x = np.arange(w, dtype=np.float32)[None, :]
    y = np.arange(h, dtype=np.float32)[:, None]
    t = (x * math.cos(theta) + y * math.sin(theta)) / (w + h) + 0.5
    blobs = rng.uniform(-1, 1, (int(rng.integers(3, 8)), int(rng.integers(3, 8)), 3)).astype(np.float32)
    image = cv2.resize(blobs, (w, h), interpolation=cv2.INTER_CUBIC)
    image *= rng.uniform(15, 50)
    image += c0 + (c1 - c0) * t[..., None]
    period = rng.uniform(6, 40)
    stripes = np.sin((x * math.cos(phi) + y * math.sin(phi)) * np.float32(2 * math.pi / period))
    noise = rng.standard_normal((h, w), dtype=np.float32) * np.float32(rng.uniform(3, 12))
    image += (stripes * np.float32(rng.uniform(0, 20)) + noise)[..., None]
    return image


def shape_colour(rng: np.random.Generator, avoid: np.ndarray) -> np.ndarray:
    """A random colour (any hue, varied saturation and brightness) at least some distance from `avoid`."""
    for _ in range(20):
        hsv = np.array([[[rng.uniform(0, 180), rng.uniform(40, 255), rng.uniform(70, 255)]]], np.float32)
        rgb = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)
        if np.linalg.norm(rgb - avoid) > 70:
            return rgb
    return 255 - avoid


def render_image(seed: tuple[int, ...], imgsz: int) -> tuple[bytes, int, int, list[dict[str, Any]]]:
    """One image from its own seed: (JPEG bytes, width, height, [{category_id, bbox, area}])."""
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    short = int(rng.choice([imgsz, round(0.8 * imgsz), round(0.75 * imgsz)]))
    w, h = (imgsz, short) if rng.random() < 0.5 else (short, imgsz)
    image = textured_background(rng, h, w)
    n_objects = 0 if rng.random() < EMPTY_FRACTION else int(rng.integers(1, MAX_OBJECTS + 1))
    owner = np.full((h, w), -1, np.int16)  # index of the topmost shape covering each pixel (>= 50%), -1: none
    areas: list[int] = []  # full pixel count of each placed shape
    windows: list[tuple[slice, slice]] = []
    classes: list[int] = []
    for _ in range(n_objects):
        cls = int(rng.integers(len(CLASSES)))
        radius = math.exp(rng.uniform(math.log(MIN_SIZE_PX), math.log(0.5 * min(w, h)))) / 2
        angle, hole = rng.uniform(0, 2 * math.pi), rng.uniform(0.45, 0.7)
        for _attempt in range(10):
            center = rng.uniform([radius, radius], [w - radius, h - radius])
            x0, y0 = max(int(center[0] - radius) - 2, 0), max(int(center[1] - radius) - 2, 0)
            x1, y1 = min(int(center[0] + radius) + 3, w), min(int(center[1] + radius) + 3, h)
            win = (slice(y0, y1), slice(x0, x1))
            coverage = draw_mask((y1 - y0, x1 - x0), CLASSES[cls], center - (x0, y0), radius, angle, hole)
            solid = coverage >= 128
            if solid.any() and keeps_visible(owner, win, solid, areas, MIN_VISIBLE):
                break
        else:
            continue  # every placement would hide an earlier shape: leave this one out
        alpha = (coverage.astype(np.float32) * np.float32(1 / 255))[..., None]
        patch = image[win]
        colour = shape_colour(rng, patch[solid].mean(axis=0))
        image[win] = patch + (colour - patch) * alpha
        owner[win][solid] = len(areas)
        areas.append(int(solid.sum()))
        windows.append(win)
        classes.append(cls)
    annotations = [
        {"category_id": cls + 1, "bbox": bbox, "area": area} for (bbox, area), cls in zip(visible_boxes(owner, windows), classes)
    ]
    pixels = np.clip(image, 0, 255).astype(np.uint8)
    buffer = cv2.imencode(".jpg", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
    return buffer.tobytes(), w, h, annotations


def _render_many(args: tuple[int, int, int, int, int]) -> list[Rendered]:
    seed, split_id, start, stop, imgsz = args
    return [(data, ".jpg", w, h, anns) for data, w, h, anns in (render_image((seed, split_id, i), imgsz) for i in range(start, stop))]


def generate_shapes_dataset(
    out: Path, *, seed: int = 0, n_train: int = 2000, n_val: int = 300, imgsz: int = 320, workers: int | None = None
) -> Path:
    """Write out/train/{images/, instances_train.json}, out/val/{...} and out/dataset.yaml; return the YAML's path.

    Same seed and sizes, same bytes. `workers` processes render (default: the CPU count, at most 4). A split folder
    is replaced only if this generator wrote it.
    """
    if n_train < 1 or n_val < 1 or imgsz < 32:
        raise DetectorError(f"synth: need n_train >= 1, n_val >= 1 and imgsz >= 32 (got {n_train}, {n_val}, {imgsz})")
    out = check_output_folder(Path(out), "out")
    out.mkdir(parents=True, exist_ok=True)
    workers = min(os.cpu_count() or 1, 4) if workers is None else workers
    info = {"description": GENERATOR_TAG, "seed": seed, "imgsz": imgsz}
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASSES)]
    for split, count in (("train", n_train), ("val", n_val)):
        jobs = [(seed, SPLIT_IDS[split], s, min(s + CHUNK, count), imgsz) for s in range(0, count, CHUNK)]
        write_split(out, split, lambda: render_jobs(_render_many, jobs, workers), info=info, categories=categories)
    yaml_path = out / "dataset.yaml"
    yaml_path.write_text(
        f"# synthetic shapes (seed={seed}, imgsz={imgsz}), written by `detector data synth`\n"
        "train: {images: train/images, annotations: train/instances_train.json}\n"
        "val: {images: val/images, annotations: val/instances_val.json}\n"
    )
    return yaml_path


BUNDLED_YAML = Path("data") / "shapes.yaml"  # the `data` default, relative to the working directory
BUNDLED_YAML_TEXT = """\
# The bundled synthetic dataset (detector/data/synthetic.py): six shape classes on textured backgrounds.
# `detector train` writes this file and generates data/shapes/ on first use; `detector data synth out=data/shapes`
# regenerates it. Paths are relative to this file.
train: {images: shapes/train/images, annotations: shapes/train/instances_train.json}
val: {images: shapes/val/images, annotations: shapes/val/instances_val.json}
"""


def ensure_bundled_dataset(data_yaml: Path) -> None:
    """On first use of the bundled dataset (`data/shapes.yaml` under the working directory, the `data` default),
    write its YAML and generate its images there, in a checkout or any other folder. Any other YAML is left alone:
    a user's missing data is an error for the scan to report."""
    from detector.data.spec import load_data_spec

    bundled = Path.cwd() / BUNDLED_YAML
    if Path(data_yaml).resolve() != bundled.resolve():
        return
    if not bundled.exists():
        bundled.parent.mkdir(parents=True, exist_ok=True)
        bundled.write_text(BUNDLED_YAML_TEXT)
    spec = load_data_spec(bundled)
    paths = [spec.train.images, spec.train.annotations, spec.val.images, spec.val.annotations]
    if all(p.exists() for p in paths):
        return
    root = Path(os.path.commonpath(paths))
    LOGGER.info("generating the bundled shapes dataset in %s (first use, under a minute)", root)
    generate_shapes_dataset(root)
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DetectorError(f"{bundled}: the generated dataset lacks {missing[0]}; the YAML does not match the generator")

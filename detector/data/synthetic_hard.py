"""The `hard` synthetic benchmark: the six shape classes of `synthetic.py` made hard enough that a detector's
small-object, clutter and data-format handling shows (issue 12). Deterministic, seeded, COCO json.

What makes it hard, and why:
- category ids 3, 17, 5, 42, 8, 11 (not 1..n), listed out of order: the id <-> class mapping has to be right;
- objects from 8 px to 40% of the short side, skewed small (COCO-like small/medium/large mix), rotated, stretched
  (aspect up to 2.5), occluding each other (each keeps >= 40% visible) and cut by the border;
  0 to 20 per image (mean about 7), about 3% negatives, about 5% of images with a crowd region (a dense cluster of
  tiny shapes of one class: one box, iscrowd=1, area = box area, as COCO marks crowds);
- backgrounds: crops of photographs shipped inside scikit-image (no download), zoomed, flipped, colour-jittered,
  or gradients and noise; unlabelled look-alike clutter (lines, hexagons, blobs, partial arcs) in the same colours;
- low contrast objects and images, blur, noise, JPEG artefacts;
- images of 192-512 px per side (non-square), about 12% grayscale (mode L), 10% RGBA PNG, the rest RGB JPEG.
Boxes are the tight box of the *visible* pixels and `area` their count, exactly as in the easy set.

Every image is drawn from its own seed (seed, split, index, profile), so the bytes never depend on the process count.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from detector.data.synthetic import CLASSES, SUBPIXEL_BITS, draw_mask, shape_colour, textured_background
from detector.data.synthetic_common import (
    PhotoBank,
    Rendered,
    Window,
    degrade,
    encode_image,
    generate_profile,
    keeps_visible,
    paint,
    photo_background,
    visible_boxes,
)

GENERATOR_TAG = "detector synthetic shapes (hard)"
PROFILE_SALT = 1  # part of every image seed, so hard images never repeat easy ones
CATEGORY_IDS = {"circle": 3, "triangle": 17, "square": 5, "star": 42, "cross": 8, "ring": 11}
CATEGORY_ORDER = ("star", "square", "ring", "circle", "triangle", "cross")  # as listed in the json
# photographs bundled in the scikit-image wheel (tests check that each loads with the network off)
PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "page", "text", "hubble_deep_field",
          "immunohistochemistry", "clock", "grass", "gravel", "brick", "retina", "cell")
SIDE_RANGE_PX = (192, 512)
MIN_SIZE_PX, MAX_SIZE_FRACTION, SIZE_SKEW = 8.0, 0.4, 0.5  # size = MIN * (MAX / MIN) ** (u ** SKEW), u ~ U(0, 1)
MAX_ASPECT, STRETCH_FRACTION, MIN_MINOR_RADIUS_PX = 2.5, 0.6, 3.0
BORDER_FRACTION, MIN_INSIDE = 0.25, 0.4  # share of objects that may cross the border; fraction left inside
MIN_VISIBLE, MIN_PIXELS = 0.4, 12
MAX_OBJECTS, NEGATIVE_FRACTION, CROWD_FRACTION = 20, 0.03, 0.05
MAX_CLUTTER, LOW_CONTRAST_FRACTION = 12, 0.15
ATTEMPTS = 10

Parts = tuple[Window, list[np.ndarray], int]  # window in the image, coverages (uint8 over it), full pixel count


def _hard_background(rng: np.random.Generator, bank: PhotoBank, h: int, w: int) -> np.ndarray:
    """Photo (65%), the easy set's texture (20%) or a plain gradient with noise; maybe uneven lighting on top."""
    u = rng.random()
    if u < 0.65:
        image = photo_background(rng, bank, h, w, PHOTOS)
    elif u < 0.85:
        image = textured_background(rng, h, w)
    else:
        c0, c1 = rng.uniform(20, 235, (2, 3)).astype(np.float32)
        noise = rng.standard_normal((h, w, 1), dtype=np.float32) * np.float32(rng.uniform(2, 20))
        image = c0 + (c1 - c0) * (_ramp(rng, h, w) + 0.5)[..., None] + noise
    if rng.random() < 0.3:  # uneven lighting: a gain ramp across the image
        image = image * (1 + np.float32(rng.uniform(0.2, 0.6)) * _ramp(rng, h, w))[..., None]
    return np.ascontiguousarray(image, dtype=np.float32)


def _ramp(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A linear ramp from -0.5 to 0.5 along a random direction, float32 (H, W)."""
    theta = rng.uniform(0, 2 * math.pi)
    ramp = np.arange(w, dtype=np.float32)[None, :] * np.float32(math.cos(theta)) + np.arange(h, dtype=np.float32)[:, None] * np.float32(math.sin(theta))
    return (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0) - 0.5


def _clutter_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One unlabelled look-alike (line, filled hexagon, irregular blob or partial arc) as (H, W) uint8 coverage."""
    mask = np.zeros((h, w), np.uint8)
    scale = 1 << SUBPIXEL_BITS
    centre = rng.uniform([0, 0], [w, h])
    radius = math.exp(rng.uniform(math.log(4), math.log(0.25 * min(w, h))))
    kind = int(rng.integers(4))
    if kind == 0:
        end = centre + rng.uniform(-3, 3, 2) * radius
        pts = [tuple(int(v) for v in np.round(p * scale)) for p in (centre, end)]
        cv2.line(mask, pts[0], pts[1], 255, int(rng.integers(1, 7)), cv2.LINE_AA, SUBPIXEL_BITS)
    elif kind in (1, 2):
        k = 6 if kind == 1 else 14
        angles = rng.uniform(0, 2 * math.pi) + np.arange(k) * (2 * math.pi / k)
        radii = radius * (1 if kind == 1 else np.clip(1 + 0.35 * rng.standard_normal(k), 0.4, 1.6))
        poly = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1)
        cv2.fillPoly(mask, [np.round(poly * scale).astype(np.int32)], 255, cv2.LINE_AA, SUBPIXEL_BITS)
    else:
        start = rng.uniform(0, 360)
        axes = (round(radius * scale), round(radius / rng.uniform(1, 2) * scale))
        c = (round(centre[0] * scale), round(centre[1] * scale))
        thickness = int(rng.integers(2, 9))
        cv2.ellipse(mask, c, axes, rng.uniform(0, 360), start, start + rng.uniform(60, 250), 255, thickness, cv2.LINE_AA, SUBPIXEL_BITS)
    return mask


def _draw_clutter(rng: np.random.Generator, image: np.ndarray) -> None:
    """Up to MAX_CLUTTER look-alikes under the objects, in the objects' colour distribution; never annotated."""
    h, w = image.shape[:2]
    for _ in range(int(rng.integers(MAX_CLUTTER + 1))):
        mask = _clutter_mask(rng, h, w)
        x, y, bw, bh = cv2.boundingRect(mask)  # blend only where it was drawn
        if bw and bh:
            win = (slice(y, y + bh), slice(x, x + bw))
            ys, xs = np.nonzero(mask[win] >= 128)
            colour = shape_colour(rng, image[win][ys[0], xs[0]] if len(ys) else image[y, x])
            paint(image, mask[win], win, colour)


def _clipped(hw: tuple[int, int], center: np.ndarray, reach: float, draw: Callable[[tuple[int, int], np.ndarray], np.ndarray]) -> Parts | None:
    """Draw a shape reaching `reach` px from `center` in its own full window, then keep the part inside the image;
    None if nothing is inside. The full pixel count says how much the border cut."""
    h, w = hw
    x0, y0 = math.floor(center[0] - reach) - 2, math.floor(center[1] - reach) - 2
    x1, y1 = math.ceil(center[0] + reach) + 3, math.ceil(center[1] + reach) + 3
    full = draw((y1 - y0, x1 - x0), center - (x0, y0))
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    coverage = full[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    return (slice(cy0, cy1), slice(cx0, cx1)), [coverage], int((full >= 128).sum())


def _object_parts(rng: np.random.Generator, cls: int, hw: tuple[int, int]) -> Parts | None:
    """One rotated, maybe stretched shape, skewed small, maybe crossing the border."""
    h, w = hw
    short = min(w, h)
    size = MIN_SIZE_PX * (MAX_SIZE_FRACTION * short / MIN_SIZE_PX) ** (rng.random() ** SIZE_SKEW)
    radius = size / 2
    aspect = 1.0
    if rng.random() < STRETCH_FRACTION:
        aspect = min(math.exp(rng.uniform(0, math.log(MAX_ASPECT))), max(radius / MIN_MINOR_RADIUS_PX, 1.0))
    angle, hole = rng.uniform(0, 2 * math.pi), rng.uniform(0.45, 0.7)
    margin = 0.0 if rng.random() < BORDER_FRACTION else radius
    center = rng.uniform([margin, margin], [w - margin, h - margin])
    return _clipped(hw, center, radius, lambda shape, c: draw_mask(shape, CLASSES[cls], c, radius, angle, hole, aspect))


def _crowd_parts(rng: np.random.Generator, cls: int, hw: tuple[int, int]) -> Parts:
    """A dense cluster of 10-30 tiny shapes of one class inside a disc of radius 16-50 px (fully in the image)."""
    h, w = hw
    reach = rng.uniform(16, min(50.0, 0.3 * min(w, h)))
    center = rng.uniform([reach + 8, reach + 8], [w - reach - 8, h - reach - 8])
    x0, y0 = int(center[0] - reach) - 8, int(center[1] - reach) - 8
    win = (slice(y0, int(center[1] + reach) + 8), slice(x0, int(center[0] + reach) + 8))
    shape = (win[0].stop - y0, win[1].stop - x0)
    coverages = []
    for _ in range(int(rng.integers(10, 31))):
        r, phi = reach * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
        c = center - (x0, y0) + r * np.array([math.cos(phi), math.sin(phi)])
        coverages.append(draw_mask(shape, CLASSES[cls], c, rng.uniform(2.5, 6.0), rng.uniform(0, 2 * math.pi), 0.5))
    union = np.max(coverages, axis=0)
    return win, coverages, int((union >= 128).sum())


def _object_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """The easy set's colour rule, or (sometimes) a low-contrast colour 15-35 away from the background."""
    if rng.random() < LOW_CONTRAST_FRACTION:
        direction = rng.standard_normal(3)
        offset = direction / max(float(np.linalg.norm(direction)), 1e-6) * rng.uniform(15, 35)
        return np.clip(background + offset, 0, 255).astype(np.float32)
    return shape_colour(rng, background)


def _place(rng: np.random.Generator, image: np.ndarray, owner: np.ndarray, areas: list[int], cls: int, crowd: bool) -> tuple[Window, np.ndarray] | None:
    """Sample and paint one object (or crowd) where it keeps every earlier one MIN_VISIBLE visible and itself
    MIN_INSIDE inside the image; return its window and solid mask, or None after ATTEMPTS tries."""
    hw = owner.shape
    for _attempt in range(ATTEMPTS):
        parts = _crowd_parts(rng, cls, hw) if crowd else _object_parts(rng, cls, hw)
        if parts is None:
            continue
        win, coverages, full = parts
        solid = (coverages[0] if len(coverages) == 1 else np.max(coverages, axis=0)) >= 128
        inside = int(solid.sum())
        if inside >= max(MIN_PIXELS, MIN_INSIDE * full) and keeps_visible(owner, win, solid, areas, MIN_VISIBLE):
            break
    else:
        return None
    for coverage in coverages:
        part = coverage >= 128
        if part.any():
            paint(image, coverage, win, _object_colour(rng, image[win][part].mean(axis=0)))
    return win, solid


def _draw_objects(rng: np.random.Generator, image: np.ndarray) -> list[dict[str, Any]]:
    """Paint the image's objects (and maybe one crowd) in order, later on top; annotations of the visible pixels."""
    h, w = image.shape[:2]
    negative = rng.random() < NEGATIVE_FRACTION
    count = 0 if negative else min(1 + int(rng.negative_binomial(2, 0.25)), MAX_OBJECTS)
    crowd_at = int(rng.integers(count + 1)) if not negative and rng.random() < CROWD_FRACTION else -1
    owner = np.full((h, w), -1, np.int16)  # index of the topmost object covering each pixel, -1: none
    areas: list[int] = []
    windows: list[Window] = []
    kinds: list[tuple[int, bool]] = []
    for k in range(count + (crowd_at >= 0)):
        cls, crowd = int(rng.integers(len(CLASSES))), k == crowd_at
        placed = _place(rng, image, owner, areas, cls, crowd)
        if placed is None:
            continue
        win, solid = placed
        owner[win][solid] = len(areas)
        areas.append(int(solid.sum()))
        windows.append(win)
        kinds.append((cls, crowd))
    annotations = []
    for (bbox, area), (cls, crowd) in zip(visible_boxes(owner, windows), kinds):
        category_id = CATEGORY_IDS[CLASSES[cls]]
        annotations.append({"category_id": category_id, "bbox": bbox, "area": bbox[2] * bbox[3] if crowd else area, "iscrowd": int(crowd)})
    return annotations


def render_hard_image(seed: tuple[int, ...], bank: PhotoBank) -> Rendered:
    """One image from its own seed: (file bytes, suffix, width, height, [{category_id, bbox, area, iscrowd}])."""
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    w, h = (int(v) for v in rng.integers(SIDE_RANGE_PX[0], SIDE_RANGE_PX[1] + 1, 2))
    image = _hard_background(rng, bank, h, w)
    _draw_clutter(rng, image)
    annotations = _draw_objects(rng, image)
    data, suffix = encode_image(rng, degrade(rng, image))
    return data, suffix, w, h, annotations


def _render_many(args: tuple[int, int, int, int]) -> list[Rendered]:
    seed, split_id, start, stop = args
    bank = PhotoBank()
    return [render_hard_image((seed, split_id, i, PROFILE_SALT), bank) for i in range(start, stop)]


def generate_hard_dataset(out: Path, *, seed: int = 0, n_train: int = 600, n_val: int = 150, workers: int | None = None) -> Path:
    """Write out/{train,val}/{images/, instances_<split>.json}, out/stats.json and out/dataset.yaml; return the
    YAML's path. Same seed and sizes, same bytes; `workers` processes (default: the CPU count, at most 4)."""
    categories = [{"id": CATEGORY_IDS[name], "name": name, "supercategory": "shape"} for name in CATEGORY_ORDER]
    return generate_profile(
        Path(out), "hard", GENERATOR_TAG, "synthetic shapes", categories, _render_many, seed=seed, n_train=n_train, n_val=n_val, workers=workers
    )


__all__ = ["generate_hard_dataset", "render_hard_image", "CATEGORY_IDS", "CLASSES", "PHOTOS"]

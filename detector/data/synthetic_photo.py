"""The `photo` synthetic profile: textured objects cut out of scikit-image's photographs, pasted small, rotated and
occluding each other on crops of other photographs. A second hard set, made unlike the shapes of `hard`: its objects
are texture (faces, coins, a cat's face) rather than flat colour, so a recipe tuned on `hard` can be checked on data
it was not tuned on.

Seven classes (category ids 1..7): face (100 LFW faces), horse (the silhouette filled with a tinted photo texture),
logo, coin (each coin segmented from `coins`), wheel (the colour wheel), cat (the cat's face), cup (the coffee cup).
Objects from 8 px to 45% of the short side, log-uniform (about 60% COCO-small), aspect jitter, flips, rotation up to
30 degrees, colour jitter, cut by the border (at least 40% inside) and by later objects (every object keeps at least
40% visible). Unlabelled clutter under them: LFW non-faces (but six showing part of a face) and crops of photographs
no class comes from. The photos that hold a class (astronaut, camera: faces; chelsea, coffee, coins) never serve as
backgrounds. Blur, noise, gray/RGBA/JPEG files and sizes as in `hard`; boxes are the tight box of the visible pixels
and `area` their count.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

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
from detector.data.synthetic_hard import SIDE_RANGE_PX

GENERATOR_TAG = "detector synthetic photo objects"
PROFILE_SALT = 2  # part of every image seed, so photo images never repeat the other profiles' draws
CLASSES = ("face", "horse", "logo", "coin", "wheel", "cat", "cup")
BACKGROUNDS = ("brick", "grass", "gravel", "moon", "page", "text", "retina", "cell", "clock", "rocket",
               "hubble_deep_field", "immunohistochemistry")  # no face, cat, cup or coin in any of them
CLUTTER_PHOTOS = ("rocket", "immunohistochemistry", "hubble_deep_field", "retina", "brick")
HORSE_TEXTURES = ("gravel", "grass", "brick")
FACE_LIKE_NON_FACES = (14, 25, 26, 30, 93, 96)  # LFW "non-face" patches showing eyes, a mouth or a face's edge
COIN_MIN_AREA_PX, COIN_MAX_ASPECT = 900, 1.3
MIN_SIZE_PX, MAX_SIZE_FRACTION = 8.0, 0.45  # size = sqrt(area) of the cut-out's box, log-uniform in between
MAX_LOG_ASPECT, MAX_ROTATION_DEG = 0.35, 30.0
MIN_VISIBLE, MIN_INSIDE, MIN_PIXELS = 0.4, 0.4, 12
MAX_OBJECTS, NEGATIVE_FRACTION, MAX_CLUTTER = 16, 0.04, 6
ATTEMPTS = 10


class Cutout(NamedTuple):
    """One object or clutter picture: RGB uint8 (h, w, 3), mask uint8 (h, w) with 255 inside; `tint`: the pixels
    are a gray texture to colour per drawing."""

    pixels: np.ndarray
    mask: np.ndarray
    tint: bool = False


def _ellipse(h: int, w: int, centre: tuple[float, float] = (0.5, 0.5), radii: tuple[float, float] = (0.48, 0.48)) -> np.ndarray:
    """A filled ellipse mask (h, w) uint8; centre and radii as fractions of (w, h)."""
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (round(w * centre[0]), round(h * centre[1])), (round(w * radii[0]), round(h * radii[1])), 0, 0, 360, 255, -1)
    return mask


def _gray3(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _lfw(faces: bool) -> list[Cutout]:
    """The 100 LFW faces (or the subset's non-face patches but those showing part of a face), 25x25 gray, in an
    upright ellipse."""
    import skimage.data

    patches = np.round(skimage.data.lfw_subset() * 255).astype(np.uint8)
    mask = _ellipse(25, 25, radii=(0.45, 0.5))
    chosen = patches[:100] if faces else [p for k, p in enumerate(patches[100:]) if k not in FACE_LIKE_NON_FACES]
    return [Cutout(_gray3(p), mask) for p in chosen]


def _coins(bank: PhotoBank) -> list[Cutout]:
    """Each coin of `coins`: Otsu threshold, connected components over COIN_MIN_AREA_PX, holes filled; a component
    touching the photo's edge or far from round (the bright top strip merged with a coin) is left out."""
    gray = np.ascontiguousarray(bank.get("coins")[..., 0])
    _, binary = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    count, labels, boxes, _ = cv2.connectedComponentsWithStats(binary)
    cutouts = []
    for k in range(1, count):
        x, y, w, h, area = (int(v) for v in boxes[k])
        inside = x > 0 and y > 0 and x + w < gray.shape[1] and y + h < gray.shape[0]
        if area > COIN_MIN_AREA_PX and inside and max(w, h) <= COIN_MAX_ASPECT * min(w, h):
            component = ((labels[y : y + h, x : x + w] == k) * 255).astype(np.uint8)
            contours, _ = cv2.findContours(component, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            mask = cv2.drawContours(np.zeros((h, w), np.uint8), contours, -1, 255, cv2.FILLED)
            cutouts.append(Cutout(_gray3(gray[y : y + h, x : x + w]), mask))
    return cutouts


def _object_cutouts(bank: PhotoBank) -> list[list[Cutout]]:
    """The cut-outs of each class, in CLASSES order."""
    import skimage.data

    horse = (~skimage.data.horse()).astype(np.uint8) * 255
    textures = [Cutout(_gray3(cv2.resize(bank.get(name)[..., 0], horse.shape[::-1])), horse, tint=True) for name in HORSE_TEXTURES]
    logo = skimage.data.logo()
    wheel, cat, cup = bank.get("colorwheel"), bank.get("chelsea"), bank.get("coffee")[:400, 40:500]
    by_class = {
        "face": _lfw(faces=True),
        "horse": textures,
        "logo": [Cutout(np.ascontiguousarray(logo[..., :3]), _ellipse(*logo.shape[:2], radii=(0.49, 0.49)))],  # opaque alpha: the disc
        "coin": _coins(bank),
        "wheel": [Cutout(wheel, _ellipse(*wheel.shape[:2]))],
        "cat": [Cutout(cat, _ellipse(*cat.shape[:2], centre=(0.6, 0.45), radii=(0.4, 0.48)))],
        "cup": [Cutout(np.ascontiguousarray(cup), _ellipse(*cup.shape[:2], centre=(0.48, 0.48), radii=(0.44, 0.47)))],
    }
    return [by_class[name] for name in CLASSES]


class CutoutBank:
    """The photographs and cut-outs one render job draws from, built once per job."""

    def __init__(self) -> None:
        self.photos = PhotoBank()
        self.objects = _object_cutouts(self.photos)
        self.clutter_faces = _lfw(faces=False)

    def clutter(self, rng: np.random.Generator) -> Cutout:
        """An LFW non-face, or a crop (10-50% of the short side, rectangle or ellipse) of a photograph."""
        if rng.random() < 0.5:
            return self.clutter_faces[int(rng.integers(len(self.clutter_faces)))]
        photo = self.photos.get(CLUTTER_PHOTOS[int(rng.integers(len(CLUTTER_PHOTOS)))])
        ch, cw = (int(v) for v in rng.integers(min(photo.shape[:2]) // 10, min(photo.shape[:2]) // 2, 2))
        y, x = int(rng.integers(photo.shape[0] - ch + 1)), int(rng.integers(photo.shape[1] - cw + 1))
        mask = _ellipse(ch, cw) if rng.random() < 0.5 else np.full((ch, cw), 255, np.uint8)
        return Cutout(np.ascontiguousarray(photo[y : y + ch, x : x + cw]), mask)


def _transform(rng: np.random.Generator, cutout: Cutout, size: float) -> tuple[np.ndarray, np.ndarray]:
    """The cut-out resized to sqrt(box area) = `size` with aspect jitter, maybe flipped, rotated, colour-jittered:
    float32 pixels (h, w, 3) and uint8 coverage (h, w)."""
    h0, w0 = cutout.mask.shape
    aspect = math.exp(rng.uniform(-MAX_LOG_ASPECT, MAX_LOG_ASPECT))
    scale = size / math.sqrt(h0 * w0)
    w, h = max(round(w0 * scale * aspect), 3), max(round(h0 * scale / aspect), 3)
    resampling = cv2.INTER_AREA if w * h < w0 * h0 else cv2.INTER_LINEAR  # INTER_AREA enlarges as nearest neighbour
    pixels = cv2.resize(cutout.pixels, (w, h), interpolation=resampling).astype(np.float32)
    mask = cv2.resize(cutout.mask, (w, h), interpolation=resampling)
    if cutout.tint:
        pixels = rng.uniform(40, 230, 3).astype(np.float32) * (0.6 + pixels * np.float32(0.5 / 255))
    if rng.random() < 0.5:
        pixels, mask = pixels[:, ::-1], mask[:, ::-1]
    rotation = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG), 1.0)
    cos, sin = abs(rotation[0, 0]), abs(rotation[0, 1])
    ow, oh = math.ceil(h * sin + w * cos), math.ceil(h * cos + w * sin)
    rotation[:, 2] += (ow / 2 - w / 2, oh / 2 - h / 2)
    pixels = cv2.warpAffine(np.ascontiguousarray(pixels), rotation, (ow, oh), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(np.ascontiguousarray(mask), rotation, (ow, oh), flags=cv2.INTER_LINEAR)
    gain = rng.uniform(0.75, 1.25, 3).astype(np.float32) * np.float32(rng.uniform(0.7, 1.2))
    return pixels * gain + np.float32(rng.uniform(-30, 30)), mask


def _window(rng: np.random.Generator, hw: tuple[int, int], patch_hw: tuple[int, int]) -> tuple[Window, Window]:
    """Where a patch lands (about 60% of each side may fall outside): its window in the image and the matching part
    of the patch."""
    (h, w), (ph, pw) = hw, patch_hw
    y0 = int(rng.integers(-(ph * 3) // 5, h - (ph * 2) // 5 + 1))
    x0 = int(rng.integers(-(pw * 3) // 5, w - (pw * 2) // 5 + 1))
    y1, x1 = max(y0, 0), max(x0, 0)
    y2, x2 = max(min(y0 + ph, h), y1), max(min(x0 + pw, w), x1)
    return (slice(y1, y2), slice(x1, x2)), (slice(y1 - y0, y2 - y0), slice(x1 - x0, x2 - x0))


def _place(
    rng: np.random.Generator, image: np.ndarray, owner: np.ndarray, areas: list[int], cutout: Cutout
) -> tuple[Window, np.ndarray] | None:
    """Sample and paint one object where it keeps every earlier one MIN_VISIBLE visible and itself MIN_INSIDE
    inside the image; its window and solid mask, or None after ATTEMPTS tries."""
    hw = owner.shape
    for _attempt in range(ATTEMPTS):
        size = MIN_SIZE_PX * (MAX_SIZE_FRACTION * min(hw) / MIN_SIZE_PX) ** rng.random()
        pixels, coverage = _transform(rng, cutout, size)
        win, part = _window(rng, hw, coverage.shape)
        whole = coverage >= 128
        solid = whole[part]
        if int(solid.sum()) >= max(MIN_PIXELS, MIN_INSIDE * int(whole.sum())) and keeps_visible(owner, win, solid, areas, MIN_VISIBLE):
            paint(image, coverage[part], win, pixels[part])
            return win, solid
    return None


def _draw_clutter(rng: np.random.Generator, image: np.ndarray, bank: CutoutBank) -> None:
    """Up to MAX_CLUTTER unlabelled cut-outs, 8 px to 35% of the short side, under the objects."""
    h, w = image.shape[:2]
    for _ in range(int(rng.integers(MAX_CLUTTER + 1))):
        size = MIN_SIZE_PX * (0.35 * min(h, w) / MIN_SIZE_PX) ** rng.random()
        pixels, coverage = _transform(rng, bank.clutter(rng), size)
        win, part = _window(rng, (h, w), coverage.shape)
        paint(image, coverage[part], win, pixels[part])


def _draw_objects(rng: np.random.Generator, image: np.ndarray, bank: CutoutBank) -> list[dict[str, int | list[int]]]:
    """Paint the image's objects in order, later on top; annotations of their visible pixels."""
    h, w = image.shape[:2]
    count = 0 if rng.random() < NEGATIVE_FRACTION else min(1 + int(rng.negative_binomial(2, 0.3)), MAX_OBJECTS)
    owner = np.full((h, w), -1, np.int16)  # index of the topmost object covering each pixel, -1: none
    areas: list[int] = []
    windows: list[Window] = []
    classes: list[int] = []
    for _ in range(count):
        cls = int(rng.integers(len(CLASSES)))
        cutouts = bank.objects[cls]
        placed = _place(rng, image, owner, areas, cutouts[int(rng.integers(len(cutouts)))])
        if placed is not None:
            win, solid = placed
            owner[win][solid] = len(areas)
            areas.append(int(solid.sum()))
            windows.append(win)
            classes.append(cls)
    return [{"category_id": cls + 1, "bbox": bbox, "area": area} for (bbox, area), cls in zip(visible_boxes(owner, windows), classes)]


def render_photo_image(seed: tuple[int, ...], bank: CutoutBank) -> Rendered:
    """One image from its own seed: (file bytes, suffix, width, height, [{category_id, bbox, area}])."""
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    w, h = (int(v) for v in rng.integers(SIDE_RANGE_PX[0], SIDE_RANGE_PX[1] + 1, 2))
    image = np.ascontiguousarray(photo_background(rng, bank.photos, h, w, BACKGROUNDS))
    _draw_clutter(rng, image, bank)
    annotations = _draw_objects(rng, image, bank)
    data, suffix = encode_image(rng, degrade(rng, image))
    return data, suffix, w, h, annotations


def _render_many(args: tuple[int, int, int, int]) -> list[Rendered]:
    seed, split_id, start, stop = args
    bank = CutoutBank()
    return [render_photo_image((seed, split_id, i, PROFILE_SALT), bank) for i in range(start, stop)]


def generate_photo_dataset(out: Path, *, seed: int = 0, n_train: int = 600, n_val: int = 150, workers: int | None = None) -> Path:
    """Write the photo profile (splits, stats.json, dataset.yaml) under `out`; return the YAML's path. Same seed and
    sizes, same bytes; `workers` processes (default: the CPU count, at most 4)."""
    categories = [{"id": k + 1, "name": name, "supercategory": "object"} for k, name in enumerate(CLASSES)]
    return generate_profile(
        Path(out), "photo", GENERATOR_TAG, "synthetic photo objects", categories, _render_many, seed=seed, n_train=n_train, n_val=n_val, workers=workers
    )


__all__ = ["generate_photo_dataset", "render_photo_image", "CutoutBank", "CLASSES", "BACKGROUNDS"]

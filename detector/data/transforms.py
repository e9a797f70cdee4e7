"""Augmentation pipelines. Boxes are float `[x1, y1, x2, y2]` pixels with pixel edges at integers throughout.

Train, per sample (`TrainTransform`): images arrive resized so their long side is imgsz (the loader does that once,
and caches it with cache=ram). With probability `hyp.mosaic`, four images are tiled around a random centre of a
2*imgsz canvas (`mosaic4`, plain numpy: a slice copy per image, boxes shifted as arrays). Then one albumentations
`Compose` with `BboxParams`, so boxes travel with the pixels through every op:

  RandomAffine  scale, rotation, shear and translation, warped straight into the imgsz x imgsz output: the
                input's centre lands on the output's centre, so a single image is letterboxed (grey 114 pad) and
                a mosaic canvas is cropped to its middle, in one cv2.warpAffine of imgsz^2 pixels
  RandomHSV     YOLO-style multiplicative hue/saturation/value gains through 256-entry lookup tables
  Horizontal/VerticalFlip

then optionally mixup with a second such sample. Boxes are clipped; those narrower or lower than 2 px, or with less
than MIN_VISIBILITY of their area left inside the output, are dropped. Albumentations' own `A.Mosaic` (2.0.8)
builds a new Compose for every cell of every call (~20 ms a sample here), and `A.Affine` keeps the input size
(a 4x larger warp for the mosaic canvas), hence the two transforms of our own.

Val: `letterbox` (resize keeping the aspect ratio, centred pad to the target shape) and its exact inverse
`unletterbox_boxes`: a box maps as x' = ratio * x + pad_x, in continuous pixel coordinates.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Sequence
from typing import Any, Protocol

# albumentations asks PyPI for a newer version when first imported (a network call and a warning in every worker);
# its documented switch, read at that import; a user who set it keeps their value
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

# OpenCV's own thread pool is off for the whole process, as in most detection tools: a DataLoader worker forked
# after the parent used the pool hangs in cv2.setNumThreads (measured here), the workers are the parallelism, and
# on small machines idle pool threads cost more than they give (2 cores: 51 -> 78 images/s single-process).
cv2.setNumThreads(0)

FILL = 114  # grey of letterbox padding and empty mosaic areas
MIN_BOX_PX = 2.0  # augmented boxes narrower or lower than this are dropped
MIN_VISIBILITY = 0.2  # augmented boxes keeping less than this fraction of their area in the image are dropped

# (image HWC uint8, boxes (n, 4) float32 xyxy pixels, classes (n,) int64)
Sample = tuple[np.ndarray, np.ndarray, np.ndarray]


class AugmentHyp(Protocol):
    """The augmentation fields of the train config (detector.config.TrainConfig has exactly these names)."""

    hsv_h: float
    hsv_s: float
    hsv_v: float
    degrees: float
    translate: float
    scale: float
    shear: float
    fliplr: float
    flipud: float
    mosaic: float
    mixup: float


# ------------------------------------------------------------------------------------------ letterbox


def resize_by(image: np.ndarray, ratio: float) -> np.ndarray:
    """Resize by `ratio` on both axes so that x' = ratio * x holds exactly in continuous pixel coordinates
    (cv2.resize given fx/fy uses them as the scale; the output size is round(w * ratio)). Area-averaging when
    shrinking, bilinear when enlarging. A side that would round to 0 px (a 1 x 2000 strip) keeps 1 px, where
    cv2 would fail the whole batch."""
    if ratio == 1.0:
        return image
    interpolation = cv2.INTER_AREA if ratio < 1.0 else cv2.INTER_LINEAR
    h, w = image.shape[:2]
    if round(h * ratio) < 1 or round(w * ratio) < 1:
        return cv2.resize(image, (max(1, round(w * ratio)), max(1, round(h * ratio))), interpolation=interpolation)
    return cv2.resize(image, None, fx=ratio, fy=ratio, interpolation=interpolation)


def letterbox(image: np.ndarray, shape_hw: tuple[int, int]) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Fit `image` (H, W, 3) into `shape_hw` keeping its aspect ratio, centred on grey padding.

    Returns (out (shape_h, shape_w, 3), ratio, (pad_left, pad_top)); a box maps as x' = ratio * x + pad_left,
    y' = ratio * y + pad_top, exactly (see `unletterbox_boxes` for the inverse).
    """
    h, w = image.shape[:2]
    out_h, out_w = shape_hw
    ratio = min(out_h / h, out_w / w)
    resized = resize_by(image, ratio)
    new_h, new_w = resized.shape[:2]
    left, top = (out_w - new_w) // 2, (out_h - new_h) // 2
    out = cv2.copyMakeBorder(
        resized, top, out_h - new_h - top, left, out_w - new_w - left, cv2.BORDER_CONSTANT, value=(FILL,) * 3
    )
    return out, ratio, (left, top)


def unletterbox_boxes(
    boxes_xyxy: torch.Tensor, ratio: float | torch.Tensor, pad: tuple[float, float] | torch.Tensor,
    orig_hw: tuple[int, int] | torch.Tensor,
) -> torch.Tensor:
    """Map (N, 4) xyxy boxes in letterboxed-input pixels back to original-image pixels, clipped to the image.

    `ratio`, `pad` (left, top) and `orig_hw` are one image's, or each row's as (N, 1), (N, 2) and (N, 2) tensors on
    the boxes' device (a batch of images' rows mapped in one call, `infer.evaluator.detections_to_rows`)."""
    pad_xy = torch.as_tensor(pad, dtype=boxes_xyxy.dtype, device=boxes_xyxy.device)
    size_wh = torch.as_tensor(orig_hw, dtype=boxes_xyxy.dtype, device=boxes_xyxy.device).flip(-1)
    out = (boxes_xyxy - torch.cat((pad_xy, pad_xy), -1)) / ratio
    return torch.minimum(out.clamp(min=0), torch.cat((size_wh, size_wh), -1))


def letterbox_batch(images: Sequence[np.ndarray], imgsz: int, stride: int) -> tuple[torch.Tensor, list[float], list[tuple[int, int]]]:
    """Letterbox RGB images into one uint8 batch (B, 3, H, W).

    Each image is scaled so its long side is `imgsz`; the batch shape is the smallest multiple of `stride` holding
    every scaled image (a batch of landscape images is not padded to a square). Returns the batch, and per image the
    ratio and (pad_left, pad_top) that `unletterbox_boxes` inverts.
    """
    sizes = np.array([image.shape[:2] for image in images], dtype=np.float64)  # (B, 2) h, w
    scaled = np.maximum(np.round(sizes * (imgsz / sizes.max(axis=1, keepdims=True))), 1)  # a 1 x 1300 strip: 1 px
    shape_hw = (np.ceil(scaled.max(axis=0) / stride) * stride).astype(int)
    out, ratios, pads = [], [], []
    for image in images:
        boxed, ratio, pad = letterbox(image, (int(shape_hw[0]), int(shape_hw[1])))
        out.append(torch.from_numpy(np.ascontiguousarray(boxed)))
        ratios.append(ratio)
        pads.append(pad)
    return torch.stack(out).permute(0, 3, 1, 2), ratios, pads  # channels_last in memory, as `collate`'s batches


def to_model_input(images: torch.Tensor, device: torch.device | str, *, channels_last: bool = True,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A uint8 (B, 3, H, W) batch as the model takes it: on `device`, `dtype` in [0, 1], channels_last if asked.

    The one place images are scaled, so training, validation, prediction and the attention maps feed the model the
    same numbers (the conversion runs on the device: a uint8 copy is a quarter of a float one). The layout is set
    on the uint8 pixels, a no-op for the loaders' channels_last batches, and the float conversion keeps it."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return images.to(device, non_blocking=True).contiguous(memory_format=layout).to(dtype).div_(255)


# ---------------------------------------------------------------------------------------------- mosaic


def clip_and_filter(
    boxes: np.ndarray, classes: np.ndarray, width: float, height: float
) -> tuple[np.ndarray, np.ndarray]:
    """Clip (n, 4) xyxy boxes to the image; drop those under MIN_BOX_PX or with < MIN_VISIBILITY area left."""
    clipped = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
    wh = clipped[:, 2:] - clipped[:, :2]
    full = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    keep = (wh >= MIN_BOX_PX).all(axis=1) & (np.prod(wh, axis=1) >= MIN_VISIBILITY * np.maximum(full, 1e-9))
    return clipped[keep], classes[keep]


def mosaic4(samples: list[Sample], imgsz: int, center_xy: tuple[int, int]) -> Sample:
    """Tile four samples (long side <= imgsz) on a (2*imgsz, 2*imgsz) grey canvas, meeting at `center_xy`:
    top-left, top-right, bottom-left, bottom-right, each pushed against the centre and cut at the canvas edge."""
    size = 2 * imgsz
    xc, yc = center_xy
    canvas = np.full((size, size, 3), FILL, np.uint8)
    all_boxes, all_classes = [], []
    for k, (image, boxes, classes) in enumerate(samples):
        h, w = image.shape[:2]
        x0 = xc - w if k in (0, 2) else xc  # where the image's top-left corner goes, before cutting
        y0 = yc - h if k in (0, 1) else yc
        cx1, cy1, cx2, cy2 = max(x0, 0), max(y0, 0), min(x0 + w, size), min(y0 + h, size)
        canvas[cy1:cy2, cx1:cx2] = image[cy1 - y0 : cy2 - y0, cx1 - x0 : cx2 - x0]
        all_boxes.append(boxes + np.array([x0, y0, x0, y0], np.float32))
        all_classes.append(classes)
    boxes = np.concatenate(all_boxes).reshape(-1, 4)
    classes = np.concatenate(all_classes).astype(np.int64)
    boxes, classes = clip_and_filter(boxes, classes, size, size)
    return canvas, boxes, classes


# ---------------------------------------------------------------------------------------------- albumentations


class RandomAffine(A.DualTransform):
    """Random scale, rotation, shear and translation warped into a fixed `out_hw` output in one cv2.warpAffine.

    The input's centre maps to the output's centre (plus translate * output size). Boxes: the four corners are
    mapped and their axis-aligned hull kept (exact without rotation/shear, a bound with them).
    """

    def __init__(
        self,
        out_hw: tuple[int, int],
        *,
        degrees: float = 0.0,
        translate: float = 0.0,
        scale: float = 0.0,
        shear: float = 0.0,
        fill: int = FILL,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.out_hw = out_hw
        self.degrees, self.translate, self.scale, self.shear = degrees, translate, scale, shear
        self.fill = fill

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        out_h, out_w = self.out_hw
        uniform = self.py_random.uniform
        angle = math.radians(uniform(-self.degrees, self.degrees))
        gain = uniform(1 - self.scale, 1 + self.scale)
        shear_x = math.tan(math.radians(uniform(-self.shear, self.shear)))
        shear_y = math.tan(math.radians(uniform(-self.shear, self.shear)))
        rotate = gain * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        linear = np.array([[1.0, shear_x], [shear_y, 1.0]]) @ rotate
        target = np.array(
            [out_w / 2 + uniform(-self.translate, self.translate) * out_w,
             out_h / 2 + uniform(-self.translate, self.translate) * out_h]
        )
        offset = target - linear @ np.array([w / 2, h / 2])
        return {"matrix": np.concatenate([linear, offset[:, None]], axis=1)}

    def apply(self, img: np.ndarray, matrix: np.ndarray, **params: Any) -> np.ndarray:
        # cv2 maps pixel centres (integer indices); continuous x' = Mx + t becomes centre x' = Mx + t + (M - I)/2
        warp = matrix.copy()
        warp[:, 2] += matrix[:, :2] @ np.array([0.5, 0.5]) - 0.5
        out_h, out_w = self.out_hw
        return cv2.warpAffine(
            img, warp, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
            borderValue=(self.fill,) * 3,
        )

    def apply_to_bboxes(self, bboxes: np.ndarray, matrix: np.ndarray, **params: Any) -> np.ndarray:
        # albumentations hands boxes normalised to the input shape and expects them normalised to the output's
        h, w = params["shape"][:2]
        out_h, out_w = self.out_hw
        if len(bboxes) == 0:
            return bboxes
        xyxy = bboxes[:, :4] * np.array([w, h, w, h])
        corners = xyxy[:, [0, 1, 2, 1, 2, 3, 0, 3]].reshape(-1, 4, 2)
        mapped = corners @ matrix[:, :2].T + matrix[:, 2]
        out = bboxes.copy()
        out[:, :4] = np.concatenate([mapped.min(axis=1), mapped.max(axis=1)], axis=1) / [out_w, out_h, out_w, out_h]
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("out_hw", "degrees", "translate", "scale", "shear", "fill")


class RandomHSV(A.ImageOnlyTransform):
    """Hue, saturation and value multiplied by random gains in [1 - g, 1 + g] (hue wraps around), as YOLO
    detectors do; A.HueSaturationValue adds shifts instead. One lookup table per channel, no per-pixel math."""

    def __init__(self, hgain: float = 0.0, sgain: float = 0.0, vgain: float = 0.0, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.hgain, self.sgain, self.vgain = hgain, sgain, vgain

    def get_params(self) -> dict[str, Any]:
        limits = np.array([self.hgain, self.sgain, self.vgain])
        return {"gains": 1 + self.random_generator.uniform(-1, 1, 3) * limits}

    def apply(self, img: np.ndarray, gains: np.ndarray, **params: Any) -> np.ndarray:
        if not (gains != 1).any():
            return img
        x = np.arange(256, dtype=np.float32)
        # one (1, 256, 3) table: cv2.LUT maps each channel by its own column, without a split and a merge
        # (0.42 -> 0.22 ms for a 256 px image, the same pixels)
        lut = np.stack([(x * gains[0]) % 180, np.clip(x * gains[1], 0, 255), np.clip(x * gains[2], 0, 255)], -1)
        hsv = cv2.LUT(cv2.cvtColor(img, cv2.COLOR_RGB2HSV), lut.astype(np.uint8)[None])
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("hgain", "sgain", "vgain")


def build_train_compose(imgsz: int, hyp: AugmentHyp) -> A.Compose:
    """Affine (+ letterbox or mosaic crop) -> HSV -> flips, boxes filtered once at the end (clip, >= 2 px,
    >= MIN_VISIBILITY of the box's area inside the output)."""
    bbox_params = A.BboxParams(
        format="pascal_voc",
        label_fields=["class_labels"],
        min_width=MIN_BOX_PX,
        min_height=MIN_BOX_PX,
        min_visibility=MIN_VISIBILITY,
        clip=True,  # x2 = W + 1e-6 from float rounding is clipped, never a ValueError
        filter_invalid_bboxes=True,
        check_each_transform=False,  # boxes may leave the image between steps; filtered against the final image
    )
    return A.Compose(
        [
            RandomAffine(
                (imgsz, imgsz), degrees=hyp.degrees, translate=hyp.translate, scale=hyp.scale, shear=hyp.shear
            ),
            RandomHSV(hyp.hsv_h, hyp.hsv_s, hyp.hsv_v),
            A.HorizontalFlip(p=hyp.fliplr),
            A.VerticalFlip(p=hyp.flipud),
        ],
        bbox_params=bbox_params,
    )


def seed_compose(compose: A.Compose, seed: int) -> None:
    """Seed every transform from ONE shared generator pair. (`A.Compose(seed=s)` gives each transform its own
    generator seeded with the same s, so e.g. both flips draw identical numbers and always fire together.)"""
    compose.set_random_state(np.random.default_rng(seed), random.Random(seed))


# ---------------------------------------------------------------------------------------------- the pipeline


class TrainTransform:
    """One augmented training sample from the dataset's images: mosaic (p=hyp.mosaic, while enabled), the
    albumentations compose, mixup (p=hyp.mixup of the mosaic samples only, as in YOLOv5: none once mosaic is
    off). Deterministic given the seed passed to `reseed`."""

    def __init__(self, imgsz: int, hyp: AugmentHyp, seed: int = 0) -> None:
        self.imgsz = imgsz
        self.hyp = hyp
        self.compose = build_train_compose(imgsz, hyp)
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Restart every random stream (TrainDataset does, per process, at the start of each epoch)."""
        self.rng = np.random.default_rng(seed)
        seed_compose(self.compose, seed)

    def __call__(
        self, load: Callable[[int], Sample], index: int, partners: Sequence[int] | int, *, mosaic: bool
    ) -> tuple[Sample, bool]:
        """`load(i)` gives image i resized to long side imgsz with its boxes; mosaic and mixup partners are drawn
        from `partners` (indices, or a count n for range(n)). Returns (sample, whether mosaic was used)."""
        use_mosaic = mosaic and self.rng.random() < self.hyp.mosaic
        sample = self._one(load, index, partners, use_mosaic)
        if use_mosaic and self.rng.random() < self.hyp.mixup:
            other = self._one(load, int(self.rng.choice(partners)), partners, True)
            sample = mixup(sample, other, float(self.rng.beta(32.0, 32.0)))
        return sample, use_mosaic

    def _one(self, load: Callable[[int], Sample], index: int, partners: Sequence[int] | int, use_mosaic: bool) -> Sample:
        if use_mosaic:
            samples = [load(index)] + [load(int(i)) for i in self.rng.choice(partners, size=3)]
            order = self.rng.permutation(4)  # the primary image is not always top-left
            center = self.rng.integers(self.imgsz // 2, 3 * self.imgsz // 2 + 1, size=2)
            image, boxes, classes = mosaic4([samples[k] for k in order], self.imgsz, (int(center[0]), int(center[1])))
        else:
            image, boxes, classes = load(index)
        out = self.compose(image=image, bboxes=boxes.reshape(-1, 4), class_labels=classes)
        boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        classes = np.asarray(out["class_labels"], dtype=np.int64).reshape(-1)
        return out["image"], boxes, classes


def mixup(a: Sample, b: Sample, ratio: float) -> Sample:
    """Blend two samples' pixels (a * ratio + b * (1 - ratio)) and keep both box sets."""
    image = cv2.addWeighted(a[0], ratio, b[0], 1.0 - ratio, 0.0)
    return image, np.concatenate([a[1], b[1]]), np.concatenate([a[2], b[2]])

"""Train augmentation (boxes follow the pixels through mosaic, affine, flips), the val letterbox and its inverse,
seeding, border rounding."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from detector.config import TrainConfig
from detector.data.coco import CocoDataset
from detector.data.loader import TrainDataset
from detector.data.spec import SplitSpec
from detector.data.transforms import (
    FILL,
    RandomAffine,
    RandomHSV,
    TrainTransform,
    build_train_compose,
    clip_and_filter,
    letterbox,
    letterbox_batch,
    mixup,
    mosaic4,
    seed_compose,
    to_model_input,
    unletterbox_boxes,
)

IMGSZ = 128
NO_COLOUR = dict(hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, mixup=0.0)


def red_rectangles_dataset(root: Path, count: int = 8, seed: int = 0) -> SplitSpec:
    """Images of several sizes on black, each with one solid red rectangle (kept 4 px from the border, so
    rectangles of neighbouring mosaic tiles never touch); the box is exactly the rectangle."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i in range(count):
        w, h = int(rng.integers(40, 160)), int(rng.integers(40, 160))
        bw, bh = int(rng.integers(6, w - 8)), int(rng.integers(6, h - 8))
        x, y = int(rng.integers(4, w - bw - 3)), int(rng.integers(4, h - bh - 3))
        pixels = np.zeros((h, w, 3), np.uint8)
        pixels[y : y + bh, x : x + bw] = (255, 0, 0)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [x, y, bw, bh], "iscrowd": 0})
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "rect"}]}
    (root / "instances.json").write_text(json.dumps(data))
    return SplitSpec(images=root / "images", annotations=root / "instances.json")


def check_boxes_follow_pixels(image: np.ndarray, boxes: np.ndarray, tol: float = 1.5) -> None:
    """Every box is tight (within tol) around red pixels, and every red region is enclosed by a box unless it
    was cut by the output border or the mosaic's edge (then its box may have been dropped as mostly invisible)."""
    r, g, b = (image[..., k].astype(int) for k in range(3))
    loose = (r > 100) & (g < 80) & (b < 80)  # at least ~40% covered by the rectangle
    strict = (r > 200) & (g < 40) & (b < 40)  # interior
    h, w = loose.shape
    for x1, y1, x2, y2 in boxes:
        ys, xs = np.nonzero(loose[max(int(y1 - 1), 0) : int(np.ceil(y2 + 1)), max(int(x1 - 1), 0) : int(np.ceil(x2 + 1))])
        assert len(xs), f"box {x1, y1, x2, y2} holds no object pixels"
        found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) + [max(int(x1 - 1), 0), max(int(y1 - 1), 0)] * 2
        assert np.abs(found - [x1, y1, x2, y2]).max() <= tol, (found, (x1, y1, x2, y2))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(strict.astype(np.uint8), connectivity=8)
    pad = (np.abs(image.astype(int) - FILL) <= 2).all(axis=2)
    pad_near = cv2.dilate(pad.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    for k in range(1, n):
        x, y, cw, ch = stats[k, :4]
        enclosed = any(
            x >= x1 - tol and y >= y1 - tol and x + cw <= x2 + tol and y + ch <= y2 + tol for x1, y1, x2, y2 in boxes
        )
        cut = x <= 1 or y <= 1 or x + cw >= w - 1 or y + ch >= h - 1 or (pad_near & (labels == k)).any()
        assert enclosed or cut, f"object at {x, y, cw, ch} has no box"


@pytest.mark.parametrize("mosaic", [1.0, 0.0])
def test_boxes_follow_the_pixels(tmp_path: Path, mosaic: float) -> None:
    coco = CocoDataset(red_rectangles_dataset(tmp_path / "d"))
    hyp = replace(TrainConfig(), mosaic=mosaic, scale=0.5, translate=0.2, shear=0.0, fliplr=0.5, flipud=0.5, **NO_COLOUR)
    n_boxes = 0
    for seed in range(6):
        dataset = TrainDataset(coco, imgsz=IMGSZ, hyp=hyp, seed=seed)
        for i in range(len(dataset)):
            sample = dataset[i]
            image = sample["image"].permute(1, 2, 0).numpy()
            cls, cx, cy, bw, bh = sample["labels"].numpy().T * np.array([[1], [IMGSZ], [IMGSZ], [IMGSZ], [IMGSZ]])
            boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
            assert image.shape == (IMGSZ, IMGSZ, 3) and sample["meta"]["mosaic"] == (mosaic == 1.0)
            assert (boxes >= -1e-3).all() and (boxes <= IMGSZ + 1e-3).all() and ((boxes[:, 2:] - boxes[:, :2]) >= 2 - 1e-3).all()
            check_boxes_follow_pixels(image, boxes)
            n_boxes += len(boxes)
    assert n_boxes > 6 * len(coco) * (1.5 if mosaic else 0.7)  # most objects survive the crops


def test_boxes_follow_rotation_and_shear_as_bounds(tmp_path: Path) -> None:
    """A rotated and sheared rectangle's box is the hull of its four mapped corners, tight around its pixels: a box
    inside the image matches one object's pixels within 1.5 px; a box cut by the output border holds its object's
    pixels (the hull's far corners may lie outside). An object without a box must be one cut by the border."""
    coco = CocoDataset(red_rectangles_dataset(tmp_path / "d"))
    hyp = replace(TrainConfig(), degrees=30.0, shear=10.0, scale=0.3, **NO_COLOUR)
    tol, n_inside, n_cut = 1.5, 0, 0
    for seed in range(4):
        dataset = TrainDataset(coco, imgsz=IMGSZ, hyp=hyp, seed=seed)
        for i in range(len(dataset)):
            sample = dataset[i]
            image = sample["image"].permute(1, 2, 0).numpy()
            r, g, b = (image[..., k].astype(int) for k in range(3))
            loose = (r > 100) & (g < 80) & (b < 80)  # at least ~40% covered by a rectangle
            strict = (r > 200) & (g < 40) & (b < 40)  # interior
            _, cx, cy, bw, bh = sample["labels"].numpy().T * np.array([[1], [IMGSZ], [IMGSZ], [IMGSZ], [IMGSZ]])
            boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
            # the rectangles lie >= 8 px apart before the warp (4 px from each image's border), so each is one blob
            _, _, stats, _ = cv2.connectedComponentsWithStats(loose.astype(np.uint8), connectivity=8)
            objects = np.array([[x, y, x + w, y + h] for x, y, w, h in stats[1:, :4]], np.float64).reshape(-1, 4)
            touches = (objects[:, :2] <= 0).any(axis=1) | (objects[:, 2:] >= IMGSZ).any(axis=1)
            for box in boxes:
                if (box[:2] > 0.5).all() and (box[2:] < IMGSZ - 0.5).all():
                    assert np.abs(objects - box).max(axis=1).min(initial=np.inf) <= tol, (seed, i, box, objects)
                    n_inside += 1
                else:  # some object at the border lies inside the box
                    overhang = np.concatenate([box[:2] - objects[:, :2], objects[:, 2:] - box[2:]], axis=1).max(axis=1)
                    assert ((overhang <= tol) & touches).any(), (seed, i, box, objects)
                    n_cut += 1
            covered = np.zeros_like(strict)
            for x1, y1, x2, y2 in boxes:
                covered[max(int(y1 - 1.5), 0) : int(y2 + 2.5), max(int(x1 - 1.5), 0) : int(x2 + 2.5)] = True
            _, labels, stats, _ = cv2.connectedComponentsWithStats(strict.astype(np.uint8), connectivity=8)
            for k in np.unique(labels[strict & ~covered]):  # objects with pixels outside every box
                x, y, w, h = stats[k, :4]
                assert x <= 1 or y <= 1 or x + w >= IMGSZ - 1 or y + h >= IMGSZ - 1, f"object at {x, y, w, h} has no box"
    assert n_inside >= 8 and n_cut >= 8  # both kinds checked


def test_train_transform_is_deterministic_given_the_seed(tmp_path: Path) -> None:
    coco = CocoDataset(red_rectangles_dataset(tmp_path / "d"))
    hyp = replace(TrainConfig(), mixup=0.5)

    def run(seed: int) -> list[np.ndarray]:
        dataset = TrainDataset(coco, imgsz=64, hyp=hyp, seed=seed)
        return [np.concatenate([dataset[i]["image"].numpy().ravel(), dataset[i]["labels"].numpy().ravel()]) for i in range(6)]

    first, again, other = run(3), run(3), run(4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_seeded_flips_are_independent() -> None:
    # A.Compose(seed=s) would give both flips identical random streams; seed_compose shares one stream
    hyp = replace(TrainConfig(), fliplr=0.5, flipud=0.5, scale=0.0, translate=0.0, **NO_COLOUR)
    compose = build_train_compose(32, hyp)
    seed_compose(compose, 0)
    decisions = []
    for _ in range(40):
        compose(image=np.zeros((32, 32, 3), np.uint8), bboxes=np.zeros((0, 4)), class_labels=np.zeros(0))
        decisions.append((bool(compose.transforms[2].params), bool(compose.transforms[3].params)))
    assert len(set(decisions)) == 4
    up_down = build_train_compose(32, replace(hyp, fliplr=0.0, flipud=1.0, shear=0.0))  # each flip its own probability
    image = np.zeros((32, 32, 3), np.uint8)
    image[:8, :8] = 255  # a top-left corner
    out = up_down(image=image, bboxes=np.array([[0.0, 0.0, 8.0, 8.0]]), class_labels=np.zeros(1))
    assert (out["image"][24:, :8] == 255).all() and np.allclose(out["bboxes"], [[0, 24, 8, 32]])  # bottom-left


def test_border_rounding_never_raises() -> None:
    compose = build_train_compose(64, replace(TrainConfig(), **NO_COLOUR))
    seed_compose(compose, 0)
    image = np.zeros((48, 64, 3), np.uint8)
    boxes = np.array([[54.0, 10.0, 64.0 + 1e-6, 20.0], [-1e-6, 40.0, 10.0, 48.0 + 1e-5], [0.0, 0.0, 64.0, 48.0]])
    for _ in range(20):
        out = compose(image=image, bboxes=boxes, class_labels=np.array([0, 1, 2]))
        assert np.all(np.asarray(out["bboxes"]) >= 0) and np.all(np.asarray(out["bboxes"]) <= 64)


def test_mosaic4_places_images_around_the_centre() -> None:
    samples = []
    for k in range(4):
        image = np.full((20, 30, 3), 50 * (k + 1), np.uint8)
        samples.append((image, np.array([[0, 0, 30, 20]], np.float32), np.array([k])))
    canvas, boxes, classes = mosaic4(samples, 32, (40, 30))
    assert canvas.shape == (64, 64, 3)
    expected = {0: [10, 10, 40, 30], 1: [40, 10, 64, 30], 2: [10, 30, 40, 50], 3: [40, 30, 64, 50]}
    for box, cls in zip(boxes, classes):
        assert np.allclose(box, expected[int(cls)])
        x1, y1, x2, y2 = box.astype(int)
        assert (canvas[y1:y2, x1:x2] == 50 * (cls + 1)).all()
    assert (canvas[:10] == FILL).all()


def test_mosaic4_clips_boxes_and_drops_those_mostly_outside_the_canvas() -> None:
    image = np.zeros((32, 32, 3), np.uint8)
    sample = (image, np.array([[0, 0, 10, 10], [20, 20, 32, 32]], np.float32), np.array([0, 1]))
    _, boxes, _ = mosaic4([sample] * 4, 32, (30, 30))  # top-left tile starts at (-2, -2): 64% of box 0 left
    assert [0, 0, 8, 8] in boxes.tolist()
    _, boxes, _ = mosaic4([sample] * 4, 32, (24, 24))  # starts at (-8, -8): 4% left, dropped
    assert [12, 12, 24, 24] in boxes.tolist()
    assert not ((boxes[:, 0] == 0) & (boxes[:, 1] == 0)).any()


def test_hsv_gains() -> None:
    image = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    assert np.array_equal(RandomHSV().apply(image, gains=np.ones(3)), image)
    grey = np.full((4, 4, 3), 100, np.uint8)
    assert np.array_equal(RandomHSV().apply(grey, gains=np.array([1.3, 1.0, 1.0])), grey)  # no hue on grey
    brighter = RandomHSV().apply(grey, gains=np.array([1.0, 1.0, 1.5]))
    assert (brighter == 150).all()



def test_hsv_gains_are_drawn_on_both_sides_of_1() -> None:
    """Each gain is uniform in [1 - g, 1 + g]: an image gets duller or darker as often as more vivid or brighter."""
    hsv = RandomHSV(0.015, 0.7, 0.4)
    hsv.set_random_state(np.random.default_rng(0), random.Random(0))
    gains = np.array([hsv.get_params()["gains"] for _ in range(200)])
    limits = np.array([0.015, 0.7, 0.4])
    assert (gains >= 1 - limits).all() and (gains <= 1 + limits).all()
    assert ((gains < 1).mean(0) > 0.35).all() and ((gains > 1).mean(0) > 0.35).all()


def test_hsv_maps_each_channel_by_its_own_gain() -> None:
    """Against the per-channel definition in numpy: H * gh mod 180, S * gs and V * gv clipped to 255."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for gains in (np.array([1.015, 0.3, 1.4]), np.array([0.985, 1.7, 0.6])):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(np.float32)
        x = np.arange(256, dtype=np.float32)
        tables = [((x * gains[0]) % 180), np.clip(x * gains[1], 0, 255), np.clip(x * gains[2], 0, 255)]
        expected = np.stack([tables[c].astype(np.uint8)[hsv[..., c].astype(np.uint8)] for c in range(3)], -1)
        assert np.array_equal(RandomHSV().apply(image, gains=gains), cv2.cvtColor(expected, cv2.COLOR_HSV2RGB))

@pytest.mark.parametrize(
    ("size_wh", "shape_hw"),
    [((300, 180), (128, 128)), ((61, 43), (128, 128)), ((180, 300), (128, 96)), ((97, 97), (64, 64))],
)
def test_letterbox_inverse_maps_back_within_half_a_pixel(size_wh: tuple[int, int], shape_hw: tuple[int, int]) -> None:
    w, h = size_wh
    x1, y1, x2, y2 = int(0.13 * w), int(0.29 * h), int(0.71 * w), int(0.83 * h)
    image = np.zeros((h, w, 3), np.uint8)
    image[y1:y2, x1:x2] = 255
    out, ratio, pad = letterbox(image, shape_hw)
    assert out.shape[:2] == shape_hw and ratio == pytest.approx(min(shape_hw[0] / h, shape_hw[1] / w))
    assert (out[: pad[1]] == FILL).all() and (out[:, : pad[0]] == FILL).all()
    inside = out[..., 0].astype(float) / 255 * (np.abs(out[..., 0].astype(int) - FILL) > 0)
    # sub-pixel edges from the coverage profile through the middle of the box: sum = width, centroid = centre
    row = inside[int((y1 + y2) / 2 * ratio + pad[1])]
    col = inside[:, int((x1 + x2) / 2 * ratio + pad[0])]
    cols, rows = np.arange(len(row)) + 0.5, np.arange(len(col)) + 0.5
    cx, width = (row * cols).sum() / row.sum(), row.sum()
    cy, height = (col * rows).sum() / col.sum(), col.sum()
    found = torch.tensor([[cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2]])
    back = unletterbox_boxes(found, ratio, pad, (h, w))
    assert torch.allclose(back, torch.tensor([[x1, y1, x2, y2]], dtype=back.dtype), atol=0.5), back


def test_an_odd_padding_leaves_its_extra_pixel_at_the_right_and_bottom() -> None:
    """As YOLOv5's letterbox: pad_left = floor(total / 2), so a fixed graph sees the same pixels as `predict`."""
    out, ratio, pad = letterbox(np.zeros((10, 9, 3), np.uint8), (10, 10))  # 1 px of padding in x
    assert (ratio, pad) == (1.0, (0, 0)) and (out[:, 9] == FILL).all() and (out[:, :9] == 0).all()
    out, ratio, pad = letterbox(np.zeros((7, 10, 3), np.uint8), (10, 10))  # 3 px in y: 1 above, 2 below
    assert (ratio, pad) == (1.0, (0, 1)) and (out[[0, 8, 9]] == FILL).all() and (out[1:8] == 0).all()


@pytest.mark.parametrize("size_hw", [(1, 2000), (2000, 1), (3, 900)])
def test_a_strip_thinner_than_a_pixel_once_scaled_letterboxes_to_one_pixel_row(size_hw: tuple[int, int]) -> None:
    """cv2.resize fails on a 0-px side: one such image would fail every batch it is in."""
    image = np.full((*size_hw, 3), 200, np.uint8)
    batch, ratios, pads = letterbox_batch([image, np.zeros((50, 60, 3), np.uint8)], 256, 32)
    strip = batch[0, 0]
    assert batch.shape[0] == 2 and (strip == 200).sum() == max(size_hw) * ratios[0] == 256
    box = unletterbox_boxes(torch.tensor([[0.0, 0.0, 256.0, 256.0]]), ratios[0], pads[0], size_hw)
    assert box.tolist()[0] == pytest.approx([0.0, 0.0, size_hw[1], size_hw[0]], abs=1e-3)


def test_unletterbox_clips_to_the_image() -> None:
    boxes = torch.tensor([[-10.0, -10.0, 500.0, 500.0], [20.0, 30.0, 40.0, 50.0]])
    out = unletterbox_boxes(boxes, 0.5, (10, 20), (100, 200))
    assert out.tolist() == [[0.0, 0.0, 200.0, 100.0], [20.0, 20.0, 60.0, 60.0]]
    assert boxes[0, 0] == -10.0  # input untouched


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_to_model_input_scales_and_lays_out_any_batch(channels_last: bool, layout: torch.memory_format) -> None:
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = to_model_input(images.contiguous(memory_format=layout), "cpu", channels_last=channels_last)
    assert x.dtype == torch.float32 and torch.equal(x, images.float() / 255)
    assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert to_model_input(images, "cpu", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_letterbox_batch_is_channels_last_with_the_pixels_of_each_image() -> None:
    image = (np.arange(64 * 40 * 3) % 251).astype(np.uint8).reshape(64, 40, 3)
    batch, _, pads = letterbox_batch([image], 64, 32)
    left, top = pads[0]
    assert batch.is_contiguous(memory_format=torch.channels_last) and batch.shape == (1, 3, 64, 64) and left == 12
    assert torch.equal(batch[0, :, top:top + 64, left:left + 40], torch.from_numpy(image).permute(2, 0, 1))
    wide, _, _ = letterbox_batch([np.zeros((50, 100, 3), np.uint8)], 64, 32)  # 32 x 64 once scaled
    assert wide.shape == (1, 3, 32, 64)  # each axis to its own stride multiple, not a square
    strip = np.full((1, 1300, 3), 200, np.uint8)  # scaled to 640, its height rounds to 0: once a cv2 error
    batch, ratios, pads = letterbox_batch([strip], 640, 32)
    assert batch.shape == (1, 3, 32, 640) and ratios == [640 / 1300] and pads == [(0, 15)]
    assert (batch[0] == 200).all(0).sum() == 640  # one row of 640 image pixels


def test_a_box_keeping_exactly_min_visibility_of_its_area_stays() -> None:
    """The limits are inclusive: 2 px wide and MIN_VISIBILITY = 0.2 of the area inside are kept, less is dropped."""
    boxes = np.array([[-8.0, 0.0, 2.0, 10.0], [-8.5, 0.0, 1.5, 10.0], [-9.0, 5.0, 3.0, 6.0], [-17.0, 0.0, 3.0, 10.0]])
    kept, classes = clip_and_filter(boxes, np.array([0, 1, 2, 3]), 10, 10)
    # 2 x 10 = 20% of 100 px^2: kept; 1.5 px wide: dropped; 3 x 1 = 25% of 12 px^2 but 1 px high: dropped;
    # 3 x 10 = 15% of 200 px^2: dropped
    assert kept.tolist() == [[0.0, 0.0, 2.0, 10.0]] and classes.tolist() == [0]


def test_mosaic4_drops_a_box_cut_under_2_px_wide_even_when_most_of_it_is_visible() -> None:
    """A 2.5 x 20 px box: the left tiles (pushed 2 px past the canvas' left edge) keep 1.5 x 20 of it, 60% of its
    area but under MIN_BOX_PX wide, so it is dropped there; the right tiles keep it whole."""
    image = np.zeros((32, 32, 3), np.uint8)
    box = np.array([[1.0, 4.0, 3.5, 24.0]], np.float32)
    _, boxes, classes = mosaic4([(image, box, np.array([k])) for k in range(4)], 32, (30, 30))
    assert classes.tolist() == [1, 3]  # tiles: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right
    assert boxes.tolist() == [[31.0, 2.0, 33.5, 22.0], [31.0, 34.0, 33.5, 54.0]]


def test_affine_without_randomness_letterboxes_a_non_square_image_at_the_centre() -> None:
    """A 64 x 32 (w x h) image into a 64 x 64 output: the input's centre on the output's, so rows 16-47 are the
    image, pixel for pixel, grey above and below, and a box moves down by 16 px."""
    hyp = replace(TrainConfig(), degrees=0.0, translate=0.0, scale=0.0, shear=0.0, fliplr=0.0, flipud=0.0, **NO_COLOUR)
    compose = build_train_compose(64, hyp)
    seed_compose(compose, 0)
    image = np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    out = compose(image=image, bboxes=np.array([[10.0, 4.0, 30.0, 20.0]]), class_labels=np.array([1]))
    assert np.array_equal(out["image"][16:48], image)
    assert (out["image"][:16] == FILL).all() and (out["image"][48:] == FILL).all()
    assert np.asarray(out["bboxes"]).tolist() == [pytest.approx([10.0, 20.0, 30.0, 36.0], abs=1e-4)]


def test_affine_warp_maps_pixel_areas_not_pixel_indices() -> None:
    """Halving a white stripe over columns [5, 9) gives [2.5, 4.5): output pixel 3 is covered, 2 and 4 half
    (each the mean of two input pixels), the rest black, as the box maps. Sampling by index (x' = x / 2 on pixel
    centres' indices) would give columns 3 and 4 white instead."""
    image = np.zeros((16, 16, 3), np.uint8)
    image[:, 5:9] = 255
    half = np.array([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]])
    out = RandomAffine((8, 8)).apply(image, matrix=half)
    expected = np.array([0, 0, 127.5, 255, 127.5, 0, 0, 0])
    assert np.abs(out[:, :, 0].astype(float) - expected).max() <= 1.0
    box = RandomAffine((8, 8)).apply_to_bboxes(np.array([[5 / 16, 0.0, 9 / 16, 1.0]]), matrix=half, shape=(16, 16))
    assert box.tolist() == [[2.5 / 8, 0.0, 4.5 / 8, 1.0]]


def test_mixup_blends_by_the_ratio_and_keeps_both_box_sets() -> None:
    a = (np.full((4, 4, 3), 200, np.uint8), np.array([[0.0, 0.0, 2.0, 2.0]], np.float32), np.array([3]))
    b = (np.full((4, 4, 3), 40, np.uint8), np.array([[1.0, 1.0, 4.0, 4.0]], np.float32), np.array([5]))
    image, boxes, classes = mixup(a, b, 0.25)
    assert (image == 80).all()  # 0.25 * 200 + 0.75 * 40
    assert boxes.tolist() == [[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 4.0, 4.0]] and classes.tolist() == [3, 5]


@pytest.mark.parametrize(("mosaic_p", "mosaic_on"), [(0.0, True), (1.0, False)])
def test_mixup_only_mixes_mosaic_samples(mosaic_p: float, mosaic_on: bool) -> None:
    """YOLOv5: mixup=1 blends every mosaic sample and none other (mosaic off by probability or by close_mosaic)."""
    hyp = replace(TrainConfig(), mosaic=mosaic_p, degrees=0.0, translate=0.0, scale=0.0, shear=0.0, fliplr=0.0,
                  flipud=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, mixup=1.0)

    def load(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.full((64, 64, 3), 10 * (i + 1), np.uint8), np.array([[8.0, 8.0, 56.0, 56.0]], np.float32), np.array([i])

    transform = TrainTransform(64, hyp, seed=0)
    for seed in range(4):
        transform.reseed(seed)
        (image, boxes, classes), used_mosaic = transform(load, 2, 6, mosaic=mosaic_on)
        assert not used_mosaic and (image == 30).all()
        assert boxes.tolist() == [[8.0, 8.0, 56.0, 56.0]] and classes.tolist() == [2]

"""Test-time augmentation: each pass's boxes come back to the input's pixels exactly (mapping functions, and a stub
detector that finds one bright box in whatever it is shown), the merged shape, and `augment=true` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from detector.cli import main
from detector.infer.metrics import COCO_KEYS
from detector.infer.postprocess import non_max_suppression
from detector.infer.tta import (
    PAD_VALUE, TTA_FLIPS, TTA_SCALES, augmented_forward, descale_rows, drop_level, flip_rows_lr, scale_images,
)

SCORES = (1.0, 0.9, 0.1)  # objectness, class 0, class 1 of the stub's one row


class BrightBoxDetector(nn.Module):
    """A perfect one-object detector: the box around the pixels of channel 0 above 0.75, as one decoded row
    (B, 1, 7) [cx, cy, w, h in its own input's pixels, SCORES], whatever size it is given."""

    stride = torch.tensor([8.0, 16.0, 32.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = x[:, 0] > 0.75
        cols, rows = mask.any(1).float(), mask.any(2).float()  # (B, W), (B, H)
        x1, x2 = cols.argmax(1), cols.shape[1] - cols.flip(1).argmax(1)
        y1, y2 = rows.argmax(1), rows.shape[1] - rows.flip(1).argmax(1)
        box = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], 1).float()
        return torch.cat([box, torch.tensor(SCORES).expand(len(x), 3)], 1)[:, None]


def bright_boxes(boxes_xyxy: list[tuple[int, int, int, int]], hw: tuple[int, int] = (64, 128)) -> torch.Tensor:
    """A channels_last batch, one image per box: grey 0.2 with the box's pixels at 1.0."""
    images = torch.full((len(boxes_xyxy), 3, *hw), 0.2)
    for image, (x1, y1, x2, y2) in zip(images, boxes_xyxy):
        image[:, y1:y2, x1:x2] = 1.0
    return images.contiguous(memory_format=torch.channels_last)


def cxcywh(boxes_xyxy: list[tuple[int, int, int, int]]) -> torch.Tensor:
    b = torch.tensor(boxes_xyxy, dtype=torch.float32)
    return torch.cat([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1)


def test_descale_then_flip_returns_a_box_to_the_input_frame() -> None:
    width, ratio_x, ratio_y = 200.0, 166 / 200, 83 / 100
    original = torch.tensor([[[30.0, 40.0, 20.0, 10.0, 0.8, 0.5], [150.5, 12.25, 7.0, 9.5, 0.3, 0.9]]])
    seen = original.clone()  # the same boxes as a flipped, scaled pass sees them
    seen[..., 0] = (width - original[..., 0]) * ratio_x
    seen[..., 1] *= ratio_y
    seen[..., 2] *= ratio_x
    seen[..., 3] *= ratio_y
    torch.testing.assert_close(flip_rows_lr(descale_rows(seen, ratio_x, ratio_y), width), original)
    assert descale_rows(original, 1.0, 1.0) is original


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_descale_rows_divides_in_the_rows_dtype_as_a_new_tensor_of_ratios_did(dtype: torch.dtype) -> None:
    """The ratios now go to the rows' device without a blocking copy; the result is the one a `new_tensor` of them
    gave (same dtype, same rounding), the scores untouched."""
    rows = (torch.rand(2, 500, 8, generator=torch.Generator().manual_seed(0)) * 300).to(dtype)
    ratios = rows.new_tensor([0.83, 0.67, 0.83, 0.67])
    out = descale_rows(rows, 0.83, 0.67)
    assert out.dtype == dtype
    assert torch.equal(out[..., :4], rows[..., :4] / ratios) and torch.equal(out[..., 4:], rows[..., 4:])


def test_flip_twice_is_the_identity() -> None:
    rows = torch.rand(2, 50, 8, generator=torch.Generator().manual_seed(0)) * 300
    # to float32's rounding at 320 px: 320 - (320 - x) can be one ulp (3.05e-5) off x, above assert_close's 1e-5
    torch.testing.assert_close(flip_rows_lr(flip_rows_lr(rows, 320.0), 320.0), rows, atol=4e-5, rtol=0)
    torch.testing.assert_close(flip_rows_lr(rows, 320.0)[..., 1:], rows[..., 1:])


def test_scale_images_pads_to_the_stride_and_reports_the_actual_ratios() -> None:
    images = torch.rand(2, 3, 256, 192).contiguous(memory_format=torch.channels_last)
    scaled, (ratio_x, ratio_y) = scale_images(images, 0.83, 32)
    assert scaled.shape == (2, 3, 224, 160)  # int(212.48) = 212 -> 224, int(159.36) = 159 -> 160
    assert (ratio_x, ratio_y) == (159 / 192, 212 / 256)
    assert scaled.is_contiguous(memory_format=torch.channels_last)
    assert (scaled[..., 212:, :] == PAD_VALUE).all() and (scaled[..., 159:] == PAD_VALUE).all()
    assert scale_images(images, 1.0, 32) == (images, (1.0, 1.0))
    # truncated, not rounded: int(171.52) = 171 -> 192 rows, int(128.64) = 128 -> 128 columns
    smaller, ratios = scale_images(images, 0.67, 32)
    assert smaller.shape == (2, 3, 192, 128) and ratios == (128 / 192, 171 / 256)


def test_every_pass_maps_the_stub_box_back_exactly() -> None:
    # At scale 0.5, bilinear resampling averages 2 x 2 blocks, so even box edges stay exact in every pass.
    boxes = [(16, 8, 48, 40), (70, 20, 124, 64)]
    merged = augmented_forward(BrightBoxDetector(), bright_boxes(boxes), scales=(1.0, 0.5, 1.0, 0.5), flips=(False, False, True, True), clip_tails=False)
    assert merged.shape == (2, 4, 7)
    for k in range(4):
        torch.testing.assert_close(merged[:, k, :4], cxcywh(boxes), rtol=0, atol=1e-5)
    torch.testing.assert_close(merged[..., 4:], torch.tensor(SCORES).expand(2, 4, 3))


def test_the_default_passes_agree_within_the_resampling_blur() -> None:
    boxes = [(16, 8, 48, 40), (70, 21, 123, 63)]
    merged = augmented_forward(BrightBoxDetector(), bright_boxes(boxes), clip_tails=False)  # one row: no levels
    assert merged.shape == (2, len(TTA_SCALES), 7) and TTA_FLIPS.count(True) == 1
    for k in range(len(TTA_SCALES)):  # edges blur by up to one resized pixel: 1 / 0.67 input pixels at most
        torch.testing.assert_close(merged[:, k, :4], cxcywh(boxes), rtol=0, atol=1.6)
    dets = non_max_suppression(merged, conf=0.25, iou=0.5)  # the passes overlap: NMS keeps one box per image
    assert [len(d) for d in dets] == [1, 1]


def test_scales_and_flips_must_be_non_empty_pairs() -> None:
    """No pass at all is refused by name, not left to fail inside torch.cat."""
    images = bright_boxes([(16, 8, 48, 40)])
    with pytest.raises(ValueError, match="non-empty and of one length, got 0 and 0"):
        augmented_forward(BrightBoxDetector(), images, scales=(), flips=())
    with pytest.raises(ValueError, match="got 2 and 1"):
        augmented_forward(BrightBoxDetector(), images, scales=(1.0, 0.5), flips=(False,))


def level_rows(hw: tuple[int, int], strides: list[int], anchors: int) -> torch.Tensor:
    """(1, N, 1) rows in the `Detect.decode` layout whose value is their level index."""
    return torch.cat([torch.full((1, anchors * (hw[0] // s) * (hw[1] // s), 1), float(i)) for i, s in enumerate(strides)], 1)


def test_drop_level_removes_exactly_that_levels_rows() -> None:
    strides, hw = [8, 16, 32], (64, 96)
    rows = level_rows(hw, strides, anchors=2)  # 2 x (96 + 24 + 6) rows
    for level, kept in ((0, 60), (1, 204), (2, 240)):
        out = drop_level(rows, hw, strides, level)
        assert out.shape == (1, kept, 1) and level not in out.unique().tolist()
        assert out[0, :, 0].tolist() == sorted(out[0, :, 0].tolist())  # the other levels keep their order
    with pytest.raises(ValueError, match="not levels"):
        drop_level(rows[:, 1:], hw, strides, 0)
    with pytest.raises(ValueError, match="not levels"):  # no rows: zero anchors per cell
        drop_level(rows[:, :0], hw, strides, 0)


class LevelRowsDetector(nn.Module):
    """Rows in the `Detect.decode` layout, one anchor per cell, whose value is their level index."""

    stride = torch.tensor([8.0, 16.0, 32.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return level_rows(x.shape[-2:], [8, 16, 32], anchors=1).expand(len(x), -1, -1)


def test_a_single_pass_keeps_every_level() -> None:
    """The tails are clipped only when there are other passes to bring those objects."""
    images = torch.zeros(1, 3, 64, 96)
    merged = augmented_forward(LevelRowsDetector(), images, scales=(1.0,), flips=(False,))
    assert torch.equal(merged, LevelRowsDetector()(images))  # 96 + 24 + 6 rows, levels 0, 1, 2


def test_merged_rows_of_a_real_model_are_every_pass_concatenated_less_the_tails() -> None:
    from detector.models.builder import build_model

    torch.manual_seed(0)
    model = build_model("yolo-c2f-n", nc=3).eval()
    strides = [int(s) for s in model.stride.tolist()]
    coarse, fine = strides.index(max(strides)), strides.index(min(strides))
    images = torch.rand(2, 3, 96, 128)
    with torch.inference_mode():
        passes = [model(scale_images(images, r, 32)[0]) for r in TTA_SCALES]
        counts = [p.shape[1] for p in passes]
        every = augmented_forward(model, images, clip_tails=False)
        clipped = augmented_forward(model, images)
        plain = model(images)
    assert every.shape == (2, sum(counts), 8) and counts[0] == plain.shape[1] and counts[2] < counts[0]
    torch.testing.assert_close(every[:, : counts[0]], plain)  # the scale-1 pass is the plain forward
    first = drop_level(plain, (96, 128), strides, coarse)
    last_size = scale_images(images, TTA_SCALES[-1], 32)[0].shape[-2:]
    dropped = (plain.shape[1] - first.shape[1]) + (counts[2] - drop_level(passes[2], last_size, strides, fine).shape[1])
    assert clipped.shape == (2, sum(counts) - dropped, 8) and dropped > 0
    torch.testing.assert_close(clipped[:, : first.shape[1]], first)  # the full-size pass without its large-object level
    torch.testing.assert_close(clipped[:, first.shape[1] : first.shape[1] + counts[1]], every[:, counts[0] : counts[0] + counts[1]])


def test_val_and_predict_with_augment(tmp_path: Path, make_data_yaml, untrained_checkpoint: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """augment=true reaches the evaluator and the predictor through the CLI and the API: every batch goes through
    `augmented_forward`, and none does without it."""
    import detector.infer.evaluator as evaluator_module
    import detector.infer.predictor as predictor_module
    from detector.api import Detector

    calls: list[str] = []
    for module in (evaluator_module, predictor_module):
        real = module.augmented_forward
        monkeypatch.setattr(module, "augmented_forward",
                            lambda *a, _real=real, _name=module.__name__, **k: calls.append(_name) or _real(*a, **k))
    data = make_data_yaml()
    weights = untrained_checkpoint
    args = [f"weights={weights}", f"data={data}", "batch=4", "workers=0", "plots=false", f"project={tmp_path / 'val'}"]
    assert main(["val", *args, "augment=false", "name=plain"]) == 0 and calls == []
    assert main(["val", *args, "augment=true", "name=tta"]) == 0
    val_batches = len(calls)
    assert val_batches == 2 and set(calls) == {evaluator_module.__name__}  # 6 val images at batch 4
    metrics = json.loads((tmp_path / "val" / "tta" / "metrics.json").read_text())
    assert all(np.isfinite(metrics[k]) for k in COCO_KEYS) and metrics["speed_ms"]["inference"] > 0
    assert (tmp_path / "val" / "tta" / "predictions.json").exists()

    image = np.random.default_rng(0).integers(0, 255, (50, 90, 3), dtype=np.uint8)
    (result,) = Detector(weights, device="cpu").predict(image, conf=0.0, max_det=5, augment=True)
    assert len(result["scores"]) == 5 and result["boxes_xyxy"].shape == (5, 4)
    assert calls[val_batches:] == [predictor_module.__name__]

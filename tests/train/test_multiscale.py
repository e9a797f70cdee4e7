"""Multi-scale training: the side each batch trains at (seeded by step, inside imgsz x (1 +/- f), stride
multiples), the batch's resize, and the trainer feeding the model those sizes with targets unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detector.train.multiscale import draw_side, largest_side, rescale
from detector.train.trainer import Trainer
from tiny_run import make_config


def test_sides_are_stride_multiples_in_range_and_a_function_of_seed_and_step() -> None:
    sides = [draw_side(256, 32, 0.5, seed=0, step=step) for step in range(300)]
    assert set(sides) == {128, 160, 192, 224, 256, 288, 320, 352, 384}  # every multiple of 32 in 128..384, no other
    assert sides == [draw_side(256, 32, 0.5, seed=0, step=step) for step in range(300)]  # a resume draws the same
    assert sides != [draw_side(256, 32, 0.5, seed=1, step=step) for step in range(300)]
    assert {draw_side(256, 32, 0.0, seed=0, step=step) for step in range(20)} == {256}
    assert {draw_side(64, 32, 0.9, seed=0, step=step) for step in range(50)} == {32, 64, 96}  # never below the stride
    assert largest_side(256, 32, 0.5) == 384 and largest_side(320, 32, 0.25) == 384 and largest_side(250, 32, 0.0) == 224


def test_rescale_keeps_the_aspect_within_stride_rounding() -> None:
    images = torch.rand(2, 3, 64, 96).contiguous(memory_format=torch.channels_last)
    out = rescale(images, 128, 32)
    assert out.shape == (2, 3, 96, 128)  # long side 128; 64 x 4/3 = 85.3 rounded up to 96
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rescale(images, 96, 32) is images
    flat = torch.full((1, 3, 64, 64), 0.25)
    # a constant stays constant, to the rounding of the bilinear weights (3e-8 off on one torch thread's path)
    torch.testing.assert_close(rescale(flat, 160, 32), torch.full((1, 3, 160, 160), 0.25), rtol=0, atol=1e-6)


def test_the_trainer_feeds_each_step_its_drawn_size(tiny_data: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Each step's images at its drawn side; its targets, normalised to the image, reach the loss as loaded."""
    from detector.train import trainer as trainer_module

    loaded, scored = [], []
    real_waited = trainer_module._waited

    def recording_waited(batches):
        for batch in real_waited(batches):
            loaded.append(batch["targets"].clone())
            yield batch

    monkeypatch.setattr(trainer_module, "_waited", recording_waited)
    trainer = Trainer(make_config(tiny_data, tmp_path, multi_scale="0.5", seed="3"))
    seen = []
    try:
        trainer.build()
        trainer.model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[2:])))
        real_criterion = trainer.criterion

        def recording_criterion(raw, targets):
            scored.append(targets.clone())
            return real_criterion(raw, targets)

        recording_criterion.set_epoch = real_criterion.set_epoch
        trainer.criterion = recording_criterion
        trainer.train_epoch(0)
        trainer.train_epoch(1)
    finally:
        trainer.close()
    steps = trainer.iters_per_epoch
    expected = [draw_side(128, 32, 0.5, seed=3, step=step) for step in range(2 * steps)]
    assert [max(shape) for shape in seen] == expected and len(set(expected)) > 1
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in seen)
    assert len(scored) == len(loaded) == 2 * steps and all(torch.equal(a, b) for a, b in zip(scored, loaded))


def test_multi_scale_is_range_checked(tiny_data: Path, tmp_path: Path) -> None:
    from detector.errors import DetectorError

    with pytest.raises(DetectorError, match="multi_scale"):
        make_config(tiny_data, tmp_path, multi_scale="1.5")


def test_the_range_ends_are_the_stride_multiples_just_inside_it() -> None:
    """imgsz 640 x (1 -/+ 0.33) is 428.8 .. 851.2 px: the sides run from 448 (not 416, below the range) to 832."""
    sides = {draw_side(640, 32, 0.33, seed=0, step=step) for step in range(400)}
    assert min(sides) == 448 and max(sides) == 832 and all(s % 32 == 0 for s in sides)


def test_rescale_rounds_each_side_up_to_the_stride() -> None:
    """100 x 300 at long side 320: the short side is 106.7 px, rounded up to 128 (round() would give 96)."""
    assert rescale(torch.rand(1, 3, 100, 300), 320, 32).shape == (1, 3, 128, 320)

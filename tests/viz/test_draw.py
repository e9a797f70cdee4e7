"""detector.viz.draw: the validation batch grid drawn onto image tensors."""

from __future__ import annotations

import torch

from detector.viz.draw import val_batch_grid


def test_val_batch_grid_draws_gt_green_and_confident_detections_red() -> None:
    images = torch.zeros(3, 3, 64, 64, dtype=torch.uint8)
    targets = torch.tensor([[0, 1, 0.25, 0.25, 0.25, 0.25], [2, 0, 0.5, 0.5, 0.5, 0.5]])  # image 2 is past max_images
    detections = [
        torch.tensor([[40.0, 40.0, 56.0, 56.0, 0.9, 0.0], [30.0, 2.0, 60.0, 20.0, 0.1, 1.0]]),  # 2nd below conf
        torch.zeros(0, 6),
        torch.tensor([[0.0, 0.0, 64.0, 64.0, 0.9, 0.0]]),
    ]
    grid = val_batch_grid(images, targets, detections, ["a", "b"], max_images=2, conf=0.25)
    assert grid.dtype == torch.uint8 and grid.shape == (3, 64, 256)  # two pairs side by side: GT | detections

    def colour(x: int, y: int) -> list[int]:
        return grid[:, y, x].tolist()

    assert colour(8, 20) == colour(24, 20) == [0, 255, 0]  # the GT box's left and right edges (8..24 px)
    assert colour(64 + 40, 50) == colour(64 + 56, 50) == [255, 0, 0]  # the confident detection's (40..56 px)
    assert colour(40, 50) == [0, 0, 0] and colour(64 + 8, 20) == [0, 0, 0]  # each on its own side only
    assert colour(64 + 59, 10) == [0, 0, 0]  # inside the below-conf detection's box, off its label: not drawn
    assert grid[:, :, 128:].max() == 0  # the second image has no GT and no detection; the third is not drawn
    half = val_batch_grid(images, targets, detections, ["a", "b"], max_images=2, conf=0.25, tile_px=32)
    assert half.shape == (3, 32, 128) and half[:, 10, 4].tolist() == [0, 255, 0]  # boxes scaled with the image

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
    assert half[:, 25, 32 + 20].tolist() == [255, 0, 0]  # the detection too: 40..56 px -> 20..28 px
    wide = val_batch_grid(torch.zeros(1, 3, 32, 64, dtype=torch.uint8), targets[:1], [torch.zeros(0, 6)], ["a", "b"])
    assert wide.shape == (3, 32, 128)
    assert wide[:, 8, 24].tolist() == [0, 255, 0]  # GT x 8..24 of the 64 px width, y 4..12 of the 32 px height
    # three pairs: ceil(sqrt(3)) = 2 pairs a row; a score equal to conf is drawn (score >= conf)
    square = val_batch_grid(images, targets, detections, ["a", "b"], max_images=3, conf=0.9)
    assert square.shape == (3, 128, 256)
    assert square[:, 50, 64 + 40].tolist() == [255, 0, 0]  # image 0's detection, score 0.9
    assert square[:, 64 + 32, 16].tolist() == [0, 255, 0]  # image 2's GT (16..48 px), in the second row


def test_scaled_tiles_round_the_area_mean_and_labels_grow_with_the_image() -> None:
    """A downscaled tile rounds its pixels (not truncates), and a label's font is 1/30 of the tile's long side."""
    images = torch.full((1, 3, 64, 64), 201, dtype=torch.uint8)
    images[..., ::2, ::2] = 200  # each 2 x 2 block averages to 200.75
    half = val_batch_grid(images, torch.zeros(0, 6), [torch.zeros(0, 6)], ["a"], tile_px=32)
    assert half[:, 16, 16].tolist() == [201, 201, 201]

    def label_height(size: int) -> int:
        """Rows holding (antialiased) green label pixels inside a GT box over the whole (size x size) black image."""
        targets = torch.tensor([[0, 0, 0.5, 0.5, 1.0, 1.0]])
        grid = val_batch_grid(torch.zeros(1, 3, size, size, dtype=torch.uint8), targets, [torch.zeros(0, 6)], ["W"])
        return int((grid[1, 2 : size // 4, 2 : size // 2] > 0).any(1).sum())  # off the box's edges at row and column 0

    assert label_height(480) >= 1.5 * label_height(64) > 0  # font 16 px at 480 px, 8 px (the floor) at 64 px

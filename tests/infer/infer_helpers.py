"""Test doubles shared by the inference tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch
import torch.nn as nn


class BrightBoxModel(nn.Module):
    """A 'detector' whose one box per image is the extent of its bright pixels (input pixels): ground truth through
    whatever letterbox the predictor applied. Class 1 with score 0.9 * 0.95."""

    nc = 2

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("stride", torch.tensor([8.0, 16.0, 32.0]))
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = x.mean(1) > 0.5  # (B, H, W)
        cols, rows = bright.any(1).float(), bright.any(2).float()  # (B, W), (B, H)
        xs = torch.arange(x.shape[3], dtype=x.dtype)
        ys = torch.arange(x.shape[2], dtype=x.dtype)
        x1 = torch.where(cols > 0, xs, torch.inf).amin(1)
        x2 = torch.where(cols > 0, xs, -torch.inf).amax(1) + 1
        y1 = torch.where(rows > 0, ys, torch.inf).amin(1)
        y2 = torch.where(rows > 0, ys, -torch.inf).amax(1) + 1
        box = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], 1)
        probs = torch.tensor([0.9, 0.1, 0.95]).expand(len(x), 3)
        return torch.cat([box, probs], 1)[:, None, :]  # (B, 1, 7)

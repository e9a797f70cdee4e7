"""The figure of one attention layer's weights (`detector info attention_maps=true`): its spatial map upsampled over
the image it saw, and its channel weights sorted as bars, whichever of the two the layer has. The weights are
read by `infer.attention_maps`; this module only draws them (matplotlib's object API on Agg, as plots.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_attention(image: np.ndarray, spatial: torch.Tensor | None, channels: torch.Tensor | None, *, kind: str,
                   title: str, path: Path) -> Path:
    """One PNG at `path`: `spatial` (h, w) as a jet overlay on `image` (H, W, 3) uint8 RGB, and/or `channels` (C,)
    as bars sorted high to low on a 0..1 axis."""
    panels = (spatial is not None) + (channels is not None)
    fig = Figure(figsize=(5 * panels, 4.6), dpi=100)
    panel = 1
    if spatial is not None:
        h, w = spatial.shape
        ax = fig.add_subplot(1, panels, panel)
        up = F.interpolate(spatial[None, None].float().cpu(), size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0]
        ax.imshow(image)
        overlay = ax.imshow(up.numpy(), cmap="jet", alpha=0.5)
        fig.colorbar(overlay, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(f"{title}\nmap {h}x{w} (HxW)", fontsize=9)
        ax.set_axis_off()
        panel += 1
    if channels is not None:
        ax = fig.add_subplot(1, panels, panel)
        weights = channels.float().cpu().numpy()
        ax.bar(np.arange(len(weights)), np.sort(weights)[::-1], width=1.0, color="tab:blue")
        ax.set_xlabel("channel (sorted by weight)")
        ax.set_ylabel("channel weight")
        ax.set_ylim(0, 1)
        ax.set_title(f"{kind} channel weights ({len(weights)} channels)", fontsize=9)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path)
    return path

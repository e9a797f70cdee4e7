"""The anchor-based detection head (YOLOv5 style): per-level 1x1 convs, anchors, decode, prior bias init.

Row: `[[P3, P4, P5], 1, Detect, [nc, anchors]]` with anchors in input pixels, one list of (w, h) pairs per
level, or an int (anchors per level: placeholders until auto-anchor fits real ones, see `set_stride`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from detector.models.registry import register_module


def placeholder_anchors(na: int) -> torch.Tensor:
    """(na, 2) square anchors in grid units, sizes spread geometrically over 2.5 .. 6.3 cells.

    At strides 8/16/32 that is 20-50 / 40-101 / 80-203 px: plausible priors for a model whose YAML gives only
    an anchor count; auto-anchor replaces them with k-means anchors when they fit the labels poorly.
    """
    sizes = 2.0 ** (1.0 + 2.0 * (torch.arange(na, dtype=torch.float32) + 0.5) / na)
    return sizes[:, None].expand(na, 2).clone()


def _parse_anchors(anchors: object, nl: int) -> tuple[int, torch.Tensor | None]:
    """(anchors per level, (nl, na, 2) pixels or None for placeholders); ValueError on a malformed list."""
    if isinstance(anchors, int) and not isinstance(anchors, bool):
        if anchors < 1:
            raise ValueError(f"anchors: an anchor count must be >= 1, got {anchors}")
        return anchors, None
    if not isinstance(anchors, (list, tuple)) or len(anchors) != nl:
        raise ValueError(f"anchors: expected {nl} lists of (w, h) pairs (one per Detect input) or an int, "
                         f"got {anchors!r}")
    for i, level in enumerate(anchors):
        if not isinstance(level, (list, tuple)) or not level or len(level) % 2:
            raise ValueError(f"anchors[{i}]: expected an even-length list of w, h numbers, got {level!r}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf for v in level):
            raise ValueError(f"anchors[{i}]: anchor sizes must be positive finite numbers, got {level!r}")
    na = len(anchors[0]) // 2
    if any(len(level) != 2 * na for level in anchors):
        raise ValueError(f"anchors: every level needs the same number of anchors, got {[len(a) // 2 for a in anchors]}")
    return na, torch.tensor(anchors, dtype=torch.float32).view(nl, na, 2)


def decode_boxes(p: torch.Tensor, cell: torch.Tensor, anchor: torch.Tensor, stride: torch.Tensor) -> torch.Tensor:
    """YOLOv5's bounded decode: sigmoid outputs (..., N, 4) -> boxes cx, cy, w, h in input pixels.

    xy = (2 sig - 0.5 + cell) * stride reaches the own cell and half of each neighbour; wh = (2 sig)^2 * anchor
    spans 0 .. 4x the anchor, which is why a target is only matched to anchors within a ratio of 4.
    cell (N, 2) x, y; anchor (N, 2) px; stride (N, 1) px, as `Detect.cell_priors` gives them.
    """
    xy = (p[..., :2] * 2 - 0.5 + cell) * stride
    wh = (p[..., 2:4] * 2) ** 2 * anchor
    return torch.cat([xy, wh], -1)


@register_module(channels="none", multi_input=True)
class Detect(nn.Module):
    """Anchor-based head over nl feature maps; na anchors per level, each predicting [tx, ty, tw, th, obj, cls...].

    Buffers: `anchors` (nl, na, 2) in grid (stride) units, `stride` (nl,) pixels per cell. The builder finds the
    strides by a dry forward and calls `set_stride` then `init_biases`.
    Train mode returns the raw maps, each (B, na, H_l, W_l, 5 + nc) logits (a permuted view of the conv
    output: index it freely, `reshape` rather than `view`). Eval mode returns (B, N, 5 + nc), N = sum of
    na * H_l * W_l, rows ordered level, anchor, y, x, columns [cx, cy, w, h] (input pixels), objectness and
    class probabilities, decoded in float32 (YOLOv5: xy = (2 sig - 0.5 + cell) * stride,
    wh = (2 sig)^2 * anchor).
    """

    def __init__(self, c_ins: Sequence[int], nc: int = 80, anchors: int | Sequence[Sequence[float]] = 3) -> None:
        super().__init__()
        if not isinstance(nc, int) or isinstance(nc, bool) or nc < 1:
            raise ValueError(f"nc must be a positive int, got {nc!r}")
        self.nl = len(c_ins)
        self.na, anchors_px = _parse_anchors(anchors, self.nl)
        self.nc = nc
        self.no = 5 + nc
        self._placeholder_anchors = anchors_px is None
        # until set_stride: stride 1, so `anchors` holds pixels
        self.register_buffer("anchors", anchors_px if anchors_px is not None else torch.ones(self.nl, self.na, 2))
        self.register_buffer("stride", torch.ones(self.nl))
        self.m = nn.ModuleList(nn.Conv2d(c, self.na * self.no, 1) for c in c_ins)

    @property
    def anchors_px(self) -> torch.Tensor:
        """(nl, na, 2) anchor sizes in input pixels."""
        return self.anchors * self.stride.view(-1, 1, 1)

    @torch.no_grad()
    def set_stride(self, stride: Sequence[float] | torch.Tensor) -> None:
        """Record the level strides (px per cell) and convert the anchors: pixels -> grid units.

        Placeholder anchors (an int in the YAML) become `placeholder_anchors` in grid units at every level.
        """
        stride = torch.as_tensor(stride, dtype=torch.float32, device=self.stride.device).view(self.nl)
        if self._placeholder_anchors:
            anchors_px = placeholder_anchors(self.na).to(stride.device) * stride.view(-1, 1, 1)
        else:
            anchors_px = self.anchors_px.clone()
        self.stride.copy_(stride)
        self._placeholder_anchors = False
        self.set_anchors_px(anchors_px)

    @torch.no_grad()
    def set_anchors_px(self, anchors_px: torch.Tensor) -> None:
        """Write new anchors (nl, na, 2) given in pixels, in place: sorted by area within each level, and the
        level order flipped if it runs against the stride order (small anchors belong to fine levels)."""
        t = torch.as_tensor(anchors_px, dtype=torch.float32, device=self.anchors.device).view(self.nl, self.na, 2)
        order = t.prod(-1).argsort(-1)
        t = t.gather(1, order[..., None].expand(-1, -1, 2))
        area = t.prod(-1).mean(-1)
        if self.nl > 1 and (area[-1] - area[0]).sign() * (self.stride[-1] - self.stride[0]).sign() < 0:
            t = t.flip(0)
        self.anchors.copy_(t / self.stride.view(-1, 1, 1))

    def class_rows(self) -> dict[str, int]:
        """The output convs (by name within the head) whose rows are, per anchor, `lead` rows that do not depend on
        the classes then one row per class: what fine-tuning onto other classes copies row by row."""
        return {f"m.{i}": 5 for i in range(self.nl)}  # [tx, ty, tw, th, obj, cls...]

    @torch.no_grad()
    def init_biases(self, imgsz: int = 640) -> None:
        """Prior bias init: objectness as if ~8 objects per `imgsz` image, class probability ~0.6 / nc."""
        for conv, s in zip(self.m, self.stride.tolist()):
            b = conv.bias.view(self.na, self.no)
            b[:, 4] += math.log(8 / (imgsz / s) ** 2)
            b[:, 5:] += math.log(0.6 / (self.nc - 0.99999))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor] | torch.Tensor:
        maps = []
        for conv, x in zip(self.m, xs):
            b, _, h, w = x.shape
            maps.append(conv(x).view(b, self.na, self.no, h, w).permute(0, 1, 3, 4, 2))
        return maps if self.training else self.decode(maps)

    def cell_priors(self, shapes: Sequence[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, ...]:
        """Per decoded row for maps of `shapes` [(H_l, W_l)]: cell (N, 2) x, y; anchor (N, 2) px; stride (N, 1).

        Built from the shapes on every call: cheap, and it exports with dynamic input sizes."""
        cells, anchors, strides = [], [], []
        for i, (h, w) in enumerate(shapes):
            ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            cell = torch.stack([xs, ys], -1).float()  # (H, W, 2)
            cells.append(cell.expand(self.na, h, w, 2).reshape(-1, 2))
            anchors.append(self.anchors_px[i].view(self.na, 1, 1, 2).expand(self.na, h, w, 2).reshape(-1, 2))
            strides.append(self.stride[i].view(1, 1).expand(self.na * h * w, 1))
        return torch.cat(cells), torch.cat(anchors).float(), torch.cat(strides).float()

    def decode(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Raw maps -> (B, N, 5 + nc) boxes cx, cy, w, h in input pixels + probabilities, all levels at once."""
        return torch.cat(self.decode_rows(maps), -1)

    def decode_rows(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw maps -> (boxes (B, N, 4) cx, cy, w, h in input pixels, the other columns' probabilities (B, N, no - 4)),
        every level at once, in float32 whatever the autocast dtype of the maps."""
        with torch.autocast(maps[0].device.type, enabled=False):
            b = maps[0].shape[0]
            p = torch.cat([m.reshape(b, -1, self.no) for m in maps], 1).float().sigmoid()
            cell, anchor, stride = self.cell_priors([m.shape[2:4] for m in maps], p.device)
            return decode_boxes(p[..., :4], cell, anchor, stride), p[..., 4:]


def _branch(c_in: int, c_mid: int, c_out: int) -> nn.Sequential:
    """Two 3x3 Conv-BN-SiLU then a 1x1 prediction conv (with bias): one task branch of a decoupled head."""
    from detector.models.blocks import Conv

    return nn.Sequential(Conv(c_in, c_mid, 3), Conv(c_mid, c_mid, 3), nn.Conv2d(c_mid, c_out, 1))


@register_module(channels="none", multi_input=True)
class DecoupledDetect(Detect):
    """Anchor-based head with separate box and class branches and an IoU-aware class score (no objectness).

    Same anchors, strides, auto-anchor and box decode as `Detect` (YOLOv5's bounded decode around each anchor
    box); what differs is what it learns, the recipe that closes most of the anchor-based gap:
    - decoupled branches per level, two 3x3 convs each (YOLOX, Ge et al. 2021, Table 2);
    - the class score is trained toward the box's quality, so it ranks boxes by localisation too (VFL/QFL);
    - positives are chosen by task alignment over the anchor boxes (TOOD, Feng et al. 2021), in
      `detector.train.loss_aligned.AlignedLoss`, which this head's maps are for.
    Train mode returns maps (B, na, H_l, W_l, 4 + nc) logits. Eval mode returns the `Detect` layout
    (B, N, 5 + nc) with the objectness column set to 1, so NMS's obj * cls score is the class score and every
    consumer of `Detect` (NMS, export, evaluator) works unchanged.
    """

    def __init__(self, c_ins: Sequence[int], nc: int = 80, anchors: int | Sequence[Sequence[float]] = 1,
                 box_width: int = 0) -> None:
        """`box_width`: channels of the box branches; 0 takes YOLOv8's max(16, c_ins[0] / 4, 64). Its floor of 64
        is sized for DFL's 4 x 16 outputs; this head regresses 4 per anchor, so a stride-4 level can take less."""
        if not isinstance(box_width, int) or isinstance(box_width, bool) or box_width < 0:
            raise ValueError(f"box_width must be an int >= 0 (0: the default width), got {box_width!r}")
        super().__init__(c_ins, nc, anchors)
        self.no = 4 + nc
        c_box = box_width or max(16, c_ins[0] // 4, 64)
        c_cls = max(c_ins[0], min(nc, 100))
        self.m = nn.ModuleList(_branch(c, c_box, self.na * 4) for c in c_ins)
        self.cls = nn.ModuleList(_branch(c, c_cls, self.na * nc) for c in c_ins)

    def class_rows(self) -> dict[str, int]:
        """The class branches' last convs: one row per class and anchor (the box branches do not depend on them)."""
        return {f"cls.{i}.2": 0 for i in range(self.nl)}

    @torch.no_grad()
    def init_biases(self, imgsz: int = 640) -> None:
        """Box outputs start at the anchor box itself; class probability ~5 objects per `imgsz` image per class."""
        for box_branch, cls_branch, s in zip(self.m, self.cls, self.stride.tolist()):
            box_branch[-1].bias.zero_()
            cls_branch[-1].bias.fill_(math.log(5 / self.nc / (imgsz / s) ** 2))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor] | torch.Tensor:
        maps = []
        for box_branch, cls_branch, x in zip(self.m, self.cls, xs):
            b, _, h, w = x.shape
            box = box_branch(x).view(b, self.na, 4, h, w)
            cls = cls_branch(x).view(b, self.na, self.nc, h, w)
            maps.append(torch.cat((box, cls), 2).permute(0, 1, 3, 4, 2))
        return maps if self.training else self.decode(maps)

    def decode(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Raw maps -> (B, N, 5 + nc): cx, cy, w, h in input pixels, a constant objectness 1, class scores."""
        boxes, scores = self.decode_rows(maps)
        return torch.cat([boxes, torch.ones_like(scores[..., :1]), scores], -1)

"""Fine-tuning: a new run that starts from another run's weights, optionally with its first rows frozen.

The weights are the checkpoint's EMA (what was evaluated), matched to the new model by name and shape. The head's
class rows are matched by class name: a class of the checkpoint keeps its rows wherever the new dataset lists it
(same names in another category-id order, a subset, a superset), a new class keeps the fresh initialisation the
builder gave it (prior bias included); with no name in common the rows go by position when the counts match (as
Ultralytics copies a same-shaped head). The rows that do not depend on the classes (the coupled head's box and
objectness rows) are always kept. Other head tensors whose shape depends on the class count start fresh; anything
else that differs is another architecture and an error listing the differing keys. Frozen rows get no gradients,
stay out of the optimizer, and keep their BatchNorms in eval mode, so their weights and running statistics stay
bit-identical (Ultralytics' `freeze=`, YOLOv5's `--freeze`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from detector.errors import DetectorError
from detector.runtime import checkpoint as ckpt_io

LOGGER = logging.getLogger(__name__)
SHOWN = 5  # differing keys named in a message


@dataclass(frozen=True)
class Transfer:
    """What `transfer_weights` copied: `transferred` of the model's `total` tensors (the class-row convs count when
    any row came over); `skipped` the head tensors left fresh ('name (5, 64, 1, 1) -> (3, 64, 1, 1)'); `classes`
    how the class rows were matched."""

    transferred: int
    total: int
    skipped: list[str]
    classes: str = ""

    def summary(self, source: str) -> str:
        shown = f"; skipped {ckpt_io.listed(self.skipped, SHOWN)}" if self.skipped else ""
        classes = f"; {self.classes}" if self.classes else ""
        return f"weights: transferred {self.transferred}/{self.total} tensors from {source}{classes}{shown}"


def class_sources(source_names: Sequence[str], names: Sequence[str]) -> list[int | None]:
    """Each new class's class in the source (None: none, fresh rows): the one of the same name; with no name in
    common (another dataset), the same position when the counts match, else none."""
    index = {name: i for i, name in enumerate(source_names)}
    by_name = [index.get(name) for name in names]
    if any(i is not None for i in by_name):
        return by_name
    return list(range(len(names))) if len(names) == len(source_names) else [None] * len(names)


def _describe(sources: list[int | None], source_names: Sequence[str], names: Sequence[str]) -> str:
    fresh = [name for name, s in zip(names, sources) if s is None]
    moved = sum(s is not None and s != c for c, s in enumerate(sources))
    if len(fresh) == len(names):
        return f"class rows fresh ({len(names)} classes, none of the checkpoint's {len(source_names)})"
    by_name = any(s is not None and source_names[s] == name for name, s in zip(names, sources))
    how = "by name" if by_name else "by position (no class name in common)"
    text = f"class rows {how} for {len(names) - len(fresh)} of {len(names)} classes" + (f" ({moved} moved)" if moved else "")
    return text + (f", fresh for {ckpt_io.listed(fresh, SHOWN)}" if fresh else "")


def _row_pairs(na: int, lead: int, sources: list[int | None], source_nc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows of the new conv, rows of the source conv) to copy: per anchor its `lead` rows, then each class's row
    from its source class."""
    nc, new, old = len(sources), [], []
    for a in range(na):
        pairs = [(j, j) for j in range(lead)] + [(lead + c, lead + s) for c, s in enumerate(sources) if s is not None]
        new += [a * (lead + nc) + j for j, _ in pairs]
        old += [a * (lead + source_nc) + j for _, j in pairs]
    return torch.tensor(new, dtype=torch.long), torch.tensor(old, dtype=torch.long)


def load_finetune_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the checkpoint, its EMA weights, or its raw weights when it kept no EMA); loaded with weights_only."""
    ckpt = ckpt_io.load_checkpoint(Path(path))
    return ckpt, ckpt_io.checkpoint_weights(ckpt)


def transfer_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str, *, source_names: Sequence[str],
                     names: Sequence[str]) -> Transfer:
    """Copy `state` (a checkpoint of classes `source_names`) into `model` (of classes `names`): every tensor whose
    name and shape match, the head's class rows by class (`class_sources`); refuse anything but head shape changes."""
    own = model.state_dict()
    head = f"layers.{len(model.layers) - 1}."
    missing, unexpected, reshaped = ckpt_io.state_differences(own, state)
    foreign = [f"{k} (missing in the checkpoint)" for k in missing] + [f"{k} (not in the model)" for k in unexpected]
    foreign += [f"{k} {tuple(state[k].shape)} -> {tuple(own[k].shape)}" for k in reshaped if not k.startswith(head)]
    if foreign:
        raise DetectorError(f"weights: {source} is another architecture than the model ({len(foreign)} tensors differ "
                            f"beyond the head's class rows: {ckpt_io.listed(foreign, SHOWN)})")
    sources = class_sources(source_names, names)
    loaded = {k: v for k, v in state.items() if k not in reshaped}
    for name, lead in model.head.class_rows().items():
        new_rows, old_rows = _row_pairs(model.head.na, lead, sources, len(source_names))
        if len(new_rows) == 0:
            continue
        for key in (f"{head}{name}.weight", f"{head}{name}.bias"):
            if own[key].shape[1:] != state[key].shape[1:] or len(state[key]) != model.head.na * (lead + len(source_names)):
                continue  # a class branch whose width follows the class count, or another anchor count: fresh
            loaded[key] = own[key].clone()
            loaded[key][new_rows] = state[key][old_rows].to(own[key].dtype)
    reshaped = [k for k in reshaped if k not in loaded]
    model.load_state_dict(loaded, strict=False)
    skipped = [f"{k} {tuple(state[k].shape)} -> {tuple(own[k].shape)}" for k in reshaped]
    return Transfer(len(own) - len(reshaped), len(own), skipped, _describe(sources, source_names, names))


def frozen_rows(spec: list[int], n_rows: int) -> list[int]:
    """`freeze=` as row indices: one number N is the first N rows, several are the rows themselves."""
    rows = list(range(spec[0])) if len(spec) == 1 else sorted(set(spec))
    if rows and rows[-1] >= n_rows:
        raise DetectorError(f"freeze: the model has {n_rows} rows (0-{n_rows - 1}); freeze={','.join(map(str, spec))} "
                            f"asks for row {rows[-1]}")
    if len(rows) == n_rows:
        raise DetectorError(f"freeze: freezing all {n_rows} rows leaves nothing to train")
    return rows


def freeze(model: nn.Module, rows: list[int]) -> int:
    """Stop gradients to the rows' parameters; returns how many parameter tensors were frozen."""
    params = [p for i in rows for p in model.layers[i].parameters()]
    for p in params:
        p.requires_grad_(False)
    return len(params)


def keep_frozen_norms_in_eval(model: nn.Module, rows: list[int]) -> None:
    """After `model.train()`: frozen rows' BatchNorms normalise with their running statistics and leave them alone."""
    for i in rows:
        for module in model.layers[i].modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()

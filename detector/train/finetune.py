"""Fine-tuning: a new run that starts from another run's weights, optionally with its first rows frozen.

The weights are the checkpoint's EMA (what was evaluated), matched to the new model by name and shape. Only the
head may differ, and only in shape (another class count): its class rows then keep the fresh initialisation the
builder gave them (prior bias included). Anything else that differs is another architecture and an error listing
the differing keys. Frozen rows get no gradients, stay out of the optimizer, and keep their BatchNorms in eval
mode, so their weights and running statistics stay bit-identical (Ultralytics' `freeze=`, YOLOv5's `--freeze`).
"""

from __future__ import annotations

import logging
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
    """What `transfer_weights` copied: `transferred` of the model's `total` tensors; `skipped` the head tensors
    whose shape differs ('name (5, 64, 1, 1) -> (3, 64, 1, 1)')."""

    transferred: int
    total: int
    skipped: list[str]

    def summary(self, source: str) -> str:
        shown = f"; skipped {ckpt_io.listed(self.skipped, SHOWN)}" if self.skipped else ""
        return f"weights: transferred {self.transferred}/{self.total} tensors from {source}{shown}"


def load_finetune_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the checkpoint, its EMA weights, or its raw weights when it kept no EMA); loaded with weights_only."""
    ckpt = ckpt_io.load_checkpoint(Path(path))
    return ckpt, ckpt_io.checkpoint_weights(ckpt)


def transfer_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> Transfer:
    """Copy every tensor of `state` whose name and shape match into `model`; refuse anything but head shape changes."""
    own = model.state_dict()
    head = f"layers.{len(model.layers) - 1}."
    missing, unexpected, reshaped = ckpt_io.state_differences(own, state)
    foreign = [f"{k} (missing in the checkpoint)" for k in missing] + [f"{k} (not in the model)" for k in unexpected]
    foreign += [f"{k} {tuple(state[k].shape)} -> {tuple(own[k].shape)}" for k in reshaped if not k.startswith(head)]
    if foreign:
        raise DetectorError(f"weights: {source} is another architecture than the model ({len(foreign)} tensors differ "
                            f"beyond the head's class rows: {ckpt_io.listed(foreign, SHOWN)})")
    model.load_state_dict({k: v for k, v in state.items() if k not in reshaped}, strict=False)
    skipped = [f"{k} {tuple(state[k].shape)} -> {tuple(own[k].shape)}" for k in reshaped]
    return Transfer(len(own) - len(reshaped), len(own), skipped)


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

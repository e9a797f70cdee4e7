"""The BatchNorm running statistics as of the last optimizer step that was taken.

A train-mode forward writes its batch's statistics into every BatchNorm before the loss is known: a step skipped for
a non-finite loss (an fp16 activation overflow, a corrupt image) has already put its inf or NaN there. The skipped
weights stay clean, but the statistics would not: later batches train on their own statistics, so the losses stay
finite while the EMA copies the NaN and every evaluation runs a NaN model. Saving them after each step taken and
restoring them after a skipped one undoes that forward as the skip undoes its gradients.
"""

from __future__ import annotations

import torch
from torch import nn


class BatchNormState:
    """A copy of a model's BatchNorm buffers (running mean, variance, batches tracked), saved and restored in place
    by one multi-tensor copy each."""

    def __init__(self, model: nn.Module) -> None:
        self._live = [
            buffer
            for module in model.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            for buffer in (module.running_mean, module.running_var, module.num_batches_tracked)
            if buffer is not None
        ]
        self._saved = [buffer.detach().clone() for buffer in self._live]

    @torch.no_grad()
    def save(self) -> None:
        """Keep the current statistics (after a step taken)."""
        if self._live:
            torch._foreach_copy_(self._saved, self._live)

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the statistics of the last save (after a skipped step)."""
        if self._live:
            torch._foreach_copy_(self._live, self._saved)

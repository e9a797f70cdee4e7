"""The model a YAML builds: `DetectionModel` runs its layer graph (rows feeding rows, the `Detect` head last),
`LayerInfo` records what each row became, and `inference_copy` is the BN-folded channels_last copy that
validation, prediction and export run (`refresh_inference_copy` gives one the model's new weights). Reading YAML
rows is `builder.py`'s alone."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch
from torch import nn

from detector.models.blocks import Conv
from detector.models.head import Detect


@dataclass(frozen=True)
class LayerInfo:
    """What one row became, for `model_info`'s table: `row` like 'head[3]', `source` as written, `repeats` after
    depth scaling, `args` as passed to the constructor, `attention` the registry name of the attention it
    carries ('' for none) and `attention_at` its place in a C2f ('' for a standalone attention row)."""

    index: int
    row: str
    source: int | list[int]
    repeats: int
    module: str
    args: list
    attention: str = ""
    attention_at: str = ""

    @property
    def attention_label(self) -> str:
        """'ca at output', 'se' (a standalone row) or '' (no attention)."""
        return f"{self.attention} at {self.attention_at}" if self.attention_at else self.attention


class DetectionModel(nn.Module):
    """The layer graph of one model YAML; the last layer is the `Detect` head.

    forward(x (B, 3, H, W) float, H and W multiples of the max stride): train mode -> list of nl raw maps
    (B, na, H_l, W_l, 5 + nc); eval mode -> (B, N, 5 + nc) decoded (see `Detect`).
    """

    def __init__(self, layers: list[nn.Module], sources: list[int | list[int]], layer_info: list[LayerInfo],
                 config: dict) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.sources = sources  # absolute indices; i - 1 is the previous output (the image for layer 0)
        used = {j for i, s in enumerate(sources) for j in (s if isinstance(s, list) else [s]) if j != i - 1}
        self.keep = [i in used for i in range(len(layers))]
        self.layer_info = layer_info
        self.yaml = config

    @property
    def head(self) -> Detect:
        return self.layers[-1]

    @property
    def stride(self) -> torch.Tensor:
        """(nl,) pixels per cell of each output level."""
        return self.head.stride

    @property
    def nc(self) -> int:
        return self.head.nc

    @property
    def name(self) -> str:
        return str(self.yaml.get("name", "model"))

    @property
    def attentions(self) -> dict[str, str]:
        """Row -> the attention it was built with, e.g. {'backbone[2]': 'cbam at output'}: what an `attention=`
        override actually reached, for run records and `detector info`."""
        return {li.row: li.attention_label for li in self.layer_info if li.attention}

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Run every layer but the head; return the head's input maps (one per level)."""
        outputs: list[torch.Tensor | None] = []
        for i, layer in enumerate(self.layers):
            src = self.sources[i]
            if isinstance(src, list):
                x = [x if j == i - 1 else outputs[j] for j in src]
            elif src != i - 1:
                x = outputs[src]
            if i == len(self.layers) - 1:
                return x
            x = layer(x)
            outputs.append(x if self.keep[i] else None)
        raise AssertionError("unreachable: the builder guarantees a head layer")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        return self.head(self.forward_features(x))

    def fuse(self) -> DetectionModel:
        """For inference only: fold every Conv's BN into its conv, in place (deep-copy first to keep training)."""
        for m in self.modules():
            if isinstance(m, Conv):
                m.fuse()
        return self.eval()


def inference_copy(model: nn.Module) -> nn.Module:
    """A deep copy of a DetectionModel with every `Conv` block's BN folded into its conv (attention modules keep
    their own BNs), in channels_last and eval mode: what validation and prediction run (the model itself stays
    trainable). Feed it channels_last images. With the Conv BN passes gone and the layout oneDNN prefers,
    yolo-ca-n's forward at 256 px took 13 ms/image against 17 unfused on the 2-core CPU, and 28 against 36 ms at
    batch 1. Any other module is returned as it is."""
    if not isinstance(model, DetectionModel):
        return model
    return copy.deepcopy(model).fuse().to(memory_format=torch.channels_last)


def refresh_inference_copy(fused: nn.Module, model: nn.Module) -> bool:
    """Give `fused`, an `inference_copy` of `model` made earlier, `model`'s current weights, its BNs folded again: the
    numbers a new `inference_copy(model)` would hold, without the deep copy (16-22 ms against 0.1-0.12 s for a nano
    model on 2 cores). False, with nothing changed, when `fused` does not have `model`'s modules (a copy of another
    model)."""
    sources, targets = list(model.modules()), list(fused.modules())
    if len(sources) != len(targets):
        return False
    pairs = list(zip(sources, targets))
    if not all(type(src) is type(dst) or (isinstance(src, nn.BatchNorm2d) and isinstance(dst, nn.Identity)) for src, dst in pairs):
        return False
    folded: set[int] = set()  # the conv and BN modules inside a folded Conv: set by their Conv
    with torch.no_grad():
        for src, dst in pairs:
            if isinstance(src, Conv) and isinstance(src.bn, nn.BatchNorm2d):
                weight, bias = src.folded_weights()
                dst.conv.weight.copy_(weight)
                dst.conv.bias.copy_(bias)
                folded.update((id(src.conv), id(src.bn)))
            elif id(src) not in folded:
                for name, tensor in itertools.chain(src.named_parameters(recurse=False), src.named_buffers(recurse=False)):
                    getattr(dst, name).copy_(tensor)
    return True

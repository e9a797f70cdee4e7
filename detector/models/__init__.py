"""Models from YAML: blocks, the attention registry, the anchor heads (Detect, DecoupledDetect) and the builder.

Importing the package registers every block, attention and head with `registry.MODULES`.
"""

from detector.models.attention import ATTENTIONS, build_attention
from detector.models.builder import DetectionModel, build_model
from detector.models.head import DecoupledDetect, Detect
from detector.models.registry import MODULES

__all__ = ["ATTENTIONS", "MODULES", "DecoupledDetect", "Detect", "DetectionModel", "build_attention", "build_model"]

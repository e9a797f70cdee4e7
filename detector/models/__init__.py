"""Models from YAML: blocks, the attention registry, the anchor head and the builder.

Importing the package registers every block, attention and head with `registry.MODULES`.
"""

from detector.models.attention import ATTENTIONS, build_attention
from detector.models.builder import DetectionModel, build_model
from detector.models.head import Detect
from detector.models.registry import MODULES

__all__ = ["ATTENTIONS", "MODULES", "Detect", "DetectionModel", "build_attention", "build_model"]

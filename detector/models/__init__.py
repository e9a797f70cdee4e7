"""Models from YAML: blocks, the attention registry (with the spatial priors of priors.py), the anchor heads
(Detect, DecoupledDetect) and the builder.

Importing the package registers every block, attention, prior and head with `registry.MODULES`, and every
attention and prior with `attention.ATTENTIONS`.
"""

from detector.models import priors as _priors  # noqa: F401 (registers edge, coord, gc)
from detector.models.attention import ATTENTIONS, build_attention
from detector.models.builder import build_model
from detector.models.detection_model import DetectionModel
from detector.models.head import DecoupledDetect, Detect
from detector.models.registry import MODULES

__all__ = ["ATTENTIONS", "MODULES", "DecoupledDetect", "Detect", "DetectionModel", "build_attention", "build_model"]

"""detector: YOLO-style anchor-based object detection with swappable attention, trained on COCO-format data.

The public API: `Detector` (train / val / predict / export / info), `build_model`, `load_config`.
"""

from __future__ import annotations

from typing import Any

from detector.version import __version__

__all__ = ["Detector", "build_model", "load_config", "__version__"]


def __getattr__(name: str) -> Any:  # lazy: `import detector` stays cheap for the CLI's --help
    if name == "Detector":
        from detector.api import Detector

        return Detector
    if name == "build_model":
        from detector.models.builder import build_model

        return build_model
    if name == "load_config":
        from detector.config import load_train_config

        return load_train_config
    raise AttributeError(name)

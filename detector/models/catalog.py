"""The model YAMLs shipped inside the package, and the lookup of a bare model name among them."""

from __future__ import annotations

from pathlib import Path

from detector.config import PACKAGE_CONFIGS
from detector.errors import DetectorError, did_you_mean

MODEL_CONFIGS = PACKAGE_CONFIGS / "models"


def resolve_model_path(model: str) -> Path:
    """A model YAML path as given, or a bare name ('yolo-ca-n', 'configs/models/yolo-ca-n.yaml') looked up among
    the model YAMLs shipped inside the package (so an installed package needs no checkout)."""
    given = Path(model)
    if given.exists():
        return given
    for candidate in (MODEL_CONFIGS / given.name, MODEL_CONFIGS / f"{model}.yaml"):
        if candidate.exists():
            return candidate
    known = sorted(p.stem for p in MODEL_CONFIGS.glob("*.yaml"))
    raise DetectorError(f"model: '{model}' not found{did_you_mean(given.stem, known)}; known: {', '.join(known)}")

"""Reading back the labels/*.txt that the export and `detector predict save_txt=true` write, for the tests that
check them (imported by name: tests/ is on sys.path). The package's own reader, `yolo_import.read_yolo_labels`,
refuses a score column; this one reads past it."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def read_label_file(path: Path, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(classes (n,) int64, boxes (n, 4) xyxy float64 in pixels) of one label file; a score column is read past."""
    rows = [row.split()[:5] for row in path.read_text().splitlines() if row.strip()]
    values = np.array(rows, dtype=np.float64).reshape(-1, 5)
    size = np.array([width, height, width, height], dtype=np.float64)
    cxcywh = values[:, 1:] * size
    xyxy = np.concatenate([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], axis=1)
    return values[:, 0].astype(np.int64), xyxy

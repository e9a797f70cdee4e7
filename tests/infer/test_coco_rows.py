"""COCO rows: xyxy -> xywh taken in float64 before rounding, whatever the dtype of the boxes given."""

from __future__ import annotations

import numpy as np

from detector.infer.coco_rows import coco_rows


def test_width_of_float32_boxes_is_taken_in_float64_then_rounded() -> None:
    """4592.6484375 - 45.033935546875 = 4547.614501953125 exactly, 4547.615 at 1/1000 px; a float32 subtraction
    rounds it to 4547.6143 first, which would be written as 4547.614."""
    boxes = np.array([[45.033935546875, 2.0, 4592.6484375, 12.5]], dtype=np.float32)
    row = coco_rows(7, boxes, np.array([0.123456], dtype=np.float32), [3])[0]
    assert row.dtype == np.float64
    assert row.tolist() == [7.0, 45.034, 2.0, 4547.615, 10.5, 0.12346, 3.0]

"""The official COCO box metric (pycocotools COCOeval, or faster-coco-eval's C++ port) on our detections.

Detections are an (N, 7) float array [image_id, x, y, w, h, score, category_id] (bbox xywh in original pixels,
original category ids), the same rows that predictions.json holds, so the reported numbers are exactly what
pycocotools gives when it re-scores that file. Categories with no ground truth in the evaluated images are left out
of the means (pycocotools reports -1 where a size range has no ground truth at all).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from detector.errors import DetectorError
from detector.infer.coco_rows import coco_results_to_detections, detections_to_coco_results
from detector.memory import collector_skips_live_objects
from detector.viz.tables import format_table

COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
BACKENDS = ("auto", "pycocotools", "faster")  # auto: faster when faster-coco-eval is installed (same numbers)

__all__ = [
    "BACKENDS", "COCO_KEYS", "resolve_backend", "coco_results_to_detections", "detections_to_coco_results", "evaluate_coco", "fitness",
    "format_metrics_table",
]


def fitness(metrics: dict[str, Any]) -> float:
    """The single number the trainer maximises: 0.1 * AP50 + 0.9 * AP50:95."""
    return 0.1 * float(metrics["AP50"]) + 0.9 * float(metrics["AP"])


def resolve_backend(backend: str) -> str:
    """'auto' -> 'faster' when faster-coco-eval imports (its C++ COCOeval gives pycocotools' numbers, tested, at
    about 14x the speed on 5,000 images), else 'pycocotools'; other names as given (checked)."""
    if backend not in BACKENDS:
        raise DetectorError(f"backend: unknown '{backend}'; valid: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    return "faster" if importlib.util.find_spec("faster_coco_eval") is not None else "pycocotools"


def evaluate_coco(
    gt: COCO,
    detections: np.ndarray | Sequence[dict[str, Any]],
    *,
    image_ids: Sequence[int] | None = None,
    backend: str = "auto",
) -> tuple[dict[str, Any], np.ndarray]:
    """COCOeval(gt, dt, 'bbox') over `image_ids` (default: every GT image).

    Returns (metrics, precision): metrics holds the 12 COCO_KEYS as floats plus `per_class` (one dict per GT
    category: name, category_id, instances (non-crowd boxes in the evaluated images), AP, AP50; AP and AP50 are
    None for a category without ground truth); precision is COCOeval's (T=10, R=101, K, A=4, M=3) array (-1 where
    undefined), K in sorted category-id order, for PR curves. An empty detection set is scored without
    `loadRes` (which crashes on it): AP 0 wherever ground truth exists.
    """
    backend = resolve_backend(backend)
    det = detections if isinstance(detections, np.ndarray) else coco_results_to_detections(detections)
    det = np.asarray(det, dtype=np.float64).reshape(-1, 7)
    image_ids = sorted(gt.getImgIds()) if image_ids is None else sorted(int(i) for i in image_ids)
    cat_ids = sorted(gt.getCatIds())
    _check_ids(det, image_ids, cat_ids)

    with collector_skips_live_objects(), contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        results = _results_dataset(gt, det)
        if backend == "faster":
            coco_eval = _faster_eval(gt, results)
        else:
            dt = COCO()
            dt.dataset = results
            dt.createIndex()
            from pycocotools.cocoeval import COCOeval

            coco_eval = COCOeval(gt, dt, "bbox")
        coco_eval.params.imgIds = image_ids
        coco_eval.params.catIds = cat_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    metrics: dict[str, Any] = {k: float(v) for k, v in zip(COCO_KEYS, coco_eval.stats)}
    precision = np.asarray(coco_eval.eval["precision"], dtype=np.float64)
    metrics["per_class"] = _per_class(gt, precision, image_ids, cat_ids)
    return metrics, precision


def format_metrics_table(metrics: dict[str, Any], num_images: int) -> str:
    """The per-class table users read after validation: an `all` row, then one row per class with ground truth."""
    per_class = metrics["per_class"]
    rows: list[list[object]] = [["all", num_images, sum(c["instances"] for c in per_class), metrics["AP50"], metrics["AP"]]]
    rows += [[c["name"], "", c["instances"], c["AP50"], c["AP"]] for c in per_class if c["AP"] is not None]
    text = format_table(["class", "images", "instances", "AP50", "AP50-95"], rows)
    for half in (COCO_KEYS[:6], COCO_KEYS[6:]):  # the 12 COCO numbers, in pycocotools' order (-1: no GT in that range)
        text += "\n" + "  ".join(f"{key} {metrics[key]:.3f}" for key in half)
    missing = [c["name"] for c in per_class if c["AP"] is None]
    if missing:
        text += f"\n{len(missing)} classes without ground truth in these images (left out of the mean): {', '.join(missing)}"
    return text


def _check_ids(det: np.ndarray, image_ids: Sequence[int], cat_ids: Sequence[int]) -> None:
    """pycocotools asserts (or silently ignores) on foreign ids; we name the first offender instead."""
    for column, known, what in ((0, image_ids, "image id"), (6, cat_ids, "category id")):
        values = det[:, column]
        bad = ~np.isin(values, np.asarray(known, dtype=np.float64))
        if bad.any():
            raise DetectorError(
                f"detections: {what} {values[bad][0]:g} is not in the ground truth"
                + (" images being evaluated" if column == 0 else " categories")
                + f" ({int(bad.sum())} detections affected)"
            )
    if not np.isfinite(det[:, 1:6]).all():
        raise DetectorError("detections: non-finite box or score values")


def _results_dataset(gt: COCO, det: np.ndarray) -> dict[str, Any]:
    """What `COCO.loadRes` builds for box results (area = w*h, ids 1..n, iscrowd 0), minus the unused polygon;
    also defined for zero detections."""
    anns = detections_to_coco_results(det)
    for i, ann in enumerate(anns, start=1):
        ann["area"] = ann["bbox"][2] * ann["bbox"][3]
        ann["id"] = i
        ann["iscrowd"] = 0
    return {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]), "annotations": anns}


def _faster_eval(gt: COCO, results: dict[str, Any]) -> Any:
    try:
        import faster_coco_eval
    except ImportError as err:
        raise DetectorError("backend=faster needs faster-coco-eval: pip install 'detector[faster]'") from err
    silent = dict(print_function=lambda *args, **kwargs: None)
    gt_fast = faster_coco_eval.COCO(gt.dataset, **silent)
    dt_fast = faster_coco_eval.COCO(**silent)
    dt_fast.dataset = results
    dt_fast.createIndex()
    return faster_coco_eval.COCOeval_faster(gt_fast, dt_fast, "bbox", **silent)


def _per_class(gt: COCO, precision: np.ndarray, image_ids: Sequence[int], cat_ids: Sequence[int]) -> list[dict[str, Any]]:
    """AP50:95 and AP50 per category from the accumulated precision (area all, 100 detections per image)."""
    anns = gt.dataset.get("annotations", [])
    evaluated = set(image_ids)
    counted = [a["category_id"] for a in anns if not a.get("iscrowd", 0) and a["image_id"] in evaluated]
    instances = dict(zip(*np.unique(np.asarray(counted, dtype=np.int64), return_counts=True))) if counted else {}
    per_class = []
    for k, cat_id in enumerate(cat_ids):
        p_all = precision[:, :, k, 0, -1]
        defined = p_all > -1
        per_class.append(
            {
                "name": str(gt.cats[cat_id].get("name", cat_id)),
                "category_id": int(cat_id),
                "instances": int(instances.get(cat_id, 0)),
                "AP": float(p_all[defined].mean()) if defined.any() else None,
                "AP50": float(p_all[0][defined[0]].mean()) if defined[0].any() else None,
            }
        )
    return per_class

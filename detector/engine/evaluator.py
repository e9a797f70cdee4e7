"""Validation: batched inference on the val loader -> NMS -> original pixels and category ids -> COCOeval.

The detections are kept as one (N, 7) array [image_id, x, y, w, h, score, category_id] (bbox xywh in original
pixels, rounded as predictions.json stores them); the metrics are computed from exactly these rows, so re-scoring
the saved predictions.json with pycocotools gives the same numbers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from detector.engine.metrics import (
    BACKENDS,
    COCO_KEYS,
    detections_to_coco_results,
    evaluate_coco,
    fitness,
    format_metrics_table,
)
from detector.engine.postprocess import non_max_suppression
from detector.errors import DetectorError
from detector.models.builder import inference_copy

__all__ = ["Evaluator", "detections_to_rows", "fitness", "run_val"]

SAMPLES_DPI = 60  # the TensorBoard grid of `samples`: 240 px per image, about 0.26 MB per validation (PNG)

LOGGER = logging.getLogger(__name__)

# predictions.json precision: 1/1000 px for boxes, 1e-5 for scores (scores below conf 0.001 never appear)
BOX_DECIMALS = 3
SCORE_DECIMALS = 5


def detections_to_rows(
    detections: list[torch.Tensor], meta: list[dict[str, Any]], category_ids: torch.Tensor
) -> np.ndarray:
    """NMS output (per image (K, 6) [x1, y1, x2, y2, score, class] in letterboxed input pixels) -> (N, 7) float64
    rows [image_id, x, y, w, h, score, category_id] in original pixels with original category ids.

    `meta` is the loader's per-image dicts (image_id, ratio, pad, orig_hw); `category_ids[c]` is the original id of
    contiguous class c. Loops over images only.
    """
    from detector.data.transforms import unletterbox_boxes

    parts = []
    for det, info in zip(detections, meta):
        boxes = unletterbox_boxes(det[:, :4].float(), info["ratio"], info["pad"], info["orig_hw"])
        image_id = torch.full_like(det[:, 4:5], float(info["image_id"]), dtype=torch.float64)
        parts.append(torch.cat([image_id, boxes.double(), det[:, 4:6].double()], dim=1))
    if not parts:
        return np.zeros((0, 7), dtype=np.float64)
    rows = torch.cat(parts).cpu().numpy()
    out = np.empty_like(rows)
    out[:, 0] = rows[:, 0]
    out[:, 1:3] = rows[:, 1:3]
    out[:, 3:5] = rows[:, 3:5] - rows[:, 1:3]
    out[:, 1:5] = np.round(out[:, 1:5], BOX_DECIMALS)
    out[:, 5] = np.round(rows[:, 5], SCORE_DECIMALS)
    out[:, 6] = category_ids.cpu().numpy()[rows[:, 6].astype(np.int64)]
    return out


class Evaluator:
    """COCO mAP of a model on a val loader (`build_val_loader`); `run(model)` is called by the trainer each
    `val_interval` epochs (rank 0 only) and by `detector val`. `verbose` logs the per-class table (the speed line
    is always logged).

    `half` runs the forward under fp16 autocast on CUDA (ignored elsewhere); the model is never modified (a
    DetectionModel is evaluated through its BN-folded channels_last `inference_copy`). With a
    `save_dir`, each run writes metrics.json, predictions.json (when `save_json`) and plots/ (when `plots`).
    """

    def __init__(
        self,
        loader: Iterable[dict[str, Any]],
        *,
        conf: float = 0.001,
        iou: float = 0.6,
        max_det: int = 300,
        device: torch.device | str | None = None,
        half: bool = False,
        backend: str = "pycocotools",
        save_dir: str | Path | None = None,
        plots: bool = False,
        save_json: bool = True,
        verbose: bool = True,
    ) -> None:
        if backend not in BACKENDS:
            raise DetectorError(f"backend: unknown '{backend}'; valid: {', '.join(BACKENDS)}")
        self.loader = loader
        dataset = getattr(loader, "dataset", None)
        self.dataset = getattr(dataset, "coco", dataset)
        if self.dataset is None or not hasattr(self.dataset, "coco_gt"):
            raise TypeError("Evaluator needs a val loader whose dataset is (or has .coco) a CocoDataset")
        self.gt = self.dataset.coco_gt()
        self.names = list(self.dataset.names)
        self.category_ids = torch.as_tensor(list(self.dataset.category_ids), dtype=torch.int64)
        self.conf, self.iou, self.max_det = conf, iou, max_det
        self.device = torch.device(device) if device is not None else None
        self.half = half
        self.backend = backend
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.plots = plots
        self.save_json = save_json
        self.verbose = verbose

    def run(
        self,
        model: nn.Module,
        *,
        plots: bool | None = None,
        save_json: bool | None = None,
        verbose: bool | None = None,
        samples: int = 0,
    ) -> dict[str, Any]:
        """Evaluate `model` (any mode; put back in its previous mode) -> the 12 COCO_KEYS, per_class, speed_ms.

        `plots`, `save_json`, `verbose` override the constructor's choice for this run (e.g. only at a training's
        last epoch). `samples` > 0 adds "samples": the val_batch0 grid of that many first-batch images with GT and
        predictions, rendered as uint8 (3, H, W) at a small size, which the trainer logs to TensorBoard.
        """
        plots = self.plots if plots is None else plots
        save_json = self.save_json if save_json is None else save_json
        verbose = self.verbose if verbose is None else verbose
        device = self.device or next(model.parameters()).device
        amp = torch.autocast("cuda", dtype=torch.float16) if self.half and device.type == "cuda" else contextlib.nullcontext()
        was_training = model.training
        model.eval()
        net = inference_copy(model)  # BN folded, channels_last: the given model is left as it is
        totals = dict.fromkeys(("preprocess", "inference", "nms"), 0.0)
        parts: list[np.ndarray] = []
        seen_ids: list[int] = []
        first_batch = None
        try:
            with torch.inference_mode():
                for batch in self.loader:
                    t0 = _clock(device)
                    images = batch["images"].to(device, non_blocking=True).float().div_(255)
                    images = images.contiguous(memory_format=torch.channels_last)
                    t1 = _clock(device)
                    with amp:
                        pred = net(images)
                    t2 = _clock(device)
                    self._check_classes(pred)
                    dets = non_max_suppression(pred, conf=self.conf, iou=self.iou, max_det=self.max_det)
                    parts.append(detections_to_rows(dets, batch["meta"], self.category_ids))
                    t3 = _clock(device)
                    totals["preprocess"] += t1 - t0
                    totals["inference"] += t2 - t1
                    totals["nms"] += t3 - t2
                    seen_ids += [int(m["image_id"]) for m in batch["meta"]]
                    if first_batch is None and (plots or samples > 0):
                        first_batch = (batch["images"], batch["targets"], [d.cpu() for d in dets])
        finally:
            model.train(was_training)
        if not seen_ids:
            raise DetectorError("validation: the val loader yielded no images")

        rows = np.concatenate(parts)
        t0 = time.perf_counter()
        metrics, precision = evaluate_coco(self.gt, rows, image_ids=seen_ids, backend=self.backend)
        totals["metric"] = time.perf_counter() - t0
        metrics["speed_ms"] = {k: 1000 * v / len(seen_ids) for k, v in totals.items()}
        self._report(metrics, len(seen_ids), verbose=verbose)
        if self.save_dir is not None:
            self._save(metrics, rows, precision, seen_ids, first_batch if plots else None, save_json=save_json)
        if samples > 0:
            from detector.engine.plots import figure_pixels, val_batch_figure

            images, targets, dets = first_batch
            metrics["samples"] = figure_pixels(val_batch_figure(images, targets, dets, self.names, max_images=samples, dpi=SAMPLES_DPI))
        return metrics

    def _check_classes(self, pred: torch.Tensor) -> None:
        nc = pred.shape[-1] - 5
        if nc != len(self.category_ids):
            raise DetectorError(f"validation: the model predicts {nc} classes but the dataset has {len(self.category_ids)}")

    def _report(self, metrics: dict[str, Any], num_images: int, *, verbose: bool) -> None:
        if verbose:
            LOGGER.info("\n%s", format_metrics_table(metrics, num_images))
        speed = metrics["speed_ms"]
        LOGGER.info(
            "speed: %.1f ms pre-process, %.1f ms inference, %.1f ms NMS, %.1f ms metric per image",
            *(speed[k] for k in ("preprocess", "inference", "nms", "metric")),
        )

    def _save(
        self,
        metrics: dict[str, Any],
        rows: np.ndarray,
        precision: np.ndarray,
        image_ids: list[int],
        first_batch: tuple | None,
        *,
        save_json: bool,
    ) -> None:
        assert self.save_dir is not None
        self.save_dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.save_dir / "metrics.json", {k: metrics[k] for k in (*COCO_KEYS, "per_class", "speed_ms")})
        if save_json:
            _write_json(self.save_dir / "predictions.json", detections_to_coco_results(rows))
        if first_batch is not None:  # plots requested
            from detector.engine import plots

            plots.save_validation_plots(
                self.save_dir / "plots",
                precision=precision,
                rows=rows,
                gt=self.gt,
                image_ids=image_ids,
                category_ids=self.category_ids.tolist(),
                names=self.names,
                first_batch=first_batch,
            )


def run_val(
    *,
    weights: str | Path = "",
    model: nn.Module | None = None,
    data: str | Path = "",
    split: str = "val",
    imgsz: int = 0,
    batch: int = 16,
    conf: float = 0.001,
    iou: float = 0.6,
    max_det: int = 300,
    rect: bool = True,
    workers: int = 2,
    device: str = "",
    half: bool = True,
    backend: str = "pycocotools",
    save_json: bool = True,
    plots: bool = True,
    save_dir: str | Path | None = None,
) -> dict[str, Any]:
    """`detector val`: COCO mAP of a checkpoint (`weights`, EMA weights when present) or of a `model` on a split.

    `data` '' means the dataset the checkpoint was trained on; `imgsz` 0 the checkpoint's training size (640 for a
    bare model); `half` applies on CUDA only; a given `model` stays on its device unless `device` is set.
    Returns what `Evaluator.run` returns; files go to `save_dir`.
    """
    from detector.config import load_data_spec
    from detector.data.loader import build_val_loader
    from detector.data.synthetic import ensure_bundled_dataset
    from detector.engine.checkpoint import load_checkpoint, model_from_checkpoint
    from detector.engine.device import select_device

    _check_val_options(split=split, batch=batch, conf=conf, iou=iou, max_det=max_det, backend=backend)
    if (model is None) == (not weights):
        raise DetectorError("val: give exactly one of weights=<checkpoint> or a model")
    ckpt = None
    if model is None:
        ckpt = load_checkpoint(Path(weights))
        model = model_from_checkpoint(ckpt, source=str(weights))
    if not data:
        if ckpt is None or not ckpt["train_config"].get("data"):
            raise DetectorError("val: data=<dataset yaml> is required")
        data = ckpt["train_config"]["data"]
    imgsz = imgsz or (int(ckpt["imgsz"]) if ckpt is not None else 640)
    ensure_bundled_dataset(Path(data))
    split_spec = getattr(load_data_spec(data), split)
    run_device = select_device(device) if device or ckpt is not None else next(model.parameters()).device
    model.to(run_device)
    if conf > 0.001:
        LOGGER.warning("val: conf=%g > 0.001 lowers mAP (low-score detections still add recall)", conf)

    loader = build_val_loader(split_spec, imgsz=imgsz, batch_size=batch, workers=workers, rect=rect)
    if ckpt is not None:
        _check_categories(ckpt["category_ids"], loader.dataset.coco.category_ids, str(weights), str(split_spec.annotations))
    LOGGER.info("val: %s (%s split, %d px, %s)", split_spec.annotations, split, imgsz, run_device)
    evaluator = Evaluator(
        loader, conf=conf, iou=iou, max_det=max_det, device=run_device, half=half and run_device.type == "cuda",
        backend=backend, save_dir=save_dir, plots=plots, save_json=save_json,
    )
    metrics = evaluator.run(model)
    if save_dir is not None:
        LOGGER.info("val: results in %s", save_dir)
    return metrics


def _check_val_options(*, split: str, batch: int, conf: float, iou: float, max_det: int, backend: str) -> None:
    checks = [
        (split in ("val", "train"), f"split must be val or train, got '{split}'"),
        (batch >= 1, f"batch must be >= 1, got {batch}"),
        (0.0 <= conf <= 1.0, f"conf must be in [0, 1], got {conf}"),
        (0.0 <= iou <= 1.0, f"iou must be in [0, 1], got {iou}"),
        (max_det >= 1, f"max_det must be >= 1, got {max_det}"),
        (backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}, got '{backend}'"),
    ]
    for ok, message in checks:
        if not ok:
            raise DetectorError(f"val: {message}")


def _check_categories(model_ids: list[int], data_ids: list[int], weights: str, annotations: str) -> None:
    """Contiguous class c means category model_ids[c] to the model; the data must agree or AP is meaningless."""
    model_ids, data_ids = [int(c) for c in model_ids], [int(c) for c in data_ids]
    if model_ids != data_ids:

        def show(ids: list[int]) -> str:
            return ", ".join(map(str, ids[:8])) + (f", ... ({len(ids)} in all)" if len(ids) > 8 else "")

        raise DetectorError(
            f"val: {weights} was trained on category ids [{show(model_ids)}] but {annotations} has [{show(data_ids)}] "
            "(another dataset?)"
        )


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a CPU-GPU sync point, for honest per-stage times
    return time.perf_counter()


def _write_json(path: Path, data: Any) -> None:
    """Write via a temporary file, so a crash never leaves a half-written json behind."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
    tmp.replace(path)

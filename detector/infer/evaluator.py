"""Validation: batched inference on the val loader -> NMS -> original pixels and category ids -> COCOeval.

The detections are kept as one (N, 7) array [image_id, x, y, w, h, score, category_id] (bbox xywh in original
pixels, rounded as predictions.json stores them); the metrics are computed from exactly these rows, so re-scoring
the saved predictions.json with pycocotools gives the same numbers.

`Evaluator.run` returns an `EvalResult` and writes nothing; `save_results` logs and writes it (metrics.json,
predictions.json, plots/), for `Detector.val` and the trainer alike.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from detector.infer.coco_rows import coco_rows, detections_to_coco_results, write_json
from detector.infer.metrics import COCO_KEYS, evaluate_coco, fitness, format_metrics_table, resolve_backend
from detector.infer.postprocess import non_max_suppression
from detector.infer.tta import augmented_forward
from detector.errors import DetectorError
from detector.models.detection_model import inference_copy, refresh_inference_copy
from detector.runtime.device import device_clock

__all__ = ["EvalResult", "Evaluator", "detections_to_rows", "fitness", "save_results"]

SAMPLE_TILE_PX = 240  # each image of the TensorBoard grid of `samples` at this long side (a small PNG per validation)

LOGGER = logging.getLogger(__name__)

def detections_to_rows(
    detections: list[torch.Tensor], meta: list[dict[str, Any]], category_ids: torch.Tensor
) -> np.ndarray:
    """NMS output (per image (K, 6) [x1, y1, x2, y2, score, class] in letterboxed input pixels) -> (N, 7) float64
    rows [image_id, x, y, w, h, score, category_id] in original pixels with original category ids.

    `meta` is the loader's per-image dicts (image_id, ratio, pad, orig_hw); `category_ids[c]` is the original id of
    contiguous class c. The batch's detections come to the host in one copy and are mapped back there in one
    `unletterbox_boxes` call over per-row image parameters: mapping each image on the device cost two blocking
    host-to-device copies per image (its offset and bounds tensors) on CUDA.
    """
    from detector.data.transforms import unletterbox_boxes

    if not detections:
        return np.zeros((0, 7), dtype=np.float64)
    det = torch.cat(list(detections)).cpu()  # one device-to-host copy per batch (a CPU-GPU sync point)
    counts = torch.tensor([len(d) for d in detections])

    def per_row(values: list[Any]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32).repeat_interleave(counts, 0)

    boxes = unletterbox_boxes(det[:, :4].float(), per_row([[m["ratio"]] for m in meta]),
                              per_row([list(m["pad"]) for m in meta]), per_row([list(m["orig_hw"]) for m in meta]))
    image_id = np.repeat(np.array([float(m["image_id"]) for m in meta], dtype=np.float64), counts.numpy())
    scores, classes = det[:, 4].double().numpy(), det[:, 5].double().numpy()
    return coco_rows(image_id, boxes.double().numpy(), scores, category_ids.cpu().numpy()[classes.astype(np.int64)])


@dataclass
class EvalResult:
    """One evaluation, kept apart from its outputs so the val command and the trainer save it through one function
    (`save_results`) and the trainer can log `sample` without digging it out of the metrics.

    `metrics`: the 12 COCO_KEYS, per_class and speed_ms (what metrics.json stores). `rows`: the (N, 7) detections
    [image_id, x, y, w, h, score, category_id] the metrics were computed from (predictions.json). `precision`:
    COCOeval's (T, R, K, A, M) array for the PR curves. `first_batch`: (images, targets, detections) of the first
    batch, for val_batch0.jpg. `sample`: the uint8 (3, H, W) grid `run(samples=n)` drew from it, else None.
    `gt`, `names`, `category_ids`: the dataset evaluated against (for the confusion matrix and the drawings).
    """

    metrics: dict[str, Any]
    rows: np.ndarray
    precision: np.ndarray
    image_ids: list[int]
    first_batch: tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]
    gt: Any
    names: list[str]
    category_ids: list[int]
    sample: torch.Tensor | None = None

    @property
    def per_class(self) -> list[dict[str, Any]]:
        """One row per GT category: name, category_id, instances, AP, AP50."""
        return self.metrics["per_class"]

    @property
    def speed_ms(self) -> dict[str, float]:
        """ms per image: preprocess, inference, nms, metric."""
        return self.metrics["speed_ms"]


class Evaluator:
    """COCO mAP of a model on a val loader (`build_val_loader`); `run(model)` is called by the trainer each
    `val_interval` epochs (rank 0 only), by `Detector.val` and by `detector bench val`. It computes and returns an
    `EvalResult`; writing and logging it is `save_results`' job, so `run` has no output flags.

    `precision` is the forward's autocast dtype (None: fp32): float16 on CUDA; the trainer's per-epoch validation
    on a CPU with bf16 units passes bfloat16 (the training's own precision: 1.8x faster than fp32 on an AMX Xeon;
    the boxes are decoded and scored in fp32 either way). The model is never modified (a
    DetectionModel is evaluated through its BN-folded channels_last `inference_copy`, kept for the next run of the
    same model). `augment` runs each batch
    through test-time augmentation (`tta.augmented_forward`: three scales, one flipped) before the same NMS.
    """

    def __init__(
        self,
        loader: Iterable[dict[str, Any]],
        *,
        conf: float = 0.001,
        iou: float = 0.6,
        max_det: int = 300,
        device: torch.device | str | None = None,
        precision: torch.dtype | None = None,
        backend: str = "auto",
        augment: bool = False,
    ) -> None:
        backend = resolve_backend(backend)
        self.loader = loader
        dataset = getattr(loader, "dataset", None)
        self.dataset = getattr(dataset, "coco", dataset)
        if self.dataset is None or not hasattr(self.dataset, "coco_gt"):
            raise TypeError("Evaluator needs a val loader whose dataset is (or has .coco) a CocoDataset")
        self._gt: Any = None  # built at the first scoring: see `gt`
        self._fused: tuple[nn.Module, nn.Module] | None = None  # (model, its inference copy) of the last run
        self.names = list(self.dataset.names)
        self.category_ids = torch.as_tensor(list(self.dataset.category_ids), dtype=torch.int64)
        self.conf, self.iou, self.max_det = conf, iou, max_det
        self.device = torch.device(device) if device is not None else None
        self.precision = precision
        self.backend = backend
        self.augment = augment

    @property
    def gt(self) -> Any:
        """The COCO ground truth (`CocoDataset.coco_gt`), built from the dataset's arrays on first use, in this
        process: data workers forked before the first scoring never inherit its per-annotation Python objects."""
        if self._gt is None:
            self._gt = self.dataset.coco_gt()
        return self._gt

    def run(self, model: nn.Module, *, samples: int = 0) -> EvalResult:
        """Evaluate `model` (any mode; put back in its previous mode) -> an `EvalResult`.

        `samples` > 0 also draws `result.sample`: the val_batch0 grid of that many first-batch images with GT and
        predictions, rendered as uint8 (3, H, W) at a small size, which the trainer logs to TensorBoard.
        """
        device = self.device or next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            rows, image_ids, first_batch, totals = self._infer(self._inference_copy(model), device)
        finally:
            model.train(was_training)
        t0 = time.perf_counter()
        metrics, precision = evaluate_coco(self.gt, rows, image_ids=image_ids, backend=self.backend)
        totals["metric"] = time.perf_counter() - t0
        metrics["speed_ms"] = {k: 1000 * v / len(image_ids) for k, v in totals.items()}
        sample = None
        if samples > 0:
            from detector.viz.draw import val_batch_grid

            images, targets, dets = first_batch
            sample = val_batch_grid(images, targets, dets, self.names, max_images=samples, tile_px=SAMPLE_TILE_PX)
        return EvalResult(
            metrics=metrics, rows=rows, precision=precision, image_ids=image_ids, first_batch=first_batch, gt=self.gt,
            names=self.names, category_ids=self.category_ids.tolist(), sample=sample,
        )

    def _inference_copy(self, model: nn.Module) -> nn.Module:
        """`inference_copy(model)`; for the model of the last run (the trainer's EMA model, each epoch) that run's
        copy with the new weights (`refresh_inference_copy`: 16-22 ms against 0.1-0.12 s for a nano model)."""
        if self._fused is not None and self._fused[0] is model and refresh_inference_copy(self._fused[1], model):
            return self._fused[1]
        fused = inference_copy(model)
        self._fused = (model, fused) if fused is not model else None
        return fused

    def _infer(self, net: nn.Module, device: torch.device) -> tuple[np.ndarray, list[int], tuple, dict[str, float]]:
        """Every batch through `net` (BN folded, channels_last) and NMS -> (rows, image ids, first batch, stage
        seconds); the first batch is kept on the CPU for the drawings."""
        from detector.data.transforms import to_model_input  # lazy, as in detections_to_rows: cv2/albumentations

        amp = torch.autocast(device.type, dtype=self.precision) if self.precision is not None else contextlib.nullcontext()
        totals = dict.fromkeys(("preprocess", "inference", "nms"), 0.0)
        parts: list[np.ndarray] = []
        seen_ids: list[int] = []
        first_batch = None
        with torch.inference_mode():
            for batch in self.loader:
                t0 = device_clock(device)
                images = to_model_input(batch["images"], device)
                t1 = device_clock(device)
                with amp:
                    pred = augmented_forward(net, images) if self.augment else net(images)
                t2 = device_clock(device)
                self._check_classes(pred)
                dets = non_max_suppression(pred, conf=self.conf, iou=self.iou, max_det=self.max_det)
                parts.append(detections_to_rows(dets, batch["meta"], self.category_ids))
                t3 = device_clock(device)
                totals["preprocess"] += t1 - t0
                totals["inference"] += t2 - t1
                totals["nms"] += t3 - t2
                seen_ids += [int(m["image_id"]) for m in batch["meta"]]
                if first_batch is None:
                    first_batch = (batch["images"], batch["targets"], [d.cpu() for d in dets])
        if not seen_ids:
            raise DetectorError("validation: the val loader yielded no images")
        return np.concatenate(parts), seen_ids, first_batch, totals

    def _check_classes(self, pred: torch.Tensor) -> None:
        nc = pred.shape[-1] - 5
        if nc != len(self.category_ids):
            raise DetectorError(f"validation: the model predicts {nc} classes but the dataset has {len(self.category_ids)}")


def save_results(result: EvalResult, save_dir: str | Path, *, save_json: bool = True, plots: bool = False, verbose: bool = True) -> None:
    """The outputs of an evaluation, for `detector val` and the trainer alike: the per-class table (when `verbose`)
    and the speed line logged; metrics.json, predictions.json (when `save_json`) and plots/ (when `plots`) in
    `save_dir`."""
    metrics = result.metrics
    if verbose:
        LOGGER.info("\n%s", format_metrics_table(metrics, len(result.image_ids)))
    LOGGER.info(
        "speed: %.1f ms pre-process, %.1f ms inference, %.1f ms NMS, %.1f ms metric per image",
        *(result.speed_ms[k] for k in ("preprocess", "inference", "nms", "metric")),
    )
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    write_json(save_dir / "metrics.json", {k: metrics[k] for k in (*COCO_KEYS, "per_class", "speed_ms")})
    if save_json:
        write_json(save_dir / "predictions.json", detections_to_coco_results(result.rows))
    if plots:
        from detector.viz import plots as drawing

        drawing.save_validation_plots(
            save_dir / "plots", precision=result.precision, rows=result.rows, gt=result.gt, image_ids=result.image_ids,
            category_ids=result.category_ids, names=result.names, first_batch=result.first_batch,
        )

"""The Python API (`Detector`) and the `detector val|predict|export|info` commands, which are thin calls into it.

    from detector import Detector
    det = Detector("yolo-ca-n")                      # a model YAML (path or name in configs/models) ...
    det.train(data="data/shapes.yaml", epochs=50)    # ... trained; det now holds runs/train/exp/weights/best.pt
    det.val()["AP"]                                  # COCO metrics on the dataset it was trained on
    det.predict("photo.jpg")[0]["boxes_xyxy"]        # numpy, original pixels
    det.export()                                     # best.onnx beside the weights, checked with onnxruntime
    Detector("runs/train/exp/weights/best.pt").predict(images)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

from detector.config import build_options, load_train_config, resolve_model_path
from detector.errors import DetectorError
from detector.options import ExportOptions, InfoOptions, PredictOptions, ValOptions

__all__ = ["Detector", "run_export", "run_info", "run_predict", "run_val"]

LOGGER = logging.getLogger(__name__)

DEFAULT_IMGSZ = 640  # inference size of a model that has no checkpoint (and so no training size)
ImageInput = str | Path | np.ndarray | Sequence[str | Path | np.ndarray]


def _output_dir(project: str, name: str, exist_ok: bool) -> Path:
    from detector.engine.trainer import next_run_dir

    return next_run_dir(Path(project), name, exist_ok)


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """Paths as strings, as the option classes type them."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


def _is_checkpoint(model: str | Path) -> bool:
    return Path(model).suffix in (".pt", ".pth") or (Path(model).is_file() and Path(model).suffix not in (".yaml", ".yml"))


class Detector:
    """A model to train, evaluate, run, export and inspect: from a model YAML (path or a name in configs/models)
    or from a checkpoint (`weights/best.pt`, EMA weights when present).

    Attributes: `model` (eval mode, on `device`), `weights` (the checkpoint path, or None before training),
    `names` and `category_ids` (index = contiguous class), `imgsz` (training size, or 640), `run_dir` (after
    `train`). `device` '' picks CUDA when available.
    """

    def __init__(self, model: str | Path = "yolo-ca-n", *, device: str = "") -> None:
        from detector.engine.device import select_device

        self.device_spec = device
        self.device = select_device(device)
        self.weights: Path | None = None
        self.model_yaml: Path | None = None
        self.run_dir: Path | None = None
        self._fused: nn.Module | None = None  # a BN-folded copy of `model` for predict, made on first use
        if _is_checkpoint(model):
            self._load(Path(model))
        else:
            from detector.models.builder import build_model

            self.model_yaml = resolve_model_path(str(model))
            self.model = build_model(self.model_yaml).to(self.device).eval()
            self.names = [str(i) for i in range(self.model.nc)]
            self.category_ids = list(range(self.model.nc))
            self.imgsz = DEFAULT_IMGSZ

    def _load(self, weights: Path) -> None:
        from detector.engine.checkpoint import load_checkpoint, model_from_checkpoint

        ckpt = load_checkpoint(weights)
        self.model = model_from_checkpoint(ckpt, source=str(weights)).to(self.device).eval()
        self._fused = None
        self.weights = weights
        self.names = list(ckpt["names"])
        self.category_ids = [int(c) for c in ckpt["category_ids"]]
        self.imgsz = int(ckpt["imgsz"])

    def __repr__(self) -> str:
        source = self.weights or self.model_yaml
        return f"Detector({str(source)!r}, nc={self.model.nc}, device={self.device})"

    # ------------------------------------------------------------------------------------------ verbs

    def train(self, data: str | Path | None = None, epochs: int | None = None, **overrides: Any) -> dict[str, Any]:
        """Train this Detector's model YAML with `detector train` keys (`imgsz=320, batch=8, attention="cbam"` ...);
        afterwards the Detector holds the run's best.pt. Returns the last epoch's metrics."""
        from detector.engine.trainer import Trainer

        values = _plain({k: v for k, v in (("data", data), ("epochs", epochs)) if v is not None} | overrides)
        if self.model_yaml is not None:
            values.setdefault("model", str(self.model_yaml))
        elif not values.get("resume"):
            raise DetectorError(
                f"train: {self.weights} is a checkpoint; train a model YAML (Detector('yolo-ca-n').train(...)) "
                f"or continue this run with resume='{self.weights}'"
            )
        trainer = Trainer(load_train_config(values))
        metrics = trainer.fit()
        self.run_dir = trainer.run_dir
        best = trainer.weights_dir / "best.pt"
        if best.exists():  # absent on the non-zero ranks of a torchrun job
            self._load(best)
        return metrics

    def val(self, data: str | Path | None = None, **options: Any) -> dict[str, Any]:
        """COCO metrics (the 12 COCO keys, per_class, speed_ms) with `detector val` keys; `data` defaults to the
        dataset the checkpoint was trained on. Files go to runs/val/<name> as for the CLI."""
        values = _plain({"device": self.device_spec, **options, "data": data or ""})
        if self.weights is not None:
            values["weights"] = str(self.weights)
        return run_val(build_options(ValOptions, values, "Detector.val()"), model=None if self.weights else self.model)

    def predict(
        self,
        images: ImageInput,
        *,
        conf: float = 0.25,
        iou: float = 0.45,
        max_det: int = 300,
        imgsz: int | None = None,
        classes: Sequence[int] | None = None,
        batch: int = 8,
    ) -> list[dict[str, Any]]:
        """Detections for images: a path (image, folder or glob), an (H, W, 3) uint8 RGB array, or a list of them.

        One dict per image, in input order: boxes_xyxy float32 (K, 4) original pixels, scores (K,), classes (K,)
        contiguous, category_ids (K,) original ids, names (K class names), file (path or None). Unreadable files of
        a folder or glob are skipped with a warning; an unreadable file named directly raises DetectorError.
        """
        from detector.engine.predictor import Predictor, detection_dict, iter_batches, list_images

        if isinstance(images, (str, Path)):
            items: list[Path | np.ndarray] = list(list_images(images))
            skip = Path(images).is_dir() or not Path(images).exists()
        elif isinstance(images, np.ndarray) and images.ndim == 4:
            items, skip = list(images), False
        elif isinstance(images, np.ndarray):
            items, skip = [images], False
        else:
            items, skip = [Path(i) if isinstance(i, str) else i for i in images], False
        predictor = Predictor(self._inference_model(), imgsz=imgsz or self.imgsz, conf=conf, iou=iou, max_det=max_det, classes=classes, device=self.device)
        results = []
        for chunk in iter_batches(items, max(batch, 1), skip_unreadable=skip, skipped=[]):
            for file, det in zip(chunk.files, predictor(chunk.images)):
                results.append(detection_dict(det, self.names, self.category_ids, file))
        return results

    def export(self, format: str = "onnx", **options: Any) -> Path:  # noqa: A002 (the CLI key's name)
        """Export with `detector export` keys (imgsz, dynamic, nms, opset, out ...); returns the file's path.
        Default path: beside the weights as <stem>.onnx (for a bare YAML model: <model name>.onnx here)."""
        values = _plain({**options, "format": format, "weights": self.weights or ""})
        opts = build_options(ExportOptions, values, "Detector.export()")
        return _export(opts, self.model, self._metadata(), default_imgsz=self.imgsz)

    def info(self, imgsz: int = 640) -> str:
        """The layer table, parameters and GFLOPs at `imgsz`."""
        from detector.models.info import model_info

        return model_info(self.model, imgsz)

    # ------------------------------------------------------------------------------------------ helpers

    def _inference_model(self) -> nn.Module:
        """A BN-folded channels_last copy of the model for inference (the model itself stays trainable and countable)."""
        from detector.models.builder import inference_copy

        if self._fused is None:
            self._fused = inference_copy(self.model)
        return self._fused

    def _metadata(self) -> dict[str, Any]:
        return {"names": self.names, "category_ids": self.category_ids, "model": self.model.name}


# ---------------------------------------------------------------------------------------------- commands


def run_val(opts: ValOptions, *, model: nn.Module | None = None) -> dict[str, Any]:
    """`detector val`: metrics of `opts.weights` (or of `model`) on `opts.data`; files in runs/val/<name>."""
    from detector.engine import evaluator

    save_dir = _output_dir(opts.project, opts.name, opts.exist_ok)
    return evaluator.run_val(
        weights="" if model is not None else opts.weights, model=model, data=opts.data, split=opts.split,
        imgsz=opts.imgsz, batch=opts.batch, conf=opts.conf, iou=opts.iou, max_det=opts.max_det, rect=opts.rect,
        workers=opts.workers, device=opts.device, half=opts.half, backend=opts.backend, save_json=opts.save_json,
        plots=opts.plots, save_dir=save_dir,
    )


def run_predict(opts: PredictOptions) -> list[dict[str, Any]]:
    """`detector predict`: drawn images and predictions.json for every image of `opts.source` in
    runs/predict/<name>; returns one detection dict per readable image."""
    from detector.engine.checkpoint import load_checkpoint, model_from_checkpoint
    from detector.engine.device import select_device
    from detector.engine.predictor import Predictor, list_images, predict_source
    from detector.models.builder import inference_copy

    if not opts.weights:
        raise DetectorError("predict: weights=<checkpoint> is required")
    if not opts.source:
        raise DetectorError("predict: source=<image, folder or glob> is required")
    _check_thresholds("predict", opts.conf, opts.iou, opts.max_det, opts.batch)
    files = list_images(opts.source)
    ckpt = load_checkpoint(Path(opts.weights))
    device = select_device(opts.device)
    model = inference_copy(model_from_checkpoint(ckpt, source=opts.weights)).to(device)
    imgsz = opts.imgsz or int(ckpt["imgsz"])
    predictor = Predictor(model, imgsz=imgsz, conf=opts.conf, iou=opts.iou, max_det=opts.max_det, classes=opts.classes or None, device=device)
    save_dir = _output_dir(opts.project, opts.name, opts.exist_ok)
    LOGGER.info("predict: %d image(s) from %s at %d px on %s", len(files), opts.source, imgsz, device)
    results = predict_source(
        predictor, files, save_dir, names=list(ckpt["names"]), category_ids=[int(c) for c in ckpt["category_ids"]],
        batch_size=opts.batch, save_images=opts.save_images,
    )
    print(save_dir / "predictions.json")
    return results


def run_export(opts: ExportOptions) -> Path:
    """`detector export`: the checkpoint as ONNX, checked with onnxruntime; the path is the last line printed."""
    from detector.engine.checkpoint import load_checkpoint, model_from_checkpoint

    if not opts.weights:
        raise DetectorError("export: weights=<checkpoint> is required")
    ckpt = load_checkpoint(Path(opts.weights))
    model = model_from_checkpoint(ckpt, source=opts.weights)
    metadata = {"names": list(ckpt["names"]), "category_ids": [int(c) for c in ckpt["category_ids"]], "model": model.name}
    return _export(opts, model, metadata, default_imgsz=int(ckpt["imgsz"]))


def _export(opts: ExportOptions, model: nn.Module, metadata: dict[str, Any], *, default_imgsz: int) -> Path:
    from detector.export import ExportSpec, export_onnx

    if opts.format.lower() != "onnx":
        raise DetectorError(f"export: format '{opts.format}' is not supported (onnx)")
    _check_thresholds("export", opts.conf, opts.iou, opts.max_det, opts.batch)
    if opts.out:
        out = Path(opts.out)
    elif opts.weights:
        out = Path(opts.weights).with_suffix(".onnx")
    else:
        out = Path(f"{model.name}.onnx")
    spec = ExportSpec(
        imgsz=opts.imgsz or default_imgsz, batch=opts.batch, dynamic=opts.dynamic, nms=opts.nms, conf=opts.conf,
        iou=opts.iou, max_det=opts.max_det, opset=opts.opset, simplify=opts.simplify,
    )
    path = export_onnx(model, out, spec, metadata=metadata)
    print(path)
    return path


def run_info(opts: InfoOptions) -> str:
    """`detector info`: the layer table and summary line of a model YAML or checkpoint (printed and returned);
    with attention_maps=true, PNGs of every attention layer's weights on `source` in runs/info/<name>."""
    from detector.models.info import model_info

    image = _read_source(opts.source) if opts.attention_maps else None
    if opts.weights:
        if opts.attention or opts.attention_at or opts.nc:
            raise DetectorError("info: nc, attention and attention_at apply to a model YAML, not to weights=")
        from detector.engine.checkpoint import load_checkpoint, model_from_checkpoint

        ckpt = load_checkpoint(Path(opts.weights))
        model = model_from_checkpoint(ckpt, source=opts.weights)
        map_size = int(ckpt["imgsz"])
    else:
        from detector.models.builder import build_model

        model = build_model(resolve_model_path(opts.model), nc=opts.nc or None, attention=opts.attention or None, attention_at=opts.attention_at or None)
        model.eval()
        map_size = opts.imgsz
    text = model_info(model, opts.imgsz)
    print(text)
    if image is not None:
        from detector.models.attention_maps import save_attention_maps

        if not opts.weights:
            LOGGER.warning("info: attention maps of an untrained model (no weights=) show its random initialisation")
        save_dir = _output_dir(opts.project, opts.name, opts.exist_ok)
        paths = save_attention_maps(model, image, map_size, save_dir)
        if paths:
            print(f"attention maps: {len(paths)} PNG(s) in {save_dir}")
    return text


def _read_source(source: str) -> np.ndarray:
    """The attention-map image, or a DetectorError naming it."""
    from detector.data.coco import read_rgb
    from detector.data.loader import READ_ERRORS

    if not source:
        raise DetectorError("info: attention_maps=true needs source=<image>")
    try:
        return read_rgb(Path(source))
    except FileNotFoundError:
        raise DetectorError(f"info: source '{source}' not found") from None
    except READ_ERRORS as err:
        raise DetectorError(f"info: cannot read image {source} ({err})") from None


def _check_thresholds(command: str, conf: float, iou: float, max_det: int, batch: int) -> None:
    checks = [
        (0.0 <= conf <= 1.0, f"conf must be in [0, 1], got {conf}"),
        (0.0 <= iou <= 1.0, f"iou must be in [0, 1], got {iou}"),
        (max_det >= 1, f"max_det must be >= 1, got {max_det}"),
        (batch >= 1, f"batch must be >= 1, got {batch}"),
    ]
    for ok, message in checks:
        if not ok:
            raise DetectorError(f"{command}: {message}")

"""The Python API: `Detector`. `detector val|predict|export` are its methods called with the command's options
(`Detector.from_checkpoint(opts.weights).val(opts)`); `detector info` is `run_info`.

    from detector import Detector
    det = Detector("yolo-ca-n")                      # a model YAML (path or name in configs/models) ...
    det.train(data="data/shapes.yaml", epochs=50)    # ... trained; det now holds runs/train/exp/weights/best.pt
    det.val()["AP"]                                  # COCO metrics on the dataset it was trained on
    det.predict("photo.jpg")[0]["boxes_xyxy"]        # numpy, original pixels
    det.export()                                     # best.onnx beside the weights, checked with onnxruntime
    det.export(format="openvino")                    # best_openvino_model/best.xml, checked with OpenVINO
    Detector("runs/train/exp/weights/best.pt").predict(images)
    Detector("runs/train/exp/weights/best.onnx").val()   # an export scored as deployed (onnxruntime; OpenVINO too)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import torch.nn as nn

from detector import memory
from detector.config import build_options, given_keys, load_train_config

from detector.models.catalog import resolve_model_path
from detector.errors import DetectorError
from detector.infer.exported import is_exported
from detector.options import ExportOptions, InfoOptions, PredictOptions, ValOptions

if TYPE_CHECKING:
    from detector.infer.export import ExportSpec

__all__ = ["Detector", "run_info"]

LOGGER = logging.getLogger(__name__)

DEFAULT_IMGSZ = 640  # inference size of a model that has no checkpoint (and so no training size)
ImageInput = str | Path | np.ndarray | Sequence[str | Path | np.ndarray]
T = TypeVar("T")


def _output_dir(project: str, name: str, exist_ok: bool) -> Path:
    from detector.folders import next_run_dir

    return next_run_dir(Path(project), name, exist_ok)


def _check_predict_call(images: Any, given: PredictOptions | None, options: dict[str, Any], *, save: Any,
                        stream: Any) -> None:
    """What `Detector.predict` is given, typed before any work: images in one of its forms, not also a `source=`
    (which was ignored), and `save`/`stream` as bools (a truthy 'no' saved)."""
    if given is None and images is not None:
        if options.get("source"):
            raise DetectorError("Detector.predict(): give the images or source=, not both")
        items = images if isinstance(images, (list, tuple)) else [images]
        camera = isinstance(images, int) and not isinstance(images, bool)
        bad = None if camera else next((i for i in items if not isinstance(i, (str, Path, np.ndarray))), None)
        if bad is not None:
            raise DetectorError("Detector.predict(): images must be a path, a glob, an (H, W, 3) uint8 array, a list "
                                f"of them, a video or a camera index, got {type(bad).__name__} {bad!r:.40}")
    for key, value in (("save", save), ("stream", stream)):
        if not isinstance(value, bool):
            raise DetectorError(f"Detector.predict(): '{key}' expects true or false, got {value!r}")


def _export_target(out: Path, fmt: str) -> Path:
    """`out=` checked against the format before any work: an ONNX export is a file ending in .onnx (so it can never
    replace the .pt it exports, or a folder); an OpenVINO one a folder or its .xml, not another existing file."""
    if fmt == "onnx" and out.suffix.lower() != ".onnx":
        raise DetectorError(f"export: out= for format=onnx must be a file ending in .onnx, got '{out}'")
    try:
        kind = "folder" if out.is_dir() else "file" if out.exists() else ""
    except OSError as err:  # a name too long for the file system, a path through a file
        raise DetectorError(f"export: cannot write {out}: {err.strerror or err}") from err
    if fmt == "onnx" and kind == "folder":
        raise DetectorError(f"export: out={out} is a folder; name the .onnx file to write")
    if fmt == "openvino" and kind == "file" and out.suffix.lower() != ".xml":
        raise DetectorError(f"export: out= for format=openvino is a folder or an .xml file, got the existing file '{out}'")
    return out


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """Paths as strings, as the option classes type them."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


def _is_checkpoint(model: str | Path) -> bool:
    from detector.runtime.checkpoint import CHECKPOINT_SUFFIXES

    return Path(model).suffix in CHECKPOINT_SUFFIXES or (Path(model).is_file() and Path(model).suffix not in (".yaml", ".yml"))


class Detector:
    """A model to train, evaluate, run, export and inspect: from a model YAML (path or a name in configs/models)
    or from a checkpoint (`weights/best.pt`, EMA weights when present); or an exported model to evaluate and run
    (`best.onnx`, `best_openvino_model/`: `detector.infer.exported`, on the CPU).

    The only code that opens a checkpoint for inference (`_load`); `detector val|predict|export` are its `val`,
    `predict` and `export` called with the command's options, so the CLI and the Python API run the same lines.

    Attributes: `model` (eval mode, on `device`), `weights` (the checkpoint path, or None before training),
    `names` and `category_ids` (index = contiguous class), `imgsz` (training size, or 640), `train_data` (the
    dataset YAML the checkpoint was trained on, or ''), `run_dir` (after `train`). `device` '' picks CUDA when
    available.
    """

    def __init__(self, model: str | Path = "yolo-ca-n", *, device: str = "") -> None:
        if not isinstance(model, (str, Path)) or not str(model):
            raise DetectorError(f"Detector(): model must be a model YAML, its name or a checkpoint path, got {model!r:.80}")
        if is_exported(model) or _is_checkpoint(model):
            self._open(Path(model), device)
        else:
            from detector.models.builder import build_model

            self._start(device)
            self.model_yaml = resolve_model_path(str(model))
            self.model = build_model(self.model_yaml).to(self.device).eval()
            self.names = [str(i) for i in range(self.model.nc)]
            self.category_ids = list(range(self.model.nc))
            self.imgsz = DEFAULT_IMGSZ

    @classmethod
    def from_checkpoint(cls, weights: str | Path, *, device: str = "") -> Detector:
        """A Detector of a checkpoint, never of a model YAML: what `weights=` means to val, predict and export, so a
        wrong path is an error naming the checkpoint rather than an untrained model."""
        if not str(weights):
            raise DetectorError("weights=<checkpoint> is required")
        detector = cls.__new__(cls)
        detector._open(Path(weights), device)
        return detector

    def _start(self, device: str) -> None:
        from detector.runtime.device import select_device

        self.device_spec = device
        self.device = select_device(device)
        self.weights: Path | None = None
        self.model_yaml: Path | None = None
        self.run_dir: Path | None = None
        self.train_data = ""
        self.exported = False  # an ONNX / OpenVINO model: val and predict only, on the CPU
        self._fused: nn.Module | None = None  # a BN-folded copy of `model` for predict, made on first use

    def _open(self, path: Path, device: str) -> None:
        """Start on `device` with the checkpoint or exported model at `path` (an export only on the CPU)."""
        if is_exported(path):
            self._start(_cpu_only(path, device))
            self._load_exported(path)
        else:
            self._start(device)
            self._load(path)

    def _load(self, weights: Path) -> None:
        """Open a checkpoint: its model (EMA weights) on this Detector's device, class names, category ids, size."""
        from detector.runtime.checkpoint import load_checkpoint, model_from_checkpoint

        ckpt = load_checkpoint(weights)
        self.model = model_from_checkpoint(ckpt, source=str(weights)).to(self.device).eval()
        self._fused = None
        self.weights = weights
        self.names = list(ckpt["names"])
        self.category_ids = [int(c) for c in ckpt["category_ids"]]
        self.imgsz = int(ckpt["imgsz"])
        if len(self.names) != self.model.nc:
            raise DetectorError(f"{weights}: checkpoint lists {len(self.names)} class names for a model of "
                                f"{self.model.nc} classes")
        self.train_data = str(ckpt["train_config"].get("data") or "")

    def _load_exported(self, path: Path) -> None:
        """Open an exported model: it runs on the CPU; names, category ids, size and training data from its metadata."""
        from detector.infer.exported import load_exported

        self.model = load_exported(path)
        self._fused, self.weights, self.exported = None, path, True
        self.names, self.category_ids = list(self.model.names), list(self.model.category_ids)
        self.imgsz, self.train_data = self.model.imgsz, self.model.train_data

    def _needs_pytorch(self, verb: str) -> None:
        if self.exported:
            raise DetectorError(f"{verb}: {self.weights} is an exported model (val and predict only); {verb} needs "
                                "the checkpoint it was exported from (weights/best.pt)")

    def _check_exported_call(self, verb: str, imgsz: int, augment: bool) -> None:
        """An exported model's val or predict, refused before any work when it cannot run as asked."""
        if self.exported:
            if augment:
                raise DetectorError(f"{verb}: augment=true needs the PyTorch checkpoint: test-time augmentation trims "
                                    "each pass's output levels, which an exported graph does not expose")
            self.model.check_size(imgsz)

    def __repr__(self) -> str:
        source = self.weights or self.model_yaml
        return f"Detector({str(source)!r}, nc={self.model.nc}, device={self.device})"

    # ------------------------------------------------------------------------------------------ verbs

    def train(self, data: str | Path | None = None, epochs: int | None = None, **overrides: Any) -> dict[str, Any]:
        """Train with `detector train` keys (`imgsz=320, batch=8, attention="cbam"` ...): this Detector's model YAML
        from scratch, or, for a Detector made from a checkpoint, a fine-tune that starts from its weights (a new
        run; `resume=` continues the old one instead). Afterwards the Detector holds the run's best.pt, so a second
        call fine-tunes from it. Returns the last epoch's metrics."""
        from detector.train.trainer import Trainer

        self._needs_pytorch("train")
        values = _plain({k: v for k, v in (("data", data), ("epochs", epochs)) if v is not None} | overrides)
        if not values.get("resume"):
            values.setdefault("model", str(self.model_yaml if self.model_yaml is not None else self.weights))
        values.setdefault("device", self.device_spec)  # Detector(device="cpu") trains there too ('' : the default)
        trainer = Trainer(load_train_config(values))
        metrics = trainer.fit()
        self.run_dir = trainer.run_dir
        best = trainer.weights_dir / "best.pt"
        if best.exists():  # absent on the non-zero ranks of a torchrun job
            self._load(best)
            self.model_yaml = None  # a Detector of this checkpoint now: a second train() fine-tunes from it
        return metrics

    def val(self, opts: ValOptions | None = None, /, **options: Any) -> dict[str, Any]:
        """`detector val`: COCO metrics (the 12 COCO keys, per_class, speed_ms) of this Detector's model, with the
        command's keys as a ValOptions or as keywords (`det.val(data="x.yaml", iou=0.65)`). `data` '' means the
        dataset the checkpoint was trained on, `imgsz` 0 its training size; metrics.json, predictions.json and
        plots/ go to runs/val/<name>. `opts.weights` is not read: the Detector's own model is evaluated. The
        process keeps the memory each batch frees for the next (`memory.hold_freed_heap`), as training does."""
        from detector.infer.evaluator import Evaluator, save_results

        memory.hold_freed_heap()
        opts = _options(ValOptions, opts, options, "Detector.val()")
        self._check_exported_call("val", opts.imgsz or self.imgsz, opts.augment)
        save_dir = _output_dir(opts.project, opts.name, opts.exist_ok)
        device = self._to(opts.device)
        loader = self._val_loader(opts, device)
        evaluator = Evaluator(
            loader, conf=opts.conf, iou=opts.iou, max_det=opts.max_det, device=device,
            precision=torch.float16 if opts.half and device.type == "cuda" else None, backend=opts.backend, augment=opts.augment,
        )
        result = evaluator.run(self.model)
        save_results(result, save_dir, save_json=opts.save_json, plots=opts.plots)
        LOGGER.info("val: results in %s", save_dir)
        return result.metrics

    def predict(self, images: ImageInput | int | PredictOptions | None = None, /, *, save: bool = False,
                stream: bool = False, **options: Any) -> list[dict[str, Any]] | Iterator[dict[str, Any]]:
        """Detections for images: a path (image, folder or glob), an (H, W, 3) uint8 RGB array, or a list of them
        (a folder or glob in a list is expanded in place);
        a video file or a camera index (0); or a PredictOptions, whose `source` names them. Options: `detector
        predict` keys (conf, iou, max_det, imgsz, classes, batch, vid_stride ...), as that PredictOptions or as keywords.

        One dict per image, in input order: boxes_xyxy float32 (K, 4) original pixels, scores (K,), classes (K,)
        contiguous, category_ids (K,) original ids, names (K class names), file (path or None). Unreadable files of
        a folder or glob are skipped with a warning; an unreadable file named directly raises DetectorError.
        `save` (what `detector predict` does) also writes the drawn images (unless save_images=False),
        predictions.json and, with save_txt=True, YOLO-format labels/<image>.txt (save_crop=True: crops/<class>/ of
        each box's pixels) to runs/predict/<name>, and prints that predictions.json path last.

        A video gives one dict per predicted frame (every vid_stride-th), with `frame` (0-based) and `time_s` added;
        `save` writes <stem>.mp4 (drawn) and <stem>.jsonl there (detector.infer.video), printing the .jsonl path
        last. `track=True` (a video or camera only) keeps the boxes of confirmed ByteTrack tracks, each frame's
        dict gaining `track_ids` (K,) int64 (detector.infer.tracker). `stream=True` returns an iterator instead
        of a list (frames as they are predicted: for a camera, or a long video; images are predicted at once all
        the same). The process keeps the memory each batch frees
        for the next (`memory.hold_freed_heap`: a batch of 32 at 256 px re-faulted 20,000-56,000 pages without it).
        """
        from detector.infer.predictor import Predictor
        from detector.infer.video import is_video_source

        memory.hold_freed_heap()
        given = images if isinstance(images, PredictOptions) else None
        _check_predict_call(images, given, options, save=save, stream=stream)
        opts = _options(PredictOptions, given, options, "Detector.predict()")
        source = opts.source if given is not None or images is None else images
        if isinstance(source, str) and not source:
            raise DetectorError("predict: source=<image, folder, glob, video or camera index> is required")
        self._check_exported_call("predict", opts.imgsz or self.imgsz, opts.augment)
        _check_per_image_files(opts, source, save)
        tracker = _tracker(opts, source)
        device = self._to(opts.device)
        predictor = Predictor(
            self._inference_model(), imgsz=opts.imgsz or self.imgsz, conf=opts.track_low if tracker is not None else opts.conf,
            iou=opts.iou, max_det=opts.max_det, classes=opts.classes or None, device=device, augment=opts.augment,
            agnostic=opts.agnostic_nms,
        )
        if is_video_source(source):
            frames = self._predict_video(predictor, source, opts, save, tracker)
            return frames if stream else list(frames)
        results = self._predict_to_files(predictor, source, opts) if save else self._predict_in_memory(predictor, source, opts.batch)
        return iter(results) if stream else results

    def export(self, opts: ExportOptions | None = None, /, **options: Any) -> Path:
        """`detector export`: the model as ONNX (checked with onnxruntime) or OpenVINO IR (`format="openvino"`,
        checked with OpenVINO's CPU runtime), with the command's keys as an ExportOptions or as keywords (format,
        imgsz, dynamic, nms, opset, half, int8, data, out ...); returns the file's path (the .xml for OpenVINO),
        also printed last. Default path: beside the weights as <stem>.onnx, <stem>_int8.onnx (`int8=True`) or
        <stem>_openvino_model/<stem>.xml (for a bare YAML model: named after the model, here)."""
        from detector.infer.export import ExportSpec, export_onnx
        from detector.infer.export_openvino import export_openvino, openvino_folder

        opts = _options(ExportOptions, opts, options, "Detector.export()")
        self._needs_pytorch("export")
        fmt = opts.format
        if opts.half and fmt != "openvino":
            raise DetectorError("export: 'half' is for format=openvino (the ONNX file keeps fp32 weights)")
        if opts.int8 and fmt != "onnx":
            raise DetectorError("export: 'int8' is for format=onnx (a QDQ graph that onnxruntime runs in 8 bits)")
        stem = self.weights.with_suffix("") if self.weights is not None else Path(self.model.name)
        spec = ExportSpec(
            imgsz=opts.imgsz or self.imgsz, batch=opts.batch, dynamic=opts.dynamic, nms=opts.nms, conf=opts.conf,
            iou=opts.iou, max_det=opts.max_det, opset=opts.opset, simplify=opts.simplify,
        )
        images = self._check_images(opts.data)
        default = openvino_folder(stem) if fmt == "openvino" else stem.with_name(f"{stem.name}{'_int8' if opts.int8 else ''}.onnx")
        out = _export_target(Path(opts.out), fmt) if opts.out else default
        try:  # each file is written beside its target and moved there once checked (`export.staged`)
            if fmt == "openvino":
                path = export_openvino(self.model, out, spec, half=opts.half, metadata=self._metadata(), check_images=images)
            elif opts.int8:
                path = self._export_int8(spec, out, opts, images)
            else:
                path = export_onnx(self.model, out, spec, metadata=self._metadata(), check_images=images)
        except DetectorError as err:
            raise DetectorError(f"{err}; nothing written to {out}") from err
        except OSError as err:  # a folder that cannot be made, a name too long for the file system, a full disk
            raise DetectorError(f"export: cannot write {out}: {err.strerror or err}; nothing written there") from err
        print(path)
        return path

    def _export_int8(self, spec: ExportSpec, out: Path, opts: ExportOptions, check_images: list[np.ndarray]) -> Path:
        """The INT8 ONNX file at `out`: the fp32 export (checked against PyTorch as always) quantized with ranges
        calibrated on `opts.calib_images` train images of `opts.data` (default: the training dataset), then run
        once against PyTorch on those images (`infer.quantize.check_int8`)."""
        import tempfile

        from detector.data.spec import load_data_spec
        from detector.infer.export import export_onnx_graph, staged
        from detector.infer.predictor import list_images
        from detector.infer.quantize import calibration_files, check_int8, quantize_onnx

        data = opts.data or self.train_data
        if not data:
            raise DetectorError("export: int8=true needs data=<dataset YAML> (its train images calibrate the quantization)")
        files = calibration_files(list_images(load_data_spec(data).train.images), opts.calib_images)
        stride = int(self.model.stride.max())
        with tempfile.TemporaryDirectory() as tmp, staged(out) as partial:
            fp32, graph = export_onnx_graph(self.model, Path(tmp) / "fp32.onnx", spec, metadata=self._metadata(),
                                            check_images=check_images)
            quantize_onnx(fp32, partial, files, spec, stride)
            check_int8(graph, partial, files[:8], spec, stride, final=out)
        return out

    def _check_images(self, data: str) -> list[np.ndarray]:
        """The export check's inputs: `CHECK_IMAGES` train images of `data` (default: the checkpoint's training
        data), evenly spaced. On them a trained model keeps detections for the in-graph NMS to be compared, where it
        scores noise below conf. [] (the check runs on noise) for a bare model or when the checkpoint's dataset is
        not on this machine; a `data=` that does not load is an error."""
        from detector.data.spec import load_data_spec
        from detector.infer.export import CHECK_IMAGES
        from detector.infer.predictor import list_images
        from detector.infer.quantize import calibration_files, decoded_images

        if not (data or self.train_data):
            return []
        try:
            files = calibration_files(list_images(load_data_spec(data or self.train_data).train.images), CHECK_IMAGES)
        except DetectorError as err:
            if data:
                raise
            LOGGER.info("export: checked on random inputs: the training data %s does not load here (%s)", self.train_data, err)
            return []
        return list(decoded_images(files, "the check"))

    def info(self, imgsz: int = 640) -> str:
        """The layer table, parameters and GFLOPs at `imgsz`."""
        from detector.models.info import model_info

        self._needs_pytorch("info")
        return model_info(self.model, build_options(InfoOptions, {"imgsz": imgsz}, "Detector.info()").imgsz)

    # ------------------------------------------------------------------------------------------ helpers

    def _to(self, device: str) -> torch.device:
        """The device a call runs on: a command's `device=` moves the Detector there ('' keeps its own)."""
        from detector.runtime.device import select_device

        if device and self.exported:
            device = _cpu_only(self.weights, device)
        if device:
            target = select_device(device)
            if target != self.device:
                self.model.to(target)
                self.device, self.device_spec, self._fused = target, device, None
        return self.device

    def _val_loader(self, opts: ValOptions, device: torch.device) -> Any:
        """The loader of `opts.split` at `opts.imgsz` (0: the Detector's size); a checkpoint's category ids must be
        the dataset's, or its AP would be meaningless."""
        from detector.data.spec import load_data_spec
        from detector.data.loader import build_val_loader, resolve_worker_priority, resolve_workers
        from detector.data.synthetic import ensure_bundled_dataset

        data = opts.data or self.train_data
        if not data:
            raise DetectorError("val: data=<dataset yaml> is required")
        imgsz = opts.imgsz or self.imgsz
        ensure_bundled_dataset(Path(data))
        spec = load_data_spec(data)
        split = getattr(spec, opts.split)
        if opts.conf > 0.001:
            LOGGER.warning("val: conf=%g > 0.001 lowers mAP (low-score detections still add recall)", opts.conf)
        workers = resolve_workers(opts.workers, batch_size=opts.batch)
        rect = opts.rect and not (self.exported and self.model.static_hw)
        if rect != opts.rect:
            LOGGER.info("val: square batches (rect=false): %s was exported at a fixed size", self.weights)
        loader = build_val_loader(split, imgsz=imgsz, batch_size=opts.batch, workers=workers, rect=rect,
                                  idle_workers=resolve_worker_priority(opts.worker_priority, device), names=spec.names)
        if self.weights is not None:
            coco = loader.dataset.coco
            _check_categories((self.category_ids, self.names), (coco.category_ids, coco.names), str(self.weights),
                              str(split.annotations))
        LOGGER.info("val: %s (%s split, %d px, %s)\n%s", split.annotations, opts.split, imgsz, device,
                    loader.dataset.coco.summary)
        return loader

    def _predict_in_memory(self, predictor: Any, images: ImageInput, batch: int) -> list[dict[str, Any]]:
        from detector.infer.predictor import detection_dict, expand_image_list, iter_batches, list_images

        skip: bool | frozenset[str] = _skips_unreadable(images)
        if isinstance(images, (str, Path)):
            items: list[Path | np.ndarray] = list(list_images(images))
        elif isinstance(images, np.ndarray) and images.ndim == 4:
            items = list(images)
        elif isinstance(images, np.ndarray):
            items = [images]
        elif all(isinstance(i, (str, Path)) for i in images):
            paths, skip = expand_image_list(images)
            items = list(paths)
        else:
            items = [Path(i) if isinstance(i, str) else i for i in images]
        results = []
        for chunk in iter_batches(items, batch, skip_unreadable=skip, skipped=[]):
            for file, det in zip(chunk.files, predictor(chunk.images)):
                results.append(detection_dict(det, self.names, self.category_ids, file))
        return results

    def _predict_to_files(self, predictor: Any, source: ImageInput, opts: PredictOptions) -> list[dict[str, Any]]:
        """Every readable image of `source` (a path, folder, glob, or a list of them), drawn and in predictions.json."""
        from detector.infer.predictor import SavedFiles, expand_image_list, list_images, predict_source

        skip: bool | frozenset[str] = _skips_unreadable(source)
        if isinstance(source, (str, Path)):
            files = list_images(source)
        elif not isinstance(source, np.ndarray) and all(isinstance(i, (str, Path)) for i in source):
            files, skip = expand_image_list(source)
        else:
            raise DetectorError("predict: save=True needs image files (a path, a folder, a glob or a list of paths)")
        save_dir = _output_dir(opts.project, opts.name, opts.exist_ok)
        shown = source if isinstance(source, (str, Path)) else f"{len(files)} path(s)"
        LOGGER.info("predict: %d image(s) from %s at %d px on %s", len(files), shown, predictor.imgsz, self.device)
        results = predict_source(
            predictor, files, save_dir, names=self.names, category_ids=self.category_ids, batch_size=opts.batch,
            skip_unreadable=skip,
            saved=SavedFiles(images=opts.save_images, labels=opts.save_txt, scores=opts.save_conf, crops=opts.save_crop),
        )
        print(save_dir / "predictions.json")
        return results

    def _predict_video(self, predictor: Any, source: str | int | Path, opts: PredictOptions, save: bool,
                       tracker: Any) -> Iterator[dict[str, Any]]:
        """The frames' detections of a video file or camera, opened now; with `save` also the drawn video and the
        JSON lines in runs/predict/<name>, the .jsonl path printed once the last frame is done."""
        from detector.infer.video import predict_video, video_stem

        save_dir = _output_dir(opts.project, opts.name, opts.exist_ok) if save else None
        LOGGER.info("predict: video %s at %d px on %s (vid_stride %d)", source, predictor.imgsz, self.device, opts.vid_stride)
        frames = predict_video(
            predictor, source, names=self.names, category_ids=self.category_ids, batch_size=opts.batch,
            vid_stride=opts.vid_stride, save_dir=save_dir, save_video=opts.save_images, tracker=tracker,
        )
        return _print_when_done(frames, save_dir / f"{video_stem(source)}.jsonl") if save_dir is not None else frames

    def _inference_model(self) -> nn.Module:
        """A BN-folded channels_last copy of the model for inference (the model itself stays trainable and countable)."""
        from detector.models.detection_model import inference_copy

        if self._fused is None:
            self._fused = inference_copy(self.model)
        return self._fused

    def _metadata(self) -> dict[str, Any]:
        return {"names": self.names, "category_ids": self.category_ids, "model": self.model.name, "train_data": self.train_data}


def _skips_unreadable(source: Any) -> bool:
    """Whether `predict` skips (with a warning) the unreadable files of `source`: those of a folder or a glob are
    skipped; a file named directly, alone or in a list, is an error (a list's folders: `expand_image_list`)."""
    return isinstance(source, (str, Path)) and (Path(source).is_dir() or not Path(source).exists())


def _check_per_image_files(opts: PredictOptions, source: Any, save: bool) -> None:
    """save_txt and save_crop write files per image: refused, before any output, where there are none to write."""
    from detector.infer.video import is_video_source

    if opts.save_conf and not opts.save_txt:
        raise DetectorError("predict: save_conf adds the score to save_txt's label rows; give save_txt=true too")
    for key in ("save_txt", "save_crop"):
        if getattr(opts, key) and is_video_source(source):
            raise DetectorError(f"predict: {key} writes files per image; a video's boxes are in its .jsonl")
        if getattr(opts, key) and not save:
            raise DetectorError(f"predict: {key} writes files: pass save=True (as `detector predict` does)")


def _tracker(opts: PredictOptions, source: Any) -> Any:
    """The ByteTracker of `track=true` (None without it), made before any work: it needs a video or a camera,
    and track_low at most conf (boxes from conf up start and keep tracks, those from track_low only keep them)."""
    from detector.infer.tracker import ByteTracker
    from detector.infer.video import is_video_source

    if not opts.track:
        return None
    if not is_video_source(source):
        shown = repr(str(source)) if isinstance(source, (str, Path)) else f"of type {type(source).__name__}"
        raise DetectorError("predict: track=true follows objects across the frames of a video or a camera; "
                            f"source {shown} is neither (a video file mp4 avi mov ..., or a camera index)")
    return ByteTracker(high=opts.conf, low=opts.track_low, buffer=opts.track_buffer)


def _cpu_only(path: str | Path | None, device: str) -> str:
    """The device of an exported model: the CPU, where onnxruntime and OpenVINO run it here."""
    if device not in ("", "cpu"):
        raise DetectorError(f"{path}: an exported model runs on the CPU (onnxruntime, OpenVINO), not device={device}")
    return "cpu"


def _print_when_done(items: Iterator[T], path: Path) -> Iterator[T]:
    """`items`, then `path` printed (the last line of `detector predict` names its results file)."""
    yield from items
    print(path)


def _options(cls: type[T], given: T | None, values: dict[str, Any], where: str) -> T:
    """A call's options: an options object as given (built by `load_options` or by hand), or keywords checked
    against `cls` as the command line is (unknown keys, types, ranges; None means the default)."""
    if given is not None:
        if values:
            raise TypeError(f"{where}: give a {cls.__name__} or keywords, not both (got {', '.join(values)})")
        if not isinstance(given, cls):
            raise TypeError(f"{where}: expects a {cls.__name__}, got {type(given).__name__}")
        checked = build_options(cls, _plain(dataclasses.asdict(given)), where)  # built by hand: checked as typed
        object.__setattr__(checked, "_given", given_keys(given))
        return checked
    return build_options(cls, _plain({k: v for k, v in values.items() if v is not None}), where)


def _check_categories(model: tuple[list[int], list[str]], data: tuple[list[int], list[str]], weights: str,
                      annotations: str) -> None:
    """Contiguous class c means category model ids[c], named names[c], to the model; the data must agree (ids and
    names) or AP is meaningless."""
    from detector.data.coco import category_difference

    difference = category_difference(*model, *data)
    if difference:
        raise DetectorError(f"val: {weights} and {annotations} disagree: {difference} (another dataset or "
                            "labelling? a dataset YAML's names: renames its classes)")


# ---------------------------------------------------------------------------------------------- commands


def run_info(opts: InfoOptions) -> str:
    """`detector info`: the layer table and summary line of a model YAML or checkpoint (printed and returned);
    with attention_maps=true, PNGs of every attention layer's weights on `source` in runs/info/<name>."""
    from detector.models.info import model_info

    image = _read_source(opts.source) if opts.attention_maps else None
    if opts.weights:
        if opts.attention or opts.attention_at or opts.nc:
            raise DetectorError("info: nc, attention and attention_at apply to a model YAML, not to weights=")
        checkpoint = Detector.from_checkpoint(opts.weights, device="cpu")
        model, map_size = checkpoint.model, checkpoint.imgsz
    else:
        from detector.models.builder import build_model

        model = build_model(resolve_model_path(opts.model), nc=opts.nc or None, attention=opts.attention or None, attention_at=opts.attention_at or None)
        model.eval()
        map_size = opts.imgsz
    text = model_info(model, opts.imgsz)
    print(text)
    if image is not None:
        from detector.infer.attention_maps import save_attention_maps

        if not opts.weights:
            LOGGER.warning("info: attention maps of an untrained model (no weights=) show its random initialisation")
        save_dir = _output_dir(opts.project, opts.name, opts.exist_ok)
        paths = save_attention_maps(model, image, map_size, save_dir)
        if paths:
            print(f"attention maps: {len(paths)} PNG(s) in {save_dir}")
    return text


def _read_source(source: str) -> np.ndarray:
    """The attention-map image, or a DetectorError naming it."""
    from detector.data.image_files import read_failure, read_rgb
    from detector.data.loader import READ_ERRORS

    if not source:
        raise DetectorError("info: attention_maps=true needs source=<image>")
    try:
        return read_rgb(Path(source))
    except FileNotFoundError:
        raise DetectorError(f"info: source '{source}' not found") from None
    except READ_ERRORS as err:
        raise DetectorError(f"info: cannot read image {source} ({read_failure(err, Path(source))})") from None

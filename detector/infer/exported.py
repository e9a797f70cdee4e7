"""An exported model (`detector export`: ONNX, or OpenVINO IR) run where the PyTorch model runs, so `detector val`
scores and `detector predict` uses what is deployed: the same loader, letterbox, NMS and metric, the class names
and category ids read from the file's own metadata.

ONNX runs in onnxruntime (CPU), OpenVINO IR in OpenVINO's CPU plugin with `INFERENCE_PRECISION_HINT=f32` (its
default on CPUs with bf16 units is bf16, which moves boxes by 0.1-0.3 px; compile without the hint in deployment
for that speed). Both use as many threads as torch. A graph exported at a fixed size takes any smaller input:
the input is padded at its bottom and right to that size with the letterbox grey, which moves no box, so a
rectangular batch runs as it is (`detector val` still asks for square batches from such a graph, as a deployment
letterboxes). Of an export with NMS in the graph only the raw output is read (its confidence cut, 0.25 by default,
would understate AP); val and predict apply their own NMS.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from detector.errors import DetectorError

ONNX_SUFFIX = ".onnx"
OPENVINO_SUFFIX = ".xml"
OPENVINO_FOLDER_SUFFIX = "_openvino_model"  # <stem>_openvino_model/<stem>.xml, as other YOLO tools name it
PAD_VALUE = 114 / 255  # the letterbox grey, as the model input sees it
RAW_OUTPUT = "output"  # (B, N, 5 + nc): the layout `detector export nms=false` writes


def is_exported(path: str | Path) -> bool:
    """True for what `detector export` writes: a .onnx file, an OpenVINO .xml, or its `<stem>_openvino_model` folder."""
    path = Path(path)
    return path.suffix.lower() in (ONNX_SUFFIX, OPENVINO_SUFFIX) or (path.is_dir() and path.name.endswith(OPENVINO_FOLDER_SUFFIX))


class ExportedModel(nn.Module):
    """An exported graph behind the PyTorch model's interface: `model(images)` -> the raw (B, N, 5 + nc) output as a
    tensor on the input's device; `nc`, `stride`, `name`, `names`, `category_ids`, `imgsz` (its export size),
    `static_hw` ((H, W) of a fixed-size graph, else None) and `train_data` (the dataset YAML it was trained on,
    or '') from its metadata. It has no parameters and always runs on the CPU."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], metadata: dict[str, Any], static_hw: tuple[int, int] | None,
                 source: Path) -> None:
        super().__init__()
        self._run = run
        self.source = source
        self.names: list[str] = metadata["names"]
        self.category_ids: list[int] = metadata["category_ids"]
        self.nc = len(self.names)
        self.name = str(metadata.get("model") or source.stem)
        self.imgsz = int(metadata["imgsz"])
        self.train_data = str(metadata.get("train_data") or "")
        self.register_buffer("stride", torch.tensor([float(metadata["stride"])]), persistent=False)
        self.static_hw = static_hw

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Raw predictions of `images` (B, 3, h, w) in [0, 1]; a fixed-size graph gets them padded to its size."""
        h, w = images.shape[-2:]
        if self.static_hw is not None:
            height, width = self.static_hw
            if h > height or w > width:
                raise DetectorError(f"{self.source}: exported at a fixed {height}x{width}; an input of {h}x{w} does "
                                    f"not fit (use imgsz <= {max(height, width)}, or export with dynamic=true)")
            images = pad_to_graph(images, height, width)
        array = np.ascontiguousarray(images.detach().float().cpu().numpy())
        return torch.from_numpy(np.asarray(self._run(array), dtype=np.float32)).to(images.device)

    def check_size(self, imgsz: int) -> None:
        """DetectorError before any work when a fixed-size graph cannot take images letterboxed to `imgsz`."""
        if self.static_hw is not None and imgsz > max(self.static_hw):
            height, width = self.static_hw
            raise DetectorError(f"{self.source}: exported at a fixed {height}x{width}; imgsz={imgsz} does not fit "
                                f"(use imgsz <= {max(height, width)}, or export with dynamic=true)")


def pad_to_graph(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`images` (B, 3, h, w) padded at the bottom and right to (height, width) with the letterbox grey: how a
    fixed-size graph takes a smaller letterboxed batch (no box moves, unlike re-centring it)."""
    h, w = images.shape[-2:]
    return F.pad(images, (0, width - w, 0, height - h), value=PAD_VALUE)


def load_exported(path: str | Path) -> ExportedModel:
    """Open an ONNX file or OpenVINO IR written by `detector export` for val and predict."""
    path = Path(path)
    if not path.exists():
        raise DetectorError(f"{path}: file not found")
    opener = _open_onnx if path.suffix.lower() == ONNX_SUFFIX else _open_openvino
    run, raw, outputs, shape = opener(path)
    metadata = _check_metadata(raw, path)
    if RAW_OUTPUT not in outputs:
        raise DetectorError(f"{path}: no '{RAW_OUTPUT}' among its outputs ({', '.join(outputs)}): not written by "
                            "`detector export`")
    static_hw = (shape[2], shape[3]) if len(shape) == 4 and all(isinstance(d, int) and d > 0 for d in shape[2:]) else None
    return ExportedModel(run, metadata, static_hw, path)


def _open_onnx(path: Path) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, str], list[str], list[Any]]:
    """onnxruntime's CPU session of `path`: (run, metadata strings, output names, input shape)."""
    _require("onnxruntime", path)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types: one line naming the file
        raise DetectorError(f"{path}: onnxruntime cannot load it: {str(err).strip().splitlines()[0]}") from err
    image_input = session.get_inputs()[0]
    outputs = [o.name for o in session.get_outputs()]

    def run(images: np.ndarray) -> np.ndarray:
        return session.run([RAW_OUTPUT], {image_input.name: images})[0]

    return run, dict(session.get_modelmeta().custom_metadata_map), outputs, list(image_input.shape)


def _open_openvino(path: Path) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, str], list[str], list[Any]]:
    """OpenVINO's f32 CPU model of `path` (the .xml, or the folder holding one): (run, metadata, outputs, input shape)."""
    _require("openvino", path)
    import openvino as ov

    xml = path
    if path.is_dir():
        found = sorted(path.glob(f"*{OPENVINO_SUFFIX}"))
        if len(found) != 1:
            raise DetectorError(f"{path}: expected one OpenVINO .xml in the folder, found {len(found)}")
        xml = found[0]
    core = ov.Core()
    try:
        model = core.read_model(str(xml))
    except Exception as err:  # OpenVINO's own RuntimeError subclasses: one line naming the file
        raise DetectorError(f"{xml}: OpenVINO cannot read it: {str(err).strip().splitlines()[0]}") from err
    keys = ("names", "category_ids", "stride", "imgsz", "model", "train_data")
    raw = {k: str(model.get_rt_info(["detector", k]).astype(str)) for k in keys if model.has_rt_info(["detector", k])}
    outputs = [o.get_any_name() for o in model.outputs]
    shape = [d.get_length() if d.is_static else None for d in model.input(0).get_partial_shape()]
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    request = compiled.create_infer_request()

    def run(images: np.ndarray) -> np.ndarray:
        return np.array(request.infer({0: images})[compiled.output(RAW_OUTPUT)])  # a copy: the request reuses its buffers

    return run, raw, outputs, shape


def _check_metadata(raw: dict[str, str], path: Path) -> dict[str, Any]:
    """The metadata `detector export` writes, parsed and checked: names, category_ids, stride, imgsz."""
    missing = [k for k in ("names", "category_ids", "stride", "imgsz") if k not in raw]
    if missing:
        raise DetectorError(f"{path}: no '{missing[0]}' in its metadata: not written by `detector export` "
                            "(export the checkpoint with it)")
    values: dict[str, Any] = dict(raw)
    for key in ("names", "category_ids", "stride", "imgsz"):
        try:
            values[key] = json.loads(raw[key])
        except json.JSONDecodeError:
            raise DetectorError(f"{path}: metadata '{key}' is not JSON: {raw[key][:80]!r}") from None
    names, ids = values["names"], values["category_ids"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise DetectorError(f"{path}: metadata 'names' must be a non-empty list of strings")
    if not (isinstance(ids, list) and len(ids) == len(names) and all(type(i) is int for i in ids)):
        raise DetectorError(f"{path}: metadata 'category_ids' must be {len(names)} integers, one per name")
    for key in ("stride", "imgsz"):
        if type(values[key]) is not int or values[key] < 1:
            raise DetectorError(f"{path}: metadata '{key}' must be a positive integer, got {raw[key][:40]!r}")
    return values


def _require(package: str, path: Path) -> None:
    if importlib.util.find_spec(package) is None:
        raise DetectorError(f"{path}: running it needs the '{package}' package (pip install 'detector[export]')")

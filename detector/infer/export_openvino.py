"""OpenVINO IR export: the ONNX graph of `export.py` converted by `openvino.convert_model`, saved as `<name>.xml`
+ `<name>.bin` in a folder, then compiled on the CPU and checked against PyTorch before the path is returned.

Inputs and outputs are the ONNX file's (`images` -> `output`, or `detections`, `num_detections`, `output` with
`nms=True`), with the same dynamic axes. Conversion goes through ONNX rather than from the torch module
(`convert_model(module, example_input=...)`, which also works): one traced graph serves both formats, the ONNX
import is OpenVINO's long-standing path, and it converted yolo-ca-n in 3 s against 11 s from torch here.
`half=True` stores the weights as fp16 (`save_model(compress_to_fp16=True)`, half the .bin); the CPU plugin
computes in its inference precision either way. Class names, category ids, stride and the output layout go into
the model's rt_info under `detector`.

OpenVINO's CPU plugin computes in bf16 by default on CPUs with bf16 units (AMX, AVX512-BF16): boxes then move by
about 0.1-0.3 px. The check compiles with `INFERENCE_PRECISION_HINT=f32` to test the conversion itself; pass
that hint to `compile_model` for fp32 results.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

from detector.errors import DetectorError
from detector.infer.export import ExportSpec, build_graph, check_runtime, layout, staged, write_onnx
from detector.infer.exported import OPENVINO_FOLDER_SUFFIX

LOGGER = logging.getLogger(__name__)



def openvino_folder(stem: Path) -> Path:
    """The default folder for a model whose ONNX file would be `stem`.onnx: `<stem>_openvino_model/`."""
    return stem.with_name(stem.name + OPENVINO_FOLDER_SUFFIX)


def export_openvino(model: nn.Module, folder: Path, spec: ExportSpec, *, half: bool = False,
                    metadata: dict[str, Any] | None = None, check_images: Sequence[np.ndarray] = ()) -> Path:
    """Export `model` (a DetectionModel; copied, BN folded, fp32, CPU) as OpenVINO IR into `folder`, then check it
    on the CPU against PyTorch at batch 1 and 2 on `check_images` (random inputs without them); DetectorError when
    they differ by the tolerance or more (see `export.check_runtime`). `folder` may also name the .xml itself
    (`out=model.xml`). Returns the .xml path; the .bin lies beside it."""
    for name in ("onnx", "openvino"):
        if importlib.util.find_spec(name) is None:
            raise DetectorError(f"export: format=openvino needs the '{name}' package (pip install 'detector[export]')")
    import openvino as ov

    graph, stride = build_graph(model, spec)
    folder = Path(folder)
    if folder.suffix.lower() == ".xml":
        xml, folder = folder, folder.parent
    else:
        xml = folder / f"{folder.name.removesuffix(OPENVINO_FOLDER_SUFFIX) or 'model'}.xml"
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = write_onnx(graph, Path(tmp) / "model.onnx", spec, name=getattr(model, "name", "model"))
        try:
            ir = ov.convert_model(str(onnx_path))
        except Exception as err:  # the converter raises its own OpConversionFailure and friends; name it in one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DetectorError(f"export: openvino.convert_model failed: {first}") from err
    for key, value in {**(metadata or {}), "stride": stride, "imgsz": spec.imgsz, "outputs": layout(spec)}.items():
        ir.set_rt_info(value if isinstance(value, str) else json.dumps(value), ["detector", key])
    folder.mkdir(parents=True, exist_ok=True)
    with staged(xml, companions=(".bin",)) as partial:
        ov.save_model(ir, str(partial), compress_to_fp16=half)
        check_openvino(graph, partial, spec, stride=stride, half=half, images=check_images)
    LOGGER.info("export: OpenVINO IR %s (%s weights)", xml, "fp16" if half else "fp32")
    return xml


def check_openvino(graph: nn.Module, xml: Path, spec: ExportSpec, *, stride: int, half: bool = False,
                   images: Sequence[np.ndarray] = ()) -> float:
    """Compile `xml` on the CPU in f32 and compare it with PyTorch (`check_runtime`; relative with fp16 weights).
    Returns the largest difference checked."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    names = [o.get_any_name() for o in compiled.outputs]

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        results = request.infer({"images": images})  # arrays over the request's buffers, reused by the next call
        return {name: np.array(results[port]) for name, port in zip(names, compiled.outputs)}

    return check_runtime(graph, run, spec, stride=stride, runtime="OpenVINO", path=xml, relative=half, images=images)

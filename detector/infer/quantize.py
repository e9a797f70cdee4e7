"""INT8 post-training quantization of an exported ONNX graph with onnxruntime's static quantizer, calibrated on
images of the training set, so a CPU deployment runs its convolutions in 8 bits.

What is quantized, and why (measured on the hard set, `docs/performance-notes.md`):
- every convolution's weights per output channel (int8, symmetric) and the activations around them per tensor
  (uint8, asymmetric), as QuantizeLinear/DequantizeLinear pairs (QDQ): onnxruntime fuses them into integer kernels,
  and the file stays a plain ONNX graph that any runtime reads;
- each activation's range is the mean over the calibration images of its per-image minimum and maximum, so one
  image that drives a tensor far out of its usual range cannot set its step for all: on the hard set's second draw
  a flat gradient image pushed a neck tensor to 154 where the others peak below 1, and the global min/max (or its
  99.999th percentile, or an entropy fit) over 64 images then moved the boxes 2-3 px and cost 0.4 AP;
- kept in fp32: the stem convolution, which reads the image (quantizing it alone cost 0.02-0.03 AP), and every
  node downstream of the head's prediction convolutions: the decode (boxes in input pixels, where 8 bits would be
  a pixel step at 256) and the NMS of `nms=True`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from detector.data.image_files import read_rgb
from detector.data.transforms import letterbox_batch, to_model_input
from detector.errors import DetectorError
from detector.infer.exported import pad_to_graph

if TYPE_CHECKING:
    import onnx
    import torch.nn as nn

    from detector.infer.export import ExportSpec

LOGGER = logging.getLogger(__name__)


def calibration_files(images: Sequence[Path], count: int) -> list[Path]:
    """`count` of `images`, evenly spaced over the sorted list (all when there are fewer): deterministic, and not
    only the first folder of a dataset sorted by source."""
    files = sorted(images)
    if not files:
        raise DetectorError("export: int8 calibration found no images")
    index = np.linspace(0, len(files) - 1, min(count, len(files))).round().astype(int)
    return [files[i] for i in np.unique(index)]


def decoded_images(files: Sequence[Path], purpose: str) -> Iterator[np.ndarray]:
    """Each of `files` as HWC uint8 RGB, in order; one that does not decode is skipped with a warning naming it and
    what it was read for (`purpose`)."""
    for path in files:
        try:
            image = read_rgb(path)
        except (OSError, ValueError) as err:
            LOGGER.warning("export: %s skips %s: %s", purpose, path, err)
            continue
        yield image


def calibration_batches(files: Sequence[Path], spec: ExportSpec, stride: int) -> Iterator[np.ndarray]:
    """Each file as `detector predict` feeds it to the export `spec` describes, as a (1, 3, h, w) float32 RGB batch
    in [0, 1]: letterboxed to `spec.imgsz` on its long side and rounded up to `stride` multiples, then, for a
    fixed-size graph, padded at the bottom and right to its square (`exported.pad_to_graph`). A file that does not
    decode is skipped with a warning naming it; DetectorError when none does."""
    decoded = 0
    for image in decoded_images(files, "int8 calibration"):
        decoded += 1
        batch, _, _ = letterbox_batch([image], spec.imgsz, stride)
        images = to_model_input(batch, "cpu", channels_last=False)
        yield (images if spec.dynamic else pad_to_graph(images, spec.imgsz, spec.imgsz)).numpy()
    if not decoded:
        raise DetectorError(f"export: int8 calibration: none of the {len(files)} images decodes (e.g. {files[0]})")


def kept_in_float(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes of an ONNX `model` left in fp32: the convolutions that read a graph
    input, and every node downstream of a prediction convolution (one from which no other convolution is reached)."""
    nodes = list(model.graph.node)
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    downstream = _downstream(nodes, consumers)
    convs = [i for i, node in enumerate(nodes) if node.op_type == "Conv"]
    prediction = [i for i in convs if not any(nodes[j].op_type == "Conv" for j in downstream[i])]
    inputs = {graph_input.name for graph_input in model.graph.input}
    stem = [i for i in convs if nodes[i].input[0] in inputs]
    kept = set(stem).union(*(downstream[i] for i in prediction))
    return sorted(nodes[i].name for i in kept)


def _downstream(nodes: list[onnx.NodeProto], consumers: dict[str, list[int]]) -> list[set[int]]:
    """For each node, the indices of all nodes that consume its outputs, directly or not (nodes are in
    topological order, as ONNX requires, so one backward sweep suffices)."""
    reach: list[set[int]] = [set() for _ in nodes]
    for i in range(len(nodes) - 1, -1, -1):
        for name in nodes[i].output:
            for j in consumers.get(name, ()):
                reach[i].add(j)
                reach[i] |= reach[j]
    return reach


def quantize_onnx(fp32: Path, out: Path, files: Sequence[Path], spec: ExportSpec, stride: int) -> Path:
    """Write the INT8 (QDQ) version of the fp32 ONNX file `fp32` (exported as `spec` says) to `out`, calibrated on
    `files` (see the module docstring), with `fp32`'s metadata plus `precision: int8` and how it was calibrated.
    Returns `out`."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class OneImageAtATime(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches, self.count = calibration_batches(files, spec, stride), 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            self.count += batch is not None
            return None if batch is None else {"images": batch}

    source = onnx.load(str(fp32))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):  # the quantizer's prints
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)  # onnx shape inference + graph tidy
        reader = OneImageAtATime()
        quantize_static(
            str(prepared), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=kept_in_float(source),
            calibrate_method=CalibrationMethod.MinMax, calibration_providers=["CPUExecutionProvider"],
            extra_options={"CalibMovingAverage": True},  # one collection: the mean of the per-image extremes
        )
    quantized = onnx.load(str(out))
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(source.metadata_props)
    for key, value in {"precision": "int8", "calibration": f"mean of per-image min/max, {reader.count} images"}.items():
        entry = quantized.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(quantized, str(out))
    return out


def check_int8(graph: nn.Module, path: Path, files: Sequence[Path], spec: ExportSpec,
               stride: int, *, final: Path | None = None) -> tuple[float, float]:
    """Run the INT8 file in onnxruntime and `graph` (the fp32 module its source was traced from, `build_graph`'s)
    on `files`, and print how far the INT8 scores and boxes are from PyTorch's. Quantization moves them by design,
    so nothing is accepted or refused on their size (`detector val weights=<int8 file>` measures what matters, the
    AP); a wrong shape or a non-finite value is refused. `final`: the path the file will have, when it is checked
    at a staging path (`export.staged`). Returns (max score difference, median box difference in px over the boxes
    PyTorch scores >= 0.25)."""
    import onnxruntime as ort

    from detector.infer.export import DetectWithNMS

    model = graph.model if isinstance(graph, DetectWithNMS) else graph
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    score_diffs, box_diffs = [], []
    for images in calibration_batches(files, spec, stride):
        got = session.run(["output"], {"images": images})[0]
        score_diff, box_diff = _int8_differences(model, images, got, path)
        score_diffs.append(score_diff)
        box_diffs.append(box_diff)
    score_diff, box_diff = max(score_diffs), np.concatenate(box_diffs)
    median = float(np.median(box_diff)) if box_diff.size else 0.0
    print(f"export: int8 (onnxruntime) vs PyTorch fp32 on {len(score_diffs)} calibration images: scores max abs "
          f"difference {score_diff:.2e}; the {len(box_diff) // 4} boxes PyTorch scores >= 0.25 move by median "
          f"{median:.2f} px (max {float(box_diff.max(initial=0.0)):.2f}); measure the AP with "
          f"`detector val weights={final or path}`")
    return score_diff, median


def _int8_differences(model: nn.Module, images: np.ndarray, got: np.ndarray, path: Path) -> tuple[float, np.ndarray]:
    """One batch: the max difference of the INT8 file's class scores `got` from `model`'s, and the flat |difference|
    of the box coordinates PyTorch scores >= 0.25; DetectorError on a wrong shape or a non-finite value."""
    import torch

    from detector.infer.export import row_scores

    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    if got.shape != expected.shape:
        raise DetectorError(f"export: {path}: onnxruntime gives shape {got.shape}, PyTorch {expected.shape}")
    if not np.isfinite(got).all():
        raise DetectorError(f"export: {path}: onnxruntime gives non-finite values on the calibration images")
    score, score_ref = row_scores(got), row_scores(expected)
    confident = score_ref >= 0.25
    return float(np.abs(score - score_ref).max()), np.abs(got[..., :4] - expected[..., :4])[confident].ravel()

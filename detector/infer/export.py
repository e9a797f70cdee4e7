"""ONNX export of a detection model, checked against PyTorch with onnxruntime before the path is returned.

The graph takes `images` float32 (B, 3, H, W) RGB in [0, 1] (letterboxed as `detector predict` does); the batch
axis is always dynamic, H and W too with `dynamic=True` (multiples of the model stride). Outputs:

- default: `output` (B, N, 5 + nc), the model's decoded eval output: [cx, cy, w, h] in input pixels, objectness
  probability, class probabilities (score of a class = objectness * its probability). NMS is left to the user.
- `nms=True`: `detections` (B, max_det, 6) rows [x1, y1, x2, y2, score, class] in input pixels (boxes clipped to
  the input), best class per box, sorted by score, zero rows as padding after the first `num_detections` (B,)
  int64 rows of each image; `output` as above stays available (request only the outputs you need). Built on
  torchvision's `nms`, which exports as ONNX NonMaxSuppression.

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)`. On torch 2.14 the dynamo exporter also
exports the plain model, but 5-15x slower here, and with NMS in the graph it specializes the batch axis to the
sample's size; the TorchScript exporter handles every attention module (mhsa and axial through
scaled_dot_product_attention), dynamic H/W and NonMaxSuppression. Class names, category ids, strides and the
output layout are written into the file's metadata_props.

The same file runs in OpenCV's DNN module (`cv2.dnn.readNetFromONNX`, NMS included; tested with OpenCV 5.0).
`export_openvino.py` converts it to OpenVINO IR.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
import warnings
from dataclasses import dataclass
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn as nn
from torchvision.ops import box_convert, nms

from detector.errors import DetectorError
from detector.models.attention import MHSA

LOGGER = logging.getLogger(__name__)

# An exported file's runtime vs PyTorch, accepted when max |runtime - PyTorch| / (1 + |PyTorch| / scale) is below
# the tolerance: 1e-3 for scores (|value| <= 1), widening for boxes in pixels, where float32 rounding grows with
# the value (a 280 px box of a trained model moved by 1.2e-3, 4e-6 of itself); with fp16 weights 1e-2 of 1 + |value|.
TOLERANCE, SCALE = 1e-3, 10.0
HALF_TOLERANCE, HALF_SCALE = 1e-2, 1.0
# With fp16 weights, boxes are compared on the rows scoring at least this (val's conf; no lower score is ever a
# detection): a trained model's background rows moved by up to 2% of their width on real images, its scored ones by 0.3%.
HALF_MIN_SCORE = 1e-3
CHECK_BATCHES = (1, 2)
CHECK_IMAGES = sum(CHECK_BATCHES)  # real images for the check, when given: each one used once
# scaled_dot_product_attention (mhsa, axial) exports from opset 14; 23 is the newest the exporter writes (torch 2.14)
OPSETS = range(14, 24)


@dataclass(frozen=True)
class ExportSpec:
    """How to export: input size, sample batch, dynamic H/W, in-graph NMS and its thresholds, opset, simplify."""

    imgsz: int = 640
    batch: int = 1
    dynamic: bool = False
    nms: bool = False
    conf: float = 0.25
    iou: float = 0.45
    max_det: int = 300
    opset: int = 18
    simplify: bool = False


class DetectWithNMS(nn.Module):
    """A model's decoded output -> padded per-image detections, traceable with a dynamic batch.

    All images go through one NonMaxSuppression: boxes (clipped to the input) are shifted along x by image index
    and along y by class, so boxes of different images or classes never overlap; the rank of each kept box within
    its image (a cumulative count, kept boxes being sorted by score) places it in the (B, max_det, 6) output.
    The decoded output is returned too, so the export check can compare the model and the NMS separately.
    """

    def __init__(self, model: nn.Module, *, conf: float, iou: float, max_det: int) -> None:
        super().__init__()
        self.model = model
        self.conf, self.iou, self.max_det = conf, iou, max_det

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pred = self.model(x)  # (B, N, 5 + nc)
        return (*self.suppress(pred, x.shape[2], x.shape[3]), pred)

    def suppress(self, pred: torch.Tensor, h: int | torch.Tensor, w: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, 5 + nc) decoded -> detections (B, max_det, 6), num_detections (B,) int64."""
        b = pred.shape[0]
        scores, classes = (pred[..., 5:] * pred[..., 4:5]).max(-1)  # (B, N)
        # as_tensor keeps traced sizes symbolic (a dynamic H/W graph clips to its actual input)
        limits = torch.stack([torch.as_tensor(v) for v in (w, h, w, h)]).to(pred.dtype)
        boxes = torch.min(box_convert(pred[..., :4], "cxcywh", "xyxy").clamp(min=0), limits)
        image, index = torch.nonzero(scores > self.conf, as_tuple=True)
        score, cls, box = scores[image, index], classes[image, index], boxes[image, index]
        shift = torch.stack([image, cls, image, cls], 1).to(box.dtype) * (limits + 1)
        keep = nms(box + shift, score, self.iou)  # sorted by decreasing score
        image, score, cls, box = image[keep], score[keep], cls[keep], box[keep]
        onehot = nn.functional.one_hot(image, b)  # (K, B)
        rank = (onehot.cumsum(0) * onehot).sum(1) - 1
        ok = rank < self.max_det
        rows = torch.cat([box[ok], score[ok, None], cls[ok, None].to(box.dtype)], 1)
        out = torch.zeros(b * self.max_det, 6, dtype=box.dtype, device=box.device)
        out = out.index_put((image[ok] * self.max_det + rank[ok],), rows)
        return out.view(b, self.max_det, 6), onehot[ok].sum(0)


def export_onnx(model: nn.Module, path: Path, spec: ExportSpec, *, metadata: dict[str, Any] | None = None,
                check_images: Sequence[np.ndarray] = ()) -> Path:
    """Export `model` (a DetectionModel; copied, BN folded, fp32, CPU) to `path`, then check it with onnxruntime at
    batch 1 and 2 against PyTorch on `check_images` (random inputs without them; see `check_runtime`); raises
    DetectorError when they differ by TOLERANCE or more (see SCALE)."""
    return export_onnx_graph(model, path, spec, metadata=metadata, check_images=check_images)[0]


def export_onnx_graph(model: nn.Module, path: Path, spec: ExportSpec, *, metadata: dict[str, Any] | None = None,
                      check_images: Sequence[np.ndarray] = ()) -> tuple[Path, nn.Module]:
    """`export_onnx`, also returning the module it traced and checked (`build_graph`'s), for a caller that compares
    a file derived from this one with it (the INT8 export) without folding the model again."""
    for name in ("onnx", "onnxruntime"):
        if importlib.util.find_spec(name) is None:
            raise DetectorError(f"export: the '{name}' package is needed (pip install 'detector[export]')")
    graph, stride = build_graph(model, spec)
    path = Path(path)
    with staged(path) as partial:
        write_onnx(graph, partial, spec, name=getattr(model, "name", "model"))
        _write_metadata(partial, {**(metadata or {}), "stride": stride, "imgsz": spec.imgsz, "outputs": layout(spec)})
        check_onnx(graph, partial, spec, stride=stride, images=check_images)
    return path, graph


@contextlib.contextmanager
def staged(path: Path, companions: tuple[str, ...] = ()) -> Iterator[Path]:
    """A path beside `path` to write and check an export at (`.<stem>.partial<suffix>`; `companions`: suffixes of
    files written beside it, as an IR's .bin), moved onto `path` only when the block succeeds: a file that fails its
    check is removed, and an earlier export at `path` stays as it was."""
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    moves = [(partial.with_suffix(suffix), path.with_suffix(suffix)) for suffix in companions] + [(partial, path)]
    try:
        yield partial
        for source, target in moves:  # the companions first: the file that names the export lands last
            os.replace(source, target)
    finally:
        for source, _ in moves:
            source.unlink(missing_ok=True)


def build_graph(model: nn.Module, spec: ExportSpec) -> tuple[nn.Module, int]:
    """The module to trace, after checking `spec` against the model: a BN-folded fp32 CPU copy in eval mode,
    wrapped in DetectWithNMS when `spec.nms`; and the model's largest stride."""
    stride = int(model.stride.max())
    if spec.imgsz < stride or spec.imgsz % stride:
        raise DetectorError(f"export: imgsz must be a multiple of the model stride {stride}, got {spec.imgsz}")
    if spec.batch < 1:
        raise DetectorError(f"export: batch must be >= 1, got {spec.batch}")
    if spec.opset not in OPSETS:
        raise DetectorError(f"export: opset must be {OPSETS.start}..{OPSETS.stop - 1}, got {spec.opset}")
    net = copy.deepcopy(model).float().cpu().fuse()
    if spec.dynamic and any(isinstance(m, MHSA) for m in net.modules()):
        LOGGER.warning(
            "export: dynamic=True with mhsa layers: each layer's key/value pooling (max_kv) is fixed at imgsz=%d; "
            "at input sizes where a layer would pool by another factor the graph differs from PyTorch", spec.imgsz
        )
    graph: nn.Module = DetectWithNMS(net, conf=spec.conf, iou=spec.iou, max_det=spec.max_det) if spec.nms else net
    return graph.eval(), stride


def write_onnx(graph: nn.Module, path: Path, spec: ExportSpec, *, name: str = "model") -> Path:
    """Trace `graph` (from `build_graph`) into the ONNX file `path` with the TorchScript exporter; `spec.simplify`
    runs onnxslim on it. Input `images`, outputs as the module docstring says; no metadata, no check."""
    outputs = ["detections", "num_detections", "output"] if spec.nms else ["output"]
    axes: dict[str, dict[int, str]] = {"images": {0: "batch", **({2: "height", 3: "width"} if spec.dynamic else {})}}
    axes["output"] = {0: "batch", **({1: "anchors"} if spec.dynamic else {})}
    if spec.nms:
        axes.update({"detections": {0: "batch"}, "num_detections": {0: "batch"}})
    path.parent.mkdir(parents=True, exist_ok=True)
    sample = torch.rand(spec.batch, 3, spec.imgsz, spec.imgsz, generator=torch.Generator().manual_seed(0))
    LOGGER.info("export: %s -> %s (opset %d, TorchScript exporter)", name, path, spec.opset)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings say nothing actionable here
            torch.onnx.export(
                graph, (sample,), str(path), dynamo=False, opset_version=spec.opset, input_names=["images"],
                output_names=outputs, dynamic_axes=axes, do_constant_folding=True,
            )
    except (RuntimeError, ValueError, OSError, torch.onnx.errors.OnnxExporterError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DetectorError(f"export: torch.onnx.export failed at opset {spec.opset}: {first}") from err
    if spec.simplify:
        _simplify(path)
    return path


def layout(spec: ExportSpec) -> str:
    """The outputs' layout in words, as written into the exported file's metadata."""
    if spec.nms:
        return (f"detections (B, {spec.max_det}, 6) [x1, y1, x2, y2, score, class] input pixels, zero-padded; "
                f"num_detections (B,); conf {spec.conf}, iou {spec.iou}")
    return "output (B, N, 5 + nc) [cx, cy, w, h] input pixels, objectness, class probabilities"


def check_onnx(graph: nn.Module, path: Path, spec: ExportSpec, *, stride: int,
               images: Sequence[np.ndarray] = ()) -> float:
    """Run onnxruntime and PyTorch on the same inputs (`check_runtime`); DetectorError when they differ by
    TOLERANCE or more (see SCALE). Returns the largest difference checked."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(None, {"images": images})))

    return check_runtime(graph, run, spec, stride=stride, runtime="onnxruntime", path=path, images=images)


def check_runtime(graph: nn.Module, run: Callable[[np.ndarray], dict[str, np.ndarray]], spec: ExportSpec, *,
                  stride: int, runtime: str, path: Path, relative: bool = False,
                  images: Sequence[np.ndarray] = ()) -> float:
    """Run an exported file (`run`: images (B, 3, H, W) float32 -> outputs by name) and PyTorch on the same inputs
    at batch 1 and 2 (a non-square size too when dynamic) and print the max abs difference; DetectorError when
    |runtime - PyTorch| / (1 + |PyTorch| / SCALE) reaches TOLERANCE. Returns the largest difference checked.

    The inputs are `images` (HWC uint8 RGB, e.g. a few training images; `check_inputs`) or, without them, uniform
    noise: a trained model scores noise below any useful conf, so with NMS in the graph only real images give it
    detections to compare.

    `relative` (fp16 weights): the difference checked is |runtime - PyTorch| / (1 + |PyTorch|), against
    HALF_TOLERANCE, printed beside the max abs difference; the boxes are in pixels, so halving the weights' bits
    moves them by about 1e-3 of their size, and only the boxes of rows scoring HALF_MIN_SCORE or more count (the
    scores count everywhere). The decoded output is compared with the PyTorch model's. With NMS in
    the graph, the runtime's detections are compared with PyTorch's NMS applied to the runtime's own decoded
    output: on one input NMS must agree exactly, whereas across two runtimes float noise may reorder near-equal
    scores and legitimately change which box survives.
    """
    model = graph.model if isinstance(graph, DetectWithNMS) else graph
    generator = torch.Generator().manual_seed(1)
    tolerance, scale = (HALF_TOLERANCE, HALF_SCALE) if relative else (TOLERANCE, SCALE)
    worst, first = 0.0, 0
    for batch in CHECK_BATCHES:
        h, w = (spec.imgsz, spec.imgsz)
        if spec.dynamic and batch > 1:
            h, w = max(spec.imgsz - stride, stride), spec.imgsz + stride
        x = check_inputs(images, first, batch, (h, w), generator)
        first += batch
        got = run(x.numpy())
        where = f"batch {batch}, {h}x{w}"
        with torch.no_grad():
            expected = model(x)
        ignored = _unscored_boxes(expected) if relative else None
        absolute, diff = _max_diff(expected, got["output"], f"{path}: output at {where}", runtime, scale=scale, ignored=ignored)
        line = (f"export: {runtime} vs PyTorch at {where} on {'images' if images else 'random inputs'}: "
                f"max abs difference {absolute:.2e}")
        if relative:
            line += f", relative {diff:.2e} (fp16 weights; boxes of rows scoring >= {HALF_MIN_SCORE:g})"
        if isinstance(graph, DetectWithNMS):
            nms_diff, found = _nms_diff(graph, got, h, w, f"{path}: %s at {where}", runtime)
            line += f" (decoded), {nms_diff:.2e} (NMS, {found} detections)"
            diff = max(diff, nms_diff)
        print(line)
        worst = max(worst, diff)
        if not diff < tolerance:
            raise DetectorError(f"export: {path}: {runtime} differs from PyTorch by {diff:.3g} of 1 + |value| / {scale:g} "
                                f"(>= {tolerance:g}) at {where}")
    return worst


def check_inputs(images: Sequence[np.ndarray], first: int, batch: int, size: tuple[int, int],
                 generator: torch.Generator) -> torch.Tensor:
    """A (batch, 3, h, w) float32 input in [0, 1]: `images` (HWC uint8 RGB) from index `first` on, cyclically, each
    resized to `size` (h, w; the check needs real content at the graph's size, not predict's letterbox), or noise
    from `generator` without them."""
    h, w = size
    if not images:
        return torch.rand(batch, 3, h, w, generator=generator)
    picked = [cv2.resize(images[(first + i) % len(images)], (w, h), interpolation=cv2.INTER_AREA) for i in range(batch)]
    return torch.from_numpy(np.stack(picked)).permute(0, 3, 1, 2).float().div(255).contiguous()


def _nms_diff(graph: DetectWithNMS, got: dict[str, np.ndarray], h: int, w: int, what: str, runtime: str) -> tuple[float, int]:
    """Max abs difference of the runtime's detections and counts from PyTorch's NMS of its decoded output."""
    with torch.no_grad():
        dets, num = graph.suppress(torch.from_numpy(got["output"]), h, w)
    diff = max(_max_diff(dets, got["detections"], what % "detections", runtime)[0],
               _max_diff(num, got["num_detections"], what % "num_detections", runtime)[0])
    return diff, int(num.sum())


def _unscored_boxes(output: torch.Tensor) -> np.ndarray:
    """True at the box columns of the decoded output's rows (B, N, 5 + nc) scoring below HALF_MIN_SCORE (score =
    objectness x best class probability)."""
    out = output.numpy()
    ignored = np.zeros(out.shape, bool)
    ignored[..., :4] = (row_scores(out) < HALF_MIN_SCORE)[..., None]
    return ignored


def row_scores(output: np.ndarray) -> np.ndarray:
    """Each row's score in the decoded output's layout (..., 5 + nc): objectness x its best class probability."""
    return (output[..., 5:] * output[..., 4:5]).max(-1)


def _max_diff(expected: torch.Tensor, got: np.ndarray, what: str, runtime: str, *, scale: float = 1.0,
              ignored: np.ndarray | None = None) -> tuple[float, float]:
    """(max |got - expected|, max |got - expected| / (1 + |expected| / scale)) from one difference array, leaving
    out the elements `ignored` marks."""
    ref = expected.numpy().astype(np.float64)
    if ref.shape != got.shape:
        raise DetectorError(f"export: {what}: {runtime} gives shape {got.shape}, PyTorch {ref.shape}")
    diff = np.abs(ref - got.astype(np.float64))
    if ignored is not None:
        diff[ignored] = 0.0
    return float(diff.max(initial=0.0)), float((diff / (1 + np.abs(ref) / scale)).max(initial=0.0))


def _simplify(path: Path) -> None:
    """Simplify in place with onnxslim (the `export` extra); a warning, and the file as traced, without it."""
    if importlib.util.find_spec("onnxslim") is None:
        LOGGER.warning("export: simplify=true ignored: onnxslim is not installed (pip install onnxslim, or the export extra)")
        return
    import onnx
    import onnxslim

    onnx.save(onnxslim.slim(onnx.load(str(path))), str(path))


def _write_metadata(path: Path, metadata: dict[str, Any]) -> None:
    import onnx

    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(proto, str(path))

"""INT8 export (`detector export int8=true`): which nodes stay in fp32, the calibration images, the QDQ file that
onnxruntime runs with the checkpoint's metadata, the refusals, and (slow) a trained model's AP kept through it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.errors import DetectorError
from detector.options import ExportOptions

# the sibling module's helpers (pytest puts this folder on sys.path; test file names are unique across tests/)
from test_export import export_command, export_lines, write_checkpoint
from test_export_openvino import perturb_batchnorms

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _graph(tmp_path: Path, **keys: object):
    from detector.api import Detector

    weights = write_checkpoint(tmp_path / "fp32.pt", "yolo-ca-n")
    path = Detector.from_checkpoint(weights, device="cpu").export(imgsz=64, out=str(tmp_path / "fp32.onnx"), **keys)
    return onnx.load(str(path))


def _downstream_of(model, names: set[str]) -> set[str]:
    """Every node fed, directly or not, by the outputs of the nodes in `names` (a forward walk, written here
    independently of the module's backward sweep)."""
    produced = {out for node in model.graph.node if node.name in names for out in node.output}
    found: set[str] = set()
    changed = True
    while changed:
        changed = False
        for node in model.graph.node:
            if node.name not in found and produced & set(node.input):
                found.add(node.name)
                produced |= set(node.output)
                changed = True
    return found


def test_the_stem_and_everything_after_the_prediction_convs_stay_in_fp32(tmp_path: Path) -> None:
    from detector.infer.quantize import kept_in_float

    model = _graph(tmp_path)
    kept = set(kept_in_float(model))
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    assert [c.name for c in convs if c.name in kept] == [convs[0].name] and convs[0].input[0] == "images"
    # the head's 8 prediction convs (box and class, 4 levels) are quantized; what follows them is not
    prediction = {c.name for c in convs if c.name.endswith(("m.0.2/Conv", "m.1.2/Conv", "m.2.2/Conv", "m.3.2/Conv",
                                                            "cls.0.2/Conv", "cls.1.2/Conv", "cls.2.2/Conv", "cls.3.2/Conv"))}
    assert len(prediction) == 8 and not prediction & kept
    assert kept - {convs[0].name} == _downstream_of(model, prediction)
    producer = {out: node.name for node in model.graph.node for out in node.output}
    assert producer["output"] in kept  # the decode that writes the boxes in pixels
    assert not any(node.op_type == "Sigmoid" and node.name in kept for node in model.graph.node
                   if "/layers.28/" not in node.name)  # the backbone's and neck's activations are quantized


def test_every_convolution_that_reads_the_image_stays_in_fp32() -> None:
    """A hand-made graph with two convolutions on the input (a stem and a side branch): both read the image."""
    from onnx import TensorProto, helper

    from detector.infer.quantize import kept_in_float

    nodes = [
        helper.make_node("Conv", ["images", "w0"], ["s"], name="stem"),
        helper.make_node("Conv", ["images", "w1"], ["t"], name="side"),
        helper.make_node("Add", ["s", "t"], ["st"], name="merge"),
        helper.make_node("Conv", ["st", "w2"], ["m"], name="mid"),
        helper.make_node("Conv", ["m", "w3"], ["p"], name="pred"),  # no convolution after it: a prediction conv
        helper.make_node("Sigmoid", ["p"], ["q"], name="decode"),
        helper.make_node("Mul", ["q", "q"], ["output"], name="scale"),
    ]
    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])
    output = helper.make_tensor_value_info("output", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph(nodes, "two-stems", [images], [output]))
    assert kept_in_float(model) == ["decode", "scale", "side", "stem"]  # the stems, and all after the prediction


def test_in_graph_nms_stays_in_fp32(tmp_path: Path) -> None:
    from detector.infer.quantize import kept_in_float

    model = _graph(tmp_path, nms=True)
    kept = set(kept_in_float(model))
    assert {n.name for n in model.graph.node if n.op_type == "NonMaxSuppression"} <= kept


def test_calibration_files_are_evenly_spaced_and_deterministic(tmp_path: Path) -> None:
    from detector.infer.quantize import calibration_files

    files = [tmp_path / f"{i:03d}.jpg" for i in range(10)]
    assert calibration_files(files[::-1], 4) == [files[0], files[3], files[6], files[9]]
    assert calibration_files(files, 1) == [files[0]]
    assert calibration_files(files, 50) == files
    eleven = [tmp_path / f"{i:03d}.jpg" for i in range(11)]  # 0, 3.33, 6.67, 10: rounded to the nearest file
    assert calibration_files(eleven, 4) == [eleven[0], eleven[3], eleven[7], eleven[10]]
    with pytest.raises(DetectorError, match="no images"):
        calibration_files([], 4)


@pytest.mark.parametrize("dynamic", [False, True])
def test_calibration_batches_are_what_predict_feeds_the_export(tmp_path: Path, dynamic: bool) -> None:
    """Each calibration batch is, to the bit, the array `detector predict` hands the exported graph for that image:
    letterboxed to stride multiples and, for a fixed-size graph, padded at the bottom and right (not re-centred)."""
    import cv2

    from detector.api import Detector
    from detector.infer.export import ExportSpec
    from detector.infer.quantize import calibration_batches

    image = np.zeros((40, 80, 3), np.uint8)
    image[..., 0] = 255  # red in RGB
    cv2.imwrite(str(tmp_path / "wide.png"), image[..., ::-1])
    weights = write_checkpoint(tmp_path / "best.pt", "yolo-c2f-n")
    exported = Detector(Detector(weights).export(imgsz=64, dynamic=dynamic, out=str(tmp_path / "m.onnx")))
    fed, run = [], exported.model._run
    exported.model._run = lambda images: fed.append(images) or run(images)
    exported.predict(str(tmp_path / "wide.png"), imgsz=64)

    (batch,) = calibration_batches([tmp_path / "wide.png"], ExportSpec(imgsz=64, dynamic=dynamic), 32)
    assert batch.shape == ((1, 3, 32, 64) if dynamic else (1, 3, 64, 64)) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch, fed[0])
    assert batch[0, 0, 0, 0] == 1.0 and batch[0, 1, 0, 0] == 0.0  # the image, red, from the top-left corner
    if not dynamic:
        assert batch[0, 0, 63, 0] == pytest.approx(114 / 255)  # the grey padding below it


def test_calibration_skips_an_image_that_does_not_decode_and_names_it(tmp_path: Path, caplog) -> None:
    import cv2

    from detector.infer.export import ExportSpec
    from detector.infer.quantize import calibration_batches

    good, bad = tmp_path / "good.png", tmp_path / "bad.jpg"
    cv2.imwrite(str(good), np.zeros((8, 8, 3), np.uint8))
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    with caplog.at_level(logging.WARNING, logger="detector.infer.quantize"):
        batches = list(calibration_batches([bad, good], ExportSpec(imgsz=32), 32))
    assert len(batches) == 1 and f"int8 calibration skips {bad}" in caplog.text
    with pytest.raises(DetectorError, match=r"none of the 1 images decodes \(e\.g\. .*bad\.jpg\)"):
        list(calibration_batches([bad], ExportSpec(imgsz=32), 32))


def test_int8_export_writes_a_qdq_file_beside_the_weights_that_runs(tmp_path: Path, capsys, make_data_yaml) -> None:
    import onnxruntime as ort

    from detector.api import Detector

    data = make_data_yaml()
    weights = write_checkpoint(tmp_path / "weights" / "best.pt", "yolo-ca-n")
    perturb_batchnorms(weights)  # activations that spread, as a trained model's do
    path = export_command(ExportOptions(weights=str(weights), int8=True, data=str(data), calib_images=4, imgsz=64))
    lines = export_lines(capsys)
    assert path == tmp_path / "weights" / "best_int8.onnx" and lines[-1] == str(path)
    assert any(line.startswith("export: int8 (onnxruntime) vs PyTorch fp32 on 4 calibration images") for line in lines)
    assert any(line.startswith("export: onnxruntime vs PyTorch at batch 1") for line in lines)  # fp32 checked first
    assert not any(line.startswith(("Collecting", "Number of", "Finding")) for line in lines)  # the calibrator's prints

    model = onnx.load(str(path))
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("QuantizeLinear") > 50 and ops.count("DequantizeLinear") > 50
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) == ops.count("Conv") - 1  # every conv's weights but the stem's
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["precision"] == "int8" and meta["calibration"] == "mean of per-image min/max, 4 images"
    assert json.loads(meta["names"]) == ["c0", "c1", "c2"] and json.loads(meta["imgsz"]) == 64

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"images": np.random.default_rng(0).random((3, 3, 64, 64), dtype=np.float32)})
    assert out.shape == (3, 3 * (16 * 16 + 8 * 8 + 4 * 4 + 2 * 2), 8) and np.isfinite(out).all()
    detector = Detector(path)  # val and predict open it as any exported file
    assert detector.exported and detector.names == ["c0", "c1", "c2"]


def test_int8_export_with_nms_and_dynamic_size(tmp_path: Path, capsys, make_data_yaml) -> None:
    import onnxruntime as ort

    weights = write_checkpoint(tmp_path / "best.pt", "yolo-ca-n")
    perturb_batchnorms(weights)
    path = export_command(ExportOptions(weights=str(weights), int8=True, data=str(make_data_yaml()), imgsz=64,
                                        dynamic=True, nms=True, max_det=20))
    assert path == tmp_path / "best_int8.onnx" and export_lines(capsys)[-1] == str(path)
    model = onnx.load(str(path))
    assert "NonMaxSuppression" in [node.op_type for node in model.graph.node]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(1).random((2, 3, 64, 96), dtype=np.float32)  # not square: the size is dynamic
    detections, count, output = session.run(None, {"images": images})
    assert detections.shape == (2, 20, 6) and count.shape == (2,)
    assert output.shape == (2, 3 * (16 * 24 + 8 * 12 + 4 * 6 + 2 * 3), 8)
    assert np.isfinite(output).all() and (count <= 20).all()


def test_int8_export_calibrates_on_the_checkpoints_training_data_by_default(tmp_path: Path, capsys,
                                                                          make_data_yaml) -> None:
    from detector.api import Detector
    from detector.runtime.checkpoint import load_checkpoint, save_checkpoint

    data = make_data_yaml(sizes_wh=[(64, 48), (50, 70), (64, 64)])
    weights = write_checkpoint(tmp_path / "best.pt", "yolo-c2f-n")
    state = load_checkpoint(weights)
    state["train_config"] = {"data": str(data)}
    save_checkpoint(weights, state)
    path = Detector(weights).export(int8=True, imgsz=64, calib_images=100)
    assert path == tmp_path / "best_int8.onnx"
    assert any("on 3 calibration images" in line for line in export_lines(capsys))  # all 3 of the train split
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["calibration"] == "mean of per-image min/max, 3 images"


def test_an_activation_range_is_the_mean_of_its_per_image_extremes(tmp_path: Path) -> None:
    """One image far out of the others' range must not set a tensor's step for all (it did, on real data: see
    `infer/quantize.py`): the scale of each quantized activation is (mean of per-image max - mean of per-image
    min) / 255, here checked on the second conv's output, with a white image among dark ones."""
    import cv2
    import onnxruntime as ort

    from detector.api import Detector
    from detector.infer.export import ExportSpec
    from detector.infer.quantize import calibration_batches, quantize_onnx

    weights = write_checkpoint(tmp_path / "best.pt", "yolo-c2f-n")
    perturb_batchnorms(weights)
    fp32 = Detector(weights).export(imgsz=64, out=str(tmp_path / "fp32.onnx"))
    rng = np.random.default_rng(0)
    files = []
    for i in range(6):
        image = np.full((64, 64, 3), 255, np.uint8) if i == 3 else rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
        files.append(tmp_path / f"{i}.png")
        cv2.imwrite(str(files[-1]), image)
    int8 = quantize_onnx(fp32, tmp_path / "int8.onnx", files, ExportSpec(imgsz=64), 32)

    model = onnx.load(str(int8))
    scales = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and "/layers.1/" in n.input[0]
                and n.input[0].endswith("act/Mul_output_0")]
    tensor, scale = quantize[0].input[0], float(scales[quantize[0].input[1]])
    probe = onnx.load(str(fp32))
    probe.graph.output.append(onnx.ValueInfoProto(name=tensor))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    batches = calibration_batches(files, ExportSpec(imgsz=64), 32)
    values = [session.run([tensor], {"images": batch})[0] for batch in batches]
    lows, highs = [min(v.min(), 0.0) for v in values], [max(v.max(), 0.0) for v in values]
    assert scale == pytest.approx((np.mean(highs) - np.mean(lows)) / 255, rel=1e-4)
    assert scale < 0.9 * (max(highs) - min(lows)) / 255  # the white image's extremes would have set a coarser step


def test_the_int8_check_refuses_non_finite_or_misshapen_output(tmp_path: Path, monkeypatch, make_data_yaml) -> None:
    import onnxruntime as ort

    from detector.infer.export import ExportSpec, build_graph
    from detector.infer.predictor import list_images
    from detector.infer.quantize import check_int8
    from detector.models.builder import build_model

    model = build_model("yolo-c2f-n", nc=3)
    files = list_images(make_data_yaml().parent / "train" / "images")[:2]
    graph, _ = build_graph(model, ExportSpec(imgsz=64))
    with torch.no_grad():
        good = graph(torch.rand(1, 3, 64, 64)).numpy()

    class Session:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def run(self, names, feeds):
            return [result]

    monkeypatch.setattr(ort, "InferenceSession", Session)
    result = good.copy()
    result[0, 0, 0] = np.inf  # one value out of thousands is enough
    with pytest.raises(DetectorError, match="non-finite values on the calibration images"):
        check_int8(graph, tmp_path / "m.onnx", files, ExportSpec(imgsz=64), 32)
    result = good[:, :10]
    with pytest.raises(DetectorError, match=r"onnxruntime gives shape \(1, 10, 8\), PyTorch \(1, \d+, 8\)"):
        check_int8(graph, tmp_path / "m.onnx", files, ExportSpec(imgsz=64), 32)
    result = good
    # finite and shaped: reported, not judged
    score_diff, median = check_int8(graph, tmp_path / "m.onnx", files, ExportSpec(imgsz=64), 32)
    assert np.isfinite(score_diff) and np.isfinite(median)


def test_int8_box_differences_are_over_the_boxes_pytorch_is_confident_in() -> None:
    """PyTorch's scores pick the boxes compared: one only the INT8 file scores >= 0.25 is no box the model found."""
    from detector.infer.quantize import _int8_differences

    expected = np.array([[[10, 10, 4, 4, 0.9, 0.5], [20, 20, 4, 4, 0.9, 0.1]]], np.float32)  # scores 0.45, 0.09
    got = np.array([[[11, 10, 4, 4, 0.9, 0.5], [25, 20, 4, 4, 0.9, 0.4]]], np.float32)  # scores 0.45, 0.36

    class Fixed(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(expected)

    score_diff, box_diff = _int8_differences(Fixed(), np.zeros((1, 3, 8, 8), np.float32), got, Path("m.onnx"))
    assert score_diff == pytest.approx(0.36 - 0.09)
    assert box_diff.tolist() == [1, 0, 0, 0]  # the first box only, 1 px off in x


def test_int8_refusals_name_the_key(tmp_path: Path) -> None:
    weights = write_checkpoint(tmp_path / "best.pt", "yolo-c2f-n")  # trained on nothing: no data to calibrate on
    with pytest.raises(DetectorError, match=r"int8=true needs data=<dataset YAML>"):
        export_command(ExportOptions(weights=str(weights), int8=True, imgsz=64))
    with pytest.raises(DetectorError, match="'int8' is for format=onnx"):
        export_command(ExportOptions(weights=str(weights), int8=True, format="openvino", imgsz=64))
    assert not (tmp_path / "best_int8.onnx").exists() and not (tmp_path / "best.onnx").exists()


@pytest.mark.slow
def test_a_trained_model_keeps_its_ap_through_int8(overfit_run, tmp_path: Path, capsys) -> None:
    """A model overfit on 8 images: its INT8 file scores within 0.05 AP50 of its fp32 file on those images, so
    the quantization keeps what the model learnt (a broken scale or a quantized decode loses it all). Its fp32
    export with NMS is checked on its training images, where the in-graph NMS keeps boxes at the default conf."""
    from detector.api import Detector

    trained = Detector(overfit_run("yolo-ca-n").run_dir / "weights" / "best.pt")
    capsys.readouterr()
    trained.export(out=str(tmp_path / "nms.onnx"), nms=True)  # checked on its training images at conf 0.25
    checks = [line for line in export_lines(capsys) if "(NMS, " in line]
    assert len(checks) == 2 and all(" on images: " in line for line in checks)
    assert all(int(line.split("(NMS, ")[1].split()[0]) > 0 for line in checks)  # detections compared, not none
    fp32 = trained.export(out=str(tmp_path / "fp32.onnx"))
    int8 = trained.export(int8=True, calib_images=8)
    ap = {name: Detector(path).val(project=str(tmp_path / "val"), name=name, plots=False)["AP50"]
          for name, path in (("fp32", fp32), ("int8", int8))}
    assert ap["fp32"] > 0.6
    assert ap["int8"] > ap["fp32"] - 0.05

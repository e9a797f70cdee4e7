"""Exported models (ONNX, OpenVINO IR) in `detector val` and `detector predict`: the metrics and boxes of the
checkpoint they came from, class names and category ids from their own metadata, fixed-size graphs padded, and
what they cannot do refused before any work, naming the file."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detector import Detector
from detector.errors import DetectorError
from detector.infer.metrics import COCO_KEYS

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

VAL = {"imgsz": 64, "batch": 4, "workers": 0, "plots": False, "conf": 0.001}


@pytest.fixture
def weights(untrained_checkpoint: Path) -> Path:
    """The conftest checkpoint with its BN statistics measured on random images and its output convs scaled by 0.01.
    Untrained with the default statistics its outputs hardly depend on the image (1e-5 apart for different inputs),
    so no comparison could fail; measured, every layer passes the image on (moving a bright box by 16 px moves
    outputs by hundreds of pixels), and the scaled logits keep fp32 rounding within the export's check."""
    from detector.runtime.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

    state = load_checkpoint(untrained_checkpoint)
    model = model_from_checkpoint(state)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the batches below
            module.reset_running_stats()
    with torch.no_grad():
        model.train()(torch.rand(16, 3, 64, 64, generator=torch.Generator().manual_seed(10)))
        for conv in model.layers[-1].modules():
            if isinstance(conv, torch.nn.Conv2d) and conv.bias is not None:  # the head's output convs
                conv.weight.mul_(0.01)
    state["model"] = model.state_dict()
    save_checkpoint(untrained_checkpoint, state)
    return untrained_checkpoint


def export(weights: Path, **keys: object) -> Path:
    return Detector.from_checkpoint(weights, device="cpu").export(imgsz=64, **keys)


def val(model: Path, data: Path | str, project: Path, name: str, **keys: object) -> tuple[dict, list[dict]]:
    """(metrics, predictions.json) of `detector val` on `model` (data '': the dataset it was trained on)."""
    metrics = Detector.from_checkpoint(model, device="cpu").val(data=str(data), project=str(project), name=name, **{**VAL, **keys})
    return metrics, json.loads((project / name / "predictions.json").read_text())


def assert_same_predictions(got: list[dict], expected: list[dict]) -> None:
    """Every expected row has its own row in `got`: same image and category, score to 1e-4, box to 1e-2 px (two
    runtimes' rounding may swap rows of near-equal score, so rows are matched, not zipped)."""
    assert len(expected) > 50  # the untrained model's low-score boxes: plenty to compare
    assert len(got) == len(expected)
    table = lambda rows: np.array([[r["image_id"], r["category_id"], r["score"], *r["bbox"]] for r in rows])  # noqa: E731
    left, right = table(expected), table(got)
    free = np.ones(len(right), dtype=bool)
    for row in left:
        close = (free & (right[:, 0] == row[0]) & (right[:, 1] == row[1]) & (np.abs(right[:, 2] - row[2]) <= 1e-4)
                 & (np.abs(right[:, 3:] - row[3:]) <= 1e-2).all(axis=1))
        assert close.any(), f"no match for {row.tolist()}"
        free[np.flatnonzero(close)[0]] = False


def test_a_dynamic_onnx_scores_as_its_checkpoint(weights: Path, make_data_yaml, tmp_path: Path) -> None:
    from detector.runtime.checkpoint import load_checkpoint, save_checkpoint

    data = make_data_yaml()
    state = load_checkpoint(weights)
    state["train_config"]["data"] = str(data)  # as the trainer records it
    save_checkpoint(weights, state)
    onnx_path = export(weights, dynamic=True)
    detector = Detector(onnx_path)
    assert (detector.names, detector.category_ids, detector.imgsz) == (["circle", "square", "triangle"], [1, 3, 7], 64)
    assert detector.model.static_hw is None and detector.device == torch.device("cpu")
    assert detector.train_data == str(data)  # so `detector val weights=best.onnx` needs no data=
    expected_metrics, expected = val(weights, data, tmp_path, "pt")
    metrics, got = val(onnx_path, "", tmp_path, "onnx")  # rect batches of several shapes: the graph takes them
    assert_same_predictions(got, expected)
    assert all(metrics[k] == pytest.approx(expected_metrics[k], abs=1e-3) for k in COCO_KEYS)


def test_a_fixed_size_export_validates_square_batches_and_pads_smaller_inputs(weights: Path, make_data_yaml, tmp_path: Path,
                                                                            caplog) -> None:
    from detector.models.detection_model import inference_copy

    data = make_data_yaml()
    onnx_path = export(weights)
    detector = Detector(onnx_path)
    assert detector.model.static_hw == (64, 64)
    with caplog.at_level(logging.INFO, logger="detector.api"):
        _, got = val(onnx_path, data, tmp_path, "onnx")
    assert "square batches (rect=false)" in caplog.text
    _, expected = val(weights, data, tmp_path, "pt", rect=False)
    assert_same_predictions(got, expected)

    images = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))  # smaller than the graph: padded
    reference = inference_copy(Detector(weights, device="cpu").model)
    with torch.inference_mode():
        want = reference(F.pad(images, (0, 0, 0, 16), value=114 / 255).contiguous(memory_format=torch.channels_last))
    np.testing.assert_allclose(detector.model(images).numpy(), want.numpy(), rtol=1e-4, atol=1e-3)
    with pytest.raises(DetectorError, match=r"best.onnx: exported at a fixed 64x64; imgsz=96 does not fit"):
        detector.predict(np.zeros((96, 96, 3), dtype=np.uint8), imgsz=96)
    with pytest.raises(DetectorError, match=r"exported at a fixed 64x64; an input of 64x96 does not fit"):
        detector.model(torch.zeros(1, 3, 64, 96))


def test_an_export_with_nms_in_the_graph_predicts_through_its_raw_output(weights: Path, make_coco) -> None:
    split = make_coco()
    image = sorted(split.images.iterdir())[0]
    expected = Detector(weights, device="cpu").predict(image, conf=0.001)[0]
    got = Detector(export(weights, nms=True, dynamic=True)).predict(image, conf=0.001)[0]
    assert len(expected["scores"]) > 5 and got["file"] == str(image)
    np.testing.assert_allclose(got["boxes_xyxy"], expected["boxes_xyxy"], atol=1e-2)
    np.testing.assert_allclose(got["scores"], expected["scores"], atol=1e-4)
    assert got["names"] == expected["names"] and (got["category_ids"] == expected["category_ids"]).all()


def test_what_an_exported_model_cannot_do_is_refused_naming_the_file(weights: Path, tmp_path: Path) -> None:
    import onnx

    detector = Detector(export(weights))
    for call, verb in ((lambda: detector.train(epochs=1), "train"), (detector.export, "export"), (detector.info, "info")):
        with pytest.raises(DetectorError, match=rf"^{verb}: .*best.onnx is an exported model \(val and predict only\)"):
            call()
    with pytest.raises(DetectorError, match="^predict: augment=true needs the PyTorch checkpoint"):
        detector.predict(np.zeros((64, 64, 3), dtype=np.uint8), augment=True)
    with pytest.raises(DetectorError, match="an exported model runs on the CPU"):
        Detector(weights.with_suffix(".onnx"), device="cuda:0")

    stripped = onnx.load(str(weights.with_suffix(".onnx")))
    del stripped.metadata_props[:]
    onnx.save(stripped, str(tmp_path / "foreign.onnx"))
    with pytest.raises(DetectorError, match=r"foreign.onnx: no 'names' in its metadata: not written by `detector export`"):
        Detector(tmp_path / "foreign.onnx")
    stripped.metadata_props.add(key="names", value='["a", "b"]')
    for key, value in (("category_ids", "[1]"), ("stride", "32"), ("imgsz", "64")):
        stripped.metadata_props.add(key=key, value=value)
    onnx.save(stripped, str(tmp_path / "mismatched.onnx"))
    with pytest.raises(DetectorError, match=r"mismatched.onnx: metadata 'category_ids' must be 2 integers, one per name"):
        Detector(tmp_path / "mismatched.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    with pytest.raises(DetectorError, match=r"garbage.onnx: onnxruntime cannot load it"):
        Detector(tmp_path / "garbage.onnx")
    with pytest.raises(DetectorError, match=r"missing.onnx: file not found"):
        Detector.from_checkpoint(tmp_path / "missing.onnx")


@pytest.mark.isolated  # OpenVINO runs in its own pytest process (tests/conftest.py says why)
@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="needs openvino (the export extra)")
def test_openvino_ir_predicts_as_its_checkpoint_from_the_folder_or_the_xml(weights: Path, make_coco) -> None:
    xml = export(weights, format="openvino", dynamic=True)
    image = sorted(make_coco().images.iterdir())[0]
    expected = Detector(weights, device="cpu").predict(image, conf=0.001)[0]
    assert len(expected["scores"]) > 5
    for source in (xml, xml.parent):
        detector = Detector(source)
        assert (detector.names, detector.category_ids) == (["circle", "square", "triangle"], [1, 3, 7])
        got = detector.predict(image, conf=0.001)[0]
        np.testing.assert_allclose(got["boxes_xyxy"], expected["boxes_xyxy"], atol=1e-2)
        np.testing.assert_allclose(got["scores"], expected["scores"], atol=1e-4)


# ---- the wrapper and the metadata checks on their own (no runtime: `run` is a stand-in)

META = {"names": '["a", "b"]', "category_ids": "[3, 5]", "stride": "32", "imgsz": "64"}


def test_what_counts_as_an_exported_model(tmp_path: Path) -> None:
    """.onnx and .xml in any case, and a folder (not a file) named <stem>_openvino_model."""
    from detector.infer.exported import is_exported

    (tmp_path / "best_openvino_model").mkdir()
    (tmp_path / "file_openvino_model").write_bytes(b"")
    assert is_exported("best.onnx") and is_exported("BEST.ONNX") and is_exported("model.XML")
    assert is_exported(tmp_path / "best_openvino_model")
    assert not is_exported(tmp_path / "file_openvino_model") and not is_exported(tmp_path / "gone_openvino_model")
    assert not is_exported("best.pt")


def test_the_wrapper_takes_name_classes_stride_and_training_data_from_the_metadata(tmp_path: Path) -> None:
    """name, names, category_ids, stride, imgsz and train_data come from the metadata; name falls back to the stem."""
    from detector.infer.exported import ExportedModel, _check_metadata

    meta = _check_metadata({**META, "model": "yolo-ca-n", "train_data": "data/shapes.yaml"}, tmp_path / "m.onnx")
    model = ExportedModel(lambda x: x, meta, None, tmp_path / "m.onnx")
    assert (model.name, model.names, model.category_ids, model.nc, model.imgsz) == ("yolo-ca-n", ["a", "b"], [3, 5], 2, 64)
    assert model.train_data == "data/shapes.yaml" and model.stride.tolist() == [32.0]
    bare = ExportedModel(lambda x: x, _check_metadata(META, tmp_path / "m.onnx"), None, tmp_path / "m.onnx")
    assert (bare.name, bare.train_data) == ("m", "")  # no 'model' key: the file's stem


def test_a_fixed_size_graph_gets_its_input_padded_bottom_right_in_the_letterbox_grey(tmp_path: Path) -> None:
    """A smaller input is padded at the bottom and right with 114 / 255 to a fixed graph's size, its pixels unmoved."""
    from detector.infer.exported import ExportedModel, _check_metadata

    seen = []
    model = ExportedModel(lambda x: seen.append(x) or np.zeros((1, 2, 7)), _check_metadata(META, tmp_path / "m.onnx"),
                          (64, 64), tmp_path / "m.onnx")
    images = torch.rand(1, 3, 48, 32, generator=torch.Generator().manual_seed(0))
    assert model(images).shape == (1, 2, 7)
    (graph_input,) = seen
    assert graph_input.shape == (1, 3, 64, 64) and graph_input.dtype == np.float32
    np.testing.assert_array_equal(graph_input[..., :48, :32], images.numpy())
    grey = np.float32(114 / 255)
    assert (graph_input[..., 48:, :] == grey).all() and (graph_input[..., :, 32:] == grey).all()


@pytest.mark.parametrize(("key", "value", "message"), [
    ("names", "[]", "metadata 'names' must be a non-empty list of strings"),
    ("category_ids", "[true, 5]", "metadata 'category_ids' must be 2 integers, one per name"),
    ("stride", "0", "metadata 'stride' must be a positive integer, got '0'"),
    ("imgsz", "64.0", "metadata 'imgsz' must be a positive integer, got '64.0'"),
    ("stride", "thirty-two", "metadata 'stride' is not JSON: 'thirty-two'"),
    ("imgsz", None, "no 'imgsz' in its metadata: not written by `detector export`"),
])
def test_bad_metadata_is_refused_naming_the_file_and_key(tmp_path: Path, key: str, value: str | None, message: str) -> None:
    """Missing, non-JSON, empty, bool or non-positive metadata is a DetectorError naming the file and the key."""
    from detector.infer.exported import _check_metadata

    raw = {k: v for k, v in {**META, key: value}.items() if v is not None}
    with pytest.raises(DetectorError, match=f"m.onnx: {re.escape(message)}"):
        _check_metadata(raw, tmp_path / "m.onnx")


def tiny_onnx(path: Path, *, output: str = "output", hw: tuple[int, int] | tuple[str, str] = (48, 64)) -> Path:
    """A one-node ONNX graph (a Flatten of the images) with `detector export`'s metadata, its output named `output`
    and its input of height and width `hw` (ints: a fixed size; names: dynamic)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], [output], axis=2)], "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, *hw])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for key, value in META.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def test_an_onnx_file_is_read_for_its_fixed_size_and_must_have_the_raw_output(tmp_path: Path) -> None:
    """A fixed graph's (H, W) is read from its input; a graph without the raw 'output' is refused, naming its outputs."""
    from detector.infer.exported import load_exported

    assert load_exported(tiny_onnx(tmp_path / "fixed.onnx")).static_hw == (48, 64)
    assert load_exported(tiny_onnx(tmp_path / "dynamic.onnx", hw=("height", "width"))).static_hw is None
    with pytest.raises(DetectorError, match=r"other.onnx: no 'output' among its outputs \(boxes\): not written by"):
        load_exported(tiny_onnx(tmp_path / "other.onnx", output="boxes"))


def test_onnxruntime_runs_on_as_many_threads_as_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The onnxruntime session gets torch's intra-op thread count."""
    import onnxruntime as ort

    threads, real = [], ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda path, options, **kw: threads.append(options.intra_op_num_threads)
                        or real(path, options, **kw))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    from detector.infer.exported import load_exported

    load_exported(tiny_onnx(tmp_path / "m.onnx"))
    assert threads == [3]

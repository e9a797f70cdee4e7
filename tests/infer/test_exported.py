"""Exported models (ONNX, OpenVINO IR) in `detector val` and `detector predict`: the metrics and boxes of the
checkpoint they came from, class names and category ids from their own metadata, fixed-size graphs padded, and
what they cannot do refused before any work, naming the file."""

from __future__ import annotations

import importlib.util
import json
import logging
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

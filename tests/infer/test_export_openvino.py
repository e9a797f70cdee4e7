"""OpenVINO export: the IR lands in <stem>_openvino_model/, its CPU runtime matches PyTorch at batch 1 and 2 (fixed
and dynamic sizes, NMS in the graph, fp16 weights), its path is printed last, and bad requests name the key."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.errors import DetectorError
from detector.options import ExportOptions

# the sibling module's helpers (pytest puts this folder on sys.path; test file names are unique across tests/)
from test_export import export_command, export_lines, max_diffs, write_checkpoint

pytestmark = [
    pytest.mark.isolated,  # OpenVINO runs in its own pytest process (tests/conftest.py says why)
    pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="needs openvino (the export extra)"),
]
pytest.importorskip("onnx")


def perturb_batchnorms(weights: Path) -> None:
    """Give the checkpoint's BNs random statistics, so that folding them is exercised (an untrained model's BNs
    are identities) and the boxes spread over the image."""
    from detector.runtime.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(weights)
    g = torch.Generator().manual_seed(0)
    for name, tensor in state["model"].items():
        if name.endswith(("running_mean", "bn.bias")):
            state["model"][name] = (torch.rand(tensor.shape, generator=g) - 0.5) * 0.6
        elif name.endswith(("running_var", "bn.weight")):
            state["model"][name] = torch.rand(tensor.shape, generator=g) + 0.5
    save_checkpoint(weights, state)


def compile_f32(xml: Path):
    import openvino as ov

    return ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def test_default_model_beside_the_weights_matches_pytorch(tmp_path: Path, capsys) -> None:
    from detector.runtime.checkpoint import load_checkpoint, model_from_checkpoint

    weights = write_checkpoint(tmp_path / "weights" / "best.pt", "yolo-ca-n")
    perturb_batchnorms(weights)
    xml = export_command(ExportOptions(weights=str(weights), format="openvino", imgsz=96))
    lines = export_lines(capsys)
    assert xml == tmp_path / "weights" / "best_openvino_model" / "best.xml" and xml.with_suffix(".bin").exists()
    assert lines[-1] == str(xml)
    checks = [line for line in lines if line.startswith("export: OpenVINO vs PyTorch")]
    assert len(checks) == 2 and all(d < 1e-3 for d in max_diffs(checks))  # batch 1 and batch 2

    # independently of the exporter's own check: the saved IR against the checkpoint's own (unfused) model
    reference = model_from_checkpoint(load_checkpoint(weights)).eval()
    compiled = compile_f32(xml)
    images = torch.rand(3, 3, 96, 96, generator=torch.Generator().manual_seed(3))  # the batch axis is dynamic
    with torch.no_grad():
        expected = reference(images).numpy()
    actual = compiled(images.numpy())["output"]
    assert actual.shape == expected.shape == (3, 3 * (24 * 24 + 12 * 12 + 6 * 6 + 3 * 3), 8)
    assert expected[..., :4].max() > 50  # the boxes are spread: the comparison below means something
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-3)
    import openvino as ov

    ir = ov.Core().read_model(str(xml))
    assert json.loads(ir.get_rt_info(["detector", "names"]).astype(str)) == ["c0", "c1", "c2"]
    assert json.loads(ir.get_rt_info(["detector", "stride"]).astype(str)) == 32


def test_dynamic_size_and_nms_in_the_graph(tmp_path: Path, capsys) -> None:
    weights = write_checkpoint(tmp_path / "best.pt", "yolo-c2f-n")
    out = tmp_path / "export" / "c2f_openvino_model"
    xml = export_command(ExportOptions(weights=str(weights), format="openvino", dynamic=True, nms=True,
                                       conf=0.001, max_det=5, out=str(out)))
    lines = export_lines(capsys)
    assert xml == out / "c2f.xml" and lines[-1] == str(xml)
    checks = [line for line in lines if line.startswith("export: OpenVINO vs PyTorch")]
    assert any("batch 2, 32x96" in line and "(NMS, " in line for line in checks)  # another size, NMS checked too
    assert len(checks) == 2 and all(d < 1e-3 for d in max_diffs(checks))
    compiled = compile_f32(xml)
    assert [o.get_any_name() for o in compiled.outputs] == ["detections", "num_detections", "output"]
    result = compiled(np.random.default_rng(0).random((2, 3, 128, 64), np.float32))  # H and W are dynamic
    dets, num = result["detections"], result["num_detections"]
    assert dets.shape == (2, 5, 6) and num.tolist() == [5, 5]
    assert (np.diff(dets[..., 4], axis=1) <= 0).all()  # sorted by score
    assert (dets[..., :4] >= 0).all() and (dets[..., [0, 2]] <= 64).all() and (dets[..., [1, 3]] <= 128).all()  # clipped


def test_half_stores_fp16_weights_within_the_relative_tolerance(tmp_path: Path, capsys) -> None:
    weights = write_checkpoint(tmp_path / "best.pt", "yolo-c2f-n")
    perturb_batchnorms(weights)
    full = export_command(ExportOptions(weights=str(weights), format="openvino", out=str(tmp_path / "fp32")))
    half = export_command(ExportOptions(weights=str(weights), format="openvino", half=True, out=str(tmp_path / "fp16" / "small.xml")))
    assert half == tmp_path / "fp16" / "small.xml" and half.with_suffix(".bin").is_file()  # out= may name the .xml
    checks = [line for line in export_lines(capsys) if "(fp16 weights; " in line]
    assert len(checks) == 2
    relative = [float(line.split("relative ")[1].split()[0]) for line in checks]
    assert all(0 < r < 1e-2 for r in relative)  # fp16 rounding shows, within the tolerance
    assert half.with_suffix(".bin").stat().st_size < 0.6 * full.with_suffix(".bin").stat().st_size


def test_bad_requests_name_the_key(tmp_path: Path, capsys) -> None:
    from detector.cli import main

    weights = write_checkpoint(tmp_path / "best.pt", "yolo-c2f-n")
    with pytest.raises(DetectorError, match=r"'format' must be one of onnx, openvino, got 'tflite'"):
        export_command(ExportOptions(weights=str(weights), format="tflite"))
    with pytest.raises(DetectorError, match=r"'half' is for format=openvino"):
        export_command(ExportOptions(weights=str(weights), half=True))
    with pytest.raises(DetectorError, match="'imgsz' must be .* a multiple of 32, got 100"):
        export_command(ExportOptions(weights=str(weights), format="openvino", imgsz=100))
    assert main(["export", f"weights={weights}", "format=tflite"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "detector export: error: command line: 'format' must be one of onnx, openvino, got 'tflite'"]

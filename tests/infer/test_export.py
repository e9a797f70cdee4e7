"""ONNX export: onnxruntime matches PyTorch at batch 1 and 2 (default model, attention models, dynamic size, NMS in
the graph), the file lands beside the weights, its path is printed last; OpenCV's DNN module runs it too."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detector.errors import DetectorError
from detector.options import ExportOptions

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def write_checkpoint(path: Path, model_cfg: str, *, attention: str | None = None, nc: int = 3) -> Path:
    """An inference checkpoint of an untrained, seeded model (the trainer's keys)."""
    from detector.runtime.checkpoint import CHECKPOINT_KEYS, FORMAT_VERSION, save_checkpoint
    from detector.models.builder import build_model

    torch.manual_seed(0)
    model = build_model(model_cfg, nc=nc, attention=attention)
    state = dict.fromkeys(CHECKPOINT_KEYS)
    state.update(
        format_version=FORMAT_VERSION, version="test", model_yaml=model.yaml, model=model.state_dict(), ema=None,
        epoch=0, train_state={}, rng={}, train_config={}, names=[f"c{i}" for i in range(nc)],
        category_ids=list(range(1, nc + 1)), imgsz=64, run_dir=str(path.parent),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, state)
    return path


def export_command(opts: ExportOptions) -> Path:
    """What `detector export` runs: the checkpoint's Detector, then its export."""
    from detector.api import Detector

    return Detector.from_checkpoint(opts.weights, device="cpu").export(opts)


def export_lines(capsys) -> list[str]:
    return capsys.readouterr().out.strip().splitlines()


def max_diffs(lines: list[str]) -> list[float]:
    """The max abs differences the export's checks printed; none printed is a failure (an export left unchecked)."""
    diffs = [float(line.split("max abs difference ")[1].split()[0]) for line in lines if "max abs difference" in line]
    assert diffs, f"the export printed no check: {lines}"
    return diffs


def test_default_model_round_trip_beside_the_weights(tmp_path: Path, capsys) -> None:
    import onnx
    import onnxruntime as ort

    weights = write_checkpoint(tmp_path / "weights" / "best.pt", "yolo-ca-n")
    path = export_command(ExportOptions(weights=str(weights), opset=17))
    lines = export_lines(capsys)
    assert path == tmp_path / "weights" / "best.onnx" and path.exists()
    assert lines[-1] == str(path)
    diffs = max_diffs(lines)
    assert len(diffs) == 2 and all(d < 1e-3 for d in diffs)  # batch 1 and batch 2

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"images": np.zeros((3, 3, 64, 64), np.float32)})  # the batch axis is dynamic
    assert out.shape == (3, 3 * (16 * 16 + 8 * 8 + 4 * 4 + 2 * 2), 5 + 3)  # the default has four levels, P2-P5
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["names"]) == ["c0", "c1", "c2"] and json.loads(meta["stride"]) == 32


def test_attention_model_with_dynamic_size(tmp_path: Path, capsys, caplog) -> None:
    weights = write_checkpoint(tmp_path / "best.pt", "yolo-attn-n", attention="mhsa")
    out = tmp_path / "export" / "mhsa.onnx"
    with caplog.at_level(logging.WARNING, logger="detector.infer.export"):
        export_command(ExportOptions(weights=str(weights), dynamic=True, out=str(out)))
    assert "key/value pooling (max_kv) is fixed at imgsz" in caplog.text
    lines = export_lines(capsys)
    assert lines[-1] == str(out)
    assert any("batch 2, 32x96" in line for line in lines)  # the second check runs at another size
    assert all(d < 1e-3 for d in max_diffs(lines))


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["axial", "ssa", "cbam"])
def test_other_attention_models_export(tmp_path: Path, capsys, attention: str) -> None:
    weights = write_checkpoint(tmp_path / "best.pt", "yolo-attn-n", attention=attention)
    export_command(ExportOptions(weights=str(weights), dynamic=True))
    assert all(d < 1e-3 for d in max_diffs(export_lines(capsys)))


def test_nms_in_the_graph(tmp_path: Path, capsys, caplog) -> None:
    import onnxruntime as ort

    weights = write_checkpoint(tmp_path / "best.pt", "yolo-c2f-n")
    path = export_command(ExportOptions(weights=str(weights), nms=True, conf=0.001, max_det=4))
    assert all(d < 1e-3 for d in max_diffs(export_lines(capsys)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["detections", "num_detections", "output"]
    dets, num = session.run(["detections", "num_detections"], {"images": np.random.default_rng(0).random((2, 3, 64, 64), np.float32)})
    assert dets.shape == (2, 4, 6) and num.tolist() == [4, 4]
    assert (np.diff(dets[..., 4], axis=1) <= 0).all()  # sorted by score
    assert ((dets[..., :4] >= 0) & (dets[..., :4] <= 64)).all()  # clipped to the input


def test_the_check_feeds_both_runtimes_the_training_images(tmp_path: Path, capsys, caplog, make_data_yaml) -> None:
    """With a dataset known (data=, or the checkpoint's own), the check's inputs are its train images, each used
    once, resized to the graph's size (`check_inputs`); a checkpoint whose dataset is not on this machine is checked
    on noise and says so; a data= that does not load stops the export naming the file."""
    from detector.infer import export
    from detector.runtime.checkpoint import load_checkpoint, save_checkpoint

    data = make_data_yaml(sizes_wh=[(64, 48), (50, 70), (64, 64)])
    weights = write_checkpoint(tmp_path / "best.pt", "yolo-c2f-n")
    seen: list[np.ndarray] = []
    real_inputs = export.check_inputs

    def spy(*args, **kwargs) -> torch.Tensor:
        seen.append(real_inputs(*args, **kwargs).numpy())
        return torch.from_numpy(seen[-1])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export, "check_inputs", spy)
        export_command(ExportOptions(weights=str(weights), data=str(data), imgsz=64, dynamic=True, nms=True, conf=0.001))
    lines = [line for line in export_lines(capsys) if "max abs difference" in line]
    assert len(lines) == 2 and all(" on images: " in line for line in lines)
    assert [x.shape for x in seen] == [(1, 3, 64, 64), (2, 3, 32, 96)]
    images = sorted((data.parent / "train" / "images").iterdir())
    first = cv2.cvtColor(cv2.imread(str(images[0])), cv2.COLOR_BGR2RGB)
    np.testing.assert_allclose(seen[0][0], cv2.resize(first, (64, 64), interpolation=cv2.INTER_AREA).transpose(2, 0, 1) / 255,
                               atol=1e-6)
    assert len({x.tobytes() for x in (seen[0][0], seen[1][0], seen[1][1])}) == 3  # three different images

    state = load_checkpoint(weights)
    state["train_config"] = {"data": str(tmp_path / "moved" / "data.yaml")}
    save_checkpoint(weights, state)
    with caplog.at_level(logging.INFO, logger="detector.api"):
        export_command(ExportOptions(weights=str(weights), imgsz=64))
    assert all(" on random inputs: " in line for line in export_lines(capsys) if "max abs difference" in line)
    assert "checked on random inputs: the training data" in caplog.text and "moved" in caplog.text
    with pytest.raises(DetectorError, match="missing.yaml"):
        export_command(ExportOptions(weights=str(weights), imgsz=64, data=str(tmp_path / "missing.yaml")))


def test_check_inputs_without_images_is_seeded_noise() -> None:
    from detector.infer.export import check_inputs

    x = check_inputs([], 0, 2, (32, 64), torch.Generator().manual_seed(3))
    assert torch.equal(x, torch.rand(2, 3, 32, 64, generator=torch.Generator().manual_seed(3)))
    red = np.zeros((10, 20, 3), np.uint8)
    red[..., 0] = 255
    blue = red[..., ::-1].copy()
    x = check_inputs([red, blue], 1, 3, (8, 16), torch.Generator())  # from the second image on, cyclically
    assert x.shape == (3, 3, 8, 16) and x.dtype == torch.float32
    assert x[:, 0].amax((1, 2)).tolist() == [0.0, 1.0, 0.0] and x[:, 2].amax((1, 2)).tolist() == [1.0, 0.0, 1.0]


def test_simplify_slims_the_graph_and_still_checks(tmp_path: Path, capsys, caplog, monkeypatch) -> None:
    """simplify=true runs onnxslim (the export extra): fewer nodes, the same outputs (the export's own check);
    without onnxslim the traced file is kept, with a warning naming it."""
    import onnx

    weights = write_checkpoint(tmp_path / "best.pt", "yolo-c2f-n")
    traced = export_command(ExportOptions(weights=str(weights), out=str(tmp_path / "traced.onnx")))
    slim = export_command(ExportOptions(weights=str(weights), out=str(tmp_path / "slim.onnx"), simplify=True))
    assert all(d < 1e-3 for d in max_diffs(export_lines(capsys)))
    assert len(onnx.load(str(slim)).graph.node) < len(onnx.load(str(traced)).graph.node)
    monkeypatch.setitem(sys.modules, "onnxslim", None)  # importlib.util.find_spec now answers None
    with caplog.at_level(logging.WARNING):
        kept = export_command(ExportOptions(weights=str(weights), out=str(tmp_path / "kept.onnx"), simplify=True))
    assert len(onnx.load(str(kept)).graph.node) == len(onnx.load(str(traced)).graph.node)
    assert any("onnxslim is not installed" in r.getMessage() for r in caplog.records)


def test_in_graph_nms_matches_the_predictor_nms() -> None:
    """Per image and class, the shifted single-call NMS keeps what `non_max_suppression` keeps (boxes inside)."""
    from detector.infer.postprocess import non_max_suppression
    from detector.infer.export import DetectWithNMS

    g = torch.Generator().manual_seed(0)
    b, n, nc, size = 3, 200, 4, 96
    xy = torch.rand(b, n, 2, generator=g) * 60 + 18
    wh = torch.rand(b, n, 2, generator=g) * 30 + 4
    pred = torch.cat([xy, wh, torch.rand(b, n, 1 + nc, generator=g)], -1)
    wrapper = DetectWithNMS(torch.nn.Identity(), conf=0.3, iou=0.5, max_det=50)
    dets, num = wrapper.suppress(pred, size, size)
    expected = non_max_suppression(pred, conf=0.3, iou=0.5, max_det=50, multi_label=False)
    for i in range(b):
        assert num[i].item() == len(expected[i])
        torch.testing.assert_close(dets[i, : len(expected[i])], expected[i])
        assert (dets[i, len(expected[i]) :] == 0).all()


def test_in_graph_nms_clips_boxes_to_a_wide_input() -> None:
    """Boxes are clipped to x in [0, W], y in [0, H] of a 64 x 128 (H x W) input: one box sticking out on each side."""
    from detector.infer.export import DetectWithNMS

    pred = torch.tensor([[[120.0, 40.0, 40.0, 20.0, 0.9, 1.0], [10.0, 60.0, 30.0, 20.0, 0.8, 1.0],
                          [60.0, 10.0, 8.0, 8.0, 0.5, 0.5]]])  # cx cy w h; the last scores 0.25 = conf: not kept
    dets, num = DetectWithNMS(torch.nn.Identity(), conf=0.25, iou=0.5, max_det=5).suppress(pred, 64, 128)
    assert num.tolist() == [2]
    torch.testing.assert_close(dets[0, :2, :4], torch.tensor([[100.0, 30.0, 128.0, 50.0], [0.0, 50.0, 25.0, 64.0]]))


def test_a_failed_check_writes_nothing_and_keeps_the_earlier_export(tmp_path: Path, make_data_yaml, monkeypatch) -> None:
    """Each format is written at a staging path beside its target and moved there only once its check passes: a
    file that fails its check is removed, and the export already at the target (ONNX, INT8, the IR's .xml and .bin)
    stays byte for byte."""
    from detector.infer import export, quantize

    weights = write_checkpoint(tmp_path / "w" / "best.pt", "yolo-c2f-n")
    data = str(make_data_yaml(sizes_wh=[(64, 48), (50, 70)]))
    requests = {"onnx": {}, "int8": {"int8": True, "data": data}}
    if importlib.util.find_spec("openvino") is not None:
        requests["openvino"] = {"format": "openvino"}
    folder = weights.parent
    targets = [folder / "best.onnx", folder / "best_int8.onnx", folder / "best_openvino_model" / "best.xml",
               folder / "best_openvino_model" / "best.bin"]
    earlier = {path: f"an earlier export: {path.name}".encode() for path in targets}
    for path, content in earlier.items():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)

    def failing(*args, **kwargs):
        raise DetectorError("export: the check failed (test)")

    checks = {"onnx": (export, "check_onnx"), "int8": (quantize, "_int8_differences")}  # int8: after its fp32 source passed
    if "openvino" in requests:
        from detector.infer import export_openvino

        checks["openvino"] = (export_openvino, "check_openvino")
    for name, keys in requests.items():
        with monkeypatch.context() as patch, pytest.raises(DetectorError, match=r"\(test\); nothing written to .*best"):
            patch.setattr(*checks[name], failing)
            export_command(ExportOptions(weights=str(weights), imgsz=64, **keys))
    assert {f: f.read_bytes() for f in earlier} == earlier
    assert not [f for f in tmp_path.rglob("*") if ".partial" in f.name]


def test_bad_requests_name_the_key(tmp_path: Path) -> None:
    weights = write_checkpoint(tmp_path / "best.pt", "yolo-c2f-n")
    with pytest.raises(DetectorError, match="'format' must be one of onnx, openvino, got 'tflite'"):
        export_command(ExportOptions(weights=str(weights), format="tflite"))
    with pytest.raises(DetectorError, match=r"^Detector.export\(\): 'imgsz' must be .* a multiple of 32, got 100$"):
        export_command(ExportOptions(weights=str(weights), imgsz=100))  # built by hand, checked as the CLI checks
    with pytest.raises(DetectorError, match="'opset' must be >= 14 and <= 23, got 11"):
        export_command(ExportOptions(weights=str(weights), opset=11))
    with pytest.raises(DetectorError, match="weights="):
        export_command(ExportOptions())
    from detector.infer.export import ExportSpec, export_onnx
    from detector.models.builder import build_model

    model = build_model("yolo-c2f-n", nc=3)  # the module's own checks, for a caller without the options' bounds
    with pytest.raises(DetectorError, match="^export: imgsz must be a multiple of the model stride 32, got 48$"):
        export_onnx(model, tmp_path / "m.onnx", ExportSpec(imgsz=48))
    with pytest.raises(DetectorError, match="^export: opset must be 14..23, got 11$"):
        export_onnx(model, tmp_path / "m.onnx", ExportSpec(imgsz=64, opset=11))
    assert not (tmp_path / "m.onnx").exists()


def test_an_out_path_that_would_replace_the_checkpoint_or_a_folder_is_refused_before_any_work(tmp_path: Path) -> None:
    """out=best.pt once wrote the ONNX file over the checkpoint it exported; a folder or a path through a file was a
    traceback after the export. Each is refused in one line, and nothing is touched."""
    weights = write_checkpoint(tmp_path / "best.pt", "yolo-c2f-n")
    before = weights.read_bytes()
    (tmp_path / "folder.onnx").mkdir()
    (tmp_path / "a_file").write_text("keep")
    cases = {
        str(weights): "out= for format=onnx must be a file ending in .onnx, got '.*best.pt'",
        str(tmp_path / "model.xml"): "out= for format=onnx must be a file ending in .onnx",
        str(tmp_path / "folder.onnx"): r"out=.*folder.onnx is a folder; name the .onnx file to write",
        str(tmp_path / "a_file" / "x.onnx"): r"cannot write .*a_file/x.onnx: Not a directory",
        str(tmp_path / ("n" * 300 + ".onnx")): "cannot write .*: File name too long",
    }
    for out, message in cases.items():
        with pytest.raises(DetectorError, match=message):
            export_command(ExportOptions(weights=str(weights), out=out))
    with pytest.raises(DetectorError, match="out= for format=openvino is a folder or an .xml file, got the existing file"):
        export_command(ExportOptions(weights=str(weights), out=str(weights), format="openvino"))
    assert weights.read_bytes() == before and (tmp_path / "a_file").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "best.pt", "folder.onnx"]


@pytest.mark.parametrize("nms", [False, True], ids=["decoded", "nms"])
def test_opencv_dnn_runs_the_onnx_file(tmp_path: Path, capsys, nms: bool) -> None:
    """cv2.dnn.readNetFromONNX loads the file and its outputs match onnxruntime's (NMS included: OpenCV 5.0 runs
    NonMaxSuppression) and PyTorch's, at batch 1 and 2."""
    cv2 = pytest.importorskip("cv2")
    import onnxruntime as ort
    from detector.runtime.checkpoint import load_checkpoint, model_from_checkpoint

    weights = write_checkpoint(tmp_path / "best.pt", "yolo-ca-n")
    path = export_command(ExportOptions(weights=str(weights), imgsz=96, nms=nms, conf=0.001, max_det=8))
    net = cv2.dnn.readNetFromONNX(str(path))
    names = list(net.getUnconnectedOutLayersNames())
    assert names == (["detections", "num_detections", "output"] if nms else ["output"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = model_from_checkpoint(load_checkpoint(weights)).eval()
    for batch in (1, 2):
        images = torch.rand(batch, 3, 96, 96, generator=torch.Generator().manual_seed(batch))
        net.setInput(images.numpy())
        got = dict(zip(names, net.forward(names)))
        expected = dict(zip(names, session.run(names, {"images": images.numpy()})))
        with torch.no_grad():
            np.testing.assert_allclose(got["output"], reference(images).numpy(), rtol=1e-4, atol=1e-3)
        for name in names:
            assert got[name].shape == expected[name].shape, name
            np.testing.assert_allclose(got[name].astype(np.float64), expected[name].astype(np.float64), rtol=1e-4, atol=1e-3)
    if nms:
        assert got["num_detections"].tolist() == [8, 8]  # conf 0.001 keeps max_det boxes in each image


def test_the_check_allows_float_rounding_of_large_boxes_but_not_a_wrong_score(tmp_path: Path, capsys) -> None:
    """Boxes are in pixels: a trained model's 280 px box moves by about 1e-3 between two correct fp32 runtimes
    (seen: 1.2e-3), which is rounding, whereas 2e-3 on a probability is an error."""
    from detector.infer.export import ExportSpec, check_runtime

    class Fixed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(x.shape[0], 4, 8)
            out[..., :4], out[..., 4:] = 280.0, 0.5
            return out

    def shifted(where: slice, by: float):
        def run(images: np.ndarray) -> dict[str, np.ndarray]:
            out = Fixed()(torch.from_numpy(images)).numpy()
            out[..., where] += by
            return {"output": out}
        return run

    spec = ExportSpec(imgsz=32)
    assert check_runtime(Fixed(), shifted(slice(0, 4), 2e-3), spec, stride=32, runtime="rt", path=tmp_path) < 1e-3
    assert "max abs difference 2.0" in capsys.readouterr().out  # the printed figure stays the absolute one (float32: 2.01e-03)
    with pytest.raises(DetectorError, match=r"rt differs from PyTorch by 0\.0019 of 1 \+ \|value\| / 10"):
        check_runtime(Fixed(), shifted(slice(4, 8), 2e-3), spec, stride=32, runtime="rt", path=tmp_path)
    with pytest.raises(DetectorError, match="differs from PyTorch"):  # a box 0.1 px off is no rounding
        check_runtime(Fixed(), shifted(slice(0, 4), 0.1), spec, stride=32, runtime="rt", path=tmp_path)


def test_the_fp16_check_leaves_out_the_boxes_of_rows_no_conf_keeps(tmp_path: Path, capsys) -> None:
    """fp16 weights move a background row's box by up to 2% on real images (seen: 1.9% on a 9 px box scoring
    1e-5) and a scored row's by 0.3%: the relative check counts boxes only on rows scoring >= 1e-3 (val's conf),
    and the scores everywhere."""
    from detector.infer.export import ExportSpec, check_runtime

    class TwoRows(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(x.shape[0], 2, 7)
            out[..., :4], out[..., 4] = 10.0, 1.0  # boxes; the objectness column (1: an anchor-free style head)
            out[:, 0, 5:], out[:, 1, 5:] = 0.5, 1e-5  # row 0 scores 0.5, row 1 scores 1e-5
            return out

    def shifted(row: int, columns: slice, by: float):
        def run(images: np.ndarray) -> dict[str, np.ndarray]:
            out = TwoRows()(torch.from_numpy(images)).numpy()
            out[:, row, columns] += by
            return {"output": out}
        return run

    spec = ExportSpec(imgsz=32)
    half = {"stride": 32, "runtime": "rt", "path": tmp_path, "relative": True}
    assert check_runtime(TwoRows(), shifted(1, slice(0, 4), 0.5), spec, **half) == 0.0  # 5% on a background box
    assert "(fp16 weights; boxes of rows scoring >= 0.001)" in capsys.readouterr().out
    with pytest.raises(DetectorError, match=r"rt differs from PyTorch by 0\.0455 of 1 \+ \|value\| / 1 "):
        check_runtime(TwoRows(), shifted(0, slice(0, 4), 0.5), spec, **half)  # 5% on a scored box
    with pytest.raises(DetectorError, match="differs from PyTorch"):  # a background row's score still counts
        check_runtime(TwoRows(), shifted(1, slice(5, 7), 0.05), spec, **half)
    with pytest.raises(DetectorError, match="differs from PyTorch"):  # fp32 checks every box
        check_runtime(TwoRows(), shifted(1, slice(0, 4), 0.5), spec, stride=32, runtime="rt", path=tmp_path)

"""ONNX export (RELIABILITY row 35), checked independently of the exporter's own self-check: the file loads in
onnxruntime and its outputs equal PyTorch's at batch 1 and 2 (tests/infer/test_export.py covers the options)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from detector.runtime.checkpoint import CHECKPOINT_KEYS, FORMAT_VERSION, load_checkpoint, model_from_checkpoint, save_checkpoint
from detector.models.builder import build_model
from detector.options import ExportOptions

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.mark.slow
def test_onnxruntime_outputs_equal_pytorch_at_batch_1_and_2(tmp_path: Path) -> None:
    from detector.api import Detector

    torch.manual_seed(0)
    model = build_model("yolo-c2f-n", nc=3)
    state = dict.fromkeys(CHECKPOINT_KEYS)
    state.update(
        format_version=FORMAT_VERSION, version="test", model_yaml=model.yaml, model=model.state_dict(), ema=None,
        epoch=0, train_state={}, rng={}, train_config={}, names=["a", "b", "c"], category_ids=[1, 2, 3], imgsz=64,
        run_dir=str(tmp_path),
    )
    weights = tmp_path / "best.pt"
    save_checkpoint(weights, state)
    path = Detector.from_checkpoint(weights, device="cpu").export(ExportOptions(weights=str(weights)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = model_from_checkpoint(load_checkpoint(weights))
    for batch in (1, 2):
        images = torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = reference(images).numpy()
        (actual,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
        assert actual.shape == expected.shape == (batch, 3 * (8 * 8 + 4 * 4 + 2 * 2), 8)
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-3)

"""Absurd model rows and runs that cannot fit are refused in one line, before the memory is allocated."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from detector import memory
from detector.errors import DetectorError
from detector.models import footprint
from detector.models.builder import build_model
from repo_paths import REPO_ROOT

BASE = (REPO_ROOT / "configs" / "models" / "yolov5n.yaml").read_text()
ROW = "[-1, 1, Conv, [128, 3, 2]]"


def refused(tmp_path: Path, text: str, pattern: str) -> str:
    path = tmp_path / "absurd.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(DetectorError, match=pattern) as info:
        build_model(path)
    assert time.perf_counter() - start < 1.0
    line = text.splitlines().index("backbone:") + 3  # backbone[1]: the second row under the key (lines count from 1)
    assert str(info.value).startswith(f"{path}:{line}: backbone[1]: ") and "\n" not in str(info.value)
    return str(info.value)


def test_a_million_repeats_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, BASE.replace(ROW, "[-1, 1000000, Conv, [128, 3, 2]]"),
            r"330,000 repeats \(after depth_multiple\) is over the limit of 100")


def test_a_billion_channels_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, BASE.replace(ROW, "[-1, 1, Conv, [1000000000, 3, 2]]"),
            r"250,000,000 output channels \(after width_multiple\) is over the limit of 16,384")


def test_a_row_too_large_for_memory_is_sized_on_meta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """4,096 x 4,096 x 3 x 3 weights (and BN's 2 x 4,096) train in 16 bytes each, 2.3 GiB, on a machine of 1 GiB:
    refused from its meta-device size, never allocated. Small enough that a broken refusal fails this test (0.6 GB
    of weights) instead of exhausting the machine."""
    monkeypatch.setattr(memory, "machine_memory_bytes", lambda: 2**30)
    text = BASE.replace("width_multiple: 0.25", "width_multiple: 1.0").replace(
        "[-1, 1, Conv, [64, 6, 2, 2]]", "[-1, 1, Conv, [4096, 3, 1]]").replace(ROW, "[-1, 1, Conv, [4096, 3, 2]]")
    message = refused(tmp_path, text, r"the model would have 151,\d{3},\d{3} parameters \(151,003,136 in this row\)")
    assert "more than this machine's 1.0 GiB" in message


def test_ordinary_models_record_their_probe_activations() -> None:
    model = build_model("yolov5n", nc=3)
    assert model.probe_px == 256 and len(model.probe_activations) == len(model.layers)
    assert model.probe_activations[0] == 3 * 16 * 128 * 128  # the stem Conv: conv, BN and SiLU outputs
    footprint.check_training_fits(model, imgsz=640, batch=16, source="model yolov5n")  # fits


def test_training_that_cannot_fit_names_the_heaviest_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "machine_memory_bytes", lambda: 8 * 2**30)
    model = build_model("yolov5n", nc=3)
    footprint.check_training_fits(model, imgsz=640, batch=16, source="model yolov5n")
    scale = 64 * (4096 / 256) ** 2
    need = sum(p.numel() for p in model.parameters()) * 16 + sum(model.probe_activations) * scale * 4
    heaviest = max(range(len(model.layers)), key=model.probe_activations.__getitem__)
    assert model.layer_info[heaviest].row == "backbone[2]"  # the C3 at stride 4 keeps the most outputs
    with pytest.raises(DetectorError, match=rf"^model yolov5n: training at imgsz=4096, batch=64 needs about "
                                            rf"{need / 2**30:,.1f} GiB .*more than this machine's 8.0 GiB; "
                                            r"backbone\[2\] \(C3\) holds the most activations"):
        footprint.check_training_fits(model, imgsz=4096, batch=64, source="model yolov5n")


def test_a_huge_kernel_is_sized_on_meta(tmp_path: Path) -> None:
    """16 x 32 channels is a small product, but a 100,000 px kernel makes 5 * 10^12 weights: sized on meta and
    refused, not handed to the allocator (which raised a bare RuntimeError, or took the memory of a smaller one)."""
    refused(tmp_path, BASE.replace(ROW, "[-1, 1, Conv, [128, 100000, 2]]"),
            r"the model would have [\d,]+ parameters \(5,120,000,000,064 in this row\)")


def test_a_huge_class_count_is_sized_on_meta(tmp_path: Path) -> None:
    path = tmp_path / "absurd.yaml"
    path.write_text(BASE)
    line = next(i for i, text in enumerate(BASE.splitlines(), 1) if "Detect" in text)
    with pytest.raises(DetectorError, match=rf"^{path}:{line}: head\[14\]: the model would have [\d,]+ parameters"):
        build_model(path, nc=10**10)


def test_row_elements_count_kernel_and_class_count() -> None:
    assert footprint.row_elements(16, 32, 2, [3, 2, None, True]) == 16 * 32 * 2 * 9  # k=3; bools and None skipped
    assert footprint.row_elements(448, None, 1, [80, [[10, 13]]]) == 448 * 80**2
    assert footprint.row_elements(8, 8, 1, []) == 64


def test_the_row_limits_are_inclusive() -> None:
    """MAX_REPEATS repeats and MAX_CHANNELS channels are allowed; one more is refused."""
    footprint.check_row_bounds("row", footprint.MAX_REPEATS, footprint.MAX_CHANNELS)
    with pytest.raises(DetectorError, match="101 repeats"):
        footprint.check_row_bounds("row", footprint.MAX_REPEATS + 1, 16)
    with pytest.raises(DetectorError, match="16,385 output channels"):
        footprint.check_row_bounds("row", 1, footprint.MAX_CHANNELS + 1)


def test_a_row_over_the_meta_threshold_is_sized_on_meta_first() -> None:
    """Above META_CHECK_ELEMENTS the row is built once on `meta` (no storage) before the real build."""
    devices = []

    def construct() -> torch.nn.Module:
        devices.append(torch.empty(0).device.type)  # the default device the row is built under
        return torch.nn.Linear(2, 2)

    footprint.sized_construct("row", construct, footprint.META_CHECK_ELEMENTS, 0)
    assert devices == ["cpu"]
    footprint.sized_construct("row", construct, footprint.META_CHECK_ELEMENTS + 1, 0)
    assert devices == ["cpu", "meta", "cpu"]

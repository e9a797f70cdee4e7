"""`model_info` and `count_flops`: the layer table, the summary line, 2 x MACs."""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from detector.models.builder import build_model
from detector.models.info import count_flops, model_info

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "models"


def test_count_flops_is_two_macs() -> None:
    conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
    macs = 16 * 3 * 3 * 3 * 32 * 32
    assert count_flops(conv, 32) == 2 * macs / 1e9


def test_model_info_table_and_summary() -> None:
    model = build_model(CONFIGS / "yolo-ca-n.yaml", nc=3)
    text = model_info(model, imgsz=320)
    lines = text.splitlines()
    assert lines[0].split() == ["from", "n", "params", "module", "attention", "arguments"]
    assert len(lines) == 2 + len(model.layers) + 1
    assert "CA_C2f" in text and "Detect" in text
    assert [line.split()[4:7] for line in lines[2:] if "CA_C2f" in line] == [["CA_C2f", "ca", "at"]] * 4
    params = sum(p.numel() for p in model.parameters())
    match = re.fullmatch(r"yolo-ca-n: (\d+) layers, ([\d,]+) parameters, (\d+\.\d) GFLOPs at 320x320", lines[-1])
    assert match, lines[-1]
    assert int(match[1]) == len(model.layers) and match[2] == f"{params:,}"
    assert float(match[3]) == round(count_flops(model, 320), 1)
    spans = [m.span() for m in re.finditer(r"-+", lines[1])]  # column extents from the rule line
    start, end = spans[3]
    table_params = sum(int(line[start:end].replace(",", "")) for line in lines[2:-1])
    assert table_params == params
    assert model.training


def test_layer_table_shows_what_an_override_reached() -> None:
    text = model_info(build_model(CONFIGS / "yolo-ca-n.yaml", nc=3, attention="cbam", attention_at="concat"), imgsz=64)
    assert len(re.findall(r"CA_C2f +cbam at concat", text)) == 4

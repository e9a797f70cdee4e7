"""The builder: every bundled config builds and runs; YOLOv5 parity; attention swaps; overrides; scales."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import pytest
import torch

import yaml

from detector.errors import DetectorError
from detector.models.attention import ATTENTIONS, CBAM, MHSA, SE, CoordAtt, NoAttention
from detector.models.blocks import C2f, Conv
from detector.models.builder import build_model, make_divisible
from detector.models.detection_model import DetectionModel, inference_copy, refresh_inference_copy
from detector.models.info import count_flops
from detector.models.registry import MODULES
from repo_paths import REPO_ROOT

CONFIGS = REPO_ROOT / "configs" / "models"
CONFIG_NAMES = sorted(p.stem for p in CONFIGS.glob("*.yaml"))


@functools.cache
def built(name: str, **overrides) -> DetectionModel:
    return build_model(CONFIGS / f"{name}.yaml", **overrides)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def kinds(model: torch.nn.Module) -> set[type]:
    return {type(m) for m in model.modules()}


def test_bundled_configs_exist() -> None:
    expected = {"yolov5n", "yolov5s", "yolo-c2f-n", "yolo-c2f-s", "yolo-ca-n", "yolo-ca-s", "yolo-attn-n"}
    assert expected <= set(CONFIG_NAMES)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_runs_train_and_eval(name: str) -> None:
    model = built(name)
    head = model.head
    assert model.stride.tolist() == [32.0 / 2 ** (head.nl - 1 - i) for i in range(head.nl)]  # ... 8, 16, 32
    for h, w in [(128, 128), (160, 96)]:
        x = torch.rand(2, 3, h, w)
        model.train()
        maps = model(x)
        assert len(maps) == head.nl
        for m, s in zip(maps, model.stride.tolist()):
            assert m.shape == (2, head.na, int(h / s), int(w / s), head.no)  # 5 + nc, or 4 + nc without objectness
        model.eval()
        with torch.no_grad():
            out = model(x)
        n = sum(head.na * int(h / s) * int(w / s) for s in model.stride.tolist())
        assert out.shape == (2, n, 5 + model.nc) and out.dtype == torch.float32
    model.train()


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_parameter_is_used(name: str) -> None:
    """DDP requires every parameter to take part in the forward pass."""
    model = built(name)
    model.train()
    model.zero_grad()
    sum((m * torch.randn_like(m)).sum() for m in model(torch.rand(2, 3, 64, 64))).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize(("name", "params", "gflops"), [("yolov5n", 1_872_157, 4.5), ("yolov5s", 7_235_389, 16.4)])
def test_yolov5_parity(name: str, params: int, gflops: float) -> None:
    model = built(name)
    assert n_params(model) == pytest.approx(params, rel=0.02)
    assert count_flops(model, 640) == pytest.approx(gflops, rel=0.02)
    assert model.training  # count_flops restores the mode


def test_yolov5_scaling_rules() -> None:
    info = built("yolov5n").layer_info
    assert [li.repeats for li in info[:10]] == [1, 1, 1, 1, 2, 1, 3, 1, 1, 1]  # 3, 6, 9, 3 * 0.33
    assert info[0].args == [3, 16, 6, 2, 2]  # 64 * 0.25
    assert make_divisible(64 * 0.33, 8) == 24


def test_attention_override_swaps_every_attn_block() -> None:
    default = built("yolo-attn-n")
    assert CoordAtt in kinds(default) and CBAM not in kinds(default)
    assert n_params(default) == n_params(built("yolo-ca-n-p3-p5"))  # same architecture with `attention: ca`
    swapped = built("yolo-attn-n", attention="cbam")
    assert CBAM in kinds(swapped) and CoordAtt not in kinds(swapped)
    assert n_params(swapped) != n_params(default)
    assert swapped.yaml["attention"] == "cbam"
    none = built("yolo-attn-n", attention="none")
    assert n_params(none) == n_params(built("yolo-c2f-n"))


def test_attention_override_swaps_ca_c2f_too() -> None:
    """CA_C2f is a C2f carrying an attention whose default is ca: the override reaches it (it used to train CA
    while the run recorded the override)."""
    default = built("yolo-ca-n-p3-p5")
    assert default.yaml["attention"] == "ca" and default.yaml["attention_at"] == "output"  # recorded as built
    assert built("yolo-ca-n").yaml["attention"] == "ca"
    swapped = built("yolo-ca-n-p3-p5", attention="cbam")
    assert CBAM in kinds(swapped) and CoordAtt not in kinds(swapped)
    assert n_params(swapped) == n_params(built("yolo-attn-n", attention="cbam"))
    assert swapped.attentions == {f"backbone[{i}]": "cbam at output" for i in (2, 4, 6, 8)}
    assert build_model(swapped.yaml).attentions == swapped.attentions  # a checkpoint's model_yaml rebuilds it
    assert n_params(built("yolo-ca-n-p3-p5", attention="none")) == n_params(built("yolo-c2f-n"))


def test_standalone_attention_rows_keep_their_kind() -> None:
    spec = tiny("yolo-c2f-n")
    spec["head"][-1:] = [[-1, 1, "SE", []], [-1, 1, "Attn", []], [[15, 18, 23], 1, "Detect", ["nc", "anchors"]]]
    model = build_model(spec, attention="eca")
    assert model.attentions == {"head[12]": "se", "head[13]": "eca"}


def tiny(name: str) -> dict:
    """A bundled config at 1/8 width (8 to 128 channels), so building it for every attention stays fast."""
    spec = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    return {**spec, "name": name, "width_multiple": 0.125}


def takes_attention(spec: dict) -> bool:
    return any(MODULES.get(row[2]).attention for row in spec["backbone"] + spec["head"])


@pytest.mark.parametrize("attention", ATTENTIONS.names())
@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_builds_the_asked_attention(name: str, attention: str) -> None:
    """Every attention module of the built model is the asked kind, or the override is refused."""
    spec = tiny(name)
    if not takes_attention(spec):
        with pytest.raises(DetectorError, match=f"^{name}: attention: the override '{attention}' reaches no row "
                                                r"\(Attn, AttnC2f and CA_C2f rows take the attention key"):
            build_model(spec, attention=attention)
        return
    model = build_model(spec, attention=attention)
    registered = {ATTENTIONS.get(n) for n in ATTENTIONS.names()}
    assert {type(m) for m in model.modules()} & registered <= {ATTENTIONS.get(attention), NoAttention}
    assert model.attentions and set(model.attentions.values()) == {f"{attention} at output"}
    for li, layer in zip(model.layer_info, model.layers):
        if li.attention:
            assert isinstance(layer.attn_output, ATTENTIONS.get(attention)), li.row


def test_attention_at_variants_differ() -> None:
    counts = {}
    for place in ("output", "concat", "bottleneck"):
        model = built("yolo-ca-n", attention_at=place)
        block = model.layers[4]
        assert isinstance(block, C2f)
        assert isinstance(block.attn_output, CoordAtt if place == "output" else NoAttention)
        assert isinstance(block.attn_concat, CoordAtt if place == "concat" else NoAttention)
        assert all(isinstance(b.attn, CoordAtt if place == "bottleneck" else NoAttention) for b in block.m)
        counts[place] = n_params(model)
    assert len(set(counts.values())) == 3


def test_row_keyword_and_override_precedence(tmp_path: Path) -> None:
    text = (CONFIGS / "yolo-attn-n.yaml").read_text()
    keywords = "{attention_at: concat, attention: se}"
    text = text.replace("[-1, 6, AttnC2f, [256, True]]", f"[-1, 6, AttnC2f, [256, True, {keywords}]]")
    path = tmp_path / "kw.yaml"
    path.write_text(text)
    model = build_model(path)
    assert isinstance(model.layers[4].attn_concat, SE)
    assert isinstance(model.layers[6].attn_output, CoordAtt)
    forced = build_model(path, attention="cbam", attention_at="output")
    assert isinstance(forced.layers[4].attn_output, CBAM) and isinstance(forced.layers[4].attn_concat, NoAttention)
    rebuilt = build_model(forced.yaml)
    assert n_params(rebuilt) == n_params(forced)


def test_rebuild_from_yaml_matches() -> None:
    model = built("yolo-attn-n", attention="eca", nc=3)
    again = build_model(model.yaml)
    assert again.nc == 3 and model.yaml["nc"] == 3
    ref = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in again.state_dict().items()} == ref
    again.load_state_dict(model.state_dict())


def test_nc_override_changes_head() -> None:
    model = built("yolov5n", nc=3)  # the YOLOv5 head: one 1x1 conv per level, 5 + nc per anchor
    assert model.nc == 3 and model.head.no == 8
    assert model.head.m[0].out_channels == 3 * 8
    decoupled = built("yolo-c2f-n", nc=3)  # box branch 4 per anchor, class branch nc per anchor
    assert decoupled.nc == 3 and decoupled.head.no == 7
    assert decoupled.head.m[0][-1].out_channels == 3 * 4 and decoupled.head.cls[0][-1].out_channels == 3 * 3


def test_scales_table(tmp_path: Path) -> None:
    text = (CONFIGS / "yolo-c2f-n.yaml").read_text()
    text = text.replace("depth_multiple: 0.33", "scales: {n: [0.33, 0.25, 1024], s: [0.33, 0.5, 1024]}")
    text = text.replace("width_multiple: 0.25", "")
    (tmp_path / "mine-s.yaml").write_text(text)  # scale guessed from the name's last letter
    model = build_model(tmp_path / "mine-s.yaml")
    assert model.yaml["scale"] == "s"
    assert n_params(model) == n_params(built("yolo-c2f-s"))
    (tmp_path / "other.yaml").write_text(text + "scale: n\n")
    assert n_params(build_model(tmp_path / "other.yaml")) == n_params(built("yolo-c2f-n"))


def test_anchor_count_gives_placeholders(tmp_path: Path) -> None:
    text = (CONFIGS / "yolo-c2f-n.yaml").read_text().split("anchors:")[0] + "anchors: 3\n"
    text += "backbone:" + (CONFIGS / "yolo-c2f-n.yaml").read_text().split("backbone:")[1]
    (tmp_path / "a.yaml").write_text(text)
    head = build_model(tmp_path / "a.yaml").head
    assert head.na == 3
    px = head.anchors_px
    assert px.shape == (3, 3, 2) and (px[1:, 0, 0] > px[:-1, 0, 0]).all()  # larger at coarser levels
    assert px.min() > 8 and px.max() < 640


def test_activation_key(tmp_path: Path) -> None:
    text = "activation: nn.LeakyReLU(0.1)\n" + (CONFIGS / "yolov5n.yaml").read_text()
    (tmp_path / "act.yaml").write_text(text)
    convs = [m for m in build_model(tmp_path / "act.yaml").modules() if isinstance(m, Conv)]
    assert all(isinstance(c.act, torch.nn.LeakyReLU) and c.act.negative_slope == 0.1 for c in convs)


def test_standalone_attention_rows(tmp_path: Path) -> None:
    text = (CONFIGS / "yolo-c2f-n.yaml").read_text()
    text = text.replace("  - [-1, 1, SPPF, [1024, 5]]       # 9", "  - [-1, 1, SPPF, [1024, 5]]\n  - [-1, 1, Attn, []]")
    text = text.replace("[[-1, 9], 1, Concat, [1]]", "[[-1, 10], 1, Concat, [1]]")
    text = text.replace("[[-1, 12]", "[[-1, 13]").replace("[[15, 18, 21]", "[[16, 19, 22]")
    (tmp_path / "attn.yaml").write_text("attention: se\n" + text)
    model = build_model(tmp_path / "attn.yaml")
    assert isinstance(model.layers[10], SE)
    assert isinstance(build_model(tmp_path / "attn.yaml", attention="mhsa").layers[10], MHSA)
    model.eval()
    assert model(torch.rand(1, 3, 64, 64)).shape[-1] == 85


def test_fuse_keeps_eval_output() -> None:
    model = build_model(CONFIGS / "yolo-ca-n.yaml")
    with torch.no_grad():
        model(torch.rand(2, 3, 64, 64))  # train-mode pass: non-trivial BN statistics
    model.eval()
    x = torch.rand(1, 3, 96, 64)
    with torch.no_grad():
        expected = model(x)
        fused = model.fuse()
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.layers[0].modules())
        assert torch.allclose(fused(x), expected, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("name", ["yolo-ca-n", "yolov5n"])
def test_inference_copy_folds_every_conv_bn_keeps_the_outputs_and_leaves_the_model_alone(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(CONFIGS / f"{name}.yaml", nc=3).train()
    with torch.no_grad():  # running statistics away from their (0, 1) start, so folding has something to fold
        for _ in range(3):
            model(torch.rand(4, 3, 96, 96) * 2 + 0.5)
    model.eval()
    convs = [m for m in model.modules() if isinstance(m, Conv)]
    fused = inference_copy(model)
    fused_convs = [m for m in fused.modules() if isinstance(m, Conv)]
    assert fused is not model and len(fused_convs) == len(convs)
    assert all(isinstance(m.bn, torch.nn.BatchNorm2d) for m in convs)  # the model keeps its BNs
    assert all(isinstance(m.bn, torch.nn.Identity) and m.conv.bias is not None for m in fused_convs)
    assert all(m.conv.weight.is_contiguous(memory_format=torch.channels_last) for m in fused_convs)
    assert not fused.training
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        expected = model(x)
        got = fused(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["yolo-ca-n", "yolov5n"])
def test_a_refreshed_inference_copy_holds_what_a_new_copy_would(name: str) -> None:
    """After the model trains on (weights and BN statistics move), refreshing its old copy gives a new copy's numbers
    bit for bit; a copy of another model is refused and left as it was."""
    torch.manual_seed(0)
    model = build_model(CONFIGS / f"{name}.yaml", nc=3).train()
    copy = inference_copy(model)
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(4, 3, 96, 96) * 2 + 0.5)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    assert refresh_inference_copy(copy, model)
    expected = inference_copy(model).state_dict()
    got = copy.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())
    other = inference_copy(build_model(CONFIGS / ("yolov5n.yaml" if name == "yolo-ca-n" else "yolo-ca-n.yaml"), nc=3))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    assert not refresh_inference_copy(other, model)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())


def test_inference_copy_passes_other_modules_through() -> None:
    other = torch.nn.Conv2d(3, 4, 3)
    assert inference_copy(other) is other


YOLOV8N = """\
# the public Ultralytics yolov8.yaml rows: anchor-free, `Detect, [nc]`
nc: 80
scales:
  n: [0.33, 0.25, 1024]
backbone:
  - [-1, 1, Conv, [64, 3, 2]]
  - [-1, 1, Conv, [128, 3, 2]]
  - [-1, 3, C2f, [128, True]]
  - [-1, 1, Conv, [256, 3, 2]]
  - [-1, 6, C2f, [256, True]]
  - [-1, 1, Conv, [512, 3, 2]]
  - [-1, 6, C2f, [512, True]]
  - [-1, 1, Conv, [1024, 3, 2]]
  - [-1, 3, C2f, [1024, True]]
  - [-1, 1, SPPF, [1024, 5]]
head:
  - [-1, 1, nn.Upsample, [None, 2, "nearest"]]
  - [[-1, 6], 1, Concat, [1]]
  - [-1, 3, C2f, [512]]
  - [-1, 1, nn.Upsample, [None, 2, "nearest"]]
  - [[-1, 4], 1, Concat, [1]]
  - [-1, 3, C2f, [256]]
  - [-1, 1, Conv, [256, 3, 2]]
  - [[-1, 12], 1, Concat, [1]]
  - [-1, 3, C2f, [512]]
  - [-1, 1, Conv, [512, 3, 2]]
  - [[-1, 9], 1, Concat, [1]]
  - [-1, 3, C2f, [1024]]
  - [[15, 18, 21], 1, Detect, [nc]]
"""


def test_anchor_free_ultralytics_yaml_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "yolov8n.yaml"
    path.write_text(YOLOV8N)
    with caplog.at_level(logging.WARNING, logger="detector.models.builder"):
        model = build_model(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"{path}: head[12]: Detect has no anchors: the head is this project's anchor-based one, "
                        "with 3 anchors per level fitted by auto-anchor at train time"]
    assert model.head.na == 3 and n_params(model) == n_params(built("yolo-ca-n-v5head", attention="none"))  # same layers
    assert model.yaml["anchors"] == 3  # an anchor count: the trainer fits them (see Trainer's autoanchor force)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="detector.models.builder"):
        again = build_model(model.yaml)  # a checkpoint's rebuild: the anchors are in the row now, no warning
    assert not caplog.records and n_params(again) == n_params(model)
    with caplog.at_level(logging.WARNING, logger="detector.models.builder"):
        build_model(CONFIGS / "yolo-c2f-n.yaml")
        build_model(CONFIGS / "yolov5n.yaml")
    assert not caplog.records  # anchors given: nothing to say


def test_file_attention_key_that_reaches_no_row_warns_and_is_dropped(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A file's `attention: se` over plain C2f rows built no attention, silently, and model.yaml recorded se."""
    text = (CONFIGS / "yolo-c2f-n.yaml").read_text().replace("nc: 80", "nc: 80\nattention: se", 1)
    path = tmp_path / "c2f.yaml"
    path.write_text(text)
    with caplog.at_level(logging.WARNING, logger="detector.models.builder"):
        model = build_model(path)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if t.startswith("attention: se"))
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}:{line}: attention: 'se' reaches no row (Attn, AttnC2f and CA_C2f rows take the attention key; "
        "c2f.yaml has none): ignored"]
    assert "attention" not in model.yaml and not model.attentions


@pytest.mark.parametrize("detect_args", [["nc", 3], ["nc"]])
def test_placeholder_anchors_ask_for_a_fit(detect_args: list) -> None:
    """Placeholder anchors (an anchor count) are fitted at train time only when model.yaml's top-level `anchors`
    is that count: `Detect, [nc, 3]`, or `Detect, [nc]` beside a top-level list it does not use, left them out."""
    spec = tiny("yolov5n")
    spec["head"][-1] = [[17, 20, 23], 1, "Detect", detect_args]
    if detect_args == ["nc", 3]:
        del spec["anchors"]
    model = build_model(spec)
    assert model.yaml["anchors"] == 3 and model.head.na == 3
    assert build_model(model.yaml).yaml["anchors"] == 3


def tiny_config(rows: list, **top) -> dict:
    """A model dict: `rows` as the backbone, then a stride-8 Conv and a one-anchor Detect on it."""
    tail = [[-1, 1, "Conv", [32, 3, 4]], [[-1], 1, "Detect", ["nc", "anchors"]]]
    return {"nc": 2, "anchors": 1, **top, "backbone": [[-1, 1, "Conv", [16, 3, 2]], *rows], "head": tail}


def test_make_divisible_is_the_smallest_multiple_at_or_above() -> None:
    assert [make_divisible(x, 8) for x in (8, 8.5, 16, 17, 21.12)] == [8, 16, 16, 24, 24]


def test_depth_multiple_rounds_to_the_nearest_repeat_count() -> None:
    """depth 0.67 (the m scale): 3, 6, 9 repeats -> round(2.01, 4.02, 6.03) = 2, 4, 6; one repeat stays one."""
    rows = [[-1, n, "C3", [16]] for n in (3, 6, 9, 1)]
    model = build_model(tiny_config(rows, depth_multiple=0.67))
    assert [li.repeats for li in model.layer_info[1:5]] == [2, 4, 6, 1]


def test_width_defaults_to_one_and_the_divisor_to_eight() -> None:
    assert build_model(tiny_config([])).layers[0].conv.out_channels == 16  # no width_multiple: as written
    narrow = build_model(tiny_config([[-1, 1, "Conv", [40, 3, 1]]], width_multiple=0.25))
    assert narrow.layers[1].conv.out_channels == 16  # 40 x 0.25 = 10, up to a multiple of 8


def test_scales_cap_the_channels_before_the_width_and_take_two_numbers() -> None:
    capped = build_model(tiny_config([[-1, 1, "Conv", [64, 3, 1]]], scales={"s": [1.0, 1.0, 32]}, scale="s"))
    assert capped.layers[1].conv.out_channels == 32  # min(64, 32) x 1.0
    two = build_model(tiny_config([[-1, 1, "Conv", [64, 3, 1]]], scales={"n": [1.0, 0.5]}, scale="n"))
    assert two.layers[1].conv.out_channels == 32  # [depth, width]: no cap, 64 x 0.5


def test_from_zero_is_row_zero_and_a_non_repeating_module_is_stacked() -> None:
    rows = [[-1, 2, "Conv", [16, 3, 1]], [[-1, 0], 1, "Concat", [1]]]
    model = build_model(tiny_config(rows))
    assert model.sources[2] == [1, 0]
    stacked = model.layers[1]
    assert isinstance(stacked, torch.nn.Sequential) and [type(m) for m in stacked] == [Conv, Conv]
    assert model.layers[3].conv.in_channels == 32  # the concat of rows 1 and 0, 16 + 16


def test_ch_sets_the_input_channels() -> None:
    model = build_model(tiny_config([], ch=1)).eval()
    assert model.layers[0].conv.in_channels == 1
    assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 8 * 8, 7)

"""Bad model YAMLs: each a one-line DetectorError naming the file and the row or key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from detector.errors import DetectorError
from detector.models.attention import ATTENTIONS
from detector.models.builder import build_model
from detector.models.registry import MODULES
from repo_paths import REPO_ROOT

BASE = (REPO_ROOT / "configs" / "models" / "yolov5n.yaml").read_text()


def fails(tmp_path: Path, text: str, **overrides) -> str:
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(DetectorError) as info:
        build_model(path, **overrides)
    message = str(info.value)
    assert "\n" not in message
    located = re.match(rf"{re.escape(str(path))}(?::\d+)?: (.*)", message)
    assert located, message
    return located.group(1)


def test_row_and_key_errors_name_the_line(tmp_path: Path) -> None:
    """'x.yaml:23: backbone[2]: ...': the line of the row (or key) in the file, so an editor jumps to it."""
    path = tmp_path / "x.yaml"
    row = "[-1, 3, C3, [128]]"
    path.write_text(BASE.replace(row, "[-1, 3, C3F, [128]]"))
    line = next(i for i, text in enumerate(BASE.splitlines(), 1) if row in text)
    with pytest.raises(DetectorError, match=rf"^{re.escape(str(path))}:{line}: backbone\[2\]: unknown module 'C3F'"):
        build_model(path)
    path.write_text(BASE.replace("depth_multiple:", "depth_multiplier:"))
    line = next(i for i, text in enumerate(BASE.splitlines(), 1) if text.startswith("depth_multiple:"))
    with pytest.raises(DetectorError, match=rf"^{re.escape(str(path))}:{line}: unknown key 'depth_multiplier'"):
        build_model(path)


def test_unknown_module_suggests_and_lists_the_valid_names(tmp_path: Path) -> None:
    valid = "; valid: " + ", ".join(MODULES.names())
    text = BASE.replace("[-1, 3, C3, [128]]", "[-1, 3, C3F, [128]]")
    assert fails(tmp_path, text) == "backbone[2]: unknown module 'C3F' (did you mean 'C3'?)" + valid
    text = BASE.replace("[-1, 3, C3, [128]]", "[-1, 3, C2F, [128]]")
    assert fails(tmp_path, text) == "backbone[2]: unknown module 'C2F' (did you mean 'C2f'?)" + valid
    assert all(name in valid for name in ("Conv", "C2f", "CA_C2f", "SPPF", "DecoupledDetect"))


def test_from_points_forward(tmp_path: Path) -> None:
    text = BASE.replace("[[-1, 6], 1, Concat, [1]]", "[[-1, 25], 1, Concat, [1]]")
    assert fails(tmp_path, text).startswith("head[2]: 'from' index 25 points forward/out of range")
    text = BASE.replace("[[-1, 6], 1, Concat, [1]]", "[[-1, -40], 1, Concat, [1]]")
    assert fails(tmp_path, text).startswith("head[2]: 'from' index -40 points forward/out of range")


def test_wrong_arg_count(tmp_path: Path) -> None:
    text = BASE.replace("[-1, 1, Conv, [128, 3, 2]]", "[-1, 1, Conv, [128, 3, 2, 1, 1, 1, 1, 1]]")
    message = fails(tmp_path, text)
    assert message.startswith("backbone[1]: Conv [128, 3, 2, 1, 1, 1, 1, 1]: too many positional arguments")
    assert "args are [c_out, k=1, s=1, p=None, g=1, d=1, act=True]" in message
    text = BASE.replace("[-1, 1, SPPF, [1024, 5]]", "[-1, 1, SPPF, []]")
    assert fails(tmp_path, text).startswith("backbone[9]: SPPF: args[0] must be the output channel count")


def test_missing_backbone(tmp_path: Path) -> None:
    assert fails(tmp_path, "nc: 80\nhead: []\n") == "missing 'backbone' (a list of [from, repeats, module, args] rows)"


def test_non_list_row(tmp_path: Path) -> None:
    text = BASE.replace("  - [-1, 1, Conv, [128, 3, 2]]     # 1 P2/4", "  - Conv")
    assert fails(tmp_path, text) == "backbone[1]: a row is [from, repeats, module, args], got 'Conv'"
    text = BASE.replace("[-1, 1, Conv, [128, 3, 2]]", "[-1, 1, Conv]")
    assert fails(tmp_path, text).startswith("backbone[1]: a row is [from, repeats, module, args]")


def test_anchors_odd_length(tmp_path: Path) -> None:
    text = BASE.replace("[30,61, 62,45, 59,119]", "[30,61, 62,45, 59]")
    assert fails(tmp_path, text).startswith("head[14]: Detect: anchors[1]: expected an even-length list")


def test_anchor_levels_must_match_inputs(tmp_path: Path) -> None:
    text = BASE.replace("[[17, 20, 23], 1, Detect", "[[17, 20], 1, Detect")
    assert fails(tmp_path, text).startswith("head[14]: Detect: anchors: expected 2 lists")


def test_unknown_top_level_key(tmp_path: Path) -> None:
    text = BASE.replace("depth_multiple:", "depth_multiplier:")
    assert fails(tmp_path, text) == "unknown key 'depth_multiplier' (did you mean 'depth_multiple'?)"


def test_unknown_attention_override(tmp_path: Path) -> None:
    assert fails(tmp_path, BASE, attention="cbma") == ("attention: unknown attention 'cbma' (did you mean 'cbam'?); "
                                                       f"valid: {', '.join(ATTENTIONS.names())}")
    assert fails(tmp_path, BASE, attention_at="inside").startswith("attention_at: 'inside' is not one of output")


def test_shape_mismatch_found_at_build(tmp_path: Path) -> None:
    text = BASE.replace("  - [-1, 1, nn.Upsample, [None, 2, 'nearest']]\n  - [[-1, 6]", "  - [[-1, 6]", 1)
    text = text.replace("[[-1, 4], 1, Concat", "[[-1, 3], 1, Concat").replace("[-1, 14]", "[-1, 13]")
    text = text.replace("[[17, 20, 23]", "[[16, 19, 22]")
    message = fails(tmp_path, text)
    assert message.startswith("head[1]: Concat (layer 11, from [-1, 6]) fails on its inputs in a dry run at 256x256")


def test_last_row_must_be_detect(tmp_path: Path) -> None:
    text = BASE.split("  - [[17, 20, 23]")[0]
    assert fails(tmp_path, text) == "head[13]: the last row must be the Detect head, got C3"


def test_invalid_yaml(tmp_path: Path) -> None:
    # the one YAML reader's form, as for train and dataset YAMLs: <file>:<line>: invalid YAML: <problem>
    path = tmp_path / "x.yaml"
    path.write_text("nc: 80\nbackbone: [[-1, 1, Conv\n")
    with pytest.raises(DetectorError, match=rf"^{re.escape(str(path))}:3: invalid YAML: "):
        build_model(path)


def test_bad_repeats_and_upsample_size(tmp_path: Path) -> None:
    assert fails(tmp_path, BASE.replace("[-1, 3, C3, [128]]", "[-1, 0, C3, [128]]")).startswith(
        "backbone[2]: repeats must be a positive int")
    text = BASE.replace("[-1, 1, nn.Upsample, [None, 2, 'nearest']]", "[-1, 1, nn.Upsample, [40, None, 'nearest']]", 1)
    assert fails(tmp_path, text).startswith("head[1]: nn.Upsample: nn.Upsample with a fixed size 40 is not supported")


def test_bad_row_keyword(tmp_path: Path) -> None:
    text = BASE.replace("[-1, 3, C3, [128]]", "[-1, 3, C3, [128, {attention_at: concat}]]")
    assert "unexpected keyword argument 'attention_at'" in fails(tmp_path, text)


@pytest.mark.parametrize(("row", "message"), [
    ("[-1, 3, AttnC2f, [128, True, {atention: cbam}]]",
     "backbone[2]: AttnC2f: unknown keyword 'atention' (did you mean 'attention'?); "
     "args are [c_out, shortcut=False, g=1, e=0.5] + keywords {attention, attention_at}"),
    ("[-1, 3, C2f, [128, {shortcutt: true}]]",
     "backbone[2]: C2f: unknown keyword 'shortcutt' (did you mean 'shortcut'?); args are [c_out, shortcut=False, g=1, e=0.5]"),
])
def test_a_misspelt_row_keyword_is_named_with_a_suggestion_and_the_keywords_the_row_takes(tmp_path: Path, row: str,
                                                                                         message: str) -> None:
    assert fails(tmp_path, BASE.replace("[-1, 3, C3, [128]]", row)) == message


def test_missing_file() -> None:
    with pytest.raises(DetectorError, match=r"^model: 'configs/models/does-not-exist\.yaml' not found; known: .*yolo-ca-n"):
        build_model("configs/models/does-not-exist.yaml")


def test_override_that_reaches_no_row(tmp_path: Path) -> None:
    assert fails(tmp_path, BASE, attention="cbam") == ("attention: the override 'cbam' reaches no row (Attn, AttnC2f "
                                                       "and CA_C2f rows take the attention key; x.yaml has none)")
    assert fails(tmp_path, BASE, attention="none").startswith("attention: the override 'none' reaches no row")
    assert fails(tmp_path, BASE, attention_at="concat") == ("attention_at: the override 'concat' reaches no row "
                                                            "(AttnC2f and CA_C2f rows take the attention_at key; "
                                                            "x.yaml has none)")


@pytest.mark.parametrize("module", ["C3k2", "C2PSA"])
def test_newer_ultralytics_modules_are_unknown(tmp_path: Path, module: str) -> None:
    """YOLO11's blocks are not in the registry: the build stops on the row instead of guessing."""
    text = BASE.replace("[-1, 3, C3, [128]]", f"[-1, 2, {module}, [256, False, 0.25]]")
    assert fails(tmp_path, text).startswith(f"backbone[2]: unknown module '{module}'")


def test_plain_c2f_refuses_attention_keywords(tmp_path: Path) -> None:
    """A plain C2f has the attention parameters, but its rows are neither swapped by an override nor recorded in
    `model.attentions`: a keyword there built CBAM while the run said no attention."""
    text = (REPO_ROOT / "configs" / "models" / "yolo-c2f-n.yaml").read_text()
    text = text.replace("[-1, 3, C2f, [128, True]]", "[-1, 3, C2f, [128, True, {attention: cbam}]]")
    assert fails(tmp_path, text) == ("backbone[2]: C2f: unexpected keyword argument 'attention' (Attn, AttnC2f and "
                                     "CA_C2f rows take it)")


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_value_and_dry_run_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    for text, needle, message in [
        (BASE.replace("nc: 80", "nc: -3"), "nc: -3", "nc: expected a positive number, got -3"),
        (BASE.replace("depth_multiple:", "scale: n\ndepth_multiple:"), "scale: n",
         "scale: given without a 'scales:' table to pick from"),
        (BASE.replace("nc: 80", "nc: 80\nattention_at: inside"), "attention_at:",
         "attention_at: 'inside' is not one of output, concat, bottleneck"),
        (BASE.replace("[[-1, 4], 1, Concat", "[[-1, 2], 1, Concat"), "[[-1, 2], 1, Concat",
         "head[6]: Concat (layer 16, from [-1, 2]) fails on its inputs in a dry run at 256x256: "),
        (BASE.replace("[-1, 1, Conv, [512, 1, 1]]", "[8, 1, Conv, [512, 1, 1]]"), "[-1, 1, SPPF, [1024, 5]]",
         "backbone[9]: the output of SPPF (layer 9) is never used"),
    ]:
        path.write_text(text)
        with pytest.raises(DetectorError, match=rf"^{re.escape(f'{path}:{line_of(text, needle)}: {message}')}"):
            build_model(path)
    path.write_text(BASE.replace("nc: 80", "nc: 80\nattention: se"))  # an override's bad value is not on that line
    with pytest.raises(DetectorError, match=rf"^{re.escape(str(path))}: attention: unknown attention 'cbma'"):
        build_model(path, attention="cbma")


def test_concat_on_another_dim_than_the_channels_is_refused(tmp_path: Path) -> None:
    """The next row is given the sum of the inputs' channels: a Concat along another dim would break that count."""
    message = fails(tmp_path, BASE.replace("[[-1, 6], 1, Concat, [1]]", "[[-1, 6], 1, Concat, [2]]"))
    assert message.startswith("head[2]: Concat: dim must be 1 (the channels, whose counts add up), got 2"), message


@pytest.mark.parametrize(("scale", "expected"), [
    ("1000", "scale_factor must be a number in (0, 32], got 1000"),
    ("0", "scale_factor must be a number in (0, 32], got 0"),
    ("'2'", "'scale_factor' must be a finite number, got '2'; args are [scale_factor=2, mode='nearest']")])
def test_an_upsample_scale_out_of_range_is_refused_before_the_dry_run(tmp_path: Path, scale: str, expected: str) -> None:
    """A 1000x Upsample of the stride-32 map would allocate gigabytes in the builder's dry run."""
    message = fails(tmp_path, BASE.replace("[-1, 1, nn.Upsample, [None, 2, 'nearest']]", f"[-1, 1, nn.Upsample, [None, {scale}, 'nearest']]", 1))
    assert message == f"head[1]: nn.Upsample: {expected}"


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("depth_multiple: 0.33", "depth_multiple: .nan", "depth_multiple: expected a positive number, got nan"),
    ("width_multiple: 0.25", "width_multiple: .inf", "width_multiple: expected a positive number, got inf"),
    ("[-1, 3, C3, [128]]", "[-1, 3, C3, [128, 'no']]",
     "backbone[2]: C3: 'shortcut' must be true or false, got 'no'; args are [c_out, shortcut=True, g=1, e=0.5]"),
    ("[-1, 3, C3, [128]]", "[-1, 3, C3, [128, True, 1, .inf]]", "backbone[2]: C3: 'e' must be a finite number, got inf"),
    ("[-1, 1, Conv, [128, 3, 2]]", "[-1, 1, Conv, [128, 3.5, 2]]", "backbone[1]: Conv: 'k' must be an integer, got 3.5"),
    ("[-1, 1, Conv, [128, 3, 2]]", "[-1, 1, Conv, [128, -3, 2]]",
     "backbone[1]: Conv [128, -3, 2]: Trying to create tensor with negative dimension -3"),
    ("[-1, 3, C3, [128]]", "[-1, 3, C3, [128]]\n  - [-1, 1, SE, [0]]",
     "backbone[3]: SE: reduction and min_mid must be >= 1, got 0 and 8"),
    ("[-1, 3, C3, [128]]", "[-1, 3, C3, [128]]\n  - [-1, 1, SE, [-4]]",
     "backbone[3]: SE: reduction and min_mid must be >= 1, got -4 and 8"),  # built an 8-wide SE before
    ("[-1, 3, C3, [128]]", "[-1, 3, C3, [128]]\n  - [-1, 1, MHSA, [-2]]", "backbone[3]: MHSA: heads must be >= 1, got -2"),
    ("[-1, 3, C3, [128]]", "[-1, 3, C3, [128, True, 1, 10000.0]]",
     "backbone[2]: the model would have"),  # sized on meta first: once a 3.7 TB allocation
    ("nc: 80", "nc: 80\nactivation: nn.ReLU(5)",
     "activation: only LeakyReLU takes an argument (its finite negative slope), got 'nn.ReLU(5)'"),
    ("nc: 80", "nc: 80\nactivation: nn.LeakyReLU(1e999)", "activation: only LeakyReLU takes an argument"),
    ("[30,61, 62,45, 59,119]", "[30,61, 62,45, 59,.inf]", "anchors[1]: anchor sizes must be positive finite numbers"),
], ids=["depth nan", "width inf", "bool as a word", "e inf", "k float", "k negative", "reduction 0", "reduction < 0",
        "heads < 0", "e huge",
        "relu arg", "slope inf", "anchor inf"])
def test_a_bad_value_in_a_row_or_key_is_one_line_not_a_traceback_or_a_silent_model(tmp_path: Path, old: str, new: str,
                                                                                   expected: str) -> None:
    """Values the type checks let through reached torch (negative dimensions, 0 divisions, a 3.7 TB allocation),
    or built a model silently other than written (the word 'no' as a truthy shortcut, ReLU(5) as inplace=5)."""
    assert old in BASE
    assert expected in fails(tmp_path, BASE.replace(old, new, 1))

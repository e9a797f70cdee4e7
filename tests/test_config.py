"""Config loading: YAML safety, typed overrides, errors that name the file, line and key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from detector.config import TrainConfig, load_train_config, load_yaml, parse_overrides
from detector.data.spec import load_data_spec
from detector.errors import DetectorError
from detector.models.catalog import resolve_model_path
from repo_paths import REPO_ROOT


def test_overrides_are_typed_by_the_default():
    cfg = load_train_config(parse_overrides(["epochs=7", "lr0=0.02", "cos_lr=false", "optimizer=AdamW", "model.attention=cbam"]))
    assert (cfg.epochs, cfg.lr0, cfg.cos_lr, cfg.optimizer, cfg.attention) == (7, 0.02, False, "AdamW", "cbam")


def test_a_key_given_twice_is_an_error():
    """The last value won without a word, and a dotted key could silently override its plain twin."""
    with pytest.raises(DetectorError, match=r"^command line: 'epochs' is given twice \('epochs=10' and 'epochs=20'\)$"):
        parse_overrides(["epochs=10", "batch=4", "epochs=20"])
    with pytest.raises(DetectorError, match=r"'attention' is given twice \('attention=se' and 'model.attention=cbam'\)"):
        parse_overrides(["attention=se", "model.attention=cbam"])


def test_a_dashed_key_or_an_unknown_section_is_an_error_not_another_key():
    assert parse_overrides(["train.epochs=3", "model.attention=se"]) == {"epochs": "3", "attention": "se"}
    with pytest.raises(DetectorError, match=r"'--epochs=3': keys are written without dashes \(epochs=3\)"):
        parse_overrides(["--epochs=3"])
    with pytest.raises(DetectorError, match=r"'modle\.attention=se': unknown section 'modle' .*did you mean 'model'"):
        parse_overrides(["modle.attention=se"])
    with pytest.raises(DetectorError, match=r"'train\.bogus\.epochs=1': unknown section 'train\.bogus' \(model\. or"):
        parse_overrides(["train.bogus.epochs=1"])  # read as epochs=1 before: only the first section was checked


def test_unknown_key_names_source_and_suggests(tmp_path: Path):
    with pytest.raises(DetectorError, match=r"command line: unknown key 'epohcs' \(did you mean 'epochs'\?\)"):
        load_train_config({"epohcs": "3"})
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text("epochs: 3\nbatch: 4\nlr_0: 0.1\n")
    with pytest.raises(DetectorError, match=r"train.yaml:3: unknown key 'lr_0' \(did you mean 'lr0'\?\)"):
        load_train_config({"cfg": str(cfg_file)})


def test_wrong_type_is_an_error():
    with pytest.raises(DetectorError, match="'epochs' expects an integer"):
        load_train_config({"epochs": "ten"})
    with pytest.raises(DetectorError, match="'cos_lr' expects true or false"):
        load_train_config({"cos_lr": "maybe"})


def test_a_numeric_key_with_a_word_takes_the_number_or_the_word(tmp_path: Path):
    assert load_train_config({"workers": "3"}).workers == 3 and load_train_config({"workers": "auto"}).workers == "auto"
    assert TrainConfig().workers == "auto"
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text("epochs: 3\nworkers: 4\n")
    assert load_train_config({"cfg": str(cfg_file)}).workers == 4  # a YAML int stays an int
    for bad in ("many", "-1", "65", "2.5"):
        with pytest.raises(DetectorError, match=rf"command line: 'workers' must be auto or >= 0 and <= 64, got '{bad}'"):
            load_train_config({"workers": bad})
    cfg_file.write_text("workers: [1]\n")
    with pytest.raises(DetectorError, match="train.yaml:1: 'workers' expects a string"):
        load_train_config({"cfg": str(cfg_file)})


def test_a_list_key_takes_one_number_from_a_file_or_the_api_as_from_the_command_line(tmp_path: Path):
    """`freeze=3` (help: "N (the first N rows)") worked on the command line; `freeze: 3` in a cfg file was refused."""
    from detector.config import build_options

    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text("freeze: 3\n")
    assert load_train_config({"cfg": str(cfg_file)}).freeze == load_train_config({"freeze": "3"}).freeze == [3]
    assert build_options(TrainConfig, {"freeze": 3}, "Detector.train()").freeze == [3]
    with pytest.raises(DetectorError, match="'freeze' expects a list, got True"):
        build_options(TrainConfig, {"freeze": True}, "Detector.train()")


def test_a_list_with_an_empty_or_a_repeated_item_is_refused() -> None:
    """freeze=1,,2 froze rows 1 and 2 (the empty item dropped), freeze=0,0 froze row 0: a value left out or a typo
    changed the run without a word. freeze= (empty) is still the empty list, and a trailing comma is fine."""
    from detector.config import build_options

    with pytest.raises(DetectorError, match=r"^command line: 'freeze' has an empty item in '1,,2'$"):
        build_options(TrainConfig, {"freeze": "1,,2"}, "command line")
    with pytest.raises(DetectorError, match=r"^command line: 'freeze' has an empty item in ',1'$"):
        build_options(TrainConfig, {"freeze": ",1"}, "command line")
    with pytest.raises(DetectorError, match=r"^cfg.yaml:3: 'freeze' lists 0 more than once$"):
        build_options(TrainConfig, {"freeze": [0, 0]}, "cfg.yaml:3")
    assert build_options(TrainConfig, {"freeze": ""}, "command line").freeze == []
    assert build_options(TrainConfig, {"freeze": " 0, 2 "}, "command line").freeze == [0, 2]
    assert build_options(TrainConfig, {"freeze": "0,2,"}, "command line").freeze == [0, 2]


def test_cfg_file_then_command_line(tmp_path: Path):
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text("epochs: 3\nbatch: 4\n")
    cfg = load_train_config({"cfg": str(cfg_file), "batch": "8"})
    assert (cfg.epochs, cfg.batch) == (3, 8)


def test_yaml_code_execution_is_refused(tmp_path: Path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"epochs: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(DetectorError, match="evil.yaml:1: invalid YAML"):
        load_yaml(evil)
    assert not marker.exists()


def test_default_yaml_matches_the_dataclass():
    data = yaml.safe_load((REPO_ROOT / "configs/train/default.yaml").read_text())
    defaults = dataclasses.asdict(TrainConfig())
    assert data == defaults


def test_data_spec_paths_are_relative_to_the_yaml(tmp_path: Path):
    spec_file = tmp_path / "sub" / "d.yaml"
    spec_file.parent.mkdir()
    spec_file.write_text("train: {images: tr/images, annotations: tr/instances.json}\nval: {images: va, annotations: va/i.json}\nnames: [a, b]\ndownload: rm -rf /\n")
    spec = load_data_spec(spec_file)
    assert spec.train.images == (tmp_path / "sub/tr/images").resolve()
    assert spec.val.annotations == (tmp_path / "sub/va/i.json").resolve()
    assert spec.names == ["a", "b"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: {images: a, annotations: b}\n", "missing key 'val'"),
        ("train: {images: a, annotations: b}\nval: {images: a}\n", r"d.yaml:2: 'val' must be"),
        ("train: {images: a, annotations: b}\nval: {images: a, annotations: b}\nvall: 1\n", r"d.yaml:3: unknown key 'vall' \(did you mean 'val'\?\)"),
    ],
)
def test_data_spec_errors(tmp_path: Path, text: str, message: str):
    spec_file = tmp_path / "d.yaml"
    spec_file.write_text(text)
    with pytest.raises(DetectorError, match=message):
        load_data_spec(spec_file)


def test_model_path_by_name_and_suggestion():
    assert resolve_model_path("yolov5n").resolve() == (REPO_ROOT / "configs/models/yolov5n.yaml").resolve()  # the packaged copy
    with pytest.raises(DetectorError, match=r"did you mean 'yolov5s'\?\); known: yolo-attn-n"):
        resolve_model_path("yolov5m")


def test_neutral_keys_are_run_only_and_change_no_result() -> None:
    from detector.config import neutral_keys, run_only_keys

    assert neutral_keys(TrainConfig) == {"workers", "device", "project", "name", "exist_ok", "resume", "compile", "cache",
                                         "save_period", "max_nonfinite", "plots", "worker_priority"}
    assert neutral_keys(TrainConfig) < run_only_keys(TrainConfig)  # a resumed run may change them too
    assert {"epochs", "batch", "time", "patience", "val_interval"} <= run_only_keys(TrainConfig) - neutral_keys(TrainConfig)


def test_cfg_names_the_shipped_default_yaml_outside_a_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """README: `detector train cfg=configs/train/default.yaml`; an installed package has no configs/ folder in the
    user's working directory, so the path falls back to the YAML shipped inside the package (as model= does)."""
    monkeypatch.chdir(tmp_path)
    cfg = load_train_config({"cfg": "configs/train/default.yaml", "epochs": "3"})
    assert cfg == dataclasses.replace(TrainConfig(), epochs=3)
    with pytest.raises(DetectorError, match=r"^configs/train/nope\.yaml: file not found"):
        load_train_config({"cfg": "configs/train/nope.yaml"})
    (tmp_path / "configs" / "train").mkdir(parents=True)  # a file of the user's own at that path comes first
    (tmp_path / "configs" / "train" / "default.yaml").write_text("epochs: 5\n")
    assert load_train_config({"cfg": "configs/train/default.yaml"}).epochs == 5


def test_values_are_coerced_strictly_by_the_field_type():
    """A fraction is no integer, a bool no number; the usual spellings of a switch, a trailing comma in a list,
    dashes in a key and `none` for an optional number read as a user means them."""
    from detector.config import build_options

    for value in (3.5, "3.5"):
        with pytest.raises(DetectorError, match=r"^x\.yaml:2: 'epochs' expects an integer, got "):
            build_options(TrainConfig, {"epochs": value}, "x.yaml:2")
    with pytest.raises(DetectorError, match=r"'epochs' expects a number, got True"):
        build_options(TrainConfig, {"epochs": True}, "x.yaml:2")
    assert build_options(TrainConfig, {"epochs": 4.0}, "x").epochs == 4
    cfg = load_train_config(parse_overrides(["exist-ok=yes", "cos_lr=off", "freeze=0,2,", "box=none"]))
    assert (cfg.exist_ok, cfg.cos_lr, cfg.freeze, cfg.box) == (True, False, [0, 2], None)
    assert load_train_config({"box": "null"}).box is None and load_train_config({"box": "0.1"}).box == 0.1


def test_list_defaults_are_not_shared_between_configs():
    first = TrainConfig()
    first.freeze.append(3)
    assert TrainConfig().freeze == [] and load_train_config({}).freeze == []

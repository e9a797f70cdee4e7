"""Hostile or mistyped YAML and resume arguments: RELIABILITY rows 16, 17, 18 and 27, for every YAML the user
writes (train config, dataset, model), where tests/test_config.py and tests/models cover one of each."""

from __future__ import annotations

from pathlib import Path

import pytest

from detector.config import load_train_config
from detector.data.spec import load_data_spec
from detector.errors import DetectorError
from detector.models.builder import build_model
from detector.train.trainer import Trainer, train
from reliability_helpers import REPO_ROOT
from tiny_run import make_config


MODEL_YAML = (REPO_ROOT / "configs" / "models" / "yolov5n.yaml").read_text()
DATA_YAML = "train: {images: tr, annotations: tr.json}\nval: {images: va, annotations: va.json}\n"


def _refused(load, path: Path, text: str, message: str, marker: Path) -> None:
    path.write_text(text)
    with pytest.raises(DetectorError, match=message) as info:
        load(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["train", "data", "model"])
def test_python_tags_are_refused_and_nothing_runs(tmp_path: Path, kind: str) -> None:
    """Row 16, for the three YAMLs a user hands us."""
    marker = tmp_path / "pwned"
    tag = f"!!python/object/apply:os.system ['touch {marker}']"
    text, load = {
        "train": (f"epochs: {tag}\n", lambda p: load_train_config({"cfg": str(p)})),
        "data": (DATA_YAML + f"names: {tag}\n", load_data_spec),
        "model": (MODEL_YAML.replace("nc: 80", f"nc: {tag}"), build_model),
    }[kind]
    _refused(load, tmp_path / f"{kind}.yaml", text, r"\.yaml(:\d+)?: invalid YAML", marker)


def test_unknown_nested_keys_are_named_with_a_suggestion(tmp_path: Path) -> None:
    """Row 17: nested keys too (dataset splits, train config values that are mappings)."""
    marker = tmp_path / "never"
    text = "train:\n  images: tr\n  annotation: tr.json\nval: {images: va, annotations: va.json}\n"
    _refused(load_data_spec, tmp_path / "d.yaml", text, r"d\.yaml:3: unknown key 'train\.annotation' \(did you mean 'annotations'\?\)", marker)
    text = "epochs: 3\nmodel: {attention: cbam}\n"
    _refused(lambda p: load_train_config({"cfg": str(p)}), tmp_path / "t.yaml", text, r"t\.yaml:2: 'model' expects a string", marker)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("[-1, 3, C3, [128]]", "[-1, 3, \"__import__('os').system('touch {m}')\", [128]]", r"backbone\[2\]: unknown module '__import__"),
        ("[-1, 1, Conv, [128, 3, 2]]", "[-1, 1, Conv, [\"__import__('os').system('touch {m}')\", 3, 2]]", r"backbone\[1\]: Conv: args\[0\] must be the output channel count"),
        ("[-1, 1, Conv, [128, 3, 2]]", "[-1, 1, Conv, [128, \"__import__('os').system('touch {m}')\", 2]]", r"backbone\[1\]: Conv"),
        ("nc: 80", "nc: 80\nactivation: \"__import__('os').system('touch {m}')\"", r"activation: unknown"),
        ("nc: 80", "nc: 80\nattention: \"__import__('os').system('touch {m}')\"", r"attention: unknown attention"),
    ],
    ids=["module", "channels-arg", "kernel-arg", "activation", "attention"],
)
def test_code_in_a_model_yaml_is_a_name_error_never_evaluated(tmp_path: Path, old: str, new: str, message: str) -> None:
    """Row 18: no eval anywhere; code in a module name, an argument or a top-level key is just an unknown name."""
    marker = tmp_path / "pwned"
    assert old in MODEL_YAML
    _refused(build_model, tmp_path / "m.yaml", MODEL_YAML.replace(old, new.replace("{m}", str(marker)), 1), message, marker)


def test_resume_of_a_missing_or_foreign_file_is_a_clear_error(tmp_path: Path) -> None:
    """Row 27 (a finished run and an empty project are in tests/train/test_trainer.py)."""
    gone = tmp_path / "runs" / "exp" / "weights" / "last.pt"
    with pytest.raises(DetectorError, match=f"resume: checkpoint '{gone}' not found"):
        Trainer(make_config(tmp_path, tmp_path / "runs", resume=str(gone)))
    foreign = tmp_path / "notes.pt"
    foreign.write_text("not a checkpoint")
    with pytest.raises(DetectorError, match=f"{foreign}: (not a readable checkpoint|refused to load it)"):
        Trainer(make_config(tmp_path, tmp_path / "runs", resume=str(foreign)))


def test_resume_true_after_a_run_killed_in_its_first_epoch_names_that_run(tiny_data: Path, tmp_path: Path, monkeypatch) -> None:
    """Row 24/27: `resume=true` means the newest run. Killed before its first checkpoint, that run has nothing to
    resume: an error naming it, not a silent resume of an older unfinished run in the same project."""
    real_epoch = Trainer.train_epoch

    def killed_at(stop: int):
        def train_epoch(self, epoch):
            if epoch == stop:
                raise KeyboardInterrupt  # as a kill would: epochs before `stop` were checkpointed
            return real_epoch(self, epoch)
        return train_epoch

    runs = tmp_path / "runs"
    monkeypatch.setattr(Trainer, "train_epoch", killed_at(1))
    with pytest.raises(KeyboardInterrupt):
        train(make_config(tiny_data, runs, epochs="2"))  # exp: epoch 0 checkpointed, resumable
    monkeypatch.setattr(Trainer, "train_epoch", killed_at(0))
    with pytest.raises(KeyboardInterrupt):
        train(make_config(tiny_data, runs, epochs="2"))  # exp2: killed in its first epoch
    monkeypatch.undo()
    assert (runs / "exp2" / "args.yaml").exists() and not (runs / "exp2" / "weights" / "last.pt").exists()
    with pytest.raises(DetectorError, match=rf"^resume: the newest run {runs / 'exp2'} has no weights/last\.pt .*nothing to resume"):
        Trainer(make_config(tiny_data, runs, resume="true"))
    resumed = Trainer(make_config(tiny_data, runs, resume=str(runs / "exp" / "weights" / "last.pt")))  # asked for by path
    assert resumed.run_dir == runs / "exp"
    resumed.close()

"""Output folders checked before any work: a file in the way, a name leaving its project, a path the file system
refuses are one line naming the key (they were tracebacks after the data scan and the model build)."""

from __future__ import annotations

from pathlib import Path

import pytest

from detector.cli import main
from detector.errors import DetectorError
from detector.folders import check_output_folder, next_run_dir


def test_run_folders_count_up_unless_exist_ok(tmp_path: Path) -> None:
    assert next_run_dir(tmp_path, "exp", exist_ok=False) == tmp_path / "exp"
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp2").mkdir()
    assert next_run_dir(tmp_path, "exp", exist_ok=False) == tmp_path / "exp3"
    assert next_run_dir(tmp_path, "exp", exist_ok=True) == tmp_path / "exp"
    assert next_run_dir(tmp_path, "ablate/ca", exist_ok=False) == tmp_path / "ablate" / "ca"  # sub-folders are fine


@pytest.mark.parametrize("name", ["", ".", "..", "a/../../b", "/tmp/elsewhere"])
def test_a_name_that_is_not_a_folder_inside_the_project_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(DetectorError, match=rf"^name={name!r}: a folder name inside project= \(not empty"):
        next_run_dir(tmp_path, name, exist_ok=True)


def test_a_file_in_the_way_or_a_name_too_long_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("keep")
    with pytest.raises(DetectorError, match=rf"^save_dir: {tmp_path / 'file'} is a file, not a folder \(to write in "
                                            rf"{tmp_path / 'file' / 'sub'}\)$"):
        check_output_folder(tmp_path / "file" / "sub", "save_dir")
    with pytest.raises(DetectorError, match="^out: cannot write in .*: File name too long$"):
        check_output_folder(tmp_path / ("n" * 300), "out")
    assert check_output_folder(tmp_path / "new" / "deeper", "out") == tmp_path / "new" / "deeper"
    assert (tmp_path / "file").read_text() == "keep" and not (tmp_path / "new").exists()


@pytest.mark.parametrize("command", [["train", "epochs=1"], ["data", "check"]])
def test_the_commands_refuse_a_file_as_their_folder_before_the_scan(tmp_path: Path, capsys, command: list[str]) -> None:
    """The dataset is not even read: its YAML does not exist, and the folder is what is named."""
    (tmp_path / "file").write_text("")
    key = "project" if command[0] == "train" else "save_dir"
    args = [*command, f"data={tmp_path / 'missing.yaml'}", f"{key}={tmp_path / 'file'}"]
    assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"error: {key}: {tmp_path / 'file'} is a file, not a folder" in line

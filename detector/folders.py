"""Where a command writes: the run folder (runs/<command>/exp, exp2, ... as YOLO users know them) and any output
folder a user names, checked before any work, so that a file in the way (`project=/dev/null`), a name climbing out
of its project (`name=../..`) or a path the file system refuses is one line naming the key, not a traceback
after the data scan and the model build."""

from __future__ import annotations

from pathlib import Path

from detector.errors import DetectorError


def check_output_folder(path: Path, key: str) -> Path:
    """`path` if a folder can be made there: the nearest existing part of it is a folder (not a file or a device)."""
    try:
        existing = next((part for part in (path, *path.parents) if part.exists()), None)
        if existing is not None and not existing.is_dir():
            raise DetectorError(f"{key}: {existing} is a file, not a folder (to write in {path})")
    except OSError as err:  # a name too long for the file system
        raise DetectorError(f"{key}: cannot write in {path}: {err.strerror or err}") from err
    return path


def next_run_dir(project: Path, name: str, exist_ok: bool) -> Path:
    """`project/name`, or with it taken and not `exist_ok` the first free `project/name2`, `name3`, ...; `name`
    is a folder inside `project` (it may have sub-folders)."""
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or any(part in (".", "..") for part in parts):
        raise DetectorError(f"name={name!r}: a folder name inside project= (not empty, absolute, '.' or '..')")
    path = check_output_folder(project / name, "project")
    if exist_ok or not path.exists():
        return path
    n = 2
    while (project / f"{name}{n}").exists():
        n += 1
    return project / f"{name}{n}"

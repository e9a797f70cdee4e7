"""The output folder of a command: runs/<command>/exp, exp2, exp3 ..., as YOLO users know them. Shared by training
(the trainer) and the commands that only read a model (val, predict, info through the `Detector`)."""

from __future__ import annotations

from pathlib import Path


def next_run_dir(project: Path, name: str, exist_ok: bool) -> Path:
    """`project/name`, or with it taken and not `exist_ok` the first free `project/name2`, `name3`, ..."""
    path = project / name
    if exist_ok or not path.exists():
        return path
    n = 2
    while (project / f"{name}{n}").exists():
        n += 1
    return project / f"{name}{n}"

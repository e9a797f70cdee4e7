"""The package installs from a wheel and runs from any folder: model YAMLs, the train config and the bundled
dataset come with it, not from the checkout; every package it imports is declared."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from repo_paths import REPO_ROOT


def test_the_configs_ship_as_package_data() -> None:
    from detector.models.catalog import MODEL_CONFIGS

    assert MODEL_CONFIGS == Path(__import__("detector").__file__).parent / "configs" / "models"
    assert (MODEL_CONFIGS / "yolo-ca-n.yaml").is_file() and (MODEL_CONFIGS.parent / "train" / "default.yaml").is_file()
    assert (REPO_ROOT / "configs").resolve() == MODEL_CONFIGS.parent  # the checkout's configs/ is the same folder


@pytest.mark.slow
def test_a_wheel_runs_outside_the_checkout(tmp_path: Path) -> None:
    """Build a wheel, install it into a fresh venv that reuses this environment's torch, and run the commands a new
    user runs from an empty folder."""
    source = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info beside what it builds
    shutil.copytree(REPO_ROOT / "detector", source / "detector", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("detector-*.whl")
    from detector.version import __version__

    assert wheel.name.startswith(f"detector-{__version__}-")  # pyproject.toml's dynamic version, from version.py
    names = zipfile.ZipFile(wheel).namelist()
    assert "detector/configs/models/yolo-ca-n.yaml" in names and "detector/configs/train/default.yaml" in names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True, timeout=600)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": "", "NO_ALBUMENTATIONS_UPDATE": "1"}

    def run(*args: str) -> str:
        proc = subprocess.run([str(python), *args], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout + proc.stderr

    where = run("-c", "import detector; print(detector.__file__)")
    assert str(venv) in where  # the wheel's copy, not the checkout's
    assert "eca at output" in run("-m", "detector", "info", "model=yolo-attn-n", "attention=eca", "imgsz=64")
    run("-m", "detector", "data", "synth", "out=shapes", "n_train=16", "n_val=8", "imgsz=96")
    run("-m", "detector", "train", "data=shapes/dataset.yaml", "epochs=1", "imgsz=64", "batch=8", "workers=0",
        "plots=false", "model=yolo-c2f-n")
    assert (work / "runs" / "train" / "exp" / "weights" / "best.pt").is_file()
    assert "yolo-ca-n" in run("-c", "from detector import Detector; print(Detector('yolo-ca-n').model.name)")
    report = run("-m", "detector", "env").splitlines()
    assert report[0].startswith("detector ") and str(venv) in report[0]  # "imported from" the wheel's copy
    packaging_row = next(line.split() for line in report if line.startswith("packaging "))
    assert packaging_row[-1] == "ok"  # the wheel's own metadata, which declares packaging


def _declared_distributions() -> set[str]:
    """Normalized names of every requirement in pyproject.toml, core and optional (Python 3.11+: tomllib)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    return {_normalize(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in requirements}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_third_party_import_of_the_package_is_declared() -> None:
    """Each top-level module the package imports (lazy imports too) comes from the standard library, the package,
    or a distribution pyproject.toml declares: found through the installed packages' own top-level names."""
    provided = importlib.metadata.packages_distributions()
    declared = _declared_distributions()
    undeclared = set()
    for path in (REPO_ROOT / "detector").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            for top in {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"detector", "__future__"}:
                if not {_normalize(d) for d in provided.get(top, [top])} & declared:
                    undeclared.add(f"{top} ({path.relative_to(REPO_ROOT)})")
    assert not undeclared, sorted(undeclared)

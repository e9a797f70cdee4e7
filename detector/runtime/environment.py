"""`detector env`: what this installation runs on, on one screen to paste into a bug report or beside a figure.

The package and where Python imports it from, Python and the platform, the machine line every benchmark prints
(CPU, bf16 units, threads, torch), memory and disk, what `amp=auto` picks on the CPU and on each GPU (in the words
the trainer logs), and every package the project declares (pyproject's dependencies and extras) against the
version installed: a missing package says which `pip install` brings it, a version outside the range says so,
and a checkout whose pyproject.toml declares more than the installed metadata (pulled since its editable install)
is told to reinstall. `format=json` gives the same facts to tools.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion

from detector.memory import available_memory_bytes, gib, machine_memory_bytes
from detector.runtime.device import amp_choice
from detector.runtime.machine import describe_machine
from detector.version import __version__
from detector.viz.tables import format_table

DISTRIBUTION = "detector"
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"  # present in a checkout only
NOT_INSTALLED = ("packages: not checked (detector runs from a source tree it was never installed from: "
                 "bash scripts/install.sh)")


def environment(cwd: Path | None = None) -> dict[str, Any]:
    """Every fact of the report, as plain types."""
    cwd = cwd or _working_folder()
    disk = shutil.disk_usage(cwd)
    machine = describe_machine()
    packages = requirement_rows()
    return {
        "detector": {"version": __version__, "path": str(Path(__file__).resolve().parents[1])},
        "python": {"version": platform.python_version(), "executable": sys.executable, "platform": platform.platform()},
        "machine": {**dataclasses.asdict(machine), "summary": machine.summary()},
        "memory": {"total_bytes": machine_memory_bytes(), "available_bytes": available_memory_bytes()},
        "disk": {"path": str(cwd), "free_bytes": disk.free, "total_bytes": disk.total},
        "devices": device_rows(),
        "gpu_build": _gpu_build(),
        "packages": packages,
        "undeclared": metadata_lag(packages),
    }


def _gpu_build() -> str:
    """The GPU platform torch was built for ('CUDA 13.0', 'ROCm 6.4'), '' for a CPU-only build."""
    if torch.version.hip:
        return f"ROCm {torch.version.hip}"
    return f"CUDA {torch.version.cuda}" if torch.version.cuda else ""


def _working_folder() -> Path:
    """The current folder, or the home when it was deleted under the process (Path.cwd() raises then)."""
    try:
        return Path.cwd()
    except FileNotFoundError:
        return Path.home()


def format_environment(env: dict[str, Any]) -> str:
    """The one-screen text of `environment()`."""
    memory, disk = env["memory"], env["disk"]
    lines = [
        f"detector {env['detector']['version']} imported from {env['detector']['path']}",
        f"Python {env['python']['version']} ({env['python']['executable']}) on {env['python']['platform']}",
        env["machine"]["summary"],
        f"memory: {gib(memory['total_bytes'])}, {gib(memory['available_bytes'])} available; "
        f"disk: {gib(disk['free_bytes'])} free of {gib(disk['total_bytes'])} under {disk['path']}",
        *(" ".join(filter(None, (d["device"], d["name"]))) + f", amp=auto: {d['amp_auto']}" for d in env["devices"]),
    ]
    if len(env["devices"]) == 1:
        built = f"torch built for {env['gpu_build']}" if env["gpu_build"] else "a CPU-only torch build"
        lines.append(f"GPU: none visible ({built})")
    rows = [[p["name"], p["installed"] or "-", p["declared"] + (f" [{p['extra']}]" if p["extra"] else ""), p["status"]]
            for p in env["packages"]]
    table = format_table(["package", "installed", "declared", "status"], rows) if rows else NOT_INSTALLED
    lag = env["undeclared"]
    note = [f"pyproject.toml declares {', '.join(lag)}, which the installed metadata lacks: bash scripts/install.sh"]
    return "\n".join([*lines, "", table, *(note if lag else [])])


def environment_report(output_format: str = "text", cwd: Path | None = None) -> str:
    """`detector env`'s output: the text report, or `format=json`'s JSON of the same facts."""
    env = environment(cwd)
    return json.dumps(env, indent=1) if output_format == "json" else format_environment(env)


def device_rows() -> list[dict[str, str]]:
    """The CPU and each GPU, with what amp=auto picks on it: the line training logs when it starts there."""
    devices = [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    rows = []
    for device in devices:
        try:
            amp = amp_choice(device, "auto").reason.removeprefix("amp: ")
            name = "" if device.type == "cpu" else _gpu(device.index)
        except RuntimeError as err:  # a GPU that is busy (exclusive mode), lost or on a mismatched driver
            name, amp = "", f"unknown ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        rows.append({"device": str(device), "name": name, "amp_auto": amp})
    return rows


def _gpu(index: int) -> str:
    props = torch.cuda.get_device_properties(index)
    return f"{props.name} ({gib(props.total_memory)}, compute capability {props.major}.{props.minor})"


def requirement_rows() -> list[dict[str, str]]:
    """Per requirement pyproject declares: name, installed version ('' if none), the declared range, the extra
    that brings it ('' for a core dependency) and a status ('ok', or what is wrong and how to mend it); [] when
    the package runs from a source tree that was never installed (no metadata declares anything)."""
    try:
        extras = importlib.metadata.metadata(DISTRIBUTION).get_all("Provides-Extra") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    rows = []
    for text in importlib.metadata.requires(DISTRIBUTION) or []:
        requirement = Requirement(text)
        marker, extra = requirement.marker, ""
        if marker is not None and not marker.evaluate({"extra": ""}):  # an extra's, or not for this Python/platform
            extra = next((e for e in extras if marker.evaluate({"extra": e})), "")
            if not extra:
                continue
        installed, status = _installed(requirement, extra)
        rows.append({"name": requirement.name, "installed": installed, "declared": str(requirement.specifier) or "any",
                     "extra": extra, "status": status})
    return rows


def _installed(requirement: Requirement, extra: str) -> tuple[str, str]:
    """(the installed version or '', 'ok' or why not)."""
    try:
        version = importlib.metadata.version(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        brings = f" (the '{extra}' extra)" if extra else ""
        return "", f"not installed{brings}: pip install '{requirement.name}{requirement.specifier}'"
    try:
        fits = requirement.specifier.contains(version, prereleases=True)
    except InvalidVersion:
        return version, "version not comparable"
    return version, "ok" if fits else f"outside {requirement.specifier}"


def metadata_lag(packages: list[dict[str, str]]) -> list[str]:
    """What the pyproject.toml beside the imported package (a checkout) declares that the installed metadata lacks:
    an editable install's metadata is written at install time, so a checkout pulled since lists old requirements.
    [] outside a checkout, before Python 3.11 (no tomllib) and when nothing was installed."""
    if not packages or not PYPROJECT.is_file():
        return []
    try:
        import tomllib
    except ImportError:
        return []
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8")).get("project", {})
    extras = project.get("optional-dependencies", {}).values()
    declared = [*project.get("dependencies", []), *(r for requirements in extras for r in requirements)]
    installed = {canonicalize_name(p["name"]) for p in packages}
    return sorted({canonicalize_name(Requirement(r).name) for r in declared} - installed)

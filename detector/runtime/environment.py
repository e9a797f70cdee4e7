"""`detector env`: what this installation runs on, on one screen to paste into a bug report or beside a figure.

The package and where Python imports it from, Python and the platform, the machine line every benchmark prints
(CPU, bf16 units, threads, torch), memory and disk, what `amp=auto` picks on the CPU and on each GPU (in the words
the trainer logs), and every package the project declares (pyproject's dependencies and extras) against the
version installed: a missing extra says which `pip install` brings it, a version outside the range says so.
`format=json` gives the same facts to tools.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import platform
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from packaging.requirements import Requirement
from packaging.version import InvalidVersion

from detector.memory import available_memory_bytes, gib, machine_memory_bytes
from detector.runtime import device as device_policy
from detector.runtime.machine import describe_machine
from detector.version import __version__
from detector.viz.tables import format_table

DISTRIBUTION = "detector"
NOT_INSTALLED = "packages: not checked (detector runs from a source tree it was never installed from: bash scripts/install.sh)"


def environment(cwd: Path | None = None) -> dict[str, Any]:
    """Every fact of the report, as plain types."""
    cwd = cwd or Path.cwd()
    disk = shutil.disk_usage(cwd)
    machine = describe_machine()
    return {
        "detector": {"version": __version__, "path": str(Path(__file__).resolve().parents[1])},
        "python": {"version": platform.python_version(), "executable": sys.executable, "platform": platform.platform()},
        "machine": {**dataclasses.asdict(machine), "summary": machine.summary()},
        "memory": {"total_bytes": machine_memory_bytes(), "available_bytes": available_memory_bytes()},
        "disk": {"path": str(cwd), "free_bytes": disk.free, "total_bytes": disk.total},
        "devices": device_rows(),
        "cuda_build": torch.version.cuda,
        "packages": requirement_rows(),
    }


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
        built = f"torch built for CUDA {env['cuda_build']}" if env["cuda_build"] else "a CPU-only torch build"
        lines.append(f"CUDA: no GPU visible ({built})")
    rows = [[p["name"], p["installed"] or "-", p["declared"] + (f" [{p['extra']}]" if p["extra"] else ""), p["status"]]
            for p in env["packages"]]
    table = format_table(["package", "installed", "declared", "status"], rows) if rows else NOT_INSTALLED
    return "\n".join([*lines, "", table])


def environment_report(output_format: str = "text", cwd: Path | None = None) -> str:
    """`detector env`'s output: the text report, or `format=json`'s JSON of the same facts."""
    env = environment(cwd)
    return json.dumps(env, indent=1) if output_format == "json" else format_environment(env)


def device_rows() -> list[dict[str, str]]:
    """The CPU and each GPU, with what amp=auto picks on it, as `autocast_dtype` logs it when training starts."""
    devices = [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    rows = []
    for device in devices:
        with _logged(device_policy.LOGGER) as said:
            device_policy.autocast_dtype(device, "auto")
        name = "" if device.type == "cpu" else _gpu(device.index)
        rows.append({"device": str(device), "name": name, "amp_auto": "; ".join(s.removeprefix("amp: ") for s in said)})
    return rows


def _gpu(index: int) -> str:
    props = torch.cuda.get_device_properties(index)
    return f"{props.name} ({gib(props.total_memory)}, compute capability {props.major}.{props.minor})"


class _Collected(logging.Handler):
    """Keeps the messages it is handed."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _logged(logger: logging.Logger) -> Iterator[list[str]]:
    """The messages `logger` emits inside the block, kept from the console and collected instead."""
    handler = _Collected()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


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
        extra = next((e for e in extras if requirement.marker and requirement.marker.evaluate({"extra": e})), "")
        installed, status = _installed(requirement, extra)
        rows.append({"name": requirement.name, "installed": installed, "declared": str(requirement.specifier) or "any",
                     "extra": extra, "status": status})
    return rows


def _installed(requirement: Requirement, extra: str) -> tuple[str, str]:
    """(the installed version or '', 'ok' or why not)."""
    try:
        version = importlib.metadata.version(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        fix = f"pip install '{DISTRIBUTION}[{extra}]'" if extra else f"pip install '{requirement}'"
        return "", f"not installed: {fix}"
    try:
        fits = requirement.specifier.contains(version, prereleases=True)
    except InvalidVersion:
        return version, "version not comparable"
    return version, "ok" if fits else f"outside {requirement.specifier}"

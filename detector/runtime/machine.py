"""The machine a figure was measured on, named one way by every benchmark: the CPU's model name (as lscpu prints
it), its logical CPUs, the vector ISA torch dispatches to, its bf16 matrix units (what `amp=auto` decides by:
without them bf16 is emulated and slower than fp32), the intra-op threads, torch's version and any GPU.

Speeds of this project's machines differ by CPU from session to session, so a figure without this line cannot be
compared with anything.
"""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")
BF16_UNITS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}  # torch.cpu.get_capabilities() key -> name


def bf16_units() -> tuple[str, ...]:
    """The CPU's bf16 matrix units ('AMX-BF16', 'AVX512-BF16'), from torch's cpuinfo probe (which also checks that
    the OS enabled the AMX state); () on AVX2 and plain AVX-512 x86 and on ARM, where oneDNN emulates bf16."""
    caps = torch.cpu.get_capabilities()
    return tuple(name for key, name in BF16_UNITS.items() if caps.get(key, False))


def cpu_name() -> str:
    """The CPU's model name, as lscpu prints it (from /proc/cpuinfo), or the platform's word for it."""
    with contextlib.suppress(OSError):
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


@dataclass(frozen=True)
class Machine:
    """What a benchmark ran on; `summary()` is the one line every bench prints above its table."""

    cpu: str
    cpus: int
    isa: str
    bf16_units: tuple[str, ...]
    threads: int
    torch: str
    gpu: str = ""

    def summary(self) -> str:
        units = ", ".join(self.bf16_units) if self.bf16_units else "none, so amp=auto trains in fp32"
        threads = f"{self.threads} thread" + ("s" if self.threads != 1 else "")
        gpu = f", GPU {self.gpu}" if self.gpu else ""
        cpu = f"{self.cpu} ({self.cpus} CPUs, {self.isa}, bf16 units: {units})"
        return f"machine: {cpu}, {threads}, torch {self.torch}{gpu}"


def describe_machine() -> Machine:
    """This machine as this process runs on it now: the CPUs it may use (taskset and cgroup limits counted), the
    intra-op threads as set at the time of the call."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return Machine(cpu=cpu_name(), cpus=cpus, isa=torch.backends.cpu.get_cpu_capability(), bf16_units=bf16_units(),
                   threads=torch.get_num_threads(), torch=torch.__version__, gpu=_gpus())


def _gpus() -> str:
    """'NVIDIA H100', '2 x NVIDIA H100', 'NVIDIA A100, NVIDIA T4'; '' without a GPU or when the driver cannot say."""
    try:
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except RuntimeError as err:  # a lost GPU or a mismatched driver: the figure's line still prints
        return f"unknown ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    if len(set(names)) == 1 and len(names) > 1:
        return f"{len(names)} x {names[0]}"
    return ", ".join(names)

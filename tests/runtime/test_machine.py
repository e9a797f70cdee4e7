"""runtime/machine.py: the one line that names the machine above every benchmark table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detector.runtime import machine
from detector.runtime.device import cpu_supports_bf16


@pytest.mark.parametrize(("flags", "units"), [
    ({"amx_bf16": True, "avx512_bf16": True}, ("AMX-BF16", "AVX512-BF16")),  # Intel Xeon Sapphire Rapids
    ({"avx512_bf16": True}, ("AVX512-BF16",)),  # AMD EPYC Zen 4
    ({"avx512f": True}, ()),  # plain AVX-512, no bf16 units
    ({}, ()),  # AMD EPYC Zen 3: AVX2 only
    ({"amx_bf16": False, "avx512_bf16": False}, ()),  # torch lists every flag it probes, False where absent
])
def test_bf16_units_name_the_matrix_units_amp_auto_decides_by(monkeypatch: pytest.MonkeyPatch, flags: dict,
                                                              units: tuple) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"architecture": "x86_64", "avx2": True, **flags})
    assert machine.bf16_units() == units
    assert cpu_supports_bf16() is bool(units)  # the same source of truth as amp=auto


def test_cpu_name_is_the_model_name_lscpu_prints(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 1\nmodel name\t: AMD EPYC 7B13 \nflags\t: avx2\n")
    monkeypatch.setattr(machine, "CPUINFO", cpuinfo)
    assert machine.cpu_name() == "AMD EPYC 7B13"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: QEMU Virtual CPU version 2.5+: host-passthrough\n")
    assert machine.cpu_name() == "QEMU Virtual CPU version 2.5+: host-passthrough"  # a colon inside the name stays
    monkeypatch.setattr(machine, "CPUINFO", tmp_path / "missing")  # macOS, Windows: the platform's word
    monkeypatch.setattr(machine.platform, "processor", lambda: "arm")
    assert machine.cpu_name() == "arm"


def test_the_summary_says_what_amp_auto_does_and_counts_threads() -> None:
    zen3 = machine.Machine(cpu="AMD EPYC", cpus=2, isa="AVX2", bf16_units=(), threads=1, torch="2.14.1")
    assert zen3.summary() == ("machine: AMD EPYC (2 CPUs, AVX2, bf16 units: none, so amp=auto trains in fp32), "
                              "1 thread, torch 2.14.1")
    xeon = machine.Machine(cpu="Intel Xeon", cpus=2, isa="AVX512", bf16_units=("AMX-BF16", "AVX512-BF16"),
                           threads=2, torch="2.14.1", gpu="NVIDIA H100")
    assert xeon.summary() == ("machine: Intel Xeon (2 CPUs, AVX512, bf16 units: AMX-BF16, AVX512-BF16), 2 threads, "
                              "torch 2.14.1, GPU NVIDIA H100")


def test_describe_machine_reads_the_threads_as_set_now() -> None:
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        now = machine.describe_machine()
    finally:
        torch.set_num_threads(previous)
    assert now.threads == 1 and now.torch == torch.__version__ and now.cpu == machine.cpu_name()
    assert now.isa == torch.backends.cpu.get_cpu_capability() and now.bf16_units == machine.bf16_units()


def test_describe_machine_names_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "FakeGPU")
    assert machine.describe_machine().gpu == "2 x FakeGPU"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert machine.describe_machine().summary().endswith(", GPU FakeGPU")


def test_mixed_gpus_are_each_named_and_a_failing_driver_is_said(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: ["NVIDIA A100", "NVIDIA T4"][index])
    assert machine.describe_machine().gpu == "NVIDIA A100, NVIDIA T4"

    def lost(index=None) -> str:  # noqa: ANN001
        raise RuntimeError("CUDA error: unspecified launch failure\nCUDA kernel errors might be asynchronously reported")

    monkeypatch.setattr(torch.cuda, "get_device_name", lost)
    assert machine.describe_machine().gpu == "unknown (CUDA error: unspecified launch failure)"


def test_cpus_are_those_this_process_may_run_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: {0}, raising=False)  # e.g. under taskset -c 0
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 64)
    assert machine.describe_machine().cpus == 1

"""Device selection, the mixed-precision policy and model unwrapping, with CUDA and CPU features mocked."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from detector.errors import DetectorError
from detector.runtime import device as dev


@pytest.fixture(autouse=True)
def _no_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def _cuda_model(monkeypatch: pytest.MonkeyPatch, *, bf16: bool) -> None:
    """A fake GPU: bf16-capable (Ampere+) or not (e.g. a T4)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "FakeGPU")
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())


def _cpu_caps(monkeypatch: pytest.MonkeyPatch, **flags: bool) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"architecture": "x86_64", "avx2": True, **flags})


# ------------------------------------------------------------------------------------------ select_device


@pytest.mark.parametrize("spec", ["", "cpu", " CPU "])
def test_cpu_without_cuda(no_cuda: None, spec: str) -> None:
    assert dev.select_device(spec) == torch.device("cpu")


@pytest.mark.parametrize("spec", ["cuda", "0", "cuda:1", "0,1"])
def test_cuda_requested_without_cuda_names_it(no_cuda: None, spec: str) -> None:
    with pytest.raises(DetectorError, match=f"device '{spec}'.*(CUDA is not available|torchrun)"):
        dev.select_device(spec)


@pytest.mark.parametrize(("spec", "expected"), [("", "cuda:0"), ("cuda", "cuda:0"), ("0", "cuda:0"), ("1", "cuda:1"), ("cuda:1", "cuda:1"), ("cpu", "cpu")])
def test_cuda_specs(two_gpus: None, spec: str, expected: str) -> None:
    assert dev.select_device(spec) == torch.device(expected)


def test_missing_gpu_index_is_named(two_gpus: None) -> None:
    with pytest.raises(DetectorError, match=r"device '3': CUDA device 3 not found \(this machine has 2"):
        dev.select_device("3")


def test_gpu_list_needs_torchrun(two_gpus: None) -> None:
    with pytest.raises(DetectorError, match="torchrun --nproc_per_node 2"):
        dev.select_device("0,1")


@pytest.mark.parametrize(("spec", "rank", "expected"), [("0,1", "1", "cuda:1"), ("1,0", "1", "cuda:0"), ("", "1", "cuda:1"), ("cuda", "0", "cuda:0"), ("cpu", "1", "cpu")])
def test_torchrun_local_rank(two_gpus: None, monkeypatch: pytest.MonkeyPatch, spec: str, rank: str, expected: str) -> None:
    monkeypatch.setenv("LOCAL_RANK", rank)
    assert dev.select_device(spec) == torch.device(expected)


def test_torchrun_rank_beyond_the_list(two_gpus: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(DetectorError, match="LOCAL_RANK=2 has no GPU"):
        dev.select_device("0,1")


def test_torchrun_on_cpu_only_machine(no_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dev.select_device("") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "0,,1", "-1"])
def test_unknown_spec(spec: str) -> None:
    with pytest.raises(DetectorError, match="not a device"):
        dev.select_device(spec)


# ------------------------------------------------------------------------------------------ bf16 on the CPU


@pytest.mark.parametrize(("flags", "expected"), [({}, False), ({"avx512_f": True}, False), ({"avx512_bf16": True}, True), ({"amx_bf16": True, "amx_tile": True}, True)])
def test_cpu_supports_bf16(monkeypatch: pytest.MonkeyPatch, flags: dict, expected: bool) -> None:
    _cpu_caps(monkeypatch, **flags)
    assert dev.cpu_supports_bf16() is expected


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="Linux /proc/cpuinfo")
def test_cpu_probe_agrees_with_the_kernel() -> None:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            break
    if torch.cpu.get_capabilities().get("architecture") != "x86_64":
        pytest.skip("the bf16 matrix flags checked are x86 ones")
    assert dev.cpu_supports_bf16() == bool({"amx_bf16", "avx512_bf16"} & flags)


# ------------------------------------------------------------------------------------------ autocast dtype


CPU = torch.device("cpu")
GPU = torch.device("cuda", 0)


@pytest.mark.parametrize("amp", ["auto", True, "AUTO"])
def test_cpu_auto_bf16_with_amx(monkeypatch: pytest.MonkeyPatch, amp: str | bool) -> None:
    _cpu_caps(monkeypatch, amx_bf16=True)
    assert dev.autocast_dtype(CPU, amp) == torch.bfloat16


def test_cpu_auto_off_without_bf16_units(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    _cpu_caps(monkeypatch)
    with caplog.at_level(logging.INFO, logger=dev.__name__):
        assert dev.autocast_dtype(CPU, "auto") is None
    assert "amp: off on this CPU" in caplog.text


def test_cpu_fp16_warns_and_is_off(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    _cpu_caps(monkeypatch, amx_bf16=True)
    with caplog.at_level(logging.WARNING, logger=dev.__name__):
        assert dev.autocast_dtype(CPU, "fp16") is None
    assert "amp=fp16 ignored on the CPU" in caplog.text


def test_cpu_explicit_bf16_is_honoured_with_a_warning(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    _cpu_caps(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=dev.__name__):
        assert dev.autocast_dtype(CPU, "bf16") == torch.bfloat16
    assert "emulated" in caplog.text


@pytest.mark.parametrize("amp", ["off", False, "OFF"])
def test_off(monkeypatch: pytest.MonkeyPatch, amp: str | bool) -> None:
    _cpu_caps(monkeypatch, amx_bf16=True)
    assert dev.autocast_dtype(CPU, amp) is None
    assert dev.autocast_dtype(GPU, amp) is None


def test_unknown_amp_value() -> None:
    with pytest.raises(DetectorError, match="amp: 'fp8' is not one of auto, bf16, fp16, off"):
        dev.autocast_dtype(CPU, "fp8")


@pytest.mark.parametrize(("bf16", "amp", "expected"), [(True, "auto", torch.bfloat16), (False, "auto", torch.float16), (True, "fp16", torch.float16), (True, "bf16", torch.bfloat16), (False, "fp16", torch.float16)])
def test_cuda_policy(monkeypatch: pytest.MonkeyPatch, bf16: bool, amp: str, expected: torch.dtype) -> None:
    _cuda_model(monkeypatch, bf16=bf16)
    assert dev.autocast_dtype(GPU, amp) == expected


def test_cuda_bf16_on_old_gpu_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _cuda_model(monkeypatch, bf16=False)
    with pytest.raises(DetectorError, match=r"amp=bf16: cuda:0 \(FakeGPU\) has no native bf16"):
        dev.autocast_dtype(GPU, "bf16")


def test_other_devices_auto_off() -> None:
    assert dev.autocast_dtype(torch.device("mps"), "auto") is None
    assert dev.autocast_dtype(torch.device("mps"), "fp16") == torch.float16


def test_grad_scaler_only_for_fp16() -> None:
    assert dev.needs_grad_scaler(torch.float16)
    assert not dev.needs_grad_scaler(torch.bfloat16)
    assert not dev.needs_grad_scaler(None)


def test_cpu_bf16_autocast_runs() -> None:
    """The dtype autocast_dtype returns is one torch.autocast accepts on the CPU (whatever its speed here)."""
    layer = nn.Linear(4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(3, 4))
    assert out.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ unwrap


class _Compiled(nn.Module):
    """Stands in for torch.compile's OptimizedModule (its wrapped module is `_orig_mod`; importing dynamo takes 5 s)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner


def test_unwrap_model() -> None:
    inner = nn.Linear(2, 2)
    assert dev.unwrap_model(inner) is inner
    assert dev.unwrap_model(nn.DataParallel(inner)) is inner
    assert dev.unwrap_model(_Compiled(nn.DataParallel(inner))) is inner


# ------------------------------------------------------------------------------------------ round 3 gaps


@pytest.mark.parametrize(("spec", "rank", "expected"), [(" cuda: 1 ", None, "cuda:1"), ("0, 1", "1", "cuda:1"), ("cuda", "1", "cuda:1")])
def test_spaces_inside_a_spec_and_cuda_under_torchrun(two_gpus: None, monkeypatch: pytest.MonkeyPatch, spec: str,
                                                      rank: str | None, expected: str) -> None:
    """Spaces anywhere in the value are ignored; 'cuda' under torchrun is the GPU at LOCAL_RANK."""
    if rank is not None:
        monkeypatch.setenv("LOCAL_RANK", rank)
    assert dev.select_device(spec) == torch.device(expected)


def test_the_gpu_index_equal_to_the_count_is_missing(two_gpus: None) -> None:
    """Two GPUs are 0 and 1: '2' is named as not found."""
    with pytest.raises(DetectorError, match=r"device '2': CUDA device 2 not found \(this machine has 2: 0..1\)"):
        dev.select_device("2")


def test_mps_is_taken_only_where_it_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    """device=mps is refused where torch reports no MPS, and taken where it does."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DetectorError, match="device 'mps': Apple MPS is not available"):
        dev.select_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert dev.select_device("MPS") == torch.device("mps")


def test_a_gpu_that_only_emulates_bf16_gets_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch reports bf16 on pre-Ampere GPUs when emulation counts; amp=auto asks for native units and picks fp16."""
    _cuda_model(monkeypatch, bf16=False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert dev.autocast_dtype(GPU, "auto") == torch.float16


def test_other_devices_take_an_explicit_bf16() -> None:
    """On a device other than CUDA and the CPU, amp=bf16 is bf16 (not fp16)."""
    assert dev.autocast_dtype(torch.device("mps"), "bf16") == torch.bfloat16


def test_the_clock_waits_for_a_gpu_and_not_for_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """device_clock synchronises a CUDA device before reading the time, and never the CPU."""
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    dev.device_clock(CPU)
    assert synced == []
    dev.device_clock(GPU)
    assert synced == [GPU]

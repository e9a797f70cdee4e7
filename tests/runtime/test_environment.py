"""`detector env`: the installation's facts for a bug report, its declared packages checked against pyproject."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
from types import SimpleNamespace

import pytest
import torch

from detector.cli import main
from detector.runtime import environment


def _rows_by_name() -> dict[str, dict[str, str]]:
    return {row["name"]: row for row in environment.requirement_rows()}


def test_each_declared_package_is_read_from_the_installed_metadata() -> None:
    rows = _rows_by_name()
    assert rows["torch"] == {"name": "torch", "installed": importlib.metadata.version("torch"), "declared": ">=2.10",
                             "extra": "", "status": "ok"}
    assert rows["albumentations"]["declared"] == "<2.1,>=2.0.6"  # pyproject's range, as packaging orders it
    assert rows["onnxruntime"]["extra"] == "export" and rows["faster-coco-eval"]["extra"] == "faster"
    assert rows["pytest"]["extra"] == "dev"


def test_a_missing_or_out_of_range_package_says_how_to_mend_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.version
    fake = {"albumentations": "2.1.0", "torch": "2.11.0rc1"}

    def version(name: str) -> str:
        if name in ("onnx", "numpy"):
            raise importlib.metadata.PackageNotFoundError(name)
        return fake.get(name) or real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    rows = _rows_by_name()
    assert rows["onnx"]["installed"] == "" and rows["onnx"]["status"] == "not installed (the 'export' extra): pip install 'onnx'"
    assert rows["numpy"]["status"] == "not installed: pip install 'numpy>=1.24'"
    assert rows["albumentations"]["status"] == "outside <2.1,>=2.0.6"  # 2.1 is the first AGPL release
    assert rows["torch"]["status"] == "ok"  # a pre-release (a nightly, a release candidate) inside the range


def test_a_source_tree_never_installed_says_its_packages_were_not_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "metadata", not_installed)
    assert environment.requirement_rows() == []
    assert environment.environment_report().splitlines()[-1].startswith("packages: not checked (detector runs from ")


def test_markers_other_than_an_extra_decide_whether_a_requirement_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    requires = ['numpy>=1.24; python_version >= "3"', 'tomli>=2; python_version < "3"', 'onnx; extra == "export"']
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: requires)
    rows = environment.requirement_rows()
    assert [(row["name"], row["extra"]) for row in rows] == [("numpy", ""), ("onnx", "export")]  # tomli: not for Python 3


def test_a_checkout_pulled_since_its_install_is_told_to_reinstall(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    pytest.importorskip("tomllib")  # Python 3.11+: on 3.10 the check is skipped
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["numpy>=1.24", "Zzz_Pkg>=1"]\n'
                         '[project.optional-dependencies]\nexport = ["onnx"]\n')
    monkeypatch.setattr(environment, "PYPROJECT", pyproject)
    packages = [{"name": "numpy"}, {"name": "onnx"}]
    assert environment.metadata_lag(packages) == ["zzz-pkg"]  # names compared as pip does (PEP 503)
    assert environment.metadata_lag([]) == []  # nothing installed: NOT_INSTALLED says so already
    monkeypatch.setattr(environment, "PYPROJECT", tmp_path / "missing.toml")  # a wheel: no checkout beside it
    assert environment.metadata_lag(packages) == []


def test_the_gpu_build_is_named_rocm_cuda_or_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ROCm build also reports a CUDA version field (None or not): HIP is checked first."""
    for hip, cuda, expected in (("6.4", None, "ROCm 6.4"), (None, "13.0", "CUDA 13.0"), (None, None, "")):
        monkeypatch.setattr(torch.version, "hip", hip)
        monkeypatch.setattr(torch.version, "cuda", cuda)
        assert environment._gpu_build() == expected


def test_the_report_says_no_gpu_only_without_one_and_names_each_packages_extra() -> None:
    """'GPU: none visible' is for a CPU-only row list; a package's extra stands beside its declared range."""
    env = environment.environment()
    env["gpu_build"], env["undeclared"] = "CUDA 13.0", []
    env["packages"] = [{"name": "onnx", "installed": "", "declared": "any", "extra": "export", "status": "not installed"}]
    env["devices"] = [{"device": "cpu", "name": "", "amp_auto": "fp32"}]
    lines = environment.format_environment(env).splitlines()
    assert "GPU: none visible (torch built for CUDA 13.0)" in lines
    assert any(line.split()[:3] == ["onnx", "-", "any"] and line.split()[3] == "[export]" for line in lines)
    env["devices"].append({"device": "cuda:0", "name": "FakeGPU", "amp_auto": "bf16"})
    lines = environment.format_environment(env).splitlines()
    assert "cuda:0 FakeGPU, amp=auto: bf16" in lines and not any(line.startswith("GPU: none") for line in lines)


def test_a_gpu_that_cannot_be_asked_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def busy(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
        raise RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable\nmore")

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device", busy)
    gpu = environment.device_rows()[1]
    assert gpu == {"device": "cuda:0", "name": "",
                   "amp_auto": "unknown (CUDA error: all CUDA-capable devices are busy or unavailable)"}


def test_the_cpu_row_says_what_amp_auto_picks_without_logging_it(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"architecture": "x86_64", "avx512_bf16": True})
    with caplog.at_level("INFO"):
        rows = environment.device_rows()
    assert rows[0] == {"device": "cpu", "name": "", "amp_auto": "bf16 autocast on the CPU (AMX/AVX512-BF16 present)"}
    assert caplog.records == []  # a report, not a training run's log line


def test_each_gpu_is_named_with_its_memory_and_amp_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake pre-Ampere GPU (no native bf16): amp=auto trains it in fp16 with a gradient scaler."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    props = SimpleNamespace(name="FakeGPU", total_memory=16 * 2**30, major=7, minor=5)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "FakeGPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    gpu = environment.device_rows()[1]
    assert gpu == {"device": "cuda:0", "name": "FakeGPU (16.0 GiB, compute capability 7.5)",
                   "amp_auto": "fp16 autocast with a gradient scaler on cuda:0 (FakeGPU)"}


def test_detector_env_prints_the_report_and_its_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("detector 0.") and " imported from " in lines[0]
    assert lines[2].startswith("machine: ") and any(line.startswith("cpu, amp=auto: ") for line in lines)
    assert any(line.split()[:2] == ["torch", importlib.metadata.version("torch")] for line in lines)
    assert main(["env", "format=json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["machine"]["summary"] == lines[2] and facts["devices"][0]["device"] == "cpu"
    assert {p["name"] for p in facts["packages"]} >= {"torch", "pycocotools", "onnxruntime"}
    assert main(["env", "format=xml"]) == 2
    assert "'format' must be one of text, json, got 'xml'" in capsys.readouterr().err

"""detector.memory: the machine's available memory, read as the kernel reports it."""

from __future__ import annotations

from pathlib import Path

import pytest

from detector import memory


def test_available_memory_is_meminfo_and_below_the_machine(monkeypatch, tmp_path: Path) -> None:
    available = memory.available_memory_bytes()
    assert 0 < available <= memory.machine_memory_bytes()
    fake = tmp_path / "meminfo"
    fake.write_text("MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    600 kB\n")
    real_path = memory.Path
    monkeypatch.setattr(memory, "Path", lambda p: fake if p == "/proc/meminfo" else real_path(p))
    assert memory.available_memory_bytes() == 600 * 1024
    fake.write_text("MemTotal: 1000 kB\n")  # a kernel without the field (before 3.14): the physical memory
    assert memory.available_memory_bytes() == memory.machine_memory_bytes()


@pytest.mark.parametrize("text", ["MemAvailable: lots kB\n", ""])
def test_unreadable_meminfo_falls_back_to_the_machine(monkeypatch, tmp_path: Path, text: str) -> None:
    fake = tmp_path / "meminfo"
    fake.write_text(text)
    monkeypatch.setattr(memory, "Path", lambda p: fake)
    assert memory.available_memory_bytes() == memory.machine_memory_bytes()

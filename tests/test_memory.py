"""detector.memory: the machine's available memory, read as the kernel reports it."""

from __future__ import annotations

import os
import subprocess
import sys
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


# A step's pattern: 16 blocks of 16 MiB live at once, written, then all freed; three rounds after four of warm-up,
# printing the minor page faults they took. "hold": `hold_freed_heap`; "low": glibc's starting thresholds (128 KiB)
# fixed, a malloc that hands every large free back to the OS (its adaptive default does so in some processes).
_REFAULT_PROBE = """
import ctypes, resource, sys
import torch
from detector import memory
if sys.argv[1] == "hold":
    assert memory.hold_freed_heap()
else:
    libc = ctypes.CDLL(None)
    assert libc.mallopt(-3, 128 * 1024) and libc.mallopt(-1, 128 * 1024)
def step():
    blocks = [torch.empty(4 * 2**20).fill_(1.0) for _ in range(16)]
    del blocks
for _ in range(4):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _refaults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _REFAULT_PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and Linux's fault counters")
def test_a_held_heap_gives_a_step_its_freed_memory_back_without_faulting_it_in_again() -> None:
    """In fresh processes (the setting is process-wide and permanent): where freed memory goes back to the OS, each
    step faults its 256 MiB in again, zero-filled (65,536 pages); held, the steps reuse it."""
    pages_per_step = 16 * 16 * 2**20 // 4096
    assert _refaults("low") > 2 * pages_per_step
    assert _refaults("hold") < pages_per_step // 16


def test_hold_freed_heap_fixes_both_thresholds(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(memory, "_MALLOPT", lambda param, value: calls.append((param, value)) or 1)
    assert memory.hold_freed_heap()
    assert calls == [(-3, 32 * 2**20), (-1, 2**31 - 1)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD (malloc.h)
    monkeypatch.setattr(memory, "_MALLOPT", None)  # no glibc: nothing to set
    assert not memory.hold_freed_heap()


def test_the_trainer_holds_the_heap_of_the_process_that_trains(monkeypatch) -> None:
    from detector.train import trainer as trainer_module

    calls = []
    monkeypatch.setattr(trainer_module.memory, "hold_freed_heap", lambda: calls.append(1) or True)
    monkeypatch.setattr(trainer_module.Trainer, "_load_model_source", lambda self: (_ for _ in ()).throw(RuntimeError("stop")))
    trainer = trainer_module.Trainer.__new__(trainer_module.Trainer)
    trainer.resume_ckpt = None  # a new run: its first step reads the model's source (before the data)
    with pytest.raises(RuntimeError, match="stop"):
        trainer.build()
    assert calls == [1]


class _Node:
    """A gc-tracked object that can be weakly referenced."""


def test_collector_skips_the_objects_alive_at_entry_and_takes_them_back_on_exit() -> None:
    import gc
    import weakref

    assert gc.get_freeze_count() == 0
    gc.disable()  # no automatic collection between making the garbage cycle and entering
    try:
        node = _Node()
        node.self = node  # a cycle: only the cyclic collector frees it
        alive = weakref.ref(node)
        del node
        with memory.collector_skips_live_objects():
            assert gc.get_freeze_count() > 0
            made_inside = _Node()
            made_inside.self = made_inside
            inside = weakref.ref(made_inside)
            del made_inside
            gc.collect()
            assert alive() is not None  # frozen at entry: left alone
            assert inside() is None  # made inside: collected as usual
        assert gc.get_freeze_count() == 0
        gc.collect()
        assert alive() is None  # back in the collector's care
    finally:
        gc.enable()


def test_collector_leaves_objects_frozen_by_someone_else_frozen() -> None:
    import gc

    def frozen(obj: object) -> bool:  # the permanent generation is the one gc.get_objects() does not list
        return not any(o is obj for o in gc.get_objects())

    marker = [object()]  # a tracked container; counting frozen objects would not do: any of them may die meanwhile
    gc.freeze()
    try:
        assert frozen(marker)
        with memory.collector_skips_live_objects():
            assert frozen(marker)
        assert frozen(marker)  # their freezer's to unfreeze, not ours
    finally:
        gc.unfreeze()
    assert not frozen(marker)


def test_val_and_predict_hold_the_heap_of_their_process(monkeypatch, tmp_path: Path) -> None:
    import numpy as np

    from detector import api
    from detector.errors import DetectorError

    calls = []
    monkeypatch.setattr(api.memory, "hold_freed_heap", lambda: calls.append(1) or True)
    detector = api.Detector("yolo-ca-n", device="cpu")
    detector.predict(np.zeros((64, 64, 3), dtype=np.uint8), imgsz=64)
    assert calls == [1]
    with pytest.raises(DetectorError, match="missing.yaml"):  # held before the data is even read
        detector.val(data=str(tmp_path / "missing.yaml"), project=str(tmp_path))
    assert calls == [1, 1]


def _fake_proc(monkeypatch, root: Path, files: dict[str, str]) -> None:
    """memory reads /proc/... from root/proc/..., which holds `files` (path -> text); any other path is missing."""
    for name, text in files.items():
        (root / name.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / name.lstrip("/")).write_text(text)
    real_path, real_listdir = memory.Path, os.listdir
    monkeypatch.setattr(memory, "Path", lambda p: real_path(root) / str(p).lstrip("/"))
    monkeypatch.setattr(memory.os, "listdir", lambda p: real_listdir(root / str(p).lstrip("/")))


def test_process_memory_reads_rss_pss_and_private_pages_from_smaps_rollup(monkeypatch, tmp_path: Path) -> None:
    """smaps_rollup's first line is the mapping range; its fields are kB: USS = Private_Clean + Private_Dirty."""
    rollup = ("00400000-7fff0000 ---p 00000000 00:00 0    [rollup]\nRss:  1000 kB\nPss:  600 kB\n"
              "Private_Clean:  100 kB\nPrivate_Dirty:  300 kB\n")
    _fake_proc(monkeypatch, tmp_path, {"/proc/42/smaps_rollup": rollup})
    assert memory.process_memory(42) == {"rss": 1000 * 1024, "uss": 400 * 1024, "pss": 600 * 1024}
    assert memory.process_memory(43) == {"rss": 0, "uss": 0, "pss": 0}  # unreadable: zeros


def test_peak_rss_is_vmhwm_not_the_current_rss(monkeypatch, tmp_path: Path) -> None:
    """peak_rss_bytes is /proc/<pid>/status's VmHWM (kB), 0 where it cannot be read."""
    status = "Name:\tpython\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n"
    _fake_proc(monkeypatch, tmp_path, {"/proc/9/status": status})
    assert memory.peak_rss_bytes(9) == 2048 * 1024
    assert memory.peak_rss_bytes(10) == 0


def test_child_pids_of_every_thread_sorted_once(monkeypatch, tmp_path: Path) -> None:
    """/proc/<pid>/task/<tid>/children of each thread, merged: a child listed twice counts once, in pid order."""
    _fake_proc(monkeypatch, tmp_path, {"/proc/5/task/5/children": "30 10", "/proc/5/task/6/children": "10 20"})
    assert memory.child_pids(5) == [10, 20, 30]


def test_gib_is_binary_gigabytes() -> None:
    """gib() divides by 2**30 and groups thousands."""
    assert memory.gib(3 * 2**30) == "3.0 GiB" and memory.gib(1536 * 2**30) == "1,536.0 GiB"


def test_hold_freed_heap_fails_when_either_threshold_is_refused(monkeypatch) -> None:
    """mallopt returns 0 for a value it refuses: the heap is held only when both thresholds took."""
    for refused in (-3, -1):
        monkeypatch.setattr(memory, "_MALLOPT", lambda param, value, refused=refused: int(param != refused))
        assert not memory.hold_freed_heap()


def test_trim_heap_asks_glibc_to_keep_no_pad(monkeypatch) -> None:
    """trim_heap calls malloc_trim(0): release all free memory at the heap's top."""
    calls = []
    monkeypatch.setattr(memory, "_MALLOC_TRIM", lambda pad: calls.append(pad) or 1)
    memory.trim_heap()
    assert calls == [0]

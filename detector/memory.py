"""This machine's memory, for the checks that refuse work which cannot fit before it is allocated; a process's
memory as Linux reports it (RSS, USS); handing a worker's freed heap back to the OS, and keeping a training
process's; keeping the garbage collector off the long-lived objects while a burst of short-lived ones is made."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def machine_memory_bytes() -> int:
    """Physical memory of this machine (what a run can hope to use at most)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_memory_bytes() -> int:
    """Memory the kernel could hand out now without swapping (/proc/meminfo MemAvailable; the physical memory
    where that file is missing)."""
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return machine_memory_bytes()


def gib(n_bytes: float) -> str:
    """'12.3 GiB'."""
    return f"{n_bytes / 2**30:,.1f} GiB"


def _smaps_rollup(pid: int | str) -> dict[str, int]:
    """/proc/<pid>/smaps_rollup as {field: bytes} (Linux; empty where it cannot be read)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text(encoding="ascii")
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines()[1:]:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name] = int(parts[0]) * 1024
    return fields


def process_memory(pid: int | str = "self") -> dict[str, int]:
    """Bytes of a process's memory: `rss` (resident), `uss` (resident and private to it: what it would free on
    exit; a forked worker's USS grows as it writes into pages it shares with its parent) and `pss`. Linux only
    (/proc/<pid>/smaps_rollup); zeros elsewhere."""
    fields = _smaps_rollup(pid)
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return {"rss": fields.get("Rss", 0), "uss": uss, "pss": fields.get("Pss", 0)}


def child_pids(pid: int | str = "self") -> list[int]:
    """The direct children of a process (e.g. DataLoader workers), from /proc/<pid>/task/*/children (Linux)."""
    pids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return pids
    for task in tasks:
        try:
            pids += [int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text(encoding="ascii").split()]
        except OSError:
            continue
    return sorted(set(pids))


def _load_libc_function(name: str) -> Any:
    try:
        return getattr(ctypes.CDLL(None), name, None)  # glibc's malloc_trim and mallopt; absent on macOS, musl, Windows
    except (OSError, TypeError):
        return None


_MALLOC_TRIM = _load_libc_function("malloc_trim")
_MALLOPT = _load_libc_function("mallopt")
# glibc's mallopt parameters (malloc.h) and the values `hold_freed_heap` sets
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
HELD_MMAP_THRESHOLD = 32 * 2**20  # the largest glibc takes on 64-bit: blocks up to it come from the heap
HELD_TRIM_THRESHOLD = 2**31 - 1  # mallopt's int maximum: free memory at the heap's top stays up to 2 GiB


def hold_freed_heap() -> bool:
    """Keep the memory a training step frees in the process for the next step, instead of handing it back to the
    OS and faulting it in again, zero-filled, on the next allocation (glibc `mallopt`: a fixed 32 MiB mmap
    threshold and a 2 GiB trim threshold; a no-op elsewhere). Returns whether it was applied.

    With glibc's default, adaptive thresholds a CPU training step of the default model (batch 16 at 256 px)
    faulted in 180-200 MB of fresh pages every step in some processes (46,500 minor faults: 405 against 365 ms a
    step) and none in others, by where its first frees fell (README, Benchmarks). Held, no step faults in anything,
    in every process, and the resident memory stays at the peak that every step reaches anyway. It is
    process-wide, so the trainer sets it for the process that trains; forked data workers inherit it and still
    hand their heap back on their own (`trim_heap`)."""
    if _MALLOPT is None:
        return False
    mmap_set = bool(_MALLOPT(_M_MMAP_THRESHOLD, HELD_MMAP_THRESHOLD))
    return bool(_MALLOPT(_M_TRIM_THRESHOLD, HELD_TRIM_THRESHOLD)) and mmap_set


def trim_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc `malloc_trim(0)`; a no-op elsewhere).

    A data worker allocates and frees image-sized buffers (about 1 MB at 640 px, mosaic canvases 5 MB) all the
    time; glibc raises its mmap threshold after the first frees, serves them from the heap, and keeps the freed
    pages resident: a worker's private memory grew by 0.4-1.4 GB in 300 batches at imgsz 640 (the README's
    COCO-scale benchmark), whatever the dataset's layout. Trimming every few dozen samples keeps it near its working set at no
    measurable cost; a fixed low mmap threshold did too but cost 20-40% of the loader's images/s in page faults.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def peak_rss_bytes(pid: int | str = "self") -> int:
    """The process's peak resident memory since it started its program (VmHWM; unlike `ru_maxrss` it does not
    carry over the parent's size through fork + exec); 0 where /proc cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@contextlib.contextmanager
def collector_skips_live_objects() -> Iterator[None]:
    """Inside, Python's cyclic garbage collector leaves every object alive at entry alone (`gc.freeze`); on exit
    they return to its oldest generation (`gc.unfreeze`), so nothing is kept from collection for longer.

    Why: COCO scoring makes a dict per detection (45,000 for the hard set's 150 val images from a barely trained
    model), and the full collections those allocations trigger walk every object in the process: 400,000 after
    importing torch, more in a trainer. There, scoring took 0.20 s to build its dicts instead of 0.05 s frozen. A
    no-op where objects are frozen already (unfreezing them is their freezer's call)."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()

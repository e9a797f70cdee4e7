"""This machine's memory, for the checks that refuse work which cannot fit before it is allocated."""

from __future__ import annotations

import os


def machine_memory_bytes() -> int:
    """Physical memory of this machine (what a run can hope to use at most)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gib(n_bytes: float) -> str:
    """'12.3 GiB'."""
    return f"{n_bytes / 2**30:,.1f} GiB"

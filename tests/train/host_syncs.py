"""What a CUDA run would wait on, seen on the CPU: the aten ops a callable dispatches that make the host wait for
the GPU (a scalar read, a `nonzero`, a boolean index) or copy Python data into a tensor (`torch.tensor(list)`: on a
GPU a blocking host-to-device copy). Lets the CPU suite hold the hot path to torch's sync debug mode's standard."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# ops that read a device value on the host, or size their result by one
_WAITING = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique")
_FROM_PYTHON = "aten.lift_fresh"  # torch.tensor / new_tensor / as_tensor of Python data
_INDEXING = ("aten.index.", "aten.index_put")  # waiting when an index is boolean (a nonzero inside)


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = str(func)
        if name.startswith(_WAITING) or name.startswith(_FROM_PYTHON):
            self.found.append(name)
        elif name.startswith(_INDEXING) and any(isinstance(a, torch.Tensor) and a.dtype == torch.bool
                                                for a in tree_leaves((args[1:], kwargs))):
            self.found.append(f"{name} (boolean index)")
        return func(*args, **(kwargs or {}))


def host_syncs(fn: Callable[[], Any]) -> list[str]:
    """The ops of `fn()` that would make a CUDA step wait (see the module doc), in call order."""
    with _Recorder() as recorder:
        fn()
    return recorder.found

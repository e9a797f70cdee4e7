"""torchrun integration: process-group setup from the environment, rank queries, barriers.

No home-made launching: `torchrun --nproc_per_node N -m detector train ...` sets RANK, LOCAL_RANK and
WORLD_SIZE; a plain `detector train` is world size 1 and never touches torch.distributed.

A job that trains several runs (`detector tune`'s trials, `detector ablate`'s variants) holds one process group for
all of them (`shared_process_group`): a rank that set the group up again while another still held the old one
broke it (gloo: "Connection reset by peer", or a barrier that never returned; seen with 2 CPU ranks).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # ranks on this machine (they share its cores and memory)
    owns_group: bool = False  # this process group was set up by the call that returned this, so `shutdown` ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU), setting it up unless it already is; world size 1
    without torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank=int(os.environ["RANK"]), world_size=world_size,
                    local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))), owns_group=owns)


@contextlib.contextmanager
def shared_process_group(device: torch.device) -> Iterator[DistInfo]:
    """The process group of a job that trains several runs, held across all of them: each run's trainer joins it
    and leaves it standing; it ends when the block does. World size 1 without torchrun."""
    info = init_distributed(device)
    try:
        yield info
    finally:
        shutdown(info)


def barrier(info: DistInfo) -> None:
    """Wait for every rank (rank 0 evaluates and saves while the others wait here)."""
    if info.enabled and dist.is_initialized():
        dist.barrier()


def broadcast_flag(info: DistInfo, value: bool) -> bool:
    """Rank 0's decision (e.g. early stop) for every rank."""
    return bool(broadcast_int(info, int(value)))


def broadcast_int(info: DistInfo, value: int) -> int:
    """Rank 0's integer (e.g. the epoch count fitted to a time budget) for every rank."""
    if not (info.enabled and dist.is_initialized()):
        return value
    # NCCL only moves CUDA tensors (the trainer has set this rank's device); gloo moves CPU ones
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def all_ranks_true(info: DistInfo, flag: torch.Tensor) -> torch.Tensor:
    """Whether a per-rank bool tensor holds on every rank, as a bool tensor on `flag`'s device (one MIN all-reduce,
    no host sync): ranks that decide by it take the same branch, where a rank's own view could leave one rank
    stopping while the others wait for it in the next collective."""
    if not (info.enabled and dist.is_initialized()):
        return flag
    value = flag.to(torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value.bool()


def shutdown(info: DistInfo) -> None:
    """End the process group if `info`'s call set it up (a shared one outlives the runs inside it)."""
    if info.enabled and info.owns_group and dist.is_initialized():
        dist.destroy_process_group()

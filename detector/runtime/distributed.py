"""torchrun integration: process-group setup from the environment, rank queries, barriers.

No home-made launching: `torchrun --nproc_per_node N -m detector train ...` sets RANK, LOCAL_RANK and
WORLD_SIZE; a plain `detector train` is world size 1 and never touches torch.distributed.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # ranks on this machine (they share its cores and memory)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU); world size 1 without torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(rank=int(os.environ["RANK"]), local_rank=int(os.environ.get("LOCAL_RANK", "0")), world_size=world_size,
                    local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return info


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


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()

"""Where and how the model runs: the torch device, the autocast dtype, the memory format, the wrapper to see through.

Mixed precision policy (`amp=auto`): bf16 on CUDA GPUs with native bf16 (Ampere and newer), fp16 with a
GradScaler on older GPUs, bf16 on CPUs with bf16 matrix units (Intel AMX or AVX512-BF16), off elsewhere. On a
CPU without them bf16 is emulated and far slower than fp32 (on this project's 2-core AMD EPYC, AVX2 only: a
2048x2048 bf16 matrix product took 54 s against 0.13 s in fp32, a small conv net's forward+backward 9x longer),
so `auto` leaves such CPUs in fp32. fp16 on a CPU gains nothing and is turned off with a warning.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from detector.errors import DetectorError
from detector.runtime.machine import bf16_units

LOGGER = logging.getLogger(__name__)

AMP_CHOICES = ("auto", "bf16", "fp16", "off")
_DEVICE_FORMS = "'' (auto), cpu, cuda, mps, 0, 0,1 or cuda:1"


def select_device(spec: str = "") -> torch.device:
    """The device for this process from the user's `device=` value.

    '' picks CUDA when there is a GPU, else the CPU; 'cuda' / '0' / 'cuda:1' name a GPU; '0,1' lists the GPUs of a
    torchrun job, and each process takes the one at its LOCAL_RANK (torchrun sets it). Under torchrun '' and
    'cuda' also mean the GPU at LOCAL_RANK. A GPU that is not there raises DetectorError naming it.
    """
    text = str(spec).strip().lower().replace(" ", "")
    local_rank = int(os.environ.get("LOCAL_RANK", "-1"))
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not torch.backends.mps.is_available():
            raise DetectorError("device 'mps': Apple MPS is not available on this machine")
        return torch.device("mps")
    if text == "":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return _cuda_device(max(local_rank, 0), spec)
    if text == "cuda":
        return _cuda_device(max(local_rank, 0), spec)
    if text.startswith("cuda:"):
        text = text[len("cuda:") :]
    ids = text.split(",")
    if not all(part.isdigit() for part in ids):
        raise DetectorError(f"device '{spec}': not a device; use {_DEVICE_FORMS}")
    if local_rank < 0:
        if len(ids) > 1:
            raise DetectorError(
                f"device '{spec}': several GPUs train through torchrun, one process per GPU: "
                f"torchrun --nproc_per_node {len(ids)} -m detector train device={text} ..."
            )
        return _cuda_device(int(ids[0]), spec)
    if local_rank >= len(ids):
        raise DetectorError(f"device '{spec}': torchrun process LOCAL_RANK={local_rank} has no GPU in this list of {len(ids)}")
    return _cuda_device(int(ids[local_rank]), spec)


def _cuda_device(index: int, spec: str) -> torch.device:
    if not torch.cuda.is_available():
        raise DetectorError(f"device '{spec}': CUDA is not available (no GPU visible to torch {torch.__version__}); use device=cpu")
    count = torch.cuda.device_count()
    if index >= count:
        raise DetectorError(f"device '{spec}': CUDA device {index} not found (this machine has {count}: 0..{count - 1})")
    return torch.device("cuda", index)


def cpu_supports_bf16() -> bool:
    """True when this CPU multiplies bf16 matrices in hardware (Intel AMX-BF16 or AVX512-BF16).

    Other CPUs (AVX2 and plain AVX-512 x86, ARM) are reported False: there oneDNN emulates bf16 and it is slower
    than fp32 (`machine.bf16_units`).
    """
    return bool(bf16_units())


@dataclass(frozen=True)
class AmpChoice:
    """What `amp=` gives on a device: the autocast dtype (None: fp32) and the line that says why ('' for amp=off);
    `warning`: an explicit choice that is ignored or costs speed."""

    dtype: torch.dtype | None
    reason: str = ""
    warning: bool = False


def autocast_dtype(device: torch.device, amp: str | bool) -> torch.dtype | None:
    """The `torch.autocast` dtype for `amp` ('auto', 'bf16', 'fp16', 'off', True = auto, False = off), or None.

    Call once at set-up: it logs the decision and why.
    """
    choice = amp_choice(device, amp)
    if choice.reason:
        (LOGGER.warning if choice.warning else LOGGER.info)(choice.reason)
    return choice.dtype


def amp_choice(device: torch.device, amp: str | bool) -> AmpChoice:
    """`autocast_dtype`'s decision without the log line (`detector env` shows it for every device)."""
    choice = {True: "auto", False: "off"}.get(amp, amp) if isinstance(amp, bool) else str(amp).strip().lower()
    if choice not in AMP_CHOICES:
        raise DetectorError(f"amp: '{amp}' is not one of {', '.join(AMP_CHOICES)}")
    if choice == "off":
        return AmpChoice(None)
    if device.type == "cuda":
        return _cuda_amp(device, choice)
    if device.type == "cpu":
        return _cpu_amp(choice)
    if choice == "auto":
        return AmpChoice(None, f"amp: off on {device} (auto mixed precision covers CUDA and bf16-capable CPUs)")
    return AmpChoice(torch.bfloat16 if choice == "bf16" else torch.float16)


def _cuda_amp(device: torch.device, choice: str) -> AmpChoice:
    with torch.cuda.device(device):
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    name = torch.cuda.get_device_name(device)
    if choice == "fp16" or (choice == "auto" and not native_bf16):
        return AmpChoice(torch.float16, f"amp: fp16 autocast with a gradient scaler on {device} ({name})")
    if not native_bf16:
        raise DetectorError(f"amp=bf16: {device} ({name}) has no native bf16; use amp=fp16 or amp=auto")
    return AmpChoice(torch.bfloat16, f"amp: bf16 autocast on {device} ({name})")


def _cpu_amp(choice: str) -> AmpChoice:
    fast = cpu_supports_bf16()
    if choice == "fp16":
        ignored = "amp=fp16 ignored on the CPU (no speed-up there): training in fp32; amp=bf16 is the CPU option"
        return AmpChoice(None, ignored, warning=True)
    if choice == "bf16":
        slow = "" if fast else "amp=bf16 on a CPU without AMX/AVX512-BF16: bf16 is emulated and much slower than fp32"
        return AmpChoice(torch.bfloat16, slow, warning=True)
    if fast:
        return AmpChoice(torch.bfloat16, "amp: bf16 autocast on the CPU (AMX/AVX512-BF16 present)")
    return AmpChoice(None, "amp: off on this CPU (no AMX/AVX512-BF16, so bf16 would be emulated and slower than fp32)")


def device_clock(device: torch.device) -> float:
    """time.perf_counter() once `device` has finished its queued work (a CPU-GPU sync on CUDA, a plain read
    elsewhere), so a timed stage's seconds are its own and not the queue's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def needs_grad_scaler(dtype: torch.dtype | None) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none."""
    return dtype == torch.float16


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel / DataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model

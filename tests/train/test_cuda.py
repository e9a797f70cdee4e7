"""What only a CUDA GPU can check (#16 item 7): fp16 training through the GradScaler, an overflowing fp16 step
skipped with the scale backed off, bf16 autocast on the GPU, channels_last and contiguous layouts agreeing there.

Skipped without CUDA, as in CI. `bash scripts/gpu_check.sh` runs them on a lent GPU, with the NCCL and SyncBN
drill of tests/reliability/test_ddp.py (two GPUs) and the throughput tables."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from detector.data.transforms import to_model_input
from detector.models.builder import build_model
from detector.runtime.checkpoint import load_checkpoint
from detector.train.trainer import Trainer, train
from tiny_run import make_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ON_GPU = {"device": "0", "epochs": "1"}  # over the trainer tests' tiny run


@pytest.mark.parametrize(("amp", "scaled"), [("fp16", True), ("bf16", False)])
def test_a_gpu_run_trains_in_its_precision_and_saves_the_scalers_state(tiny_data: Path, tmp_path: Path, amp: str,
                                                                        scaled: bool) -> None:
    train(make_config(tiny_data, tmp_path, **ON_GPU, amp=amp))
    ckpt = load_checkpoint(tmp_path / "exp" / "weights" / "last.pt")
    assert (ckpt["scaler"] is not None) == scaled  # fp16 needs the GradScaler; bf16 has fp32's range
    if scaled:
        assert ckpt["scaler"]["scale"] > 0
    assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_an_overflowing_fp16_step_is_skipped_and_the_scale_backs_off(tiny_data: Path, tmp_path: Path) -> None:
    trainer = Trainer(make_config(tiny_data, tmp_path, **ON_GPU, amp="fp16"))
    try:
        trainer.build()
        assert trainer.scaler.is_enabled() and trainer.amp_dtype == torch.float16
        batch = next(iter(trainer.train_loader))
        images = to_model_input(batch["images"], trainer.device, channels_last=True)
        trainer._forward_backward(images, batch["targets"], sync_now=True)
        next(p for p in trainer.model.parameters() if p.grad is not None).grad.fill_(math.inf)
        before = [p.detach().clone() for p in trainer.model.parameters()]
        scale = trainer.scaler.get_scale()
        assert trainer._optimizer_step(torch.tensor(True, device=trainer.device)) == "overflow"  # the scaler's own skip
        assert trainer.scaler.get_scale() == scale * trainer.scaler.get_backoff_factor()
        assert all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
    finally:
        trainer.close()


@pytest.mark.parametrize("amp", [None, torch.bfloat16, torch.float16])
def test_channels_last_and_contiguous_give_the_same_training_gradients_on_the_gpu(amp: torch.dtype | None) -> None:
    """The trainer's default layout (channels_last) against the plain one: the same loss and gradients up to the
    precision's rounding, through cuDNN's kernels for each."""
    from detector.train.loss import build_loss

    torch.manual_seed(0)
    model = build_model("yolo-ca-n", nc=3).cuda().train()
    images = torch.rand(4, 3, 128, 128, device="cuda")
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.2], [2, 0, 0.3, 0.6, 0.1, 0.1], [3, 2, 0.7, 0.4, 0.2, 0.4]])
    criterion = build_loss(model.head, imgsz=128)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        model = model.to(memory_format=layout)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
            raw = model(images.contiguous(memory_format=layout))
        loss, _ = criterion(raw, targets)
        loss.backward()
        results.append((loss.detach(), [p.grad.float().clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    tol = 1e-4 if amp is None else 5e-2
    assert torch.allclose(loss_a, loss_b, rtol=tol)
    total_a = torch.cat([g.flatten() for g in grads_a])
    total_b = torch.cat([g.flatten() for g in grads_b])
    assert (total_a - total_b).norm() <= tol * total_a.norm()


def test_the_aligned_loss_queues_its_work_without_waiting_for_the_gpu() -> None:
    """loss_aligned builds the targets on the host and sends them on without a stream sync: a step's loss must
    not wait for its own forward (torch's sync debug mode raises on any wait), in both assignment modes."""
    from detector.train.loss import build_loss

    model = build_model("yolo-ca-n", nc=3).cuda().train()
    images = torch.rand(4, 3, 128, 128, device="cuda")
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.2], [2, 0, 0.3, 0.6, 0.1, 0.1], [3, 2, 0.7, 0.4, 0.2, 0.4]])
    criterion = build_loss(model.head, imgsz=128, static_assign_epochs=1)
    for epoch in (0, 1):  # the anchor-box assignment, then the task-aligned one
        criterion.set_epoch(epoch)
        criterion(model(images), targets)  # the first call reads the head's strides once (its grid cache)
        _loss_without_waiting(criterion, model(images), targets)


def test_the_yolo_loss_queues_its_work_without_waiting_for_the_gpu() -> None:
    """YoloLoss (the Detect head's): the targets come pinned from the loader and go over without waiting, the cell
    offsets and grid sizes are built at the first call at a set of map shapes only (`target_constants`), and the
    CIoU has no boolean index (detector.train.ciou): a step's loss must not wait for its own forward. The CPU suite
    holds the backward to the same standard (tests/train/test_loss.py, `host_syncs`)."""
    from detector.train.loss import build_loss
    from repo_paths import REPO_ROOT

    model = build_model(REPO_ROOT / "configs" / "models" / "yolo-ca-n-v5head.yaml", nc=3).cuda().train()
    images = torch.rand(4, 3, 128, 128, device="cuda")
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.2], [2, 0, 0.3, 0.6, 0.1, 0.1], [3, 2, 0.7, 0.4, 0.2, 0.4]])
    targets = targets.pin_memory()  # as the train loader gives them on a CUDA machine
    criterion = build_loss(model.head, imgsz=128)
    criterion(model(images), targets)  # the first call builds the target constants on the GPU once
    _loss_without_waiting(criterion, model(images), targets)


def _loss_without_waiting(criterion: Any, raw: list[torch.Tensor], targets: torch.Tensor) -> None:
    """The loss of `raw` under torch's sync debug mode "error" (any wait for the GPU raises), and finite."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, parts = criterion(raw, targets)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss) and torch.isfinite(parts).all()

"""BatchNormState: a skipped forward's running statistics are undone, a taken step's kept."""

from __future__ import annotations

import torch
from torch import nn

from detector.train.batchnorm_state import BatchNormState


def test_restore_undoes_a_nan_forward_and_save_keeps_a_good_one() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU(), nn.SyncBatchNorm(4)).train()
    state = BatchNormState(model)
    model(torch.randn(2, 3, 8, 8))
    state.save()
    good = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "tracked" in k}
    assert good["1.num_batches_tracked"] == 1 and not torch.equal(good["1.running_mean"], torch.zeros(4))
    model(torch.full((2, 3, 8, 8), float("inf")))
    assert not torch.isfinite(model[1].running_mean).all() and model[1].num_batches_tracked == 2
    state.restore()
    for key, value in good.items():
        assert torch.equal(model.state_dict()[key], value), key

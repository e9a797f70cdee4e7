"""Parameter groups, optimizer construction, weight-decay scaling and the lr/momentum schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from detector.errors import DetectorError
from detector.train import optim
from detector.train.optim import (
    LRSchedule,
    build_optimizer,
    fused_kernels_apply,
    match_grad_layouts,
    param_groups,
    scaled_weight_decay,
)


class _PosEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 8, 4))


class _Marked(nn.Module):
    no_weight_decay = True

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(4, 4))


class _Net(nn.Module):
    """conv+bn, a biased conv, an attention-like part with a position embedding, a gate scalar, LayerNorm, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.post = nn.Conv2d(8, 8, 1)  # 'post' must not be mistaken for a position embedding
        self.pos_h = _PosEmbed()
        self.marked = _Marked()
        self.gamma = nn.Parameter(torch.zeros(1))
        self.norm = nn.LayerNorm(8)
        self.group_norm = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 2)
        self.shared = self.fc  # the same parameters reachable twice


def _ids(params: list[nn.Parameter]) -> set[int]:
    return {id(p) for p in params}


def test_group_membership() -> None:
    net = _Net()
    groups = param_groups(net)
    assert _ids(groups["decay"]) == _ids([net.conv.weight, net.post.weight, net.fc.weight])
    assert _ids(groups["no_decay"]) == _ids([net.bn.weight, net.pos_h.weight, net.marked.table, net.gamma, net.norm.weight, net.group_norm.weight])
    assert _ids(groups["bias"]) == _ids([net.bn.bias, net.post.bias, net.norm.bias, net.group_norm.bias, net.fc.bias])
    total = sum(len(g) for g in groups.values())
    assert total == len(list(net.parameters()))  # every parameter exactly once
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight  # one parameter in two modules (tied weights): named_modules visits both
    assert [len(g) for g in param_groups(tied).values()] == [1, 0, 2]  # decay, no_decay, bias


def test_a_parameter_named_pos_is_a_position_embedding_and_frozen_weights_stay_out() -> None:
    """'pos' as a whole name part is a position embedding (no decay); a frozen weight is in no group, so the
    optimizer never decays or steps it, while its trainable bias still is."""
    net = nn.Module()
    net.pos = nn.Parameter(torch.zeros(1, 8, 4))
    net.stem = nn.Conv2d(3, 8, 3)
    net.head = nn.Conv2d(8, 8, 1)
    net.stem.weight.requires_grad_(False)
    groups = param_groups(net)
    assert _ids(groups["no_decay"]) == _ids([net.pos])
    assert _ids(groups["decay"]) == _ids([net.head.weight])
    assert _ids(groups["bias"]) == _ids([net.stem.bias, net.head.bias])
    optimizer = build_optimizer(net, "AdamW", lr=0.01, momentum=0.9, weight_decay=0.05)
    assert id(net.stem.weight) not in {id(p) for g in optimizer.param_groups for p in g["params"]}


def test_sgd() -> None:
    net = _Net()
    opt = build_optimizer(net, "SGD", lr=0.01, momentum=0.937, weight_decay=5e-4)
    assert isinstance(opt, torch.optim.SGD)
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay", "bias"]
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0, 0.0]
    assert all(g["nesterov"] and g["momentum"] == 0.937 and g["lr"] == 0.01 for g in opt.param_groups)


@pytest.mark.parametrize(("name", "cls"), [("AdamW", torch.optim.AdamW), ("adamw", torch.optim.AdamW), ("Adam", torch.optim.Adam), ("sgd", torch.optim.SGD)])
def test_optimizer_names(name: str, cls: type) -> None:
    opt = build_optimizer(_Net(), name, lr=0.001, momentum=0.937, weight_decay=0.05)
    assert type(opt) is cls
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0, 0.0]
    if cls is not torch.optim.SGD:  # beta1 is the momentum (not torch's default 0.9)
        assert all(g["betas"] == (0.937, 0.999) for g in opt.param_groups)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_cpu_optimizers_are_fused_and_step_as_the_per_tensor_loop(name: str) -> None:
    """The fused kernel is the same update as torch's per-tensor loop (to float rounding) over several steps."""
    torch.manual_seed(0)

    def net() -> nn.Module:  # the three groups: decayed conv weights, BN weights, biases
        return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1))

    fused_net, loop_net = net(), net()
    loop_net.load_state_dict(fused_net.state_dict())
    start = [p.detach().clone() for p in fused_net.parameters()]
    fused = build_optimizer(fused_net, name, lr=0.01, momentum=0.9, weight_decay=5e-4)
    loop = build_optimizer(loop_net, name, lr=0.01, momentum=0.9, weight_decay=5e-4)
    for group in loop.param_groups:
        group["fused"] = False
    assert all(g["fused"] for g in fused.param_groups)
    x = torch.randn(4, 3, 8, 8)
    for _ in range(3):
        for net, opt in ((fused_net, fused), (loop_net, loop)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(fused_net.parameters(), loop_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(not torch.equal(a, b) for a, b in zip(fused_net.parameters(), start))  # every group moved


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_fused_step_on_a_gradient_laid_out_unlike_its_parameter(name: str) -> None:
    """A channels_last weight with a contiguous gradient: after `match_grad_layouts` the fused kernel makes the
    loop's update, with the gradient's values unchanged; a gradient already in layout is left as it is."""
    torch.manual_seed(0)
    weights = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    nets = [nn.Conv2d(4, 8, 3, bias=False).to(memory_format=torch.channels_last) for _ in range(2)]
    optimizers = []
    for net, fused in zip(nets, (True, False)):
        net.weight.data.copy_(weights)
        optimizers.append(build_optimizer(net, name, lr=0.01, momentum=0.9, weight_decay=5e-4))
        for group in optimizers[-1].param_groups:
            group["fused"] = fused
    for _ in range(5):
        grad = torch.randn(8, 4, 3, 3)  # contiguous: not the parameter's layout
        for net, opt in zip(nets, optimizers):
            net.weight.grad = grad.clone()
            assert match_grad_layouts([net.weight]) == 1
            assert net.weight.grad.stride() == net.weight.stride()
            torch.testing.assert_close(net.weight.grad, grad, rtol=0, atol=0)
            opt.step()
    torch.testing.assert_close(nets[0].weight, nets[1].weight, rtol=1e-5, atol=1e-6)
    in_layout = nets[0].weight.grad
    assert match_grad_layouts([nets[0].weight, nn.Parameter(torch.zeros(3))]) == 0  # no gradient: skipped
    assert nets[0].weight.grad is in_layout
    pointwise = nn.Parameter(torch.zeros(8, 4, 1, 1).to(memory_format=torch.channels_last))
    pointwise.grad = torch.ones(8, 4, 1, 1)  # strides differ only in size-1 dims: the same memory order
    assert pointwise.grad.stride() != pointwise.stride() and match_grad_layouts([pointwise]) == 0


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_a_fused_optimizer_lays_out_the_gradients_itself_before_each_step(name: str) -> None:
    """Whoever calls `step()` on `build_optimizer`'s fused optimizer, a contiguous gradient of a channels_last
    weight gets the per-tensor loop's update (torch's fused CPU kernel alone is 0.1-0.3 off after 5 steps)."""
    torch.manual_seed(0)
    weights = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    fused_net, loop_net = (nn.Conv2d(4, 8, 3, bias=False).to(memory_format=torch.channels_last) for _ in range(2))
    fused_net.weight.data.copy_(weights)
    loop_net.weight.data.copy_(weights)
    fused = build_optimizer(fused_net, name, lr=0.01, momentum=0.9, weight_decay=5e-4)
    loop = build_optimizer(loop_net, name, lr=0.01, momentum=0.9, weight_decay=5e-4)
    for group in loop.param_groups:
        group["fused"] = False
    assert fused.param_groups[0]["fused"]
    for _ in range(5):
        grad = torch.randn(8, 4, 3, 3)  # contiguous: not the parameter's layout
        fused_net.weight.grad, loop_net.weight.grad = grad.clone(), grad.clone()
        fused.step()
        loop.step()
    assert fused_net.weight.grad.stride() == fused_net.weight.stride()
    torch.testing.assert_close(fused_net.weight, loop_net.weight, rtol=1e-5, atol=1e-6)


def test_fused_kernels_need_one_supported_device_and_floating_parameters() -> None:
    assert fused_kernels_apply([nn.Parameter(torch.zeros(2))])
    assert not fused_kernels_apply([])  # nothing to train (every row frozen)
    assert not fused_kernels_apply([nn.Parameter(torch.zeros(2, device="meta"))])
    assert not fused_kernels_apply([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, device="meta"))])


def test_fused_kernels_need_a_single_device_even_of_supported_types(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two devices that each have kernels still cannot share one fused step (e.g. cpu and cuda)."""
    monkeypatch.setattr(optim, "FUSED_DEVICE_TYPES", ("cpu", "meta"))
    assert fused_kernels_apply([nn.Parameter(torch.zeros(2, device="meta"))])
    assert not fused_kernels_apply([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, device="meta"))])


def test_unknown_optimizer() -> None:
    with pytest.raises(DetectorError, match="optimizer: unknown 'RMSprop'; choose one of SGD, Adam, AdamW"):
        build_optimizer(_Net(), "RMSprop", lr=0.01, momentum=0.9, weight_decay=0.0)


def test_optimizer_steps_with_empty_groups() -> None:
    net = nn.Conv2d(3, 4, 1, bias=False)  # no norm layers, no biases: two groups are empty
    opt = build_optimizer(net, "SGD", lr=0.1, momentum=0.9, weight_decay=0.0)
    net(torch.randn(1, 3, 2, 2)).sum().backward()
    before = net.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, net.weight)


@pytest.mark.parametrize(("batch", "accumulate", "expected"), [(16, 4, 5e-4), (64, 1, 5e-4), (8, 8, 5e-4), (48, 1, 3.75e-4), (128, 1, 1e-3)])
def test_scaled_weight_decay(batch: int, accumulate: int, expected: float) -> None:
    assert scaled_weight_decay(5e-4, batch, accumulate, nbs=64) == pytest.approx(expected)


def _schedule(**overrides: object) -> LRSchedule:
    args: dict = dict(lr0=0.01, lrf=0.01, epochs=10, iters_per_epoch=50, warmup_iters=100, momentum=0.937, warmup_momentum=0.8, warmup_bias_lr=0.1, cos_lr=True)
    args.update(overrides)
    return LRSchedule(**args)


def test_warmup_endpoints() -> None:
    s = _schedule()
    assert s.lr(0, 0, "bias") == pytest.approx(0.1)
    assert s.lr(0, 0, "decay") == 0.0
    assert s.lr(0, 0, "no_decay") == 0.0
    assert s.momentum_at(0, 0) == pytest.approx(0.8)
    # halfway (iteration 50 = epoch 1, iteration 0): halfway between the start and epoch 1's scheduled lr
    target = 0.01 * s.factor(1)
    assert s.lr(1, 0, "decay") == pytest.approx(target / 2)
    assert s.lr(1, 0, "bias") == pytest.approx((0.1 + target) / 2)
    assert s.momentum_at(1, 0) == pytest.approx((0.8 + 0.937) / 2)
    # warmup done at iteration 100 (epoch 2, iteration 0): every group on the schedule
    for group in ("decay", "no_decay", "bias"):
        assert s.lr(2, 0, group) == 0.01 * s.factor(2)  # the schedule itself, not a blend that rounds to near it
    assert s.momentum_at(2, 0) == pytest.approx(0.937)
    assert s.momentum_at(9, 49) == pytest.approx(0.937)


def test_no_warmup() -> None:
    s = _schedule(warmup_iters=0)
    assert s.lr(0, 0, "bias") == pytest.approx(0.01)
    assert s.momentum_at(0, 0) == pytest.approx(0.937)


@pytest.mark.parametrize("cos_lr", [True, False])
def test_decay_endpoints(cos_lr: bool) -> None:
    s = _schedule(epochs=11, warmup_iters=10, cos_lr=cos_lr)
    assert s.lr(0, 10, "decay") == pytest.approx(0.01)  # lr0 right after warmup
    assert s.lr(10, 49, "decay") == pytest.approx(0.01 * 0.01)  # lr0 * lrf in the last epoch
    assert s.factor(5) == pytest.approx((1 + 0.01) / 2)  # both shapes pass the midpoint halfway
    factors = [s.factor(e) for e in range(11)]
    assert factors == sorted(factors, reverse=True)


def test_cosine_shape() -> None:
    s = _schedule(epochs=11)
    for epoch in range(11):
        assert s.factor(epoch) == pytest.approx(0.01 + 0.99 * (1 + math.cos(math.pi * epoch / 10)) / 2)


def test_linear_shape() -> None:
    s = _schedule(epochs=11, cos_lr=False)
    steps = [s.factor(e) - s.factor(e + 1) for e in range(10)]
    assert steps == pytest.approx([0.099] * 10)


def test_single_epoch_run() -> None:
    assert _schedule(epochs=1).factor(0) == 1.0


def test_apply_sgd_and_adamw() -> None:
    s = _schedule()
    sgd = build_optimizer(_Net(), "SGD", lr=0.01, momentum=0.937, weight_decay=5e-4)
    s.apply(sgd, 0, 25)
    assert [g["lr"] for g in sgd.param_groups] == pytest.approx([0.0025 * s.factor(0)] * 2 + [0.1 - 0.25 * (0.1 - 0.01)])
    assert all(g["momentum"] == pytest.approx(0.8 + 0.25 * 0.137) for g in sgd.param_groups)
    adamw = build_optimizer(_Net(), "AdamW", lr=0.01, momentum=0.937, weight_decay=5e-4)
    s.apply(adamw, 0, 25)
    assert all(g["betas"] == pytest.approx((0.8 + 0.25 * 0.137, 0.999)) for g in adamw.param_groups)


def test_resume_is_a_function_of_epoch_and_iteration() -> None:
    """A run resumed at epoch 3 with a fresh schedule and optimizer sees the same lr/momentum as an unbroken one."""
    net = _Net()
    unbroken = build_optimizer(net, "SGD", lr=0.01, momentum=0.937, weight_decay=5e-4)
    s = _schedule(epochs=6, iters_per_epoch=40, warmup_iters=130)  # warmup ends inside epoch 3
    seen = {}
    for epoch in range(6):
        for i in range(40):
            s.apply(unbroken, epoch, i)
            seen[epoch, i] = [(g["lr"], g["momentum"]) for g in unbroken.param_groups]

    resumed = build_optimizer(net, "SGD", lr=0.01, momentum=0.937, weight_decay=5e-4)
    resumed.load_state_dict(unbroken.state_dict())
    fresh = _schedule(epochs=6, iters_per_epoch=40, warmup_iters=130)
    for epoch in range(3, 6):
        for i in range(40):
            fresh.apply(resumed, epoch, i)
            assert [(g["lr"], g["momentum"]) for g in resumed.param_groups] == seen[epoch, i]
    assert [g["name"] for g in resumed.param_groups] == ["decay", "no_decay", "bias"]

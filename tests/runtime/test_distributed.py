"""The process group's owner: a trainer inside `shared_process_group` (tune's trials, ablate's variants) joins the
group and leaves it standing; the group ends with the block. Two real ranks: tests/reliability/test_ddp.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from detector.runtime.distributed import DistInfo, all_ranks_true, init_distributed, shared_process_group, shutdown


@pytest.fixture
def one_rank_job(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """What torchrun sets for a job; the group itself is a one-rank gloo group on an in-memory store (no peer to
    wait for), so `WORLD_SIZE` says 2 only to make the functions take the distributed path."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    real_init = dist.init_process_group
    one_rank = lambda backend, timeout: real_init(backend, store=dist.HashStore(), rank=0, world_size=1)  # noqa: E731
    monkeypatch.setattr(dist, "init_process_group", one_rank)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_run_inside_a_shared_group_leaves_it_standing(one_rank_job: None) -> None:
    with shared_process_group(torch.device("cpu")) as job:
        assert job.owns_group and dist.is_initialized() and job.is_main
        for _ in range(2):  # two runs, as tune's trials: each joins, neither ends the group
            run = init_distributed(torch.device("cpu"))
            assert run.enabled and not run.owns_group
            shutdown(run)
            assert dist.is_initialized()
    assert not dist.is_initialized()  # the block ended it


def test_a_run_on_its_own_sets_the_group_up_and_ends_it(one_rank_job: None) -> None:
    run = init_distributed(torch.device("cpu"))
    assert run.owns_group and dist.is_initialized()
    shutdown(run)
    assert not dist.is_initialized()


def test_without_torchrun_nothing_is_set_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with shared_process_group(torch.device("cpu")) as job:
        assert not job.enabled and not job.owns_group and not dist.is_initialized()


VOTES = [[True, True], [True, False], [False, True]]


def _vote(rank: int, store_file: str, out_file: str) -> None:
    """Each of VOTES in turn through one process group: rank r votes votes[r]."""
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    try:
        info = DistInfo(rank=rank, world_size=2, local_world_size=2)
        torch.save([all_ranks_true(info, torch.tensor(votes[rank])) for votes in VOTES], f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_all_ranks_true_is_the_same_verdict_on_every_rank(tmp_path) -> None:
    """Two real gloo ranks: one rank's False is every rank's False (the fp16 step outcome they must agree on)."""
    import torch.multiprocessing as mp

    out = tmp_path / "agreed"
    mp.spawn(_vote, args=(str(tmp_path / "store"), str(out)), nprocs=2)
    for rank in range(2):
        agreed = torch.load(f"{out}.{rank}", weights_only=True)
        assert [a.dtype for a in agreed] == [torch.bool] * 3
        assert [bool(a) for a in agreed] == [True, False, False]  # all(votes) of each of VOTES
    assert all_ranks_true(DistInfo(), torch.tensor(False)).item() is False  # one process: its own flag

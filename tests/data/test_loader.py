"""Loaders: the batch format, negatives, rectangular val batches, mosaic switched off inside persistent workers,
images that break after the scan (RELIABILITY row 3), worker errors naming the file (row 34), seeding, DDP."""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from detector.config import TrainConfig
from detector.data import transforms
from detector import memory
from detector.data import loader as loader_module
from detector.data.coco import CocoDataset
from detector.data.loader import (TrainDataset, build_train_loader, build_val_loader, cache_bytes, collate, rect_batch_shapes,
                                  resolve_worker_priority, resolve_workers)
from detector.errors import DetectorError

NO_MOSAIC = replace(TrainConfig(), mosaic=0.0)


def test_train_batch_format(make_coco) -> None:
    loader = build_train_loader(make_coco(), imgsz=64, batch_size=4, workers=0, hyp=TrainConfig(), seed=0)
    batch = next(iter(loader))
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (4, 3, 64, 64)
    targets = batch["targets"]
    assert targets.dtype == torch.float32 and targets.shape[1] == 6 and len(targets) > 0
    assert set(targets[:, 0].tolist()) <= {0.0, 1.0, 2.0, 3.0} and set(targets[:, 1].tolist()) <= {0.0, 1.0, 2.0}
    assert (targets[:, 2:] >= 0).all() and (targets[:, 2:] <= 1).all()
    assert set(batch["meta"][0]) >= {"image_id", "file", "orig_hw", "ratio", "pad"}
    assert loader.dataset.coco.category_ids == [1, 3, 7]
    assert loader.dataset.train_box_wh(64).shape == (10, 2)


def test_negatives_reach_the_loaders(make_coco) -> None:
    split = make_coco()
    negative_id = 25  # the last image of the fixture has no annotations
    loader = build_train_loader(split, imgsz=64, batch_size=6, workers=0, hyp=NO_MOSAIC, seed=0)
    batch = next(iter(loader))
    position = [m["image_id"] for m in batch["meta"]].index(negative_id)
    assert (batch["targets"][:, 0] == position).sum() == 0
    val = next(iter(build_val_loader(split, imgsz=64, batch_size=6, workers=0)))
    position = [m["image_id"] for m in val["meta"]].index(negative_id)
    assert (val["targets"][:, 0] == position).sum() == 0 and len(val["targets"]) == 10


@pytest.mark.parametrize("rect", [False, True])
def test_val_batches_letterbox_and_map_back(make_coco, rect: bool) -> None:
    split = make_coco()
    loader = build_val_loader(split, imgsz=96, batch_size=2, workers=0, rect=rect)
    coco = loader.dataset.coco
    records = {r.image_id: r for r in coco.records}
    seen = []
    for batch in loader:
        _, _, h, w = batch["images"].shape
        assert h % 32 == 0 and w % 32 == 0 and max(h, w) == 96 and (rect or h == w)
        for i, meta in enumerate(batch["meta"]):
            seen.append(meta["image_id"])
            rows = batch["targets"][batch["targets"][:, 0] == i]
            cx, cy, bw, bh = (rows[:, 2:] * torch.tensor([w, h, w, h])).T
            boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
            back = transforms.unletterbox_boxes(boxes, meta["ratio"], meta["pad"], meta["orig_hw"])
            assert torch.allclose(back, torch.from_numpy(records[meta["image_id"]].boxes_xyxy), atol=1e-3)
    assert sorted(seen) == sorted(records)


def test_rect_batch_shapes() -> None:
    hw = np.array([[240, 320], [320, 240], [300, 300], [100, 320], [320, 100]])
    order, shapes = rect_batch_shapes(hw, 320, 2)
    assert order.tolist() == [3, 0, 2, 1, 4]  # by aspect ratio h / w
    assert shapes.tolist() == [[256, 320], [320, 320], [320, 128]]


def test_set_mosaic_reaches_persistent_workers(make_coco) -> None:
    split = make_coco()
    next(iter(build_train_loader(split, imgsz=64, batch_size=3, workers=0, hyp=TrainConfig(), seed=0)))
    # OpenCV has now run in this process: forked workers must not hang in it (they did with its thread pool on)
    always = replace(TrainConfig(), mosaic=1.0)  # the default, 0.9, leaves a tenth of the samples single
    loader = build_train_loader(split, imgsz=64, batch_size=3, workers=1, hyp=always, seed=0)
    assert all(m["mosaic"] for b in loader for m in b["meta"])
    loader.dataset.set_mosaic(False)
    assert not any(m["mosaic"] for b in loader for m in b["meta"])


def test_same_seed_same_batches_with_workers(make_coco) -> None:
    split = make_coco()

    def first_two(seed: int, workers: int) -> list[torch.Tensor]:
        loader = build_train_loader(split, imgsz=64, batch_size=3, workers=workers, hyp=TrainConfig(), seed=seed)
        return [torch.cat([b["images"].flatten().float(), b["targets"].flatten()]) for b in loader]

    assert all(torch.equal(a, b) for a, b in zip(first_two(1, 1), first_two(1, 1)))
    assert all(torch.equal(a, b) for a, b in zip(first_two(1, 0), first_two(1, 0)))
    assert not all(torch.equal(a, b) for a, b in zip(first_two(1, 0), first_two(2, 0)))


def test_heap_trimming_runs_in_workers_only(make_coco, monkeypatch, tmp_path) -> None:
    """malloc_trim runs in data workers (their heap is theirs alone), never in the main process (workers=0), whose
    heap other native runtimes' threads share."""
    from detector import memory
    from detector.data import loader as loader_module

    marker = tmp_path / "trims"
    monkeypatch.setattr(loader_module, "HEAP_TRIM_DECODES", 2)
    monkeypatch.setattr(memory, "trim_heap", lambda: marker.open("a").write("x"))  # inherited by forked workers
    split = make_coco()
    for workers in (0, 1):
        for _ in build_train_loader(split, imgsz=64, batch_size=3, workers=workers, hyp=TrainConfig(), seed=0):
            pass
        assert marker.exists() == (workers == 1)


def test_image_deleted_after_the_scan_is_replaced_and_named(make_coco, caplog) -> None:
    split = make_coco()
    loader = build_train_loader(split, imgsz=64, batch_size=6, workers=0, hyp=NO_MOSAIC, seed=0)
    victim = split.images / "img002.jpg"
    victim.unlink()
    with caplog.at_level(logging.WARNING, logger="detector.data.loader"):
        batches = list(loader) + list(loader)
    assert sum(len(b["images"]) for b in batches) == 12
    assert loader.dataset.failed_files == [str(victim)]
    named = [r.getMessage() for r in caplog.records if str(victim) in r.getMessage()]
    assert named == [f"cannot read image {victim} (No such file or directory); using another image instead"]  # once


def test_image_corrupted_after_the_scan_is_an_error_under_strict(make_coco) -> None:
    split = make_coco()
    loader = build_train_loader(split, imgsz=64, batch_size=6, workers=0, hyp=NO_MOSAIC, seed=0, strict=True)
    victim = split.images / "img002.jpg"
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(DetectorError, match="cannot read image .*img002.jpg"):
        list(loader)
    val = build_val_loader(make_coco("v"), imgsz=64, batch_size=6, workers=0)
    (val.dataset.coco.records[0].file).write_bytes(b"")
    with pytest.raises(DetectorError, match="cannot read image .*img000.jpg"):
        list(val)


def test_worker_exception_surfaces_with_the_file_path(make_coco, monkeypatch) -> None:
    def broken(self, load, index, partners, *, mosaic):
        raise RuntimeError("boom")

    monkeypatch.setattr(transforms.TrainTransform, "__call__", broken)
    loader = build_train_loader(make_coco(), imgsz=64, batch_size=2, workers=1, hyp=TrainConfig(), seed=0)
    with pytest.raises(DetectorError) as info:
        next(iter(loader))
    message = str(info.value)
    assert "\n" not in message and "augmenting" in message and ".jpg failed: RuntimeError: boom" in message


def test_distributed_sampler_splits_the_data(make_coco) -> None:
    split = make_coco()
    ids = []
    for rank in range(2):
        loader = build_train_loader(split, imgsz=64, batch_size=3, workers=0, hyp=NO_MOSAIC, seed=0, rank=rank, world_size=2)
        assert isinstance(loader.sampler, DistributedSampler)
        loader.sampler.set_epoch(0)
        ids.append({m["image_id"] for b in loader for m in b["meta"]})
    assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 6


def test_ram_cache(make_coco) -> None:
    loader = build_train_loader(make_coco(), imgsz=64, batch_size=3, workers=0, hyp=TrainConfig(), seed=0, cache="ram")
    source = loader.dataset.source
    assert len(source.ram) == 6 and max(source.ram[0].shape[:2]) == 64
    assert loader_cache_bytes(loader) == sum(image.nbytes for image in source.ram)  # the estimate is exact
    assert len(list(loader)) == 2
    with pytest.raises(DetectorError, match="cache must be 'auto', 'ram' or '' \\(off\\), got 'disk'"):
        build_train_loader(make_coco("b"), imgsz=64, batch_size=3, workers=0, hyp=TrainConfig(), seed=0, cache="disk")


def loader_cache_bytes(loader) -> int:
    dataset = loader.dataset
    return cache_bytes(dataset.coco.image_hw, dataset.ratios)


def test_the_ram_cache_changes_no_sample(make_coco) -> None:
    """Mosaic partners come from the recently used images with the cache on too: the batches are equal."""
    sizes = [(40 + 7 * i, 64 - 3 * (i % 5)) for i in range(24)]  # more than PARTNER_POOL_MIN images
    split = make_coco(sizes_wh=sizes)
    batches = {}
    for cache in ("", "ram"):
        loader = build_train_loader(split, imgsz=64, batch_size=4, workers=0, hyp=TrainConfig(), seed=3, cache=cache)
        loader.set_epoch(0)
        batches[cache] = [(b["images"], b["targets"]) for b in loader]
    assert len(batches[""]) == 6
    for (images, targets), (cached_images, cached_targets) in zip(batches[""], batches["ram"]):
        assert torch.equal(images, cached_images) and torch.equal(targets, cached_targets)


def test_auto_cache_keeps_the_images_when_they_fit(make_coco, monkeypatch, caplog) -> None:
    split = make_coco()
    need = loader_cache_bytes(build_train_loader(split, imgsz=64, batch_size=3, workers=0, hyp=TrainConfig(), seed=0))
    caplog.set_level(logging.INFO, logger="detector.data.loader")
    for available, local_ranks, cached in ((4 * need, 1, True), (4 * need - 4, 1, False), (8 * need, 2, True), (8 * need, 3, False)):
        monkeypatch.setattr(memory, "available_memory_bytes", lambda available=available: available)
        loader = build_train_loader(split, imgsz=64, batch_size=3, workers=0, hyp=TrainConfig(), seed=0, cache="auto",
                                    local_ranks=local_ranks)
        assert (loader.dataset.source.ram is not None) is cached, (available, local_ranks)
    assert "cache=auto: ram" in caplog.text and "cache=auto: off" in caplog.text and "over 3 ranks" in caplog.text


def test_imgsz_must_be_a_multiple_of_32(make_coco) -> None:
    with pytest.raises(DetectorError, match="multiple of 32"):
        build_val_loader(make_coco(), imgsz=100, batch_size=2, workers=0)


def test_collate() -> None:
    samples = [
        {"image": torch.zeros(3, 8, 8, dtype=torch.uint8), "labels": torch.tensor([[1.0, 0.5, 0.5, 0.2, 0.2]]), "meta": {"image_id": 1}},
        {"image": torch.ones(3, 8, 8, dtype=torch.uint8), "labels": torch.zeros(0, 5), "meta": {"image_id": 2}},
        {"image": torch.ones(3, 8, 8, dtype=torch.uint8), "labels": torch.tensor([[0.0, 0.1, 0.1, 0.1, 0.1]] * 2), "meta": {"image_id": 3}},
    ]
    batch = collate(samples)
    assert batch["images"].shape == (3, 3, 8, 8)
    assert batch["images"].is_contiguous(memory_format=torch.channels_last)
    assert batch["targets"][:, 0].tolist() == [0.0, 2.0, 2.0] and batch["targets"].shape == (3, 6)
    assert [m["image_id"] for m in batch["meta"]] == [1, 2, 3]


def test_collate_keeps_every_pixel_in_place_in_the_channels_last_batch() -> None:
    """Samples as the datasets give them (HWC pixels viewed as (3, H, W)) and as a plain contiguous CHW tensor."""
    hwc = np.arange(5 * 4 * 3, dtype=np.uint8).reshape(5, 4, 3)
    chw = torch.arange(3 * 5 * 4, dtype=torch.uint8).reshape(3, 5, 4)
    batch = collate([{"image": loader_module._to_chw(hwc), "labels": torch.zeros(0, 5), "meta": {}},
                     {"image": chw, "labels": torch.zeros(0, 5), "meta": {}}])["images"]
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch[0], torch.from_numpy(hwc).permute(2, 0, 1)) and torch.equal(batch[1], chw)
    assert batch[0, 2, 1, 3] == hwc[1, 3, 2]  # channel 2 of row 1, column 3


@pytest.mark.parametrize("workers", [0, 1])
def test_batches_arrive_channels_last_from_workers_too(make_coco, workers: int) -> None:
    split = make_coco()
    train = next(iter(build_train_loader(split, imgsz=64, batch_size=3, workers=workers, hyp=TrainConfig(), seed=0)))
    val = next(iter(build_val_loader(split, imgsz=64, batch_size=3, workers=workers)))
    for images in (train["images"], val["images"]):
        assert images.shape[:2] == (3, 3) and images.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(("cpus", "local_ranks", "batch", "expected"), [
    (2, 1, 16, 2), (16, 1, 16, 8), (16, 4, 16, 4), (16, 1, 3, 3), (1, 1, 16, 1), (2, 4, 16, 1),
])
def test_auto_workers_split_the_cpus_over_the_ranks(monkeypatch, cpus, local_ranks, batch, expected) -> None:
    monkeypatch.setattr(loader_module.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert resolve_workers("auto", batch_size=batch, local_ranks=local_ranks) == expected
    assert resolve_workers(5, batch_size=batch, local_ranks=local_ranks) == 5  # a number is kept as given
    with pytest.raises(DetectorError, match="workers must be a number or 'auto', got 'many'"):
        resolve_workers("many", batch_size=batch)


def test_an_image_unreadable_when_the_ram_cache_fills_is_replaced_or_under_strict_an_error(make_coco, caplog) -> None:
    """An image that breaks between the scan and the cache fill: with the cache on, as without it, it is
    replaced by another and named once, or under strict the error names it."""
    coco = CocoDataset(make_coco())
    (index,) = [i for i in range(len(coco)) if coco.file(i).name == "img002.jpg"]
    victim = coco.file(index)
    victim.write_bytes(victim.read_bytes()[:-100])  # after the scan: a truncated JPEG
    with caplog.at_level(logging.WARNING, logger="detector.data.loader"):
        dataset = TrainDataset(coco, imgsz=64, hyp=NO_MOSAIC, seed=0, cache="ram")
        samples = [dataset[i] for i in range(len(dataset))]
    assert isinstance(dataset.source.ram[index], OSError)  # kept as the error, raised when the image is used
    assert len(samples) == 6
    assert dataset.failed_files == [str(victim)]
    assert sum(str(victim) in r.getMessage() for r in caplog.records) == 1
    strict = TrainDataset(coco, imgsz=64, hyp=NO_MOSAIC, seed=0, cache="ram", strict=True)
    with pytest.raises(DetectorError, match="cannot read image .*img002.jpg"):
        strict[index]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is Linux's")
@pytest.mark.parametrize(("idle", "policy"), [(True, "SCHED_IDLE"), (False, "SCHED_OTHER")])
def test_idle_workers_run_under_sched_idle_and_the_main_process_keeps_its_policy(make_coco, idle, policy) -> None:
    split = make_coco()
    before = set(multiprocessing.active_children())
    loaders = [build_train_loader(split, imgsz=64, batch_size=3, workers=1, hyp=TrainConfig(), seed=0, idle_workers=idle),
               build_val_loader(split, imgsz=64, batch_size=3, workers=1, idle_workers=idle)]
    for loader in loaders:
        next(iter(loader))  # persistent workers: they stay up after the first batch
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2
    assert {os.sched_getscheduler(w.pid) for w in workers} == {getattr(os, policy)}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


@pytest.mark.parametrize(("priority", "device", "idle"), [
    ("auto", "cpu", True), ("auto", "cuda", False), ("idle", "cuda", True), ("normal", "cpu", False),
])
def test_auto_priority_is_idle_only_beside_a_model_on_the_cpu(priority, device, idle) -> None:
    assert resolve_worker_priority(priority, torch.device(device)) is idle
    with pytest.raises(DetectorError, match="worker_priority must be one of auto, idle, normal, got 'low'"):
        resolve_worker_priority("low", torch.device("cpu"))


def _contents(loader) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    return [([m["image_id"] for m in b["meta"]], b["images"], b["targets"]) for b in loader]


def test_started_workers_fork_before_the_first_iteration_and_change_no_batch(make_coco) -> None:
    split = make_coco()
    expected = _contents(build_val_loader(split, imgsz=64, batch_size=4, workers=0))
    loader = build_val_loader(split, imgsz=64, batch_size=4, workers=2)
    before = set(multiprocessing.active_children())
    loader.start_workers()
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2  # forked now, not at the first iteration
    for _ in range(2):  # the first is the iteration start_workers began: each is the whole split, in order, once
        got = _contents(loader)
        assert [ids for ids, _, _ in got] == [ids for ids, _, _ in expected]
        assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(got, expected))
    assert set(multiprocessing.active_children()) - before == workers  # the same persistent workers
    unforked = build_val_loader(split, imgsz=64, batch_size=4, workers=0)
    unforked.start_workers()  # no workers to start: nothing happens
    assert set(multiprocessing.active_children()) - before == workers


def _sample(dataset: TrainDataset, index: int) -> torch.Tensor:
    item = dataset[index]
    return torch.cat([item["image"].flatten().float(), item["labels"].flatten()])


def test_the_augmentation_streams_are_a_function_of_seed_and_epoch(make_coco) -> None:
    """Within an epoch the stream runs on (the same image twice is augmented twice); epoch e restarts it from
    (seed, e) and forgets the partner buffer, so epoch 1 is the same after epoch 0 as straight away."""
    split = make_coco(sizes_wh=[(48 + 4 * i, 40) for i in range(20)])
    always = replace(TrainConfig(), mosaic=1.0)

    def fresh() -> TrainDataset:
        return TrainDataset(CocoDataset(split), imgsz=64, hyp=always, seed=5)

    played = fresh()
    played.set_epoch(0)
    first, again = _sample(played, 3), _sample(played, 3)
    assert not torch.equal(first, again)
    for index in range(20):
        played[index]
    played.set_epoch(1)
    epoch1 = [_sample(played, index) for index in (3, 7)]
    straight = fresh()
    straight.set_epoch(1)
    assert all(torch.equal(a, _sample(straight, i)) for a, i in zip(epoch1, (3, 7)))
    assert not torch.equal(epoch1[0], first)


def test_each_worker_draws_from_its_own_stream(make_coco) -> None:
    """Two workers given the same image at the same point of their epochs augment it differently."""
    dataset = TrainDataset(CocoDataset(make_coco()), imgsz=64, hyp=replace(TrainConfig(), mosaic=1.0), seed=5)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, sampler=[3, 3], collate_fn=collate)
    a, b = [torch.cat([batch["images"].flatten().float(), batch["targets"].flatten()]) for batch in loader]
    assert not torch.equal(a, b)


def test_mosaic_partners_come_from_the_recent_images(make_coco) -> None:
    """Once PARTNER_POOL_MIN images were decoded, a mosaic decodes at most its own image, not four."""
    split = make_coco(sizes_wh=[(32, 32)] * 100, boxes_per_image=1)
    dataset = TrainDataset(CocoDataset(split), imgsz=32, hyp=replace(TrainConfig(), mosaic=1.0, mixup=0.0), seed=0)
    dataset.set_epoch(0)
    for index in range(loader_module.PARTNER_POOL_MIN):
        dataset[index]
    before = dataset.source.decodes
    for index in range(50, 70):
        dataset[index]
    assert dataset.source.decodes - before <= 20


def test_ranks_augment_with_their_own_streams(make_coco) -> None:
    """Under DDP each rank's workers draw from seed + rank: the same image is augmented differently per rank."""
    split = make_coco()
    datasets = [build_train_loader(split, imgsz=64, batch_size=2, workers=0, hyp=replace(TrainConfig(), mosaic=1.0),
                                   seed=5, rank=rank, world_size=2).dataset for rank in (0, 1)]
    for dataset in datasets:
        dataset.set_epoch(0)
    assert not torch.equal(_sample(datasets[0], 3), _sample(datasets[1], 3))

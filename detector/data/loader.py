"""Torch datasets and loaders over a scanned `CocoDataset`, and the batch format every consumer reads.

Batch (what `collate` returns): {
  "images":  uint8 (B, 3, H, W) RGB, channels_last in memory, converted to float / 255 on the device by the consumer,
  "targets": float32 (M, 6) rows [batch_index, class, cx, cy, w, h], normalised by the batch image W, H,
  "meta":    list of B dicts {image_id, file, orig_hw: (h, w), ratio, pad: (left_px, top_px)}
             (train adds mosaic and unreadable),
}. Val boxes map back to original pixels with `transforms.unletterbox_boxes(boxes, ratio, pad, orig_hw)`.

`loader.dataset` is a TrainDataset / ValDataset; its `.coco` is the CocoDataset.
"""

from __future__ import annotations

import functools
import gc
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

from detector import memory
from detector.data.coco import CocoDataset
from detector.data.image_files import read_failure
from detector.data.transforms import AugmentHyp, Sample, TrainTransform, letterbox, resize_by
from detector.errors import DetectorError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from detector.data.spec import SplitSpec

LOGGER = logging.getLogger(__name__)
STRIDE = 32  # rectangular val batch shapes are multiples of this
MAX_SUBSTITUTES = 10  # unreadable images replaced in a row before giving up
# Mosaic partners come from the images a worker decoded last (as Ultralytics does), so a mosaic costs one decode,
# not four; below PARTNER_POOL_MIN buffered images (a worker's first samples) they are drawn from the whole set.
PARTNER_BUFFER = 64
PARTNER_POOL_MIN = 16
# cache="auto" keeps the decoded training images in RAM when they take at most this share of the memory available
# at start (per process on the machine: each DDP rank holds its own copy; forked workers share it).
RAM_CACHE_SHARE = 0.25
HEAP_TRIM_DECODES = 64  # decodes between handing freed heap pages back to the OS (see memory.trim_heap)
MAX_AUTO_WORKERS = 8  # workers=auto never starts more (more rarely pays: each holds its own buffers)
WORKER_TIMEOUT_S = 600  # a batch that takes longer than this from the workers is a hung worker: an error
# What a file that changed or vanished after the scan raises while decoding.
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack per-sample dicts {image (3, H, W) uint8, labels (n, 5) [class, cx, cy, w, h], meta} into a batch."""
    # stacked as (B, H, W, 3) and viewed as (B, 3, H, W): channels_last in memory, the layout the model runs in, so
    # the main process's uint8 -> float conversion needs no transposing copy (6.2 -> 0.6 ms for 16 images at 256 px)
    images = torch.stack([s["image"].permute(1, 2, 0) for s in samples]).permute(0, 3, 1, 2)
    targets = torch.cat(
        [torch.cat([torch.full((len(s["labels"]), 1), float(i)), s["labels"]], dim=1) for i, s in enumerate(samples)]
    )
    return {"images": images, "targets": targets, "meta": [s["meta"] for s in samples]}


def _labels(boxes_xyxy: np.ndarray, classes: np.ndarray, width: int, height: int) -> torch.Tensor:
    """(n, 5) float32 [class, cx, cy, w, h] normalised by the image width and height."""
    b = boxes_xyxy.astype(np.float32).reshape(-1, 4)
    cxcywh = np.concatenate([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], axis=1) / np.float32(
        [width, height, width, height]
    )
    return torch.from_numpy(np.concatenate([classes.reshape(-1, 1).astype(np.float32), cxcywh], axis=1))


def _to_chw(image: np.ndarray) -> torch.Tensor:
    """An HWC image as a (3, H, W) tensor without moving its pixels (channels-last strides; `collate` keeps them)."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def cache_bytes(image_hw: np.ndarray, ratios: np.ndarray) -> int:
    """Bytes of every image decoded and resized by its ratio (uint8 RGB, cv2's round(side x ratio))."""
    if not len(image_hw):
        return 0
    sides = np.maximum(np.round(image_hw * ratios[:, None]), 1).astype(np.int64)
    return int((sides[:, 0] * sides[:, 1]).sum() * 3)


def resolve_cache(cache: str, image_hw: np.ndarray, ratios: np.ndarray, *, local_ranks: int = 1, what: str = "") -> str:
    """'ram' or '' (off) for `cache`: "auto" is "ram" when the decoded set fits RAM_CACHE_SHARE of the available
    memory, split over the `local_ranks` ranks on this machine, and says which it chose and why (for `what`, the
    split's annotations file, when given)."""
    if cache in ("", "ram"):
        return cache
    if cache != "auto":
        raise DetectorError(f"cache must be 'auto', 'ram' or '' (off), got '{cache}'")
    need, budget = cache_bytes(image_hw, ratios), RAM_CACHE_SHARE * memory.available_memory_bytes() / max(local_ranks, 1)
    chosen = "ram" if need <= budget else ""
    LOGGER.info("cache=auto: %s (%sthe decoded images take %.0f MB; budget %.0f MB, %.0f%% of the available memory%s)",
                chosen or "off", f"{what}: " if what else "", need / 2**20, budget / 2**20, 100 * RAM_CACHE_SHARE,
                f" over {local_ranks} ranks" if local_ranks > 1 else "")
    return chosen


class _ImageSource:
    """Decoded images of a CocoDataset resized by a per-image ratio: from RAM (cache="ram"), from a small buffer of
    the most recently decoded ones (`recent`, per process), or from disk."""

    def __init__(self, coco: CocoDataset, ratios: np.ndarray, cache: str, buffer_size: int = 0, local_ranks: int = 1) -> None:
        self.coco = coco
        self.ratios = ratios
        self.buffer_size = buffer_size
        self.decodes = 0
        self.recent: OrderedDict[int, np.ndarray] = OrderedDict()
        self.ram: list[np.ndarray | Exception] | None = None
        what = f"{coco.annotations.parent.name}/{coco.annotations.name}"
        if resolve_cache(cache, coco.image_hw, ratios, local_ranks=local_ranks, what=what) == "ram":
            with ThreadPoolExecutor(max_workers=4) as pool:
                self.ram = list(pool.map(self._read_or_error, range(len(coco))))
            mb = sum(a.nbytes for a in self.ram if isinstance(a, np.ndarray)) / 2**20
            LOGGER.info("cache=ram: %s: %d images, %.0f MB", what, len(self.ram), mb)

    def _read_or_error(self, index: int) -> np.ndarray | Exception:
        """The decoded image, or the error reading it, kept so that using it raises as a read from disk would."""
        try:
            return self.read(index)
        except READ_ERRORS as err:
            return err

    def read(self, index: int) -> np.ndarray:
        self.decodes += 1
        # Only in a worker process, where the growth was measured (memory.trim_heap); the main process's heap
        # (workers=0) also holds the model's tensors and other native runtimes' memory, where it was not measured.
        if self.decodes % HEAP_TRIM_DECODES == 0 and get_worker_info() is not None:
            memory.trim_heap()
        return resize_by(self.coco.load_image(index), float(self.ratios[index]))

    def get(self, index: int) -> np.ndarray:
        """Image `index`; with or without the RAM cache it enters `recent` alike, so the mosaic partners drawn
        from there, and so every sample, are the same whether the cache is on or off."""
        image = self.recent.get(index)
        if image is None:
            image = self.ram[index] if self.ram is not None else self.read(index)
            if isinstance(image, READ_ERRORS):  # unreadable when the cache was filled: what a read raises
                raise image
            if self.buffer_size:
                self.recent[index] = image
                if len(self.recent) > self.buffer_size:
                    self.recent.popitem(last=False)
        return image


class TrainDataset(Dataset):
    """Augmented training samples. `set_mosaic(False)` turns mosaic off, also inside persistent workers (the flag
    lives in shared memory). An image that fails to decode after the scan is named once in a warning, counted
    in `failed_files` and replaced by another image; under strict it is a DetectorError naming the file.

    `set_epoch(e)` (shared memory too) restarts every process's random streams at its first sample of epoch e
    from (seed, e, worker id) and empties its mosaic-partner buffer, so epoch e's samples depend on nothing
    that ran before it: a resumed run replays the epochs an uninterrupted one sees (same seed and workers)."""

    def __init__(
        self, coco: CocoDataset, *, imgsz: int, hyp: AugmentHyp, seed: int = 0, strict: bool = False, cache: str = "",
        local_ranks: int = 1,
    ) -> None:
        self.coco = coco
        self.imgsz = imgsz
        self.strict = strict
        self.seed = seed
        hw = coco.image_hw
        self.ratios = imgsz / hw.max(axis=1) if len(hw) else np.zeros(0)
        self.source = _ImageSource(coco, self.ratios, cache, buffer_size=PARTNER_BUFFER, local_ranks=local_ranks)
        self.transform = TrainTransform(imgsz, hyp, seed)
        self._mosaic = torch.ones(1, dtype=torch.uint8).share_memory_()
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._streams_epoch = -1  # the epoch this process's random streams were started for
        self.failed_files: list[str] = []
        self._sample_unreadable: list[str] = []  # files replaced while building the current sample

    def __len__(self) -> int:
        return len(self.coco)

    def set_mosaic(self, enabled: bool) -> None:
        self._mosaic[0] = int(enabled)

    @property
    def mosaic_enabled(self) -> bool:
        return bool(self._mosaic.numpy()[0])

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

    def _start_epoch_streams(self) -> None:
        epoch = int(self._epoch.numpy()[0])
        if epoch == self._streams_epoch:
            return
        info = get_worker_info()
        worker = info.id if info is not None else 0
        self.transform.reseed(int(np.random.SeedSequence([self.seed, epoch, worker]).generate_state(1)[0]))
        self.source.recent.clear()
        self._streams_epoch = epoch

    def train_box_wh(self, imgsz: int) -> np.ndarray:
        """(N, 2) pixel w, h of the training boxes at long side `imgsz` (see CocoDataset.train_box_wh)."""
        return self.coco.train_box_wh(imgsz)

    def _load(self, index: int) -> Sample:
        """Image `index` at long side imgsz with its boxes; an unreadable one is replaced (see the class doc)."""
        for _ in range(MAX_SUBSTITUTES):
            try:
                image = self.source.get(index)
            except READ_ERRORS as err:
                file = self.coco.file(index)
                reason = read_failure(err, file)  # without the path: the messages name it once
                if self.strict:
                    raise DetectorError(f"cannot read image {file} (changed since the scan?): {reason}") from err
                self._sample_unreadable.append(str(file))
                if str(file) not in self.failed_files:
                    self.failed_files.append(str(file))
                    LOGGER.warning("cannot read image %s (%s); using another image instead", file, reason)
                index = int(self.transform.rng.integers(len(self)))
                continue
            return image, self.coco.boxes(index) * np.float32(self.ratios[index]), self.coco.classes(index)
        raise DetectorError(f"{MAX_SUBSTITUTES} images in a row unreadable, last {file}; was the dataset moved?")

    def __getitem__(self, index: int) -> dict[str, Any]:
        self._start_epoch_streams()
        self._sample_unreadable = []
        try:
            recent = list(self.source.recent)
            pool = recent if len(recent) >= PARTNER_POOL_MIN else len(self)
            (image, boxes, classes), used_mosaic = self.transform(self._load, index, pool, mosaic=self.mosaic_enabled)
        except DetectorError:
            raise
        except Exception as err:  # surface which file a worker was on, not a bare worker traceback
            raise DetectorError(f"augmenting {self.coco.file(index)} failed: {type(err).__name__}: {err}") from err
        height, width = image.shape[:2]
        meta = {
            "image_id": self.coco.image_id(index),
            "file": str(self.coco.file(index)),
            "orig_hw": self.coco.size_hw(index),
            "ratio": float(self.ratios[index]),
            "pad": (0, 0),
            "mosaic": used_mosaic,
            "unreadable": self._sample_unreadable,  # seen by the main process, whichever worker read it
        }
        return {"image": _to_chw(image), "labels": _labels(boxes, classes, width, height), "meta": meta}


def rect_batch_shapes(hw: np.ndarray, imgsz: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Order images by aspect ratio (h / w) and give each batch the smallest (h, w), a multiple of STRIDE, that
    holds every image of the batch at long side imgsz. Returns (order (n,), shapes (n_batches, 2))."""
    aspect = hw[:, 0] / hw[:, 1]
    order = np.argsort(aspect, kind="stable")
    n_batches = math.ceil(len(order) / batch_size)
    shapes = np.zeros((n_batches, 2), np.int64)
    for b in range(n_batches):
        ar = aspect[order[b * batch_size : (b + 1) * batch_size]]
        lo, hi = ar.min(), ar.max()
        rel = (hi, 1.0) if hi < 1 else (1.0, 1 / lo) if lo > 1 else (1.0, 1.0)
        shapes[b] = np.ceil(np.array(rel) * imgsz / STRIDE).astype(np.int64) * STRIDE
    return order, shapes


class ValDataset(Dataset):
    """Letterboxed validation images: square imgsz, or with rect=True the batch shape of `rect_batch_shapes`
    (the loader must then use the same batch_size and no shuffling). An image that fails to decode after the
    scan is a DetectorError naming the file (a silent substitute would corrupt the metrics)."""

    def __init__(self, coco: CocoDataset, *, imgsz: int, batch_size: int, rect: bool = False, cache: str = "") -> None:
        self.coco = coco
        self.imgsz = imgsz
        self.batch_size = batch_size
        hw = coco.image_hw
        self.ratios = imgsz / hw.max(axis=1) if len(hw) else np.zeros(0)
        if rect:
            self.order, self.shapes = rect_batch_shapes(hw, imgsz, batch_size)
        else:
            self.order, self.shapes = np.arange(len(coco)), np.array([[imgsz, imgsz]], np.int64)
        self.rect = rect
        self.source = _ImageSource(coco, self.ratios, cache)

    def __len__(self) -> int:
        return len(self.coco)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = int(self.order[position])
        file = self.coco.file(index)
        shape = self.shapes[position // self.batch_size] if self.rect else self.shapes[0]
        try:
            resized = self.source.get(index)  # already at long side imgsz: the letterbox below only pads
        except READ_ERRORS as err:
            reason = read_failure(err, file)
            raise DetectorError(f"cannot read image {file} (changed since the scan?): {reason}") from err
        image, extra, pad = letterbox(resized, (int(shape[0]), int(shape[1])))
        ratio = float(self.ratios[index]) * extra
        boxes = self.coco.boxes(index) * np.float32(ratio) + np.float32([pad[0], pad[1], pad[0], pad[1]])
        meta = {
            "image_id": self.coco.image_id(index),
            "file": str(file),
            "orig_hw": self.coco.size_hw(index),
            "ratio": ratio,
            "pad": pad,
        }
        labels = _labels(boxes, self.coco.classes(index), image.shape[1], image.shape[0])
        return {"image": _to_chw(image), "labels": labels, "meta": meta}


class DetectorDataLoader(DataLoader):
    """A DataLoader whose worker errors re-raise as the worker's one-line DetectorError (naming the file),
    instead of torch's multi-line "Caught DetectorError in DataLoader worker process 0 ..." wrapper, and whose
    stalled workers (timeout) and dead ones (killed, native crash) are a one-line error too, never a hung run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._started: Iterator[dict[str, Any]] | None = None  # the iteration `start_workers` began

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch: the shuffle (sampler) and the augmentation (dataset) become functions of
        (seed, epoch) alone."""
        for part in (self.sampler, self.dataset):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)

    def start_workers(self) -> None:
        """Fork the persistent workers now, while the process is small, rather than at the first iteration; the
        batches they load meanwhile are the first iteration's.

        Why: a forked worker shares the parent's pages copy-on-write, so every page of the parent's heap at the
        fork is copied the first time the parent writes to it afterwards. The trainer's val loader used to fork
        at the first validation, after an epoch had grown the (held) heap: its first batch took 0.84 s against
        0.19 s (63,000 page faults against 250) and the next epoch 58,000 more faults (14,000) on the hard set
        at 256 px. The next iteration is the one begun here, so set what it depends on (`set_epoch`) first; its
        first 2 x workers batches wait in shared memory until then. Nothing to do without persistent workers."""
        if self.num_workers > 0 and self.persistent_workers and self._started is None:
            self._started = super().__iter__()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        iterator = self._started if self._started is not None else super().__iter__()
        self._started = None
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except DetectorError as err:
                lines = [ln for ln in str(err).splitlines() if ln.strip()]
                last = lines[-1] if lines else ""
                marker = "DetectorError: "
                if len(lines) > 1 and marker in last:
                    raise DetectorError(last.split(marker, 1)[1]) from None
                raise
            except RuntimeError as err:
                if str(err).startswith("DataLoader timed out"):
                    raise DetectorError(f"data loading stalled: no batch from the workers in {self.timeout:g} s") from err
                died = worker_death_error(err)
                if died is not None:
                    raise died from err
                raise
            yield batch


def worker_death_error(err: BaseException) -> DetectorError | None:
    """torch's error for a loader worker that died (killed by the OOM killer's SIGKILL, crashed in native code) as
    one line, else None. torch raises it inside the loader's `next` or, from its SIGCHLD handler, wherever the main
    process is at that moment (a persistent worker dies between batches too): so the CLI converts it as well."""
    text = str(err).strip()
    if not isinstance(err, RuntimeError) or not text.startswith("DataLoader worker (pid"):
        return None
    if "is killed by signal" not in text and "exited unexpectedly" not in text:
        return None
    first = text.split(". ")[0].splitlines()[0].rstrip(". ")
    hint = "out of memory? the kernel's OOM killer sends SIGKILL" if "Killed" in first else "killed (out of memory?) or crashed in native code"
    return DetectorError(f"{first} ({hint}); workers=0 shows the failing file")


WORKER_PRIORITIES = ("auto", "idle", "normal")


def _worker_init(worker_id: int, *, idle: bool = False) -> None:
    """In each new worker: the objects inherited from the main process go to the GC's permanent generation (an
    O(1) move), so a full collection in the worker never writes into, and so copies, the pages they share; with
    `idle`, the worker runs at idle priority (`lower_priority`)."""
    gc.freeze()
    if idle:
        lower_priority()


def lower_priority() -> None:
    """Let this process run only on CPU time no other process wants: Linux's SCHED_IDLE, else nice 19.

    Why: a model training on the CPU runs each op on all cores in lockstep, so a worker that takes a core for a
    moment stalls every thread at the op's end. At idle priority the workers fill the gaps the model leaves (its
    Python between ops, its waits for a batch); when the model waits for data they get every core."""
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return
        except OSError:  # a container may refuse the policy; niceness is always allowed upward
            pass
    os.nice(19)


def resolve_worker_priority(priority: str, device: torch.device) -> bool:
    """Whether the loader workers run at idle priority: "auto" when the model runs on the CPU (it and the workers
    share the cores; measured: +2 to +13% end to end on 2 cores), not beside a GPU (the loader is then the critical
    path); "idle" and "normal" as named. "normal" is for a machine busy with other work, which would starve
    idle-priority workers."""
    if priority not in WORKER_PRIORITIES:
        raise DetectorError(f"worker_priority must be one of {', '.join(WORKER_PRIORITIES)}, got '{priority}'")
    return priority == "idle" or (priority == "auto" and device.type == "cpu")


def resolve_workers(workers: int | str, *, batch_size: int, local_ranks: int = 1) -> int:
    """The worker count for `workers`: a number as given; "auto" the CPUs this process may use split over the
    ranks on this machine (they share its cores), at most MAX_AUTO_WORKERS and the per-rank batch (a worker
    builds whole batches) and at least 1. On 2 cores and one rank that is 2, the count measured best there."""
    if not isinstance(workers, str):
        return workers
    if workers != "auto":
        raise DetectorError(f"workers must be a number or 'auto', got '{workers}'")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus // max(local_ranks, 1), MAX_AUTO_WORKERS, batch_size))


def _check_imgsz(imgsz: int) -> None:
    if imgsz < STRIDE or imgsz % STRIDE:
        raise DetectorError(f"imgsz must be a multiple of {STRIDE}, got {imgsz}")


def _data_loader(dataset: Dataset, *, batch_size: int, workers: int, idle_workers: bool, **order: Any) -> DetectorDataLoader:
    """The loader settings train and val share: our collate, persistent workers that freeze their inherited
    objects (`_worker_init`), at idle priority when asked, and time out when hung, pinned memory for a GPU;
    `order` is the sampler or shuffle."""
    return DetectorDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        timeout=WORKER_TIMEOUT_S if workers > 0 else 0,
        worker_init_fn=functools.partial(_worker_init, idle=idle_workers),
        **order,
    )


def build_train_loader(
    split: SplitSpec,
    *,
    imgsz: int,
    batch_size: int,
    workers: int,
    hyp: AugmentHyp,
    seed: int,
    strict: bool = False,
    cache_dir: Path | None = None,
    cache: str = "",
    rank: int = 0,
    world_size: int = 1,
    local_ranks: int = 1,
    idle_workers: bool = False,
    fraction: float = 1.0,
) -> DetectorDataLoader:
    """Shuffled, augmented batches of `split` (`fraction` of its images, see `CocoDataset`), this rank's share of
    them (a DistributedSampler, also for one process: its order is a pure function of (seed, epoch)); call
    `loader.set_epoch(epoch)` each epoch.
    `cache="ram"` decodes every image once up front; "auto" does when they fit (`resolve_cache`; `local_ranks`:
    the ranks on this machine, each with its own copy). `idle_workers`: the workers at idle priority
    (`resolve_worker_priority`)."""
    _check_imgsz(imgsz)
    coco = CocoDataset(split, strict=strict, cache_dir=cache_dir, fraction=fraction)
    dataset = TrainDataset(coco, imgsz=imgsz, hyp=hyp, seed=seed + rank, strict=strict, cache=cache, local_ranks=local_ranks)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    generator = torch.Generator()
    generator.manual_seed(seed + rank)
    return _data_loader(dataset, batch_size=batch_size, workers=workers, idle_workers=idle_workers, sampler=sampler,
                        generator=generator)


def build_val_loader(
    split: SplitSpec,
    *,
    imgsz: int,
    batch_size: int,
    workers: int,
    rect: bool = False,
    strict: bool = False,
    cache_dir: Path | None = None,
    cache: str = "",
    idle_workers: bool = False,
    names: Sequence[str] | None = None,
) -> DetectorDataLoader:
    """Letterboxed batches of `split` (scanned here) as `val_loader` makes them; `names`: the dataset YAML's
    `names:`, overriding the json's category names."""
    _check_imgsz(imgsz)
    coco = CocoDataset(split, strict=strict, cache_dir=cache_dir, names=names)
    return val_loader(coco, imgsz=imgsz, batch_size=batch_size, workers=workers, rect=rect, cache=cache, idle_workers=idle_workers)


def val_loader(
    coco: CocoDataset, *, imgsz: int, batch_size: int, workers: int, rect: bool = False, cache: str = "", idle_workers: bool = False
) -> DetectorDataLoader:
    """Letterboxed batches of a scanned split in a fixed order (by aspect ratio when rect=True); the images are
    decoded here when `cache` keeps them; `idle_workers` as in `build_train_loader`."""
    _check_imgsz(imgsz)
    dataset = ValDataset(coco, imgsz=imgsz, batch_size=batch_size, rect=rect, cache=cache)
    return _data_loader(dataset, batch_size=batch_size, workers=workers, idle_workers=idle_workers, shuffle=False)

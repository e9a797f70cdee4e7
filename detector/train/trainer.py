"""The training loop: `Trainer(cfg).fit()` reads top to bottom.

One epoch = for each batch: schedule lr/momentum -> autocast forward -> loss -> backward (accumulated up to
the nominal batch) -> unscale, clip, finite check, optimizer step -> EMA. After the epoch, rank 0 evaluates
the EMA model (through the Evaluator, never a metric of its own), logs, and writes weights/last.pt (and
best.pt, the best epoch's weights as an inference file) atomically; the other ranks wait at a barrier. Resume restores
model, EMA, optimizer, scaler, epoch and RNG states (which checkpoint, config and folder: `train.resume`); the LR
is a pure function of (epoch, iteration), so it needs no state of its own.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
from torch.profiler import record_function
from tqdm import tqdm

from detector import memory
from detector.config import TrainConfig
from detector.data.spec import load_data_spec
from detector.errors import DetectorError, TrainingDiverged, write_failed
from detector.folders import next_run_dir
from detector.models.catalog import resolve_model_path
from detector.runtime import checkpoint as ckpt_io
from detector.runtime.distributed import all_ranks_true, barrier, broadcast_flag, broadcast_int, init_distributed, shutdown
from detector.train.batchnorm_state import BatchNormState
from detector.train.finetune import keep_frozen_norms_in_eval
from detector.train.resume import check_resume_classes, load_resume, resumed_run_dir
from detector.version import __version__
from detector.viz.logger import RunLogger, plot_results

if TYPE_CHECKING:
    from detector.data.coco import CocoDataset
    from detector.infer.evaluator import EvalResult

LOGGER = logging.getLogger(__name__)

LOG_INTERVAL = 10  # iterations between host reads of the running losses (a device sync on GPU)
VAL_SAMPLES = 4  # val images with GT and predictions drawn, logged to TensorBoard at each validation


@dataclass
class TrainState:
    """What changes during training and is saved in every checkpoint."""

    epoch: int = -1  # last completed epoch
    best_fitness: float = -1.0
    best_epoch: int = -1
    nonfinite_total: int = 0
    time_s: float = 0.0  # wall time of the run up to the last checkpoint (a `time` budget spans resumes)
    epochs: int = 0  # the planned epoch count: cfg.epochs, or what a `time` budget refitted it to (the config stays)
    stopped_early: bool = False  # `patience` ended the plan at `epochs`


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def _waited(batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The batches, each fetch inside a `record_function` range: the time the step waits for the loader."""
    iterator = iter(batches)
    while True:
        with record_function("data: wait for the loader"):
            batch = next(iterator, None)
        if batch is None:
            return
        yield batch


@dataclass
class _SkippedSteps:
    """Non-finite optimizer steps: in a row, across epochs (the run stops at `max_nonfinite`), and in the epoch."""

    in_row: int = 0
    in_epoch: int = 0


class Trainer:
    """Owns the objects of one training run; `fit()` runs it and returns the final metrics."""

    def __init__(self, cfg: TrainConfig) -> None:
        from detector.runtime.device import autocast_dtype, needs_grad_scaler, select_device

        self._fit_started = time.perf_counter()  # a `time` budget counts from here (plus a resumed run's time_s)
        self._time_before = 0.0
        self.resume_ckpt: dict | None = None
        if cfg.resume:
            cfg, self.resume_ckpt = load_resume(cfg)
        else:  # recorded absolute (args.yaml, checkpoints): `detector val weights=...` finds it from any folder
            cfg = replace(cfg, data=str(Path(cfg.data).absolute()))
        self.cfg = cfg
        self.device = select_device(cfg.device)
        self.dist = init_distributed(self.device)
        if self.dist.enabled and self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # select_device gave this rank its GPU: the LOCAL_RANK-th of `device=`
        seed_everything(cfg.seed + self.dist.rank, cfg.deterministic)
        self.amp_dtype = autocast_dtype(self.device, cfg.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=needs_grad_scaler(self.amp_dtype) and self.device.type == "cuda")
        self.state = TrainState(epochs=self.resume_ckpt["train_state"]["epochs"] if self.resume_ckpt else cfg.epochs)
        self._batch_grid_logged = False
        self._skipped = _SkippedSteps()  # kept across epochs: a streak of non-finite steps may span them
        self.evaluator = None
        self.logger = None  # set in _build (rank 0); fit's cleanup must not fail when _build does
        self._held = contextlib.ExitStack()  # what `build` holds for the run and `close` lets go
        self._checkpoints = ckpt_io.CheckpointWriter()
        self._best_saved = False  # this process wrote best.pt (an inference file from the start)

        if self.resume_ckpt is not None:
            self.run_dir = resumed_run_dir(Path(cfg.resume), self.resume_ckpt["run_dir"])
        else:
            self.run_dir = next_run_dir(Path(cfg.project), cfg.name, cfg.exist_ok)
        self.weights_dir = self.run_dir / "weights"  # made by `_build_validation`: a run refused while set up leaves no folder

    # ---------------------------------------------------------------------------------------- set-up

    def build(self) -> None:
        """Set the run up as named steps: data, model, optimisation, the wrapped training model, validation
        (`fit` calls it; a caller that drives `train_epoch` itself calls it, then `close`). The process keeps the
        memory each step frees for the next (`memory.hold_freed_heap`), and the objects alive once the run is set
        up (torch's modules, the datasets, the model) leave the garbage collector until `close`
        (`memory.collector_skips_live_objects`): a full collection walked all 420,000 of them, 160-190 ms at the
        first validation and again at the last one (a 2-epoch hard-set run: the full collections inside the
        trainer 370 -> 55 ms in all)."""
        memory.hold_freed_heap()
        self._model_source = None if self.resume_ckpt is not None else self._load_model_source()
        self._build_data()
        self._build_model()
        self._build_optimization()
        self._wrap()
        self._build_validation()
        self._held.enter_context(memory.collector_skips_live_objects())

    def _build_data(self) -> None:
        """The dataset YAML (the bundled set generated on first use), the train loader, the class list and (rank 0)
        the val loader."""
        from detector.data.coco import CocoDataset
        from detector.data.loader import build_train_loader, resolve_worker_priority, resolve_workers, val_loader
        from detector.data.synthetic import ensure_bundled_dataset

        cfg = self.cfg
        data_yaml = Path(cfg.data)
        if self.dist.is_main:
            ensure_bundled_dataset(data_yaml)
        barrier(self.dist)
        self.data = load_data_spec(data_yaml)
        self.per_rank_batch = max(cfg.batch // self.dist.world_size, 1)
        self.workers = resolve_workers(cfg.workers, batch_size=self.per_rank_batch, local_ranks=self.dist.local_world_size)
        self.idle_workers = resolve_worker_priority(cfg.worker_priority, self.device)
        self.train_loader = build_train_loader(
            self.data.train, imgsz=cfg.imgsz, batch_size=self.per_rank_batch, workers=self.workers, hyp=cfg, seed=cfg.seed,
            strict=cfg.strict, cache=cfg.cache, rank=self.dist.rank, world_size=self.dist.world_size,
            local_ranks=self.dist.local_world_size, idle_workers=self.idle_workers, fraction=cfg.fraction,
        )
        self.train_set = self.train_loader.dataset
        if self.dist.is_main:
            priority = " at idle priority" if self.idle_workers and self.workers else ""
            LOGGER.info("train: %s (%d workers%s)\n%s", self.data.train.annotations, self.workers, priority, self.train_set.coco.summary)
        nc = self.train_set.coco.num_classes
        if self.data.names is not None and len(self.data.names) != nc:
            raise DetectorError(f"{data_yaml}: 'names' lists {len(self.data.names)} classes but {self.data.train.annotations} has {nc} categories")
        self.names = self.data.names or self.train_set.coco.names
        self.category_ids = self.train_set.coco.category_ids
        refused = None
        if self.dist.is_main:  # scanned with the train split: an empty or (strict) faulty val split stops the run before the model
            try:
                val = CocoDataset(self.data.val, strict=cfg.strict, names=self.data.names)
                LOGGER.info("val: %s\n%s", self.data.val.annotations, val.summary)
                self._check_val_categories(val)  # before its images are decoded for the cache
                self._val_loader = val_loader(val, imgsz=cfg.imgsz, batch_size=self.per_rank_batch * 2, workers=self.workers,
                                              rect=True, idle_workers=self.idle_workers, cache=cfg.cache)  # decoded once, validated every epoch
            except DetectorError as err:
                refused = err
        if broadcast_flag(self.dist, refused is not None):  # every rank stops, where the others waited in the next collective
            raise refused or DetectorError(f"{self.data.val.annotations}: val split refused (rank 0 names why)")

    def _check_val_categories(self, val: CocoDataset) -> None:
        """The val split must list the train split's categories (ids, and each name at its id): every validation
        scores class c as category `category_ids[c]`, so other ids or relabelled names would score near 0 silently.
        Both sides carry the dataset YAML's `names:` when it has them (the val loader was given them)."""
        from detector.data.coco import category_difference

        difference = category_difference(self.category_ids, self.names, val.category_ids, val.names)
        if difference:
            raise DetectorError(f"{self.data.val.annotations}: its categories disagree with the train split's "
                                f"{self.data.train.annotations}: {difference}")

    def _build_model(self) -> None:
        """The model (resumed, or new with auto-anchor), checked to fit in memory, with the run's BN momentum and
        memory format, on its device; and its loss."""
        from detector.train.finetune import freeze, frozen_rows
        from detector.train.loss import build_loss
        from detector.models.blocks import set_batchnorm
        from detector.models.builder import build_model
        from detector.models.footprint import check_training_fits
        from detector.train.multiscale import largest_side

        cfg = self.cfg
        if self.resume_ckpt is not None:
            check_resume_classes(self.resume_ckpt, self.category_ids, self.names, cfg.resume, self.data.train.annotations)
            model = build_model(self.resume_ckpt["model_yaml"])
            ckpt_io.load_model_weights(model, self.resume_ckpt["model"], str(cfg.resume))
        else:
            model = self._new_model()
        self.max_stride = int(model.stride.max())  # read here, on the CPU: the step loop needs it without a device sync
        largest = largest_side(cfg.imgsz, self.max_stride, cfg.multi_scale) if cfg.multi_scale else cfg.imgsz
        check_training_fits(model, imgsz=largest, batch=self.per_rank_batch, source=f"model {cfg.model}")
        if model.yaml.get("ch", 3) != 3:
            raise DetectorError(
                f"model: {cfg.model} takes ch={model.yaml['ch']} input channels, but training images are always loaded "
                "as 3-channel RGB (gray, palette, RGBA and 16-bit files are converted); set ch: 3"
            )
        set_batchnorm(model, eps=None, momentum=cfg.bn_momentum)
        self.frozen = frozen_rows(cfg.freeze, len(model.layers)) if cfg.freeze else []
        frozen_tensors = freeze(model, self.frozen)
        if self.frozen and self.dist.is_main:
            LOGGER.info("freeze: rows %s (%d parameter tensors)", ",".join(map(str, self.frozen)), frozen_tensors)
        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.criterion = build_loss(model.head, box=cfg.box, cls=cfg.cls, obj=cfg.obj, anchor_t=cfg.anchor_t, label_smoothing=cfg.label_smoothing, imgsz=cfg.imgsz,
                                    static_assign_epochs=cfg.static_assign_epochs)

    def _load_model_source(self) -> tuple[Path | str, dict[str, torch.Tensor] | None, list[str]]:
        """(the architecture: the model YAML's path or a checkpoint's model YAML text, the fine-tune weights or
        None, their class names), read before the dataset's scan: a missing file or another tool's checkpoint
        fails at once."""
        from detector.train.finetune import load_finetune_checkpoint

        cfg = self.cfg
        source = self._weights_source()
        ckpt, weights = load_finetune_checkpoint(source) if source else (None, None)
        names = list(ckpt["names"]) if ckpt is not None else []
        if Path(cfg.model).suffix in ckpt_io.CHECKPOINT_SUFFIXES:
            return (ckpt if cfg.model == source else load_finetune_checkpoint(cfg.model)[0])["model_yaml"], weights, names
        return resolve_model_path(cfg.model), weights, names

    def _weights_source(self) -> str:
        """The checkpoint a fine-tune starts from: `weights=`, else a checkpoint given as `model=`, else ''."""
        model = self.cfg.model
        return self.cfg.weights or (model if Path(model).suffix in ckpt_io.CHECKPOINT_SUFFIXES else "")

    def _new_model(self) -> nn.Module:
        """A model from the YAML (or a checkpoint's architecture) for the dataset's classes, started from a
        checkpoint's weights when fine-tuning, its anchors checked (and fitted) on the training boxes."""
        from detector.train.finetune import transfer_weights
        from detector.models.anchors import check_anchors
        from detector.models.builder import build_model

        cfg = self.cfg
        nc = self.train_set.coco.num_classes
        source = self._weights_source()
        architecture, weights, source_names = self._model_source
        model = build_model(architecture, nc=nc, attention=cfg.attention or None, attention_at=cfg.attention_at or None)
        if model.nc != nc:
            raise DetectorError(f"model: nc {model.nc} != {nc} classes in {self.data.train.annotations}")
        if weights is not None:
            report = transfer_weights(model, weights, source, source_names=source_names, names=self.names)
            if self.dist.is_main:
                LOGGER.info(report.summary(source))
        if cfg.autoanchor:
            wh = self.train_set.train_box_wh(cfg.imgsz)
            # `anchors: 3` in the YAML asks for fitted anchors; a fine-tune keeps the checkpoint's unless recall is low
            force = isinstance(model.yaml.get("anchors"), int) and weights is None
            report = check_anchors(model, wh, thr=cfg.anchor_t, imgsz=cfg.imgsz, seed=cfg.seed, force=force)
            if self.dist.is_main:
                LOGGER.info("autoanchor: %s", report)
        return model

    def _build_optimization(self) -> None:
        """Accumulation to the nominal batch, the optimizer, the warmup + cosine schedule and the EMA (rank 0);
        a resumed run restores their states."""
        from detector.train.ema import ModelEMA
        from detector.train.optim import LRSchedule, build_optimizer, scaled_weight_decay

        cfg = self.cfg
        self.accumulate = max(round(cfg.nbs / cfg.batch), 1)
        weight_decay = scaled_weight_decay(cfg.weight_decay, cfg.batch, self.accumulate, cfg.nbs)
        self.optimizer = build_optimizer(self.model, cfg.optimizer, lr=cfg.lr0, momentum=cfg.momentum, weight_decay=weight_decay)
        self.iters_per_epoch = len(self.train_loader)
        self.schedule = LRSchedule(
            lr0=cfg.lr0, lrf=cfg.lrf, epochs=self.epochs, iters_per_epoch=self.iters_per_epoch, warmup_iters=self._warmup_iters(),
            warmup_bias_lr=cfg.warmup_bias_lr, warmup_momentum=cfg.warmup_momentum, momentum=cfg.momentum, cos_lr=cfg.cos_lr,
        )
        self.ema = ModelEMA(self.model, decay=cfg.ema_decay, tau=cfg.ema_tau) if (cfg.ema and self.dist.is_main) else None
        if self.resume_ckpt is not None:
            self._restore(self.resume_ckpt)
            for group in self.optimizer.param_groups:  # the saved groups carry the saved batch's decay; `batch` may change
                if group.get("name") == "decay":
                    group["weight_decay"] = weight_decay

    def _wrap(self) -> None:
        """The module the step calls: the model, under SyncBN and DDP when distributed, compiled when asked."""
        cfg = self.cfg
        self.train_model: nn.Module = self.model
        if self.dist.enabled:
            if cfg.sync_bn and self.device.type == "cuda":
                self.train_model = nn.SyncBatchNorm.convert_sync_batchnorm(self.train_model)
            elif cfg.sync_bn and self.dist.is_main:
                LOGGER.warning("sync_bn=true ignored: SyncBatchNorm needs CUDA (this run uses %s)", self.device)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.train_model, device_ids=ids)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        self.norm_state = BatchNormState(self.model)  # SyncBN's conversion keeps the buffers: the same tensors

    def _build_validation(self) -> None:
        """Rank 0: the evaluator on the val loader `_build_data` made, the run folder (made here, once every check
        before training passed), the logger (a resumed run's rows after its epoch dropped), args.yaml."""
        from detector.infer.evaluator import Evaluator

        cfg = self.cfg
        self.evaluator = None
        self.logger = None
        if not self.dist.is_main:
            return
        val_loader = self._val_loader
        # validated in fp16 on CUDA (as before amp decided it), in the training's bf16 on a CPU that trains in it
        precision = torch.float16 if self.device.type == "cuda" else self.amp_dtype
        self.evaluator = Evaluator(val_loader, conf=cfg.val_conf, iou=cfg.val_iou, max_det=cfg.max_det, device=self.device,
                                   precision=precision)
        val_loader.start_workers()  # forked before training grows the heap they would share (see start_workers)
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "plots").mkdir(exist_ok=True)
        self.logger = RunLogger(self.run_dir)
        if self.resume_ckpt is not None:
            self.logger.truncate_after(self.state.epoch)
        else:
            self.logger.csv_path.unlink(missing_ok=True)  # a fresh run in a reused folder (exist_ok)
        self._write_args()

    def _write_args(self) -> None:
        """The config as given (so `cfg=args.yaml` reruns it), headed by a comment of the attention each row was
        built with: `attention: ''` means the model file's own, and the comment says what that was."""
        import yaml

        built = ", ".join(f"{row} {kind}" for row, kind in self.model.attentions.items()) or "none"
        text = yaml.safe_dump(asdict(self.cfg), sort_keys=False)
        path = self.run_dir / "args.yaml"
        try:
            path.write_text(f"# attention as built: {built}\n{text}")
        except OSError as err:
            raise write_failed(path, err) from err

    def _restore(self, ckpt: dict) -> None:
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.state = TrainState(**ckpt["train_state"])
        self._time_before = self.state.time_s
        ckpt_io.restore_rng_state(ckpt["rng"])
        LOGGER.info("resuming %s from epoch %d", self.run_dir, self.state.epoch + 1)

    # ---------------------------------------------------------------------------------------- the loop

    def fit(self) -> dict:
        """Train for the planned epochs (from the resumed epoch; with a `time` budget, the epochs that fit it), evaluating and
        checkpointing each epoch."""
        try:
            self.build()
            metrics: dict = {}
            epoch = self.state.epoch + 1
            while epoch < self.epochs:  # (a time budget refits the plan after every epoch but the last)
                started = time.perf_counter()
                losses, nonfinite, seen, unreadable = self.train_epoch(epoch)
                elapsed = time.perf_counter() - started
                metrics = self._end_epoch(epoch, losses, nonfinite, elapsed, seen * self.dist.world_size / elapsed, unreadable) or metrics  # all ranks' images
                epoch += 1
            if self.dist.is_main:
                self._finish()
            barrier(self.dist)  # every rank leaves the group together, none while rank 0 still writes its results
            return metrics
        finally:
            self.close()

    def close(self) -> None:
        """Close the run's logs and leave the process group (fit's last step, also after a failure).

        The DDP wrapper holds the process group: it goes first, so that the group's threads end inside
        `destroy_process_group` rather than at interpreter exit (where gloo can abort the process). The objects
        `build` froze return to the garbage collector first, so the run's cycles can be freed. The last checkpoint's
        background rename is waited for last, and its failure raised."""
        self._held.close()
        if self.logger is not None:
            self.logger.close()
        if self.dist.enabled and hasattr(self, "train_model"):
            self.train_model = self.model
            gc.collect()
        shutdown(self.dist)
        self._checkpoints.wait()

    def train_epoch(self, epoch: int) -> tuple[torch.Tensor, int, int, set[str]]:
        """One pass over the train loader; returns the mean loss parts, the skipped steps, the images seen and the
        files that could not be read (replaced by other images, possibly inside worker processes; under DDP, those of
        this rank's samples)."""
        from detector.data.transforms import to_model_input
        from detector.train.multiscale import draw_side, rescale

        cfg = self.cfg
        self.train_model.train()
        keep_frozen_norms_in_eval(self.model, self.frozen)
        mosaic_on = epoch < self.epochs - cfg.close_mosaic
        self.train_set.set_mosaic(mosaic_on)
        self.train_loader.set_epoch(epoch)  # order and augmentation from (seed, epoch): a resume replays them
        self.criterion.set_epoch(epoch)
        running = torch.zeros(3, device=self.device)
        losses_finite = torch.ones((), dtype=torch.bool, device=self.device)  # over the accumulated micro-batches
        skipped = self._skipped
        skipped.in_epoch = 0
        finite_steps = torch.zeros((), device=self.device)  # the steps the running mean holds
        seen = 0
        unreadable: set[str] = set()
        bar = tqdm(self.train_loader, total=self.iters_per_epoch, desc=f"epoch {epoch + 1}/{self.epochs}", disable=not self.dist.is_main, dynamic_ncols=True, leave=False)
        self.optimizer.zero_grad(set_to_none=True)
        self.norm_state.save()  # a resume loaded them after the build
        pending = 0  # micro-batches since the last optimizer step (every epoch ends with one)
        for i, batch in enumerate(_waited(bar)):
            step = epoch * self.iters_per_epoch + i
            accumulate = self._accumulate_at(step)
            self.schedule.apply(self.optimizer, epoch, i)
            images = to_model_input(batch["images"], self.device, channels_last=cfg.channels_last)
            if cfg.multi_scale:
                side = draw_side(cfg.imgsz, self.max_stride, cfg.multi_scale, seed=cfg.seed, step=step)
                images = rescale(images, side, self.max_stride)
            targets = batch["targets"]  # on the host: each loss moves what it needs (AlignedLoss sizes its windows there)
            pending += 1
            sync_now = pending >= accumulate or i + 1 == self.iters_per_epoch  # (YOLOv5's rule while it ramps)
            parts, finite = self._forward_backward(images, targets, sync_now)
            losses_finite = losses_finite & finite
            # non-finite parts (a skipped step) stay out of the mean: one would turn the epoch's logged losses to NaN
            counted = torch.isfinite(parts).all()
            finite_steps = finite_steps + counted
            running = torch.where(counted, running + (parts - running) / finite_steps.clamp(min=1), running)
            seen += images.shape[0]
            unreadable.update(f for meta in batch["meta"] for f in meta["unreadable"])
            if sync_now:
                with record_function("optimizer step + EMA"):
                    outcome = self._optimizer_step(losses_finite)
                losses_finite, pending = torch.ones_like(losses_finite), 0
                self._count_skipped(skipped, outcome, epoch, i)
            if self.dist.is_main and (i % LOG_INTERVAL == 0 or i + 1 == self.iters_per_epoch):
                with record_function("progress bar + logging"):
                    self._log_progress(bar, step, running, batch, first=i == 0)
        bar.close()
        return running.cpu(), skipped.in_epoch, seen, unreadable

    def _forward_backward(self, images: torch.Tensor, targets: torch.Tensor, sync_now: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Autocast forward, loss, scaled backward (gradients synced across DDP ranks only when `sync_now`);
        returns the detached loss parts and whether the loss is finite (a device flag: no sync here). Each stage is
        a `record_function` range, so `detector bench train`'s profile of a real epoch splits the step into them."""
        no_sync = self.train_model.no_sync() if (self.dist.enabled and not sync_now) else contextlib.nullcontext()
        with no_sync:
            with record_function("forward"), torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                                             enabled=self.amp_dtype is not None):
                raw = self.train_model(images)
            with record_function("loss + assignment"):
                loss, parts = self.criterion(raw, targets)
            if self.dist.enabled:
                loss = loss * self.dist.world_size  # DDP averages gradients over ranks; YOLO's loss is a sum
            with record_function("backward"):
                self.scaler.scale(loss).backward()
        return parts, torch.isfinite(loss.detach())

    def _log_progress(self, bar: tqdm, step: int, running: torch.Tensor, batch: dict, *, first: bool) -> None:
        """Rank 0, every LOG_INTERVAL steps: the progress bar's losses, TensorBoard scalars, the first batch's grid."""
        values = running.tolist()  # host read at log intervals only (a GPU sync point)
        lr = self.optimizer.param_groups[0]["lr"]
        postfix = {"box": f"{values[0]:.4f}", "obj": f"{values[1]:.4f}", "cls": f"{values[2]:.4f}", "inst": int(batch["targets"].shape[0]), "lr": f"{lr:.2e}"}
        if self.device.type == "cuda":
            postfix["mem"] = f"{torch.cuda.memory_reserved(self.device) / 2**30:.1f}G"
        bar.set_postfix(postfix)
        self.logger.step(step, running, lr)
        if first and not self._batch_grid_logged:
            self.logger.images("train/batch0", batch["images"][:16], step)
            self._batch_grid_logged = True

    def _warmup_iters(self) -> int:
        """`warmup_epochs` of iterations (at least `warmup_min_iters`), at most half of the planned run."""
        warmup = max(round(self.cfg.warmup_epochs * self.iters_per_epoch), self.cfg.warmup_min_iters)
        return min(warmup, max(self.epochs * self.iters_per_epoch // 2, 1))

    def _accumulate_at(self, step: int) -> int:
        """Gradient accumulation ramps from 1 to nbs/batch over the warmup (YOLOv5)."""
        warmup = self.schedule.warmup_iters
        if step >= warmup:
            return self.accumulate
        return max(1, round(float(np.interp(step, [0, warmup], [1, self.cfg.nbs / self.cfg.batch]))))

    def _optimizer_step(self, losses_finite: torch.Tensor) -> str:
        """Unscale, clip, check finiteness (one host sync per optimizer step), step, update EMA. Returns "stepped";
        "overflow" when only the fp16 GradScaler's scaled gradients overflowed (finite losses: the scaler skips the
        step and lowers its scale, its normal start, not a fault); or "nonfinite" (an inf or NaN loss or gradient).
        Every rank returns the same: the gradients are all-reduced, and under fp16 so is the losses' finiteness."""
        if self.scaler.is_enabled():  # else a NaN loss on one rank reads as a mere overflow on the others
            losses_finite = all_ranks_true(self.dist, losses_finite)
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.clip_grad > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad)
        else:
            # foreach norms: one multi-tensor launch on CUDA, not one kernel per parameter (258 for yolo-ca-n)
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        # a CPU-GPU sync point, once per optimizer step: whether to step, average and count is decided on the host
        finite, losses_ok = torch.stack((torch.isfinite(norm), losses_finite.to(norm.device))).tolist()
        if finite or self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # a scaler skips non-finite steps itself
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if finite and self.ema is not None:
            self.ema.update(self.model)
        if finite:
            self.norm_state.save()
            return "stepped"
        if self.scaler.is_enabled() and losses_ok:
            return "overflow"  # the forward was finite: its statistics stay, as after any fp16 scale search
        self.norm_state.restore()  # the skipped forward's statistics go with its gradients
        return "nonfinite"

    def _count_skipped(self, skipped: _SkippedSteps, outcome: str, epoch: int, i: int) -> None:
        """Count a non-finite step, warn, and stop the run after `max_nonfinite` in a row (a stepped one resets the
        run; an fp16 overflow leaves it as it is, logged at debug level only)."""
        if outcome == "stepped":
            skipped.in_row = 0
            return
        if outcome == "overflow":
            LOGGER.debug("fp16 gradients overflowed at epoch %d iteration %d: GradScaler skipped the step, scale now %g",
                         epoch + 1, i, self.scaler.get_scale())
            return
        skipped.in_row += 1
        skipped.in_epoch += 1
        self.state.nonfinite_total += 1
        LOGGER.warning("non-finite loss/gradients at epoch %d iteration %d: step skipped (%d in a row)", epoch + 1, i, skipped.in_row)
        if skipped.in_row >= self.cfg.max_nonfinite:
            self._checkpoints.wait()
            last = self.weights_dir / "last.pt"
            saved = f"last good checkpoint: {last}" if last.exists() else "no epoch finished, so no checkpoint"
            raise TrainingDiverged(f"training stopped: {skipped.in_row} non-finite steps in a row at epoch {epoch + 1}; "
                                   f"{saved} (try a lower lr0 or amp=off)")

    def _end_epoch(self, epoch: int, losses: torch.Tensor, nonfinite: int, epoch_time: float, images_per_s: float, unreadable: set[str]) -> dict | None:
        """Rank 0: evaluate the EMA model, log, save last/best; other ranks wait (and return None)."""
        metrics = None
        final = epoch + 1 == self.epochs
        budgeted = self.cfg.time > 0 and not final  # the epoch count is refitted after every epoch but the last
        if self.dist.is_main:
            result, fit, val_time = self._evaluate_epoch(epoch, epoch_time, final=final, budgeted=budgeted)
            metrics = result.metrics if result is not None else None
            if fit is not None and fit > self.state.best_fitness:
                self.state.best_fitness, self.state.best_epoch = fit, epoch
            lr = self.optimizer.param_groups[0]["lr"]
            self.logger.epoch(epoch, losses, lr, metrics, fit, epoch_time, nonfinite, len(unreadable), val_time)
            if unreadable:
                LOGGER.warning("epoch %d: %d unreadable image(s) replaced by others: %s", epoch + 1, len(unreadable), ", ".join(sorted(unreadable)))
            self.state.epoch = epoch
            self.state.time_s = self._time_spent()
            self._save(epoch, is_best=fit is not None and self.state.best_epoch == epoch)
            summary = f"epoch {epoch + 1}/{self.epochs}  box {losses[0]:.4f} obj {losses[1]:.4f} cls {losses[2]:.4f}  {images_per_s:.1f} img/s"
            if metrics is not None:
                summary += f"  AP50 {metrics['AP50']:.4f}  AP {metrics['AP']:.4f}  (train {epoch_time:.1f} s, val {val_time:.1f} s)"
            LOGGER.info(summary)
        else:
            self.state.epoch = epoch
        barrier(self.dist)
        if budgeted or self.cfg.patience > 0:  # the plan rank 0 refitted or ended, for every rank
            self.state.epochs = broadcast_int(self.dist, self.state.epochs)
        if budgeted:  # the warmup too: capped by the plan, as a resume of this plan builds it
            self.schedule = replace(self.schedule, epochs=self.epochs, warmup_iters=self._warmup_iters())
        return metrics

    def _evaluate_epoch(self, epoch: int, epoch_time: float, *, final: bool,
                        budgeted: bool) -> tuple[EvalResult | None, float | None, float]:
        """Rank 0: (this epoch's evaluation, its fitness, the seconds both took), evaluated when due and whenever the
        epoch turns out to be the run's last: a time budget that holds no further epoch, or `patience` run out (the
        plan then ends here, so a resume finds the run finished). The last epoch's evaluation writes the final outputs."""
        from detector.infer.metrics import fitness

        started = time.perf_counter()
        result = self._validate(epoch, final=final) if (epoch + 1) % self.cfg.val_interval == 0 or final else None
        if budgeted:
            self._fit_to_budget(epoch, epoch_time + time.perf_counter() - started)
            final = self.epochs == epoch + 1
            if final:
                result = self._validate(epoch, final=True, done=result)
        fit = fitness(result.metrics) if result is not None else None
        if not final and self._should_stop(epoch, fit):
            LOGGER.info("early stop: no improvement for %d epochs (best epoch %d)", self.cfg.patience, self.state.best_epoch + 1)
            self.state.epochs, self.state.stopped_early = epoch + 1, True
            result = self._validate(epoch, final=True, done=result)
            fit = fitness(result.metrics) if fit is None else fit  # evaluated now, when this epoch was not due
        return result, fit, time.perf_counter() - started

    def _validate(self, epoch: int, *, final: bool, done: EvalResult | None = None) -> EvalResult:
        """Evaluate the EMA model (unless `done`, this epoch's evaluation, is given: the model has not changed since)
        and save its outputs; the drawn sample images go to TensorBoard (plots and predictions.json at the end).
        Returns the evaluator's result."""
        from detector.infer.evaluator import save_results

        result = done if done is not None else self.evaluator.run(self.eval_model, samples=VAL_SAMPLES)
        save_results(result, self.run_dir, save_json=final, plots=self.cfg.plots and final, verbose=final)
        if done is None:
            self.logger.images("val/predictions", result.sample[None], epoch)
        return result

    def _fit_to_budget(self, epoch: int, epoch_s: float) -> None:
        """With `time`, after each epoch but the last (rank 0): set the epoch count to the epochs done plus what the rest
        of the budget holds at the last epoch's pace (training and validation), so the first epoch's start-up cost and
        a machine that speeds up or slows down are followed. Kept in the run's state (saved with the time spent, so a
        resumed run keeps both); the config keeps the user's `epochs`. The lr schedule is a function of (epoch,
        count), so a new count moves the remaining epochs onto the cosine of a run started with it."""
        spent = self._time_spent()
        before = self.epochs
        self.state.epochs = epoch + epochs_for_budget(self.cfg.time * 3600, spent, epoch_s)
        if self.epochs != before:
            LOGGER.info(
                "time budget %.3g h: epoch %d took %.0f s, %.0f s spent: %d epochs in all (was %d)",
                self.cfg.time, epoch + 1, epoch_s, spent, self.epochs, before,
            )

    def _time_spent(self) -> float:
        """Wall seconds of this run: before the resumed checkpoint, plus since this process started it."""
        return self._time_before + time.perf_counter() - self._fit_started

    @property
    def epochs(self) -> int:
        """The planned epoch count (the run's state; the config keeps the user's `epochs`)."""
        return self.state.epochs

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def _should_stop(self, epoch: int, fit: float | None) -> bool:
        """Patience: `patience` epochs since the best one, counting this epoch's fitness `fit` if it was evaluated."""
        best_epoch = epoch if fit is not None and fit > self.state.best_fitness else self.state.best_epoch
        patience = self.cfg.patience
        return patience > 0 and best_epoch >= 0 and epoch - best_epoch >= patience

    def _checkpoint(self, epoch: int) -> dict:
        return {
            "format_version": ckpt_io.FORMAT_VERSION,
            "version": __version__,
            "model_yaml": self.model.yaml,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch": epoch,
            "train_state": asdict(self.state),
            "rng": ckpt_io.capture_rng_state(),
            "train_config": asdict(self.cfg),
            "names": list(self.names),
            "category_ids": [int(c) for c in self.category_ids],
            "imgsz": self.cfg.imgsz,
            "run_dir": str(self.run_dir),
        }

    def _save(self, epoch: int, *, is_best: bool) -> None:
        """last.pt; best.pt, when this epoch is the best, as an inference file (`inference_checkpoint`: what predict,
        val, export and fine-tuning read; a resume reads last.pt), renamed into place before last.pt; the
        `save_period` copies as links to last.pt. Their fsync and renames overlap the next epoch."""
        full, weights = self._checkpoint(epoch), self.weights_dir
        files = {weights / "best.pt": ckpt_io.inference_checkpoint(full)} if is_best else {}
        files[weights / "last.pt"] = full
        period = self.cfg.save_period
        links = {weights / f"epoch{epoch + 1}.pt": weights / "last.pt"} if period > 0 and (epoch + 1) % period == 0 else {}
        self._checkpoints.save(files, links=links)
        self._best_saved |= is_best

    def _finish(self) -> None:
        """Make sure best.pt is an inference file (one a resumed run took over from an older version, or a run without a
        best epoch, is made one here) and plot the curves."""
        self._checkpoints.wait()
        best = self.weights_dir / "best.pt"
        if not self._best_saved:
            full = ckpt_io.load_checkpoint(best) if best.exists() else self._checkpoint(self.state.epoch)
            if full["optimizer"] is not None:
                ckpt_io.save_checkpoint(best, ckpt_io.inference_checkpoint(full))
        if self.cfg.plots and self.logger is not None and self.logger.csv_path.exists():
            plot_results(self.logger.csv_path, self.run_dir / "plots" / "results.png")
        LOGGER.info("results in %s (best epoch %d, fitness %.4f)", self.run_dir, self.state.best_epoch + 1, self.state.best_fitness)


def epochs_for_budget(budget_s: float, spent_s: float, epoch_s: float) -> int:
    """How many epochs, counting the one just done (`epoch_s` long, `spent_s` since the run started), a time budget
    holds: that one plus as many more of the same length as the rest of it holds."""
    return 1 + max(int((budget_s - spent_s) // max(epoch_s, 1e-9)), 0)


def train(cfg: TrainConfig) -> dict:
    """Run one training job; returns the final epoch's metrics (rank 0) and leaves the run folder."""
    return Trainer(cfg).fit()

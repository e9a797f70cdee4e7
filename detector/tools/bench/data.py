"""`detector bench data`: training-pipeline throughput (images/s through the train loader, augmentation and collate
included, no model) at several image sizes and worker counts, mosaic on and off; `scale=coco`: the scan and the
loader on a COCO-sized dataset (`detector.tools.bench.scale`).

Options (key=value): `detector.options.BenchDataOptions`; `detector bench data --help` lists them with their
defaults and ranges.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from detector.data.spec import SplitSpec
from detector.errors import DetectorError
from detector.options import BenchDataOptions
from detector.runtime.machine import describe_machine
from detector.viz.tables import format_table


def measure(split: SplitSpec, *, imgsz: int, workers: int, mosaic: bool, batch: int, batches: int, cache: str = "") -> float:
    """Images per second through the train loader, after one warm-up batch (worker start-up excluded)."""
    from detector.config import TrainConfig
    from detector.data.loader import build_train_loader

    hyp = TrainConfig(mosaic=1.0 if mosaic else 0.0)
    loader = build_train_loader(split, imgsz=imgsz, batch_size=batch, workers=workers, hyp=hyp, seed=0, cache=cache)
    seen, started = 0, 0.0
    while seen < batches * batch:
        for b in loader:
            if started == 0.0:
                started = time.perf_counter()  # after the first batch: workers are up
                continue
            seen += len(b["images"])
            if seen >= batches * batch:
                break
    elapsed = time.perf_counter() - started
    del loader
    return seen / elapsed


def main(opts: BenchDataOptions) -> None:
    """Print one row per imgsz, worker count and mosaic setting (`opts` already checked, e.g. by `load_options`);
    with scale=coco, the COCO-scale table of `detector.tools.bench.scale` instead."""
    from detector.data.spec import load_data_spec
    from detector.data.synthetic import generate_shapes_dataset

    empty = next((key for key in ("imgsz", "workers") if not getattr(opts, key)), None)
    if empty:  # else an empty table, or (scale=coco) max() of nothing
        raise DetectorError(f"bench data: '{empty}' is empty")
    if opts.scale == "coco":
        from detector.tools.bench.scale import main as scale_main

        scale_main(opts)
        return

    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for imgsz in opts.imgsz:
            if opts.data:
                split = load_data_spec(opts.data).train
            else:
                split = load_data_spec(generate_shapes_dataset(Path(tmp) / str(imgsz), n_train=192, n_val=1, imgsz=imgsz)).train
            for workers in opts.workers:
                for mosaic in (True, False):
                    rate = measure(split, imgsz=imgsz, workers=workers, mosaic=mosaic, batch=opts.batch,
                                   batches=opts.batches, cache=opts.cache)
                    rows.append([imgsz, workers, "on" if mosaic else "off", rate])
                    print(f"  imgsz {imgsz} workers {workers} mosaic {rows[-1][2]}: {rate:.0f} images/s", flush=True)
    print(describe_machine().summary())
    print(format_table(["imgsz", "workers", "mosaic", "images/s"], rows, floatfmt=".0f"))

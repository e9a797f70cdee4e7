"""`detector bench data`: training-pipeline throughput (images/s through the train loader, augmentation and collate
included, no model) at several image sizes and worker counts, mosaic on and off.

Options (key=value): data (dataset YAML; default: 192 synthetic images drawn at each imgsz, in a temporary folder),
imgsz (comma list, default 320,640), workers (comma list, default 0,1,2), batch (default 16), batches (timed per
row, default 8), cache ('' or ram).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from detector.errors import DetectorError
from detector.tables import format_table

DEFAULTS = {"data": "", "imgsz": "320,640", "workers": "0,1,2", "batch": "16", "batches": "8", "cache": ""}


def _ints(key: str, value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise DetectorError(f"bench data: '{key}' expects integers, got '{value}'") from None


def measure(split, *, imgsz: int, workers: int, mosaic: bool, batch: int, batches: int, cache: str = "") -> float:
    """Images per second through the train loader, after one warm-up batch (worker start-up excluded)."""
    from detector.config import TrainConfig
    from detector.data.loader import build_train_loader

    hyp = TrainConfig(mosaic=1.0 if mosaic else 0.0)
    loader = build_train_loader(split, imgsz=imgsz, batch_size=batch, workers=workers, hyp=hyp, seed=0, cache=cache)
    seen, started = 0, 0.0
    while seen < batches * batch:
        for i, b in enumerate(loader):
            if started == 0.0:
                started = time.perf_counter()  # after the first batch: workers are up
                continue
            seen += len(b["images"])
            if seen >= batches * batch:
                break
    elapsed = time.perf_counter() - started
    del loader
    return seen / elapsed


def main(options: dict[str, str]) -> None:
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise DetectorError(f"bench data: unknown option '{sorted(unknown)[0]}'; known: {', '.join(DEFAULTS)}")
    opts = {**DEFAULTS, **options}
    from detector.config import load_data_spec
    from detector.data.synthetic import generate_shapes_dataset

    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for imgsz in _ints("imgsz", opts["imgsz"]):
            if opts["data"]:
                split = load_data_spec(opts["data"]).train
            else:
                split = load_data_spec(generate_shapes_dataset(Path(tmp) / str(imgsz), n_train=192, n_val=1, imgsz=imgsz)).train
            for workers in _ints("workers", opts["workers"]):
                for mosaic in (True, False):
                    rate = measure(
                        split, imgsz=imgsz, workers=workers, mosaic=mosaic, batch=int(opts["batch"]),
                        batches=int(opts["batches"]), cache=opts["cache"],
                    )
                    rows.append([imgsz, workers, "on" if mosaic else "off", rate])
                    print(f"  imgsz {imgsz} workers {workers} mosaic {rows[-1][2]}: {rate:.0f} images/s", flush=True)
    print(format_table(["imgsz", "workers", "mosaic", "images/s"], rows, floatfmt=".0f"))

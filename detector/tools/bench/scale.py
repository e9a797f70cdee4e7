"""`detector bench data scale=coco`: the data pipeline at COCO scale, on a COCO-sized instances json (118,287
images, 544,000 annotations, COCO's 80 gapped category ids) whose images are hard links to four real photos
(skimage's bundled ones, saved as JPEGs at COCO's common sizes) in a temporary folder.

Each measurement runs in a fresh Python process (`python -m detector.tools.bench.scale <phase> <json>`), so one
does not warm up or inflate the next: the first scan (no cache), the cached re-scan, and the train loader with a
warm cache (time to its first batch; each worker's USS at the first batch and after `steps` more batches; the
same with the mosaic partner buffer off, to tell its share of the growth from the dataset's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from detector.data.spec import SplitSpec
from detector.options import BenchDataOptions
from detector.runtime.machine import describe_machine
from detector.viz.tables import format_table

COCO_IMAGES = 118_287
COCO_ANNOTATIONS = 544_000
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
PHOTOS = {"astronaut": (640, 480), "coffee": (480, 640), "chelsea": (640, 427), "rocket": (500, 375)}  # name: w, h
CROWD_FRACTION = 0.01


def write_coco_scale(root: Path, *, images: int = COCO_IMAGES, annotations: int = COCO_ANNOTATIONS, seed: int = 0) -> SplitSpec:
    """`root/images/<12 digits>.jpg` (hard links to four photos in `root/photos`) and `root/instances.json`:
    random boxes inside each image (about 8% of the images without any, 1% crowd), a rectangle as segmentation."""
    from PIL import Image
    import skimage.data

    rng = np.random.default_rng(seed)
    (root / "photos").mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    sources, sizes = [], np.array(list(PHOTOS.values()), np.float64)
    for name, (w, h) in PHOTOS.items():
        photo = Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB").resize((w, h))
        sources.append(root / "photos" / f"{name}.jpg")
        photo.save(sources[-1], quality=90)
    photo_of = rng.integers(len(PHOTOS), size=images)
    names = [f"{i + 1:012d}.jpg" for i in range(images)]
    for name, k in zip(names, photo_of):
        os.link(sources[k], root / "images" / name)
    image_of = np.sort(rng.integers(images, size=annotations))
    wh = sizes[photo_of[image_of]]
    box_wh = rng.uniform(0.02, 0.6, (annotations, 2)) * wh
    xy = rng.uniform(0, 1, (annotations, 2)) * (wh - box_wh)
    cats = rng.choice(COCO_CATEGORY_IDS, annotations)
    crowd = rng.random(annotations) < CROWD_FRACTION
    parts = ['{"images": [']
    parts.append(",".join(
        f'{{"id": {i + 1}, "file_name": "{n}", "width": {int(sizes[k][0])}, "height": {int(sizes[k][1])}}}'
        for i, (n, k) in enumerate(zip(names, photo_of))
    ))
    parts.append('], "annotations": [')
    parts.append(",".join(
        f'{{"id": {j + 1}, "image_id": {i + 1}, "category_id": {c}, "iscrowd": {int(z)}, "area": {w * h:.2f}, '
        f'"bbox": [{x:.2f}, {y:.2f}, {w:.2f}, {h:.2f}], '
        f'"segmentation": [[{x:.2f}, {y:.2f}, {x + w:.2f}, {y:.2f}, {x + w:.2f}, {y + h:.2f}, {x:.2f}, {y + h:.2f}]]}}'
        for j, (i, c, z, (x, y), (w, h)) in enumerate(zip(image_of.tolist(), cats.tolist(), crowd.tolist(), xy.tolist(), box_wh.tolist()))
    ))
    categories = ",".join(f'{{"id": {c}, "name": "class{c}", "supercategory": "thing"}}' for c in COCO_CATEGORY_IDS)
    parts.append(f'], "categories": [{categories}]}}')
    (root / "instances.json").write_text("".join(parts))
    return SplitSpec(images=root / "images", annotations=root / "instances.json")


# ------------------------------------------------------------------------------- phases (child processes)


def phase_scan(images: str, annotations: str, cache_dir: str) -> dict[str, Any]:
    """One CocoDataset scan: seconds, RSS before it (imports) and the process's peak."""
    from detector import memory
    from detector.data.coco import CocoDataset

    before = memory.process_memory()["rss"]
    started = time.perf_counter()
    coco = CocoDataset(SplitSpec(images=Path(images), annotations=Path(annotations)), cache_dir=Path(cache_dir))
    return {"seconds": time.perf_counter() - started, "rss_before": before, "peak_rss": memory.peak_rss_bytes(),
            "rss_after": memory.process_memory()["rss"], "images": len(coco)}


def phase_loader(images: str, annotations: str, cache_dir: str, *, imgsz: int, batch: int, workers: int, steps: int,
                 buffer: int) -> dict[str, Any]:
    """build_train_loader (warm cache) -> first batch: seconds; each worker's USS then and after `steps` batches."""
    from detector import memory
    from detector.config import TrainConfig
    from detector.data import loader as loader_module

    loader_module.PARTNER_BUFFER = buffer  # read when the TrainDataset is built
    started = time.perf_counter()
    loader = loader_module.build_train_loader(
        SplitSpec(images=Path(images), annotations=Path(annotations)), imgsz=imgsz, batch_size=batch, workers=workers,
        hyp=TrainConfig(), seed=0, cache_dir=Path(cache_dir),
    )
    built = time.perf_counter() - started
    batches = iter(loader)
    next(batches)
    first = time.perf_counter() - started
    uss_start = [memory.process_memory(pid)["uss"] for pid in memory.child_pids()]
    for _ in range(steps):
        next(batches)
    uss_end = [memory.process_memory(pid)["uss"] for pid in memory.child_pids()]
    main = memory.process_memory()
    return {"built": built, "first_batch": first, "uss_start": uss_start, "uss_end": uss_end, "main_rss": main["rss"],
            "main_uss": main["uss"], "steps": steps}


def _run_phase(name: str, **kwargs: Any) -> dict[str, Any]:
    """Run `phase_<name>(**kwargs)` in a fresh interpreter; its result comes back as the last stdout line."""
    code = [sys.executable, "-m", "detector.tools.bench.scale", name, json.dumps(kwargs)]
    done = subprocess.run(code, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench phase {name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- the bench


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f} MB"


def _clear_caches(split: SplitSpec, cache_dir: Path) -> None:
    for path in [*split.annotations.parent.glob(f".{split.annotations.name}.scan-cache*"), *cache_dir.glob("*")]:
        path.unlink()


def run_scale(*, imgsz: int, batch: int, workers: int, steps: int, images: int = COCO_IMAGES,
              annotations: int = COCO_ANNOTATIONS) -> list[list[str]]:
    """Build the COCO-sized set, measure each phase in its own process, return the table rows [what, value]."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        split = write_coco_scale(Path(tmp) / "coco", images=images, annotations=annotations)
        cache_dir = Path(tmp) / "run"
        cache_dir.mkdir()
        print(f"  wrote {images:,} images (hard links), {annotations:,} annotations in {time.perf_counter() - started:.0f} s",
              flush=True)
        paths = {"images": str(split.images), "annotations": str(split.annotations), "cache_dir": str(cache_dir)}
        _clear_caches(split, cache_dir)
        cold = _run_phase("scan", **paths)
        warm = _run_phase("scan", **paths)
        rows = [
            ["first scan (no cache)", f"{cold['seconds']:.1f} s"],
            ["cached re-scan", f"{warm['seconds']:.1f} s"],
            ["peak RSS, first scan / cached (process after imports)",
             f"{_mb(cold['peak_rss'])} / {_mb(warm['peak_rss'])} ({_mb(cold['rss_before'])})"],
        ]
        for buffer in (64, 0):
            run = _run_phase("loader", **paths, imgsz=imgsz, batch=batch, workers=workers, steps=steps, buffer=buffer)
            label = f"partner buffer {buffer}"
            growth = ", ".join(f"{_mb(a)} -> {_mb(b)}" for a, b in zip(run["uss_start"], run["uss_end"]))
            rows += [
                [f"{label}: time to the first batch (loader built)", f"{run['first_batch']:.1f} s ({run['built']:.1f} s)"],
                [f"{label}: worker USS, first batch -> {steps} batches later", growth],
                [f"{label}: main process RSS / USS", f"{_mb(run['main_rss'])} / {_mb(run['main_uss'])}"],
            ]
            print(f"  {label}: first batch {run['first_batch']:.1f} s, worker USS {growth}", flush=True)
        return rows


def main(opts: BenchDataOptions) -> None:
    """`opts`: BenchDataOptions with scale='coco'; imgsz is its largest, workers its largest (at least 1)."""
    imgsz, workers = max(opts.imgsz), max(max(opts.workers), 1)
    print(f"COCO scale: {COCO_IMAGES:,} images, {COCO_ANNOTATIONS:,} annotations; imgsz {imgsz}, batch {opts.batch}, "
          f"{workers} workers, {opts.steps} steps", flush=True)
    rows = run_scale(imgsz=imgsz, batch=opts.batch, workers=workers, steps=opts.steps)
    print(describe_machine().summary())
    print(format_table(["measure", "value"], rows))


if __name__ == "__main__":
    phase, arguments = sys.argv[1], json.loads(sys.argv[2])
    result = {"scan": phase_scan, "loader": phase_loader}[phase](**arguments)
    print(json.dumps(result))

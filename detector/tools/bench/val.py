"""`detector bench val`: validation throughput of the nano models, split into pre-process / inference / NMS / metric
(ms per image), and the metric alone on a 5,000-image synthetic COCO case against plain pycocotools.

Options (key=value): `detector.options.BenchValOptions`; `detector bench val --help` lists them with their defaults
and ranges.

Untrained models produce almost no boxes above conf 0.001 (the head's bias init), so their NMS and metric columns
are a floor; pass weights= for a trained model's figures. The metric case scores identical detections with each
backend and checks that the numbers agree.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from detector import memory
from detector.errors import DetectorError
from detector.infer.coco_rows import BOX_DECIMALS, SCORE_DECIMALS
from detector.options import BenchValOptions
from detector.runtime.machine import describe_machine
from detector.viz.tables import format_table


def main(opts: BenchValOptions) -> None:
    """Print the pipeline table, then the metric table (`opts` already checked, e.g. by `load_options`)."""
    if not opts.imgsz:
        raise DetectorError("bench val: 'imgsz' is empty")
    memory.hold_freed_heap()  # as `detector val` does
    with tempfile.TemporaryDirectory() as tmp:
        if opts.data:
            data = Path(opts.data)
        else:
            from detector.data.synthetic import generate_shapes_dataset

            data = generate_shapes_dataset(Path(tmp), n_train=1, n_val=opts.images, imgsz=640)
        rows = bench_pipeline(opts, data)
    print(describe_machine().summary())
    print(format_table(["model", "imgsz", "images", "images/s", "pre-process ms", "inference ms", "NMS ms", "metric ms"], rows, floatfmt=".1f"))
    if opts.metric_images > 0:
        print()
        rows = bench_metric(opts.metric_images, opts.dets_per_image, opts.classes)
        print(format_table(["metric", "images", "detections", "seconds", "ms/image", "AP"], rows, floatfmt=".3f"))


def bench_pipeline(opts: BenchValOptions, data: Path) -> list[list[Any]]:
    """The second of two Evaluator passes per (model, imgsz) (the first warms up kernels for every batch shape);
    images/s counts data loading too."""
    import torch

    from detector.data.spec import load_data_spec
    from detector.models.catalog import resolve_model_path
    from detector.data.loader import build_val_loader
    from detector.runtime.device import select_device
    from detector.infer.evaluator import Evaluator
    from detector.models.builder import build_model

    device = select_device(opts.device)
    split = load_data_spec(data).val
    rows = []
    for imgsz in opts.imgsz:
        loader = build_val_loader(split, imgsz=imgsz, batch_size=opts.batch, workers=opts.workers, rect=True)
        nc = loader.dataset.coco.num_classes
        for name, model in _models(opts, nc, build_model, resolve_model_path):
            model.to(device).eval()
            evaluator = Evaluator(loader, device=device, precision=torch.float16 if device.type == "cuda" else None)
            evaluator.run(model)
            started = time.perf_counter()
            speed = evaluator.run(model).speed_ms
            elapsed = time.perf_counter() - started
            count = len(loader.dataset)
            rows.append([name, imgsz, count, count / elapsed, speed["preprocess"], speed["inference"], speed["nms"], speed["metric"]])
            print(f"  {name} {imgsz}: {count / elapsed:.1f} images/s", flush=True)
    return rows


def _models(opts: BenchValOptions, nc: int, build_model: Any, resolve_model_path: Any) -> list[tuple[str, Any]]:
    if opts.weights:
        from detector.api import Detector

        return [(Path(opts.weights).name, Detector.from_checkpoint(opts.weights, device=opts.device).model)]
    return [(name, build_model(resolve_model_path(name), nc=nc)) for name in opts.models]


def bench_metric(num_images: int, dets_per_image: int, num_classes: int, seed: int = 0) -> list[list[Any]]:
    """The same synthetic detections scored by plain pycocotools (list of dicts + loadRes, as users do), by our
    evaluate_coco with each backend; every AP must agree."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from detector.infer.metrics import detections_to_coco_results, evaluate_coco

    dataset, det = synthetic_coco(num_images, dets_per_image, num_classes, seed)
    rows = []

    def gt() -> COCO:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO()
            coco.dataset = {k: list(v) for k, v in dataset.items()}
            coco.createIndex()
        return coco

    coco_gt = gt()
    results = detections_to_coco_results(det)
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    rows.append(["plain pycocotools (loadRes + COCOeval)", num_images, len(det), time.perf_counter() - started, float(ev.stats[0])])
    import importlib.util

    backends = ["pycocotools"] + (["faster"] if importlib.util.find_spec("faster_coco_eval") else [])
    for backend in backends:
        coco_gt = gt()
        started = time.perf_counter()
        metrics, _ = evaluate_coco(coco_gt, det, backend=backend)
        rows.append([f"evaluate_coco backend={backend}", num_images, len(det), time.perf_counter() - started, metrics["AP"]])
    for row in rows:
        row.insert(4, 1000 * row[3] / num_images)
    if any(abs(row[-1] - rows[0][-1]) > 1e-4 for row in rows):
        raise DetectorError(f"bench val: the backends disagree: {[row[-1] for row in rows]}")
    return rows


def synthetic_coco(num_images: int, dets_per_image: int, num_classes: int, seed: int = 0) -> tuple[dict, np.ndarray]:
    """COCO-like GT (about 7 boxes per image, gapped category ids, 1% crowd) and (N, 7) detections: 80% of the GT
    boxes found with jitter, then random low-score boxes up to `dets_per_image` x `num_images` in all, spread over
    the images at random (so the count per image varies around `dets_per_image`)."""
    rng = np.random.default_rng(seed)
    cat_ids = np.arange(num_classes) * 2 + 1
    width, height = 640, 480
    per_image = rng.poisson(7, num_images)
    image_of = np.repeat(np.arange(1, num_images + 1), per_image)
    n = len(image_of)
    wh = np.exp(rng.uniform(np.log(4), np.log(400), (n, 2))).clip(2, [width - 1, height - 1])
    xy = rng.uniform(0, 1, (n, 2)) * ([width, height] - wh)
    cats = rng.choice(cat_ids, n)
    crowd = rng.random(n) < 0.01
    anns = [
        {"id": i + 1, "image_id": int(im), "category_id": int(c), "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h), "iscrowd": int(cr)}
        for i, (im, c, x, y, w, h, cr) in enumerate(zip(image_of, cats, xy[:, 0], xy[:, 1], wh[:, 0], wh[:, 1], crowd))
    ]
    dataset = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": width, "height": height} for i in range(1, num_images + 1)],
        "categories": [{"id": int(c), "name": f"class{c}"} for c in cat_ids],
        "annotations": anns,
    }
    found = (rng.random(n) < 0.8) & ~crowd
    tp = np.column_stack([image_of, xy + rng.normal(0, 0.05, (n, 2)) * wh, wh * rng.normal(1, 0.05, (n, 2)), rng.uniform(0.3, 1, n), cats])[found]
    extra = max(dets_per_image * num_images - len(tp), 0)
    fp_wh = np.exp(rng.uniform(np.log(4), np.log(300), (extra, 2)))
    fp = np.column_stack(
        [rng.integers(1, num_images + 1, extra), rng.uniform(0, 1, (extra, 2)) * ([width, height] - fp_wh.clip(max=[width - 1, height - 1])), fp_wh, rng.uniform(0.001, 0.5, extra), rng.choice(cat_ids, extra)]
    )
    det = np.concatenate([tp, fp])
    det = det[np.lexsort((-det[:, 5], det[:, 0]))]
    det[:, 1:5] = det[:, 1:5].round(BOX_DECIMALS)  # as predictions.json stores them
    det[:, 5] = det[:, 5].round(SCORE_DECIMALS)
    return dataset, det


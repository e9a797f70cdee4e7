#!/usr/bin/env python3
"""Train and run one Ultralytics model for `scripts/rivals.py`; run ONLY by the rivals venv's python.

This file is a separate program, not part of the `detector` package (Ultralytics is AGPL: it is imported here
and nowhere else). `python rivals_driver.py job.json` reads the job the harness wrote and, in the job's `out`:

    train/                 Ultralytics' own run folder (weights/last.pt, best.pt, results.csv)
    train.json             wall time of model.train() (of its last part, after `epochs_before` epochs, when resumed),
                           parameter count, GFLOPs at imgsz, Ultralytics version (written once)
    predictions.json       COCO result rows on the val images: OUR image ids, ORIGINAL category ids

Training uses Ultralytics' defaults (optimizer=auto, its augmentation, its workers choice) with only the shared
budget set: epochs, imgsz, batch, seed, device, from scratch (pretrained=False), plots off (plots download a font).
A killed run continues from train/weights/last.pt. Images for prediction are decoded with PIL with the EXIF
orientation applied, the frame our ground truth is in.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def epochs_done(results_csv: Path) -> int:
    """Epochs an Ultralytics run has finished: the rows of its results.csv (one per epoch, after a header)."""
    if not results_csv.exists():
        return 0
    rows = [line for line in results_csv.read_text().splitlines() if line.strip()]
    return max(len(rows) - 1, 0)


def train(job: dict[str, Any], out: Path) -> None:
    """model.train() with the shared budget, timed; resumes from last.pt when an earlier try was killed."""
    from ultralytics import YOLO, __version__

    last = out / "train" / "weights" / "last.pt"
    resumed = last.exists()
    epochs_before = epochs_done(out / "train" / "results.csv") if resumed else 0  # the timed part is the rest
    start = time.perf_counter()
    if resumed:
        YOLO(str(last)).train(resume=True)
    else:
        YOLO(job["model"]).train(
            data=job["data_yaml"], epochs=job["epochs"], imgsz=job["imgsz"], batch=job["batch"], seed=job["seed"],
            device=job["device"] or None, pretrained=False, plots=False, project=str(out), name="train",
            exist_ok=True, verbose=True,
        )
    wall_s = time.perf_counter() - start
    best = out / "train" / "weights" / "best.pt"
    model = YOLO(str(best if best.exists() else last))
    params = sum(p.numel() for p in model.model.parameters())
    label = f"Ultralytics {Path(job['model']).stem}"
    info = {"wall_s": wall_s, "resumed": resumed, "epochs_before": epochs_before, "params": int(params), "gflops": forward_gflops(model.model, job["imgsz"]),
            "version": __version__, "weights": str(best), "label": label}
    (out / "train.json").write_text(json.dumps(info, indent=1))


def forward_gflops(module: Any, imgsz: int) -> float:
    """GFLOPs of one eval forward on a (1, 3, imgsz, imgsz) image by the very counter the harness uses for ours
    (`detector.models.info.forward_flops`: 2 FLOPs per multiply-add, attention's products included, element-wise
    work not counted), on a copy so the trained model is left as it is. The venv sees the `detector` package
    through its system site-packages (or the harness's PYTHONPATH); only Ultralytics must not import the other way."""
    import copy

    import torch

    from detector.models.info import forward_flops

    net = copy.deepcopy(module).float().eval()
    return forward_flops(net, torch.zeros(1, 3, imgsz, imgsz)) / 1e9


def predict(job: dict[str, Any], out: Path) -> None:
    """Detections on every val image at the harness's conf / iou / max_det, as COCO result rows."""
    import numpy as np
    from PIL import Image, ImageOps
    from ultralytics import YOLO

    weights = json.loads((out / "train.json").read_text())["weights"]
    model = YOLO(weights)
    category_ids = job["category_ids"]
    rows = []
    for item in job["val_images"]:
        with Image.open(item["file"]) as im:
            rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # Ultralytics takes numpy images as BGR (cv2 order)
        result = model.predict(
            bgr, imgsz=job["imgsz"], conf=job["conf"], iou=job["iou"], max_det=job["max_det"],
            device=job["device"] or None, verbose=False,
        )[0]
        xyxy = result.boxes.xyxy.cpu().double().numpy()
        scores = result.boxes.conf.cpu().double().numpy()
        classes = result.boxes.cls.cpu().long().numpy()
        for (x1, y1, x2, y2), score, cls in zip(xyxy.tolist(), scores.tolist(), classes.tolist()):
            rows.append({
                "image_id": item["image_id"], "category_id": int(category_ids[cls]),
                "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)], "score": round(score, 5),
            })
    (out / "predictions.json").write_text(json.dumps(rows))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: rivals_driver.py job.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    import torch
    import ultralytics.utils.torch_utils as torch_utils

    # the same thread count as ours: on CPU, Ultralytics' select_device resets torch to its NUM_THREADS
    # (CPUs - 1, so 1 on a 2-core machine), a module constant we override instead of patching its code
    torch_utils.NUM_THREADS = job["threads"]
    torch.set_num_threads(job["threads"])
    out = Path(job["out"])
    if not (out / "train.json").exists():
        train(job, out)
    predict(job, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

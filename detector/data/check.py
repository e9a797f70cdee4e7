"""`detector data check`: scan both splits of a dataset YAML, print the scan summaries and label statistics, and
save PNGs of augmented training batches (boxes and class names drawn) so a user sees what the model is fed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from detector.folders import check_output_folder
from detector.data.coco import CocoDataset
from detector.viz.tables import format_table

COUNT_BINS = [0, 1, 2, 3, 6, 11, 21, 51]  # boxes per image: 0, 1, 2, 3-5, 6-10, 11-20, 21-50, 51+
SIZE_BINS_PX = [0, 8, 16, 32, 64, 128, 256, 512]  # sqrt(w * h) at long side imgsz
ASPECT_BINS = [0, 0.25, 0.5, 1.0, 2.0, 4.0]  # w / h
PALETTE = [(255, 56, 56), (56, 168, 255), (72, 249, 10), (255, 178, 29), (207, 56, 255), (26, 234, 200), (255, 112, 31),
           (146, 204, 23), (61, 219, 134), (255, 149, 200), (0, 194, 255), (132, 56, 255)]


def _histogram(values: np.ndarray, edges: list[float], *, integer: bool = False) -> list[list[object]]:
    """Rows [range label, count, percent] for half-open bins [e_i, e_i+1) and a last open bin [e_n, inf);
    empty bins at both ends are left out."""
    counts = np.bincount(np.digitize(values, edges[1:]), minlength=len(edges))
    total = max(len(values), 1)
    rows = []
    for i, count in enumerate(counts):
        lo = edges[i]
        if i == len(edges) - 1:
            label = f">= {lo:g}"
        elif integer:
            label = f"{lo}" if edges[i + 1] - lo == 1 else f"{lo}-{edges[i + 1] - 1}"
        else:
            label = f"{lo:g} - {edges[i + 1]:g}"
        rows.append([label, int(count), 100.0 * count / total])
    nonzero = np.flatnonzero(counts)
    return rows[nonzero[0] : nonzero[-1] + 1] if len(nonzero) else rows[:1]


def label_stats(coco: CocoDataset, imgsz: int) -> str:
    """Boxes per image, box size in pixels at long side `imgsz`, aspect ratios, COCO size classes: text tables."""
    per_image = coco.boxes_per_image()
    wh = coco.train_box_wh(imgsz)
    size = np.sqrt(wh.prod(axis=1))
    aspect = wh[:, 0] / np.maximum(wh[:, 1], 1e-6)
    boxes = coco.train_boxes_xyxy
    areas = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    coco_sizes = [
        ["small (< 32^2 px)", int((areas < 32**2).sum())],
        ["medium", int(((areas >= 32**2) & (areas < 96**2)).sum())],
        ["large (>= 96^2 px)", int((areas >= 96**2).sum())],
    ]
    parts = [
        f"boxes per image (mean {per_image.mean():.2f}, max {per_image.max()})",
        format_table(["boxes", "images", "%"], _histogram(per_image, COUNT_BINS, integer=True), floatfmt=".1f"),
        f"box size sqrt(w*h) in pixels at imgsz={imgsz} (median {np.median(size):.1f})",
        format_table(["pixels", "boxes", "%"], _histogram(size, SIZE_BINS_PX), floatfmt=".1f"),
        f"box aspect ratio w/h (median {np.median(aspect):.2f})",
        format_table(["w/h", "boxes", "%"], _histogram(aspect, ASPECT_BINS), floatfmt=".1f"),
        "COCO size classes (original pixels)",
        format_table(["size", "boxes"], coco_sizes),
    ]
    return "\n".join(parts)


def draw_batch(batch: dict, names: list[str], path: Path, *, columns: int = 4, max_width: int = 1280) -> None:
    """Save a grid of a batch's images with their target boxes and class names drawn."""
    images = batch["images"].permute(0, 2, 3, 1).numpy()
    n, h, w = images.shape[:3]
    columns = min(columns, n)
    rows = -(-n // columns)
    scale = min(1.0, max_width / (columns * w))
    tile_w, tile_h = int(w * scale), int(h * scale)
    canvas = Image.new("RGB", (columns * tile_w, rows * tile_h), (114, 114, 114))
    draw = ImageDraw.Draw(canvas)
    targets = batch["targets"].numpy()
    for i in range(n):
        x0, y0 = (i % columns) * tile_w, (i // columns) * tile_h
        canvas.paste(Image.fromarray(images[i]).resize((tile_w, tile_h)), (x0, y0))
        rows_i = targets[targets[:, 0] == i]
        cx, cy, bw, bh = (rows_i[:, 2:6] * [tile_w, tile_h, tile_w, tile_h]).T
        for cls, x1, y1, x2, y2 in zip(rows_i[:, 1].astype(int), cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2):
            colour = PALETTE[cls % len(PALETTE)]
            draw.rectangle([x0 + x1, y0 + y1, x0 + x2, y0 + y2], outline=colour, width=2)
            draw.text((x0 + x1 + 2, y0 + y1 + 1), names[cls], fill=colour)
        draw.rectangle([x0, y0, x0 + tile_w - 1, y0 + tile_h - 1], outline=(255, 255, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def data_check(
    data_yaml: Path,
    *,
    strict: bool = False,
    save_dir: Path,
    imgsz: int = 320,
    batches: int = 3,
    batch_size: int = 16,
    seed: int = 0,
) -> int:
    """Scan, print summaries and statistics (also saved as save_dir/check.txt), save `batches` augmented preview
    batches as save_dir/train_batch<k>.png; return 0 when the dataset is usable.

    An unusable dataset (or, with strict=True, anything skipped) raises DetectorError with a one-line message,
    which the CLI prints and turns into a non-zero exit code.
    """
    from detector.config import TrainConfig
    from detector.data.spec import load_data_spec
    from detector.data.loader import TrainDataset, collate
    from detector.data.synthetic import ensure_bundled_dataset

    save_dir = check_output_folder(Path(save_dir), "save_dir")
    ensure_bundled_dataset(Path(data_yaml))
    spec = load_data_spec(data_yaml)
    datasets, report = {}, []
    for split_name, split in (("train", spec.train), ("val", spec.val)):
        coco = CocoDataset(split, strict=strict, names=spec.names)
        datasets[split_name] = coco
        report += [f"[{split_name}] {coco.summary}", "", label_stats(coco, imgsz), ""]
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / "check.txt").write_text("\n".join(report))
    print("\n".join(report))
    train = TrainDataset(datasets["train"], imgsz=imgsz, hyp=TrainConfig(), seed=seed)
    rng = np.random.default_rng(seed)
    for k in range(batches):
        indices = rng.choice(len(train), size=min(batch_size, len(train)), replace=False)
        path = save_dir / f"train_batch{k}.png"
        draw_batch(collate([train[int(i)] for i in indices]), datasets["train"].names, path)
        print(f"saved {path}")
    print(f"saved {save_dir / 'check.txt'}")
    return 0

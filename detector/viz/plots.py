"""Validation plots: PR curves at IoU 0.5, a normalized confusion matrix, a val batch with GT and predictions
(saved in plots/; the batch is drawn by `draw.val_batch_grid`, which also renders it for TensorBoard at each
validation of a training).

Matplotlib through its object API on the Agg canvas (no pyplot, no global backend switch), so plotting works
headless and never touches a user's interactive state.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from pycocotools.coco import COCO
from torchvision.ops import box_iou

from detector.viz.draw import val_batch_grid

# Confusion-matrix operating point (a deployment-like threshold, not the 0.001 used for mAP).
CONFUSION_CONF = 0.25
CONFUSION_IOU = 0.45


def save_validation_plots(
    folder: Path,
    *,
    precision: np.ndarray,
    rows: np.ndarray,
    gt: COCO,
    image_ids: list[int],
    category_ids: list[int],
    names: list[str],
    first_batch: tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]] | None,
) -> None:
    """pr_curve.png, confusion_matrix.png and (given the first batch) val_batch0.jpg in `folder`.

    `precision` is COCOeval's (T, R, K, A, M) array with K in sorted category-id order; `rows` the (N, 7)
    detections [image_id, x, y, w, h, score, category_id] in original pixels.
    """
    folder.mkdir(parents=True, exist_ok=True)
    order = np.argsort(category_ids)  # contiguous class of each precision column
    plot_pr_curves(precision[0, :, :, 0, -1][:, np.argsort(order)], names, folder / "pr_curve.png")
    matrix = confusion_matrix(rows, gt, image_ids, category_ids)
    plot_confusion_matrix(matrix, names, folder / "confusion_matrix.png")
    if first_batch is not None:
        images, targets, detections = first_batch
        plot_val_batch(images, targets, detections, names, folder / "val_batch0.jpg")


def plot_pr_curves(precision: np.ndarray, names: list[str], path: Path) -> None:
    """Precision (101 recall points, (R, nc), -1 where a class has no GT) per class and their mean."""
    recall = np.linspace(0.0, 1.0, precision.shape[0])
    defined = (precision > -1).all(axis=0)
    fig = Figure(figsize=(8, 6), dpi=150)
    ax = fig.add_subplot()
    show_legend = len(names) <= 20
    for c in np.flatnonzero(defined):
        label = f"{names[c]} {precision[:, c].mean():.3f}" if show_legend else None
        ax.plot(recall, precision[:, c], linewidth=1, label=label)
    if defined.any():
        mean = precision[:, defined].mean(axis=1)
        ax.plot(recall, mean, linewidth=3, color="blue", label=f"all classes {mean.mean():.3f} AP50")
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.01), title="Precision-recall at IoU 0.5 (COCO, 101 points)")
    ax.legend(loc="lower left", fontsize=7 if show_legend else 9)
    _save(fig, path)


def plot_tune(values: list[dict[str, float | int]], fitness: list[float], keys: list[str], path: Path) -> None:
    """`detector tune`: one panel per searched key, each trial's value against its fitness (colour: trial order,
    star: the best trial), so which keys matter and where their good values lie shows at a glance."""
    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows), dpi=120)
    best = int(np.argmax(fitness))
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        x = [v[key] for v in values]
        ax.scatter(x, fitness, c=np.arange(len(x)), cmap="viridis", s=14)
        ax.scatter([x[best]], [fitness[best]], marker="*", s=140, color="red")
        ax.set_title(f"{key} = {x[best]:g}", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.supylabel("fitness (0.1 AP50 + 0.9 AP50:95)", fontsize=9)
    _save(fig, path)


def confusion_matrix(
    rows: np.ndarray,
    gt: COCO,
    image_ids: list[int],
    category_ids: list[int],
    *,
    conf: float = CONFUSION_CONF,
    iou: float = CONFUSION_IOU,
) -> np.ndarray:
    """Counts (nc + 1, nc + 1): [predicted class, true class], index nc = background.

    Class-agnostic matching per image among pairs with IoU > iou: each detection (score >= conf) keeps its
    best-IoU GT box, then each GT box keeps its best detection. Unmatched GT -> background row; unmatched
    detections -> background column, unless a crowd region covers more than `iou` of their area (ignored, as
    COCOeval does).
    """
    nc = len(category_ids)
    evaluated, known = set(int(i) for i in image_ids), set(int(c) for c in category_ids)
    anns = [a for a in gt.dataset.get("annotations", []) if a["image_id"] in evaluated and a["category_id"] in known]
    gt_img = np.asarray([a["image_id"] for a in anns], dtype=np.float64)
    gt_cls = _to_class(np.asarray([a["category_id"] for a in anns], dtype=np.float64), category_ids)
    gt_box = _xywh_to_xyxy(np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4))
    gt_crowd = np.asarray([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
    det = rows[rows[:, 5] >= conf]
    det_cls = _to_class(det[:, 6], category_ids)
    det_box = _xywh_to_xyxy(det[:, 1:5])

    matrix = np.zeros((nc + 1, nc + 1), dtype=np.int64)
    gt_order, det_order = np.argsort(gt_img, kind="stable"), np.argsort(det[:, 0], kind="stable")
    for image_id in np.union1d(gt_img, det[:, 0]):  # one iteration per image, vectorized inside
        g = gt_order[np.searchsorted(gt_img[gt_order], image_id) : np.searchsorted(gt_img[gt_order], image_id, "right")]
        d = det_order[np.searchsorted(det[det_order, 0], image_id) : np.searchsorted(det[det_order, 0], image_id, "right")]
        crowd, g = g[gt_crowd[g]], g[~gt_crowd[g]]
        ious = _iou(gt_box[g], det_box[d])
        gi, di = np.nonzero(ious > iou)
        by_iou = np.argsort(-ious[gi, di], kind="stable")
        gi, di = gi[by_iou], di[by_iou]
        _, first = np.unique(di, return_index=True)
        gi, di = gi[np.sort(first)], di[np.sort(first)]
        _, first = np.unique(gi, return_index=True)
        gi, di = gi[first], di[first]
        np.add.at(matrix, (det_cls[d[di]], gt_cls[g[gi]]), 1)
        missed = np.ones(len(g), dtype=bool)
        missed[gi] = False
        np.add.at(matrix, (nc, gt_cls[g[missed]]), 1)
        spurious = np.ones(len(d), dtype=bool)
        spurious[di] = False
        if len(crowd):
            spurious &= ~(_crowd_overlap(gt_box[crowd], det_box[d]) > iou).any(axis=0)
        np.add.at(matrix, (det_cls[d[spurious]], nc), 1)
    return matrix


def plot_confusion_matrix(matrix: np.ndarray, names: list[str], path: Path) -> None:
    """Column-normalized (each true class sums to 1) heat map with the background row and column."""
    totals = matrix.sum(axis=0, keepdims=True)
    normalized = np.divide(matrix, totals, out=np.zeros(matrix.shape, dtype=np.float64), where=totals > 0)
    labels = [*names, "background"]
    n = len(labels)
    size = min(6 + 0.4 * n, 24)
    fig = Figure(figsize=(size, size * 0.85), dpi=150)
    ax = fig.add_subplot()
    image = ax.imshow(normalized, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if n <= 30:
        ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(n), labels, fontsize=8)
        for (r, c), value in np.ndenumerate(normalized):
            if value > 0.005:
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=6, color="white" if value > 0.5 else "black")
    ax.set(xlabel="True", ylabel="Predicted", title=f"Confusion matrix, normalized per true class\n(conf {CONFUSION_CONF}, IoU {CONFUSION_IOU})")
    _save(fig, path)


def plot_val_batch(
    images: torch.Tensor,
    targets: torch.Tensor,
    detections: list[torch.Tensor],
    names: list[str],
    path: Path,
    *,
    max_images: int = 16,
    conf: float = CONFUSION_CONF,
) -> None:
    """`draw.val_batch_grid` (GT green, detections with score >= conf red) saved to `path` at the batch's size."""
    grid = val_batch_grid(images, targets, detections, names, max_images=max_images, conf=conf)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path, quality=90)


def _to_class(ids: np.ndarray, category_ids: list[int]) -> np.ndarray:
    """Original category ids (all present in category_ids) -> contiguous class indices."""
    sorter = np.argsort(category_ids)
    return sorter[np.searchsorted(np.asarray(category_ids, dtype=np.float64)[sorter], ids)].astype(np.int64)


def _xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:4]], axis=1)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of float64 xyxy boxes, by torchvision.ops.box_iou (NaN for two zero-area boxes, which
    no threshold matches)."""
    return box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()


def _crowd_overlap(crowd: np.ndarray, det: np.ndarray) -> np.ndarray:
    """(len(crowd), len(det)): the share of each detection's area inside each crowd region, which is COCOeval's
    IoU against a crowd box (a detection on part of a crowd is not a false positive, however small it is)."""
    top_left = np.maximum(crowd[:, None, :2], det[None, :, :2])
    bottom_right = np.minimum(crowd[:, None, 2:], det[None, :, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(axis=2)
    area = (det[:, 2] - det[:, 0]) * (det[:, 3] - det[:, 1])
    return np.divide(inter, area[None], out=np.zeros_like(inter), where=area[None] > 0)


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path)


"""Inference on images: letterbox a batch -> model -> NMS -> boxes in original pixels, drawn and saved as JSON.

`Predictor` turns a list of RGB arrays into detections; `predict_source` runs it over an image, a folder or a
glob for `detector predict`: it writes the images with their boxes drawn and one predictions.json (COCO results
format plus `file_name`, `width`, `height`), and names every unreadable file instead of stopping at it. Boxes are
drawn by torchvision's `draw_bounding_boxes`. Videos and cameras: `detector.infer.video`, on the same Predictor.
"""

from __future__ import annotations

import colorsys
import contextlib
import glob
import logging
import os
from collections.abc import Iterator, Sequence, Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torchvision.utils import draw_bounding_boxes
from tqdm import tqdm

from detector.data.image_files import IMAGE_SUFFIXES, read_failure, read_rgb
from detector.data.loader import READ_ERRORS
from detector.data.transforms import letterbox_batch, to_model_input, unletterbox_boxes
from detector.data.yolo_txt import format_label_file, normalised_rows
from detector.infer.coco_rows import coco_rows, detections_to_coco_results, write_json
from detector.infer.postprocess import non_max_suppression
from detector.infer.tta import augmented_forward
from detector.errors import DetectorError, write_failed
from detector.viz.draw import font_file

LOGGER = logging.getLogger(__name__)

READ_THREADS = 4  # image decoding threads (PIL and cv2 release the GIL while decoding)


def list_images(source: str | Path) -> list[Path]:
    """The image files of `source`: one file (any extension), a folder (recursively) or a glob (`**` recursive),
    sorted. Raises DetectorError when it names nothing or holds no image."""
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    elif glob.has_magic(str(source)):
        matches = (Path(p) for p in glob.glob(str(source), recursive=True))
        files = [p for p in matches if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    else:
        raise DetectorError(f"source: '{source}' not found (an image, a folder or a glob)")
    if not files:
        raise DetectorError(f"source: no images ({' '.join(IMAGE_SUFFIXES)}) in '{source}'")
    return sorted(files)


def expand_image_list(items: Sequence[str | Path]) -> tuple[list[Path], frozenset[str]]:
    """The files of a list of paths, each a file (kept as given, any extension), a folder or a glob (expanded by
    `list_images`), in list order; and the files that came from a folder or a glob, whose unreadable ones predict
    skips (a file named directly must read)."""
    files: list[Path] = []
    found: set[str] = set()
    for item in items:
        path = Path(item)
        if path.is_dir() or (not path.exists() and glob.has_magic(str(item))):
            listed = list_images(item)
            files += listed
            found.update(map(str, listed))
        else:
            files.append(path)
    return files, frozenset(found)


def check_image_array(image: Any, label: str) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array from `image`; a (H, W) gray array is repeated to 3 channels."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        if image.ndim == 2:
            return np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim == 3 and image.shape[2] == 3 and min(image.shape[:2]) >= 1:
            return image
    shape = getattr(image, "shape", None)
    dtype = getattr(image, "dtype", type(image).__name__)
    raise DetectorError(f"{label}: expected an (H, W, 3) uint8 RGB array, got shape {shape} dtype {dtype}")


class Predictor:
    """Detections of a model on RGB images, in original pixels: `predictor(images) -> list[(K, 6)]`.

    Rows [x1, y1, x2, y2, score, class] (float32, CPU), best class per box, sorted by score. `classes` keeps only
    those class indices; `agnostic` suppresses overlapping boxes across classes. On CUDA the forward runs under fp16 autocast. The model is put in eval mode. `augment` runs
    test-time augmentation (`tta.augmented_forward`: three scales, one flipped) before the NMS.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        imgsz: int,
        conf: float = 0.25,
        iou: float = 0.45,
        max_det: int = 300,
        classes: Sequence[int] | None = None,
        device: torch.device | None = None,
        augment: bool = False,
        agnostic: bool = False,
    ) -> None:
        self.model = model.eval()
        self.device = device or next(model.parameters()).device
        self.stride = int(model.stride.max())
        if imgsz < self.stride:
            raise DetectorError(f"imgsz must be at least the model stride {self.stride}, got {imgsz}")
        self.imgsz = int(imgsz)
        self.conf, self.iou, self.max_det = conf, iou, max_det
        self.augment, self.agnostic = augment, agnostic
        nc = int(model.nc)
        bad = [c for c in classes or () if not 0 <= int(c) < nc]
        if bad:
            raise DetectorError(f"classes: {bad[0]} is not a class index of this model (0..{nc - 1})")
        self.classes = [int(c) for c in classes] if classes else None

    @torch.inference_mode()
    def __call__(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        batch, ratios, pads = letterbox_batch(images, self.imgsz, self.stride)
        x = to_model_input(batch, self.device)
        amp = torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda" else contextlib.nullcontext()
        with amp:
            pred = augmented_forward(self.model, x, stride=self.stride) if self.augment else self.model(x)
        dets = non_max_suppression(pred, conf=self.conf, iou=self.iou, max_det=self.max_det, multi_label=False,
                                   classes=self.classes, agnostic=self.agnostic)
        out = []
        for det, image, ratio, pad in zip(dets, images, ratios, pads):
            det = det.float().cpu()
            det[:, :4] = unletterbox_boxes(det[:, :4], ratio, pad, image.shape[:2])
            out.append(det)
        return out


def detection_dict(det: torch.Tensor, names: Sequence[str], category_ids: Sequence[int], file: str | None) -> dict[str, Any]:
    """One image's (K, 6) detections as numpy: boxes_xyxy float32 (K, 4) original pixels, scores float32 (K,),
    classes int64 (K,) contiguous, category_ids int64 (K,) original ids, names list[str] (K), file or None."""
    classes = det[:, 5].long().numpy()
    return {
        "boxes_xyxy": det[:, :4].numpy().astype(np.float32),
        "scores": det[:, 4].numpy().astype(np.float32),
        "classes": classes,
        "category_ids": np.asarray(category_ids, dtype=np.int64)[classes],
        "names": [names[c] for c in classes.tolist()],
        "file": file,
    }


@dataclass
class Batch:
    """Images of one forward pass: `files` (the path, or None for an array) and the decoded arrays."""

    files: list[str | None]
    images: list[np.ndarray]


def _read(path: Path) -> np.ndarray | str:
    """The image, or the reason it could not be read (without the path, which the warning or error names)."""
    try:
        return read_rgb(path)
    except READ_ERRORS as err:
        return read_failure(err, path)


def iter_batches(items: Sequence[Path | np.ndarray], batch_size: int, *, skip_unreadable: bool | AbstractSet[str],
                 skipped: list[str]) -> Iterator[Batch]:
    """Batches of decoded images from paths and arrays, decoded on a few threads one batch ahead.

    An unreadable file is named in a warning and appended to `skipped` when `skip_unreadable` is True or a set
    holding it (the files of a folder in a list, `expand_image_list`), else it raises DetectorError naming it. A
    malformed array raises DetectorError naming its index.
    """

    def load(chunk: Sequence[tuple[int, Path | np.ndarray]]) -> list[tuple[str | None, np.ndarray | str]]:
        return [(str(item), _read(item)) if isinstance(item, Path) else (None, check_image_array(item, f"images[{i}]")) for i, item in chunk]

    indexed = list(enumerate(items))
    chunks = [indexed[i : i + batch_size] for i in range(0, len(indexed), batch_size)]
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        pending = pool.submit(load, chunks[0]) if chunks else None
        for k in range(len(chunks)):
            loaded = pending.result()
            pending = pool.submit(load, chunks[k + 1]) if k + 1 < len(chunks) else None
            batch = Batch([], [])
            for file, image in loaded:
                if isinstance(image, str):
                    if not (skip_unreadable if isinstance(skip_unreadable, bool) else file in skip_unreadable):
                        raise DetectorError(f"{file}: cannot read image ({image})")
                    LOGGER.warning("%s: unreadable image skipped (%s)", file, image)
                    skipped.append(str(file))
                    continue
                batch.files.append(file)
                batch.images.append(image)
            if batch.images:
                yield batch


# ---------------------------------------------------------------------------------------------- drawing


def class_colour(index: int) -> tuple[int, int, int]:
    """A distinct, stable RGB colour per class (or track) index (hues spaced by the golden ratio)."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: np.ndarray, det: torch.Tensor, names: Sequence[str], track_ids: torch.Tensor | None = None) -> np.ndarray:
    """The (H, W, 3) uint8 RGB image with each box and a filled "name score" label (inside its top-left corner) in
    the class colour, by torchvision's draw_bounding_boxes; line width and font size scale with the image. Given
    track ids, labels read "#id name score" and each track keeps a colour of its own."""
    if not len(det):
        return image
    classes = det[:, 5].long().tolist()
    labels = [f"{names[c]} {score:.2f}" for c, score in zip(classes, det[:, 4].tolist())]
    if track_ids is not None:
        labels = [f"#{i} {label}" for i, label in zip(track_ids.tolist(), labels)]
    colours = [class_colour(c) for c in (classes if track_ids is None else track_ids.tolist())]
    ink = [(0, 0, 0) if sum(colour) > 380 else (255, 255, 255) for colour in colours]
    size, font = max(image.shape[:2]), font_file()
    usable = image.flags.writeable and min(image.strides) > 0  # torch takes no read-only or reversed (::-1) array
    pixels = torch.from_numpy(image if usable else image.copy()).permute(2, 0, 1)
    drawn = draw_bounding_boxes(
        pixels, det[:, :4], labels, colours, width=max(1, round(size / 320)), font=font,
        font_size=max(10, round(size / 50)) if font else None, label_colors=ink, fill_labels=True,
    )
    return np.ascontiguousarray(drawn.permute(1, 2, 0).numpy())  # a no-op: the drawn tensor is an HWC array's view


# ---------------------------------------------------------------------------------------------- a source


@dataclass(frozen=True)
class SavedFiles:
    """What `predict_source` writes beside predictions.json, each under the image's path relative to the files'
    common folder: drawn `images`; YOLO-format `labels` under labels/ (<stem>.txt, one `class cx cy w h` row per
    box normalised to the image, the score appended with `scores`; an empty file for an image without boxes);
    `crops` under crops/<class name>/ (<stem>_<k><suffix>, the k-th box by score, its pixels rounded outward)."""

    images: bool = True
    labels: bool = False
    scores: bool = False
    crops: bool = False


def predict_source(
    predictor: Predictor,
    files: Sequence[Path],
    save_dir: Path,
    *,
    names: Sequence[str],
    category_ids: Sequence[int],
    batch_size: int = 8,
    skip_unreadable: bool | AbstractSet[str] = True,
    saved: SavedFiles = SavedFiles(),
) -> list[dict[str, Any]]:
    """`detector predict`: detections for every readable file, predictions.json and the `saved` files in
    `save_dir`. predictions.json holds COCO results ([{image_id, category_id, bbox [x, y, w, h] original pixels,
    score}]) plus file_name, width and height; image_id is the file's index in `files` (a folder's sorted list). Returns
    `detection_dict`s (one per readable file). An unreadable file is skipped and named (`skip_unreadable`: True, or the
    set of files that came from a folder or a glob) or a DetectorError naming it. Files keep the names they are listed under (a symlink's own).
    """
    save_dir.mkdir(parents=True, exist_ok=True)
    # abspath, not resolve: a symlinked image is saved and named as listed, not after its target
    root = Path(os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in files])) if files else save_dir
    image_ids = {str(p): i for i, p in enumerate(files)}
    skipped: list[str] = []
    results, entries = [], []
    with tqdm(total=len(files), desc="predict", unit="img", dynamic_ncols=True) as bar:  # closed on an error too
        for batch in iter_batches(list(files), batch_size, skip_unreadable=skip_unreadable, skipped=skipped):
            dets = predictor(batch.images)
            for file, image, det in zip(batch.files, batch.images, dets):
                relative = Path(os.path.abspath(file)).relative_to(root)
                results.append(detection_dict(det, names, category_ids, file))
                entries += _json_entries(det, image_ids[file], relative.as_posix(), image.shape[:2], category_ids)
                _save_files(image, det, save_dir, relative, names, saved)
            bar.update(len(results) + len(skipped) - bar.n)
        bar.update(len(results) + len(skipped) - bar.n)  # files skipped in a last batch that had no readable image
    write_json(save_dir / "predictions.json", entries)
    found = sum(len(r["scores"]) for r in results)
    LOGGER.info("predict: %d images, %d detections, results in %s", len(results), found, save_dir)
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        LOGGER.warning("predict: %d unreadable file(s) skipped: %s", len(skipped), shown)
    return results


def _save_files(image: np.ndarray, det: torch.Tensor, save_dir: Path, relative: Path, names: Sequence[str],
                saved: SavedFiles) -> None:
    """One image's drawn copy, label file and crops, as `saved` asks."""
    if saved.images:
        _save_image(draw_detections(image, det, names), save_dir / relative)
    if saved.labels:
        _save_labels(det, image.shape[:2], (save_dir / "labels" / relative).with_suffix(".txt"), saved.scores)
    if saved.crops:
        for k, (crop, cls) in enumerate(zip(crop_boxes(image, det[:, :4]), det[:, 5].long().tolist())):
            if crop.size:
                folder = names[cls].replace("/", "_").replace(os.sep, "_")
                _save_image(crop, save_dir / "crops" / folder / relative.with_name(f"{relative.stem}_{k}{relative.suffix}"))


def crop_boxes(image: np.ndarray, boxes_xyxy: torch.Tensor) -> list[np.ndarray]:
    """The pixels of each box (original-image xyxy), its edges rounded outward and clipped to the image: views of
    `image`, empty for a box that covers no pixel."""
    h, w = image.shape[:2]
    lo = boxes_xyxy[:, :2].floor().clamp(min=0).long()
    hi = torch.minimum(boxes_xyxy[:, 2:].ceil(), boxes_xyxy.new_tensor([w, h])).long()
    return [image[y1:y2, x1:x2] for (x1, y1), (x2, y2) in zip(lo.tolist(), hi.tolist())]


def _save_image(image: np.ndarray, path: Path) -> None:
    """`image` written at `path`, in the format its suffix names, or as PNG where PIL writes no such format (a
    file named directly may have any suffix, or none)."""
    fmt = Image.registered_extensions().get(path.suffix.lower())
    fmt = fmt if fmt in Image.SAVE else "PNG"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    except OSError as err:
        raise write_failed(path, err, "the drawn image") from err


def _save_labels(det: torch.Tensor, hw: tuple[int, int], path: Path, with_scores: bool) -> None:
    rows = normalised_rows(det[:, 5].numpy(), det[:, :4].double().numpy(), int(hw[1]), int(hw[0]))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(format_label_file(rows, det[:, 4].numpy() if with_scores else None))
    except OSError as err:
        raise write_failed(path, err, "the label file") from err


def _json_entries(det: torch.Tensor, image_id: int, file_name: str, hw: tuple[int, int], category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """One image's COCO results (the evaluator's rows and rounding) plus its file name and size."""
    ids = np.asarray(category_ids, dtype=np.int64)[det[:, 5].long().numpy()]
    rows = coco_rows(image_id, det[:, :4].double().numpy(), det[:, 4].double().numpy(), ids)
    h, w = int(hw[0]), int(hw[1])
    return [{**r, "file_name": file_name, "width": w, "height": h} for r in detections_to_coco_results(rows)]

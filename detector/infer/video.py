"""Inference on a video file or a camera: frames in batches through the image `Predictor` (the same letterbox, NMS
and box mapping), an annotated video and a JSON-lines file of per-frame detections.

`predict_video` opens the source at once (a missing or unreadable file is one DetectorError naming it) and returns
an iterator of per-frame results; iterating it reads every `vid_stride`-th frame (the others are only grabbed:
no BGR conversion, no copy), one batch ahead on a thread, and, given a `save_dir`, writes as it goes:

- `<stem>.mp4`: the predicted frames with their boxes drawn, at the source's size and fps / vid_stride, so the
  video lasts as long as the source (codec mp4v; `<stem>.avi` in MJPG where no mp4v writer opens here);
- `<stem>.jsonl`: one line per predicted frame, `{"frame": i, "time_s": i / fps, "detections": [{"box_xyxy":
  [x1, y1, x2, y2] original pixels, "score": s, "class": k contiguous, "category_id": original id, "name": n}]}`,
  flushed after every batch, so an interrupted run (a camera stopped with Ctrl-C) leaves whole lines.

Given a `ByteTracker` (`detector predict track=true`), each frame's detections go through it: only boxes of
confirmed tracks are kept, each with its `track_id` (in the JSON lines, the results' `track_ids`, and the drawn
labels, "#id name score", one colour per track).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from detector.errors import DetectorError, write_failed
from detector.infer.coco_rows import BOX_DECIMALS, SCORE_DECIMALS
from detector.infer.predictor import Predictor, detection_dict, draw_detections
from detector.infer.tracker import ByteTracker

LOGGER = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpeg", ".mpg")
WRITER_CODECS = (("mp4v", ".mp4"), ("MJPG", ".avi"))  # the annotated video: the first writer that opens here
DEFAULT_FPS = 30.0  # a source that does not say (some cameras and streams)


def is_video_source(source: Any) -> bool:
    """A video file by its extension (VIDEO_SUFFIXES, any case) or a camera index (0, "0", "1" ...)."""
    if isinstance(source, bool) or not isinstance(source, (int, str, Path)):
        return False
    return camera_index(source) is not None or Path(str(source)).suffix.lower() in VIDEO_SUFFIXES


def camera_index(source: str | int | Path) -> int | None:
    """The camera a source names (an int, or digits that name no file or folder here), else None."""
    if isinstance(source, int):
        return source if source >= 0 else None
    return int(str(source)) if str(source).isdigit() and not Path(source).exists() else None


def video_stem(source: str | int | Path) -> str:
    """The output files' name: the video's stem (`clip` for clip.mp4), `camera0` for camera 0."""
    index = camera_index(source)
    return f"camera{index}" if index is not None else Path(source).stem


@dataclass
class VideoInfo:
    """What the source says of itself: `label` (the path, or "camera N") for messages, fps (DEFAULT_FPS where it
    says nothing), and its frame count (None where unknown, as for a camera)."""

    label: str
    fps: float
    frames: int | None


def open_video(source: str | int | Path) -> tuple[cv2.VideoCapture, VideoInfo]:
    """An opened cv2.VideoCapture of a video file or a camera index, and its VideoInfo. Raises DetectorError in one
    line naming the file (or camera) when it is missing or cannot be opened."""
    # ffmpeg's own stderr lines ("moov atom not found") would come on top of our one-line error; its default
    # level returns with OPENCV_FFMPEG_LOGLEVEL=24. Read when OpenCV first opens a video in this process.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    index = camera_index(source)
    if index is not None:
        label = f"camera {index}"
        with _opencv_errors_only():  # OpenCV warns of every backend that has no such camera
            capture = cv2.VideoCapture(index)
        problem = "cannot be opened (no such camera here, or it is in use)"
    else:
        label = str(source)
        if not Path(source).is_file():
            raise DetectorError(f"source: '{source}' not found (an image, a folder, a glob, a video or a camera index)")
        capture = cv2.VideoCapture(label)
        problem = "cannot read video (not a video OpenCV can decode, or a broken file)"
    if not capture.isOpened():
        capture.release()
        raise DetectorError(f"{label}: {problem}")
    fps = capture.get(cv2.CAP_PROP_FPS)
    frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    fps = fps if math.isfinite(fps) and 0 < fps < 10_000 else DEFAULT_FPS
    return capture, VideoInfo(label, fps, frames if frames > 0 else None)


@contextlib.contextmanager
def _opencv_errors_only() -> Iterator[None]:
    """OpenCV's own log at ERROR level for the block (restored after), so a failed open is our one line."""
    logging_api = cv2.utils.logging
    level = logging_api.getLogLevel()
    logging_api.setLogLevel(min(level, logging_api.LOG_LEVEL_ERROR))
    try:
        yield
    finally:
        logging_api.setLogLevel(level)


@dataclass
class FrameBatch:
    """Predicted frames of one forward pass: their source frame numbers (0-based), the (H, W, 3) uint8 RGB frames,
    and how many source frames were read or skipped so far (this batch included)."""

    indices: list[int]
    frames: list[np.ndarray]
    frames_read: int


class _FrameReader:
    """Every `vid_stride`-th frame of a capture, as RGB; the frames between are only grabbed (cv2 `grab`: no BGR
    conversion, no copy). A read stops just before the next predicted frame, so the last batch also counts the
    frames skipped after it."""

    def __init__(self, capture: cv2.VideoCapture, vid_stride: int) -> None:
        self.capture, self.vid_stride = capture, vid_stride
        self.next_index, self.ended = 0, False

    def read(self, count: int) -> FrameBatch:
        indices, frames = [], []
        while not self.ended:
            keep = self.next_index % self.vid_stride == 0
            if keep and len(frames) == count:
                break
            ok = self.capture.grab()
            if ok and keep:
                ok, bgr = self.capture.retrieve()
            if not ok:  # the end, or a frame that does not decode: the video stops there
                self.ended = True
                break
            if keep:
                indices.append(self.next_index)
                frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            self.next_index += 1
        return FrameBatch(indices, frames, self.next_index)


def iter_frame_batches(capture: cv2.VideoCapture, batch_size: int, vid_stride: int = 1) -> Iterator[FrameBatch]:
    """Batches of `batch_size` predicted frames (every `vid_stride`-th), read on a thread one batch ahead (OpenCV
    decodes without the GIL), so decoding overlaps the model. Close the iterator before releasing the capture."""
    reader = _FrameReader(capture, vid_stride)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(reader.read, batch_size)
        while True:
            batch = pending.result()
            if not batch.frames:
                return
            pending = pool.submit(reader.read, batch_size)
            yield batch


class VideoSink:
    """Drawn RGB frames to `<stem>.mp4` (mp4v), or `<stem>.avi` (MJPG) where no mp4v writer opens, with a warning;
    DetectorError where neither opens. `path` is the file written."""

    def __init__(self, stem: Path, fps: float, size_wh: tuple[int, int]) -> None:
        tried = []
        for codec, suffix in WRITER_CODECS:
            path = stem.parent / (stem.name + suffix)
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, size_wh)
            if writer.isOpened():
                if tried:
                    LOGGER.warning("predict: no %s video writer here; writing %s (%s) instead", " or ".join(tried), path.name, codec)
                self.writer, self.path = writer, path
                return
            writer.release()
            path.unlink(missing_ok=True)
            tried.append(codec)
        raise DetectorError(f"{stem}{WRITER_CODECS[0][1]}: cannot open a video writer (tried {', '.join(tried)}); "
                            "save_images=False predicts without writing the video")

    def write(self, rgb: np.ndarray) -> None:
        self.writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        self.writer.release()


def frame_record(index: int, time_s: float, det: torch.Tensor, names: Sequence[str], category_ids: Sequence[int],
                 track_ids: torch.Tensor | None = None) -> dict[str, Any]:
    """One JSON line: the frame number, its time, and its (K, 6) detections (predictions.json's rounding), each
    with its `track_id` when tracked."""
    boxes = np.round(det[:, :4].double().numpy(), BOX_DECIMALS).tolist()
    scores = np.round(det[:, 4].double().numpy(), SCORE_DECIMALS).tolist()
    classes = det[:, 5].long().tolist()
    detections = [
        {"box_xyxy": box, "score": score, "class": k, "category_id": int(category_ids[k]), "name": names[k]}
        for box, score, k in zip(boxes, scores, classes)
    ]
    if track_ids is not None:
        detections = [{**d, "track_id": i} for d, i in zip(detections, track_ids.tolist())]
    return {"frame": index, "time_s": round(time_s, 6), "detections": detections}


class _Outputs:
    """The JSON-lines file and (unless `save_video` is off) the drawn video of one source in `save_dir`."""

    def __init__(self, save_dir: Path, stem: str, fps: float, size_wh: tuple[int, int], save_video: bool,
                 source: str = "") -> None:
        self.jsonl_path = save_dir / f"{stem}.jsonl"
        outputs = [self.jsonl_path] + [save_dir / f"{stem}{suffix}" for _, suffix in WRITER_CODECS if save_video]
        if source and any(os.path.exists(out) and os.path.samefile(out, source) for out in outputs):
            raise DetectorError(f"{source}: predicting into the source's own folder would overwrite it; "
                                "choose another project= or name=")
        try:
            save_dir.mkdir(parents=True, exist_ok=True)
            self.lines = open(self.jsonl_path, "w")
        except OSError as err:
            raise write_failed(self.jsonl_path, err, "the detections") from err
        try:
            self.video = VideoSink(save_dir / stem, fps, size_wh) if save_video else None
        except DetectorError:
            self.lines.close()
            raise

    def add(self, record: dict[str, Any], frame: np.ndarray, det: torch.Tensor, names: Sequence[str],
            track_ids: torch.Tensor | None) -> None:
        self.lines.write(json.dumps(record) + "\n")
        if self.video is not None:
            self.video.write(draw_detections(frame, det, names, track_ids))

    def close(self) -> None:
        self.lines.close()
        if self.video is not None:
            self.video.close()


def predict_video(
    predictor: Predictor,
    source: str | int | Path,
    *,
    names: Sequence[str],
    category_ids: Sequence[int],
    batch_size: int = 8,
    vid_stride: int = 1,
    save_dir: Path | None = None,
    save_video: bool = True,
    tracker: ByteTracker | None = None,
) -> Iterator[dict[str, Any]]:
    """Detections of every `vid_stride`-th frame of a video file or camera, as an iterator (a camera's never ends).

    Each item is a `detection_dict` (file: `source` as given) plus `frame` (0-based source frame number) and
    `time_s` (frame / fps), and `track_ids` (K,) int64 given a `tracker` (one per video: it keeps the tracks
    between frames; the predictor's conf must reach down to its `low`). The source is opened now (DetectorError
    naming it when it cannot be); a video of which no frame decodes raises on the first step. Given `save_dir`,
    writes the video and JSON lines (module doc).
    """
    if vid_stride < 1:
        raise DetectorError(f"vid_stride must be at least 1, got {vid_stride}")
    capture, info = open_video(source)
    batches = iter_frame_batches(capture, batch_size, vid_stride)
    context = _VideoRun(predictor, str(source), info, names, category_ids, vid_stride, tracker)
    return context.run(capture, batches, save_dir, save_video)


@dataclass
class _VideoRun:
    """One pass over an opened source (predict_video's iterator)."""

    predictor: Predictor
    file: str
    info: VideoInfo
    names: Sequence[str]
    category_ids: Sequence[int]
    vid_stride: int
    tracker: ByteTracker | None

    def run(self, capture: cv2.VideoCapture, batches: Iterator[FrameBatch], save_dir: Path | None, save_video: bool) -> Iterator[dict[str, Any]]:
        outputs, bar, done, found = None, None, FrameBatch([], [], 0), 0
        try:
            first = next(batches, None)
            if first is None:
                raise DetectorError(f"{self.info.label}: cannot read video (no frame decodes)")
            if save_dir is not None:
                height, width = first.frames[0].shape[:2]
                fps = self.info.fps / self.vid_stride  # the saved video lasts as long as the source
                outputs = _Outputs(save_dir, video_stem(self.file), fps, (width, height), save_video, self.file)
            bar = tqdm(total=self.info.frames, desc=f"predict {Path(self.info.label).name}", unit="frame", dynamic_ncols=True)
            for done in itertools.chain([first], batches):
                for result, frame, det, ids in self._predict(done):
                    if outputs is not None:
                        record = frame_record(result["frame"], result["time_s"], det, self.names, self.category_ids, ids)
                        outputs.add(record, frame, det, self.names, ids)
                    found += len(det)
                    yield result
                if outputs is not None:
                    outputs.lines.flush()
                bar.update(done.frames_read - bar.n)
        finally:
            batches.close()  # waits for the frame being read before the capture goes
            capture.release()
            for closable in (outputs, bar):
                if closable is not None:
                    closable.close()
        self._summary(done.frames_read, found, outputs)

    def _predict(self, batch: FrameBatch) -> Iterator[tuple[dict[str, Any], np.ndarray, torch.Tensor, torch.Tensor | None]]:
        """(result, frame, det, track ids or None) per frame of one forward pass, in frame order (the tracker's)."""
        for index, frame, det in zip(batch.indices, batch.frames, self.predictor(batch.frames)):
            ids = None
            if self.tracker is not None:
                det, ids = self.tracker.update(det)
            result = {**detection_dict(det, self.names, self.category_ids, self.file), "frame": index, "time_s": index / self.info.fps}
            if ids is not None:
                result["track_ids"] = ids.numpy()
            yield result, frame, det, ids

    def _summary(self, frames_read: int, found: int, outputs: _Outputs | None) -> None:
        predicted = -(-frames_read // self.vid_stride)
        tracks = f", {self.tracker.issued} tracks" if self.tracker is not None else ""
        LOGGER.info("predict: %s: %d frames, %d predicted, %d detections%s", self.info.label, frames_read, predicted, found, tracks)
        if self.info.frames is not None and frames_read < self.info.frames:
            LOGGER.warning("predict: %s: stopped at frame %d of the %d it announces (the rest does not decode)",
                           self.info.label, frames_read, self.info.frames)
        if outputs is not None:
            shown = f"{outputs.video.path} and " if outputs.video is not None else ""
            LOGGER.info("predict: results in %s%s", shown, outputs.jsonl_path)

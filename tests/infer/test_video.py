"""Video prediction: a short real video written here (a white rectangle moving across 12 frames of 96x64), through
the same Predictor as images; the drawn video read back, the JSON lines, vid_stride, a broken file, the writer
fallback, and `detector predict source=clip.mp4` end to end. (A camera, `source=0`, is not tested here.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detector.errors import DetectorError
from detector.infer import video
from detector.infer.predictor import Predictor, draw_detections
from detector.infer.tracker import ByteTracker
from detector.infer.video import is_video_source, predict_video
from infer_helpers import BrightBoxModel
from repo_paths import REPO_ROOT

FRAMES, WIDTH, HEIGHT, FPS = 12, 96, 64, 10.0


def rect_xyxy(i: int) -> tuple[int, int, int, int]:
    """The white rectangle of frame i, original pixels: 24x20, moving 4 px right per frame."""
    return 8 + 4 * i, 20, 32 + 4 * i, 40


def write_clip(path: Path, frames: int = FRAMES) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (WIDTH, HEIGHT))
    assert writer.isOpened()
    for i in range(frames):
        frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
        x1, y1, x2, y2 = rect_xyxy(i)
        frame[y1:y2, x1:x2] = 255
        writer.write(frame)
    writer.release()
    return path


def read_back(path: Path) -> tuple[int, tuple[int, int], float]:
    """(frames decoded, (width, height), fps) of a written video."""
    capture = cv2.VideoCapture(str(path))
    assert capture.isOpened()
    size = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps, count = capture.get(cv2.CAP_PROP_FPS), 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count, size, fps


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(tmp_path_factory.mktemp("video") / "clip.mp4")


def run(clip: Path, out: Path | None, conf: float = 0.25, **kw) -> list[dict]:
    predictor = Predictor(BrightBoxModel(), imgsz=96, conf=conf)
    return list(predict_video(predictor, clip, names=["a", "b"], category_ids=[4, 9], save_dir=out, **kw))


def test_video_sources_by_extension_or_camera_index(tmp_path: Path) -> None:
    for name in ("a.mp4", "a.AVI", "a.mov", "a.mkv", "a.webm", "a.m4v", "a.mpeg", "a.mpg", "0", "12", 0):
        assert is_video_source(name), name
    for name in ("a.jpg", "folder", "*.mp4x", -1, True, np.zeros((2, 2, 3), np.uint8)):
        assert not is_video_source(name), name
    (tmp_path / "3").mkdir()
    assert not is_video_source(str(tmp_path / "3")) and video.video_stem("3") == "camera3"


def test_video_writes_every_frame_drawn_and_one_json_line_per_frame(clip: Path, tmp_path: Path) -> None:
    results = run(clip, tmp_path, batch_size=5)  # 5 + 5 + 2: batches across the video's end
    assert [r["frame"] for r in results] == list(range(FRAMES))
    assert [r["time_s"] for r in results] == pytest.approx([i / FPS for i in range(FRAMES)])
    for i, r in enumerate(results):  # the same letterbox and box mapping as images: the rectangle, in pixels
        assert r["boxes_xyxy"].tolist() == [pytest.approx(rect_xyxy(i), abs=2.5)]
        assert r["names"] == ["b"] and r["category_ids"].tolist() == [9] and r["file"] == str(clip)
    assert read_back(tmp_path / "clip.mp4") == (FRAMES, (WIDTH, HEIGHT), FPS)
    ok, drawn = cv2.VideoCapture(str(tmp_path / "clip.mp4")).read()  # the source is gray; the boxes are coloured
    assert ok and np.ptp(drawn.astype(int), axis=2).max() > 60
    lines = (tmp_path / "clip.jsonl").read_text().splitlines()
    assert len(lines) == FRAMES
    records = [json.loads(line) for line in lines]
    assert [sorted(r) for r in records] == [["detections", "frame", "time_s"]] * FRAMES
    (det,) = records[3]["detections"]
    assert sorted(det) == ["box_xyxy", "category_id", "class", "name", "score"]
    assert det["box_xyxy"] == pytest.approx(rect_xyxy(3), abs=2.5) and det["score"] == pytest.approx(0.855)
    assert (det["class"], det["category_id"], det["name"]) == (1, 9, "b")
    assert records[3]["frame"] == 3 and records[3]["time_s"] == pytest.approx(0.3)


def test_vid_stride_predicts_every_nth_frame_and_keeps_the_duration(clip: Path, tmp_path: Path, caplog) -> None:
    results = run(clip, tmp_path, batch_size=2, vid_stride=5)
    assert [r["frame"] for r in results] == [0, 5, 10]
    assert [r["time_s"] for r in results] == pytest.approx([0.0, 5 / FPS, 10 / FPS])  # the source frame's time
    lines = [json.loads(line) for line in (tmp_path / "clip.jsonl").read_text().splitlines()]
    assert [line["frame"] for line in lines] == [0, 5, 10]
    assert [line["time_s"] for line in lines] == pytest.approx([0.0, 5 / FPS, 10 / FPS], abs=1e-6)
    assert read_back(tmp_path / "clip.mp4") == (3, (WIDTH, HEIGHT), FPS / 5)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # all 12 frames counted, none missing
    assert [r["frame"] for r in run(clip, None, batch_size=3, vid_stride=4)] == [0, 4, 8]  # nothing saved
    with pytest.raises(DetectorError, match="vid_stride"):
        run(clip, None, vid_stride=0)


def test_tracking_follows_the_rectangle_under_one_id(clip: Path, tmp_path: Path) -> None:
    """The same boxes as without tracking (the rectangle is confirmed on the first frame), each frame's
    `track_ids` [1], a `track_id` in every JSON detection, and "#1" drawn into the labels."""
    plain = run(clip, None, batch_size=5)
    tracked = run(clip, tmp_path, conf=0.1, batch_size=5, tracker=ByteTracker(high=0.25, low=0.1))
    assert [r["track_ids"].tolist() for r in tracked] == [[1]] * FRAMES
    for a, b in zip(plain, tracked):
        assert np.array_equal(a["boxes_xyxy"], b["boxes_xyxy"]) and np.array_equal(a["scores"], b["scores"])
    records = [json.loads(line) for line in (tmp_path / "clip.jsonl").read_text().splitlines()]
    assert [[d["track_id"] for d in r["detections"]] for r in records] == [[1]] * FRAMES
    frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    boxes = torch.tensor([[8.0, 20.0, 60.0, 40.0, 0.855, 1.0]])
    assert not np.array_equal(draw_detections(frame, boxes, ["a", "b"]), draw_detections(frame, boxes, ["a", "b"], torch.tensor([1])))
    assert read_back(tmp_path / "clip.mp4") == (FRAMES, (WIDTH, HEIGHT), FPS)


def test_broken_or_missing_video_is_one_line_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DetectorError) as info:
        run(bad, tmp_path / "out")
    assert str(info.value).startswith(f"{bad}: cannot read video") and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(DetectorError, match="not found"):
        run(tmp_path / "missing.mp4", None)
    with pytest.raises(DetectorError, match=r"^camera 99: cannot be opened"):  # no camera 99 anywhere, we trust
        run("99", None)


def test_predicting_into_the_sources_own_folder_is_refused_and_the_source_kept(tmp_path: Path) -> None:
    """The drawn video of clip.mp4 is <save_dir>/clip.mp4: with save_dir the source's folder it would overwrite it."""
    source = write_clip(tmp_path / "clip.mp4")
    before = source.read_bytes()
    with pytest.raises(DetectorError, match=r"clip\.mp4: predicting into the source's own folder would overwrite it"):
        run(source, tmp_path)
    assert source.read_bytes() == before
    assert len(run(source, tmp_path, save_video=False)) == FRAMES  # only clip.jsonl beside it: nothing overwritten
    assert source.read_bytes() == before and (tmp_path / "clip.jsonl").is_file()


def test_writer_falls_back_to_mjpg_avi_with_a_warning(clip: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(video, "WRITER_CODECS", (("XXXX", ".mp4"), ("MJPG", ".avi")))  # no XXXX writer anywhere
    run(clip, tmp_path)
    assert read_back(tmp_path / "clip.avi")[:2] == (FRAMES, (WIDTH, HEIGHT)) and not (tmp_path / "clip.mp4").exists()
    assert any("no XXXX video writer" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    monkeypatch.setattr(video, "WRITER_CODECS", (("XXXX", ".mp4"),))
    with pytest.raises(DetectorError, match="cannot open a video writer"):
        run(clip, tmp_path / "none")
    assert len(run(clip, tmp_path / "json-only", save_video=False)) == FRAMES  # save_images=False: no writer needed
    assert [p.name for p in (tmp_path / "json-only").iterdir()] == ["clip.jsonl"]


def test_detector_predict_video_as_the_cli_does(clip: Path, tmp_path: Path, capsys, untrained_checkpoint: Path) -> None:
    from detector.api import Detector
    from detector.cli import main

    weights = untrained_checkpoint
    det = Detector.from_checkpoint(weights, device="cpu")
    frames = det.predict(source=str(clip), conf=0.0, max_det=3, batch=4, stream=True)
    assert not isinstance(frames, list)
    results = list(frames)
    assert [r["frame"] for r in results] == list(range(FRAMES))
    assert all(len(r["scores"]) == 3 and set(r["category_ids"].tolist()) <= {1, 3, 7} for r in results)
    assert len(det.predict(str(clip), conf=0.0, vid_stride=3)) == 4  # a list by default

    args = ["predict", f"weights={weights}", f"source={clip}", "conf=0", "max_det=3", "vid_stride=2", "device=cpu",
            f"project={tmp_path / 'runs'}", "name=run"]
    assert main(args) == 0
    run_dir = tmp_path / "runs" / "run"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(run_dir / "clip.jsonl")
    assert sorted(p.name for p in run_dir.iterdir()) == ["clip.jsonl", "clip.mp4"]
    assert read_back(run_dir / "clip.mp4") == (FRAMES // 2, (WIDTH, HEIGHT), FPS / 2)
    records = [json.loads(line) for line in (run_dir / "clip.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in records] == list(range(0, FRAMES, 2))
    assert all(len(r["detections"]) == 3 and r["detections"][0]["name"] in ("circle", "square", "triangle") for r in records)


def test_detector_predict_track_as_the_cli_does_and_its_refusals(clip: Path, tmp_path: Path, untrained_checkpoint: Path) -> None:
    """`track=true`: ids in the results and the JSON lines; an image source, or track_low above conf, is refused
    in one line before any output folder exists."""
    from detector.api import Detector
    from detector.cli import main

    det = Detector.from_checkpoint(untrained_checkpoint, device="cpu")
    results = det.predict(str(clip), track=True, conf=0.0, track_low=0.0, max_det=3)
    assert len(results) == FRAMES and all(len(r["track_ids"]) == len(r["scores"]) for r in results)
    ids = {i for r in results for i in r["track_ids"].tolist()}
    assert ids and min(ids) == 1 and max(ids) == len(ids)  # ids count from 1, none skipped
    args = ["predict", f"weights={untrained_checkpoint}", f"source={clip}", "track=true", "conf=0", "track_low=0",
            "max_det=3", "device=cpu", f"project={tmp_path / 'runs'}", "name=run"]
    assert main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "runs" / "run" / "clip.jsonl").read_text().splitlines()]
    assert [[d["track_id"] for d in r["detections"]] for r in records] == [r["track_ids"].tolist() for r in results]
    image = tmp_path / "frame.png"
    cv2.imwrite(str(image), np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(DetectorError, match=r"^predict: track=true follows objects across the frames of a video"):
        det.predict(str(image), track=True, save=True, project=str(tmp_path / "refused"))
    with pytest.raises(DetectorError, match=r"source of type ndarray is neither"):
        det.predict(np.zeros((32, 32, 3), np.uint8), track=True)
    with pytest.raises(DetectorError, match=r"track_low \(0.5\) must be between 0 and conf \(0.25\)"):
        det.predict(str(clip), track=True, track_low=0.5, save=True, project=str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()


@pytest.mark.slow  # a fresh interpreter: ffmpeg is quiet only if the process has not opened a video before
def test_cli_broken_video_is_one_stderr_line(tmp_path: Path, untrained_checkpoint: Path) -> None:
    weights = untrained_checkpoint
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(np.random.default_rng(1).bytes(4096))
    cmd = [sys.executable, "-m", "detector", "predict", f"weights={weights}", f"source={bad}", "device=cpu", f"project={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 2
    # stderr holds our line alone: ffmpeg's own ("moov atom not found") is silenced (logs go to stdout)
    assert proc.stderr.strip().splitlines() == [f"detector predict: error: {bad}: cannot read video (not a video OpenCV can decode, or a broken file)"]

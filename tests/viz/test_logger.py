"""RunLogger: results.csv rows per epoch, what a resume does to them, and the TensorBoard events file."""

from __future__ import annotations

import csv
import errno
import os
import threading
from pathlib import Path

import pytest
import torch

from detector.errors import DetectorError
from detector.viz.logger import RunLogger, read_results


def log_epochs(logger: RunLogger, epochs: range) -> None:
    for e in epochs:
        logger.epoch(e, torch.tensor([0.1, 0.2, 0.3]), 0.01, {"AP": 0.5}, 0.45, 1.0, 0, unreadable_images=e, val_time_s=0.25 * e)


def test_resume_drops_the_rows_after_the_checkpoint(tmp_path: Path) -> None:
    logger = RunLogger(tmp_path, tensorboard=False)
    log_epochs(logger, range(4))
    logger.truncate_after(1)  # killed after epoch 3 was written, resumed from the epoch-1 checkpoint
    log_epochs(logger, range(2, 4))
    rows = read_results(tmp_path / "results.csv")
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["unreadable_images"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["val_time_s"] for r in rows] == ["0.0", "0.25", "0.5", "0.75"]


def test_resume_extends_an_older_header_so_new_rows_line_up(tmp_path: Path) -> None:
    old_columns = RunLogger.columns[:-2]  # a run written before `unreadable_images` and `val_time_s` existed
    with (tmp_path / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(old_columns)
        writer.writerow(["0", *["0.1"] * (len(old_columns) - 1)])
    logger = RunLogger(tmp_path, tensorboard=False)
    logger.truncate_after(0)
    log_epochs(logger, range(1, 2))
    rows = read_results(tmp_path / "results.csv")
    assert list(rows[0]) == list(RunLogger.columns)
    assert rows[0]["unreadable_images"] is None and rows[1]["unreadable_images"] == "1"
    assert rows[0]["val_time_s"] is None and rows[1]["val_time_s"] == "0.25"


def test_read_results_of_a_run_without_a_csv_yet_is_empty(tmp_path: Path) -> None:
    assert read_results(tmp_path / "results.csv") == []


def test_an_empty_csv_left_by_a_kill_is_started_afresh(tmp_path: Path) -> None:
    """A kill between creating results.csv and writing its first row left 0 bytes: the resume's `truncate_after`
    raised IndexError, and the next row was written without a header (read back as the header: no rows)."""
    (tmp_path / "results.csv").write_text("")
    logger = RunLogger(tmp_path, tensorboard=False)
    logger.truncate_after(0)
    log_epochs(logger, range(1, 3))
    assert [r["epoch"] for r in read_results(tmp_path / "results.csv")] == ["1", "2"]


def test_plot_results_leaves_the_matplotlib_backend_alone(tmp_path: Path) -> None:
    """It called `matplotlib.use("Agg")`, switching the backend of a notebook that trains through the API."""
    import subprocess
    import sys

    code = ("import matplotlib, sys, torch; matplotlib.use('svg'); from pathlib import Path; "
            "from detector.viz.logger import RunLogger, plot_results; d = Path(sys.argv[1]); "
            "logger = RunLogger(d, tensorboard=False); "
            "logger.epoch(0, torch.tensor([0.1, 0.2, 0.3]), 0.01, {'AP': 0.5, 'AP50': 0.7}, 0.5, 1.0, 0); "
            "plot_results(d / 'results.csv', d / 'results.png'); print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["svg"]
    assert (tmp_path / "results.png").stat().st_size > 0


def test_tensorboard_reads_the_events_and_a_second_logger_adds_a_file(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Two loggers of one run folder in the same second (a resume in the same process) write two files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from detector.viz import event_file

    clock = iter([1_700_000_000.0] * 2 + [1_700_000_000.5] * 1000)  # both files named in one second
    monkeypatch.setattr(event_file.time, "time", lambda: next(clock))

    for step in (1, 2):
        logger = RunLogger(tmp_path)
        logger.step(step, torch.tensor([0.1, 0.2, 0.3]), 0.01 * step)
        logger.images("train/batch0", torch.zeros(4, 3, 16, 16, dtype=torch.uint8), step)
        log_epochs(logger, range(step - 1, step))
        logger.close()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("train/lr")] == [(1, 0.01), (2, 0.02)]
    assert [e.step for e in events.Scalars("metrics/fitness")] == [0, 1]
    assert [(e.step, e.width, e.height) for e in events.Images("train/batch0")] == [(1, 38, 38), (2, 38, 38)]


def test_a_record_is_framed_as_tensorboards_own_writer_frames_it() -> None:
    """Our C checksums (google-crc32c) against TensorBoard's Python RecordWriter, byte for byte: empty, short, long."""
    import io

    from tensorboard.summary.writer.record_writer import RecordWriter

    from detector.viz.event_file import tf_record

    for data in (b"", b"brain.Event:2", os.urandom(70_001)):
        theirs = io.BytesIO()
        RecordWriter(theirs).write(data)
        assert tf_record(data) == theirs.getvalue()


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_full_disk_under_the_events_file_is_our_one_error_in_the_call_that_wrote(
    tmp_path: Path, capfd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TensorBoard's writer thread printed its own traceback (and pytest warned of an unhandled thread exception),
    and the failure reached us only at a later call: the events are now written on our thread."""
    from detector.viz import event_file

    threads = threading.active_count()
    logger = RunLogger(tmp_path)
    assert threading.active_count() == threads  # no writer thread: whatever fails, fails in our call
    events = next(tmp_path.glob("events.out.tfevents.*"))

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(event_file, "tf_record", no_space)
    with pytest.raises(DetectorError) as info:
        logger.step(1, torch.tensor([0.1, 0.2, 0.3]), 0.01)
    logger.close()  # the same failure is not raised again
    assert str(info.value) == f"{events}: cannot write (No space left on device)"
    assert capfd.readouterr().err == ""


def test_a_full_disk_at_the_first_record_names_the_file_and_leaves_none(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from detector.viz import event_file

    monkeypatch.setattr(event_file.time, "time", lambda: 1_700_000_000.0)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(event_file, "tf_record", no_space)
    with pytest.raises(DetectorError, match=r"/events\.out\.tfevents\.1700000000\.\S+\.\d+\.0: cannot write \(No space"):
        RunLogger(tmp_path)
    assert list(tmp_path.iterdir()) == []  # the empty events file was removed

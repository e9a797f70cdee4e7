"""Why an image could not be read, said without repeating its path (the message around it names the file)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from PIL import UnidentifiedImageError

from detector.data.coco import CocoDataset
from detector.data.image_files import inspect_image, read_failure, read_rgb


def _failure(path: Path) -> BaseException:
    with pytest.raises(Exception) as info:
        read_rgb(path)
    return info.value


def test_the_reason_leaves_the_path_out(tmp_path: Path) -> None:
    missing, junk = tmp_path / "missing.jpg", tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    assert str(missing) in str(_failure(missing)) and str(junk) in str(_failure(junk))  # which made the messages say it twice
    assert read_failure(_failure(missing), missing) == "No such file or directory"
    assert read_failure(_failure(junk), junk) == "cannot identify image file"
    unidentified = UnidentifiedImageError(f"cannot identify image file {str(junk)!r}")
    assert read_failure(unidentified, str(junk)) == "cannot identify image file"
    assert read_failure(OSError(errno.EIO, os.strerror(errno.EIO), str(junk)), junk) == os.strerror(errno.EIO)
    assert read_failure(ValueError(""), junk) == "ValueError"
    truncated = "image file is truncated (79 bytes not processed)"  # PIL's, without a path
    assert read_failure(OSError(truncated), junk) == truncated


def test_a_relative_or_short_path_is_cut_as_a_whole_word(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """'./junk.jpg' reaches PIL as 'junk.jpg'; a path that is also a word inside the message ('e') leaves it whole."""
    monkeypatch.chdir(tmp_path)
    Path("junk.jpg").write_bytes(b"not an image")
    assert read_failure(_failure(Path("./junk.jpg")), "./junk.jpg") == "cannot identify image file"
    assert read_failure(OSError("decoder error -2 when reading image file e"), "e") == (
        "decoder error -2 when reading image file")


def test_the_scan_names_an_unreadable_file_once(make_coco) -> None:
    split = make_coco()
    junk = split.images / "img001.jpg"
    junk.write_bytes(b"not an image")
    assert inspect_image(junk) == ("corrupt", 0, 0, "cannot identify image file", False)
    problems = CocoDataset(split).summary.problems["unreadable image"]
    assert problems == [f"{junk} (image id 13: cannot identify image file)"]

"""Image files: why one could not be read, said without repeating its path (the message around it names the file);
how each pixel mode decodes to RGB; what the header scan reports (size after EXIF, fast decode, truncation)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

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


def test_sixteen_bit_images_scale_by_257_whatever_their_byte_order(tmp_path: Path) -> None:
    """A big-endian 16-bit TIFF (I;16B): 256 // 257 = 0, 32896 // 257 = 128, 65535 // 257 = 255."""
    values = np.array([[256, 32896, 65535]], dtype=">u2")
    Image.frombytes("I;16B", (3, 1), values.tobytes()).save(tmp_path / "big.tif")
    assert read_rgb(tmp_path / "big.tif")[0, :, 0].tolist() == [0, 128, 255]


def test_a_32_bit_image_is_scaled_only_when_a_value_passes_255(tmp_path: Path) -> None:
    """Mode I with values up to 255 is 8-bit data (kept); with a 300 it is 16-bit data: 100 // 257 = 0, 300 // 257 = 1."""
    Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32)).save(tmp_path / "eight.tif")
    Image.fromarray(np.array([[0, 100, 300]], dtype=np.int32)).save(tmp_path / "sixteen.tif")
    assert read_rgb(tmp_path / "eight.tif")[0, :, 0].tolist() == [0, 100, 255]
    assert read_rgb(tmp_path / "sixteen.tif")[0, :, 0].tolist() == [0, 0, 1]


def test_a_float_image_is_clipped_to_0_255(tmp_path: Path) -> None:
    """Mode F: -5.5 -> 0, 100.7 -> 100 (truncated), 300 -> 255, never wrapped around."""
    Image.fromarray(np.array([[-5.5, 100.7, 300.0]], dtype=np.float32)).save(tmp_path / "float.tif")
    assert read_rgb(tmp_path / "float.tif")[0].tolist() == [[0, 0, 0], [100, 100, 100], [255, 255, 255]]


@pytest.mark.parametrize("orientation", [5, 7])
def test_the_transposing_orientations_swap_width_and_height(tmp_path: Path, orientation: int) -> None:
    """EXIF 5 (transpose) and 7 (transverse) turn a 50x20 file into a 20x50 image, as 6 and 8 do."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", (50, 20)).save(tmp_path / "a.jpg", exif=exif.tobytes())
    assert inspect_image(tmp_path / "a.jpg") == ("ok", 20, 50, "", False)


@pytest.mark.parametrize("orientation", [1, 6, 8])
def test_a_tiff_turned_by_its_orientation_is_sized_as_it_decodes(tmp_path: Path, orientation: int) -> None:
    """PIL turns a TIFF's size at open (and its pixels on load): the scan's size is the decoded one, never swapped
    a second time (it was 64 x 48 for a 48 x 64 decode)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", (64, 48)).save(tmp_path / "a.tif", exif=exif.tobytes())
    decoded_hw = read_rgb(tmp_path / "a.tif").shape[:2]
    assert decoded_hw == ((64, 48) if orientation >= 5 else (48, 64))
    assert inspect_image(tmp_path / "a.tif")[1:3] == decoded_hw[::-1]


def test_only_rgb_and_gray_jpegs_and_pngs_take_the_fast_decoder(tmp_path: Path) -> None:
    """A palette PNG is decoded by PIL (fast False); an RGB one by the fast path."""
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "rgb.png")
    Image.new("RGB", (8, 8), (200, 0, 0)).convert("P").save(tmp_path / "palette.png")
    assert inspect_image(tmp_path / "rgb.png") == ("ok", 8, 8, "", True)
    assert inspect_image(tmp_path / "palette.png") == ("ok", 8, 8, "", False)


def test_a_jpeg_padded_after_its_end_marker_is_complete_without_a_decode(tmp_path: Path, monkeypatch) -> None:
    """Zero bytes, newlines and spaces after FF D9 are padding, not a truncation: no 1/8-scale decode is needed."""
    import detector.data.image_files as image_files

    path = tmp_path / "padded.jpg"
    Image.new("RGB", (40, 30), (0, 90, 0)).save(path)
    path.write_bytes(path.read_bytes() + b"\x00" * 100 + b"\r\n\t ")
    monkeypatch.setattr(image_files, "_decode_small", lambda p: pytest.fail(f"{p} decoded"))
    assert inspect_image(path) == ("ok", 40, 30, "", True)


def test_a_scan_shows_a_progress_bar_from_1000_images_on(monkeypatch) -> None:
    """On a terminal a first scan of 1000 images shows its bar; one of 999 shows none."""
    import io
    import sys

    import detector.data.image_files as image_files

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    with image_files._progress(999, Path("few")) as bar:
        assert bar.disable
    with image_files._progress(1000, Path("many")) as bar:
        assert not bar.disable
    assert "scanning few" not in sys.stderr.getvalue() and "scanning many" in sys.stderr.getvalue()

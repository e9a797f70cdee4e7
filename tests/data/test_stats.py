"""Statistics of a COCO split read from its json and image headers: bins, COCO size shares, crowds, negatives."""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image

from detector.data.stats import format_stats, split_stats

# (id, file, width, height, PIL mode); image 3 has no annotation, image 4 a crowd region only
IMAGES = [(1, "a.png", 40, 30, "RGB"), (2, "b.png", 20, 50, "L"), (3, "c.png", 24, 24, "RGB"), (4, "d.jpg", 60, 16, "RGB")]
# (image id, area, iscrowd): sqrt(area) = 4, 8, 32, 96, 200 sit on the bin edges 8, 32 and 96 or inside a bin
ANNOTATIONS = [(1, 16, 0), (1, 64, 0), (1, 32**2, 0), (2, 96**2, 0), (2, 200**2, 0), (1, 100, 1), (4, 500, 1)]


def _split(root: Path) -> Path:
    for _, name, width, height, mode in IMAGES:
        Image.new(mode, (width, height)).save(root / name)
    coco = {
        "images": [{"id": i, "file_name": name, "width": w, "height": h} for i, name, w, h, _ in IMAGES],
        "annotations": [{"id": k, "image_id": i, "category_id": 7, "bbox": [0, 0, 1, 1], "area": area, "iscrowd": crowd}
                        for k, (i, area, crowd) in enumerate(ANNOTATIONS)],
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
    }
    path = root / "instances.json"
    path.write_text(json.dumps(coco))
    return path


def test_split_stats_count_bins_half_open_and_leave_crowds_out(tmp_path: Path) -> None:
    """A box on a bin edge belongs to the bin above it, as COCOeval's area ranges put 32^2 in medium."""
    stats = split_stats(_split(tmp_path), tmp_path)
    assert stats["images"] == 4 and stats["objects"] == 5 and stats["crowd"] == 2
    assert stats["objects_per_image"] == {"mean": 1.25, "min": 0, "max": 3}  # 3, 2, 0, 0 objects
    assert stats["sqrt_area_histogram"] == {"0-8": 1, "8-16": 1, "16-32": 0, "32-64": 1, "64-96": 0, "96-128": 1, "128+": 1}
    assert stats["coco_size_share"] == {"small": 0.4, "medium": 0.2, "large": 0.4}  # 16, 64 | 32^2 | 96^2, 200^2
    assert stats["negatives"] == 1  # image 3; image 4 holds a crowd region, so it is not a plain background image
    assert stats["image_sizes"] == {"min_side": 16, "max_side": 60}  # image 4's height and width
    assert stats["image_modes"] == {"JPEG RGB": 1, "PNG L": 1, "PNG RGB": 2}
    assert stats["category_ids"] == [7, 3]


def test_format_stats_shows_the_size_shares_in_percent(tmp_path: Path) -> None:
    """The shares are fractions in the dict and percentages in the table."""
    text = format_stats({"train": split_stats(_split(tmp_path), tmp_path)})
    lines = text.splitlines()
    assert lines[0].split() == ["train"]
    assert re.search(r"^small share %\s+40\.0$", text, re.MULTILINE)
    assert re.search(r"^sqrt\(area\) 128\+ px\s+1$", text, re.MULTILINE)
    assert re.search(r"^files PNG L\s+1$", text, re.MULTILINE)


def test_objects_per_image_min_is_the_fewest_objects_an_image_holds(tmp_path: Path) -> None:
    """Every image holds objects here (3 and 2): the min is 2 (it read 0 for every split: numpy's `initial=0` takes
    part in the minimum)."""
    path = _split(tmp_path)
    data = json.loads(path.read_text())
    data["images"] = data["images"][:2]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in (1, 2)]
    path.write_text(json.dumps(data))
    assert split_stats(path, tmp_path)["objects_per_image"] == {"mean": 2.5, "min": 2, "max": 3}

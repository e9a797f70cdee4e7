"""Shared fixtures: tiny real COCO datasets written to tmp_path (images on disk + an instances json).

`make_coco(...)` -> SplitSpec: by default 6 non-square JPEGs with solid rectangles (each box is exactly its
rectangle's pixels), gapped category ids 1, 3, 7, a crowd box on the first image and one image without
annotations. Options add, drop or break things; `mutate` edits the json dict before it is written.

`make_data_yaml(...)` -> Path of a dataset YAML whose train and val splits are two such datasets.

`tiny_data` (module-scoped, from tiny_run.py) is the tiny training run's dataset YAML.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from detector.data.spec import SplitSpec
from tiny_run import tiny_data  # noqa: F401 (registered here for every test module: the tiny run's dataset)

IN_ISOLATION = "DETECTOR_TEST_ISOLATED"  # set in the child process of the `isolated` tests
ISOLATED_REPORT = "DETECTOR_TEST_ISOLATED_REPORT"  # where that child writes each test's outcome (JSON lines)
ISOLATED_OUTCOMES = pytest.StashKey[dict[str, dict[str, str]]]()
ISOLATED_GROUP = "isolated"  # their pytest-xdist group: xdist appends "@isolated" to their node ids


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`scripts/test.sh` runs two workers, `--dist loadgroup`): the `isolated` tests stay on one
    worker, whose one child process runs them all, and so do the users of the session's `overfit_run` (one
    training, not one per worker)."""
    for item in items:
        if item.get_closest_marker("isolated") is not None:
            item.add_marker(pytest.mark.xdist_group(ISOLATED_GROUP))
        elif "overfit_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("overfit"))


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Report an `isolated` test's outcome from a fresh pytest process that runs all of this session's isolated
    tests, once: native runtimes (OpenVINO, onnxruntime) then share that process only with one another. The full
    suite's process died with SIGSEGV (a freed lock, at a pipe's close in a later test) after DataLoader workers,
    then OpenVINO and onnxruntime sessions, then an in-process training had run in it; each part alone, and pairs,
    ran clean. One process for the lot, not one per test: each start costs about 13 s of imports on 2 cores."""
    if pyfuncitem.get_closest_marker("isolated") is None or os.environ.get(IN_ISOLATION):
        return None
    outcomes = pyfuncitem.session.stash.get(ISOLATED_OUTCOMES, None)
    if outcomes is None:
        outcomes = _run_isolated(pyfuncitem.session)
        pyfuncitem.session.stash[ISOLATED_OUTCOMES] = outcomes
    outcome = outcomes.get(_plain_nodeid(pyfuncitem))
    if outcome is None:
        pytest.fail(f"the isolated run reported nothing for {pyfuncitem.nodeid}:\n{outcomes.get('', {}).get('text', '')}",
                    pytrace=False)
    if outcome["outcome"] == "skipped":
        pytest.skip(outcome["text"])
    if outcome["outcome"] != "passed":
        pytest.fail(f"isolated run of {pyfuncitem.nodeid} {outcome['outcome']}:\n{outcome['text']}", pytrace=False)
    return True


def _plain_nodeid(item: pytest.Item) -> str:
    """The node id the child pytest knows (without the xdist group suffix)."""
    return item.nodeid.removesuffix(f"@{ISOLATED_GROUP}")


def _run_isolated(session: pytest.Session) -> dict[str, dict[str, str]]:
    """nodeid -> {outcome, text} of every selected `isolated` test, run in one child pytest process; key '' holds
    the child's output tail (what explains a test it never reported, after a crash)."""
    nodeids = [_plain_nodeid(item) for item in session.items if item.get_closest_marker("isolated") is not None]
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "outcomes.jsonl"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *nodeids]
        proc = subprocess.run(cmd, cwd=session.config.rootpath, capture_output=True, text=True, timeout=3600,
                              env={**os.environ, IN_ISOLATION: "1", ISOLATED_REPORT: str(report)})
        lines = report.read_text().splitlines() if report.exists() else []
    outcomes = {"": {"outcome": "error", "text": f"exit {proc.returncode}:\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}"}}
    for line in lines:
        row = json.loads(line)
        if row["outcome"] != "passed" or row["nodeid"] not in outcomes:  # a failed setup or teardown wins over a pass
            outcomes[row["nodeid"]] = {"outcome": row["outcome"], "text": row["text"]}
    return outcomes


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """In the isolated child: append each phase's outcome (setup, call, teardown) to the parent's report file."""
    path = os.environ.get(ISOLATED_REPORT)
    if path and (report.when == "call" or report.outcome != "passed"):
        text = report.longreprtext if report.outcome == "failed" else (str(report.longrepr[2]) if report.skipped else "")
        with open(path, "a") as f:
            f.write(json.dumps({"nodeid": report.nodeid, "outcome": report.outcome, "text": text[-6000:]}) + "\n")


CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 3, "name": "square"}, {"id": 7, "name": "triangle"}]
SIZES_WH = [(96, 64), (64, 96), (80, 80), (120, 72), (72, 120), (100, 60)]


def write_coco(
    root: Path,
    *,
    sizes_wh: list[tuple[int, int]] = SIZES_WH,
    categories: list[dict] = CATEGORIES,
    boxes_per_image: int = 2,
    crowd: bool = True,
    empty_image: bool = True,
    ext: str = "jpg",
    seed: int = 0,
    mutate: Callable[[dict[str, Any]], None] | None = None,
) -> SplitSpec:
    """Write `root/images/*.ext` and `root/instances.json`; see the module docstring."""
    rng = np.random.default_rng(seed)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i, (w, h) in enumerate(sizes_wh):
        image_id = 10 + 3 * i  # gapped, not 0-based
        pixels = np.full((h, w, 3), (40, 60, 80), np.uint8) + rng.integers(0, 20, (h, w, 3), dtype=np.uint8)
        n = 0 if (empty_image and i == len(sizes_wh) - 1) else boxes_per_image
        for k in range(n):
            bw, bh = int(rng.integers(w // 6, w // 2)), int(rng.integers(h // 6, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            pixels[y : y + bh, x : x + bw] = rng.integers(120, 255, 3)
            anns.append(
                {
                    "id": 100 + len(anns),
                    "image_id": image_id,
                    "category_id": categories[(i + k) % len(categories)]["id"],
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
        name = f"img{i:03d}.{ext}"
        Image.fromarray(pixels).save(images_dir / name, **({"quality": 95} if ext == "jpg" else {}))
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
    if crowd and sizes_wh:
        w, h = sizes_wh[0]
        anns.append(
            {"id": 100 + len(anns), "image_id": images[0]["id"], "category_id": categories[0]["id"],
             "bbox": [0, 0, w / 2, h / 2], "area": w * h / 4, "iscrowd": 1}
        )
    data = {"images": images, "annotations": anns, "categories": [dict(c) for c in categories]}
    if mutate is not None:
        mutate(data)
    annotations = root / "instances.json"
    annotations.write_text(json.dumps(data))
    return SplitSpec(images=images_dir, annotations=annotations)


@pytest.fixture(autouse=True, scope="session")
def user_cache_in_temp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The user's cache folder (XDG_CACHE_HOME: the scan caches of read-only json folders, YOLO conversions) in
    the session's temporary folder, for every test and the processes they start: the suite never writes into the
    home of whoever runs it. A test that sets XDG_CACHE_HOME itself overrides it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


@pytest.fixture(scope="session")
def overfit_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Any]:
    """overfit_run(model) -> tiny_run.OverfitRun, trained once per model a session (about a minute each)."""
    from tiny_run import overfit

    runs: dict[str, Any] = {}

    def get(model: str) -> Any:
        if model not in runs:
            runs[model] = overfit(tmp_path_factory.mktemp(f"overfit-{model}"), model)
        return runs[model]

    return get


@pytest.fixture
def make_coco(tmp_path: Path) -> Callable[..., SplitSpec]:
    """Factory: make_coco(name="coco", **write_coco options) -> SplitSpec under tmp_path/name."""

    def make(name: str = "coco", **options: Any) -> SplitSpec:
        return write_coco(tmp_path / name, **options)

    return make


@pytest.fixture
def make_data_yaml(tmp_path: Path) -> Callable[..., Path]:
    """Factory: make_data_yaml(name="data", **write_coco options) -> a dataset YAML with train and val splits."""

    def make(name: str = "data", **options: Any) -> Path:
        root = tmp_path / name
        write_coco(root / "train", **options)
        write_coco(root / "val", **{**options, "seed": options.get("seed", 0) + 1})
        path = root / "data.yaml"
        path.write_text(
            "train: {images: train/images, annotations: train/instances.json}\n"
            "val: {images: val/images, annotations: val/instances.json}\n"
        )
        return path

    return make


@pytest.fixture
def untrained_checkpoint(tmp_path: Path) -> Path:
    """tmp_path/best.pt: an inference checkpoint of a seeded, untrained yolo-c2f-n for the conftest datasets
    (category ids 1, 3, 7), laid out as the trainer writes one."""
    import torch

    from detector.models.builder import build_model
    from detector.runtime.checkpoint import CHECKPOINT_KEYS, FORMAT_VERSION, save_checkpoint

    torch.manual_seed(0)
    model = build_model("yolo-c2f-n", nc=len(CATEGORIES))
    state = dict.fromkeys(CHECKPOINT_KEYS)
    state.update(
        format_version=FORMAT_VERSION, version="test", model_yaml=model.yaml, model=model.state_dict(), ema=None,
        epoch=0, train_state={}, rng={}, train_config={"data": ""}, names=[c["name"] for c in CATEGORIES],
        category_ids=[c["id"] for c in CATEGORIES], imgsz=64, run_dir=str(tmp_path),
    )
    path = tmp_path / "best.pt"
    save_checkpoint(path, state)
    return path

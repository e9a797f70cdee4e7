#!/usr/bin/env bash
# Install the project with its dev, export and faster extras, then run the whole test suite (slow tests included)
# on up to two pytest-xdist workers with one torch thread each: most of the suite is single-threaded Python (COCO
# scoring, data checks, small models, subprocess start-ups), so two processes keep both cores busy, where one
# process with two threads left one idle. Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`
# for the quick loop, or `-n 0` for one process.
set -euo pipefail
cd "$(dirname "$0")/.."
export NO_ALBUMENTATIONS_UPDATE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
bash scripts/install.sh dev,export,faster
exec "${PYTHON:-python3}" -m pytest --numprocesses=auto --maxprocesses=2 --dist=loadgroup "$@"

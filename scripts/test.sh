#!/usr/bin/env bash
# Install the project with its dev, export and faster extras, then run the whole test suite (slow tests included).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` for the quick loop.
set -euo pipefail
cd "$(dirname "$0")/.."
export NO_ALBUMENTATIONS_UPDATE=1
bash scripts/install.sh dev,export,faster
exec "${PYTHON:-python3}" -m pytest "$@"

#!/usr/bin/env bash
# Install this checkout (editable) with the given extras into the current Python.
# pip reuses whatever already satisfies pyproject.toml (a torch install is ~8 minutes the first time only).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-dev,export}
"$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-build-isolation -e ".[${extras}]" \
  || "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore -e ".[${extras}]"

#!/usr/bin/env bash
# Fresh machine -> trained detector: install, generate the bundled shapes dataset if missing, train the
# default nano model (configs/models/yolo-ca-n.yaml) on CPU (12-18 minutes on 2 cores, by machine), evaluate, print COCO metrics.
# Extra key=value arguments go to `detector train` (e.g. `bash scripts/demo.sh epochs=5`).
set -euo pipefail
cd "$(dirname "$0")/.."
export NO_ALBUMENTATIONS_UPDATE=1
bash scripts/install.sh dev,export
PY=${PYTHON:-python3}
"$PY" -m detector train model=configs/models/yolo-ca-n.yaml data=data/shapes.yaml name=demo exist_ok=true \
  epochs=${DEMO_EPOCHS:-7} imgsz=256 batch=16 "$@"
"$PY" -m detector val weights=runs/train/demo/weights/best.pt data=data/shapes.yaml imgsz=256 name=demo exist_ok=true iou=0.65

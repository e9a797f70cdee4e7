#!/usr/bin/env bash
# Fresh machine -> trained detector: install, generate the bundled shapes dataset if missing, train the default
# nano model (configs/models/yolo-ca-n.yaml) on CPU for a 10-minute budget (`time=`: a faster machine fits more
# epochs), evaluate, print COCO metrics.
#   DEMO_MINUTES=20 bash scripts/demo.sh   a longer budget
#   DEMO_EPOCHS=7 bash scripts/demo.sh     exactly 7 epochs instead of a budget (README's Quick start table)
# Extra key=value arguments go to `detector train` (e.g. `bash scripts/demo.sh imgsz=320`).
set -euo pipefail
cd "$(dirname "$0")/.."
export NO_ALBUMENTATIONS_UPDATE=1
bash scripts/install.sh dev,export
PY=${PYTHON:-python3}
if [[ -n "${DEMO_EPOCHS:-}" ]]; then
  length=(epochs="$DEMO_EPOCHS")
else  # epochs=7 shapes the first epoch (warmup, no mosaic) as in the fixed-length demo; the budget then sets the count
  length=(epochs=7 time="$("$PY" -c "import sys; print(float(sys.argv[1]) / 60)" "${DEMO_MINUTES:-10}")")
fi
defaults=(model=configs/models/yolo-ca-n.yaml data=data/shapes.yaml name=demo exist_ok=true "${length[@]}" imgsz=256 batch=16)
given=" "
for arg in "$@"; do given+="${arg%%=*} "; done
train_args=()  # a key given on the command line replaces the default of that name (a key twice is an error)
for arg in "${defaults[@]}"; do [[ "$given" == *" ${arg%%=*} "* ]] || train_args+=("$arg"); done
"$PY" -m detector train "${train_args[@]}" "$@"
"$PY" -m detector val weights=runs/train/demo/weights/best.pt data=data/shapes.yaml imgsz=256 name=demo exist_ok=true iou=0.65

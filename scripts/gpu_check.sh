#!/usr/bin/env bash
# The GPU checks of issue 16 (item 7) as one run of a few minutes on a lent GPU:
#   1. the CUDA-only tests: fp16 through the GradScaler, an overflowing fp16 step skipped, bf16 on the GPU,
#      channels_last against contiguous (tests/train/test_cuda.py); NCCL with SyncBatchNorm when there are two
#      GPUs (tests/reliability/test_ddp.py);
#   2. `detector bench train` at 640 on the hard set: yolo-ca-n in bf16 and fp16 with channels_last on and off,
#      yolo-ca-s in bf16, and yolo-ca-n compiled (compile=true).
# Everything it prints also lands in $OUT (the device tool's result folder) or runs/gpu_check.
#
# The device machine has torch but not every package this one needs, and no network. Here, first:
#   bash scripts/gpu_check.sh --fetch-wheels     # the missing wheels (Python 3.12, x86-64) into .whl/, 8.5 MB
# then run it there with .whl carried: command "bash scripts/gpu_check.sh", carry [".whl"], timeout_s 540.
# GPU_CHECK_BENCH=0 skips the throughput tables (the tests alone take about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."

# the versions this project is tested with (pip freeze on the development machine, 2026-12-06)
WHEELS=(pycocotools==2.0.11 albumentations==2.0.8 albucore==0.0.24 simsimd==6.5.16 stringzilla==5.3.2
        pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 faster-coco-eval==1.8.0)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
  ls .whl
  exit 0
fi

OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1
PY=python3

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
} 2>&1 | tee "$OUT/machine.txt"

"$PY" -m detector data synth profile=hard seed=0 out=data/shapes-hard > "$OUT/synth.txt" 2>&1

set +e  # a failing test must not cost the tables: each part reports its own status
"$PY" -m pytest -q -p no:cacheprovider -rs tests/train/test_cuda.py \
  "tests/reliability/test_ddp.py::test_two_nccl_ranks_with_sync_bn_stay_identical" 2>&1 | tee "$OUT/tests.txt"
echo "tests exit status ${PIPESTATUS[0]}" | tee -a "$OUT/tests.txt"

if [[ "${GPU_CHECK_BENCH:-1}" != "0" ]]; then
  for run in "yolo-ca-n bf16 True False" "yolo-ca-n bf16 False False" "yolo-ca-n fp16 True False" \
             "yolo-ca-n fp16 False False" "yolo-ca-s bf16 True False" "yolo-ca-n bf16 True True"; do
    read -r config amp channels_last compiled <<< "$run"
    echo "== $config amp=$amp channels_last=$channels_last compile=$compiled" | tee -a "$OUT/bench.txt"
    timeout 300 "$PY" -m detector bench train configs="$config" imgsz=640 batch=32 data=data/shapes-hard/dataset.yaml \
      amp="$amp" channels_last="$channels_last" compile="$compiled" device=0 > "$OUT/bench-last.log" 2>&1
    status=$?
    grep -A4 "^training throughput" "$OUT/bench-last.log" | tee -a "$OUT/bench.txt"
    [[ $status -eq 0 ]] || { echo "exit status $status"; tail -20 "$OUT/bench-last.log"; } | tee -a "$OUT/bench.txt"
  done
fi

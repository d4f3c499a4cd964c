#!/usr/bin/env bash
# The GPU checks of issues 23, 26 and 27 as one command, on a machine lent by the `device` tool, with the
# .device/ folder made by benchmarks/device_prepare.sh carried along:
#
#     run(command="bash benchmarks/device_run.sh", carry=[".device"], timeout_s=590)
#
# 1. the cascade on the GPU: the reference photos through `mtcnn-detect`, compared with our CPU detections
#    (the same faces, boxes and scores within 0.01);
# 2. issue 23: `bench_cascade.py --throughput`, 640x480 images/s at batch 1, 8, 32, 64, 256, end to end;
# 3. issue 26: `bench_train.py`, train-step throughput of each stage;
# 4. issue 27: `bench_video.py` at 720p on the clip, ours batched vs facenet-pytorch on the same GPU.
# STEPS="detect compare throughput" runs only the steps named (a rerun on what is left of the device time).
# Each step has its own time limit, so a slow one costs only its share; everything goes to $OUT/run.log
# and each benchmark's JSON to $OUT. PYTHON=.venv/bin/python runs it on a CPU machine (a dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
exec > >(tee "$OUT/run.log") 2>&1
if [ "$PY" = python3 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .device/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MTCNN_JAX_DATA=$PWD/.device
step() {  # step NAME SECONDS COMMAND...: runs it under its limit and says how it ended
  local name=$1 limit=$2; shift 2
  [[ -z ${STEPS:-} || " $STEPS " == *" $name "* ]] || { echo "== $name: skipped (STEPS)"; return; }
  echo "== $name ($(date +%T), limit ${limit}s)"
  timeout "$limit" "$@"
  echo "== $name: exit $? at $(date +%T)"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
step devices 45 "$PY" -c "import jax; print(jax.__version__, jax.devices())"
"$PY" -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda|flax|optax|orbax|numpy|pillow|torch) ' 
step detect 140 "$PY" -m mtcnn_jax.detect .device/reference --json "$OUT/gpu_reference.json" --overwrite
step detect-warm 45 "$PY" -m mtcnn_jax.detect .device/reference --json "$OUT/gpu_reference.json" --overwrite
step compare 20 "$PY" - "$OUT/gpu_reference.json" <<'PYCODE'
import json, sys
import numpy as np
cpu, gpu = (json.load(open(p)) for p in (".device/cpu_reference.json", sys.argv[1]))
if set(cpu) != set(gpu):
    sys.exit(f"images differ: only on the CPU {sorted(set(cpu) - set(gpu))}, only on the GPU {sorted(set(gpu) - set(cpu))}")
worst = 0.0
for name in sorted(cpu):
    a, b = np.asarray(cpu[name]["boxes"]).reshape(-1, 5), np.asarray(gpu[name]["boxes"]).reshape(-1, 5)
    if a.shape != b.shape:
        sys.exit(f"{name}: {len(a)} faces on the CPU, {len(b)} on the GPU")
    d = np.abs(a - b).max(initial=0.0)
    worst = max(worst, d)
    print(f"{name}: {len(a)} faces, largest difference {d:.2e}")
print(f"largest difference {worst:.2e}:", "same detections" if worst < 1e-2 else "DIFFERENT detections")
sys.exit(0 if worst < 1e-2 else 1)
PYCODE
step throughput 150 "$PY" benchmarks/bench_cascade.py --throughput --no-peers --json "$OUT/throughput.json"
step train 90 "$PY" benchmarks/bench_train.py --stages pnet rnet onet --sizes 60000 --memory-stage onet \
  --json "$OUT/train.json"
step video 90 "$PY" benchmarks/bench_video.py --clip .device/clip720.mp4 --sizes 720x1280 --frames 120 \
  --batches 1,8,32 --every 5 --peers-python "$PY" --peer-device cuda --json "$OUT/video.json"

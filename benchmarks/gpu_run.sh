#!/usr/bin/env bash
# The GPU part of the results, run on a lent CUDA machine from a copy of this repo plus a carried
# folder PACK holding all.npz.xz (cifar10-jpeg packed by ../shared/tools/imagefolder_pack.py, then xz)
# and <model>.pt.xz checkpoints. Nothing is built there. Logs go to $OUT/logs, seeded from the
# committed results/logs so that a run continues where an earlier device session stopped; then the
# CUDA latency of every 3x plan (eager CUDA graphs, and torch.compile max-autotune) plus the 224x224 ImageNet
# rows go to $OUT/latency_cuda.csv (also resumable). Each final record carries
# its own CUDA latency (the summary's speed-ups); latency_cuda.csv is the standalone deployment benchmark.
#   bash benchmarks/gpu_run.sh PACK MODELS MINUTES [LATENCY_MINUTES]
set -euo pipefail
pack=$1; models=$2; minutes=$3; lat_minutes=${4:-0}
out=${OUT:-out/gpu}
export PYTHONUNBUFFERED=1 HTD_CACHE=/tmp/htd-cache
mkdir -p /tmp/ckpt "$out/logs"
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, platform; print('torch', torch.__version__, torch.cuda.get_device_name(0), platform.processor())" | tee -a "$out/gpu.txt"
if [ ! -d /tmp/cifar10-jpeg/test ]; then
  xz -d -c "$pack/all.npz.xz" > /tmp/all.npz
  python3 "$pack/imagefolder_pack.py" unpack /tmp/all.npz /tmp/cifar10-jpeg
fi
for m in ${models//,/ }; do
  [ -f "$pack/$m.pt.xz" ] && xz -d -c "$pack/$m.pt.xz" > /tmp/ckpt/$m.pt
done
# every committed log, in the <log-dir>/<model>/ layout: the runs resume from them, the latency reads their plans
for f in results/logs/results-*.log; do m=$(basename "$f" .log); m=${m#results-}; m=${m%-*}
  mkdir -p "$out/logs/$m"; cp -n "$f" "$out/logs/$m/"; done
echo "unpacked in $(( $(date +%s) - t0 ))s"
# CUDA paths of the test suite (skipped on CPU-only CI).
timeout 120 python3 -m pytest -q -x tests/test_latency.py tests/test_layers.py tests/test_deploy.py -k cuda -p no:cacheprovider 2>&1 | tail -3 || true
if [ "$minutes" != 0 ]; then
  python3 benchmarks/run_results.py --models "$models" --data-root /tmp/cifar10-jpeg --checkpoint-dir /tmp/ckpt \
    --log-dir "$out/logs" --minutes "$minutes" --run-tag cuda2
fi
if [ "$lat_minutes" != 0 ]; then
  python3 jsonify_logs.py "$out/logs" --out /tmp/json >/dev/null
  [ -f results/latency_cuda.csv ] && cp -n results/latency_cuda.csv "$out/"
  python3 benchmarks/latency.py --json /tmp/json --out "$out" --device cuda --checkpoint-dir /tmp/ckpt \
    --minutes "$lat_minutes" --compile max-autotune --imagenet ${LAT_MODELS:+--models $LAT_MODELS}
fi
echo "total $(( $(date +%s) - t0 ))s"

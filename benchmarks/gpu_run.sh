#!/usr/bin/env bash
# The GPU part of the results, run on a lent CUDA machine from a copy of this repo plus a carried
# folder PACK holding all.npz.xz (cifar10-jpeg packed by ../shared/tools/imagefolder_pack.py, then xz)
# and <model>.pt.xz checkpoints. Nothing is built there; logs go to $OUT/logs (resumable).
#   bash benchmarks/gpu_run.sh PACK MODELS MINUTES
set -euo pipefail
pack=$1; models=$2; minutes=$3
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
for m in ${models//,/ }; do xz -d -c "$pack/$m.pt.xz" > /tmp/ckpt/$m.pt; done
echo "unpacked in $(( $(date +%s) - t0 ))s"
# CUDA paths of the test suite (skipped on CPU-only CI).
timeout 120 python3 -m pytest -q -x tests/test_latency.py tests/test_layers.py -k cuda -p no:cacheprovider 2>&1 | tail -3 || true
python3 benchmarks/run_results.py --models "$models" --data-root /tmp/cifar10-jpeg --checkpoint-dir /tmp/ckpt \
  --log-dir "$out/logs" --minutes "$minutes" --run-tag cuda
echo "total $(( $(date +%s) - t0 ))s"

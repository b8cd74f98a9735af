#!/usr/bin/env bash
# The GPU part of the results, run on a lent CUDA machine from a copy of this repo plus a carried folder
# PACK made here by `python tools/carry.py pack PACK --models MODELS` (the data and checkpoints,
# small enough to travel) and, where the machine lacks them, wheels (optuna, colorlog) to install there.
# Nothing is built there. Every model runs at once, each as one `torchrun` job of NPROC ranks sharing
# the GPU (common/dist.py: more ranks than GPUs share them over gloo; a 32x32 CIFAR model leaves an
# H200 mostly idle in one process). Seeds are added one at a time (--n-seeds 1, 2, ...: the log
# resumes and extends), so a time box that runs out leaves whole seeds, never plans without finals.
# Logs go to $OUT/logs/<model>/ as they are produced, and come back even when the call is cut off.
#   bash tools/gpu_run.sh PACK MODELS MINUTES [NPROC [N_SEEDS]]
# RUN_ARGS: the run_results.py options of the table (below); RESERVE_S: seconds kept for a chunk of
# final models already started when a seed's time box runs out; LAT_MINUTES (default 0: off): then,
# with the GPU to itself, the CUDA latency of every plan in the logs (eager CUDA graphs and
# torch.compile max-autotune) plus the 224x224 ImageNet rows, to $OUT/latency_cuda.{csv,md}, continuing
# the committed results/gpu/latency_cuda.csv (the current table's plans) where there is one.
set -uo pipefail
pack=$1; models=$2; minutes=$3; nproc=${4:-1}; n_seeds=${5:-3}
out=${OUT:-out/gpu}
RUN_ARGS=${RUN_ARGS:---targets 3,2,5 --methods guided,policy,energy,uniform,tpe,random,vbmf --no-tucker2 --no-latency --no-artifacts --run-tag cuda}
RESERVE_S=${RESERVE_S:-75}
export PYTHONUNBUFFERED=1 HTD_CACHE=/tmp/htd-cache OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
t0=$(date +%s); end=$(( t0 + $(awk "BEGIN{print int($minutes*60)}") ))
mkdir -p "$out/logs"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"; } | tee "$out/gpu.txt"
if compgen -G "$pack/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$pack"/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
python3 -c "import torch, platform; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no cuda', platform.processor())" | tee -a "$out/gpu.txt"
python3 tools/carry.py unpack "$pack" /tmp/cifar10-jpeg /tmp/ckpt || exit 1
# the committed logs the pack brought (results/gpu/logs): the runs continue them
[ -d "$pack/logs" ] && cp -rn "$pack/logs/." "$out/logs/"
# decode the JPEGs once into the cache, before NPROC ranks per model all want them
python3 -c "from common.data.datasets import load_dataset; load_dataset('cifar10-jpeg', root='/tmp/cifar10-jpeg')" || exit 1
echo "ready in $(( $(date +%s) - t0 ))s"

run_model() {
  local m=$1 n left
  for n in $(seq 1 "$n_seeds"); do
    left=$(( end - $(date +%s) ))
    if [ "$left" -le $(( RESERVE_S + 60 )) ]; then echo "$m: no time left for seed $((n - 1))"; break; fi
    echo "$m: seeds 0..$((n - 1)), ${left}s left"
    # shellcheck disable=SC2086
    timeout --signal=TERM --kill-after=10 "$left" python3 -m torch.distributed.run --standalone --nproc-per-node "$nproc" \
      benchmarks/run_results.py --models "$m" --data-root /tmp/cifar10-jpeg --checkpoint-dir /tmp/ckpt \
      --log-dir "$out/logs" --n-seeds "$n" --minutes "$(awk "BEGIN{print ($left - $RESERVE_S) / 60}")" $RUN_ARGS \
      || { echo "$m: exit $? at seed $((n - 1))"; break; }
  done
}
for m in ${models//,/ }; do
  run_model "$m" > "$out/$m.out" 2>&1 &
done
wait
rm -f "$out"/logs/*/*.pt "$out"/logs/*/*.lock
if [ "${LAT_MINUTES:-0}" != 0 ]; then
  python3 jsonify_logs.py "$out/logs" --out /tmp/json >/dev/null
  [ -f results/gpu/latency_cuda.csv ] && cp -n results/gpu/latency_cuda.csv "$out/"
  python3 benchmarks/latency.py --json /tmp/json --out "$out" --device cuda --checkpoint-dir /tmp/ckpt \
    --minutes "$LAT_MINUTES" --compile max-autotune --imagenet
fi
echo "total $(( $(date +%s) - t0 ))s"

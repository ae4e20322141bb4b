#!/usr/bin/env bash
# The GPU measurements of `--seeds N` (BENCHMARKS.md, "Several seeds in one program"), in one
# call on one NVIDIA GPU (H100 / H200), in the order they matter, each writing as it goes:
#   1. wall time per meta step against N in {1, 2, 4, 8, 16} seeds trained as one program, on
#      Omniglot 5w1s then 20w1s (benchmarks/seeds.py, one round), with XLA's flop count and
#      its fraction of the GPU's plain fp32 peak;
#   2. the 60,000-step Omniglot 5w1s schedule with --seeds 3 for $TRAIN_MINUTES minutes
#      (steps/s, so the time the full schedule takes at that rate), then each seed's
#      evaluation on 600 tasks and the mean and spread over seeds.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_seeds.sh              # from the repository root
#   QUICK=1 OUT=/tmp/gpu bash benchmarks/gpu_seeds.sh      # plumbing check, any machine, tiny
#
# Data: $AMAML_OMNIGLOT_DIR (default ../shared/data/omniglot). Python: $PY (default python3).
set -u
OUT=${OUT:-/tmp/amaml-gpu-seeds}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export AMAML_OMNIGLOT_DIR=${AMAML_OMNIGLOT_DIR:-$PWD/../shared/data/omniglot}
TRAIN_MINUTES=${TRAIN_MINUTES:-2.5}
SEEDS_TIMEOUT=${SEEDS_TIMEOUT:-330}
if [ -n "${QUICK:-}" ]; then
  SD="--seeds 1 2 --lines 1 --log_every 2"
  TR="--iterations 4 --log_every 2 --val_every 2 --checkpoint_every 2 --val_tasks 4 --eval_tasks 4"
else
  SD="--seeds 1 2 4 8 16 --lines 3 --log_every 20"; TR=""
fi

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  $PY -c "import amaml.env, json; print(json.dumps(amaml.env.versions()))"; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

echo "== 1. seconds per meta step against --seeds N"
timeout "$SEEDS_TIMEOUT" $PY benchmarks/seeds.py --configs omniglot-5w1s omniglot-20w1s $SD \
  --rounds 1 --peak-gflops 67000 2>&1 | tee "$OUT/seeds.txt"

echo "== 2. 5w1s schedule, --seeds 3, $TRAIN_MINUTES minutes"
rm -rf /tmp/amaml-gpu-seeds-run
$PY -m amaml train --config omniglot-5w1s --seeds 3 --max_minutes "$TRAIN_MINUTES" $TR \
  --out /tmp/amaml-gpu-seeds-run 2>&1 | tr '\r' '\n' | grep -v "^\s*$" | tail -25
cp /tmp/amaml-gpu-seeds-run/metrics.jsonl "$OUT/train-5w1s-seeds3-metrics.jsonl" 2>/dev/null
cp /tmp/amaml-gpu-seeds-run/results.json "$OUT/train-5w1s-seeds3-results.json" 2>/dev/null
ls "$OUT"

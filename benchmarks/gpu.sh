#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md, in one call on one NVIDIA GPU (H100 / H200), in the
# order they matter, each writing its results as it goes:
#   1. the Omniglot 20w1s robustness grid (alpha0 in {0.01, 0.1, 1}, beta0 = 1e-3, 5 inner
#      steps) at the CPU budget, three methods, amaml's default first;
#   2. meta-step throughput of amaml against the torch.func peer on the same GPU;
#   3. the 60,000-step Omniglot 5w1s schedule, timed for $TRAIN_MINUTES minutes (steps/s
#      and the time the full schedule takes at that rate), then evaluated on 600 tasks.
#
#   OUT=/tmp/gpu bash benchmarks/gpu.sh              # from the repository root
#   QUICK=1 OUT=/tmp/gpu bash benchmarks/gpu.sh      # plumbing check, any machine, tiny
#
# Data: $AMAML_OMNIGLOT_DIR (default ../shared/data/omniglot); peers: $AMAML_PEERS_DIR
# (default ../shared/peers). Python: $PY (default python3, which holds torch there).
set -u
OUT=${OUT:-/tmp/amaml-gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export AMAML_OMNIGLOT_DIR=${AMAML_OMNIGLOT_DIR:-$PWD/../shared/data/omniglot}
export AMAML_PEERS_DIR=${AMAML_PEERS_DIR:-$PWD/../shared/peers}
export OMNIGLOT_NPZ=$AMAML_OMNIGLOT_DIR/images_background.npz
TRAIN_MINUTES=${TRAIN_MINUTES:-2}
if [ -n "${QUICK:-}" ]; then
  TP="--steps 1 --warmup 0"; RB="--steps 2 --eval-tasks 4 --val-tasks 4 --alphas 0.1"
  TR="--iterations 4 --log_every 2 --val_every 2 --checkpoint_every 2 --val_tasks 4 --eval_tasks 4"
  PEERS=""
else
  TP="--steps 10 --warmup 2"; RB="--alphas 0.01 0.1 1"; TR=""
  PEERS="--peers --peer-impls torchfunc-loop-cuda --peers-python $PY"
fi

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  $PY -c "import jax, optax, flax; print('jax', jax.__version__, 'optax', optax.__version__,
'flax', flax.__version__, jax.devices())"; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

echo "== 1. 20w1s grid"
$PY benchmarks/robustness.py --task omniglot-20w1s --betas 1e-3 --seeds 1 \
  --methods alpha-maml maml alpha-maml-paper $RB \
  --out "$OUT/robustness-omniglot-20w1s.jsonl.gz" --images /tmp/amaml-gpu-images 2>&1 | tail -40

echo "== 2. throughput"
$PY benchmarks/throughput.py --config omniglot-5w1s omniglot-20w1s \
  --impls amaml-maml amaml-alpha $TP $PEERS --peak-gflops 67000 \
  --out "$OUT/throughput.jsonl" 2>&1 | cut -c1-400

echo "== 3. 5w1s schedule, $TRAIN_MINUTES minutes"
rm -rf /tmp/amaml-gpu-run
$PY -m amaml train --config omniglot-5w1s --max_minutes "$TRAIN_MINUTES" $TR \
  --out /tmp/amaml-gpu-run 2>&1 | tr '\r' '\n' | grep -v "^\s*$" | tail -15
cp /tmp/amaml-gpu-run/metrics.jsonl "$OUT/train-5w1s-metrics.jsonl" 2>/dev/null
cp /tmp/amaml-gpu-run/results.json "$OUT/train-5w1s-results.json" 2>/dev/null
ls "$OUT"

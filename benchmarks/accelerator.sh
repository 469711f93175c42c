#!/usr/bin/env bash
# The PPO and reward-model benchmarks with rlhf_jax alone on an accelerator machine, from a checkout, with no
# install and no network: the machine's Python must already hold jax (with its GPU or TPU
# plugin), flax, optax, orbax-checkpoint, transformers, tokenizers, torch and pyyaml (torch
# and transformers only check that both libraries read the saved models alike).
#
#   bash benchmarks/accelerator.sh [python]      # default python3
#   RUNS="small:float32" REPEATS=1 bash benchmarks/accelerator.sh   # a quick check
#
# By default runs the GPT-2 shapes in float32 and the ~1B Llama shape in bfloat16, 3 timed
# iterations / steps each; writes benchmarks/results/{ppo,reward}_<device>.json, and copies
# them with the logs to $OUT when that is set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python3}"
RUNS="${RUNS:-small:float32 base:float32 llama-1b:bfloat16}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c "import jax; print(jax.__version__, jax.devices())"
logs=$(mktemp -d)
for run in $RUNS; do
  shape="${run%%:*}" dtype="${run##*:}"
  for bench in ppo reward; do
    echo "$bench.py --shape $shape --dtype $dtype (log: $logs/${bench}_$shape.log)"
    "$PY" "benchmarks/$bench.py" --shape "$shape" --dtype "$dtype" --no-peer \
      --repeats "${REPEATS:-3}" 2> "$logs/${bench}_$shape.log"
  done
done
if [ -n "${OUT:-}" ]; then
  device=$("$PY" -c "from rlhf_jax import perf; print(perf.device_label())")
  cp "benchmarks/results/ppo_${device}.json" "benchmarks/results/reward_${device}.json" \
    "$logs"/*.log "$OUT"/
fi

#!/usr/bin/env bash
# The generation, PPO and reward-model benchmarks on an accelerator machine, from a checkout,
# with no install and no network: the machine's Python must already hold jax (with its GPU or
# TPU plugin), flax, optax, orbax-checkpoint, transformers, tokenizers, torch and pyyaml.
# Generation runs against transformers' `generate` (on CUDA when torch sees a GPU); PPO and
# the reward step run rlhf_jax alone (--no-peer: TRL's venv is a CPU install).
#
#   bash benchmarks/accelerator.sh [python]      # default python3
#   RUNS="small:float32" REPEATS=1 bash benchmarks/accelerator.sh   # a quick check
#
# By default runs the GPT-2 shapes in float32 and the ~1B Llama shape in bfloat16, 3 timed
# repeats each; writes benchmarks/results/{generate,ppo,reward}_<device>.json, and copies them
# with the logs (logs.tgz) to $OUT when that is set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python3}"
RUNS="${RUNS:-small:float32 base:float32 llama-1b:bfloat16}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c "import jax; print(jax.__version__, jax.devices())"
logs=$(mktemp -d)
for run in $RUNS; do
  shape="${run%%:*}" dtype="${run##*:}"
  for bench in generate ppo reward; do
    echo "$bench.py --shape $shape --dtype $dtype (log: $logs/${bench}_$shape.log)"
    if [ "$bench" = generate ]; then  # torch shares the GPU: jax takes memory as it needs it
      XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" benchmarks/generate.py --shape "$shape" \
        --dtype "$dtype" --repeats "${REPEATS:-3}" 2> "$logs/${bench}_$shape.log"
    else
      "$PY" "benchmarks/$bench.py" --shape "$shape" --dtype "$dtype" --no-peer \
        --repeats "${REPEATS:-3}" 2> "$logs/${bench}_$shape.log"
    fi
  done
done
if [ -n "${OUT:-}" ]; then
  device=$("$PY" -c "from rlhf_jax import perf; print(perf.device_label())")
  for bench in generate ppo reward; do
    cp "benchmarks/results/${bench}_${device}.json" "$OUT"/
  done
  tar czf "$OUT/logs.tgz" -C "$logs" .
fi

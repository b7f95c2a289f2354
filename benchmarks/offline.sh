#!/usr/bin/env bash
# Offline benchmark of issue 2: tokenmill vs transformers on the default model, in float32 and bfloat16.
# Run on an otherwise idle machine: never time two processes that do math at once on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench_results
for dtype in ${DTYPES:-bfloat16 float32}; do
  .venv/bin/tokenmill --log-level WARNING bench throughput --dtype "$dtype" --num-prompts "${NUM_PROMPTS:-200}" \
    --peer-requests "${PEER_REQUESTS:-4}" --latency --kv-cache-memory 4GiB --max-num-seqs 256 \
    --out "bench_results/offline_${dtype}.json"
done

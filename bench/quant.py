"""What quantization costs and buys: size, memory, speed and quality, per precision, in one run.

    python bench/quant.py                         # SmolLM2-135M-Instruct (the embedded default)
    python bench/quant.py --model DIR_OR_GGUF --docs 50 --json out.json

For each of fp32, bf16, int8, int8-dynamic, fp8 the parent process writes a checkpoint (quantized
from the fp32 weights, embeddings included unless --keep-embeddings) and measures:
  - file size of the safetensors;
in a fresh process per model, one after the other, so the memory is that model's alone:
  - tensor memory (parameters + buffers + FP8's dequantised CPU copies) and resident memory:
    RSS after loading and one forward, minus RSS before loading (this includes ~100 MiB of
    oneDNN/MKL code and buffers that any first matmul pages in);
  - perplexity on held-out text: the first --docs GSM8K test problems, "Question: q\nAnswer: a"
    (read from --data, never copied into the repo);
  - any --metric NAME=module:function, called as function(model, tokenizer) -> float (the hook
    for GSM8K accuracy from nanoseek.eval);
and in one process holding all five models, timed in interleaved rounds:
  - batch-1 decode tokens/s (greedy, dense KV cache, --decode-tokens after a 32-token prompt);
  - prefill tokens/s (512 tokens, KV cache written, logits of the last position).
The machine is shared and its load drifts over minutes: interleaving makes every precision see
the same drift, and each figure is the best of --repeats rounds (the least disturbed one).
Ratios against bf16 are printed beside each figure.
Output: the JSON record, then a Markdown table, both on stdout.
"""

import argparse
import copy
import ctypes
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PRECISIONS = ("fp32", "bf16", "int8", "int8-dynamic", "fp8")
DEFAULT_DATA = "/work/shared/data/gsm8k/test.jsonl"


# ---- measurements (worker process) ---------------------------------------------------------

def rss_mib() -> float:
    """Resident set size, after handing freed heap pages back to the OS (glibc keeps them
    otherwise, and the figure would depend on what loading happened to allocate and free)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return psutil.Process().memory_info().rss / 2**20


def tensor_mib(model) -> float:
    """Bytes held by the model's tensors (shared ones once), including FP8's dequantised copies."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()) + [
            m._dequantized for m in model.modules() if getattr(m, "_dequantized", None) is not None]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / 2**20


@torch.inference_mode()
def decode_tokens_per_s(model, prompt_ids: list[int], n_new: int) -> float:
    """Greedy batch-1 decoding after the prompt; one timed run."""
    from nanoseek.model.kv_cache import DenseKVCache
    cache = DenseKVCache(model.config.n_layers, len(prompt_ids) + n_new + 1)
    ids = torch.tensor([prompt_ids])
    logits = model(ids, cache.positions(1, ids.shape[1]), cache)
    cache.advance(ids.shape[1])
    t0 = time.perf_counter()
    for _ in range(n_new):
        ids = logits[:, -1].argmax(-1, keepdim=True)
        logits = model(ids, cache.positions(1, 1), cache)
        cache.advance(1)
    return n_new / (time.perf_counter() - t0)


@torch.inference_mode()
def prefill_tokens_per_s(model, ids: list[int]) -> float:
    """One prompt through the model writing its KV cache, logits of the last position only."""
    from nanoseek.model.kv_cache import DenseKVCache
    cache = DenseKVCache(model.config.n_layers, len(ids))
    t0 = time.perf_counter()
    h = model.hidden_states(torch.tensor([ids]), cache.positions(1, len(ids)), cache)
    model.logits(h[:, -1])
    return len(ids) / (time.perf_counter() - t0)


@torch.inference_mode()
def perplexity(model, docs: list[list[int]]) -> float:
    nll, n = 0.0, 0
    for ids in docs:
        x = torch.tensor([ids])
        logits = model(x)[0, :-1]
        nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        n += len(ids) - 1
    return math.exp(nll / n)


def heldout_docs(tokenizer, path: str, count: int) -> list[list[int]]:
    docs = []
    with open(path) as f:
        for line in f:
            if len(docs) == count:
                break
            d = json.loads(line)
            docs.append(tokenizer.encode(f"Question: {d['question']}\nAnswer: {d['answer']}"))
    return docs


def load_for(label: str, path: str):
    import nanoseek
    return nanoseek.load(path, "fp32" if label == "fp32" else "bf16")  # quantized ones compute in bf16


def quality_worker(args) -> dict:
    """One model alone in this process: memory, perplexity, extra metrics."""
    label, path = args.dirs[0].split("=", 1)
    rss0 = rss_mib()
    model, tok = load_for(label, path)
    docs = heldout_docs(tok, args.data, args.docs)
    with torch.inference_mode():
        model(torch.tensor([docs[0]]))  # the first forward builds lazy state (FP8's CPU copy)
    out = {"precision": label, "rss_mib": round(rss_mib() - rss0, 1), "tensor_mib": round(tensor_mib(model), 1),
           "perplexity": round(perplexity(model, docs), 4), "heldout_tokens": sum(len(d) - 1 for d in docs)}
    for spec in args.metric:
        name, target = spec.split("=", 1)
        module, fn = target.split(":")
        out[name] = getattr(importlib.import_module(module), fn)(model, tok)
    return out


def speed_worker(args) -> dict:
    """All models in one process, timed in interleaved rounds (the order rotates each round):
    load on the shared machine drifts over minutes, and every precision should see the same
    drift. Each figure is the best round."""
    models = {}
    for spec in args.dirs:
        label, path = spec.split("=", 1)
        models[label] = load_for(label, path)
    tok = next(iter(models.values()))[1]
    docs = heldout_docs(tok, args.data, args.docs)
    prompt, long = docs[0][:32], [t for d in docs for t in d][:512]
    labels = list(models)
    best = {k: {"decode_tok_s": 0.0, "prefill_tok_s": 0.0} for k in labels}
    for label in labels:  # warm-up, untimed
        decode_tokens_per_s(models[label][0], prompt, 4)
        prefill_tokens_per_s(models[label][0], long[:64])
    for r in range(args.repeats):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            model = models[label][0]
            b = best[label]
            b["decode_tok_s"] = max(b["decode_tok_s"], decode_tokens_per_s(model, prompt, args.decode_tokens))
            b["prefill_tok_s"] = max(b["prefill_tok_s"], prefill_tokens_per_s(model, long))
    return {k: {m: round(v, 2) for m, v in b.items()} for k, b in best.items()}


# ---- checkpoints and orchestration (parent process) ----------------------------------------

def write_checkpoints(model_arg, root: Path, quantize_embeddings: bool) -> dict[str, Path]:
    import nanoseek
    from nanoseek.quant import quantize_model
    fp32, tok = nanoseek.load(model_arg, "fp32")
    dirs = {}
    for p in PRECISIONS:
        d = dirs[p] = root / p
        if p == "fp32":
            fp32.save(d, tok)
        elif p == "bf16":
            copy.deepcopy(fp32).to(torch.bfloat16).save(d, tok)
        else:
            quantize_model(copy.deepcopy(fp32), p, quantize_embeddings).save(d, tok)
    return dirs


def file_mib(d: Path) -> float:
    return sum(f.stat().st_size for f in d.glob("*.safetensors")) / 2**20


def run_worker(kind: str, dirs: dict[str, Path], args) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--data", args.data, "--docs", str(args.docs),
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--decode-tokens", str(args.decode_tokens)]
    cmd += [a for label, d in dirs.items() for a in ("--dirs", f"{label}={d}")]
    cmd += [a for m in args.metric for a in ("--metric", m)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{kind} worker for {', '.join(dirs)} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def ratio(x, base, fmt="{:.2f}x"):
    return fmt.format(x / base) if base else "-"


def markdown(rows: list[dict], meta: dict, metrics: list[str]) -> str:
    base = next(r for r in rows if r["precision"] == "bf16")
    head = ["precision", "file MiB", "tensors MiB", "RSS MiB", "decode tok/s", "prefill tok/s", "perplexity", "ppl vs bf16",
            "gsm8k"] + [m for m in metrics if m != "gsm8k"]
    lines = [f"{meta['model']} — {meta['heldout_tokens']} held-out tokens (GSM8K test, first {meta['docs']} docs), "
             f"{meta['threads']} thread(s), best of {meta['repeats']} interleaved rounds, embeddings "
             f"{'quantized' if meta['quantize_embeddings'] else 'kept bf16'} in int8/fp8",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["precision"],
                 f"{r['file_mib']:.1f} ({ratio(r['file_mib'], base['file_mib'])})",
                 f"{r['tensor_mib']:.0f} ({ratio(r['tensor_mib'], base['tensor_mib'])})",
                 f"{r['rss_mib']:.0f} ({ratio(r['rss_mib'], base['rss_mib'])})",
                 f"{r['decode_tok_s']:.1f} ({ratio(r['decode_tok_s'], base['decode_tok_s'])})",
                 f"{r['prefill_tok_s']:.0f} ({ratio(r['prefill_tok_s'], base['prefill_tok_s'])})",
                 f"{r['perplexity']:.3f}",
                 f"{(r['perplexity'] / base['perplexity'] - 1):+.2%}",
                 str(r.get("gsm8k", "—"))] + [str(r.get(m, "—")) for m in metrics if m != "gsm8k"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF / HF dir / repo id (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--data", default=DEFAULT_DATA, help="GSM8K test.jsonl (held-out text)")
    ap.add_argument("--docs", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5, help="timing rounds (all precisions in each)")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine a second OpenMP thread mostly spins)")
    ap.add_argument("--keep-embeddings", action="store_true", help="leave embeddings/lm_head in bf16")
    ap.add_argument("--metric", action="append", default=[], help="NAME=module:function(model, tokenizer) -> float")
    ap.add_argument("--json", default=None, help="also write the JSON record here")
    ap.add_argument("--worker", choices=["quality", "speed"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dirs", action="append", default=[], help=argparse.SUPPRESS)  # LABEL=checkpoint dir
    args = ap.parse_args(argv)
    if args.worker:
        torch.set_num_threads(args.threads)
        print(json.dumps((quality_worker if args.worker == "quality" else speed_worker)(args)))
        return
    if not os.path.isfile(args.data):
        raise SystemExit(f"{args.data}: no such file (pass --data)")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_checkpoints(args.model, Path(tmp), not args.keep_embeddings)
        rows = []
        for p in PRECISIONS:  # one process per model: its resident memory is its own
            r = run_worker("quality", {p: dirs[p]}, args)
            r["file_mib"] = round(file_mib(dirs[p]), 1)
            rows.append(r)
            print(f"measured {p}: {r}", file=sys.stderr)
        speed = run_worker("speed", dirs, args)
        print(f"timed: {speed}", file=sys.stderr)
    for r in rows:
        r.update(speed[r["precision"]])
    meta = {"model": args.model or "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)", "docs": args.docs,
            "heldout_tokens": rows[0]["heldout_tokens"], "threads": args.threads, "repeats": args.repeats,
            "decode_tokens": args.decode_tokens, "quantize_embeddings": not args.keep_embeddings,
            "torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}
    record = {"meta": meta, "results": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    print()
    print(markdown(rows, meta, [m.split("=", 1)[0] for m in args.metric]))


if __name__ == "__main__":
    main()

"""What quantization costs and buys: size, memory, speed and quality, per precision, in one run.

    python bench/quant.py                         # SmolLM2-135M-Instruct (the embedded default)
    python bench/quant.py --model DIR_OR_GGUF --docs 50 --out bench/results
    python bench/quant.py --model runs/speedrun/sft --out bench/results   # the speedrun's model

For each of fp32, bf16, int8, int8-dynamic, int4, fp8 the parent process writes a checkpoint (quantized
from the fp32 weights, embeddings included unless --keep-embeddings) and measures:
  - file size of the safetensors;
in a fresh process per model, one after the other, so the memory is that model's alone:
  - tensor memory (parameters + buffers + FP8's dequantised CPU copies) and resident memory:
    RSS after loading and one forward, minus RSS before loading (this includes ~100 MiB of
    oneDNN/MKL code and buffers that any first matmul pages in);
  - perplexity on held-out text: the first --docs GSM8K test problems, "Question: q\nAnswer: a"
    (read from --data, never copied into the repo);
  - GSM8K accuracy on the first --gsm8k-limit test problems (--gsm8k-data), greedy, prompted
    as --gsm8k-format (nanoseek eval's formats), generated batched through the engine
    (nanoseek.LLM) and scored by nanoseek.eval.gsm8k (strict-match and flexible-extract);
  - any --metric NAME=module:function, called as function(model, tokenizer) -> float;
and in one process holding all six models, timed in interleaved rounds:
  - batch-1 decode tokens/s (greedy, dense KV cache, --decode-tokens after a 32-token prompt);
  - prefill tokens/s (512 tokens, KV cache written, logits of the last position).
The machine is shared and its load drifts over minutes: interleaving makes every precision see
the same drift, and each figure is the best of --repeats rounds (the least disturbed one).
Ratios against bf16 are printed beside each figure.

The speedrun's model: --model a speedrun stage directory (RUN/sft or RUN/pretrain, or its
model/ checkpoint with the tokenizer). The held-out problems come from RUN/data/heldout.jsonl
(or --heldout): perplexity is over their "Question: q\nAnswer: a" text (all of them, or --docs
spread over the levels) and the accuracy column is the speedrun's own held-out accuracy
(nanoseek.train.evaluate.accuracy_by_level: chat prompt after SFT, base prompt after
pretraining, the run's eval_max_tokens). GSM8K accuracy is off there unless --gsm8k-limit.

Output: the JSON record, then a Markdown table, both on stdout; with --out DIR also
DIR/NAME.json, NAME.md and NAME.png (ratios to bf16) and the GSM8K samples in DIR/NAME_gsm8k/.
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
from nanoseek.errors import NanoseekError  # noqa: E402
from nanoseek.eval.gsm8k import FORMATS as GSM8K_FORMATS  # noqa: E402

PRECISIONS = ("fp32", "bf16", "int8", "int8-dynamic", "int4", "fp8")
DEFAULT_DATA = "/work/shared/data/gsm8k/test.jsonl"
DEFAULT_DOCS = 50  # GSM8K test documents for perplexity
# SmolLM2-135M-Instruct scored 0/10 at bf16 both ways (5-shot `gsm8k`: 70 s for 10 problems;
# zero-shot `chat`: 26 s, outputs of 97-241 tokens, each ending in a parseable number): chat is
# the cheaper of two floor scores, and "same answer as bf16" is the figure that moves
GSM8K_FORMAT = "chat"
CHAT_MAX_TOKENS = 512  # nanoseek eval's 2048 is for reasoning models; a degenerate loop would hold the batch


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


def spread(items: list, count: int | None) -> list:
    """`count` items evenly spaced over the list (all of them for None): every level of the
    speedrun's held-out problems, which come sorted by level."""
    if count is None or count >= len(items):
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def read_problems(path: str) -> list[dict]:
    from nanoseek.jsonl import iter_jsonl
    return [p for _, p in iter_jsonl(path)]


def heldout_docs(tokenizer, args) -> list[list[int]]:
    """Held-out text: the speedrun's held-out problems (--heldout), else the first --docs GSM8K ones."""
    if args.heldout:
        from nanoseek.train.evaluate import problem_text
        return [tokenizer.encode(problem_text(p)) for p in spread(read_problems(args.heldout), args.docs)]
    docs = []
    with open(args.data) as f:
        for line in f:
            if len(docs) == (args.docs or DEFAULT_DOCS):
                break
            d = json.loads(line)
            docs.append(tokenizer.encode(f"Question: {d['question']}\nAnswer: {d['answer']}"))
    return docs


def gsm8k_accuracy(model, tokenizer, args, label: str) -> dict:
    """GSM8K through nanoseek eval's own runner and scorer, generated batched by the engine."""
    from nanoseek import LLM
    from nanoseek.eval import gsm8k, runner
    from nanoseek.eval.inprocess import EngineGenerator
    llm = LLM(model, tokenizer=tokenizer, kv_cache_gib=args.gsm8k_kv_gib)
    pool = gsm8k.load_problems(args.gsm8k_fewshot_data, "train") if args.gsm8k_fewshot_data else None
    out_dir = args.gsm8k_samples or tempfile.mkdtemp(prefix="quant_gsm8k_")
    t0 = time.perf_counter()
    res = runner.run_gsm8k(EngineGenerator(llm, label), gsm8k.load_problems(args.gsm8k_data, "test"),
                           args.gsm8k_format, limit=args.gsm8k_limit, out_dir=str(Path(out_dir) / label),
                           fewshot_pool=pool, max_tokens=args.gsm8k_max_tokens, data_path=args.gsm8k_data,
                           fewshot_path=args.gsm8k_fewshot_data, model_name=label, progress=False)
    scores = res["scores"]
    samples = [json.loads(line) for line in open(Path(out_dir) / label / runner.SAMPLES_FILE, encoding="utf-8")]
    return {"gsm8k": scores["strict-match"]["exact_match"], "gsm8k_flexible": scores["flexible-extract"]["exact_match"],
            "gsm8k_n": res["data"]["num_problems"], "gsm8k_s": round(time.perf_counter() - t0, 1),
            "gsm8k_answers": [gsm8k.normalize(s["extracted"]["flexible-extract"]) for s in samples]}


def heldout_accuracy(model, tokenizer, args) -> dict:
    """The speedrun's held-out accuracy, measured by the speedrun's own function."""
    from nanoseek.train.evaluate import accuracy_by_level
    acc = accuracy_by_level(model, tokenizer, read_problems(args.heldout), chat=args.heldout_prompt == "chat",
                            max_tokens=args.heldout_max_tokens)
    return {"heldout_accuracy": round(acc["overall"], 4), "heldout_n": sum(v["n"] for v in acc["levels"].values()),
            "heldout_levels": {str(k): round(v["accuracy"], 4) for k, v in acc["levels"].items()}}


def load_for(label: str, path: str):
    import nanoseek
    return nanoseek.load(path, "fp32" if label == "fp32" else "bf16")  # quantized ones compute in bf16


def quality_worker(args) -> dict:
    """One model alone in this process: memory, perplexity, accuracy, extra metrics."""
    label, path = args.dirs[0].split("=", 1)
    rss0 = rss_mib()
    model, tok = load_for(label, path)
    docs = heldout_docs(tok, args)
    with torch.inference_mode():
        model(torch.tensor([docs[0]]))  # the first forward builds lazy state (FP8's CPU copy)
    out = {"precision": label, "rss_mib": round(rss_mib() - rss0, 1), "tensor_mib": round(tensor_mib(model), 1),
           "perplexity": round(perplexity(model, docs), 4), "heldout_tokens": sum(len(d) - 1 for d in docs),
           "heldout_docs": len(docs)}
    for spec in args.metric:
        name, target = spec.split("=", 1)
        module, fn = target.split(":")
        out[name] = getattr(importlib.import_module(module), fn)(model, tok)
    if args.heldout:
        out.update(heldout_accuracy(model, tok, args))
    if args.gsm8k_limit:
        out.update(gsm8k_accuracy(model, tok, args, label))
    return out


def speed_worker(args) -> dict:
    """All models in one process, timed in interleaved rounds (the order rotates each round):
    load on the shared machine drifts over minutes, and every precision should see the same
    drift. Each figure is the best round."""
    models = {}
    for spec in args.dirs:
        label, path = spec.split("=", 1)
        models[label] = load_for(label, path)
    first = next(iter(models.values()))
    docs = heldout_docs(first[1], args)
    prompt = docs[0][:32]
    long = [t for d in docs for t in d][:min(512, first[0].config.max_seq_len)]
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
    out = {k: {m: round(v, 2) for m, v in b.items()} for k, b in best.items()}
    for k in out:
        out[k]["prefill_tokens"] = len(long)
    return out


# ---- checkpoints and orchestration (parent process) ----------------------------------------

def write_checkpoints(model_arg, root: Path, quantize_embeddings: bool) -> dict[str, Path]:
    import nanoseek
    from nanoseek.quant import quantize_model
    fp32, tok = nanoseek.load(model_arg, "fp32")
    if tok is None:
        raise NanoseekError(f"{model_arg}: no tokenizer found with the model")
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


WORKER_OPTIONS = ("data", "docs", "repeats", "threads", "decode_tokens", "heldout", "heldout_prompt",
                  "heldout_max_tokens", "gsm8k_data", "gsm8k_limit", "gsm8k_format", "gsm8k_fewshot_data",
                  "gsm8k_max_tokens", "gsm8k_kv_gib", "gsm8k_samples")


def run_worker(kind: str, dirs: dict[str, Path], args) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind]
    for name in WORKER_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            cmd += ["--" + name.replace("_", "-"), str(value)]
    cmd += [a for label, d in dirs.items() for a in ("--dirs", f"{label}={d}")]
    cmd += [a for m in args.metric for a in ("--metric", m)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or [""])[-1]
        why = last if last.startswith("error: ") else "\n" + res.stderr
        raise SystemExit(f"{kind} worker for {', '.join(dirs)} failed: {why}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def ratio(x, base, fmt="{:.2f}x"):
    return fmt.format(x / base) if base else "-"


def percent(r: dict, key: str) -> str:
    return "—" if r.get(key) is None else f"{r[key]:.1%}"


def mib(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.2f}"


def markdown(rows: list[dict], meta: dict, metrics: list[str]) -> str:
    base = next(r for r in rows if r["precision"] == "bf16")
    head = ["precision", "file MiB", "tensors MiB", "RSS MiB", "decode tok/s", "prefill tok/s", "perplexity", "ppl vs bf16"]
    if meta.get("heldout_problems"):
        head.append("held-out acc")
    if meta.get("gsm8k"):
        head += ["GSM8K strict / flexible", "GSM8K same answer as bf16"]
    head += metrics
    if meta.get("heldout_problems"):
        text = (f"{meta['heldout_tokens']} held-out tokens ({meta['heldout_docs']} of the speedrun's "
                f"{meta['heldout_problems']} held-out problems)")
    else:
        text = f"{meta['heldout_tokens']} held-out tokens (GSM8K test, first {meta['heldout_docs']} docs)"
    lines = [f"{meta['model']} — {text}, {meta['threads']} thread(s), best of {meta['repeats']} interleaved rounds, "
             f"embeddings {'quantized' if meta['quantize_embeddings'] else 'kept bf16'} in int8/fp8"]
    if meta.get("heldout_problems"):
        lines.append(f"held-out accuracy: nanoseek.train.evaluate.accuracy_by_level, {meta['heldout_prompt']} prompt, "
                     f"greedy, {meta['heldout_max_tokens']} tokens, {meta['heldout_problems']} problems")
    if meta.get("gsm8k"):
        g = meta["gsm8k"]
        lines.append(f"GSM8K: first {g['limit']} test problems, {g['format']} format, greedy, "
                     f"{g['max_tokens'] or 'default'} max tokens, nanoseek.eval.gsm8k exact match "
                     f"(same answer as bf16: flexible-extract answers equal once normalised)")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["precision"],
                 f"{r['file_mib']:.1f} ({ratio(r['file_mib'], base['file_mib'])})",
                 f"{mib(r['tensor_mib'])} ({ratio(r['tensor_mib'], base['tensor_mib'])})",
                 f"{mib(r['rss_mib'])} ({ratio(r['rss_mib'], base['rss_mib'])})",
                 f"{r['decode_tok_s']:.1f} ({ratio(r['decode_tok_s'], base['decode_tok_s'])})",
                 f"{r['prefill_tok_s']:.0f} ({ratio(r['prefill_tok_s'], base['prefill_tok_s'])})",
                 f"{r['perplexity']:.3f}",
                 f"{(r['perplexity'] / base['perplexity'] - 1):+.2%}"]
        if meta.get("heldout_problems"):
            cells.append(percent(r, "heldout_accuracy"))
        if meta.get("gsm8k"):
            cells += [f"{percent(r, 'gsm8k')} / {percent(r, 'gsm8k_flexible')}", percent(r, "gsm8k_same_as_bf16")]
        cells += [str(r.get(m, "—")) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(path: Path, rows: list[dict], meta: dict):
    """Bars: each figure as a ratio to bf16's."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import bar_png
    base = next(r for r in rows if r["precision"] == "bf16")
    keys = {"file size": "file_mib", "RSS": "rss_mib", "decode tok/s": "decode_tok_s", "prefill tok/s": "prefill_tok_s",
            "perplexity": "perplexity", "held-out acc": "heldout_accuracy", "GSM8K": "gsm8k"}
    series = {name: [r[k] / base[k] for r in rows] for name, k in keys.items()
              if base.get(k) and all(r.get(k) is not None for r in rows)}
    bar_png(path, f"{meta['model']}: quantized vs bf16", [r["precision"] for r in rows], series, "ratio to bf16")


def speedrun_layout(model_arg) -> tuple[Path, Path, str] | None:
    """(checkpoint dir, RUN/data/heldout.jsonl, stage) for a speedrun stage directory
    (RUN/sft, RUN/pretrain) or its model/ checkpoint; None for any other model."""
    if not model_arg:
        return None
    p = Path(model_arg)
    if (p / "model" / "config.json").is_file():
        stage, ckpt = p, p / "model"
    elif p.name == "model" and (p / "config.json").is_file() and (p.parent.parent / "data").is_dir():
        stage, ckpt = p.parent, p
    else:
        return None
    return ckpt, stage.parent / "data" / "heldout.jsonl", stage.name


def resolve_args(args):
    """Fill the defaults that depend on the model, check every input file; one line per error."""
    layout = speedrun_layout(args.model)
    if layout is not None:
        args.model = str(layout[0])
        if args.heldout is None:
            args.heldout = str(layout[1])
            if not layout[1].is_file():
                raise SystemExit(f"--model {layout[0].parent}: a speedrun stage without {layout[1]} (pass --heldout)")
    if args.heldout is not None:
        if not os.path.isfile(args.heldout):
            raise SystemExit(f"--heldout {args.heldout}: no such file")
        if args.heldout_prompt is None:
            args.heldout_prompt = "base" if layout is not None and layout[2] == "pretrain" else "chat"
        if args.heldout_max_tokens is None:
            report = Path(args.heldout).parent.parent / "report.json"
            from nanoseek.train.speedrun import KNOBS
            knobs = json.loads(report.read_text()).get("knobs", {}) if report.is_file() else {}
            args.heldout_max_tokens = int(knobs.get("eval_max_tokens", KNOBS["eval_max_tokens"]))
    elif not os.path.isfile(args.data):
        raise SystemExit(f"--data {args.data}: no such file")
    if args.gsm8k_limit is None:
        args.gsm8k_limit = 0 if args.heldout else 50
    if args.gsm8k_limit < 0:
        raise SystemExit(f"--gsm8k-limit must be >= 0, got {args.gsm8k_limit}")
    if args.gsm8k_limit:
        if not os.path.isfile(args.gsm8k_data):
            raise SystemExit(f"--gsm8k-data {args.gsm8k_data}: no such file")
        from nanoseek.eval import gsm8k
        if gsm8k.resolve_num_fewshot(args.gsm8k_format, None) and args.gsm8k_format != "gsm8k_cot":
            if args.gsm8k_fewshot_data is None:
                args.gsm8k_fewshot_data = str(Path(args.gsm8k_data).parent / "train.jsonl")
            if not os.path.isfile(args.gsm8k_fewshot_data):
                raise SystemExit(f"--gsm8k-fewshot-data {args.gsm8k_fewshot_data}: no such file "
                                 f"(the {args.gsm8k_format} format's exemplars come from the train split)")
        else:
            args.gsm8k_fewshot_data = None
        if args.gsm8k_max_tokens is None and args.gsm8k_format == "chat":
            args.gsm8k_max_tokens = CHAT_MAX_TOKENS
        if args.gsm8k_max_tokens is not None and args.gsm8k_max_tokens < 1:
            raise SystemExit(f"--gsm8k-max-tokens must be >= 1, got {args.gsm8k_max_tokens}")
    if args.docs is not None and args.docs < 1:
        raise SystemExit(f"--docs must be >= 1, got {args.docs}")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    return args


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="GGUF / HF dir / repo id (default: SmolLM2-135M-Instruct), or a speedrun stage dir (RUN/sft)")
    ap.add_argument("--data", default=DEFAULT_DATA, help="GSM8K test.jsonl (held-out text for perplexity)")
    ap.add_argument("--docs", type=int, default=None,
                    help="held-out documents for perplexity (default: 50 GSM8K ones; all the speedrun's problems)")
    ap.add_argument("--heldout", default=None,
                    help="the speedrun's held-out problems (default: RUN/data/heldout.jsonl of a speedrun --model)")
    ap.add_argument("--heldout-prompt", choices=["chat", "base"], default=None,
                    help="held-out accuracy prompt (default: base for RUN/pretrain, chat otherwise, as the speedrun)")
    ap.add_argument("--heldout-max-tokens", type=int, default=None, help="(default: the run's eval_max_tokens)")
    ap.add_argument("--gsm8k-data", default=DEFAULT_DATA, help="GSM8K test.jsonl for the accuracy column")
    ap.add_argument("--gsm8k-limit", type=int, default=None,
                    help="GSM8K problems (the first N; 0: no GSM8K column; default: 50, 0 for a speedrun model)")
    ap.add_argument("--gsm8k-format", default=GSM8K_FORMAT, choices=GSM8K_FORMATS,
                    help=f"nanoseek eval's prompt formats (default: {GSM8K_FORMAT})")
    ap.add_argument("--gsm8k-fewshot-data", default=None, help="train.jsonl for exemplars (default: next to --gsm8k-data)")
    ap.add_argument("--gsm8k-max-tokens", type=int, default=None, help=f"(default: {CHAT_MAX_TOKENS} for chat, else nanoseek eval's)")
    ap.add_argument("--gsm8k-kv-gib", type=float, default=1.0, help="engine KV cache for the GSM8K batch")
    ap.add_argument("--gsm8k-samples", default=None, help=argparse.SUPPRESS)  # where workers write samples
    ap.add_argument("--repeats", type=int, default=5, help="timing rounds (all precisions in each)")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine a second OpenMP thread mostly spins)")
    ap.add_argument("--keep-embeddings", action="store_true", help="leave embeddings/lm_head in bf16")
    ap.add_argument("--metric", action="append", default=[], help="NAME=module:function(model, tokenizer) -> float")
    ap.add_argument("--json", default=None, help="also write the JSON record here")
    ap.add_argument("--out", default=None, help="also write NAME.json, NAME.md, NAME.png and NAME_gsm8k/ here")
    ap.add_argument("--name", default=None, help="file name stem under --out (default: quant, or quant_speedrun)")
    ap.add_argument("--worker", choices=["quality", "speed"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dirs", action="append", default=[], help=argparse.SUPPRESS)  # LABEL=checkpoint dir
    args = ap.parse_args(argv)
    if args.worker:
        torch.set_num_threads(args.threads)
        try:
            print(json.dumps((quality_worker if args.worker == "quality" else speed_worker)(args)))
        except NanoseekError as e:
            raise SystemExit(f"error: {e}") from None
        return
    try:
        return run(args, argv)
    except NanoseekError as e:
        raise SystemExit(f"error: {e}") from None


def run(args, argv=None) -> dict:
    """The parent: checkpoints, one quality worker per precision, one speed worker, the outputs."""
    resolve_args(args)
    name = args.name or ("quant_speedrun" if args.heldout else "quant")
    out = Path(args.out) if args.out else None
    if out is not None and args.gsm8k_limit:
        args.gsm8k_samples = str(out / f"{name}_gsm8k")
    with tempfile.TemporaryDirectory() as tmp:
        if args.gsm8k_limit and args.gsm8k_samples is None:
            args.gsm8k_samples = str(Path(tmp) / "gsm8k")
        try:
            dirs = write_checkpoints(args.model, Path(tmp), not args.keep_embeddings)
        except NanoseekError as e:
            raise SystemExit(f"error: --model: {e}") from None
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
    if args.gsm8k_limit:
        base = next(r for r in rows if r["precision"] == "bf16")["gsm8k_answers"]
        for r in rows:
            r["gsm8k_same_as_bf16"] = sum(a == b for a, b in zip(r["gsm8k_answers"], base)) / len(base)
    meta = {"model": args.model or "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)",
            "heldout_docs": rows[0]["heldout_docs"], "heldout_tokens": rows[0]["heldout_tokens"],
            "threads": args.threads, "repeats": args.repeats, "decode_tokens": args.decode_tokens,
            "prefill_tokens": rows[0]["prefill_tokens"], "quantize_embeddings": not args.keep_embeddings,
            "torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "loadavg_at_end": round(os.getloadavg()[0], 2),
            "command": "python bench/quant.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.heldout:
        meta.update(heldout=args.heldout, heldout_problems=rows[0]["heldout_n"], heldout_prompt=args.heldout_prompt,
                    heldout_max_tokens=args.heldout_max_tokens)
    else:
        meta["data"] = args.data
    if args.gsm8k_limit:
        meta["gsm8k"] = {"data": args.gsm8k_data, "limit": rows[0]["gsm8k_n"], "format": args.gsm8k_format,
                         "fewshot_data": args.gsm8k_fewshot_data, "max_tokens": args.gsm8k_max_tokens}
    record = {"meta": meta, "results": rows}
    table = markdown(rows, meta, [m.split("=", 1)[0] for m in args.metric])
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    print()
    print(table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
        (out / f"{name}.md").write_text(table + "\n")
        plot(out / f"{name}.png", rows, meta)
        print(f"wrote {out}/{name}.{{json,md,png}}", file=sys.stderr)
    return record


if __name__ == "__main__":
    main()

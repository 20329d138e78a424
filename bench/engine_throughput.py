"""Engine benchmarks on SmolLM2-135M-Instruct, same weights, same run:

  1. batch-1 decode tokens/s: nanoseek vs llama.cpp (llama-cpp-python, same GGUF, 2 threads);
  2. aggregate output tokens/s, 32 concurrent requests (128-token prompts, 128 new tokens):
     nanoseek's engine vs transformers `generate` on the 32 prompts as one padded batch (its
     best of fp32 and bf16, on the GGUF as it loads it or on the weights dequantised), llama.cpp
     alongside (one request at a time: its Python API does not batch sequences);
  3. prefix cache: TTFT of a request sharing a 1,000-token prefix, cache on vs off.

    python bench/engine_throughput.py [--precision bf16,int8] [--skip-llamacpp]
    python bench/engine_throughput.py --precision int8,int4 --decode-only --repeats 5   # 1. alone

llama.cpp is a bench extra: `bash bench/install_peers.sh llamacpp` builds llama-cpp-python for
this CPU; without it those columns are skipped.
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bar_png, machine, median, smollm2_path, timed, write_results  # noqa: E402

import nanoseek  # noqa: E402
from nanoseek.engine import Engine  # noqa: E402


def random_prompts(n, length, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 40000, (length,), generator=g).tolist() for _ in range(n)]


def engine_decode_tps(engine, prompt, n):
    engine.add_request(prompt, nanoseek.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    t_first = None
    while engine.has_unfinished():
        engine.step()
        t_first = t_first or time.perf_counter()
    return (n - 1) / (time.perf_counter() - t_first)


def engine_batch_tps(engine, prompts, n):
    def run():
        for p in prompts:
            engine.add_request(p, nanoseek.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()
    return len(prompts) * n / timed(run)


def engine_ttft(engine, prompt):
    engine.add_request(prompt, nanoseek.SamplingParams(temperature=0, max_tokens=1))
    return timed(lambda: [engine.step() for _ in iter(engine.has_unfinished, False)])


def transformers_model(path, precision, dense_dir=None):
    """transformers on the GGUF as it loads it (its weights kept packed), or, with dense_dir, on
    the same weights dequantised into an HF checkpoint there (plain dense matmuls): the bench
    takes transformers' best of the four."""
    from transformers import AutoModelForCausalLM
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    if dense_dir is None:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    with torch.inference_mode():  # warm-up
        x = torch.tensor([[100, 200, 300]] * 2)
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=2, do_sample=False)
    return model


def transformers_batch_tps(model, prompts, n):
    x = torch.tensor(prompts)  # equal lengths: no padding needed, the fairest case for transformers

    @torch.inference_mode()
    def run():
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return len(prompts) * n / timed(run)


def llamacpp(path, threads):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    return Llama(model_path=str(path), n_ctx=2048, n_threads=threads, n_batch=512, verbose=False)


def llamacpp_decode_tps(llm, prompt, n):
    llm.reset()
    t_first, count = None, 0
    for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        count += 1
        if count == 1:
            t_first = time.perf_counter()
        if count == n:
            break
    return (n - 1) / (time.perf_counter() - t_first)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="bf16,int8", help="nanoseek precisions, comma-separated (default: bf16,int8)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (and llama.cpp threads)")
    ap.add_argument("--hf-precisions", default="fp32,bf16",
                    help="transformers peers' dtypes (default: fp32,bf16; on a CPU without bf16 matmul units "
                         "its bf16 rows take minutes a round and are not its best)")
    ap.add_argument("--tag", default="", help="suffix of the results file (engine_throughput<tag>.json)")
    ap.add_argument("--decode-only", action="store_true",
                    help="only the batch-1 decode rounds (each round's figures kept): engine_decode_<threads>t.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    precisions = args.precision.split(",")
    path = smollm2_path()
    res = {"machine": machine(), "model": "SmolLM2-135M-Instruct Q4_1 GGUF", "precisions": precisions,
           "decode_b1": {}, "batch32": {}}
    engines = {}
    for prec in precisions:
        model, tok = nanoseek.load(path, prec)
        engines[prec] = Engine(model, tok, kv_cache_gib=1.0, enable_prefix_caching=False)
    lcpp = None if args.skip_llamacpp else llamacpp(path, args.threads)
    short = random_prompts(1, 32, 0)[0]

    # 1. batch-1 decode, interleaved rounds so load changes hit every system alike
    runs = {name: [] for name in [*precisions, "llama.cpp"]}
    for prec in precisions:
        engine_decode_tps(engines[prec], short, 8)
    for _ in range(args.repeats):
        for prec in precisions:
            runs[prec].append(engine_decode_tps(engines[prec], short, 128))
        if lcpp is not None:
            runs["llama.cpp"].append(llamacpp_decode_tps(lcpp, short, 128))
    res["decode_b1"] = {(f"nanoseek {k}" if k in precisions else k): round(median(v), 1) for k, v in runs.items() if v}
    res["decode_b1_runs"] = {k: [round(x, 1) for x in v] for k, v in runs.items() if v}
    print(res["decode_b1"], flush=True)
    if args.decode_only:
        d = res["decode_b1"]
        lines = ["| system | tok/s (median) | rounds | ratio |", "|---|---|---|---|"]
        for (name, v), r in zip(d.items(), res["decode_b1_runs"].values()):
            ratio = f"{v / d['llama.cpp']:.2f}x llama.cpp" if "llama.cpp" in d else "-"
            lines.append(f"| {name} | {v} | {' / '.join(map(str, r))} | {ratio} |")
        write_results(Path(args.out), f"engine_decode_{args.threads}t{args.tag}", res, "\n".join(lines))
        return

    # 2. 32 concurrent requests, 128 in / 128 out
    # (median of --repeats interleaved rounds: one 32-request run is ~10 s, long enough for the
    # machine's noise to move it by 20%)
    prompts = random_prompts(32, 128, 1)
    dense_dir = Path(tempfile.mkdtemp(prefix="nanoseek-hf-"))
    nanoseek.load(str(path), "fp32")[0].save(dense_dir)  # the GGUF's weights, dequantised, as HF safetensors
    hf = {f"{prec}{tag}": transformers_model(path, prec, d) for prec in args.hf_precisions.split(",")
          for tag, d in (("", None), (" dense weights", dense_dir))}
    runs = {}
    for _ in range(args.repeats):
        for prec in precisions:
            runs.setdefault(f"nanoseek {prec}", []).append(engine_batch_tps(engines[prec], prompts, 128))
        for prec, model in hf.items():
            runs.setdefault(f"transformers {prec}", []).append(transformers_batch_tps(model, prompts, 128))
    res["batch32"] = {k: round(median(v), 1) for k, v in runs.items()}
    res["batch32_runs"] = {k: [round(x, 1) for x in v] for k, v in runs.items()}
    del hf
    shutil.rmtree(dense_dir, ignore_errors=True)
    if lcpp is not None:
        t = timed(lambda: [llamacpp_decode_tps(lcpp, p, 128) for p in prompts])
        res["batch32"]["llama.cpp (sequential)"] = round(32 * 128 / t, 1)
    print(res["batch32"], flush=True)

    # 3. prefix cache: shared 1,000-token prefix (first precision)
    model, tok = engines[precisions[0]].model, engines[precisions[0]].tokenizer
    prefix = random_prompts(1, 1000, 2)[0]
    tails = random_prompts(2 * args.repeats + 1, 24, 3)
    ttft = {}
    for on in (False, True):
        eng = Engine(model, tok, kv_cache_gib=1.0, enable_prefix_caching=on)
        engine_ttft(eng, prefix + tails[0])  # warm: on "on", this fills the cache
        ttft["on" if on else "off"] = round(median([engine_ttft(eng, prefix + t) for t in tails[1:]]) * 1000, 1)
    ttft["speedup"] = round(ttft["off"] / ttft["on"], 1)
    res["prefix_cache_ttft_ms"] = ttft
    print(ttft, flush=True)

    d, b = res["decode_b1"], res["batch32"]
    best_hf = max(v for k, v in b.items() if k.startswith("transformers"))
    lines = ["| benchmark | system | tok/s | ratio |", "|---|---|---|---|"]
    for name, v in d.items():
        ratio = f"{v / d['llama.cpp']:.2f}x llama.cpp" if "llama.cpp" in d else "-"
        lines.append(f"| batch-1 decode | {name} | {v} | {ratio} |")
    for name, v in b.items():
        lines.append(f"| 32 x (128 in, 128 out), output | {name} | {v} | {v / best_hf:.2f}x best transformers |")
    lines.append(f"| TTFT, 1,000-token shared prefix ({precisions[0]}) | cache on {ttft['on']} ms | cache off "
                 f"{ttft['off']} ms | {ttft['speedup']}x |")
    out = Path(args.out)
    write_results(out, f"engine_throughput{args.tag}", res, "\n".join(lines))
    bar_png(out / f"engine_throughput{args.tag}.png", "SmolLM2-135M: output tokens/s", ["batch-1 decode", "32 x 128/128"],
            {k: [d.get(k, 0), b.get(k, 0)] for k in dict.fromkeys([*d, *b])}, "tokens/s")


if __name__ == "__main__":
    main()

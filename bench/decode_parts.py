"""Where a batch-1 decode token goes, in three measurements (SmolLM2-135M's shapes):

  1. the int4 kernel (at every M, beyond where Int4Linear uses it) against dequantise + bf16
     GEMM and plain bf16 weights, by rows M;
  2. all 30 layers' projections streamed from DRAM at one row: int8 kernel against int4 kernel;
  3. the engine's decode step with the compiled loop (engine/csrc/decode.cpp), the Python loop
     (engine/flat_decode.py) and the modules, interleaved in one process (same tokens checked);
  4. a 32-row bf16 decode step: as shipped, without prepacked weights, without the AVX512-BF16
     attention, and its matmuls' share;
  5. (--only prefill) the 32 x 128-token bf16 prefill step three ways, a fresh process each,
     interleaved, with the minor page faults a step takes: as shipped (the compiled loop, glibc's
     malloc thresholds fixed by nanoseek/cpu_heap.py), with glibc's default thresholds
     (NANOSEEK_KEEP_HEAP=0), and with the prompt rows left to the modules (SDPA and the layers'
     own forward; flat_decode.NATIVE_PROMPT_KEYS = 0).

    python bench/decode_parts.py [--threads 2] [--precision int4]
    python bench/decode_parts.py --only batch      # 4. alone: decode_batch_<threads>t.json
    python bench/decode_parts.py --only prefill    # 5.: prefill_step_<threads>t.json

Writes bench/results/decode_parts_<threads>t.json.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, smollm2_path, write_results  # noqa: E402

import nanoseek  # noqa: E402
from nanoseek.quant import int4  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # SmolLM2's packed q/k/v, o, gate/up, down


def per_call_us(fn, n=50):
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def kernels_by_rows():
    N, K = 3072, 576
    w = torch.randn(N, K) * 0.02
    q, s, lo = int4.quantize_groups(w)
    p = int4.pack_nibbles(q)
    kw = int4.kernel_weight(p, s, lo, torch.bfloat16)
    wb = w.to(torch.bfloat16)
    rows = []
    for M in (1, 4, 16, 32, 64, 128, 256):
        x = torch.randn(M, K, dtype=torch.bfloat16)
        rows.append(dict(M=M, int4_kernel=per_call_us(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                             x, kw[0], int4.GROUP, kw[1])),
                         dequantise_gemm=per_call_us(lambda: int4.weight_only_mm(x, p, s, lo, None)),
                         bf16=per_call_us(lambda: F.linear(x, wb))))
    return rows


def streamed_layers(n_layers=30):
    """One row through every layer's projections, weights too many for the cache (ms per token)."""
    w8, w4 = [], []
    for _ in range(n_layers):
        for N, K in SHAPES:
            w = torch.randn(N, K) * 0.02
            sc = w.abs().amax(1) / 127
            w8.append(((w / sc[:, None]).round().to(torch.int8), sc.to(torch.bfloat16)))
            q, s, lo = int4.quantize_groups(w)
            w4.append((K, int4.kernel_weight(int4.pack_nibbles(q), s, lo, torch.bfloat16)))
    x = {K: torch.randn(1, K, dtype=torch.bfloat16) for K in (576, 1536)}

    def run8():
        for q, s in w8:
            torch.ops.aten._weight_int8pack_mm(x[q.shape[1]], q, s)

    def run4():
        for K, (kw, sz) in w4:
            torch.ops.aten._weight_int4pack_mm_for_cpu(x[K], kw, int4.GROUP, sz)
    return dict(int8_ms=median([per_call_us(run8, 5) for _ in range(3)]) / 1e3,
                int4_ms=median([per_call_us(run4, 5) for _ in range(3)]) / 1e3)


def flat_vs_modules(precision, rounds=3, tokens=64):
    """The engine's batch-1 decode step three ways, interleaved in one process: the compiled loop
    (engine/csrc/decode.cpp), the Python loop (engine/flat_decode.py) and the modules."""
    import nanoseek.engine.engine as engine_mod
    from nanoseek.engine.flat_decode import FlatDecoder
    model, tok = nanoseek.load(smollm2_path(), precision)
    engine = engine_mod.Engine(model, tok, kv_cache_gib=1.0, enable_prefix_caching=False)
    real_of, real_native = engine_mod.FlatDecoder.of, FlatDecoder._native
    prompt = list(range(100, 132))

    def step_ms(way):
        engine_mod.FlatDecoder.of = real_of if way != "modules" else (lambda m: None)
        FlatDecoder._native = real_native if way == "native" else (lambda self, *step: None)
        engine.flat = None
        engine.add_request(prompt, nanoseek.SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
        times, out = [], None
        while engine.has_unfinished():
            t = time.perf_counter()
            outs = engine.step()
            times.append(time.perf_counter() - t)
            out = outs[0] if outs else out
        return median(times[1:]) * 1e3, out.outputs[0].token_ids
    ways = ("native", "flat", "modules")
    try:
        step_ms("native")
        res = {f"{w}_ms": [] for w in ways}
        tokens_of = {}
        for _ in range(rounds):
            for w in ways:
                ms, tokens_of[w] = step_ms(w)
                res[f"{w}_ms"].append(round(ms, 2))
        res["same_tokens"] = tokens_of["native"] == tokens_of["flat"] == tokens_of["modules"]
    finally:
        engine_mod.FlatDecoder.of, FlatDecoder._native = real_of, real_native
    return res


def batch_step(rounds=3, rows=32, prompt_len=128, warm=60, steps=20):
    """A 32-row bf16 decode step (the 32-concurrent benchmark's, ~190 keys a sequence) by the
    compiled loop, A/B in one process: as shipped, without the prepacked weights
    (NANOSEEK_PREPACK=0), and without the AVX512-BF16 attention (NANOSEEK_BF16_DOT=0); and the
    step's matmuls (torch.profiler's self time of its linear calls, head included)."""
    import os
    from torch.profiler import ProfilerActivity, profile
    from nanoseek.engine import Engine
    model, tok = nanoseek.load(smollm2_path(), "bf16")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, 40000, (prompt_len,), generator=g).tolist() for _ in range(rows)]
    ways = {"shipped": {}, "no_prepack": {"NANOSEEK_PREPACK": "0"}, "no_bf16_dot": {"NANOSEEK_BF16_DOT": "0"}}

    def warmed(env):
        for k in ("NANOSEEK_PREPACK", "NANOSEEK_BF16_DOT"):
            os.environ.pop(k, None)
        os.environ.update(env)
        engine = Engine(model, tok, kv_cache_gib=1.0, enable_prefix_caching=False)
        for p in prompts:
            engine.add_request(p, nanoseek.SamplingParams(temperature=0, max_tokens=warm + steps + 1, ignore_eos=True))
        for _ in range(warm):
            engine.step()
        return engine

    res = {f"{w}_ms": [] for w in ways}
    try:
        for _ in range(rounds):
            for w, env in ways.items():
                engine = warmed(env)
                times = []
                for _ in range(steps):
                    t = time.perf_counter()
                    engine.step()
                    times.append(time.perf_counter() - t)
                res[f"{w}_ms"].append(round(median(times) * 1e3, 2))
        engine = warmed({})
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                engine.step()
        mm = sum(e.self_cpu_time_total for e in prof.key_averages()
                 if e.key in ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm"))
        res["matmul_ms"] = round(mm / steps / 1e3, 2)
    finally:
        for k in ("NANOSEEK_PREPACK", "NANOSEEK_BF16_DOT"):
            os.environ.pop(k, None)
    return res


def prefill_one(threads, prompt_keys, steps=4):
    """In this process: `steps` 32 x 128-token prefill steps after one warm-up; prints JSON.
    prompt_keys: flat_decode.NATIVE_PROMPT_KEYS for this process (0: the modules run prompts)."""
    import json
    import resource
    from nanoseek.engine import Engine, flat_decode
    torch.set_num_threads(threads)
    if prompt_keys is not None:
        flat_decode.NATIVE_PROMPT_KEYS = prompt_keys
    model, tok = nanoseek.load(smollm2_path(), "bf16")
    engine = Engine(model, tok, kv_cache_gib=1.0, enable_prefix_caching=False)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, 40000, (128,), generator=g).tolist() for _ in range(32)]
    times, faults = [], []
    for i in range(steps + 1):
        for p in prompts:
            engine.add_request(p, nanoseek.SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        f0, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        engine.step()
        if i:
            times.append(time.perf_counter() - t)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        while engine.has_unfinished():
            engine.step()
    print(json.dumps({"ms": round(median(times) * 1e3, 1), "faults": int(median(faults))}))


PREFILL_WAYS = {"shipped": ("1", []), "glibc_heap": ("0", []), "modules": ("1", ["--prompt-keys", "0"])}


def prefill_ways(threads, rounds=3):
    """prefill_one as shipped, with glibc's default heap thresholds, and with prompts left to the
    modules; rounds interleaved, a fresh process each."""
    import json
    import os
    import subprocess
    res = {f"{w}_{k}": [] for w in PREFILL_WAYS for k in ("ms", "faults")}
    for _ in range(rounds):
        for way, (keep_heap, extra) in PREFILL_WAYS.items():
            out = subprocess.run([sys.executable, __file__, "--only", "_prefill_one", "--threads", str(threads), *extra],
                                 env=dict(os.environ, NANOSEEK_KEEP_HEAP=keep_heap), capture_output=True, text=True,
                                 check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            res[f"{way}_ms"].append(r["ms"])
            res[f"{way}_faults"].append(r["faults"])
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="int4", help="for the flat-loop A/B")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--only", choices=["batch", "prefill", "_prefill_one"],
                    help="batch: only the 32-row bf16 step (decode_batch_<threads>t.json); prefill: only the "
                         "32 x 128 prefill step, as shipped / glibc's heap thresholds / prompts by the modules "
                         "(prefill_step_<threads>t.json)")
    ap.add_argument("--prompt-keys", type=int, help=argparse.SUPPRESS)  # _prefill_one's NATIVE_PROMPT_KEYS
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.only == "_prefill_one":
        return prefill_one(args.threads, args.prompt_keys)
    if args.only == "prefill":
        r = prefill_ways(args.threads)
        line = "32 x 128-token bf16 prefill step (medians of rounds): " + ", ".join(
            f"{w} {median(r[w + '_ms'])} ms ({r[w + '_ms']}, faults {r[w + '_faults']})" for w in PREFILL_WAYS)
        write_results(Path(args.out), f"prefill_step_{args.threads}t", dict(machine=machine(), prefill=r), line)
        return
    b = batch_step()
    batch_line = (f"32-row bf16 decode step (medians of rounds): shipped {median(b['shipped_ms'])} ms "
                  f"({b['shipped_ms']}), without prepacked weights {median(b['no_prepack_ms'])} ms ({b['no_prepack_ms']}), "
                  f"without the AVX512-BF16 attention {median(b['no_bf16_dot_ms'])} ms ({b['no_bf16_dot_ms']}); "
                  f"its matmuls {b['matmul_ms']} ms")
    if args.only == "batch":
        write_results(Path(args.out), f"decode_batch_{args.threads}t", dict(machine=machine(), batch_step=b), batch_line)
        return
    res = dict(machine=machine(), kernels_3072x576_us=kernels_by_rows(), streamed_30_layers=streamed_layers(),
               flat_vs_modules=dict(precision=args.precision, **flat_vs_modules(args.precision)), batch_step=b)
    k, st, fm = res["kernels_3072x576_us"], res["streamed_30_layers"], res["flat_vs_modules"]
    lines = ["| rows M | int4 kernel µs | dequantise + bf16 GEMM µs | bf16 weights µs |", "|---|---|---|---|"]
    lines += [f"| {r['M']} | {r['int4_kernel']:.0f} | {r['dequantise_gemm']:.0f} | {r['bf16']:.0f} |" for r in k]
    lines += ["", f"30 layers streamed, one row: int8 {st['int8_ms']:.2f} ms, int4 {st['int4_ms']:.2f} ms",
              f"decode step ({args.precision}): native {fm['native_ms']} ms, flat {fm['flat_ms']} ms, "
              f"modules {fm['modules_ms']} ms, same tokens: {fm['same_tokens']}", batch_line]
    write_results(Path(args.out), f"decode_parts_{args.threads}t", res, "\n".join(lines))


if __name__ == "__main__":
    main()

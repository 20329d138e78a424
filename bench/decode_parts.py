"""Where a batch-1 decode token goes, in three measurements (SmolLM2-135M's shapes):

  1. the int4 kernel (at every M, beyond where Int4Linear uses it) against dequantise + bf16
     GEMM and plain bf16 weights, by rows M;
  2. all 30 layers' projections streamed from DRAM at one row: int8 kernel against int4 kernel;
  3. the engine's decode step with the compiled loop (engine/csrc/decode.cpp), the Python loop
     (engine/flat_decode.py) and the modules, interleaved in one process (same tokens checked).

    python bench/decode_parts.py [--threads 2] [--precision int4]

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
        FlatDecoder._native = real_native if way == "native" else (lambda self, x, cache: None)
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="int4", help="for the flat-loop A/B")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = dict(machine=machine(), kernels_3072x576_us=kernels_by_rows(), streamed_30_layers=streamed_layers(),
               flat_vs_modules=dict(precision=args.precision, **flat_vs_modules(args.precision)))
    k, st, fm = res["kernels_3072x576_us"], res["streamed_30_layers"], res["flat_vs_modules"]
    lines = ["| rows M | int4 kernel µs | dequantise + bf16 GEMM µs | bf16 weights µs |", "|---|---|---|---|"]
    lines += [f"| {r['M']} | {r['int4_kernel']:.0f} | {r['dequantise_gemm']:.0f} | {r['bf16']:.0f} |" for r in k]
    lines += ["", f"30 layers streamed, one row: int8 {st['int8_ms']:.2f} ms, int4 {st['int4_ms']:.2f} ms",
              f"decode step ({args.precision}): native {fm['native_ms']} ms, flat {fm['flat_ms']} ms, "
              f"modules {fm['modules_ms']} ms, same tokens: {fm['same_tokens']}"]
    write_results(Path(args.out), f"decode_parts_{args.threads}t", res, "\n".join(lines))


if __name__ == "__main__":
    main()

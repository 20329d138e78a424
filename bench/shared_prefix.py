"""Decode with a shared prompt prefix (few-shot headers, system prompts, n > 1 samples): the
engine's cascade path attends the shared blocks once for all sequences; without it every
sequence gathers its own copy of them each step.

    python bench/shared_prefix.py [--seqs 32] [--prefix 800] [--tail 60] [--threads 2]

SmolLM2-135M-Instruct bf16; the prefix is computed once (prefix cache), then `--seqs` requests
prefix + own tail decode 40 tokens each. Reports ms per decode step, cascade on vs off, median
of interleaved rounds. Writes bench/results/shared_prefix.{json,md}.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, smollm2_path, write_results  # noqa: E402

import nanoseek  # noqa: E402
import nanoseek.engine.paged_attention as paged  # noqa: E402
from nanoseek.engine import Engine  # noqa: E402


def decode_step_ms(model, tok, prefix, tails, cascade: bool, new_tokens: int = 40) -> float:
    paged.CASCADE_MIN = 256 if cascade else 10**9
    eng = Engine(model, tok, kv_cache_gib=1.0)
    eng.add_request(prefix, nanoseek.SamplingParams(temperature=0, max_tokens=1))
    while eng.has_unfinished():
        eng.step()
    for t in tails:
        eng.add_request(prefix + t, nanoseek.SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    eng.step()  # the tails' prefill (the prefix blocks are cache hits)
    eng.step()
    t0, steps = time.perf_counter(), 0
    while eng.has_unfinished():
        eng.step()
        steps += 1
    return (time.perf_counter() - t0) / steps * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--prefix", type=int, default=800)
    ap.add_argument("--tail", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = nanoseek.load(smollm2_path(), "bf16")
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(100, 40000, (args.prefix,), generator=g).tolist()
    tails = [torch.randint(100, 40000, (args.tail,), generator=g).tolist() for _ in range(args.seqs)]
    runs = {"cascade": [], "per-sequence gather": []}
    for _ in range(args.repeats):
        runs["cascade"].append(decode_step_ms(model, tok, prefix, tails, True))
        runs["per-sequence gather"].append(decode_step_ms(model, tok, prefix, tails, False))
    on, off = median(runs["cascade"]), median(runs["per-sequence gather"])
    res = {"machine": machine(), "seqs": args.seqs, "prefix_tokens": args.prefix, "tail_tokens": args.tail,
           "decode_step_ms": {"cascade": round(on, 1), "per-sequence gather": round(off, 1)},
           "runs_ms": {k: [round(x, 1) for x in v] for k, v in runs.items()}, "speedup": round(off / on, 2)}
    table = "\n".join([
        "| decode step, ms | cascade (shared prefix once) | per-sequence gather | speedup |", "|---|---|---|---|",
        f"| {args.seqs} sequences, {args.prefix}-token shared prefix + {args.tail}-token tails | {on:.1f} | {off:.1f} | "
        f"{off / on:.2f}x |"])
    write_results(Path(args.out), "shared_prefix", res, table)


if __name__ == "__main__":
    main()

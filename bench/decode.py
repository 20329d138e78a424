"""Batch-1 decode and prefill speed, nanoseek vs transformers, same SmolLM2 weights, one run.

    python bench/decode.py [--precisions fp32,bf16] [--decode-tokens 64] [--prefill 512,2048]

Both systems load the same GGUF (dequantised to the precision), measurements interleave
(nanoseek, transformers, nanoseek, ...) and report medians, so machine noise hits both.
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bar_png, machine, median, smollm2_path, timed, write_results  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def nanoseek_runner(path, precision):
    import nanoseek
    from nanoseek.engine import Engine
    model, tok = nanoseek.load(path, precision)
    engine = Engine(model, tok, kv_cache_gib=0.5, enable_prefix_caching=False)

    def decode(prompt, n):
        """Seconds per generated token after the first (the first includes prefill)."""
        import time
        engine.add_request(prompt, nanoseek.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        t_first = None
        while engine.has_unfinished():
            engine.step()
            if t_first is None:
                t_first = time.perf_counter()
        return (time.perf_counter() - t_first) / (n - 1)

    def run_to_end(prompt, sp):
        engine.add_request(prompt, sp)
        while engine.has_unfinished():
            engine.step()

    def prefill(prompt):
        return timed(lambda: run_to_end(prompt, nanoseek.SamplingParams(temperature=0, max_tokens=1)))

    return decode, prefill


def transformers_runner(path, precision):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=DTYPES[precision]).eval()
    model.generation_config.eos_token_id = None

    @torch.inference_mode()
    def gen(prompt, n):
        x = torch.tensor([prompt])
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def decode(prompt, n):
        return (timed(lambda: gen(prompt, n)) - timed(lambda: gen(prompt, 1))) / (n - 1)

    @torch.inference_mode()
    def prefill(prompt):
        return timed(lambda: model(torch.tensor([prompt]), logits_to_keep=1))

    return decode, prefill


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--prefill", default="512,2048")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (and llama.cpp threads)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = smollm2_path()
    g = torch.Generator().manual_seed(0)
    short = torch.randint(100, 40000, (32,), generator=g).tolist()
    longs = {L: torch.randint(100, 40000, (L,), generator=g).tolist() for L in map(int, args.prefill.split(","))}
    results = {"machine": machine(), "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)", "rows": []}
    for prec in args.precisions.split(","):
        systems = {"nanoseek": nanoseek_runner(path, prec), "transformers": transformers_runner(path, prec)}
        for decode, prefill in systems.values():  # warm-up: first calls build kernels
            decode(short, 4)
            prefill(longs[min(longs)])
        row = {"precision": prec}
        for metric in ["decode"] + [f"prefill_{L}" for L in longs]:
            samples = {name: [] for name in systems}
            for _ in range(args.repeats):
                for name, (decode, prefill) in systems.items():
                    if metric == "decode":
                        samples[name].append(1 / decode(short, args.decode_tokens))
                    else:
                        L = int(metric.split("_")[1])
                        samples[name].append(L / prefill(longs[L]))
            for name in systems:
                row[f"{name}_{metric}_tok_s"] = round(median(samples[name]), 1)
            row[f"ratio_{metric}"] = round(row[f"nanoseek_{metric}_tok_s"] / row[f"transformers_{metric}_tok_s"], 2)
        results["rows"].append(row)
        print(row, flush=True)
    metrics = ["decode"] + [f"prefill_{L}" for L in longs]
    lines = ["| precision | metric | nanoseek tok/s | transformers tok/s | ratio |", "|---|---|---|---|---|"]
    for r in results["rows"]:
        for m in metrics:
            lines.append(f"| {r['precision']} | {m} | {r[f'nanoseek_{m}_tok_s']} | {r[f'transformers_{m}_tok_s']} | {r[f'ratio_{m}']}x |")
    out = Path(args.out)
    write_results(out, "decode", results, "\n".join(lines))
    labels = [f"{r['precision']} {m}" for r in results["rows"] for m in metrics]
    bar_png(out / "decode.png", "SmolLM2-135M on this CPU: tokens/s", labels,
            {s: [r[f"{s}_{m}_tok_s"] for r in results["rows"] for m in metrics] for s in ("nanoseek", "transformers")},
            "tokens/s")


if __name__ == "__main__":
    main()

"""Training MFU of the speedrun model (moe-16x2) on this CPU, against the measured bf16 matmul peak.

For each thread count: measure the peak (best of a few 2048^3 bf16 matmuls) right before,
then train --steps steps (after --warmup untimed ones) on the speedrun's data and report
tokens/s and MFU = tokens/s * FLOPs/token / peak. Also the fp32 (no autocast) step for
comparison.

    python bench/train_mfu.py --steps 20 --threads 1 2 --out bench/results/train_mfu.json
"""

import argparse
import json
import statistics
from pathlib import Path

import torch

from nanoseek.train.config import load_config
from nanoseek.train.metrics import measure_peak_flops
from nanoseek.train.speedrun import KNOBS, build_data
from nanoseek.train.trainer import Trainer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="runs/bench_data")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="bench/results/train_mfu.json")
    args = ap.parse_args()
    data_dir = Path(args.data)
    if not (data_dir / "data" / "shards" / "index.json").is_file():
        build_data(data_dir, dict(KNOBS))
    d = data_dir / "data"
    rows = []
    for threads in args.threads:
        for bf16 in (True, False):
            torch.set_num_threads(threads)
            peak = measure_peak_flops(torch.bfloat16)
            peak_fp32 = measure_peak_flops(torch.float32)
            cfg = load_config(base={
                "run": {"out_dir": "runs/bench_mfu", "threads": threads, "progress": False, "plot": False,
                        "save_every": 10 ** 9, "bf16": bf16},
                "model": {"preset": "moe-16x2"},
                "data": {"shards": str(d / "shards"), "tokenizer": str(d / "tokenizer"), "seq_len": args.seq_len,
                         "batch_size": args.batch_size},
                "schedule": {"steps": 10 ** 6, "warmup_steps": 10, "decay": "none"},
                "eval": {"every": 0},
            })
            tr = Trainer(cfg, resume=False)
            for _ in range(args.warmup):
                tr.train_step()
            times = [tr.train_step()["step_time"] for _ in range(args.steps)]
            tokens = args.seq_len * args.batch_size
            tps = tokens / statistics.median(times)
            row = {"threads": threads, "autocast_bf16": bf16, "peak_bf16_flops": peak, "peak_fp32_flops": peak_fp32,
                   "flops_per_token": tr.flops_per_token, "median_step_s": statistics.median(times),
                   "tokens_per_s": tps, "achieved_flops": tps * tr.flops_per_token,
                   "mfu_vs_bf16_peak": tps * tr.flops_per_token / peak}
            print(json.dumps(row), flush=True)
            rows.append(row)
            tr.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": "moe-16x2", "seq_len": args.seq_len, "batch_size": args.batch_size,
                                          "rows": rows}, indent=2))
    print("| threads | autocast | bf16 peak GFLOP/s | tokens/s | achieved GFLOP/s | MFU |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threads']} | {'bf16' if r['autocast_bf16'] else 'fp32'} | {r['peak_bf16_flops'] / 1e9:.0f} "
              f"| {r['tokens_per_s']:.0f} | {r['achieved_flops'] / 1e9:.1f} | {100 * r['mfu_vs_bf16_peak']:.1f}% |")


if __name__ == "__main__":
    main()

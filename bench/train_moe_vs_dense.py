"""MoE vs dense, side by side in one run, at equal wall time.

Three models on the same data (the speedrun's pretraining corpus), same optimizer settings:
  moe           preset moe-16x2: 16 routed experts (top-2) + 1 shared, MLA
  dense-total   the same model with a dense SwiGLU FFN sized so the total params match the MoE
  dense-active  ... sized so its params match the MoE's *active* params per token

They train in round-robin time slices (each gets `--slice` seconds in turn until each has used
`--budget` seconds of training), so the shared machine's noise hits all three alike. Reported:
training tokens/s, MFU, and eval loss on the same held-out batches at the end.

    python bench/train_moe_vs_dense.py --budget 240 --slice 20 --out bench/results/train_moe_vs_dense.json
"""

import argparse
import json
import time
from pathlib import Path

import torch

from nanoseek.config import ModelConfig
from nanoseek.train.config import load_config
from nanoseek.train.speedrun import KNOBS, build_data
from nanoseek.train.trainer import Trainer


def dense_inter_dim(moe: ModelConfig, target: int) -> int:
    """inter_dim for an all-dense copy of `moe` whose num_params() is closest to target."""
    base = ModelConfig.from_dict({**moe.to_dict(), "n_routed_experts": 0, "n_shared_experts": 0, "inter_dim": 0})
    per_unit = ModelConfig.from_dict({**base.to_dict(), "inter_dim": 1}).num_params() - base.num_params()
    return max(1, round((target - base.num_params()) / per_unit))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="runs/bench_data", help="speedrun-style data dir (built if missing)")
    ap.add_argument("--budget", type=float, default=240, help="training seconds per model")
    ap.add_argument("--slice", type=float, default=20, help="seconds per turn")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/train_moe_vs_dense.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    data_dir = Path(args.data)
    if not (data_dir / "data" / "shards" / "index.json").is_file():
        build_data(data_dir, dict(KNOBS))
    d = data_dir / "data"
    moe = ModelConfig.preset("moe-16x2")
    variants = {
        "moe": {},
        "dense-total": {"n_routed_experts": 0, "n_shared_experts": 0, "inter_dim": dense_inter_dim(moe, moe.num_params())},
        "dense-active": {"n_routed_experts": 0, "n_shared_experts": 0,
                         "inter_dim": dense_inter_dim(moe, moe.num_params(active=True))},
    }
    trainers = {}
    for name, ov in variants.items():
        cfg = load_config(base={
            "run": {"out_dir": f"runs/bench_moe_vs_dense/{name}", "threads": args.threads, "progress": False,
                    "plot": False, "save_every": 10 ** 9},
            "model": {"preset": "moe-16x2", "overrides": ov},
            "data": {"shards": str(d / "shards"), "eval_shards": str(d / "eval_shards"), "tokenizer": str(d / "tokenizer"),
                     "seq_len": args.seq_len, "batch_size": args.batch_size},
            "schedule": {"steps": 10 ** 6, "warmup_steps": 10, "decay": "none"},
            "eval": {"every": 0, "batches": 8},
        })
        trainers[name] = Trainer(cfg, resume=False)
    used = {n: 0.0 for n in trainers}
    while min(used.values()) < args.budget:
        for name, tr in trainers.items():
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < args.slice and used[name] < args.budget:
                rec = tr.train_step()
                used[name] += rec["step_time"]
            print(f"{name:13s} step {tr.step:4d} loss {rec['loss']:.3f} train {used[name]:.0f}s", flush=True)
    results = {}
    for name, tr in trainers.items():
        c = tr.model.config
        results[name] = {
            "params": c.num_params(), "active_params": c.num_params(active=True),
            "flops_per_token": tr.flops_per_token, "steps": tr.step, "tokens": tr.tokens,
            "train_seconds": used[name], "tokens_per_s": tr.tokens / used[name],
            "mfu": tr.tokens / used[name] * tr.flops_per_token / tr.peak, "eval_loss": tr.eval_loss(),
            "overrides": variants[name],
        }
    out = {"budget_s": args.budget, "slice_s": args.slice, "seq_len": args.seq_len, "batch_size": args.batch_size,
           "threads": args.threads, "peak_flops": trainers["moe"].peak, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print("| model | params | active | tokens/s | MFU | steps | eval loss |\n|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['params'] / 1e6:.2f}M | {r['active_params'] / 1e6:.2f}M | {r['tokens_per_s']:.0f} "
              f"| {100 * r['mfu']:.1f}% | {r['steps']} | {r['eval_loss']:.3f} |")


if __name__ == "__main__":
    main()

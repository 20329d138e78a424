"""What a run reports: JSONL log, FLOPs and MFU against a measured peak, PNG curves.

MFU = achieved model FLOP/s / the matmul peak *measured on this machine* in the dtype the run
computes in (bf16 under autocast, else fp32; a big square matmul, best of a few runs, cached per
machine, thread count and dtype), not a datasheet number.
"""

import json
import os
import platform
import time
from pathlib import Path

import torch

from nanoseek.config import ModelConfig


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), nanochat's estimate.

    6 x the active matmul parameters (the embedding table is a lookup, not a matmul) plus
    attention scores and values: 6 * layers * heads * (d_qk + d_v) * seq_len (causal
    masking is not discounted, the convention PaLM and nanochat use).
    """
    matmul = cfg.num_params(active=True) - cfg.vocab_size * cfg.dim
    if cfg.attn_type == "mla":
        d_qk, d_v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        d_qk = d_v = cfg.head_dim
    return 6 * matmul + 6 * cfg.n_layers * cfg.n_heads * (d_qk + d_v) * seq_len


def _peak_cache() -> Path:
    return Path(os.environ.get("NANOSEEK_HOME", Path.home() / ".cache" / "nanoseek")) / "peak_flops.json"


def measure_peak_flops(dtype=torch.bfloat16, n: int = 2048, repeats: int = 10, device="cpu",
                       budget_s: float = 2.0) -> float:
    """Best FLOP/s of an n x n x n matmul over `repeats` timed runs (after a warmup). On a CPU, n is
    halved while one run would take over a tenth of `budget_s`, judged from a 512^3 probe: a CPU
    without fast bf16 does ~1 GFLOP/s, where 2048^3 would take ~17 s a run."""
    if device == "cpu":
        p = torch.randn(512, 512, dtype=dtype)
        p @ p
        t0 = time.perf_counter()
        p @ p
        rate = 2 * 512 ** 3 / max(time.perf_counter() - t0, 1e-9)
        while n > 256 and 2 * n ** 3 / rate > budget_s / 10:
            n //= 2
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def peak_flops(device="cpu", refresh: bool = False, bf16: bool = True) -> float:
    """The cached bf16 (or fp32) peak for this machine and thread count; measured on first use.

    On a shared machine a measurement can come out low (another process had the core);
    refresh=True measures again and keeps the higher of the two."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    key = f"{platform.node()}|{platform.processor() or platform.machine()}|{device}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    key += "" if bf16 else "|fp32"  # bf16 keys as before, so existing caches stay valid
    path = _peak_cache()
    cache = {}
    if path.is_file():
        try:
            cache = json.loads(path.read_text())
        except json.JSONDecodeError:
            cache = {}
    if key not in cache or refresh:
        cache[key] = max(cache.get(key, 0.0), measure_peak_flops(dtype, device=device))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=2))
        os.replace(tmp, path)
    return cache[key]


class JSONLLog:
    """Append-only JSONL; on resume, lines from steps after the checkpoint are dropped first
    (they were logged by the killed run and will be logged again)."""

    def __init__(self, path, resume_step: int | None = None, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", -1) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict):
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def read_log(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(log_path, png_path, title: str = ""):
    """Loss (train + eval), lr, grad norm, tokens/s + MFU, and expert-load imbalance per layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    if not train:
        return
    steps = [r["step"] for r in train]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    ax = axes[0, 0]
    ax.plot(steps, [r["loss"] for r in train], label="train", lw=0.8)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    ax.set_title("loss"), ax.set_xlabel("step"), ax.legend()
    axes[0, 1].plot(steps, [r["lr"] for r in train], label="AdamW")
    if "muon_lr" in train[0]:
        axes[0, 1].plot(steps, [r["muon_lr"] for r in train], label="Muon")
    axes[0, 1].set_yscale("log"), axes[0, 1].legend()
    axes[0, 1].set_title("learning rate"), axes[0, 1].set_xlabel("step")
    axes[0, 2].plot(steps, [r["grad_norm"] for r in train])
    axes[0, 2].set_title("grad norm (before clipping)"), axes[0, 2].set_xlabel("step")
    axes[1, 0].plot(steps, [r["tokens_per_s"] for r in train])
    axes[1, 0].set_title("tokens/s"), axes[1, 0].set_xlabel("step")
    axes[1, 1].plot(steps, [100 * r["mfu"] for r in train])
    axes[1, 1].set_title("MFU % (vs measured peak)"), axes[1, 1].set_xlabel("step")
    ax = axes[1, 2]
    if train[0].get("expert_load"):
        n_layers = len(train[0]["expert_load"])
        for layer in range(n_layers):
            ratio = [max(r["expert_load"][layer]) * len(r["expert_load"][layer]) for r in train]
            ax.plot(steps, ratio, label=f"router {layer}", lw=0.8)
        ax.axhline(1.0, color="k", lw=0.5)
        ax.legend(fontsize=7)
    ax.set_title("max expert load / mean (1 = balanced)"), ax.set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = Path(png_path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, png_path)

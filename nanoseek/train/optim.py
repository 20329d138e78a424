"""Optimizers and the learning-rate schedule.

As in nanochat: the 2-D weight matrices inside the transformer blocks (attention and MLP /
expert projections) are trained with Muon, everything else (embeddings, lm_head, norms, the
MoE routers, biases) with AdamW. Muon = SGD-momentum whose update is orthogonalised by a few
Newton-Schulz iterations, so every direction of a matrix moves at the same rate.
"""

import math

import torch

from nanoseek.train.config import TrainConfig


@torch.no_grad()
def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype=torch.bfloat16) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T (batched over leading dims), in `dtype` (bf16: fast;
    fp32 runs use fp32, so two runs whose gradients differ by rounding stay together).

    The quintic iteration of Keller Jordan's Muon: coefficients picked to push singular
    values towards 1 fast rather than exactly (they end up in ~[0.7, 1.2], which is fine).
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # iterate on the wide orientation: X X^T is the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = x @ x.mT
        B = b * A + c * A @ A
        x = a * x + B @ x
    if transposed:
        x = x.mT
    return x


class Muon(torch.optim.Optimizer):
    """Momentum (Nesterov) + Newton-Schulz orthogonalisation, for 2-D parameters only.

    Parameters of the same shape are orthogonalised together in one batched call (the 16
    experts of a layer are 48 matrices of 3 shapes): fewer, larger matmuls.
    The step is scaled by sqrt(max(1, rows/cols)) so tall and wide matrices move alike.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 ns_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            by_shape = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                by_shape.setdefault(tuple(p.shape), []).append(p)
            for shape, params in by_shape.items():
                grads = []
                for p in params:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p.grad)
                    buf = state["momentum_buffer"]
                    buf.lerp_(p.grad, 1 - group["momentum"])
                    grads.append(p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf)
                update = newton_schulz(torch.stack([_full(g) for g in grads]), group["ns_steps"], dtype=self.ns_dtype)
                scale = max(1.0, shape[0] / shape[1]) ** 0.5
                for p, u in zip(params, update):
                    p.add_(_like(u, p).to(p.dtype), alpha=-group["lr"] * scale)


def _full(t: torch.Tensor) -> torch.Tensor:
    """FSDP2 shards parameters as DTensors: orthogonalise the whole matrix, keep our shard."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(update: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(update, p.device_mesh, p.placements)
    return update


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """2-D matrices inside the blocks, except the routers (tiny, and their scores feed a top-k)."""
    return p.ndim == 2 and name.startswith("layers.") and ".gate.weight" not in name


def build_optimizers(model: torch.nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """[AdamW] or [AdamW, Muon] over the trainable parameters. Each group keeps its base lr in
    `initial_lr`, which the schedule multiplies."""
    o = cfg.optim
    names = [(n.removeprefix("module."), p) for n, p in model.named_parameters() if p.requires_grad]
    muon = [p for n, p in names if o.muon and is_muon_param(n, p)]
    muon_ids = {id(p) for p in muon}
    embed = [p for n, p in names if id(p) not in muon_ids and n.startswith("embed_tokens.")]
    rest = [p for n, p in names if id(p) not in muon_ids and not n.startswith("embed_tokens.")]
    groups = [g for g in (
        dict(params=embed, lr=o.embed_lr or o.lr),
        dict(params=rest, lr=o.lr),
    ) if g["params"]]
    opts = []
    if groups:
        opts.append(torch.optim.AdamW(groups, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay))
    if muon:
        opts.append(Muon(muon, lr=o.muon_lr, momentum=o.muon_momentum,
                         ns_dtype=torch.bfloat16 if cfg.run.bf16 else torch.float32))
    for opt in opts:
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]
    return opts


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, flat, then decay over the last decay_frac of the steps."""
    s = cfg.schedule
    if s.warmup_steps and step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    decay_steps = round(s.decay_frac * s.steps)
    if s.decay == "none" or decay_steps == 0:
        return 1.0
    start = s.steps - decay_steps
    if step < start:
        return 1.0
    progress = min(1.0, (step - start + 1) / decay_steps)
    shape = 1 - progress if s.decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return s.min_lr_frac + (1 - s.min_lr_frac) * shape


def set_lr(opts: list[torch.optim.Optimizer], mult: float):
    for opt in opts:
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * mult

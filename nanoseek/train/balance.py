"""MoE load balancing during training (DeepSeek-V3, section 2.1.2).

1. Aux-loss-free: each router has a bias added to its scores for expert *selection* only.
   After every optimizer step, bias_i += u * sign(mean_load - load_i): overloaded experts get
   picked a little less, underloaded ones a little more. No gradient, no interference with
   the language-modelling loss.
2. Sequence-wise auxiliary loss (weight alpha, tiny): per sequence,
       f_i = N_r / (K_r T) * #{t : expert i in top-K of token t}
       P_i = 1/T * sum_t s'_{i,t},   s' = scores normalised over the experts
       L   = alpha * sum_i f_i P_i
   which is minimised when the routing is uniform within each sequence.
"""

import torch
import torch.distributed as dist

from nanoseek.model.moe import Gate


def gates(model: torch.nn.Module) -> list[Gate]:
    return [m for m in model.modules() if isinstance(m, Gate)]


class LoadTracker:
    """Sums each router's token counts over the micro-batches of one optimizer step."""

    def __init__(self, model):
        self.gates = gates(model)
        self.reset()

    def reset(self):
        self.total = [None] * len(self.gates)

    def add(self):
        for i, g in enumerate(self.gates):
            load = g.last_load.detach().float()
            self.total[i] = load if self.total[i] is None else self.total[i] + load

    def loads(self) -> list[torch.Tensor]:
        """Per-layer loads over the whole global batch (summed across processes)."""
        out = [t if t is not None else torch.zeros(g.weight.shape[0]) for t, g in zip(self.total, self.gates)]
        if dist.is_initialized() and out:
            flat = torch.stack(out)
            dist.all_reduce(flat)
            out = list(flat)
        return out


@torch.no_grad()
def update_bias(tracker: LoadTracker, speed: float) -> list[list[float]]:
    """Apply the aux-loss-free update; returns the loads as fractions of tokens (for the log)."""
    fractions = []
    for g, load in zip(tracker.gates, tracker.loads()):
        if g.e_score_correction_bias is not None and speed > 0:
            g.e_score_correction_bias.add_(speed * torch.sign(load.mean() - load).to(g.e_score_correction_bias))
        fractions.append((load / load.sum().clamp(min=1)).tolist())
    return fractions


def sequence_aux_loss(model, batch_size: int, seq_len: int, alpha: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """alpha * sum over layers of the sequence-wise balance loss (mean over sequences).

    mask [B, T] (True = a real token) leaves padding out of f and P: a padded SFT row is
    balanced over its own tokens, whatever width the batch was padded to.
    """
    if mask is None:
        mask = torch.ones(batch_size, seq_len, dtype=torch.bool)
    m = mask.to(torch.float32, copy=False).unsqueeze(-1)                                   # [B, T, 1]
    n = m.sum(1).clamp(min=1)                                                  # real tokens per row
    total = 0.0
    for g in gates(model):
        scores, idx = g.last_scores, g.last_idx  # [B*T, E] (with grad), [B*T, K]
        E, K = scores.shape[-1], idx.shape[-1]
        scores = scores.view(batch_size, seq_len, E)
        m = m.to(scores.device)
        picked = torch.zeros_like(scores).scatter_(2, idx.view(batch_size, seq_len, K), 1.0)
        f = (picked * m).sum(1) * E / (K * n)                                      # [B, E]
        p = (scores / scores.sum(-1, keepdim=True).clamp(min=1e-20) * m).sum(1) / n  # [B, E]
        total = total + (f * p).sum(-1).mean()
    return alpha * total


def keep_scores(model, on: bool):
    """Ask the routers to keep their scores (for the sequence-wise loss) or drop them."""
    for g in gates(model):
        g.keep_scores = on
        if not on:
            g.last_scores = g.last_idx = None

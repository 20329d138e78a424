"""Mixture-of-Experts FFN (DeepSeek-V3 style): a router, routed experts, shared experts."""

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.layers import MLP


class Gate(nn.Module):
    """Router: picks n_activated_experts experts per token and their mixing weights.

    scores = softmax or sigmoid(W x). Selection may add the aux-loss-free balancing bias
    (DeepSeek-V3: nudged up for underloaded experts during training, never part of the
    weights) and may be group-limited: experts are split into n_group groups, only the
    topk_group best groups are eligible. Weights are the unbiased scores of the chosen
    experts, optionally renormalised, times route_scale.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.topk, self.n_group, self.topk_group = cfg.n_activated_experts, cfg.n_group, cfg.topk_group
        self.score_func, self.route_scale, self.norm_topk = cfg.score_func, cfg.route_scale, cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        # fp32 always: the bias update is tiny and must not be rounded away
        self.e_score_correction_bias = nn.Buffer(torch.zeros(cfg.n_routed_experts)) if cfg.moe_bias else None
        self.last_load = None  # [n_experts] token counts of the last forward (balancing, tracing)
        # training's sequence-wise balance loss needs the scores (with grad) and the picks
        self.keep_scores, self.last_scores, self.last_idx = False, None, None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.n_group > 1:
            grouped = choice.view(x.shape[0], self.n_group, -1)
            group_scores = grouped.amax(-1) if self.e_score_correction_bias is None else grouped.topk(2, -1)[0].sum(-1)
            keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(self.topk_group, -1)[1], 1.0)
            choice = choice.masked_fill(~keep.bool().repeat_interleave(grouped.shape[-1], 1), float("-inf"))
        idx = choice.topk(self.topk, -1)[1]
        weights = scores.gather(1, idx)
        if self.norm_topk:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        if self.keep_scores:
            self.last_scores, self.last_idx = scores, idx
        return weights * self.route_scale, idx


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(MLP(cfg.dim, cfg.moe_inter_dim) for _ in range(cfg.n_routed_experts))
        self.shared_experts = MLP(cfg.dim, cfg.moe_inter_dim * cfg.n_shared_experts) if cfg.n_shared_experts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, idx = self.gate(x)
        # Group (token, slot) pairs by expert with one sort, then run each expert once over
        # exactly the tokens routed to it: work is proportional to active, not total, experts.
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts)
        self.gate.last_load = counts
        token_of = order // idx.shape[1]
        w_sorted = weights.flatten()[order].unsqueeze(1).to(x.dtype)
        y = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            tok = token_of[start:start + n]
            y.index_add_(0, tok, self.experts[e](x[tok]) * w_sorted[start:start + n])
            start += n
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)

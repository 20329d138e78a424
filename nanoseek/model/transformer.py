"""The nanoseek decoder: embeddings -> N x (attention + FFN/MoE, pre-norm residual) -> logits.

Module names follow the Hugging Face checkpoints (`layers.3.self_attn.q_proj`, ...) so a
state dict maps to a checkpoint by adding the `model.` prefix, nothing more.
"""

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.attention import GQA, MLA
from nanoseek.model.layers import MLP, RMSNorm, RotaryEmbedding
from nanoseek.model.moe import MoE


# Tokens through the feed-forward half at a time at inference on a CPU (a dense MLP's rows are
# independent): a long prefill's [T, inter_dim] gate/up temporaries would otherwise be fresh
# allocations in every layer, and their page faults and cache misses cost more than the silu and
# product on them (SmolLM2's MLP at 32K tokens, one thread: 1.41 s in one piece, 1.14 s in
# slices of 2048; bitwise the same output).
FFN_ROWS = 2048


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.self_attn = MLA(cfg, layer_id) if cfg.attn_type == "mla" else GQA(cfg, layer_id)
        self.mlp = MoE(cfg) if cfg.layer_is_moe(layer_id) else MLP(cfg.dim, cfg.inter_dim)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        D = x.shape[-1]
        if (x.numel() <= FFN_ROWS * D or torch.is_grad_enabled() or not isinstance(self.mlp, MLP)
                or not x.is_contiguous() or x.device.type != "cpu"):
            return x + self.mlp(self.post_attention_layernorm(x))
        rows = x.view(-1, D)  # x is this call's own tensor: the residual is added in place
        for a in range(0, rows.shape[0], FFN_ROWS):
            rows[a:a + FFN_ROWS] += self.mlp(self.post_attention_layernorm(rows[a:a + FFN_ROWS]))
        return x


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """input_ids [B,T] -> final-norm hidden states [B,T,dim].

        positions [B,T] default to 0..T-1; a cache context (which stores the new keys/values
        and attends over the cached prefix too) needs them given.
        """
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required with a cache")
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, cache)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states -> fp32 logits (sampling and losses want fp32 whatever the weights)."""
        return self.lm_head(h).float()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """input_ids [B,T] -> logits [B,T,vocab] (fp32)."""
        return self.logits(self.hidden_states(input_ids, positions, cache))

    def init_weights(self, std: float = 0.02, seed: int | None = None):
        """Random init for training from scratch (normal(0, std) matrices, unit norms, zero biases)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        for m in self.modules():
            if getattr(m, "e_score_correction_bias", None) is not None:
                m.e_score_correction_bias.zero_()
        return self

    def num_params(self) -> int:
        """Weights in elements, quantized or not: a quantized module (quant/layers.py) keeps its
        weight as a packed `qweight` buffer, counted as its logical out x in (scales are not
        parameters); a table the head shares with the embedding counts once."""
        n = sum(p.numel() for p in self.parameters())
        seen = set()
        for m in self.modules():
            q = getattr(m, "qweight", None)
            if isinstance(q, torch.Tensor) and q.data_ptr() not in seen:
                seen.add(q.data_ptr())
                n += m.out_features * m.in_features if hasattr(m, "in_features") else m.num_embeddings * m.embedding_dim
        return n

    def save(self, path, tokenizer=None):
        """Write an HF-compatible checkpoint (config.json + model.safetensors), atomically."""
        from nanoseek.checkpoint.hf import save_hf
        save_hf(self, path, tokenizer)

"""Attention: grouped-query (Llama, Qwen2) and DeepSeek's multi-head latent attention (MLA).

Both modules compute q/k/v and then either
  - run plain causal attention over the given tokens (no cache: training, scoring), or
  - hand q/k/v to a cache context, whose `attend` stores the new keys/values and attends
    over everything the sequence has cached (generation; see nanoseek/model/kv_cache.py and
    the engine's paged cache). The context protocol is:

        ctx.attend(layer: int, q [B,T,H,Dk], k [B,T,Hkv,Dk], v [B,T,Hkv,Dv] | None,
                   scale: float, v_dim: int) -> [B,T,H,Dv]

    v=None means "the values are the first v_dim channels of the keys" (MLA's latent),
    so a cache stores that tensor once.

    A layer with a DSA lightning indexer (cfg.index_n_heads > 0, see nanoseek/model/indexer.py)
    passes one more argument, index=IndexerOutput: the cache stores index.k beside the keys and
    attends over the top-k selected keys only. Layers without one call attend exactly as above.
"""

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.indexer import Indexer, fit_indexer
from nanoseek.model.layers import RMSNorm, apply_rope, softmax_scale
from nanoseek.model.sparse_attention import sparse_causal_attention


def causal_attention(q, k, v, scale):
    """q [B,T,H,Dk], k [B,T,Hkv,Dk], v [B,T,Hkv,Dv] -> [B,T,H,Dv], causal over T."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)


class GQA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.interleaved = cfg.rope_interleave
        self.scale = softmax_scale(cfg, cfg.head_dim)
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        self.indexer = Indexer(cfg, layer_id) if cfg.layer_has_indexer(layer_id) else None
        self.packed = None  # q/k/v as one matmul, set for inference by nanoseek/model/packing.py

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        if self.packed is not None and self.packed.valid((self.q_proj, self.k_proj, self.v_proj)):
            qkv = self.packed(x).view(B, T, H + 2 * Hkv, D)
            qk = apply_rope(qkv[:, :, :H + Hkv], cos, sin, self.interleaved)  # q and k heads in one go
            q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + Hkv:]
        else:
            q = self.q_proj(x).view(B, T, H, D)
            k = self.k_proj(x).view(B, T, Hkv, D)
            v = self.v_proj(x).view(B, T, Hkv, D)
            q, k = apply_rope(q, cos, sin, self.interleaved), apply_rope(k, cos, sin, self.interleaved)
        index = None if self.indexer is None else self.indexer(x, x, cos, sin)
        if cache is None and (index is None or not index.sparse_for(T)):
            out = causal_attention(q, k, v, self.scale)
            if index is not None and self.indexer.kl:  # dense warm-up: fit the indexer to it
                fit_indexer(index, q, k, self.scale)
        elif cache is None:
            out = sparse_causal_attention(q, k, v, self.scale, self.head_dim, index)
        elif index is None:
            out = cache.attend(self.layer_id, q, k, v, self.scale, self.head_dim)
        else:
            out = cache.attend(self.layer_id, q, k, v, self.scale, self.head_dim, index=index)
        return self.o_proj(out.reshape(B, T, -1))


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3).

    Keys and values of all heads are reconstructed from one small latent per token:
        c = norm(W_dkv x)          [kv_lora_rank]    (cached)
        k_pe = rope(W_kr x)        [qk_rope_head_dim] (cached, shared by all heads)
        k_h = [W_uk_h c ; k_pe],  v_h = W_uv_h c
    Without a cache we materialise k_h, v_h (cheapest for training). With a cache we use the
    absorbed form: q_h·k_h = (W_uk_h^T q_nope_h)·c + q_pe_h·k_pe, and out_h = W_uv_h (p·c),
    i.e. multi-query attention over the latent, so only c and k_pe are ever stored.
    """

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = cfg.n_heads
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        self.interleaved = cfg.rope_interleave
        self.scale = softmax_scale(cfg, self.qk_dim)
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(cfg.dim, self.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.n_heads * self.qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.dim, self.n_heads * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.dim, self.kv_lora_rank + self.rope_dim, bias=cfg.qkv_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, cfg.dim, bias=cfg.o_bias)
        self.indexer = Indexer(cfg, layer_id) if cfg.layer_has_indexer(layer_id) else None

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        qr = self.q_a_layernorm(self.q_a_proj(x)) if self.q_lora_rank else x
        q = self.q_b_proj(qr) if self.q_lora_rank else self.q_proj(x)
        q = q.view(B, T, self.n_heads, self.qk_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin, self.interleaved)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c = self.kv_a_layernorm(c)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin, self.interleaved)  # [B,T,1,rope]
        index = None if self.indexer is None else self.indexer(x, qr, cos, sin)
        dense = index is None or not index.sparse_for(T)
        # Without a cache: per-head keys and values. Block-sparse prefill uses them as well, since
        # a block of keys is read once for many queries and per-head K/V take ~4x fewer flops per
        # key than the absorbed form (DeepSeek also prefills in this MHA form).
        if cache is None and (dense or index.block > 1):
            kv = self.kv_b_proj(c).view(B, T, self.n_heads, self.nope_dim + self.v_dim)
            k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
            k = torch.cat([k_nope, k_pe.expand(-1, -1, self.n_heads, -1)], dim=-1)
            q = torch.cat([q_nope, q_pe], dim=-1)
            if dense:
                out = causal_attention(q, k, v, self.scale)
                if index is not None and self.indexer.kl:  # dense warm-up: fit the indexer to it
                    fit_indexer(index, q, k, self.scale)
            else:
                out = sparse_causal_attention(q, k, v, self.scale, self.v_dim, index)
        else:
            # the absorbed form: with a cache, and for token-level sparse attention (each query
            # gathers its own keys, so the small latent rows are the ones to gather)
            w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
            w_uk, w_uv = w[:, :self.nope_dim], w[:, self.nope_dim:]
            q_lat = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)
            latent = torch.cat([c.unsqueeze(2), k_pe], dim=-1)  # [B,T,1,r+rope]: the whole KV cache entry
            q_abs = torch.cat([q_lat, q_pe], dim=-1)
            if cache is None:
                o_lat = sparse_causal_attention(q_abs, latent, None, self.scale, self.kv_lora_rank, index)
            elif index is None:
                o_lat = cache.attend(self.layer_id, q_abs, latent, None, self.scale, self.kv_lora_rank)
            else:
                o_lat = cache.attend(self.layer_id, q_abs, latent, None, self.scale, self.kv_lora_rank, index=index)
            out = torch.einsum("bthr,hvr->bthv", o_lat, w_uv)
        return self.o_proj(out.reshape(B, T, -1))

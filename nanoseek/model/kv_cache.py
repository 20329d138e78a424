"""The simplest KV cache: contiguous buffers for a batch of sequences that advance together.

Used by `nanoseek.generate` and by tests as the reference for cached attention; the engine
has its own paged cache with the same `attend` protocol (see nanoseek/model/attention.py).
"""

import torch
import torch.nn.functional as F

from nanoseek.model.sparse_attention import attend_selected


class DenseKVCache:
    def __init__(self, n_layers: int, max_len: int):
        self.max_len = max_len
        self.k = [None] * n_layers
        self.v = [None] * n_layers
        self.ik = [None] * n_layers  # DSA indexer keys, for layers that have an indexer
        self.length = 0  # tokens cached so far (same for every sequence in the batch)

    def positions(self, batch: int, T: int, device=None) -> torch.Tensor:
        return torch.arange(self.length, self.length + T, device=device).expand(batch, T)

    def advance(self, T: int):
        """Call after each forward: the T tokens just written are now part of the prefix."""
        self.length += T

    def attend(self, layer, q, k, v, scale, v_dim, index=None):
        B, T = q.shape[:2]
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens, asked for {end}")
        if self.k[layer] is None:
            self.k[layer] = k.new_empty(B, self.max_len, *k.shape[2:])
            if v is not None:
                self.v[layer] = v.new_empty(B, self.max_len, *v.shape[2:])
        self.k[layer][:, start:end] = k
        if v is not None:
            self.v[layer][:, start:end] = v
        K = self.k[layer][:, :end]
        V = self.v[layer][:, :end] if v is not None else K[..., :v_dim]
        if index is not None:  # a DSA layer: store its indexer keys; attend over the top-k only
            if self.ik[layer] is None:
                self.ik[layer] = index.k.new_empty(B, self.max_len, index.k.shape[-1])
            self.ik[layer][:, start:end] = index.k
            if index.sparse_for(end):
                Vs = None if v is None else V
                return torch.stack([attend_selected(q[b], K[b], None if Vs is None else Vs[b], scale, v_dim,
                                                    index.q[b], index.w[b], self.ik[layer][b], start, index.topk,
                                                    index.block)
                                    for b in range(B)])
        if T == 1:  # decode: each KV head's query heads are its rows (SDPA's GQA path is slow, and
            #           it would expand MLA's one latent head to every query head)
            H, Hkv = q.shape[2], K.shape[2]
            out = F.scaled_dot_product_attention(q.view(B, Hkv, H // Hkv, q.shape[-1]), K.transpose(1, 2),
                                                 V.transpose(1, 2), scale=scale)
            return out.reshape(B, 1, H, -1)
        # query i sits at absolute position start+i and may see keys 0..start+i
        mask = None if T == 1 else torch.ones(T, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), K.transpose(1, 2), V.transpose(1, 2),
                                             attn_mask=mask, scale=scale, enable_gqa=K.shape[2] != q.shape[2])
        return out.transpose(1, 2)

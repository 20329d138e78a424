"""The paged KV cache tensors and the attention context the model calls during a step.

Storage per layer: k [num_blocks, block_size, Hkv, Dk] (+ v likewise). MLA stores one
latent "head" (kv_lora_rank + rope dims) and no v: its values are the latent's first
kv_lora_rank channels (see nanoseek/model/attention.py).

A step flattens all scheduled tokens into one row [1, N]. Decoding sequences (one new
token each) are attended in two batched matmuls over their gathered, padded blocks; prefill
chunks are attended one sequence at a time with a causal mask offset by what is cached.
"""

import torch
import torch.nn.functional as F

from nanoseek.config import ModelConfig
from nanoseek.model.sparse_attention import attend_rows, paged_sparse_attend


def kv_entry_shapes(cfg: ModelConfig) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    if cfg.attn_type == "mla":
        return (1, cfg.kv_lora_rank + cfg.qk_rope_head_dim), None
    return (cfg.n_kv_heads, cfg.head_dim), (cfg.n_kv_heads, cfg.head_dim)


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    k, v = kv_entry_shapes(cfg)
    per_layer = k[0] * k[1] + (v[0] * v[1] if v else 0)
    index = sum(cfg.index_head_dim for i in range(cfg.n_layers) if cfg.layer_has_indexer(i))
    return (per_layer * cfg.n_layers + index) * torch.finfo(dtype).bits // 8


# below this many decoding sequences SDPA's fused kernel (one call per step) beats two bmms
FEW_SEQS = 8
# a prefix all decoding sequences share is attended once for all of them from this many tokens
# (cascade attention, as vLLM's): below it, reading it per sequence costs less than the extra ops
CASCADE_MIN = 256


class PagedKVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device="cpu"):
        kshape, vshape = kv_entry_shapes(cfg)
        self.block_size = block_size
        self.k = [torch.zeros(num_blocks, block_size, *kshape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(num_blocks, block_size, *vshape, dtype=dtype, device=device) if vshape else None
                  for _ in range(cfg.n_layers)]
        # DSA layers also store the lightning indexer's key (index_head_dim numbers) per token
        self.ik = [torch.zeros(num_blocks, block_size, cfg.index_head_dim, dtype=dtype, device=device)
                   if cfg.layer_has_indexer(i) else None for i in range(cfg.n_layers)]


class PagedAttention:
    """Attention context for one engine step.

    seqs: one (block_table, num_cached, num_new) per scheduled sequence, in the order their
    tokens appear in the flattened batch.
    """

    def __init__(self, cache: PagedKVCache, seqs: list[tuple[list[int], int, int]]):
        self.cache = cache
        bs = cache.block_size
        slots, self.decode_rows, decode_tables, decode_lens, self.prefills = [], [], [], [], []
        row = 0
        self.max_len = max((cached + new for _, cached, new in seqs), default=0)
        self.shared = 0  # blocks every decoding sequence shares (set below where there are enough of them)
        for table, cached, new in seqs:
            for p in range(cached, cached + new):
                slots.append(table[p // bs] * bs + p % bs)
            if new == 1 and cached > 0:
                self.decode_rows.append(row)
                decode_tables.append(table)
                decode_lens.append(cached + 1)
            else:
                self.prefills.append((row, new, cached, torch.tensor(table)))
            row += new
        self.slots = torch.tensor(slots)
        if self.decode_rows:
            width = max(len(t) for t in decode_tables)
            self.decode_tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables])
            lens = self.decode_lens = torch.tensor(decode_lens)
            self.decode_valid = torch.arange(width * bs)[None, :] < lens[:, None]   # [B, L]: not padding
            self.decode_rows = torch.tensor(self.decode_rows)
            self.single_len = decode_lens[0] if len(decode_lens) == 1 else 0
            # blocks every decoding sequence shares at the start of its table (a common prompt
            # prefix, from the prefix cache), before the block its new token goes to
            shared, limit = 0, min((n - 1) // bs for n in decode_lens) if len(decode_tables) >= FEW_SEQS else 0
            while shared < limit and all(t[shared] == decode_tables[0][shared] for t in decode_tables):
                shared += 1
            self.shared = shared if shared * bs >= CASCADE_MIN else 0
            if self.shared:
                self.shared_blocks = self.decode_tables[0, :self.shared]
                self.decode_valid = self.decode_valid[:, self.shared * bs:]
            # index_select is much cheaper than [tables]
            self.decode_flat = self.decode_tables[:, self.shared:].flatten()
        self.all_decode = not self.prefills  # then decode rows are exactly 0..N-1: no gather/scatter of q/out
        self.seqs = seqs

    def row_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tables [N, W], lens [N]): for every row of the step, its sequence's block table and the
        number of keys it sees (its position + 1; the step's own earlier rows of a prompt included,
        since their keys are written before anyone attends). What the compiled loop attends by:
        for an all-decode step these are the decode tables and lengths."""
        if self.all_decode:
            return self.decode_tables, self.decode_lens
        width = max(len(t) for t, _, _ in self.seqs)
        tables = torch.tensor([t + [0] * (width - len(t)) for t, _, _ in self.seqs])
        counts = torch.tensor([new for _, _, new in self.seqs])
        starts = torch.tensor([cached for _, cached, _ in self.seqs])
        seq_of_row = torch.repeat_interleave(torch.arange(len(self.seqs)), counts)
        first_row = torch.cumsum(counts, 0) - counts  # each sequence's first row in the step
        lens = starts[seq_of_row] + torch.arange(len(seq_of_row)) - first_row[seq_of_row] + 1
        return tables.index_select(0, seq_of_row), lens

    def attend(self, layer, q, k, v, scale, v_dim, index=None):
        q, k = q[0], k[0]
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        kc.view(-1, *kc.shape[2:]).index_copy_(0, self.slots, k)
        if vc is not None:
            vc.view(-1, *vc.shape[2:]).index_copy_(0, self.slots, v[0])
        if index is not None:  # a DSA layer: store its indexer keys; attend over the top-k only
            ikc = self.cache.ik[layer]
            ikc.view(-1, ikc.shape[-1])[self.slots] = index.k[0]
            if index.sparse_for(self.max_len):
                return paged_sparse_attend(self, layer, q, scale, v_dim, index)
        out = None if self.all_decode else q.new_empty(q.shape[0], q.shape[1], v_dim)
        if len(self.decode_rows):
            B = len(self.decode_rows)
            Hkv = kc.shape[2]
            K = kc.index_select(0, self.decode_flat).view(B, -1, *kc.shape[2:])          # [B, L, Hkv, Dk]
            V = K[..., :v_dim] if vc is None else vc.index_select(0, self.decode_flat).view(B, -1, *vc.shape[2:])
            qd = q if self.all_decode else q[self.decode_rows]                           # [B, H, Dk]
            if B < FEW_SEQS:
                # the query heads of a group are the query rows of their one KV head: SDPA's
                # fused kernel, and no head expansion of the cache (the latent is MLA's one head).
                # One sequence needs no mask: its keys are cut to its length instead.
                mask = None if self.single_len else self.decode_valid[:, None, None, :]
                if self.single_len:
                    K, V = K[:, :self.single_len], V[:, :self.single_len]
                o = F.scaled_dot_product_attention(qd.view(B, Hkv, -1, qd.shape[-1]), K.transpose(1, 2),
                                                   V.transpose(1, 2), attn_mask=mask, scale=scale)  # [B, Hkv, G, Dv]
            else:
                # many sequences: SDPA with a mask runs its math path per sequence (10x slower at
                # 32); two bmms over each sequence's rows of [Hkv * D] serve them all at once
                Kf = K.flatten(2)
                shared = None
                if self.shared:  # the shared prefix once for all sequences, not once per sequence
                    Ks = kc.index_select(0, self.shared_blocks).flatten(0, 1)                 # [Ls, Hkv, Dk]
                    shared = (Ks, None if vc is None else vc.index_select(0, self.shared_blocks).flatten(0, 1))
                o = attend_rows(qd, Kf, Kf if vc is None else V.flatten(2), self.decode_valid, scale, v_dim, Hkv,
                                shared=shared)
            if self.all_decode:
                return o.view(1, B, q.shape[1], v_dim)
            out[self.decode_rows] = o.view(B, q.shape[1], v_dim)
        whole = {}  # prompts with nothing cached, by length: their keys are this step's own rows
        for row, new, cached, table in self.prefills:
            if cached == 0 and new > 1:
                whole.setdefault(new, []).append(row)
                continue
            total = cached + new
            K = kc[table].flatten(0, 1)[:total]                 # [L, Hkv, Dk]
            V = vc[table].flatten(0, 1)[:total] if vc is not None else K[..., :v_dim]
            # a whole prompt is plain causal attention: no mask lets SDPA use its fused (flash)
            # CPU kernel instead of materialising [H, T, T] scores; a later chunk needs the offset
            mask = None if cached == 0 else torch.ones(new, total, dtype=torch.bool).tril(diagonal=cached)
            # 4-D inputs: with 3-D ones SDPA silently takes its slow math path (8x slower here)
            o = F.scaled_dot_product_attention(q[row:row + new].transpose(0, 1)[None], K.transpose(0, 1)[None],
                                               V.transpose(0, 1)[None], attn_mask=mask, is_causal=cached == 0,
                                               scale=scale, enable_gqa=kc.shape[2] != q.shape[1])
            out[row:row + new] = o[0].transpose(0, 1)
        for new, rows in whole.items():
            # one causal SDPA call for all prompts of a length (its flash kernel spreads the batch
            # over the threads; one call a prompt cost ~0.45 ms each at 128 tokens)
            Q, K = (torch.stack([t[r:r + new] for r in rows]).transpose(1, 2) for t in (q, k))  # [B, H, T, D]
            V = K[..., :v_dim] if vc is None else torch.stack([v[0, r:r + new] for r in rows]).transpose(1, 2)
            o = F.scaled_dot_product_attention(Q, K, V, is_causal=True, scale=scale, enable_gqa=K.shape[1] != Q.shape[1])
            for i, r in enumerate(rows):
                out[r:r + new] = o[i].transpose(0, 1)
        return out.unsqueeze(0)

"""DeepSeek Sparse Attention (DSA, DeepSeek-V3.2-Exp): the lightning indexer and top-k selection.

For every query t the indexer scores each earlier key s with a few small heads,

    I(t, s) = sum_h w_h(t) * ReLU(q_h(t) . k(s))

(q_h: H_I heads of dim D_I from the query token, k: one D_I key per token shared by every
head, w_h: one weight per head from the query token), and the main attention then runs over
the k = index_topk keys with the highest I(t, s) only (nanoseek/model/sparse_attention.py).
Choices, following DeepSeek-V3.2's inference code unless said otherwise:
  - causal: keys after t are never candidates; key t itself always is (its score is +inf);
    a query with at most index_topk visible keys selects them all, i.e. dense attention.
  - q comes from the q-LoRA latent when the model has one (DeepSeek MLA), else from the
    attention input x; k = LayerNorm(W_k x); w = W_w x / sqrt(H_I * D_I).
  - RoPE (half-split, not interleaved, as DSA) on the first rope_dim dims of q and k,
    rope_dim = min(the model's rotary dim, D_I / 2). When that is smaller than the model's
    rotary dim we take every n-th frequency of the model's table, so the indexer still
    sees the whole range of wavelengths.
  - No Hadamard rotation and no FP8: DSA rotates only to make FP8 quantisation safe; we
    score in the model's dtype (bf16 for bf16 models), with fp32 accumulation in matmuls.
  - The indexer's inputs are detached: it learns only from its own KL loss (see
    fit_indexer and nanoseek/train/sparse_stages.py), the main model only from its LM loss.

Block selection (index_block_size b > 1; our addition, in the spirit of MoBA and NSA's
selection branch). The keys are cut into blocks of b consecutive positions and the indexer
scores a block by the mean of its keys, I(t, j) = sum_h w_h * ReLU(q_h(t) . mean_{s in j} k(s)).
Each query keeps its own block (causally masked inside), the one before it and the first one
(KEPT_BLOCKS), and the indexer picks the top k/b - 3 of the other earlier blocks.
Why: on a CPU the token-level form costs more than it saves. Its n x n scores, the top-k over
them and k separate key rows gathered per query outweigh dense flash attention up to 64K. With
blocks, the scores are n x n/b, and each chosen block is read once, contiguous, for all the
queries that chose it (sparse_attention.attend_blocks). The choice is still made per query: a
query's output never depends on later tokens, and chunked prefill and decode select exactly
what one-shot prefill does.

Per-group selection (index_groups g > 1, GQA with blocks; NSA selects per KV group the same
way). One choice for all heads must cover every head's needs with the same few blocks; with
groups, the KV heads are cut into g groups (with their query heads), and each group scores the
blocks with its own head weights, I_g(t, j) = sum_h w_gh(t) * ReLU(q_h(t) . mean k(j)), and
attends over its own top blocks. q_h and the keys are shared: only W_w grows (g * H_I outputs).
Each group's KL target is the attention of its own heads. With a perfect selection (the true
attention mass, bench/sparse_attention.py oracle) at 512 keys, per-group choice takes SmolLM2's
4K perplexity cost from +4.1% to +3.0% (all layers sparse) and from +2.1% to +1.8% (five layers
dense); see docs/BENCHMARKS.md.
"""

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.errors import NanoseekError
from nanoseek.model.layers import apply_rope

# Queries scored at once. The indexer's own scores are n x n by design (that is DSA); chunking
# keeps them at chunk x n x H_I, a few MB even at 64K tokens.
QUERY_CHUNK = 64


@dataclass
class IndexerOutput:
    """What one layer's indexer computed for the tokens of this forward."""
    q: torch.Tensor        # [B, T, H_I, D_I]
    w: torch.Tensor        # [B, T, H_I], or [B, T, G, H_I] with index_groups G > 1
    k: torch.Tensor        # [B, T, D_I]   the keys a cache stores beside the main ones
    topk: int
    module: "Indexer"

    @property
    def block(self) -> int:
        return self.module.block

    @property
    def groups(self) -> int:
        return self.module.groups

    def sparse_for(self, n_keys: int) -> bool:
        """Does a query that sees n_keys keys attend sparsely? (False: plain dense attention.)"""
        return not self.module.dense and n_keys > self.topk


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.block = cfg.index_block_size
        self.groups = cfg.index_groups
        self.rope_dim = min(cfg.rope_dim, self.head_dim // 2)
        pairs, own = cfg.rope_dim // 2, self.rope_dim // 2
        if self.rope_dim < 2 or pairs % own:
            raise NanoseekError(f"model config field index_head_dim: {self.head_dim} gives a rope part of "
                                f"{self.rope_dim} dims, which must be even and divide the rotary dim {cfg.rope_dim}")
        self.rope_stride = pairs // own
        self.from_q_lora = cfg.attn_type == "mla" and cfg.q_lora_rank > 0
        if self.from_q_lora:  # DeepSeek-V3.2's name: it reads the same q latent as MLA's q_b_proj
            self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim)
        self.weights_proj = nn.Linear(cfg.dim, self.groups * self.n_heads, bias=False)
        self.weight_scale = (self.n_heads * self.head_dim) ** -0.5
        # Training switches, set by nanoseek/train/sparse_stages.py (inference never touches them):
        self.dense = False  # the main attention stays dense (the warm-up stage)
        self.kl = False     # fit the indexer to the main attention while the model runs forward
        self.last_kl = None  # that KL, averaged over query tokens, for logging
        self.kl_every = 1    # fit on every n-th chunk of queries only (the dense target is n x n)
        self.kl_calls = 0    # rotates which chunks those are

    def forward(self, x, qr, cos, sin) -> IndexerOutput:
        # cut from the main graph: the indexer learns only from its KL loss
        dtype = x.dtype  # scores are computed in the model's dtype; the weights may be fp32 for training
        wdt = self.wk.weight.dtype
        x, qr = x.detach().to(wdt), qr.detach().to(wdt)
        B, T, _ = x.shape
        with torch.enable_grad() if self.kl else nullcontext():
            q = (self.wq_b(qr) if self.from_q_lora else self.wq(x)).view(B, T, self.n_heads, self.head_dim)
            k = self.k_norm(self.wk(x))
            cos, sin = cos[..., ::self.rope_stride].to(wdt), sin[..., ::self.rope_stride].to(wdt)
            r = self.rope_dim
            q = torch.cat([apply_rope(q[..., :r], cos, sin, False), q[..., r:]], dim=-1)
            k = torch.cat([apply_rope(k[..., :r].unsqueeze(2), cos, sin, False).squeeze(2), k[..., r:]], dim=-1)
            w = self.weights_proj(x) * self.weight_scale
            if self.groups > 1:
                w = w.view(B, T, self.groups, self.n_heads)
            q, w, k = q.to(dtype), w.to(dtype), k.to(dtype)
        return IndexerOutput(q, w, k, self.topk, self)


def index_scores(q, w, K, bias=None):
    """q [C, H_I, D_I], w [C, H_I], K [L, D_I] -> I [C, L] = sum_h w_h * ReLU(q_h . K) (+ bias [L])."""
    C, H, D = q.shape
    s = (q.reshape(C * H, D) @ K.T).view(C, H, -1).relu_()
    if bias is None:
        return torch.bmm(w.unsqueeze(1), s).squeeze(1)
    return torch.baddbmm(bias.expand(C, 1, -1), w.unsqueeze(1), s).squeeze(1)


# Selection scores are computed a key tile at a time, so that the [C * H_I, tile] products stay
# in cache through the ReLU and the head sum; the head sum is one matmul against a
# block-diagonal matrix of the head weights (groups of HEAD_SUM_GROUP queries): a
# [1, H_I] x [H_I, tile] product per query would be a slow bf16 gemv.
KEY_TILE = 4096
HEAD_SUM_GROUP = 16


def selection_scores(q, w, K, bias, work=None):
    """index_scores(q, w, K, bias) -> [C, L], computed as described above (no autograd).
    w [C, G, H_I] (per-group selection) -> [C, G, L]: one row of scores per group, in `work`
    (a flat buffer of >= C * (H_I + G) * L elements) when given."""
    C, H, D = q.shape
    L = K.shape[0]
    if w.dim() == 3:  # block scores: L = n / b is short, no tiling needed
        G = w.shape[1]
        if work is None:
            s = (q.reshape(C * H, D) @ K.T).view(C, H, L).relu_()
            return torch.baddbmm(bias.expand(C, G, L), w, s)
        s = torch.mm(q.reshape(C * H, D), K.T, out=work[:C * H * L].view(C * H, L)).view(C, H, L).relu_()
        return torch.baddbmm(bias.expand(C, G, L), w, s, out=work[C * H * L:C * (H + G) * L].view(C, G, L))
    G = HEAD_SUM_GROUP if C % HEAD_SUM_GROUP == 0 else 1
    Wbd = q.new_zeros(C // G, G, G, H)  # Wbd[n, i, j, h] = w[n*G + i, h] if i == j
    Wbd.diagonal(dim1=1, dim2=2).copy_(w.view(C // G, G, H).transpose(1, 2))
    Wbd = Wbd.view(C // G, G, G * H)
    qf = q.reshape(C * H, D)
    out = q.new_empty(C, L)
    for a in range(0, L, KEY_TILE):
        b = min(a + KEY_TILE, L)
        s = (qf @ K[a:b].T).relu_().view(C // G, G * H, b - a)
        out[:, a:b] = torch.baddbmm(bias[a:b].expand(C // G, G, b - a), Wbd, s).view(C, b - a)
    return out


def recency_bias(L, dtype, device=None):
    """A tie-breaker far below the scores' resolution: ReLU makes exact-zero scores common,
    and topk would break those ties by where a key sits in the row, i.e. differently in a
    chunked prefill than in a one-shot one. With it, equal scores prefer the later key."""
    return torch.arange(L, device=device, dtype=torch.float32).mul_(2.0 ** -40).to(dtype)


def mask_causal_(scores, first_pos):
    """scores [C, first_pos + C] for queries at first_pos..: future keys -inf, own key +inf."""
    C = scores.shape[0]
    block = scores[:, first_pos:]
    block.masked_fill_(torch.ones(C, C, dtype=torch.bool, device=scores.device).triu(1), float("-inf"))
    block.diagonal().fill_(float("inf"))
    return scores


# Exact top-k in two steps once rows are long: torch.topk costs ~13 ns an element here (for
# k = 512), a block max ~1 ns. The k largest scores lie in the k blocks with the largest
# maxima (any other block's max is beaten by k distinct elements), so topk over the block
# maxima, then over those k blocks' elements, finds them with ~L/BLOCK + k*BLOCK topk work.
TOPK_BLOCK = 8


def topk_positions(s, k: int):
    """Positions of the k largest entries of each row of s [C, L], in no particular order."""
    C, L = s.shape
    b = TOPK_BLOCK
    if L < 2 * k * b:
        return s.topk(k, dim=-1, sorted=False).indices
    if L % b:  # complete the last block with -inf
        s = F.pad(s, (0, b - L % b), value=float("-inf"))
    block_max = F.max_pool1d(s.unsqueeze(1), b).squeeze(1)                          # [C, L/b]
    blocks = block_max.topk(k, dim=-1, sorted=False).indices                        # [C, k]
    cand = (blocks.unsqueeze(-1) * b + torch.arange(b, device=s.device)).view(C, k * b)
    return cand.gather(1, s.gather(1, cand).topk(k, dim=-1, sorted=False).indices)


@torch.no_grad()
def select_topk(q, w, K, start: int, topk: int, chunk: int = QUERY_CHUNK):
    """The selected keys of T queries at positions start..start+T-1 over keys 0..L-1 (L = start+T).

    q [T, H_I, D_I], w [T, H_I], K [>= L, D_I] -> idx [T, k] with k = min(topk, L), and
    valid [T, k] (False: a padding entry of a query that sees fewer than k keys) or None when
    every entry is a real key. Entries are in no particular order.
    """
    T = q.shape[0]
    L = start + T
    k = min(topk, L)
    idx = torch.empty(T, k, dtype=torch.long, device=q.device)
    bias = recency_bias(L, q.dtype, q.device)
    for a in range(0, T, chunk):
        b = min(a + chunk, T)
        if start + b <= k:  # these queries see at most k keys: all of them (the rest is padding)
            idx[a:b] = torch.arange(k, device=q.device)
            continue
        s = mask_causal_(selection_scores(q[a:b], w[a:b], K[:start + b], bias[:start + b]), start + a)
        idx[a:b] = topk_positions(s, k)
    valid = None
    if start + 1 < k:  # queries at positions < k-1 picked some (masked) future keys as padding
        valid = idx <= torch.arange(start, L, device=q.device)[:, None]
    return idx, valid


def pooled_keys(IK, n_blocks: int, block: int):
    """The mean indexer key of each of the first n_blocks blocks of IK [..., >= n_blocks * block, D_I]
    -> [..., n_blocks, D_I] (leading dims: a batch of sequences)."""
    lead, D = IK.shape[:-2], IK.shape[-1]
    return IK[..., :n_blocks * block, :].reshape(*lead, n_blocks, block, D).float().mean(-2).to(IK.dtype)


# Blocks every query keeps whatever its scores (block selection): its own, the one before it (a
# local window of b..2b-1 keys) and the first (the attention sink at position 0). Nearly every
# head needs these, and a mean key blurs RoPE's fast frequencies, so recency is hard to learn
# from pooled keys. NSA keeps a sliding window and MoBA the current block for the same reason.
# (For SmolLM2 the trained indexer had mostly learned to pick them anyway: keeping them moved
# perplexity by less than a point; see docs/BENCHMARKS.md.)
KEPT_BLOCKS = 3


def kept_blocks(own, m: int):
    """own [T] -> [T, min(m, KEPT_BLOCKS)]: own block, previous, first; -1 where none or repeated."""
    none = torch.full_like(own, -1)
    prev = torch.where(own >= 1, own - 1, none)
    first = torch.where(own >= 2, torch.zeros_like(own), none)
    return torch.stack([own, prev, first], 1)[:, :m]


def candidate_blocks(own, n_blocks: int):
    """[T, n_blocks] bool: the blocks a query's indexer chooses among (not kept, not after it)."""
    j = torch.arange(n_blocks, device=own.device)[None, :]
    return (j >= 1) & (j < own[:, None] - 1)


def choose_blocks(s, own, m: int):
    """Block scores s [C, n] of queries whose own blocks are own [C] -> their selection
    [C, <= m]: kept_blocks, then the top-scoring candidate_blocks (-1 where none). s is masked
    in place. Shared by prefill (select_blocks) and the paged cache's batched decode.
    s [C, G, n] (one row per group) -> [C, G, <= m]."""
    if s.dim() == 3:
        C, G, n = s.shape
        return choose_blocks(s.view(C * G, n), own.repeat_interleave(G), m).view(C, G, -1)
    kept = kept_blocks(own, m)
    k = min(m - kept.shape[1], s.shape[1])
    if k <= 0:
        return kept
    mod = _native_topk(s)
    if mod is not None:  # the candidate_blocks of a row: columns 1 .. own - 2
        return torch.cat([kept, mod.topk_columns(s.detach(), own - 1, 1, k)], 1)
    s.masked_fill_(~candidate_blocks(own, s.shape[1]), float("-inf"))
    top = s.topk(k, dim=-1, sorted=False)
    return torch.cat([kept, top.indices.masked_fill_(top.values == float("-inf"), -1)], 1)


def _native_topk(s):
    """The compiled row top-k (engine/csrc/decode.cpp topk_columns: ~3x torch.topk on these
    short rows, the same set up to ties, which it gives to the later block) for CPU block
    scores in fp32 or bf16; else None (torch.topk)."""
    if s.device.type != "cpu" or s.dtype not in (torch.float32, torch.bfloat16):
        return None
    from nanoseek.engine import native  # imported here: the engine imports the model
    return native.module()


BLOCK_SCORE_CHUNK = 1024  # queries scored against the block keys at a time (select_blocks)


@torch.no_grad()
def select_blocks(q, w, IK, start: int, topk: int, block: int, chunk: int = BLOCK_SCORE_CHUNK, pooled=None,
                  work=None):
    """The selected blocks of T queries at positions start..start+T-1 (index_block_size > 1).

    q [T, H_I, D_I], w [T, H_I], IK [>= start + T, D_I] -> sel [T, topk // block]: block ids,
    first the kept ones (own, previous, first: kept_blocks), then the best of the other earlier
    blocks by I(t, j); -1 where there is no such block (a query with at most topk // block
    blocks then sees all of them: dense attention). pooled: pooled_keys of IK already computed
    (at least the blocks before the last query's own), for callers that select in chunks.
    w [T, G, H_I] (per-group selection) -> sel [T, G, topk // block], a selection per group.
    work: the chunk scores' buffer (selection_scores) for callers that select in chunks: one
    buffer of the largest size, instead of a new, slightly larger one each call (glibc keeps the
    holes they leave resident: +0.5 GB at 64K tokens).
    """
    T = q.shape[0]
    m = topk // block
    own = torch.arange(start, start + T, device=q.device) // block
    group_dims = w.shape[1:2] if w.dim() == 3 else ()
    sel = torch.full((T, *group_dims, m), -1, dtype=torch.long, device=q.device)
    n_before = int(own[-1])  # complete blocks before the last query's own block
    if m <= KEPT_BLOCKS or n_before < 3:  # nothing to choose: only the kept blocks exist
        kept = kept_blocks(own, m)
        sel[..., :kept.shape[1]] = kept.view(T, *[1] * len(group_dims), -1)
        return sel
    Kb = pooled_keys(IK, n_before, block) if pooled is None else pooled[:n_before]
    bias = recency_bias(n_before, q.dtype, q.device)
    for a in range(0, T, chunk):
        b = min(a + chunk, T)
        chosen = choose_blocks(selection_scores(q[a:b], w[a:b], Kb, bias, work), own[a:b], m)
        sel[a:b, ..., :chosen.shape[-1]] = chosen
    return sel


def block_positions(sel, block: int, pos):
    """Selected blocks sel [T, m] (or [T, G, m], per group) of queries at positions pos [T] -> the
    key positions they see, idx [..., m * block], and valid (False: padding, or later than the query)."""
    idx = (sel.clamp(min=0)[..., None] * block + torch.arange(block, device=sel.device)).flatten(-2)
    valid = (sel >= 0).repeat_interleave(block, -1) & (idx <= pos.view(-1, *[1] * (sel.dim() - 1)))
    return idx, valid


# ---- fitting the indexer to the main attention (DSA's two training stages) ------------------

def _kl_rows(p, logits, mask):
    """sum over rows of KL(p || softmax(logits)), both over the keys where mask is True."""
    logits = logits.float().masked_fill(~mask, float("-inf"))
    logq = torch.log_softmax(logits, dim=-1).masked_fill(~mask, 0)
    return (torch.xlogy(p, p) - p * logq).sum()


@torch.no_grad()
def attention_target(q, K, scale, first_pos, positions=None):
    """Dense main attention of queries q [C, H, D] at first_pos.. (or at `positions` [C]) over
    K [L, Hkv, D], summed over heads and L1-normalised -> p [C, L] (DSA's warm-up target)."""
    C, H, D = q.shape
    Hkv = K.shape[1]
    s = torch.einsum("cvgd,lvd->cvgl", q.view(C, Hkv, H // Hkv, D).float(), K.float()) * scale
    if positions is None:
        causal = torch.ones(C, K.shape[0], dtype=torch.bool, device=q.device).tril(first_pos)
    else:
        causal = torch.arange(K.shape[0], device=q.device)[None, :] <= positions[:, None]
    p = s.masked_fill(~causal[:, None, None], float("-inf")).softmax(-1)
    return p.sum((1, 2)) / H, causal


def fit_indexer(index: IndexerOutput, q, k, scale, selections=None, chunk: int | None = None):
    """Train one layer's indexer on this forward: KL(main attention || softmax(I)).

    q [B, T, H, D], k [B, T, Hkv, D]: the main attention's queries and keys (no cache).
    selections None: dense warm-up, the target is the full causal attention distribution.
    selections per batch row, (idx, valid) of select_topk or sel of select_blocks: the sparse
    stage, the target and the indexer's distribution are both restricted to the selected keys.
    With blocks, the target is the attention each earlier block receives (summed over its keys),
    renormalised over the blocks the indexer chooses among; the kept blocks (own, previous,
    first) are left out of both sides.
    The loss (mean over the query tokens fitted) is backpropagated at once, chunk by chunk,
    into the indexer's weights only: its inputs are detached, so nothing else is touched and no
    n x n graph is kept. module.kl_every = n fits every n-th chunk of queries (a different
    phase each call), n times cheaper: the dense target is the costly part. The optimizer step
    is the caller's. With index_groups G > 1 each group of heads is fitted to its own attention
    with its own head weights (and its own selection in the sparse stage).
    """
    B, T, H = q.shape[:3]
    G, Hkv = index.groups, k.shape[2]
    chunk = chunk or QUERY_CHUNK
    ix = index.module
    bs, every = ix.block, max(ix.kl_every, 1)
    phase = ix.kl_calls % every
    ix.kl_calls += 1
    starts = [a for i, a in enumerate(range(0, T, chunk)) if i % every == phase]
    n_fit = B * G * sum(min(a + chunk, T) - a for a in starts)
    iq, iw, ik = (t.detach().requires_grad_() for t in (index.q, index.w, index.k))
    total = 0.0
    for b, a, g in ((b, a, g) for b in range(B) for a in starts for g in range(G)):
        e = min(a + chunk, T)
        with torch.enable_grad():
            if bs == 1:
                p, logits, mask = _token_kl_terms(q[b, a:e], k[b], iq[b, a:e], iw[b, a:e], ik[b], a, scale,
                                                  None if selections is None else selections[b])
            else:
                hs, ks = group_heads(g, G, H, Hkv)
                sel = None if selections is None else selections[b][a:e]
                terms = _block_kl_terms(q[b, a:e, hs], k[b, :, ks], iq[b, a:e], iw[b, a:e] if G == 1 else iw[b, a:e, g],
                                        ik[b], a, scale, bs, sel if G == 1 or sel is None else sel[:, g])
                if terms is None:  # no query here has an earlier block to choose
                    continue
                p, logits, mask = terms
            loss = _kl_rows(p, logits, mask) / n_fit
            loss.backward()
        total += loss.item()
    if iq.grad is not None:  # else no query here had anything to choose
        torch.autograd.backward([index.q, index.w, index.k], [iq.grad, iw.grad, ik.grad])
    index.module.last_kl = total
    return total


def group_heads(g: int, G: int, H: int, Hkv: int) -> tuple[slice, slice]:
    """The query heads and KV heads of group g of G (GQA: query head h reads KV head h // (H/Hkv))."""
    hq, hk = H // G, Hkv // G
    return slice(g * hq, (g + 1) * hq), slice(g * hk, (g + 1) * hk)


def _token_kl_terms(q, K, iq, iw, IK, first_pos, scale, selection):
    """Target p, indexer logits and mask over single keys, for queries at first_pos.."""
    e = first_pos + q.shape[0]
    if selection is None:
        p, mask = attention_target(q, K[:e], scale, first_pos)
        return p, index_scores(iq, iw, IK[:e]), mask
    idx, valid = selection
    idx = idx[first_pos:e]
    mask = torch.ones_like(idx, dtype=torch.bool) if valid is None else valid[first_pos:e]
    p = selected_attention_target(q, K, idx, mask, scale)
    s = torch.einsum("chd,ckd->chk", iq, IK[idx]).relu()
    return p, torch.einsum("ch,chk->ck", iw, s), mask


def _block_kl_terms(q, K, iq, iw, IK, first_pos, scale, bs, sel):
    """The same over the blocks a query chooses among (candidate_blocks; the kept ones are left
    out of both sides); None when no query here chooses any."""
    C = q.shape[0]
    e = first_pos + C
    own = torch.arange(first_pos, e, device=q.device) // bs
    rows = own >= 3  # queries with a block to choose (not kept_blocks)
    if not rows.any():
        return None
    q, iq, iw, own = q[rows], iq[rows], iw[rows], own[rows]
    n_before = int(own[-1])
    Kb = pooled_keys(IK, n_before, bs)                                                # [nb, D_I]
    if sel is None:
        p, _ = attention_target(q, K[:e], scale, 0, positions=torch.arange(first_pos, e, device=q.device)[rows])
        p = p[:, :n_before * bs].reshape(-1, n_before, bs).sum(-1)
        mask = candidate_blocks(own, n_before)
        logits = index_scores(iq, iw, Kb)
    else:
        sel = sel[rows]
        n_kept = min(sel.shape[1], KEPT_BLOCKS)
        idx, valid = block_positions(sel, bs, torch.arange(first_pos, e, device=q.device)[rows])
        p = selected_attention_target(q, K, idx, valid, scale).view(sel.shape[0], -1, bs).sum(-1)[:, n_kept:]
        chosen = sel[:, n_kept:]
        mask = chosen >= 0
        keep = mask.sum(1) >= 2  # a KL over one block is 0 whatever the scores
        if not keep.any():
            return None
        p, mask, chosen, iq, iw = p[keep], mask[keep], chosen[keep], iq[keep], iw[keep]
        s = torch.einsum("chd,ckd->chk", iq, Kb[chosen.clamp(min=0)]).relu()
        logits = torch.einsum("ch,chk->ck", iw, s)
    p = p * mask
    return p / p.sum(-1, keepdim=True).clamp_min(1e-30), logits, mask


@torch.no_grad()
def selected_attention_target(q, K, idx, mask, scale):
    """Main attention restricted to the selected keys, summed over heads, L1-normalised -> [C, k]."""
    C, H, D = q.shape
    Hkv = K.shape[1]
    Kg = K[idx].float()                                                          # [C, k, Hkv, D]
    s = torch.einsum("cvgd,ckvd->cvgk", q.view(C, Hkv, H // Hkv, D).float(), Kg) * scale
    p = s.masked_fill(~mask[:, None, None], float("-inf")).softmax(-1)
    return p.sum((1, 2)) / H


# ---- converting a dense model ------------------------------------------------------------

def add_indexers(model, n_heads: int = 4, head_dim: int = 64, topk: int = 512, layers=None, seed: int = 0,
                 block_size: int = 1, groups: int = 1):
    """Give a dense nanoseek Transformer lightning indexers (randomly initialised), in place.

    The model keeps running densely wherever a query sees <= topk keys; train the indexers
    with nanoseek.train.sparse_stages.indexer_warmup before relying on the selection.
    """
    cfg = model.config
    cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk = n_heads, head_dim, topk
    cfg.index_layers = None if layers is None else sorted(int(i) for i in layers)
    cfg.index_block_size, cfg.index_groups = block_size, groups
    cfg.__post_init__()  # the config's own checks: block size divides top-k; groups (GQA, blocks, divide n_kv_heads)
    gen = torch.Generator().manual_seed(seed)
    for i, block in enumerate(model.layers):
        attn = block.self_attn
        if not cfg.layer_has_indexer(i):
            attn.indexer = None
            continue
        ix = Indexer(cfg, i)
        with torch.no_grad():
            for name, p in ix.named_parameters():
                if name.startswith("k_norm"):
                    continue
                # unit-variance projections of unit-RMS inputs: scores start O(1) whatever the dims
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
        attn.indexer = ix.to(device=model.device, dtype=model.dtype)
    return model


@torch.no_grad()
def select_per_group(model, groups: int):
    """Turn one-selection indexers into per-group ones (index_groups = groups), in place: every
    group starts from the shared head weights (W_w tiled), so the model selects exactly as
    before until the groups are trained apart (the warm-up stage, from where it left off)."""
    cfg = model.config
    if cfg.index_groups != 1:
        raise NanoseekError(f"the indexers already select per group ({cfg.index_groups} groups)")
    cfg.index_groups = groups
    cfg.__post_init__()
    for block in model.layers:
        ix = block.self_attn.indexer
        if ix is None:
            continue
        w = ix.weights_proj.weight
        ix.weights_proj = nn.Linear(w.shape[1], groups * w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        ix.weights_proj.weight.copy_(w.repeat(groups, 1))
        ix.groups = groups
    return model


def drop_indexers(model, layers):
    """Make `layers` dense again, in place: their indexers go, and cfg.index_layers lists the rest
    (a hybrid: the layers whose selection costs most stay dense; see bench/sparse_attention.py
    layers). Raises if a layer has no indexer."""
    cfg = model.config
    drop = {int(i) for i in layers}
    for i in sorted(drop):
        if not (0 <= i < cfg.n_layers) or model.layers[i].self_attn.indexer is None:
            raise NanoseekError(f"--dense-layers: layer {i} has no indexer to drop")
    for i in drop:
        model.layers[i].self_attn.indexer = None
    cfg.index_layers = [i for i in range(cfg.n_layers) if model.layers[i].self_attn.indexer is not None]
    if not cfg.index_layers:
        cfg.index_n_heads, cfg.index_layers = 0, None
    return model


def indexer_parameters(model):
    return [p for n, p in model.named_parameters() if ".indexer." in n]

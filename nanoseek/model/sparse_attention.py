"""The main attention over the indexer's selected keys: O(n * k) work, never an n x n matrix.

Every path (no cache, DenseKVCache, the engine's paged cache; prefill and decode) ends in
`sparse_attention`: for a chunk of queries, gather the k selected key rows (and value rows)
with one index_select each, then a batched matmul, softmax, batched matmul. Keys are shared
by every head of a group, as DSA shares them across all heads (MLA attends in its absorbed
form, MQA over the latent, so K and V are one gathered tensor there, as in FlashMLA's
sparse kernel).

GQA's key heads are gathered as one row per token ([Hkv * D] contiguous), which is what
makes the gather cheap on a CPU; see sparse_attention for how the heads then share it.

With block selection (index_block_size > 1) a prefill gathers the other way round
(attend_blocks): every chosen key block is read once, in place, for the queries that chose it,
and each query's per-block results are merged by their log-sum-exp. The work is exactly
n * k whatever the queries choose, and the gathers shrink by the block size. Decode rows (one
query each) use the per-query gather above.
"""

import torch
import torch.nn.functional as F

from nanoseek.model.indexer import (BLOCK_SCORE_CHUNK, IndexerOutput, block_positions, choose_blocks, fit_indexer,
                                    group_heads, index_scores, pooled_keys, recency_bias, select_blocks, select_topk)

# Queries whose selected rows are gathered at once: C * k * row bytes, a few MB (cache-sized).
GATHER_CHUNK = 64


def sparse_attention(q, K, V, idx, valid, scale, v_dim, chunk: int = GATHER_CHUNK):
    """q [T, H, Dk]; K [P, Hkv, Dk] and V [P, Hkv, Dv] (or None: values are K[..., :v_dim]),
    rows of a pool; idx [T, k] rows of the pool each query attends to; valid [T, k] or None.
    -> [T, H, Dv]. Differentiable in q, K, V (index_select's backward scatters into K, V)."""
    T, H, Dk = q.shape
    P, Hkv = K.shape[:2]
    g, k = H // Hkv, idx.shape[1]
    Dv = v_dim if V is None else V.shape[-1]
    # one row per token: all key heads (a pool's slice of heads, for a group's selection, is
    # gathered as [rows, heads, D]: reshaping the strided slice would copy the whole pool)
    Kf = K.reshape(P, Hkv * Dk) if K.is_contiguous() else K
    Vf = None if V is None else (V.reshape(P, Hkv * Dv) if V.is_contiguous() else V)
    spread = torch.eye(Hkv, dtype=q.dtype, device=q.device).repeat_interleave(g, 0)       # [H, Hkv]
    training = torch.is_grad_enabled() and (q.requires_grad or K.requires_grad)
    C = min(chunk, T)
    bufK = None if training else K.new_empty(C * k, Hkv * Dk)
    bufV = None if training or Vf is None else K.new_empty(C * k, Hkv * Dv)
    out = q.new_empty(T, H, Dv)
    for a in range(0, T, chunk):
        b = min(a + chunk, T)
        C = b - a
        rows = idx[a:b].reshape(-1)
        Kg = (Kf.index_select(0, rows) if training else
              torch.index_select(Kf, 0, rows, out=bufK[:C * k].view(C * k, *Kf.shape[1:]))).view(C, k, Hkv * Dk)
        if Vf is None:
            Vg = Kg  # MLA: the latent is the value too (its first v_dim channels; the rest is cut below,
            #          multiplying whole rows is faster than a strided view of them)
        else:
            Vg = (Vf.index_select(0, rows) if training else
                  torch.index_select(Vf, 0, rows, out=bufV[:C * k].view(C * k, *Vf.shape[1:]))).view(C, k, Hkv * Dv)
        out[a:b] = attend_rows(q[a:b], Kg, Vg, None if valid is None else valid[a:b], scale, Dv, Hkv, spread)
    return out


def attend_rows(q, Kg, Vg, valid, scale, v_dim, n_kv_heads, spread=None, shared=None):
    """Each of C queries attends over its own n gathered keys, all in two bmms.

    q [C, H, Dk]; Kg [C, n, Hkv*Dk] (one row per key: all its heads); Vg [C, n, Hkv*Dv], or Kg
    itself when the values are the keys' first v_dim channels (MLA's latent); valid [C, n] bool
    or None -> [C, H, Dv]. Used for the sparse selections and for the paged cache's decode.
    GQA: each query head is spread over its group's slice of the row (zeros elsewhere), so one
    bmm per query serves every head straight from the gathered rows: Hkv x the exact product's
    flops, which are cheap here, instead of per-head copies of K and V.
    shared = (Ks [Ls, Hkv, Dk], Vs [Ls, Hkv, Dv] or None): keys every query sees before its own
    rows (a prompt prefix the sequences share), read once for all of them; one softmax spans both.
    """
    C, H, Dk = q.shape
    Hkv, g = n_kv_heads, H // n_kv_heads
    q_heads = q
    if Hkv > 1:
        if spread is None:
            spread = torch.eye(Hkv, dtype=q.dtype, device=q.device).repeat_interleave(g, 0)   # [H, Hkv]
        q = (q.unsqueeze(2) * spread[None, :, :, None]).reshape(C, H, Hkv * Dk)
    # scores as K_sel @ q^T: the big gathered operand stays the plain row-major one (on this
    # CPU's bf16 matmuls that is ~2x faster than q @ K_sel^T)
    s = torch.bmm(Kg, q.transpose(1, 2).contiguous()).transpose(1, 2).float().mul_(scale).contiguous()
    if valid is not None:
        s.masked_fill_(~valid[:, None, :], float("-inf"))
    if shared is not None:  # the shared keys per KV head, all C*g query rows at once
        Ks, Vs = shared
        Ls = Ks.shape[0]
        Kh = Ks.transpose(0, 1).contiguous()                                          # [Hkv, Ls, Dk]
        qh = q_heads.view(C, Hkv, g, Dk).transpose(0, 1).reshape(Hkv, C * g, Dk)
        ss = torch.bmm(qh, Kh.transpose(1, 2)).view(Hkv, C, g, Ls).transpose(0, 1).reshape(C, H, Ls)
        s = torch.cat([ss.float().mul_(scale), s], dim=-1)
    p = s.softmax(-1).to(Kg.dtype)
    if shared is not None:
        ps, p = p[..., :Ls], p[..., Ls:].contiguous()
    o = torch.bmm(p, Vg)                                                               # [C, H, Hkv*Dv']
    if Vg is Kg and o.shape[-1] != v_dim * Hkv:
        o = o[..., :v_dim]
    if Hkv > 1:  # keep each head's own group slice
        o = o.view(C, Hkv, g, Hkv, v_dim).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
    o = o.reshape(C, H, v_dim)
    if shared is not None:
        Vh = Kh[..., :v_dim] if Vs is None else Vs.transpose(0, 1)                      # [Hkv, Ls, Dv]
        os_ = torch.bmm(ps.reshape(C, Hkv, g, Ls).transpose(0, 1).reshape(Hkv, C * g, Ls), Vh)
        o = o + os_.view(Hkv, C, g, v_dim).transpose(0, 1).reshape(C, H, v_dim)
    return o


# Queries attended together against one key block (rows of a tile; a block's queries are
# padded up to a multiple of it). Each tile copies its key block, so wide key rows (MLA's per-head
# keys: 16 heads x 192) want bigger tiles; narrow ones (GQA's few KV heads) lose less to padding
# with small ones. Measured on this CPU: SmolLM2's shape best at 16, DeepSeek MLA's at 64.
QUERY_TILE, WIDE_QUERY_TILE, WIDE_ROW = 16, 64, 1024


def attend_blocks(q, K, V, scale, v_dim, sel, start: int, block: int, slots=None):
    """Queries q [T, H, Dk] at positions start.. over the blocks each selected.

    K [P, Hkv, Dk], V [P, Hkv, Dv] or None (values = K[..., :v_dim]): rows of a pool, the key
    of position s at row slots[s] (slots None: row s); sel [T, m] block ids from
    select_blocks (column 0 the own block; -1: none). -> [T, H, Dv]. Differentiable in q, K, V.

    The gather runs the other way round from sparse_attention (as in MoBA): each key block is
    read once, contiguous, for the queries that chose it, so n * k/b query rows are gathered
    instead of n * k key rows. Own blocks: the queries of each block of the grid against
    that block, causally masked, in one batched matmul. Earlier blocks: the (query, block)
    pairs sorted by block and cut into tiles of QUERY_TILE queries of one block. Each part
    gives a softmax normalised over its block and its log-sum-exp; a query's parts are then
    merged with weights softmax(lse) (flash-decoding's split-K merge).
    sel [T, G, m] (per-group selection): each group of heads over its own blocks.
    """
    if sel.dim() == 3:
        return by_group(sel.shape[1], q, K, V, lambda qg, Kg, Vg, g: attend_blocks(qg, Kg, Vg, scale, v_dim,
                                                                                   sel[:, g], start, block, slots))
    mod = _native_blocks(q, K, V, v_dim, block)
    if mod is not None:
        return _attend_blocks_native(mod, q, K, V, scale, sel, start, block, slots)
    T, H, Dk = q.shape
    dev = q.device
    m = sel.shape[1]
    tile = WIDE_QUERY_TILE if K.shape[1] * Dk >= WIDE_ROW else QUERY_TILE
    # own blocks: every query of this call lies in blocks first..last of the grid
    first, last = start // block, (start + T - 1) // block
    n_own, lead = last - first + 1, start - first * block
    qg = F.pad(q, (0, 0, 0, 0, lead, n_own * block - lead - T)).view(n_own, block, H, Dk)
    keys = torch.arange(first * block, (last + 1) * block, device=dev).clamp_(max=start + T - 1)
    Ko, Vo = _rows(K, V, keys if slots is None else slots[keys], v_dim)
    causal = torch.ones(block, block, dtype=torch.bool, device=dev).tril()
    Vo = Vo.view(n_own, block, *Vo.shape[1:])
    s_own, lse = _block_scores(qg, Ko.view(n_own, block, *Ko.shape[1:]), scale, causal)
    lse_own = lse.reshape(-1, H)[lead:lead + T]
    t_idx, c_idx = (sel[:, 1:] >= 0).nonzero(as_tuple=True)
    if m == 1 or len(t_idx) == 0:
        return _block_values(s_own, lse, Vo, v_dim, q.dtype).reshape(-1, H, v_dim)[lead:lead + T]
    # earlier blocks: (query, block) pairs in tiles of tile queries of one block
    blk = sel[:, 1:][t_idx, c_idx]
    order = torch.argsort(blk, stable=True)
    blk, t_idx, c_idx = blk[order], t_idx[order], c_idx[order]
    counts = torch.bincount(blk)
    tiles = (counts + tile - 1) // tile
    rank = torch.arange(len(blk), device=dev) - (torch.cumsum(counts, 0) - counts)[blk]
    at = ((torch.cumsum(tiles, 0) - tiles)[blk] + rank // tile) * tile + rank % tile
    n_tiles = int(tiles.sum())
    # each tile row's query (padding rows: query 0, given a total of +inf below: weight 0)
    row_query = torch.zeros(n_tiles * tile, dtype=torch.long, device=dev).index_copy_(0, at, t_idx)
    tile_block = torch.repeat_interleave(torch.arange(len(counts), device=dev), tiles)
    keys = (tile_block[:, None] * block + torch.arange(block, device=dev)).view(-1)
    Kt, Vt = _rows(K, V, keys if slots is None else slots[keys], v_dim)
    s_t, lse_t = _block_scores(q.index_select(0, row_query).view(n_tiles, tile, H, Dk),
                               Kt.view(n_tiles, block, *Kt.shape[1:]), scale, None)
    # each query's total log-sum-exp over its parts (0: own block, 1 + c: its c-th earlier block);
    # every part is then exponentiated against that total, so the parts' outputs just add up
    # (one normalisation, no per-part rescaling of the outputs)
    L = torch.full((T, m - 1, H), float("-inf"), device=dev).index_put_((t_idx, c_idx), lse_t.reshape(-1, H)[at])
    total = torch.logsumexp(torch.cat([lse_own[:, None], L], 1), 1)                      # [T, H]
    own_total = F.pad(total, (0, 0, lead, n_own * block - lead - T), value=float("inf")).view(n_own, block, H)
    o = _block_values(s_own, own_total, Vo, v_dim, q.dtype).reshape(-1, H, v_dim)[lead:lead + T]
    tile_total = torch.full((n_tiles * tile, H), float("inf"), device=dev).index_copy_(0, at, total[t_idx])
    parts = _block_values(s_t, tile_total.view(n_tiles, tile, H), Vt.view(n_tiles, block, *Vt.shape[1:]),
                          v_dim, q.dtype)
    return o.index_add(0, row_query, parts.reshape(-1, H, v_dim))


def _native_blocks(q, K, V, v_dim, block):
    """The compiled block attention (engine/csrc/decode.cpp block_attention) where it applies:
    inference (no autograd), bf16 on a CPU with AVX512-BF16, separate values of the keys' head
    size 32, 64 or 128 (GQA; MLA's latent stays in Python), blocks of at most 64. Else None."""
    if (q.dtype != torch.bfloat16 or K.dtype != torch.bfloat16 or V is None or V.dtype != torch.bfloat16
            or q.device.type != "cpu" or q.shape[-1] not in (32, 64, 128) or V.shape[-1] != q.shape[-1]
            or v_dim != q.shape[-1] or block > 64):
        return None
    if torch.is_grad_enabled() and (q.requires_grad or K.requires_grad or V.requires_grad):
        return None
    from nanoseek.engine import native  # imported here: the engine imports the model
    mod = native.module()
    return mod if mod is not None and mod.has_bf16_dot() else None


def _attend_blocks_native(mod, q, K, V, scale, sel, start: int, block: int, slots):
    """attend_blocks by the compiled kernel: the (query, block) pairs sorted by block, then one
    call per KV head, over that head's keys of positions 0 .. start + T - 1 (read in place; the
    paged cache's pool rows are gathered by slot first). Each query's blocks are taken in
    increasing order, by an online softmax in fp32 (flash attention's running max and sum)."""
    T, H, D = q.shape
    Hkv = K.shape[1]
    g = H // Hkv
    t_idx, c_idx = (sel >= 0).nonzero(as_tuple=True)
    blk = sel[t_idx, c_idx]
    order = torch.argsort(blk, stable=True)
    pair_query, pair_block = t_idx[order], blk[order]
    rows = slice(0, start + T) if slots is None else slots[:start + T]
    out = q.new_empty(T, H, D)
    for j in range(Hkv):
        Kj, Vj = K[rows, j], V[rows, j]  # one KV head: the kernel reads its strided rows in place
        out[:, j * g:(j + 1) * g] = mod.block_attention(q[:, j * g:(j + 1) * g], Kj, Vj, pair_query, pair_block,
                                                        start, block, scale)
    return out


def _rows(K, V, rows, v_dim):
    """Key and value rows of a pool. MLA (V None): the values are the keys' first v_dim
    channels; the whole rows are returned, _block_values cuts its output instead (a matmul
    over whole rows is faster here than over a strided view of them)."""
    Kg = K.index_select(0, rows)
    return Kg, (Kg if V is None else V.index_select(0, rows))


def _block_scores(q, K, scale, mask):
    """Scores of N tiles of queries q [N, R, H, Dk] against their key block K [N, b, Hkv, Dk];
    mask [R, b] or None -> s [N*Hkv, R*g, b] (fp32, scaled, masked; rows by KV head, then query,
    then the head's place in its group) and lse [N, R, H], each row's log-sum-exp."""
    N, R, H, Dk = q.shape
    b, Hkv = K.shape[1], K.shape[2]
    g = H // Hkv
    qh = q.view(N, R, Hkv, g, Dk).permute(0, 2, 1, 3, 4).reshape(N * Hkv, R * g, Dk)
    kh = K.permute(0, 2, 3, 1).reshape(N * Hkv, Dk, b)
    s = torch.bmm(qh, kh).float().mul_(scale)                                   # [N*Hkv, R*g, b]
    if mask is not None:
        s = s.view(N * Hkv, R, g, b).masked_fill_(~mask[None, :, None, :], float("-inf")).view(N * Hkv, R * g, b)
    lse = torch.logsumexp(s, -1)
    return s, lse.view(N, Hkv, R, g).permute(0, 2, 1, 3).reshape(N, R, H)


def _block_values(s, total, V, v_dim, dtype):
    """exp(s - total) @ V: a block's share of each query's output, for scores s from
    _block_scores (consumed in place unless it needs a gradient), total [N, R, H] the query's
    log-sum-exp over all its parts (+inf: a padding row, weight 0), V [N, b, Hkv, >= v_dim]
    -> [N, R, H, v_dim]."""
    N, R, H = total.shape
    b, Hkv, Dv = V.shape[1], V.shape[2], V.shape[-1]
    g = H // Hkv
    t = total.view(N, R, Hkv, g).permute(0, 2, 1, 3).reshape(N * Hkv, R * g, 1)
    # in place where no graph is kept: logsumexp's backward (the sparse training stage) needs s
    p = (s.sub_(t).exp_() if not s.requires_grad else (s - t).exp()).to(dtype)
    o = torch.bmm(p, V.permute(0, 2, 1, 3).reshape(N * Hkv, b, Dv))             # [N*Hkv, R*g, Dv]
    return o.view(N, Hkv, R, g, Dv)[..., :v_dim].permute(0, 2, 1, 3, 4).reshape(N, R, H, v_dim)


# Queries selected and attended together: bounds the [block, k] index tensors (int64) at long T.
SELECT_BLOCK = 1024


def sparse_causal_attention(q, k, v, scale, v_dim, index: IndexerOutput):
    """The no-cache path (training, scoring, one-shot prefill) of a layer with an indexer.

    q [B, T, H, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv, Dv] or None -> [B, T, H, Dv].
    """
    B, T = q.shape[:2]
    if index.module.kl:  # the sparse training stage: KL over the selected keys only
        outs, selections = [], []
        for b in range(B):
            Vb = None if v is None else v[b]
            if index.block == 1:
                idx, valid = select_topk(index.q[b], index.w[b], index.k[b], 0, index.topk)
                outs.append(sparse_attention(q[b], k[b], Vb, idx, valid, scale, v_dim))
                selections.append((idx, valid))
            else:
                sel = select_blocks(index.q[b], index.w[b], index.k[b], 0, index.topk, index.block)
                outs.append(attend_blocks(q[b], k[b], Vb, scale, v_dim, sel, 0, index.block))
                selections.append(sel)
        fit_indexer(index, q, k, scale, selections)
        return torch.stack(outs)
    return torch.stack([attend_selected(q[b], k[b], None if v is None else v[b], scale, v_dim,
                                        index.q[b], index.w[b], index.k[b], 0, index.topk, index.block)
                        for b in range(B)])


def attend_selected(q, K, V, scale, v_dim, iq, iw, IK, start, topk, block=1, slots=None):
    """Attention of one sequence's queries q [T, H, Dk] at positions start.. over their
    selected keys among K/V/IK, the keys of positions 0..start+T-1 (main [L, Hkv, D],
    indexer [L, D_I]; with slots, K and V are a pool whose row slots[s] holds position s)
    -> [T, H, Dv]."""
    T = q.shape[0]
    out = None
    span = SELECT_BLOCK * (4 if block > 1 and K.shape[1] * K.shape[2] >= WIDE_ROW else 1)  # wide tiles want more queries
    # the blocks' mean keys, once for all chunks (the last chunk needs every block before it)
    pooled = pooled_keys(IK, (start + T - 1) // block, block) if block > 1 else None
    work = None  # per-group block scores of a chunk of queries, sized for the last (longest) one
    if block > 1 and iw.dim() == 3:
        work = iq.new_empty(min(BLOCK_SCORE_CHUNK, T) * (iq.shape[1] + iw.shape[1]) * pooled.shape[0])
    for a in range(0, T, span):
        b = min(a + span, T)
        if block > 1:
            sel = select_blocks(iq[a:b], iw[a:b], IK, start + a, topk, block, pooled=pooled, work=work)
            o = attend_blocks(q[a:b], K, V, scale, v_dim, sel, start + a, block, slots)
        else:
            idx, valid = select_topk(iq[a:b], iw[a:b], IK, start + a, topk)
            o = sparse_attention(q[a:b], K, V, idx if slots is None else slots[idx], valid, scale, v_dim)
        if b - a == T:
            return o
        if out is None:
            out = o.new_empty(T, *o.shape[1:])
        out[a:b] = o
    return out


def by_group(G: int, q, K, V, attend):
    """Per-group selection: attend(q_g, K_g, V_g, g) for each of G groups of query heads with
    their slice of KV heads (V None: MLA-style values in K); the outputs joined along heads."""
    parts = []
    for g in range(G):
        hs, ks = group_heads(g, G, q.shape[1], K.shape[1])
        parts.append(attend(q[:, hs], K[:, ks], None if V is None else V[:, ks], g))
    return torch.cat(parts, 1)


# ---- the engine's paged cache ---------------------------------------------------------------

def paged_sparse_attend(ctx, layer, q, scale, v_dim, index: IndexerOutput):
    """PagedAttention.attend for a layer with an indexer, after the step's keys are stored.

    q [N, H, Dk]: the step's flattened rows. The indexer keys are gathered per sequence (D_I
    numbers a token); the main keys are read only at the selected slots, so a decode step
    reads k rows of the KV pool, not the whole context.
    """
    cache, bs = ctx.cache, ctx.cache.block_size
    kc, vc, ikc = cache.k[layer], cache.v[layer], cache.ik[layer]
    Kpool = kc.view(-1, *kc.shape[2:])
    Vpool = None if vc is None else vc.view(-1, *vc.shape[2:])
    IKpool = ikc.view(-1, ikc.shape[-1])
    iq, iw = index.q[0], index.w[0]
    out = q.new_empty(q.shape[0], q.shape[1], v_dim)
    if len(ctx.decode_rows):
        # all decode rows at once: one query each over its own (padded) context
        rows, lens = ctx.decode_rows, ctx.decode_lens
        width = ctx.decode_tables.shape[1] * bs
        pos = torch.arange(width)
        slots = ctx.decode_tables[:, pos // bs] * bs + pos % bs                        # [B, W]
        IK = IKpool[slots]                                                             # [B, W, D_I]
        if index.block == 1:
            bias = recency_bias(width, iq.dtype).expand(len(rows), 1, width)
            s = torch.baddbmm(bias, iw[rows].unsqueeze(1),
                              torch.bmm(iq[rows], IK.transpose(1, 2)).relu_()).squeeze(1)  # [B, W]
            s.masked_fill_(pos[None, :] >= lens[:, None], float("-inf"))
            s.scatter_(1, (lens - 1)[:, None], float("inf"))                               # own position
            k = min(index.topk, width)
            idx = s.topk(k, dim=-1, sorted=False).indices
            valid = idx < lens[:, None]
        else:
            idx, valid = decode_blocks(iq[rows], iw[rows], IK, lens, index.topk, index.block)
        if idx.dim() == 3:  # per-group selection: each group of heads over its own keys
            out[rows] = by_group(idx.shape[1], q[rows], Kpool, Vpool, lambda qg, Kg, Vg, g: sparse_attention(
                qg, Kg, Vg, slots.gather(1, idx[:, g]), valid[:, g], scale, v_dim))
        else:
            out[rows] = sparse_attention(q[rows], Kpool, Vpool, slots.gather(1, idx), valid, scale, v_dim)
    for row, new, cached, table in ctx.prefills:
        total = cached + new
        pos = torch.arange(total)
        slots = table[pos // bs] * bs + pos % bs
        out[row:row + new] = attend_selected(q[row:row + new], Kpool, Vpool, scale, v_dim, iq[row:row + new],
                                             iw[row:row + new], IKpool[slots], cached, index.topk, index.block,
                                             slots)
    return out.unsqueeze(0)


def decode_blocks(iq, iw, IK, lens, topk: int, block: int):
    """Block selection for B decode queries at positions lens - 1 over their padded indexer keys
    IK [B, W, D_I] -> key positions idx [B, m * block] and valid (select_blocks, batched).
    iw [B, G, H_I] (per-group selection) -> idx and valid [B, G, m * block]."""
    B, W, _ = IK.shape
    if W % block:  # whole blocks (the padding is never a candidate: it lies at or after each own block)
        IK = torch.nn.functional.pad(IK, (0, 0, 0, block - W % block))
    own = (lens - 1) // block
    nb = IK.shape[1] // block
    Kb = pooled_keys(IK, nb, block)                                                   # [B, nb, D_I]
    w = iw if iw.dim() == 3 else iw.unsqueeze(1)                                      # [B, G, H_I]
    s = torch.baddbmm(recency_bias(nb, iq.dtype).expand(B, w.shape[1], nb), w,
                      torch.bmm(iq, Kb.transpose(1, 2)).relu_())                     # [B, G, nb]
    return block_positions(choose_blocks(s if iw.dim() == 3 else s[:, 0], own, topk // block), block, lens - 1)


__all__ = ["sparse_attention", "attend_rows", "attend_blocks", "sparse_causal_attention", "attend_selected",
           "paged_sparse_attend", "index_scores", "pooled_keys"]

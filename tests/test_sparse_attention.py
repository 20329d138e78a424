"""DSA sparse attention: exactness when k >= length, causality, cache/engine consistency."""

import copy

import pytest
import torch
import torch.nn.functional as F

from nanoseek.checkpoint.hf import load_hf
from nanoseek.config import ModelConfig
from nanoseek.engine import LLM
from nanoseek.model.indexer import (add_indexers, block_positions, index_scores, recency_bias, select_blocks,
                                    select_per_group, select_topk)
from nanoseek.model.kv_cache import DenseKVCache
from nanoseek.model.sparse_attention import attend_blocks, sparse_attention
from nanoseek.model.transformer import Transformer
from nanoseek.sampling import SamplingParams

VOCAB = 120
BASE = dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, inter_dim=96, max_seq_len=512)
CONFIGS = {
    "gqa": dict(BASE, arch="llama", attn_type="gqa", n_kv_heads=2, head_dim=16),
    "mla-qlora": dict(BASE, arch="deepseek_v3", attn_type="mla", q_lora_rank=24, kv_lora_rank=16,
                      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, rope_interleave=True,
                      n_activated_experts=1),
    "mla": dict(BASE, arch="deepseek_v3", attn_type="mla", q_lora_rank=0, kv_lora_rank=16,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, rope_interleave=True),
}
# the GQA model with per-group selection (each of its 2 KV heads chooses its own blocks)
CONFIGS["gqa-groups"] = CONFIGS["gqa"]
GROUPS = {"gqa-groups": 2}


def cases(names):
    """(name, block) pairs: token-level (1) and blocks of 4, per-group selection with blocks only."""
    return [(n, b) for n in names for b in (1, 4) if not (n in GROUPS and b == 1)]


def dense_and_sparse(name, topk=None, layers=None, block=1):
    """A tiny model and its copy with indexers. Default top-k: 8 keys, or 5 blocks of 4 (3 kept,
    2 chosen), so that a 40-token input really selects."""
    topk = topk or (8 if block == 1 else 20)
    dense = Transformer(ModelConfig(**CONFIGS[name])).init_weights(seed=0).eval()
    sparse = add_indexers(copy.deepcopy(dense), n_heads=2, head_dim=16, topk=topk, layers=layers, seed=1,
                          block_size=block, groups=GROUPS.get(name, 1))
    return dense, sparse


def ids(B, T, seed=0):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def cached_forward(model, x, cuts):
    cache, parts = DenseKVCache(model.config.n_layers, x.shape[1]), []
    for a, b in zip(cuts[:-1], cuts[1:]):
        parts.append(model(x[:, a:b], cache.positions(x.shape[0], b - a), cache))
        cache.advance(b - a)
    return torch.cat(parts, 1)


@pytest.mark.parametrize("name,block", cases(CONFIGS))
def test_k_at_least_length_is_exactly_dense(name, block):
    dense, sparse = dense_and_sparse(name, topk=48, block=block)
    x = ids(2, 48)
    with torch.no_grad():
        assert torch.equal(sparse(x), dense(x))
        assert torch.equal(cached_forward(sparse, x, [0, 20, 21, 48]), cached_forward(dense, x, [0, 20, 21, 48]))


def test_engine_k_at_least_length_is_exactly_dense():
    dense, sparse = dense_and_sparse("gqa", topk=512)
    p = ids(1, 40, seed=3)[0].tolist()
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True)
    a = LLM(dense, block_size=4, max_batch_tokens=16).generate([p], params)[0].outputs[0]
    b = LLM(sparse, block_size=4, max_batch_tokens=16).generate([p], params)[0].outputs[0]
    assert a.token_ids == b.token_ids and [x["logprob"] for x in a.logprobs] == [x["logprob"] for x in b.logprobs]


def test_sparse_kernel_over_all_keys_matches_sdpa():
    g = torch.Generator().manual_seed(0)
    T, H, Hkv, D = 37, 6, 2, 16
    q, k, v = torch.randn(T, H, D, generator=g), torch.randn(T, Hkv, D, generator=g), torch.randn(T, Hkv, 12, generator=g)
    idx = torch.arange(T).expand(T, T)
    valid = idx <= torch.arange(T)[:, None]
    out = sparse_attention(q, k, v, idx, valid, 0.3, 12, chunk=5)
    ref = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                                         scale=0.3, enable_gqa=True).transpose(0, 1)
    assert (out - ref).abs().max().item() < 1e-5


def test_selection_is_causal_keeps_own_position_and_is_the_top_k():
    g = torch.Generator().manual_seed(0)
    T, start, k = 30, 11, 8
    L = start + T
    q, w, K = torch.randn(T, 3, 16, generator=g), torch.randn(T, 3, generator=g), torch.randn(L, 16, generator=g)
    idx, valid = select_topk(q, w, K, start, k, chunk=7)
    full = index_scores(q, w, K)
    for t in range(T):
        pos = start + t
        chosen = set(idx[t][valid[t]].tolist() if valid is not None else idx[t].tolist())
        assert len(chosen) == min(k, pos + 1)
        assert max(chosen) <= pos and pos in chosen
        others = full[t, :pos].topk(min(k, pos + 1) - 1).indices.tolist()
        assert chosen == set(others) | {pos}
    # a query seeing fewer than k keys keeps them all
    idx, valid = select_topk(q[:4], w[:4], K, 0, k)
    for t in range(4):
        assert sorted(idx[t][valid[t]].tolist()) == list(range(t + 1))


@pytest.mark.parametrize("name,block", cases(CONFIGS))
def test_future_tokens_never_change_earlier_outputs(name, block):
    _, sparse = dense_and_sparse(name, block=block)
    x = ids(1, 40)
    y = x.clone()
    y[0, 25:] = (y[0, 25:] + 7) % VOCAB
    with torch.no_grad():
        assert (sparse(x)[:, :25] - sparse(y)[:, :25]).abs().max().item() < 1e-5


@pytest.mark.parametrize("name,block", cases(CONFIGS))
def test_chunked_prefill_and_decode_equal_one_shot(name, block):
    _, sparse = dense_and_sparse(name, block=block)
    x = ids(2, 40, seed=1)
    with torch.no_grad():
        one = sparse(x)
        chunked = cached_forward(sparse, x, [0, 5, 13, 14, 30, 31, 32, 40])
    assert (chunked - one).abs().max().item() < 1e-4


@pytest.mark.parametrize("name,block", cases(["gqa", "gqa-groups"]))
def test_main_attention_is_never_dense_when_sparse(monkeypatch, name, block):
    """The sparse path gathers the selected keys: no SDPA over the whole context anywhere."""
    _, sparse = dense_and_sparse(name, block=block)
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = ids(1, 40)
    with torch.no_grad():
        sparse(x)
        cached_forward(sparse, x, [0, 24, 25, 40])  # every chunk sees more keys than top-k
    assert not calls


def test_only_listed_layers_get_an_indexer():
    _, sparse = dense_and_sparse("gqa", layers=[1])
    assert sparse.layers[0].self_attn.indexer is None and sparse.layers[1].self_attn.indexer is not None


@pytest.mark.parametrize("name,block", cases(["gqa", "gqa-groups", "mla-qlora"]))
def test_engine_paged_sparse_equals_dense_cache_reference(name, block):
    _, sparse = dense_and_sparse(name, block=block)
    ps = [ids(1, n, seed=10 + n)[0].tolist() for n in (45, 9, 30, 60)]
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=3, ignore_eos=True)

    def reference(prompt):
        x, out, lps = torch.tensor([prompt]), [], []
        cache = DenseKVCache(sparse.config.n_layers, len(prompt) + 8)
        with torch.no_grad():
            for _ in range(8):
                logits = sparse(x, cache.positions(1, x.shape[1]), cache)[0, -1]
                cache.advance(x.shape[1])
                out.append(int(logits.argmax()))
                lps.append(float(torch.log_softmax(logits, -1)[out[-1]]))
                x = torch.tensor([[out[-1]]])
        return out, lps

    # chunked prefills (7 tokens a step) mixed with other sequences' decodes
    got = LLM(sparse, block_size=4, max_batch_tokens=7).generate(ps, params)
    for p, o in zip(ps, got):
        ref_ids, ref_lps = reference(p)
        assert o.outputs[0].token_ids == ref_ids
        assert max(abs(a["logprob"] - b) for a, b in zip(o.outputs[0].logprobs, ref_lps)) < 1e-4


@pytest.mark.parametrize("name", ["mla-qlora", "gqa-groups"])
def test_converted_model_saves_and_loads(tmp_path, name):
    _, sparse = dense_and_sparse(name, layers=[0], block=4)
    sparse.save(tmp_path)
    again = load_hf(tmp_path)
    assert again.config.index_n_heads == 2 and again.config.index_layers == [0]
    assert again.config.index_block_size == 4 and again.config.index_groups == GROUPS.get(name, 1)
    x = ids(1, 30)
    with torch.no_grad():
        assert torch.equal(again(x), sparse(x))


def test_dense_config_export_unchanged():
    cfg = ModelConfig(**CONFIGS["gqa"])
    assert not any(k.startswith("index_") for k in cfg.to_hf())
    cfg.index_n_heads, cfg.index_topk = 4, 256
    back = ModelConfig.from_hf(cfg.to_hf())
    assert (back.index_n_heads, back.index_head_dim, back.index_topk, back.index_layers) == (4, 64, 256, None)


@pytest.mark.parametrize("block", [1, 4])
def test_blocked_selection_equals_one_block(monkeypatch, block):
    """Long prefills select and attend SELECT_BLOCK queries at a time (four times that, in
    tiles of WIDE_QUERY_TILE, for wide key rows); the result is the same."""
    import nanoseek.model.sparse_attention as sa
    _, sparse = dense_and_sparse("mla-qlora", block=block)
    x = ids(1, 40, seed=5)
    with torch.no_grad():
        one = sparse(x)
        monkeypatch.setattr(sa, "SELECT_BLOCK", 7)
        assert (sparse(x) - one).abs().max().item() < 1e-5
        monkeypatch.setattr(sa, "SELECT_BLOCK", 3)
        monkeypatch.setattr(sa, "WIDE_ROW", 1)   # these tiny rows count as wide: the other tiling
        assert (sparse(x) - one).abs().max().item() < 1e-5


def test_block_selection_is_causal_keeps_own_block_and_is_the_top_blocks():
    g = torch.Generator().manual_seed(0)
    T, start, topk, bs = 40, 11, 20, 4
    L = start + T
    q, w, K = torch.randn(T, 3, 16, generator=g), torch.randn(T, 3, generator=g), torch.randn(L, 16, generator=g)
    sel = select_blocks(q, w, K, start, topk, bs)
    m = topk // bs
    for t in range(T):
        pos = start + t
        own = pos // bs
        chosen = sel[t][sel[t] >= 0].tolist()
        assert len(chosen) == len(set(chosen)) == min(m, own + 1) and max(chosen) == own
        assert chosen[:3] == [own, own - 1, 0][:min(3, own + 1)]  # own, previous and first: always kept
        # the rest: the best of blocks 1..own-2 by the indexer's score of each block's mean key
        # (ReLU's exact-zero ties go to the later block)
        means = K[:own * bs].view(own, bs, -1).mean(1)
        scores = index_scores(q[t:t + 1], w[t:t + 1], means, recency_bias(own, torch.float32))[0]
        scores[0] = float("-inf")
        best = scores[:max(own - 1, 0)].topk(max(min(m - 3, own - 2), 0)).indices.tolist()
        assert set(chosen[3:]) == set(best)
    idx, valid = block_positions(sel, bs, torch.arange(start, L))
    assert (idx[valid] <= torch.arange(start, L)[:, None].expand_as(idx)[valid]).all()
    # every query sees its own position and the whole of its own block's past
    for t in range(T):
        seen = set(idx[t][valid[t]].tolist())
        assert set(range((start + t) // bs * bs, start + t + 1)) <= seen


@pytest.mark.parametrize("tile", [1, 3, 16, 64])
def test_block_attention_over_chosen_blocks_matches_masked_dense(monkeypatch, tile):
    """attend_blocks (each key block against the queries that chose it, tiles of `tile` queries,
    merged by log-sum-exp) equals each query's own dense softmax over exactly the keys its
    blocks hold."""
    import nanoseek.model.sparse_attention as sa
    monkeypatch.setattr(sa, "QUERY_TILE", tile)
    g = torch.Generator().manual_seed(0)
    T, H, Hkv, D, bs = 37, 6, 2, 16, 4
    q, k, v = torch.randn(T, H, D, generator=g), torch.randn(T, Hkv, D, generator=g), torch.randn(T, Hkv, 12, generator=g)
    iq, iw, IK = torch.randn(T, 2, 8, generator=g), torch.randn(T, 2, generator=g), torch.randn(T, 8, generator=g)
    sel = select_blocks(iq, iw, IK, 0, 12, bs)
    out = attend_blocks(q, k, v, 0.3, 12, sel, 0, bs)
    idx, valid = block_positions(sel, bs, torch.arange(T))
    mask = torch.zeros(T, T, dtype=torch.bool)
    for t in range(T):
        mask[t, idx[t][valid[t]]] = True
    ref = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                         scale=0.3, enable_gqa=True).transpose(0, 1)
    assert mask.sum(1).max() < T and (out - ref).abs().max().item() < 1e-5


def test_per_group_block_attention_matches_masked_dense():
    """With a selection per group, each group's query heads see exactly the keys of their own
    group's blocks: attend_blocks equals masked dense SDPA run group by group; the groups really
    choose differently."""
    g = torch.Generator().manual_seed(0)
    T, H, Hkv, D, bs, G = 37, 6, 2, 16, 4, 2
    q, k, v = torch.randn(T, H, D, generator=g), torch.randn(T, Hkv, D, generator=g), torch.randn(T, Hkv, 12, generator=g)
    iq, iw, IK = torch.randn(T, 2, 8, generator=g), torch.randn(T, G, 2, generator=g), torch.randn(T, 8, generator=g)
    sel = select_blocks(iq, iw, IK, 0, 20, bs)  # 3 kept blocks and 2 chosen
    assert sel.shape == (T, G, 5) and not torch.equal(sel[:, 0], sel[:, 1])
    for grp in range(G):  # each group's selection is the one its own head weights make
        assert torch.equal(sel[:, grp], select_blocks(iq, iw[:, grp], IK, 0, 20, bs))
    out = attend_blocks(q, k, v, 0.3, 12, sel, 0, bs)
    for grp in range(G):
        idx, valid = block_positions(sel[:, grp], bs, torch.arange(T))
        mask = torch.zeros(T, T, dtype=torch.bool)
        for t in range(T):
            mask[t, idx[t][valid[t]]] = True
        hs = slice(grp * H // G, (grp + 1) * H // G)
        ref = F.scaled_dot_product_attention(q[:, hs].transpose(0, 1), k[:, grp:grp + 1].transpose(0, 1),
                                             v[:, grp:grp + 1].transpose(0, 1), attn_mask=mask, scale=0.3,
                                             enable_gqa=True).transpose(0, 1)
        assert (out[:, hs] - ref).abs().max().item() < 1e-5


def test_per_group_selection_needs_blocks_and_gqa():
    from nanoseek.errors import NanoseekError
    dense = Transformer(ModelConfig(**CONFIGS["gqa"])).init_weights(seed=0)
    with pytest.raises(NanoseekError, match="model config field index_groups: 3 must be 1, or divide n_kv_heads=2"):
        add_indexers(copy.deepcopy(dense), n_heads=2, head_dim=16, topk=20, block_size=4, groups=3)
    with pytest.raises(NanoseekError, match="index_groups"):
        add_indexers(copy.deepcopy(dense), n_heads=2, head_dim=16, topk=20, block_size=1, groups=2)
    mla = Transformer(ModelConfig(**CONFIGS["mla"])).init_weights(seed=0)
    with pytest.raises(NanoseekError, match="index_groups"):
        add_indexers(mla, n_heads=2, head_dim=16, topk=20, block_size=4, groups=2)


def test_select_per_group_starts_from_the_shared_choice():
    """A trained one-selection model turned per-group selects exactly as before (every group
    starts with the shared head weights), then its groups can be trained apart."""
    _, sparse = dense_and_sparse("gqa", block=4)
    grouped = select_per_group(copy.deepcopy(sparse), 2)
    assert grouped.config.index_groups == 2
    assert grouped.layers[0].self_attn.indexer.weights_proj.weight.shape == (4, 64)
    x = ids(1, 40)
    with torch.no_grad():
        assert (grouped(x) - sparse(x)).abs().max().item() < 1e-5
        grouped.layers[0].self_attn.indexer.weights_proj.weight[2:] *= -1  # group 1 now ranks blocks otherwise
        assert (grouped(x) - sparse(x)).abs().max().item() > 1e-3


@pytest.mark.parametrize("start,T,bs,D,m", [(0, 300, 32, 64, 6), (100, 77, 16, 64, 5), (0, 260, 32, 128, 4),
                                            (37, 200, 33, 32, 5), (0, 129, 64, 64, 3)])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_block_attention_matches_python(start, T, bs, D, m, threads):
    """The compiled bf16 block attention (online softmax over each query's blocks) equals the Python
    attend_blocks run in fp32 on the same inputs, up to bf16 rounding; chunks agree exactly."""
    from nanoseek.engine import native
    from nanoseek.model.indexer import choose_blocks
    mod = native.module()
    if mod is None or not mod.has_bf16_dot():
        pytest.skip("no native build or no AVX512-BF16 here")
    torch.manual_seed(0)
    L, g, Hkv = start + T, 3, 2
    q = torch.randn(T, g * Hkv, D).bfloat16()
    K, V = torch.randn(L, Hkv, D).bfloat16(), torch.randn(L, Hkv, D).bfloat16()
    own = torch.arange(start, L) // bs
    sel = choose_blocks(torch.randn(T, int(own[-1]) + 1), own, m)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = attend_blocks(q, K, V, 0.125, D, sel, start, bs)
        half = T // 2
        parts = torch.cat([attend_blocks(q[:half], K, V, 0.125, D, sel[:half], start, bs),
                           attend_blocks(q[half:], K, V, 0.125, D, sel[half:], start + half, bs)])
    finally:
        torch.set_num_threads(old)
    ref = attend_blocks(q.float(), K.float(), V.float(), 0.125, D, sel, start, bs)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.02 * ref.abs().max()
    assert torch.equal(out, parts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(1023, 29), (200, 13), (40, 37), (5, 3)])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_block_topk_matches_torch(dtype, n, k, threads):
    """The compiled top-k of block choice (topk_columns) picks the same columns as torch.topk
    over each row's candidate columns 1 .. limit - 1, -1 where a row has fewer than k of them or
    a -inf score; ties go to the later column; and choose_blocks gives the same set with it as
    with torch.topk."""
    from nanoseek.engine import native
    from nanoseek.model import indexer
    mod = native.module()
    if mod is None:
        pytest.skip("no native build here")
    g = torch.Generator().manual_seed(n + k)
    R = 300
    s = torch.randperm(R * n, generator=g).view(R, n).to(dtype)  # distinct in fp32; bf16 rounds some to ties
    s[7, 3:9] = float("-inf")
    limit = torch.randint(0, n + 3, (R,), generator=g)
    limit[:5] = n
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = mod.topk_columns(s, limit, 1, k)
    finally:
        torch.set_num_threads(old)
    assert got.shape == (R, k) and got.dtype == torch.long
    for r in range(R):
        cols = torch.arange(1, max(1, min(int(limit[r]), n)))
        vals = s[r, cols].float()
        # the k best by (score, column): the reference for ties as well
        order = sorted(range(len(cols)), key=lambda i: (vals[i].item(), int(cols[i])), reverse=True)[:k]
        want = {int(cols[i]) for i in order if vals[i] > float("-inf")}
        row = got[r].tolist()
        assert {c for c in row if c >= 0} == want, r
        assert row.count(-1) == k - len(want), r
    # choose_blocks: compiled and torch.topk choose the same blocks where scores are distinct
    sc = torch.randn(64, 3, n, generator=g)
    own = torch.randint(0, n + 1, (64,), generator=g)
    with_native = indexer.choose_blocks(sc.clone(), own, k + 3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(indexer, "_native_topk", lambda s: None)
        with_torch = indexer.choose_blocks(sc.clone(), own, k + 3)
    assert torch.equal(with_native.sort(-1).values, with_torch.sort(-1).values)


def test_select_blocks_with_a_shared_score_buffer_is_unchanged():
    """Per-group block choice with `work` (one buffer for every chunk's scores, as
    attend_selected passes it) chooses exactly what it does with fresh tensors per chunk."""
    from nanoseek.model.indexer import pooled_keys
    g = torch.Generator().manual_seed(3)
    T, start, bs, G, H, D = 150, 90, 8, 3, 4, 16
    q, w = torch.randn(T, H, D, generator=g), torch.randn(T, G, H, generator=g)
    IK = torch.randn(start + T, D, generator=g)
    pooled = pooled_keys(IK, (start + T - 1) // bs, bs)
    work = torch.full((16 * (H + G) * pooled.shape[0],), float("nan"))
    fresh = select_blocks(q, w, IK, start, 64, bs, chunk=16, pooled=pooled)
    shared = select_blocks(q, w, IK, start, 64, bs, chunk=16, pooled=pooled, work=work)
    assert fresh.shape == (T, G, 8) and (fresh[:, :, 3:] >= 0).any()
    assert torch.equal(fresh, shared)


def test_converted_model_serves_over_http(tmp_path):
    """A converted model (per-group block selection) saved, loaded and served: /v1/completions
    returns what the in-process engine generates, for a prompt long enough that every query
    past the first blocks really selects."""
    import httpx

    from nanoseek.engine import Engine
    from nanoseek.serve import create_app
    from tests.test_serve_helpers import CharTokenizer, LiveServer
    _, sparse = dense_and_sparse("gqa-groups", block=4)
    sparse.save(tmp_path / "converted")
    model = load_hf(tmp_path / "converted")
    assert model.config.index_groups == 2
    tok = CharTokenizer()
    prompt = "The quick brown fox jumps over the lazy dog; " * 2
    want = LLM(model, tokenizer=tok, block_size=4).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    assert len(tok.encode(prompt)) > 3 * model.config.index_topk
    with LiveServer(create_app(Engine(model, tok, block_size=4, num_blocks=64), "converted")) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "converted", "prompt": prompt, "max_tokens": 10,
                                                       "temperature": 0, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want.text and len(want.token_ids) == 10

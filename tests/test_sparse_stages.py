"""DSA's training stages: what trains in each, and that the warm-up fits the indexer."""

import argparse

import pytest
import torch

from nanoseek.errors import NanoseekError
from nanoseek.model.indexer import drop_indexers, indexer_parameters
from nanoseek.train.sparse_stages import add_stage_args, indexer_warmup, indexers, set_stage, sparse_train, token_batches
from tests.test_sparse_attention import VOCAB, dense_and_sparse, ids


def batches(B=2, T=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, VOCAB, (B, T + 1), generator=g)


def split(model):
    ix = {id(p) for p in indexer_parameters(model)}
    return [p for p in model.parameters() if id(p) in ix], [p for p in model.parameters() if id(p) not in ix]


KINDS = [("gqa", 1), ("gqa", 4), ("gqa-groups", 4)]  # token-level, blocks, blocks chosen per KV group


@pytest.mark.parametrize("name,block", KINDS)
def test_warmup_trains_only_the_indexer_and_lowers_the_kl(name, block):
    dense, model = dense_and_sparse(name, topk=8, block=block)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hist = indexer_warmup(model, batches(), steps=15, lr=2e-2, warmup_steps=2)
    assert hist[-1] < 0.8 * hist[0]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (".indexer." in n), n
    # the warm-up ran the main attention densely and switched everything back afterwards
    assert all(not ix.dense and not ix.kl for ix in indexers(model))
    x = ids(1, 6)  # shorter than k: still exactly dense
    with torch.no_grad():
        assert torch.equal(model(x), dense(x))


def test_warmup_gradients_reach_the_indexer_only():
    _, model = dense_and_sparse("mla-qlora", topk=8)
    set_stage(model, "indexer-warmup")
    with torch.no_grad():  # the warm-up's main forward needs no graph: the KL grads land anyway
        model.hidden_states(ids(1, 30))
    ix, main = split(model)
    assert all(p.grad is not None for p in ix) and all(p.grad.any() for p in ix if p.ndim == 2)
    assert all(p.grad is None for p in main)
    kl_grads = [p.grad.clone() for p in ix]
    model(ids(1, 30)).sum().backward()  # with autograd on, the output's grads skip the indexer
    assert all(torch.equal(p.grad, 2 * g) for p, g in zip(ix, kl_grads))  # same KL grads, added twice
    set_stage(model, None)


@pytest.mark.parametrize("name,block", KINDS)
def test_sparse_stage_lm_loss_never_reaches_the_indexer(name, block):
    # blocks: 5 per query, 3 of them always kept, so that the KL over the two chosen is not trivially 0
    _, model = dense_and_sparse(name, topk=8 if block == 1 else 20, block=block)
    set_stage(model, "sparse")
    x = ids(2, 40)
    logits = model(x)  # the indexers' KL (over the selected keys) is backpropagated here
    ix, main = split(model)
    kl_grads = [p.grad.clone() for p in ix]
    assert all(g.any() for g in kl_grads)
    assert all(p.grad is None for p in main)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(ix, kl_grads))
    assert all(p.grad is not None for p in main) and any(p.grad.any() for p in main)
    set_stage(model, None)


def test_sparse_train_runs_and_returns_losses():
    _, model = dense_and_sparse("mla", topk=8)
    hist = sparse_train(model, batches(T=24), steps=3, lr=1e-3, indexer_lr=1e-3, warmup_steps=1)
    assert len(hist) == 3 and all(h["loss"] > 0 and h["kl"] >= 0 for h in hist)
    assert all(not ix.kl for ix in indexers(model)) and not model.training


def test_stage_cli_args_and_token_batches():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int)  # a caller's own flags are reused, not duplicated
    add_stage_args(p)
    a = p.parse_args(["--stage", "indexer-warmup", "--data", "x.txt", "--out", "o", "--index-topk", "256",
                      "--steps", "3"])
    assert a.stage == "indexer-warmup" and a.index_topk == 256 and a.index_layers is None and a.steps == 3
    assert p.parse_args(["--stage", "sparse"]).index_topk is None  # unset: the model's own (new indexers: 1024)
    b = next(token_batches(torch.arange(100), seq_len=10, batch_size=3))
    assert b.shape == (3, 11) and torch.equal(b[:, 1:] - b[:, :-1], torch.ones(3, 10, dtype=torch.long))


def test_run_stage_converts_a_checkpoint_end_to_end(tmp_path):
    """`nanoseek train --stage indexer-warmup` then `--stage sparse` on a saved model; it reloads."""
    from nanoseek.checkpoint.hf import load_hf
    from nanoseek.data.shards import ShardWriter
    from nanoseek.train.sparse_stages import run_stage
    dense, _ = dense_and_sparse("gqa")
    dense.save(tmp_path / "dense")
    w = ShardWriter(tmp_path / "shards", vocab_size=VOCAB)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        w.add(torch.randint(1, VOCAB, (50,), generator=g).tolist())
    w.close(bos_token_id=1, doc_end_token_id=2)
    p = argparse.ArgumentParser()
    add_stage_args(p)
    common = ["--data", str(tmp_path / "shards"), "--steps", "2", "--seq-len", "24", "--index-topk", "8",
              "--index-head-dim", "16", "--index-heads", "2", "--index-block-size", "4"]
    run_stage(p.parse_args(["--stage", "indexer-warmup", "--model", str(tmp_path / "dense"),
                            "--out", str(tmp_path / "default")] + common), log=lambda s: None)
    assert load_hf(tmp_path / "default").config.index_groups == 2  # GQA with blocks: one choice per KV head
    common += ["--index-groups", "1"]  # the rest starts from one shared choice
    run_stage(p.parse_args(["--stage", "indexer-warmup", "--model", str(tmp_path / "dense"),
                            "--out", str(tmp_path / "warm")] + common), log=lambda s: None)
    run_stage(p.parse_args(["--stage", "sparse", "--model", str(tmp_path / "warm"),
                            "--out", str(tmp_path / "sparse")] + common), log=lambda s: None)
    m = load_hf(tmp_path / "sparse")
    assert m.config.index_topk == 8 and m.config.index_block_size == 4 and all(layer.self_attn.indexer is not None for layer in m.layers)
    with torch.no_grad():
        assert torch.isfinite(m(ids(1, 30))).all()
    # a hybrid: layer 0 made dense again (its indexer dropped), saved without training
    run_stage(p.parse_args(["--stage", "indexer-warmup", "--model", str(tmp_path / "sparse"), "--out",
                            str(tmp_path / "hybrid"), "--dense-layers", "0"] + common + ["--steps", "0"]),
              log=lambda s: None)
    h = load_hf(tmp_path / "hybrid")
    assert h.config.index_layers == [1] and h.layers[0].self_attn.indexer is None
    assert h.layers[1].self_attn.indexer is not None
    with pytest.raises(NanoseekError, match="layer 0 has no indexer"):
        drop_indexers(h, [0])
    # per-group selection: a converted model's indexers split into one choice per KV head
    run_stage(p.parse_args(["--stage", "indexer-warmup", "--model", str(tmp_path / "hybrid"), "--out",
                            str(tmp_path / "groups")] + common[:-2] + ["--index-groups", "2"]), log=lambda s: None)
    g = load_hf(tmp_path / "groups")
    assert g.config.index_groups == 2 and g.layers[1].self_attn.indexer.weights_proj.weight.shape == (4, 64)
    with torch.no_grad():
        assert torch.isfinite(g(ids(1, 30))).all()
    # a stage without --index-topk / --index-block-size keeps the model's own, not the CLI defaults
    bare = [a for a in common if a not in ("--index-topk", "8", "--index-block-size", "4")]
    run_stage(p.parse_args(["--stage", "sparse", "--model", str(tmp_path / "groups"), "--out", str(tmp_path / "kept")]
                           + bare), log=lambda s: None)
    kept = load_hf(tmp_path / "kept").config
    assert kept.index_topk == 8 and kept.index_block_size == 4


def test_kl_every_fits_a_rotating_subset_of_query_chunks():
    """kl_every=n fits every n-th chunk of queries, another phase each call: over n calls the
    chunks' gradients add up to one full fit's."""
    from nanoseek.model import indexer as ixm
    _, model = dense_and_sparse("gqa", topk=8, block=4)
    set_stage(model, "indexer-warmup")
    x = ids(1, 40)
    old = ixm.QUERY_CHUNK
    try:
        ixm.QUERY_CHUNK = 8  # 5 chunks of queries
        with torch.no_grad():
            model.hidden_states(x)
        full = [p.grad.clone() for p in indexer_parameters(model)]
        for ix in indexers(model):
            ix.kl_every, ix.kl_calls = 2, 0
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.hidden_states(x)  # chunks 0, 2, 4 (weights 1/24 each), then chunks 1, 3 (1/16)
        first = [p.grad.clone() for p in indexer_parameters(model)]
        assert all(not torch.allclose(a, b) for a, b in zip(first, full) if a.ndim == 2)
        with torch.no_grad():
            model.hidden_states(x)
        both = [p.grad for p in indexer_parameters(model)]
        second = [b - a for a, b in zip(first, both)]
        recombined = [a * 24 / 40 + b * 16 / 40 for a, b in zip(first, second)]
        assert all(torch.allclose(r, f, atol=1e-6, rtol=1e-4) for r, f in zip(recombined, full))
    finally:
        ixm.QUERY_CHUNK = old
        set_stage(model, None)

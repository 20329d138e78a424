"""The engine: batching invariance, chunked prefill, prefix cache, preemption, abort, sampling."""

import pytest
import torch

from nanoseek.checkpoint.hf import load_hf
from nanoseek.engine import LLM, Engine
from nanoseek.model.kv_cache import DenseKVCache
from nanoseek.sampling import SamplingParams
from tests.tiny_models import VOCAB, make_deepseek_v3, make_llama


class CharTokenizer:
    """Token i <-> chr(ord('a') + i % 26): enough for the engine's stop-string logic."""
    eos_token_ids = [0]

    def encode(self, text):
        return [ord(c) - ord("a") + 1 for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + (i % 26)) for i in ids if not (skip_special_tokens and i == 0))


@pytest.fixture(scope="module", params=["llama", "deepseek_v3"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    (make_llama if request.param == "llama" else make_deepseek_v3)(path)
    m = load_hf(path)
    m.config.max_seq_len = 512
    return m


def prompts(n, seed=0, lo=3, hi=60):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def reference_greedy(model, prompt, n):
    cache, ids, out = DenseKVCache(model.config.n_layers, len(prompt) + n), torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids, cache.positions(1, ids.shape[1]), cache)
            cache.advance(ids.shape[1])
            out.append(int(logits[0, -1].argmax()))
            ids = torch.tensor([[out[-1]]])
    return out


def test_prompts_of_one_length_prefill_together_as_each_alone(model):
    """Whole prompts of equal length share one causal attention call (paged_attention.py): the
    first token's logprobs of each equal those of the prompt prefilled alone."""
    ps = prompts(4, seed=21, lo=17, hi=18) + prompts(2, seed=22, lo=9, hi=10)  # two lengths, 6 prompts
    first = SamplingParams(temperature=0, max_tokens=1, logprobs=3)
    engine = Engine(model, None, block_size=4, enable_prefix_caching=False)
    rids = [engine.add_request(p, first) for p in ps]
    together = {o.request_id: o for o in engine.step()}  # every prompt prefilled in this one step
    assert len(together) == len(ps)
    for rid, p in zip(rids, ps):
        alone = Engine(model, None, block_size=4, enable_prefix_caching=False)
        alone.add_request(p, first)
        want, got = alone.step()[0].outputs[0].logprobs[0], together[rid].outputs[0].logprobs[0]
        assert got["token_id"] == want["token_id"]
        assert [t for t, _ in got["top"]] == [t for t, _ in want["top"]]
        assert got["logprob"] == pytest.approx(want["logprob"], abs=1e-5)


def test_greedy_same_alone_or_among_31_others(model):
    ps = prompts(32)
    llm = LLM(model, block_size=4, max_batch_tokens=64)
    alone = llm.generate([ps[5]], GREEDY)[0].outputs[0].token_ids
    batch = llm.generate(ps, GREEDY)
    assert batch[5].outputs[0].token_ids == alone
    assert alone == reference_greedy(model, ps[5], 16)
    assert all(len(o.outputs[0].token_ids) == 16 and o.outputs[0].finish_reason == "length" for o in batch)


def test_chunked_prefill_equals_one_shot(model):
    p = prompts(1, seed=3, lo=50, hi=51)[0]
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=5, ignore_eos=True)
    one = LLM(model, max_batch_tokens=4096).generate([p], params)[0].outputs[0]
    chunked = LLM(model, max_batch_tokens=7, block_size=4).generate([p], params)[0].outputs[0]
    assert one.token_ids == chunked.token_ids
    for a, b in zip(one.logprobs, chunked.logprobs):
        assert abs(a["logprob"] - b["logprob"]) < 1e-4
        assert [i for i, _ in a["top"]] == [i for i, _ in b["top"]]
        assert max(abs(x - y) for (_, x), (_, y) in zip(a["top"], b["top"])) < 1e-4


def test_prefix_cache_hits_are_counted_and_exact(model):
    shared = prompts(1, seed=4, lo=40, hi=41)[0]
    ps = [shared + tail for tail in prompts(4, seed=5, lo=3, hi=9)]
    cold = LLM(model, block_size=4, enable_prefix_caching=False).generate(ps, GREEDY)
    llm = LLM(model, block_size=4)
    llm.generate([ps[0]], GREEDY)
    warm = llm.generate(ps[1:], GREEDY)
    assert [o.outputs[0].token_ids for o in warm] == [o.outputs[0].token_ids for o in cold[1:]]
    assert all(o.cached_tokens >= 40 for o in warm)
    assert llm.engine.blocks.hit_tokens >= 3 * 40


def test_reset_prefix_cache_after_a_weight_update(model):
    """Cached blocks hold keys of the weights that computed them: after an in-place update
    (an RL step) the cache is dropped, refused while a request is in flight, and afterwards the
    output is a fresh engine's on the new weights."""
    import copy
    m = copy.deepcopy(model)
    p = prompts(1, seed=21, lo=40, hi=41)[0]
    llm = LLM(m, block_size=4)
    llm.generate([p], GREEDY)
    with torch.no_grad():
        for w in m.parameters():
            if w.dim() == 2:
                w.mul_(1.3)
    assert llm.generate([p], GREEDY)[0].cached_tokens >= 36  # the stale hit this exists to stop
    rid = llm.engine.add_request(p, GREEDY)
    assert not llm.reset_prefix_cache()  # in flight: its blocks came from the old weights too
    llm.engine.abort(rid)
    assert llm.reset_prefix_cache()
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks and not llm.engine.blocks.cached
    out = llm.generate([p], GREEDY)[0]
    fresh = LLM(m, block_size=4, enable_prefix_caching=False).generate([p], GREEDY)[0]
    assert out.cached_tokens == 0 and out.outputs[0].token_ids == fresh.outputs[0].token_ids


def test_shared_prefix_decodes_once_for_all_and_exactly(model, monkeypatch):
    """Cascade decode: 12 requests sharing a 40-token prefix (cached blocks) attend it once per
    step for all of them; every greedy output equals the reference."""
    import nanoseek.engine.paged_attention as pa
    monkeypatch.setattr(pa, "CASCADE_MIN", 16)
    used = []
    real = pa.attend_rows
    monkeypatch.setattr(pa, "attend_rows", lambda *a, **k: used.append(k.get("shared") is not None) or real(*a, **k))
    prefix = prompts(1, seed=11, lo=40, hi=41)[0]
    ps = [prefix + tail for tail in prompts(12, seed=12, lo=2, hi=9)]
    llm = LLM(model, block_size=4, max_batch_tokens=512)
    llm.generate([prefix], SamplingParams(temperature=0, max_tokens=1))  # fills the prefix cache
    outs = llm.generate(ps, GREEDY)
    assert any(used), "the shared-prefix path never ran"
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == reference_greedy(model, p, 16)


def test_small_kv_budget_preempts_and_completes_64(model):
    ps = prompts(64, seed=6)
    ref = LLM(model, block_size=4).generate(ps, GREEDY)
    llm = LLM(model, block_size=4, num_blocks=48, max_batch_tokens=128)
    out = llm.generate(ps, GREEDY)
    assert llm.engine.metrics.preemptions > 0
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in ref]
    assert llm.engine.blocks.num_used == 0


def test_admission_keeps_a_watermark_for_running_sequences(model):
    """A new prompt waits while admitting it would leave less than the watermark free; an idle
    engine admits what fits, so nothing waits forever."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    # 10 blocks; none (still one per running sequence); no reserve at all (the old rule)
    for watermark, admitted in ((0.25, False), (0.0, True), (None, True)):
        eng = Engine(model, None, block_size=4, num_blocks=40, enable_prefix_caching=False, watermark=watermark)
        a = eng.add_request(prompts(1, seed=8, lo=20, hi=21)[0], params)   # 6 blocks with its first token
        eng.step()
        eng.add_request(prompts(1, seed=9, lo=100, hi=101)[0], params)     # 26 blocks: would leave 8 free
        eng.step()
        assert (len(eng.running) == 2) == admitted and len(eng.waiting) == (not admitted)
    eng.abort(a)
    # 6 blocks a request: the 7th would leave 3 free for 7 running sequences. The 1% watermark
    # (1 block) would let it in; the reserve of one block per running sequence does not.
    for watermark, running in ((0.01, 6), (None, 7)):
        tight = Engine(model, None, block_size=4, num_blocks=40, enable_prefix_caching=False, watermark=watermark)
        tight.add_request(prompts(1, seed=8, lo=20, hi=21)[0], params)
        tight.step()
        for seed in range(10, 16):
            tight.add_request(prompts(1, seed=seed, lo=20, hi=21)[0], params)
        tight.step()
        assert len(tight.running) == running and len(tight.waiting) == 7 - running
    big = Engine(model, None, block_size=4, num_blocks=40, enable_prefix_caching=False, watermark=0.5)
    big.add_request(prompts(1, seed=9, lo=100, hi=101)[0], params)
    big.step()
    assert len(big.running) == 1  # alone, it runs although the watermark is not kept


def test_abort_frees_all_blocks(model):
    eng = Engine(model, None, block_size=4, enable_prefix_caching=False)
    ids = [eng.add_request(p, GREEDY) for p in prompts(8, seed=7)]
    eng.step()
    eng.step()
    assert eng.blocks.num_used > 0
    for rid in ids:
        out = eng.abort(rid)
        assert out.outputs[0].finish_reason in ("abort", "length")
    assert eng.blocks.num_used == 0 and not eng.has_unfinished()


def test_generate_iter_yields_as_requests_finish_and_an_abandoned_one_frees_blocks(model):
    llm = LLM(model, block_size=4, max_batch_tokens=256, enable_prefix_caching=False)
    ps = prompts(6, seed=3)
    params = [SamplingParams(temperature=0, max_tokens=12 - 2 * i, ignore_eos=True) for i in range(6)]
    order = [i for i, out in llm.generate_iter(ps, params)]
    assert sorted(order) == list(range(6)) and order[0] == 5  # the shortest request comes back first
    it = llm.generate_iter(ps, params)
    next(it)
    it.close()  # a caller that stops listening (an exception, Ctrl-C) must not leave blocks held
    assert llm.engine.blocks.num_used == 0 and not llm.engine.has_unfinished()
    # max_in_flight: never more than that many in the engine, topped up as each one finishes
    in_engine, step = [], llm.engine.step
    llm.engine.step = lambda: in_engine.append(len(llm.engine.requests)) or step()
    outs = dict(llm.generate_iter(ps, params, max_in_flight=2))
    assert sorted(outs) == list(range(6)) and max(in_engine) == 2 and in_engine.count(2) > len(in_engine) // 2
    assert [outs[i].outputs[0].token_ids for i in range(6)] == [o.outputs[0].token_ids for o in llm.generate(ps, params)]


def test_seeded_sampling_reproducible_whatever_the_batch(model):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=12, seed=1234, ignore_eos=True)
    p = prompts(1, seed=8)[0]
    alone = LLM(model).generate([p], params)[0].outputs[0].token_ids
    mixed = LLM(model, block_size=4).generate(prompts(10, seed=9) + [p], [SamplingParams(temperature=1.0, max_tokens=12)] * 10 + [params])
    assert mixed[-1].outputs[0].token_ids == alone
    other = LLM(model).generate([p], SamplingParams(temperature=1.0, max_tokens=12, seed=99, ignore_eos=True))
    assert other[0].outputs[0].token_ids != alone


def test_stop_strings_cut_exactly_and_never_leak_while_streaming(model):
    tok = CharTokenizer()
    eng = Engine(model, tok)
    p = prompts(1, seed=10)[0]
    free = LLM(model, tokenizer=tok).generate([p], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    text = free.outputs[0].text
    stop = text[10:13]  # a stop string the model really produces
    first = text.find(stop)
    rid = eng.add_request(p, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))
    seen = []
    while eng.has_unfinished():
        for o in eng.step():
            seen.append(o.outputs[0].text)
    assert seen[-1] == text[:first]
    assert all(stop not in s and text[:first].startswith(s) for s in seen)
    assert o.outputs[0].finish_reason == "stop" and o.outputs[0].stop_reason == stop


def test_bad_requests_rejected(model):
    from nanoseek.errors import NanoseekError
    eng = Engine(model, None)
    with pytest.raises(NanoseekError, match="empty prompt"):
        eng.add_request([], GREEDY)
    with pytest.raises(NanoseekError, match="exceeds the context limit"):
        eng.add_request([1] * 500, SamplingParams(max_tokens=100))
    with pytest.raises(NanoseekError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_n_samples_and_counters(model):
    llm = LLM(model, block_size=4)
    out = llm.generate([prompts(1, seed=11)[0]], SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=5, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    s = llm.engine.stats()
    assert s["generation_tokens"] == 24 and s["running"] == 0 and s["queue_length"] == 0
    assert llm.engine.metrics.ttft.n == 3 and llm.engine.metrics.itl.n == 21

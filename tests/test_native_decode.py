"""The compiled decode loop (engine/csrc/decode.cpp, loaded by engine/native.py): its paged
attention against a dense reference, and every decode step of the engine against the Python loop
it replaces, from the same cache state, in each precision it runs."""

import os
import subprocess
import sys
import time

import pytest
import torch

from nanoseek.checkpoint.hf import load_hf
from nanoseek.engine import Engine, native
from nanoseek import hardware
from nanoseek.engine.flat_decode import FlatDecoder
from nanoseek.quant import quantize_model
from nanoseek.sampling import SamplingParams
from tests.tiny_models import make_llama, make_qwen2

from tests.fixtures import one_thread  # noqa: E402,F401  (autouse: this module runs on one thread)


@pytest.fixture(scope="module")
def mod():
    m = native.module()
    if m is None:
        if os.environ.get("NANOSEEK_REQUIRE_NATIVE") == "1":
            pytest.fail("the native decode loop did not build (see the message above)")
        pytest.skip("no C++ compiler: the native decode loop is not built")
    return m


def reference_attention(qkv, kc, vc, tables, lens, H, Hkv, scale):
    """Each row's query heads over its cached keys, by plain dense softmax attention in float64."""
    D = kc.shape[-1]
    out = []
    for r in range(qkv.shape[0]):
        L = int(lens[r])
        K = kc[tables[r]].flatten(0, 1)[:L].double().repeat_interleave(H // Hkv, dim=1)  # [L, H, D]
        V = vc[tables[r]].flatten(0, 1)[:L].double().repeat_interleave(H // Hkv, dim=1)
        q = qkv[r, :H * D].view(H, D).double()
        p = (torch.einsum("hd,lhd->hl", q, K) * scale).softmax(-1)
        out.append(torch.einsum("hl,lhd->hd", p, V).reshape(-1))
    return torch.stack(out)


# each head size the kernel is compiled for is its own code; G = H / Hkv query heads a KV head
@pytest.mark.parametrize("H,Hkv,D", [(6, 2, 16), (9, 3, 64), (14, 2, 128), (4, 4, 8), (8, 2, 32)])
@pytest.mark.parametrize("threads", [1, 2])  # 2: a single sequence splits by KV head
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bf16_dot", ["1", "0"])  # 0: the widened loop, as on a CPU without AVX512-BF16
def test_paged_attention_matches_dense_attention(mod, dtype, threads, H, Hkv, D, bf16_dot, monkeypatch):
    monkeypatch.setenv("NANOSEEK_BF16_DOT", bf16_dot)
    torch.manual_seed(0)
    bs, nb = 4, 64
    kc, vc = torch.randn(nb, bs, Hkv, D, dtype=dtype), torch.randn(nb, bs, Hkv, D, dtype=dtype)
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # one key; a partial last block; mixed lengths (not multiples of the eight scored at once)
        for lens in ([1], [13], [1, 7, 30, 9, 22], [16, 8, 3]):
            lens = torch.tensor(lens)
            width = int((lens.max() + bs - 1) // bs)
            tables = torch.randperm(nb)[:len(lens) * width].view(len(lens), width)  # scattered blocks
            qkv = torch.randn(len(lens), (H + 2 * Hkv) * D, dtype=dtype)
            got = mod.attention(qkv, kc, vc, tables, lens, H, Hkv, D ** -0.5)
            want = reference_attention(qkv, kc, vc, tables, lens, H, Hkv, D ** -0.5)
            tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the output's own rounding
            assert torch.allclose(got.double(), want, atol=tol, rtol=tol), (lens, (got.double() - want).abs().max())
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    out = {}
    for name, make in (("llama", make_llama), ("qwen2", make_qwen2)):  # qwen2: q/k/v biases
        out[name] = tmp_path_factory.mktemp(name)
        make(out[name])
    return out


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "int4", "int8 slow-bf16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_step_agrees_with_the_python_loop(mod, sources, monkeypatch, arch, precision):
    """Decode steps, whole prompts, a prompt's later chunk and steps that mix them all run compiled;
    each against the Python loop (the modules' ops: SDPA for prompts) from the same cache state.
    slow-bf16: as on a CPU without bf16 matmul units, where int8 rows above the packed kernel's
    multiply in fp32 (hardware.matmul_dtype), compiled and in Python alike."""
    if precision.endswith("slow-bf16"):
        monkeypatch.setattr(hardware, "_cpu_bf16", lambda: False)
        precision = precision.split()[0]
    model = load_hf(sources[arch], "fp32" if precision in ("int8", "int4") else precision)
    if precision in ("int8", "int4"):  # bf16 activations: the int8 and int4 CPU kernels' dtype
        model = quantize_model(model, precision, dtype=torch.bfloat16, quantize_embeddings=True)
    python_step = FlatDecoder.hidden_states
    checked, errors = [], []

    def both(self, ids, pos, cache):
        """This step as the engine runs it, then (where that was the compiled loop) again from the
        same cache state in Python; carry on with Python's."""
        saved = [t.clone() for t in cache.cache.k + cache.cache.v]
        got = python_step(self, ids, pos, cache)
        if not self.ran_native:
            return got
        for t, s in zip(cache.cache.k + cache.cache.v, saved):
            t.copy_(s)
        with monkeypatch.context() as m:
            m.setattr(FlatDecoder, "_native", lambda self, *step: None)
            want = python_step(self, ids, pos, cache)
        checked.append((ids.shape[1], cache.all_decode, [new for _, _, new in cache.seqs]))
        errors.append(((got.float() - want.float()).abs().max() / want.float().abs().max()).item())
        return want

    monkeypatch.setattr(FlatDecoder, "hidden_states", both)
    # 16 tokens a step: the first step is a whole prompt and the first chunk of the next, the
    # second that prompt's later chunk, a third prompt and a decode
    engine = Engine(model, None, num_blocks=64, block_size=4, max_batch_tokens=16)
    for p, n in (([3, 5, 7, 11, 13], 6), ([2] * 17, 9), (list(range(20, 29)), 12)):  # 3 rows, then 2, then 1
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    assert checked[0] == (16, False, [5, 11]) and checked[1] == (16, False, [1, 6, 9])
    decodes = [rows for rows, all_decode, _ in checked if all_decode]
    assert max(decodes) == 3 and min(decodes) == 1  # decode steps of 3 rows ran natively, down to 1
    # fp32: only the order of float sums differs; bf16 activations: a few roundings land one ulp off
    assert max(errors) < (1e-5 if precision == "fp32" else 2e-2), errors


def test_long_prompts_go_to_the_modules(mod, sources, monkeypatch):
    """Prompt rows that see more than NATIVE_PROMPT_KEYS keys leave the step to the modules (SDPA's
    flash kernel beats a row-by-row read of the keys there); decodes stay compiled."""
    from nanoseek.engine import flat_decode
    monkeypatch.setattr(flat_decode, "NATIVE_PROMPT_KEYS", 8)
    model = load_hf(sources["llama"])
    engine = Engine(model, None, num_blocks=64, block_size=4, max_batch_tokens=6)
    ran = []
    real = FlatDecoder.hidden_states

    def record(self, ids, pos, cache):
        out = real(self, ids, pos, cache)
        ran.append((ids.shape[1], self.ran_native))
        return out

    monkeypatch.setattr(FlatDecoder, "hidden_states", record)
    engine.add_request(list(range(3, 13)), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    while engine.has_unfinished():
        out = engine.step()
    assert len(out[0].outputs[0].token_ids) == 3
    # chunks of 6 then 4 tokens: the first (keys 1..6) compiled, the second (keys up to 10) by the
    # modules (the flat loop not entered), then two compiled decodes
    assert ran == [(6, True), (1, True), (1, True)]


@pytest.mark.parametrize("threads", [1, 2])
def test_argmax_rows_is_torch_max(mod, threads):
    """The greedy pick: the first maximum of each row (ties, rows of any length, infinities), a NaN
    counting as the maximum, as torch.max(-1) has it."""
    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for N in (1, 7, 8, 15, 16, 17, 100, 49152):
            x = torch.randn(33, N)
            x[1] = 0.5  # all equal: the first
            x[2, N // 2:] = 9.0  # a tie later in the row: its first
            x[3, -1] = float("inf")
            x[4] = float("-inf")
            x[5, N // 3] = float("nan")
            x[6, :] = x[6].round()  # many ties across lanes
            assert torch.equal(mod.argmax_rows(x), x.max(-1).indices), N
    finally:
        torch.set_num_threads(n)


def test_native_steps_aside_when_disabled(monkeypatch, sources):
    monkeypatch.setenv("NANOSEEK_NATIVE", "0")
    monkeypatch.setattr(native, "_state", {})
    assert native.module() is None
    model = load_hf(sources["llama"])
    engine = Engine(model, None, num_blocks=64, block_size=4)
    engine.add_request([3, 5, 7], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished():
        out = engine.step()
    assert len(out[0].outputs[0].token_ids) == 4
    assert engine.flat is not None and engine.flat.natives == {torch.float32: None}  # the Python loop ran it


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_a_lock_left_by_a_killed_build_is_dropped_and_a_live_build_is_waited_for(tmp_path):
    """torch's builder waits forever on a lock file a killed build left (however fresh): with
    nobody holding our flock it is dropped; while another process holds it, the claim waits."""
    build = tmp_path / native.NAME
    build.mkdir()
    lock = build / "lock"
    lock.write_text("")
    native.claim_build(build).close()
    assert not lock.exists()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(build / 'nanoseek.flock')!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        f"open({str(lock)!r}, 'w').close(); print('held', flush=True); time.sleep(1.5)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t = time.monotonic()
        held = native.claim_build(build)
        waited = time.monotonic() - t
        held.close()
    finally:
        holder.wait(timeout=30)
    assert waited > 0.5 and not lock.exists()  # it waited for the live build, then cleared its lock


def _generate(model, prompts, n, engine=None):
    """Greedy tokens and their logprobs (which differ unless the logits are the same) per prompt."""
    # no prefix cache: its blocks would keep keys that the weights before an update computed
    engine = engine or Engine(model, None, num_blocks=64, block_size=4, enable_prefix_caching=False)
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=0))
           for p in prompts]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                o = out.outputs[0]
                done[out.request_id] = (o.token_ids, [lp["logprob"] for lp in o.logprobs])
    return engine, [done[i] for i in ids]


def test_no_prepacked_weights_where_the_cpu_cannot_hold_them(mod, sources, monkeypatch):
    """On an AVX2-only CPU oneDNN has no bf16 blocked layout (its reorder raises): a bf16 engine then
    runs on the plain weights, even with NANOSEEK_PREPACK=1."""
    model = load_hf(sources["llama"], "bf16")
    prompts, n = [[3, 5, 7, 11], [2] * 9], 6
    monkeypatch.setenv("NANOSEEK_PREPACK", "0")
    want = _generate(model, prompts, n)[1]
    monkeypatch.setenv("NANOSEEK_PREPACK", "1")
    monkeypatch.setattr(hardware, "_cpu_bf16", lambda: False)
    engine, got = _generate(model, prompts, n)
    assert not engine.flat.prepacked and engine.flat.head is None and engine.flat.natives[torch.bfloat16] is not None
    assert got == want


@pytest.mark.skipif(not hardware.bf16_fast("cpu"), reason="this CPU has no oneDNN bf16 blocked layout")
def test_prepacked_weights_give_the_same_logits_and_follow_in_place_updates(mod, sources, monkeypatch):
    """bf16 weights (and the head) in oneDNN's layout are the same matmul as F.linear's; an in-place
    update of a weight (an optimizer step between RL rollouts) is seen by the next step."""
    model = load_hf(sources["llama"], "bf16")
    prompts, n = [[3, 5, 7, 11], [2] * 9, list(range(20, 26))], 8
    monkeypatch.setenv("NANOSEEK_PREPACK", "1")
    packed_engine, packed = _generate(model, prompts, n)
    flat = packed_engine.flat
    assert flat.prepacked and flat.head is not None and flat.natives[torch.bfloat16] is not None
    monkeypatch.setenv("NANOSEEK_PREPACK", "0")
    engine, plain = _generate(model, prompts, n)
    assert not engine.flat.prepacked and engine.flat.head is None
    assert packed == plain

    with torch.no_grad():  # in place: same tensors, same storage; only their versions move
        model.layers[0].mlp.down_proj.weight.mul_(-3.0)
        model.lm_head.weight[:, :4].mul_(2.0)  # the head (prepacked too)
    want = _generate(model, prompts, n)[1]  # NANOSEEK_PREPACK=0: no copies to go stale
    assert want != plain  # the update changes what is generated
    monkeypatch.setenv("NANOSEEK_PREPACK", "1")
    assert _generate(model, prompts, n, packed_engine)[1] == want  # the same engine, copies made again
    assert packed_engine.flat is flat and flat.prepacked_versions == tuple(w._version for w in flat.prepacked)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_int4_dequantize_is_the_python_one_exactly(mod, dtype):
    from nanoseek.quant import int4
    torch.manual_seed(0)
    for N, K, group in ((96, 64, 32), (8, 256, 128), (3, 48, 16)):
        q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
        scale, lo = torch.rand(N, K // group) * 0.1, torch.randn(N, K // group) * 0.1
        packed = int4.pack_nibbles(q)
        assert torch.equal(mod.dequantize_int4(packed, scale, lo, dtype), int4.dequantize(q, scale, lo, dtype))
    with pytest.raises(RuntimeError, match="groups of a multiple of 8"):
        mod.dequantize_int4(int4.pack_nibbles(torch.zeros(2, 12, dtype=torch.uint8)), torch.ones(2, 3), torch.ones(2, 3), dtype)

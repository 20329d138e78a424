"""The engine's flat decode loop (engine/flat_decode.py) in Python: bit-identical to the modules,
and it steps aside whenever the model is not the one it read. (Its compiled form, which the loop
hands all-decode steps to where it can, is tests/test_native_decode.py's.)"""

import copy

import pytest
import torch

import nanoseek
from nanoseek.checkpoint.hf import load_hf
from nanoseek.engine import Engine
from nanoseek.engine.flat_decode import FlatDecoder
from nanoseek.quant import quantize_model
from nanoseek.sampling import SamplingParams
from tests.tiny_models import make_deepseek_v3, make_llama, make_qwen2

from tests.fixtures import one_thread  # noqa: E402,F401  (autouse: this module runs on one thread)

PRECISIONS = ["fp32", "bf16", "int8", "int4"]


@pytest.fixture(autouse=True)
def python_loop(monkeypatch):
    """These tests are the Python loop's: the compiled one rounds sums in another order."""
    monkeypatch.setattr(FlatDecoder, "_native", lambda self, *step: None)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    out = {}
    for name, make in (("llama", make_llama), ("qwen2", make_qwen2), ("deepseek_v3", make_deepseek_v3)):
        out[name] = tmp_path_factory.mktemp(name)
        make(out[name])
    return out


def model_of(path, precision):
    model = load_hf(path, "fp32" if precision in ("int8", "int4") else precision)
    return quantize_model(model, precision, quantize_embeddings=True) if precision in ("int8", "int4") else model


def decode(engine, prompts, n=10):
    """Greedy ids and logprobs of each prompt, all decoded together (so steps carry 1-3 rows)."""
    for p in prompts:
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=2))
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] = o
    return [(o.outputs[0].token_ids, [lp["logprob"] for lp in o.outputs[0].logprobs])
            for _, o in sorted(outs.items())]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_flat_decode_is_bit_identical_to_the_modules(sources, monkeypatch, arch, precision):
    model = model_of(sources[arch], precision)
    prompts = [[3, 5, 7, 11, 13], [2] * 17, list(range(20, 29))]
    flat = Engine(model, None, num_blocks=64, block_size=4)
    got = decode(flat, prompts)
    assert flat.flat is not None  # the flat loop ran
    modules = Engine(copy.deepcopy(model), None, num_blocks=64, block_size=4)
    monkeypatch.setattr(FlatDecoder, "of", classmethod(lambda cls, m: None))
    want = decode(modules, prompts)
    assert modules.flat is None
    assert got == want  # same tokens, same logprobs to the last bit


def test_flat_decoder_refuses_what_it_cannot_run(sources):
    moe = load_hf(sources["deepseek_v3"])  # MLA + MoE
    Engine(moe, None, num_blocks=16)  # packs what it can
    with torch.inference_mode():
        assert FlatDecoder.of(moe) is None
        dense = load_hf(sources["llama"])
        Engine(dense, None, num_blocks=16)
        assert FlatDecoder.of(dense) is not None
        dyn = quantize_model(copy.deepcopy(dense), "int8-dynamic")  # activations quantized: not its ops
        Engine(dyn, None, num_blocks=16)
        assert FlatDecoder.of(dyn) is None
    assert FlatDecoder.of(dense) is None  # with autograd on, the packed matmuls (and so the loop) stand aside


def test_flat_decoder_notices_swaps_casts_and_hooks(sources):
    model = load_hf(sources["llama"])
    engine = Engine(model, None, num_blocks=64, block_size=4, enable_prefix_caching=False)  # same prefill each run
    prompts = [[3, 5, 7, 11, 13]]
    first = decode(engine, prompts)
    plan = engine.flat
    with torch.inference_mode():
        assert plan is not None and plan.current()
        model.layers[1].mlp.down_proj = copy.deepcopy(model.layers[1].mlp.down_proj)  # a module swapped
        assert not plan.current()
    assert decode(engine, prompts) == first and engine.flat is not plan  # rebuilt on the new module
    plan = engine.flat
    with torch.inference_mode():
        model.layers[0].input_layernorm.weight.data = model.layers[0].input_layernorm.weight.data.clone()
        assert not plan.current()  # a tensor moved
        seen = []
        handle = model.layers[0].register_forward_hook(lambda m, i, o: seen.append(1))
        assert FlatDecoder.of(model).current() is False  # a hook wants to see the module run
    decode(engine, prompts, n=3)
    assert seen  # ... and it did
    handle.remove()
    # quantizing in place: the loop is rebuilt on the int4 modules and still agrees with them
    quantize_model(model, "int4", dtype=torch.float32)  # the engine's KV cache stays fp32
    nanoseek.model.packing.pack_projections(model)
    got = decode(engine, prompts)
    assert engine.flat is not None and engine.flat.layers[0][-2][0].__name__ == "int4_mm"
    ref = Engine(copy.deepcopy(model), None, num_blocks=64, block_size=4, enable_prefix_caching=False)
    ref.flat = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FlatDecoder, "of", classmethod(lambda cls, m: None))
        assert decode(ref, prompts) == got

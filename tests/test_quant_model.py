"""Quantized models: quantize -> save -> load round trips, DeepSeek-format FP8 checkpoints
(odd shapes), transformers loading ours, quantize-on-load, and the engine serving them."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek.checkpoint.fp8 import dequantize_fp8_blocks, quantize_fp8_blocks
from nanoseek.checkpoint.hf import load_hf
from nanoseek.errors import NanoseekError
from nanoseek.model.kv_cache import DenseKVCache
from nanoseek.quant import QuantizedTransformer, quantize_model
from nanoseek.quant.layers import Fp8Embedding, Fp8Linear, Int4Linear, Int8Embedding, Int8Linear
from nanoseek.sampling import SamplingParams
from tests.tiny_models import VOCAB, make_deepseek_v3, make_llama, make_qwen2

# Relative L2 error of the logits vs the fp32 model, on these tiny random models. For scale:
# plain bf16 is ~0.006 here. INT8 adds ~0.01-0.02, FP8 (3 mantissa bits) ~0.03-0.05; with the
# embedding table and lm_head quantized too, errors grow by about half.
LOGIT_TOL = {"int8": 0.03, "int8-dynamic": 0.03, "int4": 0.12, "fp8": 0.07}

MAKERS = {"llama": make_llama, "qwen2-tied": make_qwen2, "deepseek_v3": make_deepseek_v3}


from tests.fixtures import one_thread  # noqa: E402,F401  (autouse: this module runs on one thread)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    out = {}
    for name, make in MAKERS.items():
        path = tmp_path_factory.mktemp(name)
        make(path)
        out[name] = path
    return out


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def ids(n=19, seed=0):
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", list(MAKERS))
@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic", "int4", "fp8"])
@pytest.mark.parametrize("embeddings", [False, True], ids=["emb-bf16", "emb-quant"])
@torch.no_grad()
def test_quantize_save_load_round_trip(sources, tmp_path, arch, scheme, embeddings):
    ref = load_hf(sources[arch])
    x = ids()
    base = ref(x)
    q = quantize_model(copy.deepcopy(ref), scheme, quantize_embeddings=embeddings)
    assert isinstance(q, QuantizedTransformer) and q.dtype == torch.bfloat16
    out = q(x)
    tol = LOGIT_TOL[scheme] * (1.5 if embeddings else 1)
    assert rel(out, base) < tol
    q.save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    if scheme == "fp8":
        assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                              "weight_block_size": [128, 128]}
    else:
        assert cfg["quantization_config"]["scheme"] == scheme
    back = load_hf(tmp_path, "bf16")
    assert isinstance(back, QuantizedTransformer) and back.quant_scheme == scheme
    assert torch.equal(back(x), out)  # bit for bit: the file holds exactly what was in memory
    lin = {"fp8": Fp8Linear, "int4": Int4Linear}.get(scheme, Int8Linear)
    # int4 needs K in groups of 32: DeepSeek's o_proj (K = 4 heads x 12) falls back to int8
    o_lin = Int8Linear if scheme == "int4" and arch == "deepseek_v3" else lin
    assert isinstance(back.layers[0].self_attn.o_proj, o_lin)
    emb = (Fp8Embedding if scheme == "fp8" else Int8Embedding) if embeddings else torch.nn.Embedding
    assert type(back.embed_tokens) is emb
    if back.config.tie_embeddings and embeddings:
        assert back.lm_head.qweight is back.embed_tokens.qweight  # one table in memory, one in the file
    if arch == "deepseek_v3":
        moe = back.layers[1].mlp
        assert isinstance(moe.experts[0].down_proj, lin) and isinstance(moe.shared_experts.up_proj, lin)
        assert moe.gate.weight.dtype == torch.bfloat16  # the router stays float
        assert moe.gate.e_score_correction_bias.dtype == torch.float32


@torch.no_grad()
def test_file_size_halves_with_embeddings(sources, tmp_path):
    ref = load_hf(sources["qwen2-tied"])
    copy.deepcopy(ref).to(torch.bfloat16).save(tmp_path / "bf16")
    sizes = {"bf16": (tmp_path / "bf16" / "model.safetensors").stat().st_size}
    for emb in (False, True):
        quantize_model(copy.deepcopy(ref), "int8", quantize_embeddings=emb).save(tmp_path / str(emb))
        sizes[emb] = (tmp_path / str(emb) / "model.safetensors").stat().st_size
    assert sizes[True] < sizes[False] < sizes["bf16"]
    assert sizes[True] < 0.56 * sizes["bf16"]  # int8 + an fp32 scale per row, norms/biases bf16


@torch.no_grad()
def test_deepseek_format_fp8_checkpoint_with_odd_shapes(tmp_path):
    """A checkpoint laid out like DeepSeek-V3's own: every projection fp8 + weight_scale_inv,
    dims that are not multiples of 128 (partial edge blocks), router and norms bf16, and the
    multi-token-prediction layer past num_hidden_layers (skipped)."""
    make_deepseek_v3(tmp_path, hidden_size=160, q_lora_rank=136, moe_intermediate_size=48)
    ref = load_hf(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    for name in list(sd):
        if name.endswith("proj.weight") and sd[name].ndim == 2:
            sd[name], sd[name + "_scale_inv"] = quantize_fp8_blocks(sd[name])
        elif sd[name].dtype == torch.float32 and "e_score_correction_bias" not in name:
            sd[name] = sd[name].to(torch.bfloat16)
    mtp = "model.layers.3.self_attn.o_proj.weight"
    sd[mtp], sd[mtp + "_scale_inv"] = quantize_fp8_blocks(torch.randn(160, 64))
    save_file(sd, tmp_path / "model.safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))

    model, _ = nanoseek.load(tmp_path, "fp32")
    q_a = model.layers[0].self_attn.q_a_proj
    assert isinstance(q_a, Fp8Linear) and q_a.qweight.shape == (136, 160) and q_a.weight_scale_inv.shape == (2, 2)
    want = dequantize_fp8_blocks(sd["model.layers.0.self_attn.q_a_proj.weight"],
                                 sd["model.layers.0.self_attn.q_a_proj.weight_scale_inv"])
    assert torch.equal(q_a.weight, want)
    assert (q_a.weight - ref.layers[0].self_attn.q_a_proj.weight).abs().max() < 0.07 * want.abs().max()
    x = ids(11)
    assert rel(model(x), ref(x)) < 0.1
    assert isinstance(model.layers[1].mlp.experts[3].gate_proj, Fp8Linear)


@torch.no_grad()
def test_transformers_loads_our_fp8_deepseek_checkpoint(sources, tmp_path):
    """transformers has no CPU FP8 matmul: it dequantises our blocks on load (with a warning)
    and must then compute what we compute."""
    from transformers import AutoModelForCausalLM
    ref = load_hf(sources["deepseek_v3"])
    q = quantize_model(copy.deepcopy(ref), "fp8", dtype=torch.float32)
    q.save(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = ids(13)
    assert (hf(x).logits - q(x)).abs().max() < 1e-4


@torch.no_grad()
def test_load_with_a_quantization_precision(sources, tmp_path):
    model, _ = nanoseek.load(sources["llama"], "int8")
    assert isinstance(model, QuantizedTransformer) and model.quant_scheme == "int8"
    assert isinstance(model.layers[1].mlp.down_proj, Int8Linear) and not model.layers[1].mlp.down_proj.dynamic
    # int8 takes the embeddings and the lm_head too (their bf16 matmul would dominate a decode step)
    assert isinstance(model.embed_tokens, Int8Embedding) and isinstance(model.lm_head, Int8Linear)
    assert model.dtype == torch.bfloat16
    fp8_direct, _ = nanoseek.load(sources["llama"], "fp8")  # fp8 keeps them: on CPU it computes from bf16 anyway
    assert isinstance(fp8_direct.embed_tokens, torch.nn.Embedding)
    model.save(tmp_path)
    again, _ = nanoseek.load(tmp_path, "int8-dynamic")  # an int8 checkpoint, switched to dynamic activations
    assert again.quant_scheme == "int8-dynamic" and again.layers[1].mlp.down_proj.dynamic
    assert torch.equal(again.layers[1].mlp.down_proj.qweight, model.layers[1].mlp.down_proj.qweight)
    fp8, _ = nanoseek.load(tmp_path, "fp8")  # int8 -> dequantise -> fp8
    assert isinstance(fp8.layers[1].mlp.down_proj, Fp8Linear)
    with pytest.raises(NanoseekError, match="'int3'"):
        nanoseek.load(sources["llama"], "int3")


@pytest.mark.parametrize("arch", list(MAKERS))
@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_num_params_is_unchanged_by_quantization(sources, arch, scheme):
    """A packed weight counts as its logical out x in; a tied table (qwen2-tied) counts once."""
    model = load_hf(sources[arch])
    dense = model.num_params()
    assert quantize_model(model, scheme, quantize_embeddings=True).num_params() == dense


@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic", "int4", "fp8"])
@torch.no_grad()
def test_engine_generates_with_quantized_model(sources, scheme):
    """Greedy decoding through the paged engine (MLA's absorbed path reads kv_b_proj.weight,
    here dequantised) equals step-by-step decoding with a dense cache."""
    model = quantize_model(load_hf(sources["deepseek_v3"]), scheme, quantize_embeddings=True)
    model.config.max_seq_len = 256
    prompt, n = list(range(3, 20)), 12
    llm = nanoseek.LLM(model, block_size=4, max_batch_tokens=64)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0].outputs[0]
    cache, x, want = DenseKVCache(model.config.n_layers, len(prompt) + n), torch.tensor([prompt]), []
    for _ in range(n):
        logits = model(x, cache.positions(1, x.shape[1]), cache)
        cache.advance(x.shape[1])
        want.append(int(logits[0, -1].argmax()))
        x = torch.tensor([[want[-1]]])
    assert out.token_ids == want and len(want) == n


def test_bad_checkpoints_name_the_field(sources, tmp_path):
    q = quantize_model(load_hf(sources["llama"]), "int8")
    q.save(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for qc, field in (({"quant_method": "awq"}, "quant_method"),
                      ({"quant_method": "fp8", "weight_block_size": [64, 64]}, "weight_block_size"),
                      ({"quant_method": "nanoseek", "scheme": "int2"}, "scheme"),
                      ({"quant_method": "nanoseek", "scheme": "int4", "weights": {"group_size": 64}},
                       "weights.group_size")):
        cfg_path.write_text(json.dumps({**cfg, "quantization_config": qc}))
        with pytest.raises(NanoseekError, match=f"config.json: quantization_config.{field}"):
            load_hf(tmp_path)
    cfg_path.write_text(json.dumps(cfg))
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.0.self_attn.q_proj.weight_scale"]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(NanoseekError, match="q_proj.weight is torch.int8 but has no .*weight_scale"):
        load_hf(tmp_path)

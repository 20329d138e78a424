"""Logit parity with transformers on tiny random checkpoints, fp32, max abs diff <= 1e-4."""

import copy

import pytest
import torch

from nanoseek.checkpoint.hf import load_hf
from nanoseek.config import ModelConfig
from nanoseek.model.kv_cache import DenseKVCache
from nanoseek.model.transformer import Transformer
from tests.tiny_models import VOCAB, make_deepseek_v3, make_llama, make_qwen2

CASES = {
    "llama-gqa-llama3rope": lambda p: make_llama(p),
    "qwen2-bias-tied": lambda p: make_qwen2(p),
    "dsv3-moe-groups-shared-qlora": lambda p: make_deepseek_v3(p, q_lora_rank=24),
    "dsv3-no-qlora-yarn": lambda p: make_deepseek_v3(p, q_lora_rank=None, yarn=True),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ref = CASES[request.param](path)
    return ref, load_hf(path), path


def test_logits_match_transformers(pair):
    ref, ours, _ = pair
    ids = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ref(ids).logits - ours(ids)).abs().max().item()
    assert diff <= 1e-4, diff


def test_cached_decode_matches_full_forward(pair):
    """Chunked prefill + token-by-token decode through a KV cache (MLA: the absorbed path)."""
    _, ours, _ = pair
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(ids)
        cache = DenseKVCache(ours.config.n_layers, 32)
        parts = []
        for a, b in [(0, 7), (7, 8), (8, 15), (15, 16), (16, 20)]:
            parts.append(ours(ids[:, a:b], cache.positions(2, b - a), cache))
            cache.advance(b - a)
    assert (torch.cat(parts, 1) - full).abs().max().item() <= 1e-4


def test_save_roundtrip_loads_in_transformers(pair, tmp_path):
    from transformers import AutoModelForCausalLM
    _, ours, _ = pair
    ours.save(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        assert (again(ids).logits - ours(ids)).abs().max().item() <= 1e-4
    assert not list((tmp_path / "saved").glob("*.tmp")), "temp files left behind"


def test_nanoseek_moe_preset_roundtrips_through_transformers(tmp_path):
    """A model built by nanoseek (brief's 16 experts, 2 active) loads as DeepseekV3ForCausalLM."""
    from transformers import AutoModelForCausalLM
    cfg = ModelConfig.preset("moe-16x2")
    cfg.vocab_size, cfg.n_layers, cfg.max_seq_len = 300, 3, 128
    model = Transformer(cfg).init_weights(seed=0).eval()
    for layer in model.layers[cfg.first_k_dense:]:
        layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    model.save(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-4
    again = load_hf(tmp_path)
    with torch.no_grad():
        # same weights bit for bit, but a reloaded tensor may sit at another alignment and take
        # another GEMM blocking: allow fp32 rounding, nothing more
        assert (again(ids) - model(ids)).abs().max().item() <= 1e-5


def test_moe_runs_only_routed_experts(tmp_path):
    cfg = ModelConfig.preset("moe-16x2")
    cfg.vocab_size, cfg.n_layers = 100, 2
    model = Transformer(cfg).init_weights(seed=0).eval()
    calls = []
    moe = model.layers[1].mlp
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda m, i, o, e=e: calls.append((e, i[0].shape[0])))
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 5)))
    # 5 tokens x 2 experts each = 10 expert-token evaluations in total, none wasted
    assert sum(n for _, n in calls) == 10
    assert int(moe.gate.last_load.sum()) == 10


def test_fp8_block_weights_dequantise(tmp_path):
    """DeepSeek's FP8 checkpoints: float8_e4m3fn + 128x128 weight_scale_inv, odd shapes too."""
    from safetensors.torch import load_file, save_file
    from nanoseek.checkpoint.fp8 import quantize_fp8_blocks
    make_deepseek_v3(tmp_path, hidden_size=160, q_lora_rank=136)  # dims that are not multiples of 128
    sd = load_file(tmp_path / "model.safetensors")
    ref = load_hf(tmp_path)
    for name in list(sd):
        if name.endswith("proj.weight") and sd[name].ndim == 2:
            sd[name], sd[name + "_scale_inv"] = quantize_fp8_blocks(sd[name])
    save_file(sd, tmp_path / "model.safetensors")
    fp8 = load_hf(tmp_path)
    w, w8 = ref.layers[0].self_attn.q_a_proj.weight, fp8.layers[0].self_attn.q_a_proj.weight
    assert w.shape == (136, 160)
    rel = ((w - w8).abs() / w.abs().amax()).max().item()
    assert 0 < rel < 0.07  # e4m3 keeps 3 mantissa bits: error bounded by 2^-4 of the block max


def test_dense_mla_model_roundtrips(tmp_path):
    """A dense (no MoE) MLA model exports as DeepseekV3 with every layer dense, and reloads."""
    from transformers import AutoModelForCausalLM
    cfg = ModelConfig(n_routed_experts=0, vocab_size=100, dim=64, n_layers=2, n_heads=4, n_kv_heads=4,
                      inter_dim=96, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    model = Transformer(cfg).init_weights(seed=0).eval()
    model.save(tmp_path)
    ids = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        assert torch.equal(load_hf(tmp_path)(ids), model(ids))
        hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-4


def test_inference_slices_rows_of_norms_and_ffn_with_the_same_result(pair, monkeypatch):
    """At inference the norms and the dense FFN run over slices of rows (NORM_ROWS, FFN_ROWS);
    with tiny slices (and a last, partial one) the logits equal the one-piece forward, which
    autograd mode keeps; bf16 too, where any change of rounding would show."""
    import nanoseek.model.layers as layers
    import nanoseek.model.transformer as transformer
    _, ours, _ = pair
    ids = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(5))
    for dtype in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(ours).to(dtype)
        with torch.enable_grad():
            whole = model(ids).detach()  # autograd on: the one-piece path
        monkeypatch.setattr(layers, "NORM_ROWS", 3)
        monkeypatch.setattr(transformer, "FFN_ROWS", 5)
        with torch.no_grad():
            sliced = model(ids)
        monkeypatch.undo()
        assert sliced.dtype == whole.dtype
        torch.testing.assert_close(sliced, whole, rtol=0, atol=1e-5 if dtype == torch.float32 else 0)

"""nanoseek.checkpoint.gguf: the real SmolLM2 GGUF against transformers' GGUF loader, plus tiny
GGUFs written on the fly for every supported tensor type, qwen2, and the error paths."""

import os

import gguf
import numpy as np
import pytest
import torch

from nanoseek.checkpoint.gguf import SUPPORTED_TYPES, read_gguf
from nanoseek.errors import NanoseekError
from tests.fixtures import TINY, smollm2_gguf_path, write_tiny_gguf

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="session")
def smollm():
    return read_gguf(smollm2_gguf_path())


@pytest.fixture(scope="session")
def reference():
    """transformers' own GGUF load of the same file (one model load for the whole module)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers refuses to load a GGUF model without it
    path = smollm2_gguf_path()
    return transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


# ---- the real model ------------------------------------------------------------------------


def test_every_tensor_equals_transformers(smollm, reference):
    config, state, _ = smollm
    theirs = reference.state_dict()
    assert config["tie_word_embeddings"] and "lm_head.weight" not in state
    # transformers' state dict lists the tied head too, as the embedding itself
    assert set(theirs) == set(state) | {"lm_head.weight"}
    for name, tensor in state.items():
        assert tensor.dtype == torch.float32, name
        torch.testing.assert_close(tensor, theirs[name], atol=0, rtol=0, msg=name)


def test_config_matches_transformers(smollm, reference):
    config, _, tokenizer = smollm
    theirs = reference.config
    for key in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"]:
        assert config[key] == getattr(theirs, key), key
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 100000.0
    assert theirs.rope_parameters["rope_theta"] == config["rope_theta"]
    assert (config["bos_token_id"], config["eos_token_id"]) == (tokenizer.bos_token_id, tokenizer.eos_token_id)


def test_config_and_weights_run_in_transformers(smollm, reference):
    """Our (config, state dict) as a HF checkpoint gives the reference model's logits."""
    transformers = pytest.importorskip("transformers")
    config, state, tokenizer = smollm
    hf_config = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    result = model.load_state_dict(state, strict=False, assign=True)
    assert result.unexpected_keys == [] and set(result.missing_keys) <= {"lm_head.weight"}
    model.tie_weights()
    model.model.rotary_emb = reference.model.rotary_emb  # a buffer, not in either state dict
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}])])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_int4_load_keeps_the_q4_1_grid(smollm):
    """Every Q4_1 projection loaded as int4 comes back on its own grid: the int4 weights equal
    the GGUF's dequantised ones (fp32 rounding aside), so `--precision int4` adds no error to a
    Q4_1 file; token_embd (Q8_0 there) becomes int8, as lm_head."""
    import nanoseek
    from nanoseek.quant.convert import float_weight
    from nanoseek.quant.layers import Int4Linear, Int8Embedding
    model, _ = nanoseek.load(smollm2_gguf_path(), "int4")
    _, tensors, _ = smollm
    for layer in (0, 29):
        for ours, theirs in (("self_attn.q_proj", "attn_q"), ("mlp.down_proj", "ffn_down")):
            m = model.get_submodule(f"layers.{layer}.{ours}")
            want = torch.as_tensor(tensors[f"model.layers.{layer}.{ours}.weight"]).float()
            assert isinstance(m, Int4Linear)
            assert (float_weight(m) - want).abs().max() <= 1e-6 * want.abs().max(), (layer, ours, theirs)
    assert isinstance(model.embed_tokens, Int8Embedding) and model.lm_head.qweight is model.embed_tokens.qweight


def test_tokenizer_comes_along(smollm):
    _, _, tokenizer = smollm
    assert tokenizer.vocab_size == 49152
    assert tokenizer.encode("<|im_start|>") == [1]


# ---- tiny GGUFs --------------------------------------------------------------------------------

# Worst error allowed, as a fraction of the tensor's largest |w|: half a quantisation step.
TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 4e-3, Q.Q8_0: 5e-3, Q.Q4_0: 0.13, Q.Q4_1: 0.07}


def quantizable(qtype) -> bool:
    try:
        gguf.quants.quantize(np.zeros((1, 256), np.float32), qtype)
        return True
    except NotImplementedError:
        return False


@pytest.mark.parametrize("qtype", [t for t in SUPPORTED_TYPES if quantizable(t)], ids=lambda t: t.name)
def test_quant_round_trip(tmp_path, qtype):
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    original = write_tiny_gguf(str(path), qtype=qtype)
    config, state, tokenizer = read_gguf(str(path))
    assert set(state) == set(original)
    assert not config["tie_word_embeddings"]
    for name, w in original.items():
        got = state[name].numpy()
        assert got.shape == w.shape and got.dtype == np.float32, name
        # 2-D weights went through `qtype` (q/k rows permuted first), norms stayed F32
        tolerance = TOLERANCE[qtype] if w.ndim == 2 else 0.0
        assert np.abs(got - w).max() <= tolerance * np.abs(w).max(), name
    pieces = [tokenizer.id_to_token(i) for i in tokenizer.encode("hello the world")]
    assert pieces == ["hello", "Ġthe", "Ġw", "or", "l", "d"]


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=lambda t: t.name)
def test_k_quants_dequantise_like_gguf_py(tmp_path, qtype):
    """gguf-py cannot quantise to K types, so store random blocks (with sane fp16 scales) and check
    they come back exactly as gguf-py's dequantiser reads them, in HF shape."""
    rng = np.random.default_rng(0)
    rows, block_bytes = TINY["hidden"], gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, (rows, block_bytes), dtype=np.uint8)
    scales = np.full(rows * 2, 0.01, np.float16).view(np.uint8).reshape(rows, 4)
    if qtype == Q.Q4_K:
        blocks[:, 0:4] = scales  # d, dmin lead the block
    else:
        blocks[:, -2:] = scales[:, :2]  # d ends the block
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    write_tiny_gguf(str(path), raw={"blk.1.ffn_down.weight": (blocks, qtype)})
    _, state, _ = read_gguf(str(path))
    expected = gguf.quants.dequantize(blocks, qtype)
    assert expected.shape == (TINY["hidden"], TINY["intermediate"])
    assert np.array_equal(state["model.layers.1.mlp.down_proj.weight"].numpy(), expected)


def test_tied_embeddings(tmp_path):
    path = tmp_path / "tied.gguf"
    original = write_tiny_gguf(str(path), tied=True)
    config, state, _ = read_gguf(str(path))
    assert config["tie_word_embeddings"] and "lm_head.weight" not in state
    assert set(state) == set(original)


def test_qwen2_biases_and_no_permutation(tmp_path):
    path = tmp_path / "qwen2.gguf"
    original = write_tiny_gguf(str(path), arch="qwen2", tokenizer_pre="qwen2")
    config, state, tokenizer = read_gguf(str(path))
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert "model.layers.0.self_attn.q_proj.bias" in state
    assert set(state) == set(original)
    for name, w in original.items():
        assert np.array_equal(state[name].numpy(), w), name
    assert tokenizer.decode(tokenizer.encode("hello the world")) == "hello the world"


def test_config_fields(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(str(path))
    config, _, tokenizer = read_gguf(str(path))
    assert config == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": tokenizer.vocab_size,
        "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, "torch_dtype": "float32",
        "attention_bias": False, "mlp_bias": False,
    }


# ---- bad input -----------------------------------------------------------------------------


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "model.gguf"
    iq2 = np.zeros((TINY["hidden"], gguf.GGML_QUANT_SIZES[Q.IQ2_XS][1]), np.uint8)
    write_tiny_gguf(str(path), raw={"blk.0.ffn_down.weight": (iq2, Q.IQ2_XS)})
    with pytest.raises(NanoseekError) as e:
        read_gguf(str(path))
    assert str(e.value) == (f"{path}: tensor blk.0.ffn_down.weight has unsupported type IQ2_XS "
                            "(supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)")


def test_unknown_tensor(tmp_path):
    path = tmp_path / "moe.gguf"
    write_tiny_gguf(str(path), extra={"blk.0.ffn_gate_exps.weight": np.zeros((4, 8, 64))})
    with pytest.raises(NanoseekError, match=r"moe\.gguf: tensor blk\.0\.ffn_gate_exps\.weight has no Hugging Face"):
        read_gguf(str(path))


def test_rope_freqs_is_dropped(tmp_path):
    path = tmp_path / "llama31.gguf"
    original = write_tiny_gguf(str(path), extra={"rope_freqs.weight": np.ones(8)})
    _, state, _ = read_gguf(str(path))
    assert set(state) == set(original)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    write_tiny_gguf(str(path), arch="mamba")
    with pytest.raises(NanoseekError, match=r"mamba\.gguf: field general\.architecture is 'mamba'"):
        read_gguf(str(path))


@pytest.mark.parametrize("keep", [0.001, 0.01, 0.5, 0.999])
def test_truncated_file(tmp_path, keep):
    whole = tmp_path / "whole.gguf"
    write_tiny_gguf(str(whole))
    data = whole.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(NanoseekError, match=r"cut\.gguf: .*(truncated|corrupt)") as e:
        read_gguf(str(cut))
    assert "\n" not in str(e.value)


def test_not_a_gguf_and_missing_file(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(NanoseekError, match=r"junk\.gguf"):
        read_gguf(str(junk))
    with pytest.raises(NanoseekError, match=r"nope\.gguf: file not found"):
        read_gguf(str(tmp_path / "nope.gguf"))


def test_gguf_without_tokenizer(tmp_path):
    path = tmp_path / "notok.gguf"
    write_tiny_gguf(str(path), tokenizer=None)
    with pytest.raises(NanoseekError, match=r"notok\.gguf: field tokenizer\.ggml\.model is missing"):
        read_gguf(str(path))

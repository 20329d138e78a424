"""Tiny random checkpoints that transformers itself creates: the reference for our loaders."""

import torch

VOCAB = 200


def _randomize_extras(model):
    """Biases and the balancing bias default to zero; make them matter in comparisons."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.05)
    return model


def make_llama(path, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    kw.update(overrides)
    torch.manual_seed(0)
    m = _randomize_extras(LlamaForCausalLM(LlamaConfig(**kw)).eval())
    m.save_pretrained(path)
    return m


def make_qwen2(path, **overrides):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=256)
    kw.update(overrides)
    torch.manual_seed(0)
    m = _randomize_extras(Qwen2ForCausalLM(Qwen2Config(**kw)).eval())
    m.save_pretrained(path)
    return m


DSV3_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                 n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1, kv_lora_rank=16,
                 qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, n_shared_experts=1,
                 max_position_embeddings=256)

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707, "rope_theta": 10000.0}


def make_deepseek_v3(path, q_lora_rank=24, yarn=False, **overrides):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    kw = dict(DSV3_BASE, q_lora_rank=q_lora_rank)
    if yarn:
        kw["rope_parameters"] = YARN
    kw.update(overrides)
    torch.manual_seed(0)
    m = _randomize_extras(DeepseekV3ForCausalLM(DeepseekV3Config(**kw)).eval())
    m.save_pretrained(path)
    return m

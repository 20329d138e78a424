"""LoRA: PEFT-format adapters (saved by us, loaded by PEFT, and the reverse), merging, training."""

import json
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek.errors import NanoseekError
from nanoseek.train.lora import (apply_lora, load_adapter, load_with_adapter, lora_modules, merge_lora, save_adapter,
                                 trainable_fraction)
from tests.tiny_models import VOCAB, make_llama

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_llama(path)
    return path


def randomize_b(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


def hf_logits(path, adapter, ids):
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    base = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        return model(ids).logits


def test_our_adapter_loads_in_peft_and_merges(llama_dir, tmp_path):
    model, _ = nanoseek.load(llama_dir, "fp32")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(ids)
    names = apply_lora(model, r=4, alpha=8, targets=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "lm_head"])
    assert "lm_head" in names and len(names) == 2 * 5 + 1
    with torch.no_grad():
        assert torch.equal(model(ids), base)  # B = 0: the adapter starts as the identity
    randomize_b(model)
    with torch.no_grad():
        ours = model(ids)
    assert not torch.allclose(ours, base, atol=1e-3)
    save_adapter(model, tmp_path / "adapter", base_model=str(llama_dir))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    from safetensors import safe_open
    keys = set(safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt").keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.lm_head.lora_B.weight" in keys
    # PEFT on transformers' Llama computes the same function
    torch.testing.assert_close(hf_logits(llama_dir, tmp_path / "adapter", ids), ours, atol=1e-4, rtol=1e-4)
    # merging folds the update into the weights: same outputs, no adapters left
    merged = merge_lora(model)
    assert not lora_modules(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), ours, atol=1e-4, rtol=1e-4)
    # serve-time loading: base + adapter dir -> merged model
    served, _ = nanoseek.load(llama_dir, "fp32", adapter=tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(served(ids), ours, atol=1e-4, rtol=1e-4)
    served16, _ = load_with_adapter(llama_dir, "bf16", adapter=tmp_path / "adapter")
    assert served16.dtype == torch.bfloat16
    quantized, _ = nanoseek.load(llama_dir, "int8", adapter=tmp_path / "adapter")  # merged before quantizing
    with torch.no_grad():
        assert (quantized(ids).float() - ours).abs().mean() < (base - ours).abs().mean()


def test_peft_trained_adapter_loads_in_nanoseek(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    from peft import LoraConfig, get_peft_model
    hf = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir, torch_dtype=torch.float32),
                        LoraConfig(r=2, lora_alpha=6, target_modules=["k_proj", "up_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    hf.save_pretrained(tmp_path / "peft_adapter")
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf.eval()(ids).logits
    model, _ = nanoseek.load(llama_dir, "fp32")
    load_adapter(model, tmp_path / "peft_adapter", merge=False)
    assert len(lora_modules(model)) == 2 * 2
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref, atol=1e-4, rtol=1e-4)


def test_adapter_errors(llama_dir, tmp_path):
    model, _ = nanoseek.load(llama_dir, "fp32")
    with pytest.raises(NanoseekError, match="adapter_config.json"):
        load_adapter(model, tmp_path)
    with pytest.raises(NanoseekError, match="match no linear"):
        apply_lora(model, targets=["nonexistent_proj"])


def test_lora_training_on_moe_experts(tmp_path):
    """`train --lora` on a MoE: experts get adapters, only adapters move, PEFT-format output."""
    from nanoseek.config import ModelConfig
    from nanoseek.model.transformer import Transformer
    from nanoseek.train.config import load_config
    from nanoseek.train.speedrun import KNOBS, QUICK, build_data
    from nanoseek.train.trainer import Trainer
    from nanoseek.tokenizer import Tokenizer
    data = build_data(tmp_path / "d", {**KNOBS, **QUICK})
    tok = Tokenizer.from_dir(data["tokenizer"])
    cfg = ModelConfig.preset("moe-16x2").to_dict()
    cfg.update(QUICK["model_overrides"], vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_ids)
    base = Transformer(ModelConfig.from_dict(cfg)).init_weights(seed=0)
    base.save(tmp_path / "base", tokenizer=tok)
    out = tmp_path / "lora"
    tc = load_config(None, [f"run.out_dir={json.dumps(str(out))}", f"model.init_from={json.dumps(str(tmp_path / 'base'))}",
                            'data.mode="sft"', f"data.train_file={json.dumps(str(Path(data['dir']) / 'sft_train.jsonl'))}",
                            f"data.tokenizer={json.dumps(data['tokenizer'])}", "data.batch_size=2", "data.seq_len=128",
                            "schedule.steps=3", "run.threads=1", "run.progress=false", "run.plot=false",
                            "lora.enabled=true", "lora.r=2", "lora.dropout=0.1", "lora.merge=true",
                            'lora.targets=["kv_b_proj", "gate_proj", "up_proj", "down_proj"]', "optim.lr=0.01"])
    tr = Trainer(tc, resume=False)
    names = list(lora_modules(tr.model))
    assert any(".mlp.experts.3.up_proj" in n for n in names) and any("shared_experts" in n for n in names)
    trainable, total = trainable_fraction(tr.model)
    assert 0 < trainable / total < 0.1
    before = {k: v.clone() for k, v in tr.model.state_dict().items() if ".lora_" not in k}
    tr.fit()
    tr.close()
    after = tr.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # base frozen, router bias included
    assert any(m.lora_B.weight.abs().sum() > 0 for m in lora_modules(tr.model).values())
    adapter_keys = set(__import__("safetensors").safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt").keys())
    assert "base_model.model.model.layers.1.mlp.experts.0.gate_proj.lora_A.weight" in adapter_keys
    # merged export == base + adapter loaded at serve time
    ids = torch.randint(0, len(tok), (1, 9))
    merged, _ = nanoseek.load(out / "model", "fp32")
    served, _ = load_with_adapter(tmp_path / "base", "fp32", adapter=out / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), served(ids), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(merged(ids), base(ids), atol=1e-4)

"""The real default model, SmolLM2-135M-Instruct (GGUF): nanoseek vs transformers' own loader."""

import os

import pytest
import torch

import nanoseek
from tests.fixtures import smollm2_gguf_path

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a prime number is to a child.",
    "List three uses for a paperclip.",
    "If I have 3 apples and eat one, how many are left?",
]


@pytest.fixture(scope="module")
def models():
    from transformers import AutoModelForCausalLM
    path = smollm2_gguf_path()
    ours, tok = nanoseek.load(path, "fp32")
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                               dtype=torch.float32).eval()
    return ours, tok, ref


@pytest.mark.slow
def test_greedy_32_tokens_identical_to_transformers(models):
    ours, tok, ref = models
    llm = nanoseek.LLM(ours, tokenizer=tok, kv_cache_gib=0.25)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    outs = llm.generate(prompts, nanoseek.SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    ref.generation_config.eos_token_id = None  # both sides run past EOS: compare 32 real tokens
    for ids, out in zip(prompts, outs):
        with torch.no_grad():
            # explicit mask: SmolLM2's pad id is <|im_end|>, which generate() would otherwise mask out of the prompt
            x = torch.tensor([ids])
            expect = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False)
        assert out.outputs[0].token_ids == expect[0, len(ids):].tolist()


@pytest.mark.slow
def test_logits_match_transformers(models):
    ours, tok, ref = models
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. " * 4)])
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= 1e-3


@pytest.mark.slow
def test_chat_answers_sensibly(models):
    ours, tok, _ = models
    llm = nanoseek.LLM(ours, tokenizer=tok, kv_cache_gib=0.25)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   nanoseek.SamplingParams(temperature=0, max_tokens=24))[0].outputs[0]
    assert "Paris" in out.text and out.finish_reason == "stop"

"""Held-out accuracy on verifiable problems, by difficulty level, with the inference engine.

A base (pretrained) model is prompted with the pretraining layout "Question: ...\\nAnswer:";
a chat (SFT) model with its chat template. Greedy decoding; the reward is
nanoseek.data.problems.reward (exact match of the final `#### N` number).
"""

import copy

import torch

from nanoseek.data.problems import reward


def problem_text(p: dict) -> str:
    """How a problem appears in the pretraining text (and how a base model is prompted)."""
    return f"Question: {p['question']}\nAnswer: {p['answer']}"


def base_prompt(p: dict) -> str:
    return f"Question: {p['question']}\nAnswer:"


@torch.no_grad()
def accuracy_by_level(model, tokenizer, problems: list[dict], chat: bool, max_tokens: int = 256,
                      max_batch_tokens: int = 4096) -> dict:
    """{"levels": {level: {"n", "correct", "accuracy"}}, "overall": acc, "examples": [...]}."""
    from nanoseek import LLM, SamplingParams
    model = copy.deepcopy(model).eval()  # the engine owns its model; training keeps its own
    if any(".lora_" in n for n, _ in model.named_parameters()):
        from nanoseek.train.lora import merge_lora
        merge_lora(model)  # MLA's cached path reads kv_b_proj.weight directly: serve merged
    llm = LLM(model, tokenizer=tokenizer, max_batch_tokens=max_batch_tokens, kv_cache_gib=0.25,
              max_num_seqs=64)
    if chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p["question"]}], add_generation_prompt=True)
                   for p in problems]
        stop = []
    else:
        prompts = [tokenizer.encode(base_prompt(p)) for p in problems]
        stop = ["\nQuestion:", "\n\n"]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=stop)
    outs = llm.generate(prompts, params)
    levels, examples = {}, []
    for p, o in zip(problems, outs):
        text = o.outputs[0].text
        r = reward(text, p["final"])
        lv = levels.setdefault(p["level"], {"n": 0, "correct": 0})
        lv["n"] += 1
        lv["correct"] += int(r)
        if len(examples) < 10 or (r and sum(e["reward"] for e in examples) < 5):
            examples.append({"level": p["level"], "question": p["question"], "completion": text,
                             "final": p["final"], "reward": r})
    for lv in levels.values():
        lv["accuracy"] = lv["correct"] / lv["n"]
    n = sum(lv["n"] for lv in levels.values())
    return {"levels": dict(sorted(levels.items())), "overall": sum(lv["correct"] for lv in levels.values()) / max(n, 1),
            "examples": examples}

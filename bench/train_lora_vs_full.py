"""LoRA vs full fine-tuning of SmolLM2-135M-Instruct on GSM8K train.

Same data order, steps, batch and evaluation for both; the evaluation is a fixed subset of
GSM8K test (the first --n-test problems): greedy accuracy (exact `#### N` match, as
nanoseek.data.problems.reward) and the mean NLL of the reference solutions (teacher-forced,
answer tokens only; more sensitive than accuracy at this scale). Reported: trainable-parameter
fraction, and the share of the full fine-tune's gain (over the untuned model) that LoRA reaches.

GSM8K is read from /work/shared/data/gsm8k (never copied into the repo).

    python bench/train_lora_vs_full.py --steps 30 --n-test 40 --max-tokens 200 --out bench/results/train_lora_vs_full.json
    # another LoRA shape against the same base / full numbers:
    python bench/train_lora_vs_full.py --steps 30 --n-test 40 --lora-r 2 --lora-alpha 4 --skip-accuracy \
        --reuse bench/results/train_lora_vs_full.json --out bench/results/train_lora_vs_full_r2.json
"""

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

GSM8K = Path("/work/shared/data/gsm8k")


def chat_prompt(tok, question):
    from nanoseek.data.shards import render_chat
    ids, _ = render_chat([{"role": "user", "content": question}], tok)
    return ids + tok.encode("<|im_start|>assistant\n", add_special_tokens=False)


@torch.no_grad()
def answer_nll(model, tok, problems, seq_len=512, batch=8):
    from nanoseek.data.shards import IGNORE_INDEX, render_chat, sft_collate
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(problems), batch):
        ex = [render_chat([{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["answer"]}], tok)
              for p in problems[i:i + batch]]
        b = sft_collate(ex, tok.pad_token_id or 0, seq_len)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(b["input_ids"])
        total += F.cross_entropy(logits.view(-1, logits.shape[-1]), b["targets"].view(-1), ignore_index=IGNORE_INDEX,
                                 reduction="sum").item()
        count += int(b["loss_mask"].sum())
    model.train()
    return total / count


def accuracy(model, tok, problems, max_tokens):
    import copy
    from nanoseek import LLM, SamplingParams
    from nanoseek.data.problems import reward
    from nanoseek.train.lora import lora_modules, merge_lora
    m = copy.deepcopy(model).eval()
    if lora_modules(m):
        merge_lora(m)
    llm = LLM(m.to(torch.bfloat16), tokenizer=tok, max_batch_tokens=2048, kv_cache_gib=0.5, max_num_seqs=64)
    outs = llm.generate([chat_prompt(tok, p["question"]) for p in problems],
                        SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return sum(reward(o.outputs[0].text, p["final"]) for o, p in zip(outs, problems)) / len(problems)


def evaluate(model, tok, problems, max_tokens, skip_acc):
    t0 = time.perf_counter()
    r = {"answer_nll": answer_nll(model, tok, problems)}
    if not skip_acc:
        r["accuracy"] = accuracy(model, tok, problems, max_tokens)
    r["eval_seconds"] = time.perf_counter() - t0
    print(r, flush=True)
    return r


def main():
    from nanoseek.data.problems import load_gsm8k
    from nanoseek.train.config import load_config
    from nanoseek.train.lora import trainable_fraction
    from nanoseek.train.trainer import Trainer

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=320)
    ap.add_argument("--n-test", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--full-lr", type=float, default=3e-5)
    ap.add_argument("--lora-lr", type=float, default=2e-3)
    ap.add_argument("--lora-r", type=int, default=4)
    ap.add_argument("--lora-alpha", type=float, default=8)
    ap.add_argument("--lora-targets", default="q_proj,v_proj")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--reuse", help="results JSON of an earlier run with the same data/steps/eval: take its base and "
                                    "full fine-tune numbers and train only the LoRA variant")
    ap.add_argument("--work", default="runs/bench_lora_vs_full")
    ap.add_argument("--out", default="bench/results/train_lora_vs_full.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    # SFT file outside the repo: GSM8K train as chat conversations
    train_file = work / "gsm8k_train_chat.jsonl"
    with open(train_file, "w") as f:
        for p in load_gsm8k(GSM8K / "train.jsonl"):
            f.write(json.dumps({"messages": [{"role": "user", "content": p["question"]},
                                             {"role": "assistant", "content": p["answer"]}]}) + "\n")
    test = load_gsm8k(GSM8K / "test.jsonl")[:args.n_test]

    def make(name, lora):
        base = {
            "run": {"out_dir": str(work / name), "threads": args.threads, "progress": True, "plot": True,
                    "save_every": 10 ** 6},
            "model": {"init_from": "default"},
            "data": {"mode": "sft", "train_file": str(train_file), "seq_len": args.seq_len, "batch_size": args.batch_size},
            "optim": {"muon": False, "lr": args.lora_lr if lora else args.full_lr, "weight_decay": 0.0},
            "schedule": {"steps": args.steps, "warmup_steps": max(args.steps // 10, 1), "decay": "linear", "decay_frac": 1.0},
            "eval": {"every": 0},
            "lora": {"enabled": lora, "r": args.lora_r, "alpha": args.lora_alpha, "targets": args.lora_targets.split(",")},
        }
        return Trainer(load_config(base=base), resume=False)

    results = {"args": vars(args)}
    if args.reuse:
        prev = json.loads(Path(args.reuse).read_text())
        results["base"], results["full"] = prev["base"], prev["full"]
        results["reused_from"] = args.reuse
    else:
        tr = make("full", False)
        results["base"] = evaluate(tr.model, tr.tokenizer, test, args.max_tokens, args.skip_accuracy)
        t0 = time.perf_counter()
        tr.fit()
        results["full"] = {"train_seconds": time.perf_counter() - t0, "trainable": trainable_fraction(tr.model)[0],
                           "total": trainable_fraction(tr.model)[1],
                           **evaluate(tr.model, tr.tokenizer, test, args.max_tokens, args.skip_accuracy)}
        del tr
    tr = make("lora", True)
    tok = tr.tokenizer
    t0 = time.perf_counter()
    tr.fit()
    trainable, total = trainable_fraction(tr.model)
    results["lora"] = {"train_seconds": time.perf_counter() - t0, "trainable": trainable, "total": total,
                       "trainable_fraction": trainable / total,
                       **evaluate(tr.model, tok, test, args.max_tokens, args.skip_accuracy)}
    b, full, lo = results["base"], results["full"], results["lora"]
    gain_full = b["answer_nll"] - full["answer_nll"]
    results["share_of_gain_nll"] = (b["answer_nll"] - lo["answer_nll"]) / gain_full if gain_full else None
    if "accuracy" in b and "accuracy" in lo:
        g = full["accuracy"] - b["accuracy"]
        results["share_of_gain_accuracy"] = (lo["accuracy"] - b["accuracy"]) / g if g > 0 else None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "args"}, indent=2))


if __name__ == "__main__":
    main()

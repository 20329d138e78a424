"""`nanoseek speedrun`: the whole pipeline from nothing to a report card, in ~15 minutes on CPU.

    1. data       generated arithmetic word problems (levels 1..5, hash-disjoint train /
                  held-out splits) + some text (GSM8K train, when the file is present)
    2. tokenizer  byte-level BPE with the chat special tokens, trained on that text
    3. shards     tokenized, BOS-aligned pretraining shards (+ a held-out shard for eval loss)
    4. pretrain   the brief's MoE (preset moe-16x2: 16 routed experts, 2 active, 1 shared, MLA)
    5. eval       held-out problems per level, base-model prompt ("Question: ...\\nAnswer:")
    6. SFT        chat-formatted problems, loss on the assistant's worked solution only
    7. eval       the same held-out problems, chat prompt
    8. report     report.md + report.png + report.json: every figure, config and time

Every knob is in KNOBS (and QUICK for --quick); a TOML/YAML file or --set overrides them:
[speedrun] for KNOBS, [pretrain.<section>] / [sft.<section>] for the two training configs.
"""

import json
import time
from pathlib import Path

from nanoseek.errors import NanoseekError
from nanoseek.train.config import load_config, parse_override, read_config_file

GSM8K_TRAIN = "/work/shared/data/gsm8k/train.jsonl"

KNOBS = {
    "seed": 0,
    "levels": [1, 2, 3, 4, 5],
    "train_per_level": 2000,        # generated training problems per level (pretraining text and SFT)
    "heldout_per_level": 40,        # held-out problems per level (accuracy)
    "text_files": [],               # extra pretraining text: .txt / .jsonl (text field) / GSM8K-style JSONL
    "gsm8k": GSM8K_TRAIN,           # GSM8K train as extra text when the file exists ("" to skip)
    "vocab_size": 8192,
    "preset": "moe-16x2",
    "model_overrides": {},
    "seq_len": 256,
    "batch_size": 8,
    "pretrain_steps": 200,
    "sft_steps": 80,
    "eval_max_tokens": 160,
}

# --quick: a toy model and a few steps, for tests (< 60 s)
QUICK = {
    "levels": [1, 2],
    "train_per_level": 60,
    "heldout_per_level": 6,
    "gsm8k": "",
    "vocab_size": 400,
    "model_overrides": {"n_layers": 2, "dim": 64, "n_heads": 2, "n_kv_heads": 2, "kv_lora_rank": 16,
                        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 4,
                        "moe_inter_dim": 32, "inter_dim": 128, "first_k_dense": 1},
    "seq_len": 128,
    "batch_size": 4,
    "pretrain_steps": 12,
    "sft_steps": 6,
    "eval_max_tokens": 24,
}


# ---- data ------------------------------------------------------------------------------

def make_problems(levels, n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    from nanoseek.data.problems import generate_problems
    train = [p for lv in levels for p in generate_problems(n_train, lv, seed=seed, split="train")]
    heldout = [p for lv in levels for p in generate_problems(n_heldout, lv, seed=seed + 1, split="heldout")]
    return train, heldout


def extra_texts(knobs) -> tuple[list[str], list[str]]:
    """(texts, sources used) from GSM8K train and knobs['text_files']."""
    from nanoseek.data.ingest import read_documents
    from nanoseek.data.problems import load_gsm8k
    from nanoseek.train.evaluate import problem_text
    texts, used = [], []
    if knobs["gsm8k"] and Path(knobs["gsm8k"]).is_file():
        texts += [problem_text(p) for p in load_gsm8k(knobs["gsm8k"])]
        used.append(knobs["gsm8k"])
    if knobs["text_files"]:
        texts += [d.text for d in read_documents(knobs["text_files"])]
        used += list(knobs["text_files"])
    return texts, used


def build_data(out: Path, knobs: dict) -> dict:
    """Problems, tokenizer, shards, SFT files under out/data; returns paths and counts."""
    from nanoseek.data.shards import write_shards
    from nanoseek.data.tokenizer_train import load_tokenizer, save_tokenizer, train_tokenizer
    from nanoseek.train.evaluate import problem_text
    d = out / "data"
    d.mkdir(parents=True, exist_ok=True)
    train, heldout = make_problems(knobs["levels"], knobs["train_per_level"], knobs["heldout_per_level"], knobs["seed"])
    extra, sources = extra_texts(knobs)
    # pretraining text: every generated problem with its worked solution, plus the extra text;
    # the last 2% of the generated ones are kept out for the eval loss
    texts = [problem_text(p) for p in train]
    n_eval = max(len(texts) // 50, 16)
    pre_train, pre_eval = texts[:-n_eval] + extra, texts[-n_eval:]
    tok = train_tokenizer(pre_train, vocab_size=knobs["vocab_size"])
    save_tokenizer(tok, d / "tokenizer")
    ctok = load_tokenizer(d / "tokenizer")
    meta = {"tokenizer": str(d / "tokenizer")}
    idx = write_shards(pre_train, ctok, d / "shards", meta=meta)
    write_shards(pre_eval, ctok, d / "eval_shards", meta=meta)
    for name, rows in (("sft_train.jsonl", train[:-n_eval]), ("sft_eval.jsonl", train[-n_eval:]), ("heldout.jsonl", heldout)):
        with open(d / name, "w", encoding="utf-8") as f:
            for p in rows:
                f.write(json.dumps(p) + "\n")
    return {"dir": str(d), "tokenizer": str(d / "tokenizer"), "vocab_size": len(ctok),
            "pretrain_documents": len(pre_train), "pretrain_tokens": idx["num_tokens"],
            "generated_train_problems": len(train), "heldout_problems": len(heldout),
            "extra_text_documents": len(extra), "extra_text_sources": sources}


# ---- the run -----------------------------------------------------------------------------

def _train_base(knobs, data, out_dir, steps, threads, progress) -> dict:
    return {
        "run": {"out_dir": str(out_dir), "seed": knobs["seed"], "save_every": max(steps // 3, 10),
                "threads": threads or 0, "progress": progress},
        "model": {"preset": knobs["preset"], "overrides": dict(knobs["model_overrides"])},
        "data": {"tokenizer": data["tokenizer"], "seq_len": knobs["seq_len"], "batch_size": knobs["batch_size"]},
        "schedule": {"steps": steps, "warmup_steps": max(steps // 20, 1)},
        "eval": {"every": max(steps // 5, 1), "batches": 4},
    }


def _merge_dicts(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _split_overrides(config, overrides):
    """Speedrun knobs and the per-stage training dicts from a file and --set items."""
    knobs, stages = {}, {"pretrain": {}, "sft": {}}
    if config:
        data = read_config_file(config)
        knobs.update(data.get("speedrun", {}))
        for s in stages:
            stages[s] = data.get(s, {})
        unknown = set(data) - {"speedrun", "pretrain", "sft"}
        if unknown:
            raise NanoseekError(f"{config}: unknown section(s) {', '.join(sorted(unknown))} (have: speedrun, pretrain, sft)")
    for item in overrides:
        key, value = parse_override(item)
        head, _, rest = key.partition(".")
        if head == "speedrun":
            knobs[rest] = value
        elif head in stages and "." in rest:
            section, _, field = rest.partition(".")
            stages[head].setdefault(section, {})[field] = value
        else:
            raise NanoseekError(f"--set {key}: expected speedrun.KNOB, pretrain.SECTION.KEY or sft.SECTION.KEY")
    bad = set(knobs) - set(KNOBS)
    if bad:
        raise NanoseekError(f"speedrun: unknown knob(s) {', '.join(sorted(bad))} (have: {', '.join(KNOBS)})")
    return knobs, stages


def speedrun(out, quick: bool = False, config=None, overrides=(), threads=1, progress: bool = True) -> dict:
    """Run the pipeline into `out`. threads=1 by default: on a shared 2-core machine torch's
    OpenMP threads spin against other processes and a step can get 10x slower with 2."""
    from nanoseek.train.evaluate import accuracy_by_level
    from nanoseek.train.trainer import Trainer, load_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    user_knobs, stages = _split_overrides(config, overrides)
    knobs = {**KNOBS, **(QUICK if quick else {}), **user_knobs}
    times, t_all = {}, time.perf_counter()

    def stage(name):
        class Timer:
            def __enter__(self):
                self.t = time.perf_counter()
                print(f"[speedrun] {name} ...", flush=True)

            def __exit__(self, *exc):
                times[name] = time.perf_counter() - self.t
                print(f"[speedrun] {name}: {times[name]:.1f}s", flush=True)
        return Timer()

    with stage("data + tokenizer + shards"):
        data = build_data(out, knobs)
    heldout = [json.loads(line) for line in open(Path(data["dir"]) / "heldout.jsonl", encoding="utf-8")]
    tok = load_tokenizer(data["tokenizer"])

    pre_cfg = load_config(base=_merge_dicts(_merge_dicts(_train_base(knobs, data, out / "pretrain", knobs["pretrain_steps"], threads, progress), {
        "data": {"mode": "pretrain", "shards": str(Path(data["dir"]) / "shards"),
                 "eval_shards": str(Path(data["dir"]) / "eval_shards")},
        "eval": {"samples": ["Question: Ava buys 3 pens"]},
    }), stages["pretrain"]))
    with stage("pretrain"):
        trainer = Trainer(pre_cfg, resume=True)
        pre_last = trainer.fit()
        pre_model = trainer.model
    with stage("eval after pretraining"):
        acc_pre = accuracy_by_level(pre_model, tok, heldout, chat=False, max_tokens=knobs["eval_max_tokens"])

    sft_base = _train_base(knobs, data, out / "sft", knobs["sft_steps"], threads, progress)
    sft_base["model"] = {"init_from": str(out / "pretrain" / "model")}  # the architecture comes with the weights
    sft_cfg = load_config(base=_merge_dicts(_merge_dicts(sft_base, {
        "data": {"mode": "sft", "train_file": str(Path(data["dir"]) / "sft_train.jsonl"),
                 "eval_file": str(Path(data["dir"]) / "sft_eval.jsonl")},
        "optim": {"lr": 1e-3, "muon_lr": 0.01},
        "schedule": {"decay_frac": 1.0},
        "eval": {"samples": [heldout[0]["question"]]},
    }), stages["sft"]))
    with stage("sft"):
        trainer = Trainer(sft_cfg, resume=True)
        sft_last = trainer.fit()
        sft_model = trainer.model
    with stage("eval after SFT"):
        acc_sft = accuracy_by_level(sft_model, tok, heldout, chat=True, max_tokens=knobs["eval_max_tokens"])
    times["total"] = time.perf_counter() - t_all

    cmd = f"nanoseek speedrun --out {out}" + (" --quick" if quick else "") + (f" --config {config}" if config else "")
    cmd += "".join(f" --set {o}" for o in overrides) + (f" --threads {threads}" if threads != 1 else "")
    summary = {
        "command": cmd, "knobs": knobs, "quick": quick, "data": data, "times_s": times,
        "model": {"preset": knobs["preset"], "params": pre_model.config.num_params(),
                  "active_params": pre_model.config.num_params(active=True), "config": pre_model.config.to_dict()},
        "pretrain": _stage_summary(out / "pretrain", pre_last), "sft": _stage_summary(out / "sft", sft_last),
        "accuracy": {"after_pretraining": acc_pre, "after_sft": acc_sft},
    }
    from nanoseek.train.report import write_report
    write_report(out, summary)
    print(f"[speedrun] report card: {out / 'report.md'} ({times['total']:.0f}s)")
    return summary


def _stage_summary(run_dir: Path, last: dict) -> dict:
    from nanoseek.train.metrics import read_log
    log = read_log(run_dir / "log.jsonl")
    train = [r for r in log if "loss" in r]
    evals = [r for r in log if "eval_loss" in r]
    steady = train[len(train) // 5:] or train  # skip the first steps (warmup, first-call overheads)
    return {
        "dir": str(run_dir), "steps": len(train), "tokens": train[-1]["tokens"] if train else 0,
        "train_seconds": train[-1]["time"] if train else 0,
        "first_loss": train[0]["loss"] if train else None, "final_loss": train[-1]["loss"] if train else None,
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / max(len(steady), 1),
        "mfu": sum(r["mfu"] for r in steady) / max(len(steady), 1),
        "samples": evals[-1].get("samples", []) if evals else [],
    }

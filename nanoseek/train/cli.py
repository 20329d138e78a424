"""`nanoseek train` and `nanoseek speedrun` subcommands.

nanoseek/cli.py calls add_train_parser(subparsers) / add_speedrun_parser(subparsers) and
dispatches to args.func(args). Under torchrun every process runs the same command:

    torchrun --nproc_per_node 2 -m nanoseek.train --config configs/pretrain_moe.toml
"""

import argparse

# flag -> config key; each flag is sugar for --set key=value
FLAGS = {
    "out": "run.out_dir", "steps": "schedule.steps", "preset": "model.preset", "init_from": "model.init_from",
    "shards": "data.shards", "eval_shards": "data.eval_shards", "train_file": "data.train_file",
    "eval_file": "data.eval_file", "tokenizer": "data.tokenizer", "seq_len": "data.seq_len",
    "batch_size": "data.batch_size", "grad_accum": "data.grad_accum", "lr": "optim.lr", "seed": "run.seed",
    "threads": "run.threads", "lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
}


def add_train_arguments(p: argparse.ArgumentParser):
    p.add_argument("--config", metavar="FILE", help="TOML or YAML config (sections: run, model, data, optim, "
                                                    "schedule, moe, eval, lora)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--out", help="run directory (run.out_dir)")
    p.add_argument("--steps", type=int, help="optimizer steps (schedule.steps)")
    p.add_argument("--preset", help="model preset to train from scratch (model.preset)")
    p.add_argument("--init-from", help="checkpoint dir / GGUF / 'default' to fine-tune (model.init_from)")
    p.add_argument("--shards", help="pretraining shard dir (data.shards)")
    p.add_argument("--eval-shards", help="held-out shard dir (data.eval_shards)")
    p.add_argument("--sft", action="store_true", help="supervised fine-tuning on chat data (data.mode=sft)")
    p.add_argument("--train-file", help="SFT: chat or problems JSONL (data.train_file)")
    p.add_argument("--eval-file", help="SFT: held-out JSONL (data.eval_file)")
    p.add_argument("--tokenizer", help="tokenizer dir (data.tokenizer)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch-size", type=int, help="rows per micro-batch per process")
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch threads (0: default)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights (lora.enabled)")
    p.add_argument("--lora-r", type=int)
    p.add_argument("--lora-alpha", type=float)
    p.add_argument("--lora-dropout", type=float)
    p.add_argument("--lora-targets", help="comma-separated module names, or a regex (lora.targets)")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT/checkpoint.pt exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def overrides_from_args(args) -> list[str]:
    import json
    sets = []
    for flag, key in FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            sets.append(f"{key}={json.dumps(value)}")
    if args.sft:
        sets.append('data.mode="sft"')
    if args.lora:
        sets.append("lora.enabled=true")
    if args.lora_targets:
        t = args.lora_targets
        value = json.dumps(t) if any(c in t for c in "*+?[]()|\\^$") else json.dumps([s.strip() for s in t.split(",")])
        sets.append(f"lora.targets={value}")
    if args.quiet:
        sets.append("run.progress=false")
    return sets + list(args.overrides)


def cmd_train(args) -> int:
    if getattr(args, "stage", None):  # DSA conversion stages live in sparse_stages.py
        from nanoseek.train.sparse_stages import run_stage
        run_stage(args)
        return 0
    from nanoseek.train.config import load_config
    from nanoseek.train.trainer import train
    cfg = load_config(args.config, overrides_from_args(args))
    last = train(cfg, resume=not args.no_resume)
    if last:
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in last.items()
                 if k in ("step", "loss", "eval_loss", "tokens_per_s", "mfu")}
        print(f"done: {shown} -> {cfg.run.out_dir}")
    return 0


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="pretrain or fine-tune (SFT, LoRA); resumes from OUT/checkpoint.pt")
    add_train_arguments(p)
    try:  # `--stage indexer-warmup|sparse` (DSA); it reuses the flags above that it shares
        from nanoseek.train.sparse_stages import add_stage_args
        add_stage_args(p)
    except ImportError:
        pass
    p.set_defaults(func=cmd_train)
    return p


def add_speedrun_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("speedrun", help="tokenizer -> data -> pretrain MoE -> SFT -> eval -> report card (~15 min)")
    p.add_argument("--out", default="runs/speedrun", help="output directory (default: runs/speedrun)")
    p.add_argument("--quick", action="store_true", help="a tiny model and a few steps (under a minute; for tests)")
    p.add_argument("--config", metavar="FILE", help="TOML/YAML overriding the speedrun's knobs ([speedrun] section "
                                                    "and train sections [pretrain.*] / [sft.*])")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a knob: speedrun.pretrain_steps=300, pretrain.optim.lr=0.004, ...")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, robust on a shared CPU)")
    p.add_argument("--quiet", action="store_true")

    def run(args):
        from nanoseek.train.speedrun import speedrun
        speedrun(args.out, quick=args.quick, config=args.config, overrides=args.overrides,
                 threads=args.threads, progress=not args.quiet)
        return 0

    p.set_defaults(func=run)
    return p

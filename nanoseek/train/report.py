"""The speedrun's report card: report.md (every figure, config and time), report.png, report.json."""

import json
from pathlib import Path


def _fmt(x, nd=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def write_report(out: Path, s: dict):
    out = Path(out)
    (out / "report.json").write_text(json.dumps(s, indent=2, default=str))
    _plot(out, s)
    pre, sft, acc, t, data, m = s["pretrain"], s["sft"], s["accuracy"], s["times_s"], s["data"], s["model"]
    levels = sorted(set(acc["after_pretraining"]["levels"]) | set(acc["after_sft"]["levels"]))
    lines = [
        "# nanoseek speedrun report card" + (" (--quick)" if s["quick"] else ""),
        "",
        f"Command: `{s.get('command', 'nanoseek speedrun')}`",
        "",
        "![report](report.png)",
        "",
        "## Held-out accuracy by level (greedy, exact `#### N` match)",
        "",
        "| level | problems | after pretraining | after SFT |",
        "|---|---|---|---|",
    ]
    for lv in levels:
        a, b = acc["after_pretraining"]["levels"].get(lv, {}), acc["after_sft"]["levels"].get(lv, {})
        lines.append(f"| {lv} | {a.get('n', b.get('n'))} | {100 * a.get('accuracy', 0):.1f}% ({a.get('correct', 0)}) "
                     f"| {100 * b.get('accuracy', 0):.1f}% ({b.get('correct', 0)}) |")
    lines.append(f"| all | {sum(v['n'] for v in acc['after_sft']['levels'].values())} | "
                 f"{100 * acc['after_pretraining']['overall']:.1f}% | {100 * acc['after_sft']['overall']:.1f}% |")
    lines += [
        "",
        "## Model",
        "",
        f"- preset `{m['preset']}`: {m['params'] / 1e6:.2f}M parameters, {m['active_params'] / 1e6:.2f}M active per token",
        f"- layers {m['config']['n_layers']}, dim {m['config']['dim']}, {m['config']['n_routed_experts']} routed experts "
        f"(top-{m['config']['n_activated_experts']}) + {m['config']['n_shared_experts']} shared, "
        f"attention {m['config']['attn_type']}, vocab {m['config']['vocab_size']}",
        "",
        "## Training",
        "",
        "| stage | steps | tokens | train time (s) | first loss | final loss | final eval loss | tokens/s | MFU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, st in (("pretrain", pre), ("SFT", sft)):
        lines.append(f"| {name} | {st['steps']} | {st['tokens']:,} | {st['train_seconds']:.0f} | {_fmt(st['first_loss'])} "
                     f"| {_fmt(st['final_loss'])} | {_fmt(st['final_eval_loss'])} | {st['tokens_per_s']:.0f} "
                     f"| {100 * st['mfu']:.1f}% |")
    lines += [
        "",
        "Eval loss: pretraining on held-out generated problems (not the GSM8K text, which is harder; "
        "hence below the train loss), SFT on held-out chats (assistant tokens only). "
        "MFU: model FLOPs (6 x active matmul params + attention) per second over the matmul "
        "peak measured on this machine in the run's compute dtype (cached in ~/.cache/nanoseek/peak_flops.json).",
        "",
        "## Data",
        "",
        f"- generated problems: {data['generated_train_problems']:,} train (levels {s['knobs']['levels']}), "
        f"{data['heldout_problems']} held out (hash-disjoint split)",
        f"- extra text: {data['extra_text_documents']:,} documents from {', '.join(data['extra_text_sources']) or 'none'}",
        f"- pretraining: {data['pretrain_documents']:,} documents, {data['pretrain_tokens']:,} tokens; "
        f"tokenizer: byte-level BPE, {data['vocab_size']} tokens",
        "",
        "## Times",
        "",
        "| stage | seconds |",
        "|---|---|",
    ] + [f"| {k} | {v:.1f} |" for k, v in t.items()] + [
        "",
        "## Samples",
        "",
    ]
    for name, st in (("pretrain", pre), ("SFT", sft)):
        for smp in st["samples"][:2]:
            lines += [f"**{name}** prompt: `{smp['prompt'][:200]}`", "", "```", smp["completion"][:600], "```", ""]
    ex = [e for e in acc["after_sft"]["examples"] if e["reward"]][:2] + [e for e in acc["after_sft"]["examples"] if not e["reward"]][:1]
    for e in ex:
        lines += [f"**after SFT, level {e['level']}, reward {e['reward']}**: {e['question']}", "", "```",
                  e["completion"][:600], "```", ""]
    lines += [
        "## Configs",
        "",
        f"- speedrun knobs: see report.json (`knobs`)",
        f"- pretraining: [{pre['dir']}/config.toml]({Path(pre['dir']).name}/config.toml), log "
        f"[{Path(pre['dir']).name}/log.jsonl]({Path(pre['dir']).name}/log.jsonl)",
        f"- SFT: [{sft['dir']}/config.toml]({Path(sft['dir']).name}/config.toml), log "
        f"[{Path(sft['dir']).name}/log.jsonl]({Path(sft['dir']).name}/log.jsonl)",
        "",
        "```json",
        json.dumps(s["knobs"], indent=2),
        "```",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))


def _plot(out: Path, s: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nanoseek.train.metrics import read_log

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, name in ((axes[0, 0], "pretrain"), (axes[0, 1], "sft")):
        log = read_log(Path(s[name]["dir"]) / "log.jsonl")
        tr = [r for r in log if "loss" in r]
        ev = [r for r in log if "eval_loss" in r]
        ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], lw=0.8, label="train")
        if ev:
            ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval")
        ax.set_title(f"{name} loss"), ax.set_xlabel("step"), ax.legend()
    ax = axes[1, 0]
    acc = s["accuracy"]
    levels = sorted(acc["after_sft"]["levels"])
    xs = range(len(levels))
    ax.bar([x - 0.2 for x in xs], [100 * acc["after_pretraining"]["levels"][lv]["accuracy"] for lv in levels], 0.4, label="after pretraining")
    ax.bar([x + 0.2 for x in xs], [100 * acc["after_sft"]["levels"][lv]["accuracy"] for lv in levels], 0.4, label="after SFT")
    ax.set_xticks(list(xs), [str(lv) for lv in levels])
    ax.set_xlabel("level (calculation steps)"), ax.set_ylabel("held-out accuracy %"), ax.legend()
    ax.set_title("held-out accuracy by level")
    ax = axes[1, 1]
    t = {k: v for k, v in s["times_s"].items() if k != "total"}
    ax.barh(list(t), list(t.values()))
    ax.set_xlabel("seconds"), ax.set_title(f"time per stage (total {s['times_s']['total']:.0f}s)")
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=80)
    plt.close(fig)

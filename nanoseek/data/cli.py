"""`nanoseek data ...` subcommands: prepare, train-tokenizer, problems.

nanoseek/cli.py calls add_data_parser(subparsers) and dispatches to args.func(args).
User-facing failures raise NanoseekError; the top-level CLI prints them.
"""

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from nanoseek.errors import NanoseekError


def add_data_parser(subparsers) -> argparse.ArgumentParser:
    data = subparsers.add_parser("data", help="prepare training data: clean, dedup, tokenize, shard, generate problems")
    sub = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    _add_prepare(sub)
    _add_train_tokenizer(sub)
    _add_problems(sub)
    return data


def _add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="text (.txt/.md), JSONL or chat JSONL files")
    p.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "chat"],
                   help="input format (auto: by suffix; JSONL with 'messages' is chat)")
    p.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--split-blank-lines", action="store_true", help="text files: one document per paragraph")


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="ingest -> normalise -> dedup -> filter -> report -> tokenize -> shards")
    _add_input_args(p)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="dataset directory (shards, index.json, report.json, clean.jsonl)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer directory; if omitted, one is trained into OUT/tokenizer")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocab size when training a tokenizer (default: 8192)")
    p.add_argument("--seq-len", type=int, default=2048,
                   help="sequence length to report packing waste for (default: 2048)")
    p.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=True,
                   help="exact + near-duplicate removal")
    p.add_argument("--near-dup-threshold", type=float, default=0.8, help="MinHash Jaccard threshold (default: 0.8)")
    p.add_argument("--filter", action=argparse.BooleanOptionalAction, default=True, help="Gopher-style quality filters")
    p.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard file (default: 16M)")
    p.set_defaults(func=cmd_prepare)


def _add_train_tokenizer(sub) -> None:
    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer with chat special tokens")
    _add_input_args(p)
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge (default: 2)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory (tokenizer.json, tokenizer_config.json)")
    p.set_defaults(func=cmd_train_tokenizer)


def _add_problems(sub) -> None:
    p = sub.add_parser("problems", help="generate verifiable arithmetic word problems (GSM8K format)")
    p.add_argument("--n", type=int, required=True, help="number of problems in total, spread evenly over the levels")
    p.add_argument("--levels", default="1-5", help="levels, e.g. 1-5, 3 or 1,2,4 (default: 1-5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=["train", "heldout", "all"],
                   help="hash-disjoint split to draw from (default: train)")
    p.add_argument("--out", required=True, metavar="FILE", help="output JSONL")
    p.set_defaults(func=cmd_problems)


# -----------------------------------------------------------------------------
# prepare


def cmd_prepare(args) -> int:
    from nanoseek.data.dedup import CleaningReport
    from nanoseek.data.tokenizer_train import load_tokenizer

    _check_prepare_args(args)
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None  # fail fast, before the long part
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = CleaningReport()
    clean_path = out / "clean.jsonl"
    kept = _clean_to_jsonl(args, report, clean_path)
    report.save(out / "report.json")
    print(_report_summary(report))
    if kept == 0:
        raise NanoseekError(f"no documents left after cleaning; see {out / 'report.json'}")
    tok = tok or _train_dataset_tokenizer(args, out, clean_path)
    index = _write_dataset_shards(args, tok, out, clean_path, kept)
    print(f"tokens: {index['num_tokens']:,} in {len(index['shards'])} shard(s) ({index['dtype']}) -> {out}")
    _report_packing(args, out, report)
    return 0


def _clean_to_jsonl(args, report, clean_path: Path) -> int:
    """Stream input -> clean documents into clean.jsonl; returns the number kept."""
    from nanoseek.data.dedup import clean_documents
    from nanoseek.data.ingest import read_documents

    docs = read_documents(args.input, fmt=args.format, field=args.field, split_blank_lines=args.split_blank_lines)
    docs = tqdm(docs, desc="clean", unit="doc", disable=None)
    cleaned = clean_documents(docs, exact=args.dedup, near=args.dedup, near_threshold=args.near_dup_threshold,
                              filters=args.filter, report=report)
    kept = 0
    with open(clean_path, "w", encoding="utf-8") as f:
        for doc in cleaned:
            record = {"text": doc.text, "source": doc.source}
            if doc.messages is not None:
                record["messages"] = doc.messages
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            kept += 1
    return kept


def _report_summary(report) -> str:
    d = report.to_dict()
    reasons = ", ".join(f"{k}: {v}" for k, v in d["removed"].items()) or "none removed"
    return f"kept {d['kept_documents']:,}/{d['input_documents']:,} documents ({reasons})"


def _read_records(clean_path: Path):
    with open(clean_path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _read_clean(clean_path: Path):
    """Documents back from clean.jsonl: text for plain documents, message lists for chats."""
    for record in _read_records(clean_path):
        yield record.get("messages") or record["text"]


def _check_prepare_args(args) -> None:
    if not 0 < args.near_dup_threshold <= 1:
        raise NanoseekError(f"--near-dup-threshold must be in (0, 1], got {args.near_dup_threshold}")
    for name in ("seq_len", "shard_tokens"):
        if getattr(args, name) < 1:
            raise NanoseekError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")


def _train_dataset_tokenizer(args, out: Path, clean_path: Path):
    """Train a tokenizer on the cleaned documents into OUT/tokenizer."""
    from nanoseek.data.tokenizer_train import load_tokenizer, save_tokenizer, train_tokenizer

    texts = (record["text"] for record in _read_records(clean_path))
    tok = train_tokenizer(texts, vocab_size=args.vocab_size, show_progress=True)
    save_tokenizer(tok, out / "tokenizer")
    print(f"trained tokenizer ({tok.get_vocab_size()} tokens) -> {out / 'tokenizer'}")
    return load_tokenizer(out / "tokenizer")


def _write_dataset_shards(args, tok, out: Path, clean_path: Path, total: int) -> dict:
    from nanoseek.data.shards import write_shards

    meta = {"seq_len": args.seq_len, "inputs": [str(p) for p in args.input],
            "tokenizer": str(args.tokenizer or out / "tokenizer")}
    with tqdm(total=total, desc="tokenize", unit="doc", disable=None) as bar:
        return write_shards(_read_clean(clean_path), tok, out, shard_tokens=args.shard_tokens, meta=meta,
                            progress=bar.update)


def _report_packing(args, out: Path, report) -> None:
    from nanoseek.data.shards import packing_stats

    stats = packing_stats(out, args.seq_len)
    print(f"packing at seq_len {args.seq_len}: {stats['rows']:,} rows per epoch, "
          f"{100 * stats['waste_fraction']:.1f}% of tokens cropped")
    data = report.to_dict()
    data["packing"] = {"seq_len": args.seq_len, **stats}
    (out / "report.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# -----------------------------------------------------------------------------
# train-tokenizer


def cmd_train_tokenizer(args) -> int:
    from nanoseek.data.ingest import read_documents
    from nanoseek.data.tokenizer_train import save_tokenizer, train_tokenizer

    docs = read_documents(args.input, fmt=args.format, field=args.field, split_blank_lines=args.split_blank_lines)
    texts = (d.text for d in tqdm(docs, desc="read", unit="doc", disable=None))
    tok = train_tokenizer(texts, vocab_size=args.vocab_size, min_frequency=args.min_frequency, show_progress=True)
    save_tokenizer(tok, args.out)
    print(f"trained tokenizer ({tok.get_vocab_size()} tokens) -> {args.out}")
    return 0


# -----------------------------------------------------------------------------
# problems


def parse_levels(text: str) -> list[int]:
    """'1-5' -> [1..5], '1,3' -> [1, 3], '2' -> [2]."""
    levels = set()
    try:
        for part in text.split(","):
            lo, dash, hi = part.strip().partition("-")
            levels.update(range(int(lo), int(hi if dash else lo) + 1))
    except ValueError:
        raise NanoseekError(f"--levels: cannot parse {text!r} (examples: 1-5, 3, 1,2,4)") from None
    if not levels or not levels <= {1, 2, 3, 4, 5}:
        raise NanoseekError(f"--levels: levels must be within 1..5, got {text!r}")
    return sorted(levels)


def cmd_problems(args) -> int:
    from nanoseek.data.problems import generate_problems

    if args.n < 1:
        raise NanoseekError(f"--n must be positive, got {args.n}")
    levels = parse_levels(args.levels)
    split = None if args.split == "all" else args.split
    counts = [args.n // len(levels) + (i < args.n % len(levels)) for i in range(len(levels))]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=args.n, desc="problems", unit="problem", disable=None)
    with open(out, "w", encoding="utf-8") as f, bar:
        for level, count in zip(levels, counts):
            for problem in generate_problems(count, level, seed=args.seed, split=split):
                f.write(json.dumps(problem) + "\n")
                bar.update(1)
    print(f"wrote {args.n} problems (levels {', '.join(map(str, levels))}, split {args.split}) -> {out}")
    return 0

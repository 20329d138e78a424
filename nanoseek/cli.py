"""The `nanoseek` command: one entry point, one subcommand per capability.

Every user-facing failure is a NanoseekError: printed as one `error: ...` line, exit status 1
(`--debug` or NANOSEEK_DEBUG=1 shows the traceback instead).
"""

import argparse
import os
import sys
import time

from nanoseek.errors import NanoseekError


def add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--model", "--model_path", "--model-path", dest="model", default=None,
                   help="GGUF file, HF checkpoint dir or repo id (default: embedded SmolLM2-135M-Instruct)")
    from nanoseek.loading import add_precision_argument
    add_precision_argument(p)


def add_sampling_args(p: argparse.ArgumentParser):
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def sampling_params(args):
    from nanoseek.sampling import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)


def stream(engine, prompt_ids, params, out=sys.stdout) -> tuple[str, int, float]:
    """Run one request to completion, printing text as it arrives. Returns (text, tokens, seconds)."""
    rid = engine.add_request(prompt_ids, params)
    shown, n, t0 = 0, 0, time.perf_counter()
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id != rid:
                continue
            c = o.outputs[0]
            out.write(c.text[shown:])
            out.flush()
            shown, n = len(c.text), len(c.token_ids)
    out.write("\n")
    return c.text, n, time.perf_counter() - t0


def cmd_pull(args):
    from nanoseek.checkpoint.hub import resolve
    print(resolve(args.name))


def _load_engine(args):
    from nanoseek.engine import Engine
    from nanoseek.loading import load
    model, tok = load(args.model, args.precision)
    if tok is None:
        raise NanoseekError(f"{args.model}: no tokenizer found next to the model")
    return Engine(model, tok, kv_cache_gib=0.5), tok


def cmd_generate(args):
    if not args.prompt.strip():
        raise NanoseekError("empty prompt: give the text to continue")
    engine, tok = _load_engine(args)
    ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else tok.encode(args.prompt)
    _, n, dt = stream(engine, ids, sampling_params(args))
    print(f"[{n} tokens, {n / dt:.1f} tokens/s]", file=sys.stderr)


def cmd_chat(args):
    engine, tok = _load_engine(args)
    if not tok.chat_template:
        raise NanoseekError(f"{args.model or 'model'}: the tokenizer has no chat template")
    history = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("nanoseek chat — /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        text, n, dt = stream(engine, tok.apply_chat_template(history), sampling_params(args))
        history.append({"role": "assistant", "content": text})
        if interactive:
            print(f"[{n} tokens, {n / dt:.1f} tokens/s]", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek-style LLM toolkit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="download a model (default: embedded SmolLM2) and print its path")
    p.add_argument("name", nargs="?", default=None, help="repo id or 'default'")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("generate", help="continue a prompt (streams to stdout)")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat in the terminal (streaming)")
    p.add_argument("--system", default=None)
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    for register in _optional_subcommands():
        register(sub)
    return parser


def _optional_subcommands():
    """Subcommands that live with their package (serve, eval, data, ...)."""
    regs = []
    for mod, fn in [("nanoseek.serve.cli", "add_serve_parser"), ("nanoseek.data.cli", "add_data_parser"),
                    ("nanoseek.eval.cli", "add_eval_parser"), ("nanoseek.train.cli", "add_train_parser"),
                    ("nanoseek.train.cli", "add_speedrun_parser"), ("nanoseek.quant.cli", "add_quantize_parser")]:
        module = __import__(mod, fromlist=[fn])
        regs.append(getattr(module, fn))
    return regs


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("NANOSEEK_DEBUG") == "1"
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except NanoseekError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

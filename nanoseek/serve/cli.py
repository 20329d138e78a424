"""`nanoseek serve` arguments. nanoseek/cli.py mounts them with `add_serve_parser(subparsers)`;
`python -m nanoseek.serve` parses them on its own."""

import argparse
import os
import sys
from pathlib import Path

DEFAULT_PORT = 6006
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _non_negative_float(s: str) -> float:
    v = float(s)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def _port(s: str) -> int:
    v = int(s)
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {v}")
    return v


def add_serve_arguments(p: argparse.ArgumentParser):
    # both spellings: the issue's --model_path and the --model-path that vLLM users type
    p.add_argument("--model_path", "--model-path", dest="model_path", default=None,
                   help="GGUF file, HF checkpoint directory or HF repo id (default: the embedded SmolLM2-135M-Instruct)")
    from nanoseek.loading import add_precision_argument
    add_precision_argument(p)
    p.add_argument("--max_batch_tokens", "--max-batch-tokens", dest="max_batch_tokens", type=_positive_int,
                   default=4096, help="tokens per engine step (default: 4096)")
    p.add_argument("--max_num_seqs", "--max-num-seqs", dest="max_num_seqs", type=_positive_int, default=256,
                   help="sequences in the running batch (default: 256)")
    p.add_argument("--kv_cache_gib", "--kv-cache-gib", dest="kv_cache_gib", type=float, default=1.0,
                   help="KV-cache size in GiB (default: 1.0)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    p.add_argument("--api_key", "--api-key", dest="api_key", default=os.environ.get("NANOSEEK_API_KEY"),
                   help="require `Authorization: Bearer <key>` on /v1/* (default: $NANOSEEK_API_KEY, else none)")
    p.add_argument("--max_queued_requests", "--max-queued-requests", dest="max_queued_requests",
                   type=_positive_int, default=1024,
                   help="requests waiting for their first token before new ones get 503 (default: 1024)")
    p.add_argument("--shutdown_timeout", "--shutdown-timeout", dest="shutdown_timeout", type=_non_negative_float,
                   default=30.0, help="seconds in-flight requests may run after SIGTERM (default: 30)")
    p.add_argument("--served_model_name", "--served-model-name", dest="served_model_name", default=None,
                   help="the `model` name clients send (default: derived from --model_path)")


def served_name(model_path: str | None) -> str:
    if model_path in (None, "", "default", "smollm2"):
        return DEFAULT_MODEL_NAME
    path = Path(model_path)
    if path.exists():
        return path.stem if path.is_file() else path.resolve().name
    return str(model_path)  # a hub repo id names itself


def run(args):
    if args.served_model_name is None:
        args.served_model_name = served_name(args.model_path)
    from nanoseek.serve.server import serve  # uvicorn/fastapi load only when serving
    serve(args)


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with a chat page",
                              description="Serve a model over the OpenAI API (/v1/chat/completions, "
                                          "/v1/completions, /v1/models) plus /health, /metrics and a chat page at /.")
    add_serve_arguments(p)
    p.set_defaults(func=run)
    return p


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="nanoseek serve", description="OpenAI-compatible HTTP server")
    add_serve_arguments(p)
    args = p.parse_args(argv)
    from nanoseek.errors import NanoseekError
    try:
        run(args)
    except NanoseekError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0

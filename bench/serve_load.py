"""Load-test any OpenAI-compatible server: latency percentiles and throughput as JSON (+ a PNG).

Two ways to send load (they combine, like vLLM's benchmark_serving):
  --request-rate R   Poisson arrivals at R requests/s (inf: all at once)
  --concurrency C    at most C requests in flight (with rate inf: a fixed-concurrency loop)
Several values run one after another: --request-rate 1,2,4 or --concurrency 1,8,32.

Per request (streaming, so the first token is visible):
  TTFT  send -> first generated text          TPOT  (E2E - TTFT) / (output tokens - 1)
  ITL   gaps between successive text chunks   E2E   send -> last chunk
Throughput: completed requests/s, output tokens/s and prompt+output tokens/s over the run.
Token counts come from the server's usage (stream_options.include_usage); a server that sends
none is counted one token per text chunk.

Examples:
  python bench/serve_load.py --base-url http://127.0.0.1:6006/v1 --request-rate 2,4 --num-requests 100
  python bench/serve_load.py --base-url http://127.0.0.1:8080/v1 --concurrency 1,8,32   # e.g. llama.cpp
  python bench/serve_load.py --start-server "--model_path model.gguf --precision bf16" --concurrency 16
"""

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

# The measurement core (one streaming request, the load driver, percentiles, the summary) lives in
# the package, shared with `nanoseek eval perf`.
from nanoseek.eval.perf import WORDS, drive, make_words, percentiles, stream_openai, summarize  # noqa: F401


def make_prompt(rng: random.Random, words: int) -> str:
    return "Continue this text: " + make_words(rng, words)


def request_body(args, prompt: str) -> dict:
    body = {"model": args.model, "max_tokens": args.output_len, "temperature": args.temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True  # vLLM/nanoseek/llama.cpp extension: fixed output lengths
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def one_request(client: httpx.AsyncClient, args, prompt: str) -> dict:
    """Send one streaming request; timings in seconds relative to its send time."""
    path = "/chat/completions" if args.endpoint == "chat" else "/completions"
    return await stream_openai(client, args.base_url + path, request_body(args, prompt), args.endpoint == "chat")


async def run_load(args, rate: float, concurrency: int | None) -> dict:
    rng = random.Random(args.seed)
    prompts = [make_prompt(rng, args.input_len) for _ in range(args.num_requests)]
    conns = concurrency or args.num_requests
    async with httpx.AsyncClient(timeout=args.timeout, headers=auth_headers(args),
                                 limits=httpx.Limits(max_connections=conns + 4, max_keepalive_connections=conns + 4)) as client:
        results, duration = await drive(lambda prompt: one_request(client, args, prompt), prompts,
                                        concurrency, rate, rng)
    return summarize(results, duration, rate, concurrency)


def plot(runs: list, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for run in runs:
        label = f"rate={run['request_rate']} conc={run['concurrency']}"
        for ax, key in zip(axes, ["ttft", "tpot", "itl", "e2e"]):
            vals = np.sort(np.asarray(run["_raw"][key]) * 1000)
            if len(vals):
                ax.plot(vals, np.arange(1, len(vals) + 1) / len(vals), label=label)
    for ax, key in zip(axes, ["TTFT", "TPOT", "ITL", "E2E latency"]):
        ax.set_xlabel(f"{key} (ms)")
        ax.set_ylabel("fraction of requests" if key != "ITL" else "fraction of gaps")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("serve_load: latency CDFs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def auth_headers(args) -> dict:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> subprocess.Popen:
    """Start `nanoseek serve` (or --server-cmd) on a free loopback port; wait for /health 200."""
    port = free_port()
    cmd = shlex.split(args.server_cmd) + ["--host", "127.0.0.1", "--port", str(port)] + shlex.split(args.start_server)
    print(f"starting: {' '.join(cmd)}", file=sys.stderr)
    proc = subprocess.Popen(cmd, stdout=sys.stderr)
    args.base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + args.server_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode} before becoming healthy")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server not healthy after {args.server_timeout}s")


def stop_server(proc: subprocess.Popen):
    proc.send_signal(signal.SIGINT if os.name == "nt" else signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def parse_list(s: str, kind):
    return [kind(x) for x in s.split(",") if x.strip()]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--base-url", default="http://127.0.0.1:6006/v1", help="OpenAI base URL, ending in /v1")
    p.add_argument("--model", default=None, help="model name (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--request-rate", default="inf", help="requests/s, Poisson arrivals; comma list to sweep")
    p.add_argument("--concurrency", default="", help="max requests in flight; comma list to sweep")
    p.add_argument("--input-len", type=int, default=64, help="prompt length in words (about a token each)")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens per request")
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos=true for fixed output lengths")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=1, help="requests sent (and not measured) before each run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    p.add_argument("--out", default=None, help="write the JSON here (it is always printed)")
    p.add_argument("--plot", default=None, help="write latency CDFs to this PNG")
    p.add_argument("--start-server", default=None, metavar="SERVE_ARGS",
                   help="start `nanoseek serve SERVE_ARGS` on a free port and benchmark it")
    p.add_argument("--server-cmd", default=f"{shlex.quote(sys.executable)} -m nanoseek.serve",
                   help="command used by --start-server")
    p.add_argument("--server-timeout", type=float, default=900.0, help="seconds to wait for the server's health")
    args = p.parse_args(argv)
    rates = parse_list(args.request_rate, float) or [math.inf]
    concs = parse_list(args.concurrency, int) or [None]
    proc = start_server(args) if args.start_server is not None else None
    args.base_url = args.base_url.rstrip("/")
    try:
        if args.model is None:
            models = httpx.get(args.base_url + "/models", headers=auth_headers(args), timeout=30).json()
            args.model = models["data"][0]["id"]
        runs = []
        for rate in rates:
            for conc in concs:
                for _ in range(args.warmup):
                    asyncio.run(_warmup(args))
                run = asyncio.run(run_load(args, rate, conc))
                print(f"rate={run['request_rate']} concurrency={conc}: {run['completed']} ok, {run['failed']} failed, "
                      f"{run['output_token_throughput']:.1f} out tok/s, TTFT p50 "
                      f"{(run['ttft_ms'] or {}).get('p50', float('nan')):.1f} ms", file=sys.stderr)
                runs.append(run)
    finally:
        if proc is not None:
            stop_server(proc)
    if args.plot:
        plot(runs, args.plot)
    report = {"config": {k: v for k, v in vars(args).items() if k not in ("api_key",)},
              "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs]}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return report


async def _warmup(args):
    async with httpx.AsyncClient(timeout=args.timeout, headers=auth_headers(args)) as client:
        await one_request(client, args, make_prompt(random.Random(-1), args.input_len))


if __name__ == "__main__":
    main()

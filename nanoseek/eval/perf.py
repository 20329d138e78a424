"""Performance measurement: streaming latency, throughput and memory, against the brief's targets.

The measurement core is shared with `bench/serve_load.py`:

- `stream_openai(client, url, body, chat)`: one streaming (SSE) request to an OpenAI-compatible
  server -> its timings (`request_timing`);
- `request_timing(chunk_times, ...)`: chunk arrival times -> TTFT, ITL gaps, E2E, TPOT;
- `drive(send, prompts, concurrency, rate)`: at most `concurrency` requests in flight (and
  optionally Poisson arrivals at `rate`/s) -> per-request results and the wall time;
- `percentiles(values)` and `summarize(results, duration, ...)`: mean/p50/p90/p99/max in ms,
  request and token throughput.

Definitions (per request, times from its send):
  TTFT  send -> first generated token      TPOT  (E2E - TTFT) / (output tokens - 1)
  ITL   gaps between successive tokens     E2E   send -> last token
(over HTTP a "token" is a streamed text chunk; token counts come from the server's usage).

`run_perf(backend, ...)` runs batch 1 and each `--concurrency` level with fresh prompts, reads
the memory split, checks the targets and writes results.json, samples.jsonl (one line per
request) and summary.md. A backend is `OpenAIStreamer` (any server, here) or the in-process
engine streamer (`nanoseek.eval.inprocess.EngineStreamer`); both implement:

    async with backend:                  # open clients / start the engine thread
        prompt = backend.prompt(rng, n)  # a prompt of about n tokens
        result = await backend.send(prompt)
    backend.memory()                     # the memory split (bytes, None where not measured)

This module does not import torch.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import math
import os
import random
import resource
import time
from collections.abc import Awaitable, Callable, Sequence

import httpx
import numpy as np
from tqdm import tqdm

from nanoseek.errors import NanoseekError
from nanoseek.eval import runner

TASK = "perf"
TARGET_TTFT_MS = 200.0              # the brief: inference latency < 200 ms (TTFT, short prompts)
TARGET_MEMORY_BYTES = 12 * 10**9    # the brief: memory < 12 GB

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hum old songs about "
         "rivers mountains bread copper lanterns and the long winter evenings").split()


# -------------------------------------------------------------------------- one request


def make_words(rng: random.Random, words: int) -> str:
    """`words` random common English words (about one token each for BPE vocabularies)."""
    return " ".join(rng.choice(WORDS) for _ in range(words))


def request_timing(chunk_times: Sequence[float], output_tokens: int | None = None,
                   prompt_tokens: int | None = None) -> dict:
    """A successful request's result from its chunk arrival times (seconds after send)."""
    if not chunk_times:
        return failed("no text received")
    out = output_tokens if output_tokens is not None else len(chunk_times)
    return {"ok": True, "ttft": chunk_times[0], "e2e": chunk_times[-1],
            "itl": [b - a for a, b in zip(chunk_times, chunk_times[1:])],
            "output_tokens": out, "prompt_tokens": prompt_tokens,
            "tpot": (chunk_times[-1] - chunk_times[0]) / (out - 1) if out > 1 else None}


def failed(error: str) -> dict:
    return {"ok": False, "error": error}


async def stream_openai(client: httpx.AsyncClient, url: str, body: dict, chat: bool) -> dict:
    """POST one streaming request (body has stream=true) and time its chunks.

    Errors (HTTP status, an error event, transport, bad JSON) come back as `failed(...)`,
    never raised, so one bad request does not stop a load run.
    """
    t0 = time.perf_counter()
    chunk_times, usage = [], None
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                text = (await r.aread())[:300].decode(errors="replace")
                return failed(f"HTTP {r.status_code}: {text}")
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                ev = json.loads(data)
                if "error" in ev:
                    return failed(str(ev["error"].get("message", ev["error"])))
                if ev.get("usage"):
                    usage = ev["usage"]
                for c in ev.get("choices") or []:
                    delta = c.get("delta") or {}
                    piece = (delta.get("content") or delta.get("reasoning_content")) if chat else c.get("text")
                    if piece:
                        chunk_times.append(time.perf_counter() - t0)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return failed(f"{type(e).__name__}: {e}")
    return request_timing(chunk_times, usage["completion_tokens"] if usage else None,
                          usage["prompt_tokens"] if usage else None)


# ------------------------------------------------------------------------------ driver


async def drive(send: Callable[[object], Awaitable[dict]], prompts: Sequence, concurrency: int | None = None,
                rate: float = math.inf, rng: random.Random | None = None,
                on_done: Callable[[dict], None] | None = None) -> tuple[list[dict], float]:
    """Send every prompt, at most `concurrency` in flight (None: no limit); with a finite
    `rate`, start them as a Poisson process (exponential gaps drawn from `rng`).
    Returns the results in prompt order and the wall time in seconds."""
    limit = asyncio.Semaphore(concurrency) if concurrency else None
    rng = rng or random.Random(0)

    async def one(prompt):
        if limit is None:
            result = await send(prompt)
        else:
            async with limit:
                result = await send(prompt)
        if on_done is not None:
            on_done(result)
        return result

    t_start, tasks = time.perf_counter(), []
    try:
        for prompt in prompts:
            tasks.append(asyncio.create_task(one(prompt)))
            if not math.isinf(rate):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
    except BaseException:  # an error or Ctrl-C: send nothing more
        for task in tasks:
            task.cancel()
        raise
    return list(results), time.perf_counter() - t_start


def percentiles(values: Sequence[float], scale: float = 1000.0) -> dict | None:
    """mean, p50, p90, p99, max of `values` * scale (seconds -> ms by default); None if empty."""
    if not len(values):
        return None
    a = np.asarray(values, dtype=float) * scale
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def summarize(results: list[dict], duration: float, rate: float = math.inf,
              concurrency: int | None = None) -> dict:
    """One load level: counts, throughput, latency percentiles (ms); `_raw` keeps the seconds."""
    ok = [r for r in results if r["ok"]]
    out_tokens = sum(r["output_tokens"] for r in ok)
    prompt_tokens = sum(r["prompt_tokens"] or 0 for r in ok)
    return {
        "request_rate": "inf" if math.isinf(rate) else rate, "concurrency": concurrency,
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if not r["ok"]})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration, "output_token_throughput": out_tokens / duration,
        "total_token_throughput": (prompt_tokens + out_tokens) / duration,
        "total_output_tokens": out_tokens, "total_prompt_tokens": prompt_tokens,
        "ttft_ms": percentiles([r["ttft"] for r in ok]),
        "tpot_ms": percentiles([r["tpot"] for r in ok if r["tpot"] is not None]),
        "itl_ms": percentiles([x for r in ok for x in r["itl"]]),
        "e2e_ms": percentiles([r["e2e"] for r in ok]),
        # raw per-request values (for plots); not written to results files
        "_raw": {"ttft": [r["ttft"] for r in ok], "e2e": [r["e2e"] for r in ok],
                 "itl": [x for r in ok for x in r["itl"]], "tpot": [r["tpot"] for r in ok if r["tpot"]]},
    }


# ------------------------------------------------------------------------------ memory


def proc_memory(pid: int | str = "self") -> dict:
    """VmHWM (peak resident) and VmRSS of a process in bytes, from /proc/PID/status."""
    values = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0]) * 1024  # kB
    return {"rss_peak_bytes": values.get("VmHWM"), "rss_bytes": values.get("VmRSS")}


def own_memory() -> dict:
    """This process's peak and current RSS; getrusage where /proc is missing (not Linux)."""
    try:
        memory = proc_memory("self")
    except OSError:
        memory = {"rss_peak_bytes": None, "rss_bytes": None}
    if memory["rss_peak_bytes"] is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        memory["rss_peak_bytes"] = peak if os.uname().sysname == "Darwin" else peak * 1024
    memory["source"] = "this process, /proc/self/status VmHWM"
    return memory


def check_server_pid(pid: int) -> None:
    if pid < 1:
        raise NanoseekError(f"--server-pid must be a positive process id, got {pid}")
    try:
        proc_memory(pid)
    except OSError as exc:
        raise NanoseekError(f"--server-pid {pid}: cannot read /proc/{pid}/status "
                            f"({exc.strerror or exc}); is the server running on this machine?") from exc


def memory_split(memory: dict) -> dict:
    """Adds other_bytes = peak RSS - weights - KV cache, where all three are known."""
    parts = (memory.get("rss_peak_bytes"), memory.get("weights_bytes"), memory.get("kv_cache_bytes"))
    memory["other_bytes"] = parts[0] - parts[1] - parts[2] if None not in parts else None
    return memory


# -------------------------------------------------------------------------- HTTP backend


class OpenAIStreamer:
    """Streaming requests to an OpenAI-compatible server (/v1/completions or /v1/chat/completions)."""

    kind = "openai"

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 endpoint: str = "completions", max_tokens: int = 32, temperature: float = 0.0,
                 ignore_eos: bool = True, seed: int | None = None, timeout: float = 600.0,
                 max_concurrency: int = 8, server_pid: int | None = None) -> None:
        self.base_url = runner._api_root(base_url)
        self.model, self.endpoint = model, endpoint
        self.max_tokens, self.temperature, self.ignore_eos, self.seed = max_tokens, temperature, ignore_eos, seed
        self.server_pid = server_pid
        if server_pid is not None:
            check_server_pid(server_pid)
        self.where = f"--base-url {self.base_url}"
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(timeout, connect=10.0)
        self._limits = httpx.Limits(max_connections=max_concurrency + 4,
                                    max_keepalive_connections=max_concurrency + 4)
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> OpenAIStreamer:
        self._client = httpx.AsyncClient(headers=self._headers, timeout=self._timeout, limits=self._limits)
        if self.model is None:
            self.model = await self._first_model()
        return self

    async def __aexit__(self, *exc) -> None:
        await self._client.aclose()

    async def _first_model(self) -> str:
        url = self.base_url + "/models"
        try:
            response = await self._client.get(url)
        except httpx.TransportError as exc:
            raise NanoseekError(f"{self.where}: cannot reach {url} ({type(exc).__name__}: {exc})") from exc
        if response.status_code != 200:
            raise NanoseekError(f"{self.where}: GET {url} answered HTTP {response.status_code}; "
                                "pass --model NAME")
        try:
            return response.json()["data"][0]["id"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise NanoseekError(f"{self.where}: GET {url} lists no model; pass --model NAME") from exc

    def prompt(self, rng: random.Random, tokens: int) -> str:
        return make_words(rng, tokens)

    def body(self, prompt: str) -> dict:
        body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "stream": True, "stream_options": {"include_usage": True}}
        if self.ignore_eos:
            body["ignore_eos"] = True  # vLLM / nanoseek / llama.cpp extension: fixed output lengths
        if self.seed is not None:
            body["seed"] = self.seed
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body

    async def send(self, prompt: str) -> dict:
        path = "/chat/completions" if self.endpoint == "chat" else "/completions"
        return await stream_openai(self._client, self.base_url + path, self.body(prompt), self.endpoint == "chat")

    def memory(self) -> dict:
        memory = {"rss_peak_bytes": None, "rss_bytes": None, "weights_bytes": None, "kv_cache_bytes": None}
        if self.server_pid is None:
            memory["source"] = "not measured: pass --server-pid PID for the server's RSS"
            return memory_split(memory)
        try:
            memory.update(proc_memory(self.server_pid))
            memory["source"] = f"server process {self.server_pid}, /proc/{self.server_pid}/status VmHWM"
        except OSError:
            memory["source"] = f"not measured: server process {self.server_pid} is gone"
        return memory_split(memory)

    def describe(self) -> dict:
        return {"backend": "openai", "base_url": self.base_url, "server_pid": self.server_pid}


# ---------------------------------------------------------------------------------- run


def run_perf(backend, *, concurrency: Sequence[int] = (8,), num_requests: int = 16, prompt_tokens: int = 64,
             max_tokens: int = 32, warmup: int = 1, seed: int = 0, out_dir: str = "runs/eval/perf",
             model_name: str | None = None, config: dict | None = None, progress: bool = True) -> dict:
    """Batch 1, then each concurrency level; returns (and writes) the results.json content."""
    started = time.time()
    levels = sorted({1, *concurrency})
    records: list[dict] = []
    runs: list[dict] = []

    async def measure() -> dict:
        async with backend:
            rng = random.Random(seed)  # one stream of prompts: no level reuses another's (prefix cache)
            for _ in range(warmup):
                result = await backend.send(backend.prompt(rng, prompt_tokens))
                if not result["ok"]:
                    raise NanoseekError(f"{backend.where}: warm-up request failed: {result['error']}")
            for level in levels:
                prompts = [backend.prompt(rng, prompt_tokens) for _ in range(num_requests)]
                with tqdm(total=num_requests, desc=f"perf concurrency {level}", unit="req",
                          disable=not progress) as bar:
                    results, duration = await drive(backend.send, prompts, level,
                                                    on_done=lambda _result: bar.update(1))
                run = summarize(results, duration, concurrency=level)
                if not run["completed"]:
                    raise NanoseekError(f"{backend.where}: all {num_requests} requests failed at "
                                        f"concurrency {level}: {run['errors'][0]}")
                runs.append({key: value for key, value in run.items() if not key.startswith("_")})
                records.extend(_record(level, index, result) for index, result in enumerate(results))
            return backend.memory()

    memory = asyncio.run(measure())
    settings = {"prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "num_requests": num_requests,
                "concurrency": levels, "warmup": warmup, "seed": seed, **(config or {})}
    results = {
        "task": TASK,
        "model": model_name or getattr(backend, "model", None) or type(backend).__name__,
        "config": {**settings, **backend.describe()},
        "data": {"path": None, "sha256": None, "num_problems": len(records),
                 "prompts": f"{prompt_tokens} random words (seed {seed}) per request, fresh for every level"},
        "scores": {"runs": runs, "memory": memory, "targets": targets(runs, memory, prompt_tokens)},
        "wall_time_s": round(time.time() - started, 3),
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    runner.write_outputs(out_dir, results, records)
    return results


def _record(level: int, index: int, result: dict) -> dict:
    record = {"concurrency": level, "request": index, "ok": result["ok"]}
    if result["ok"]:
        record.update(ttft_ms=1000 * result["ttft"], e2e_ms=1000 * result["e2e"],
                      tpot_ms=None if result["tpot"] is None else 1000 * result["tpot"],
                      output_tokens=result["output_tokens"], prompt_tokens=result["prompt_tokens"])
    else:
        record["error"] = result["error"]
    return record


def targets(runs: list[dict], memory: dict, prompt_tokens: int) -> list[dict]:
    """The brief's targets: TTFT p50 / p99 at batch 1 < 200 ms, peak memory < 12 GB."""
    batch1 = next((run for run in runs if run["concurrency"] == 1), None)
    ttft = (batch1 or {}).get("ttft_ms") or {}
    rows = [{"target": f"TTFT {q} < {TARGET_TTFT_MS:.0f} ms", "condition": f"batch 1, {prompt_tokens}-token prompts",
             "measured": ttft.get(q), "limit": TARGET_TTFT_MS, "unit": "ms"} for q in ("p50", "p99")]
    rows.append({"target": f"peak memory < {TARGET_MEMORY_BYTES / 1e9:.0f} GB", "condition": "peak RSS",
                 "measured": memory.get("rss_peak_bytes"), "limit": TARGET_MEMORY_BYTES, "unit": "bytes"})
    for row in rows:
        row["passed"] = None if row["measured"] is None else row["measured"] < row["limit"]
    return rows


# ------------------------------------------------------------------------------ reports


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "not measured"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _pcts(stats: dict | None) -> str:
    if not stats:
        return "–"
    return f"{stats['p50']:.1f} / {stats['p90']:.1f} / {stats['p99']:.1f}"


def _verdict(passed: bool | None) -> str:
    return "not measured" if passed is None else ("PASS" if passed else "FAIL")


def _measured(row: dict) -> str:
    if row["measured"] is None:
        return "not measured"
    return fmt_bytes(row["measured"]) if row["unit"] == "bytes" else f"{row['measured']:.1f} ms"


def summary_markdown(results: dict) -> str:
    config, scores = results["config"], results["scores"]
    settings = ", ".join(f"{key}={value}" for key, value in config.items() if value is not None)
    lines = [f"# perf: {results['model']}", "", f"Settings: {settings}", "",
             "| concurrency | ok / failed | TTFT p50 / p90 / p99 (ms) | TPOT p50 / p90 / p99 (ms) "
             "| ITL p50 / p90 / p99 (ms) | E2E p50 / p90 / p99 (ms) | req/s | output tok/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in scores["runs"]:
        lines.append(f"| {run['concurrency']} | {run['completed']} / {run['failed']} | {_pcts(run['ttft_ms'])} "
                     f"| {_pcts(run['tpot_ms'])} | {_pcts(run['itl_ms'])} | {_pcts(run['e2e_ms'])} "
                     f"| {run['request_throughput']:.2f} | {run['output_token_throughput']:.1f} |")
    memory = scores["memory"]
    peak = memory.get("rss_peak_bytes")

    def row(name: str, key: str, note: str = "") -> str:
        value = memory.get(key)
        share = f"{100 * value / peak:.1f}%" if value is not None and peak else "–"
        return f"| {name} | {fmt_bytes(value)}{note} | {share} |"

    lines += ["", f"Memory ({memory.get('source')}):", "", "| memory | bytes | share of peak RSS |",
              "| --- | --- | --- |", row("peak RSS", "rss_peak_bytes")]
    if memory.get("weights_bytes") is not None or peak is None:
        kv_note = ""
        if memory.get("kv_blocks"):
            kv_note = (f" ({memory['kv_blocks']} blocks x {memory['kv_block_size']} tokens; "
                       f"{fmt_bytes(memory.get('kv_used_peak_bytes'))} in use at peak)")
        lines += [row("weights (parameters + buffers)", "weights_bytes"),
                  row("KV cache (paged pool)", "kv_cache_bytes", kv_note),
                  row("other (runtime, activations, allocator)", "other_bytes")]
    lines += ["", "| target | measured | result |", "| --- | --- | --- |"]
    lines += [f"| {row['target']} ({row['condition']}) | {_measured(row)} | {_verdict(row['passed'])} |"
              for row in scores["targets"]]
    lines += ["", f"Requests: {results['data']['num_problems']}; wall time: {results['wall_time_s']:.1f} s", ""]
    return "\n".join(lines)


def score_cells(results: dict) -> dict[str, str]:
    """Flattened metric -> cell for `nanoseek eval compare`."""
    scores, cells = results["scores"], {}
    for run in scores.get("runs", []):
        c = run["concurrency"]
        for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E")):
            for q in ("p50", "p99"):
                stats = run.get(key)
                cells[f"c={c} {name} {q} (ms)"] = f"{stats[q]:.1f}" if stats else "–"
        cells[f"c={c} req/s"] = f"{run['request_throughput']:.2f}"
        cells[f"c={c} output tok/s"] = f"{run['output_token_throughput']:.1f}"
    memory = scores.get("memory", {})
    for key, name in (("rss_peak_bytes", "peak RSS"), ("weights_bytes", "weights"), ("kv_cache_bytes", "KV cache")):
        cells[name] = fmt_bytes(memory.get(key))
    for row in scores.get("targets", []):
        cells[row["target"]] = f"{_verdict(row['passed'])} ({_measured(row)})"
    return cells


def parse_levels(text: str) -> list[int]:
    """--concurrency: comma-separated positive integers."""
    try:
        levels = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError as exc:
        raise NanoseekError(f"--concurrency must be comma-separated integers, got '{text}'") from exc
    if not levels:
        raise NanoseekError(f"--concurrency needs at least one value, got '{text}'")
    for level in levels:
        if level < 1:
            raise NanoseekError(f"--concurrency must be >= 1, got {level}")
    return levels


__all__ = [
    "OpenAIStreamer", "drive", "failed", "make_words", "percentiles", "request_timing", "run_perf",
    "stream_openai", "summarize", "summary_markdown", "score_cells", "own_memory", "proc_memory",
]

"""`nanoseek serve` as a real process on a free loopback port: flags, background loading,
SIGTERM draining, and a 200-stream load with its memory afterwards.

The child runs the real CLI (nanoseek.serve.cli.main -> uvicorn); only the model loader is
replaced by a tiny random model, so these tests need no checkpoint on disk.
"""

import argparse
import asyncio
import json
import os
import signal
import threading
import time

import httpx
import pytest

from nanoseek.serve.cli import add_serve_parser
from tests.test_serve_helpers import ServerProcess

@pytest.fixture
def spawn(tmp_path):
    procs = []

    def start(args, **env):
        p = ServerProcess(tmp_path, args, **env)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()


def test_flags_both_spellings_and_defaults():
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="cmd"))
    a = parser.parse_args(["serve"])
    assert (a.port, a.host, a.model_path, a.max_batch_tokens, a.api_key) == (6006, "127.0.0.1", None, 4096,
                                                                            os.environ.get("NANOSEEK_API_KEY"))
    assert callable(a.func)
    for spelling in (["--model_path", "m.gguf", "--max_batch_tokens", "512", "--max_queued_requests", "3",
                      "--shutdown_timeout", "2.5", "--kv_cache_gib", "0.5", "--served_model_name", "x",
                      "--api_key", "k"],
                     ["--model-path", "m.gguf", "--max-batch-tokens", "512", "--max-queued-requests", "3",
                      "--shutdown-timeout", "2.5", "--kv-cache-gib", "0.5", "--served-model-name", "x",
                      "--api-key", "k"]):
        a = parser.parse_args(["serve", *spelling, "--precision", "bf16", "--port", "7000", "--host", "0.0.0.0"])
        assert (a.model_path, a.max_batch_tokens, a.max_queued_requests, a.shutdown_timeout, a.kv_cache_gib,
                a.served_model_name, a.api_key, a.precision, a.port, a.host) == \
            ("m.gguf", 512, 3, 2.5, 0.5, "x", "k", "bf16", 7000, "0.0.0.0")
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--max-queued-requests", "0"])


class StreamReader(threading.Thread):
    """Reads one SSE response on a thread, keeping every event and when the stream ended."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.events, self.ended, self.error = [], None, None
        self.first_content = threading.Event()

    def run(self):
        try:
            with httpx.stream("POST", self.url + "/v1/chat/completions", json=self.body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        data = line[6:]
                        self.events.append(data if data == "[DONE]" else json.loads(data))
                        if '"content":"' in line and '"content":""' not in line:
                            self.first_content.set()
        except Exception as e:
            self.error = e
        self.ended = time.monotonic()
        self.first_content.set()


def test_sigterm_finishes_short_requests_and_aborts_long_ones(spawn):
    server = spawn(["--shutdown-timeout", "2", "--kv-cache-gib", "0.02", "--served-model-name", "tiny"],
                   SERVE_TEST_LOAD_DELAY=1.5, SERVE_TEST_STEP_DELAY=0.02)
    seen = server.health_history()
    assert (503, "loading") in seen, seen  # the port answered while the model was still loading
    msgs = [{"role": "user", "content": "go"}]
    long = StreamReader(server.url, {"model": "tiny", "messages": msgs, "max_tokens": 400, "ignore_eos": True,
                                     "stream": True})
    short = StreamReader(server.url, {"model": "tiny", "messages": msgs, "max_tokens": 15, "ignore_eos": True,
                                      "stream": True})
    long.start()
    assert long.first_content.wait(30)
    short.start()
    assert short.first_content.wait(30)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.TransportError):  # no new connections once draining started
        httpx.get(server.url + "/health", timeout=2)
    short.join(30)
    long.join(30)
    assert short.error is None and long.error is None, (short.error, long.error)
    # the short request ran to its end
    assert short.events[-1] == "[DONE]"
    assert [e["choices"][0]["finish_reason"] for e in short.events[:-1] if e["choices"][0]["finish_reason"]] == ["length"]
    assert sum(len(e["choices"][0]["delta"].get("content", "")) for e in short.events[:-1]) <= 15
    # the long one (400 tokens take >= 8 s) was cut at the deadline with an error event, then [DONE]
    assert long.events[-1] == "[DONE]" and long.events[-2]["error"]["code"] == "aborted"
    assert 1.5 < long.ended - t0 < 6, long.ended - t0
    server.proc.wait(timeout=15)
    assert server.proc.returncode in (0, -signal.SIGTERM), server.log.read_text()
    assert "Traceback" not in server.log.read_text()


async def _one_stream(client, url, i) -> tuple[int, str, str | None, int | None, bool]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": f"prompt {i % 4}"}], "max_tokens": 24,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    text, finish, tokens, done = "", None, None, False
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            ev = json.loads(line[6:])
            if ev["choices"]:
                text += ev["choices"][0]["delta"].get("content", "")
                finish = ev["choices"][0]["finish_reason"] or finish
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
    return i, text, finish, tokens, done


async def _load(url: str, n: int) -> list:
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return await asyncio.gather(*[_one_stream(client, url, i) for i in range(n)])


@pytest.mark.slow
def test_200_concurrent_streams_finish_and_memory_returns(spawn):
    server = spawn(["--kv-cache-gib", "0.1", "--served-model-name", "tiny", "--max-batch-tokens", "4096"])
    server.health_history()
    refs = {}
    for k in range(4):  # greedy reference answers, one request at a time
        i, text, finish, tokens, done = asyncio.run(_load_one(server.url, k))
        refs[k] = text
    asyncio.run(_load(server.url, 20))  # warm-up: allocator pools, lazy imports
    idle_rss, rounds = server.rss_mib(), []
    for _ in range(2):
        results = asyncio.run(_load(server.url, 200))
        assert len(results) == 200
        for i, text, finish, tokens, done in results:
            assert done and finish == "length" and tokens == 24, (i, finish, tokens, done)
            assert text == refs[i % 4], f"stream {i} differs from its greedy reference"
        time.sleep(0.5)
        rounds.append(server.rss_mib())
    print(f"RSS idle {idle_rss:.0f} MiB, after each round of 200 streams {rounds} MiB")
    assert rounds[-1] - idle_rss < 40, (idle_rss, rounds)  # back near idle (seen: +12 MiB)
    assert rounds[1] - rounds[0] < 15, rounds               # and no growth per round: nothing kept per request
    metrics = httpx.get(server.url + "/metrics").text
    assert 'nanoseek:kv_cache_blocks_used{model_name="tiny"} 0' in metrics
    assert 'nanoseek:num_requests_running{model_name="tiny"} 0' in metrics


async def _load_one(url, k):
    async with httpx.AsyncClient(timeout=60) as client:
        return await _one_stream(client, url, k)

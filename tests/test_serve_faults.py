"""Faults inside one process: clients that go away, and a full queue."""

import threading
import time

import httpx
import pytest

from nanoseek.engine import Engine
from nanoseek.serve import create_app
from tests.test_serve_helpers import CharTokenizer, GatedModel, LiveServer, tiny_model, wait_until

MODEL = "tiny"
MSGS = [{"role": "user", "content": "Tell me a long story"}]


@pytest.fixture(scope="module")
def slow():
    """A server whose engine takes >= 20 ms a step: a long request stays in flight for seconds."""
    model = GatedModel(tiny_model(seed=2, max_seq_len=512), delay=0.02)
    engine = Engine(model, CharTokenizer(), num_blocks=128)
    app = create_app(engine, MODEL, max_queued_requests=2)
    with LiveServer(app) as url:
        yield url, engine, app.state.serve, model


def idle(engine, state) -> bool:
    s = engine.stats()
    return (s["kv_blocks_used"], s["running"], s["queue_length"], len(state.inflight), state.waiting) == (0, 0, 0, 0, 0)


def long_body(stream: bool) -> dict:
    return {"model": MODEL, "messages": MSGS, "max_tokens": 400, "ignore_eos": True, "stream": stream}


def test_client_disconnect_mid_stream_aborts_and_frees_blocks(slow):
    url, engine, state, _ = slow
    assert wait_until(lambda: idle(engine, state))
    tokens_before = engine.stats()["generation_tokens"]
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", url + "/v1/chat/completions", json=long_body(True)) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            content_events = 0
            for line in lines:
                if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                    content_events += 1
                    if content_events == 3:
                        break
            assert engine.stats()["kv_blocks_used"] > 0 and len(state.inflight) == 1
        # leaving the block closes the connection with ~390 tokens still to go
    # 400 tokens take >= 8 s at 20 ms a step; being idle well before proves the abort
    assert wait_until(lambda: idle(engine, state), timeout=4), engine.stats()
    assert engine.stats()["generation_tokens"] - tokens_before < 200


def test_client_disconnect_without_streaming_aborts(slow):
    url, engine, state, _ = slow
    assert wait_until(lambda: idle(engine, state))
    before = engine.metrics.requests_aborted
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=long_body(False), timeout=1.0)
    assert wait_until(lambda: idle(engine, state), timeout=4), engine.stats()
    assert engine.metrics.requests_aborted == before + 1


def test_queue_full_is_503_at_once(slow):
    url, engine, state, model = slow
    assert wait_until(lambda: idle(engine, state))
    model.gate.clear()  # stall the engine: admitted requests wait for their first token
    results = []

    def send():
        r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": MSGS, "max_tokens": 2},
                       timeout=60)
        results.append(r.status_code)

    threads = [threading.Thread(target=send) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        assert wait_until(lambda: state.waiting == 2, timeout=10)  # the queue (limit 2) is full
        t0 = time.monotonic()
        r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": MSGS, "max_tokens": 2},
                       timeout=10)
        assert time.monotonic() - t0 < 2.0
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
        assert "limit 2" in r.json()["error"]["message"]
        streamed = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True}, timeout=10)
        assert streamed.status_code == 503  # streaming requests are refused before any event too
    finally:
        model.gate.set()
        for t in threads:
            t.join(timeout=60)
    assert results == [200, 200]
    assert wait_until(lambda: idle(engine, state), timeout=10)

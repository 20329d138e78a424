"""Bad requests and unready states: each one gets the right status and an OpenAI error body."""

import json
import threading

import pytest
from fastapi.testclient import TestClient

from nanoseek.engine import Engine
from nanoseek.errors import NanoseekError
from nanoseek.serve import create_app
from tests.test_serve_helpers import CharTokenizer, tiny_model, wait_until

MODEL = "tiny"
MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_model(seed=1, max_seq_len=128), CharTokenizer(), num_blocks=64)


@pytest.fixture(scope="module")
def http(engine):
    with TestClient(create_app(engine, MODEL)) as c:
        yield c


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def chat(http, **fields):
    return http.post("/v1/chat/completions", json={"model": MODEL, "messages": MSGS, **fields})


def test_prompt_plus_max_tokens_over_context_names_the_counts(http):
    prompt_len = len(CharTokenizer().apply_chat_template(MSGS))
    err = error_of(chat(http, max_tokens=120), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    assert "128" in err["message"] and str(prompt_len) in err["message"] and "120" in err["message"]
    assert str(prompt_len + 120) in err["message"]
    # streaming requests are refused the same way, before any event is sent
    assert error_of(chat(http, max_tokens=120, stream=True), 400)["code"] == "context_length_exceeded"


def test_prompt_alone_over_context(http):
    err = error_of(chat(http, messages=[{"role": "user", "content": "x" * 200}]), 400)
    assert err["code"] == "context_length_exceeded" and "128" in err["message"]
    err = error_of(http.post("/v1/completions", json={"model": MODEL, "prompt": "y" * 130}), 400)
    assert err["param"] == "prompt" and "130" in err["message"]


def test_malformed_json(http):
    r = http.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": [', headers={"content-type": "application/json"})
    assert error_of(r, 400)["code"] == "invalid_json"
    r = http.post("/v1/chat/completions", content=b'[1, 2]', headers={"content-type": "application/json"})
    assert error_of(r, 400)["code"] == "invalid_json"


@pytest.mark.parametrize("fields,param", [
    ({"temperature": "hot"}, "temperature"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "user"}], "n": 1}, None),            # missing content is allowed (None) ...
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"stop": 3}, "stop"),
    ({"stream": "yes"}, "stream"),
])
def test_wrong_field_types(http, fields, param):
    r = chat(http, **{"max_tokens": 1, **fields})
    if param is None:
        assert r.status_code == 200  # ... and answered
        return
    err = error_of(r, 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert err["message"].startswith(param + ":")


def test_missing_model_field(http):
    err = error_of(http.post("/v1/chat/completions", json={"messages": MSGS}), 400)
    assert err["param"] == "model" and err["code"] == "missing_required_parameter"


def test_unknown_model_is_404(http):
    err = error_of(chat(http, model="gpt-7"), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model" and "gpt-7" in err["message"]
    assert error_of(http.post("/v1/completions", json={"model": "gpt-7", "prompt": "x"}), 404)["param"] == "model"


@pytest.mark.parametrize("fields,param", [
    ({"n": 0}, "n"), ({"n": 129}, "n"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -5}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"), ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"),
])
def test_values_out_of_range(http, fields, param):
    err = error_of(chat(http, **fields), 400)
    assert err["param"] == param and err["code"] == "invalid_value"


def test_empty_messages(http):
    err = error_of(chat(http, messages=[]), 400)
    assert err["param"] == "messages"


@pytest.mark.parametrize("body,param", [
    ({"prompt": ""}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": [5, 999]}, "prompt"),
    ({"prompt": "x", "echo": True}, "echo"), ({"prompt": "x", "logprobs": 30}, "logprobs"),
    ({"prompt": ["a", 3]}, "prompt"),
])
def test_bad_completion_prompts(http, body, param):
    err = error_of(http.post("/v1/completions", json={"model": MODEL, **body}), 400)
    assert err["param"] == param


def test_unsupported_features_are_refused_not_ignored(http):
    assert error_of(chat(http, tools=[{"type": "function", "function": {"name": "f"}}]), 400)["param"] == "tools"
    assert error_of(chat(http, top_logprobs=2), 400)["param"] == "top_logprobs"  # needs logprobs=true
    assert error_of(chat(http, logit_bias={"5": 1.0}), 400)["param"] == "logit_bias"
    assert error_of(chat(http, stream_options={"include_usage": True}), 400)["param"] == "stream_options"
    bad_part = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert error_of(chat(http, messages=bad_part), 400)["param"] == "messages"


def test_unknown_route_and_method(http):
    assert error_of(http.get("/v1/nothing"), 404)["code"] == "not_found"
    assert error_of(http.get("/v1/chat/completions"), 405)["code"] == "method_not_allowed"


def test_text_parts_are_joined(http):
    parts = [{"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}]
    r = chat(http, messages=parts, max_tokens=1, temperature=0)
    assert r.status_code == 200
    plain = chat(http, messages=[{"role": "user", "content": "hello"}], max_tokens=1, temperature=0)
    assert r.json()["usage"]["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"]
    assert r.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]


def test_503_while_loading_then_ready():
    gate = threading.Event()
    engine = {}

    def loader():
        gate.wait(30)
        engine["e"] = Engine(tiny_model(seed=1, max_seq_len=128), CharTokenizer(), num_blocks=16)
        return engine["e"]

    with TestClient(create_app(loader, MODEL)) as http:
        r = http.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        err = error_of(chat(http, max_tokens=1), 503)
        assert err["code"] == "model_loading" and err["type"] == "server_error"
        assert http.get("/metrics").status_code == 503
        assert error_of(http.get("/v1/models"), 503)["code"] == "model_loading"  # a readiness probe too
        gate.set()
        assert wait_until(lambda: http.get("/health").status_code == 200, timeout=30)
        assert http.get("/v1/models").json()["data"][0]["max_model_len"] == 128
        assert chat(http, max_tokens=2).json()["usage"]["completion_tokens"] <= 2


def test_load_failure_is_reported():
    def loader():
        raise FileNotFoundError("no such checkpoint: /nope")

    app = create_app(loader, MODEL)
    failures = []
    app.state.on_load_error = failures.append
    with TestClient(app) as http:
        assert wait_until(lambda: failures, timeout=10)
        r = http.get("/health")
        assert r.status_code == 503 and "no such checkpoint" in r.json()["error"]
        assert error_of(chat(http, max_tokens=1), 503)["code"] == "model_load_failed"
        assert error_of(http.get("/v1/models"), 503)["code"] == "model_load_failed"


@pytest.mark.parametrize("failure,status,kind", [
    (NanoseekError("request 'x': prompt token ids must be in [0, 98)"), 400, "invalid_request_error"),
    (RuntimeError("kernel exploded"), 500, "server_error"),
])
def test_engine_failures_keep_the_error_shape(failure, status, kind):
    engine = Engine(tiny_model(seed=1, max_seq_len=128), CharTokenizer(), num_blocks=16)

    def add_request(*args, **kwargs):
        raise failure

    engine.add_request = add_request
    with TestClient(create_app(engine, MODEL), raise_server_exceptions=False) as http:
        err = error_of(chat(http, max_tokens=2), status)
        assert err["type"] == kind and str(failure) in err["message"]
        with http.stream("POST", "/v1/chat/completions", json={"model": MODEL, "messages": MSGS, "stream": True}) as r:
            assert r.status_code == 200  # headers were out before the engine saw the request
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["type"] == kind
        assert engine.stats()["kv_blocks_used"] == 0

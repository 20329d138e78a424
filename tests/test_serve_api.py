"""The OpenAI API as the official `openai` client sees it, over real HTTP on loopback,
against a tiny random model (and a scripted one for exact reasoning output)."""

import json
import re

import httpx
import openai
import pytest

from nanoseek.engine import LLM, Engine
from nanoseek.engine.llm import AsyncLLM
from nanoseek.errors import NanoseekError
from nanoseek.sampling import SamplingParams
from nanoseek.serve import create_app
from tests.test_serve_helpers import CharTokenizer, LiveServer, ScriptedModel, tiny_model

MODEL = "tiny-llama"
MSGS = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer()


@pytest.fixture(scope="module")
def engine(tok):
    return Engine(tiny_model(seed=0, max_seq_len=256), tok, num_blocks=128)


@pytest.fixture(scope="module")
def server(engine):
    with LiveServer(create_app(engine, MODEL)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def sse_events(url, body, headers=None) -> list:
    """Raw SSE: every `data:` payload in order, JSON-decoded except the final [DONE]."""
    events = []
    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
            else:
                assert line == "", line
    return events


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["max_model_len"] == 256
    assert httpx.get(server + "/health").json() == {"status": "ok"}


def test_chat_completion_fields_and_usage(client, tok):
    r = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=7, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    prompt_len = len(tok.apply_chat_template(MSGS))
    assert r.usage.prompt_tokens == prompt_len
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 7
    else:
        assert choice.finish_reason == "stop" and r.usage.completion_tokens <= 7
    assert r.usage.total_tokens == prompt_len + r.usage.completion_tokens
    assert choice.message.content == tok.decode(tok.encode(choice.message.content))  # plain printable text


def test_stream_equals_non_stream_greedy_with_usage(client, server):
    full = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    # the wire format itself: data lines only, ending in [DONE]
    raw = sse_events(server + "/v1/chat/completions",
                     {"model": MODEL, "messages": MSGS, "max_tokens": 3, "stream": True})
    assert raw[-1] == "[DONE]" and all(e["object"] == "chat.completion.chunk" for e in raw[:-1])


def test_max_completion_tokens_wins_over_max_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=50, max_completion_tokens=3,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_n_and_seed_are_reproducible(client):
    kw = dict(model=MODEL, messages=MSGS, max_tokens=8, n=3, seed=1234, temperature=1.0, top_p=0.9,
              extra_body={"top_k": 20, "min_p": 0.01, "ignore_eos": True})
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1  # samples differ from one another
    assert a.usage.completion_tokens == 24


def test_penalties_are_accepted_and_change_output(client):
    base = dict(model=MODEL, messages=MSGS, max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**base).choices[0].message.content
    penal = client.chat.completions.create(**base, frequency_penalty=2.0, presence_penalty=2.0).choices[0].message.content
    assert plain != penal
    assert len(set(penal)) >= len(set(plain))  # penalties push towards unseen tokens


def test_stop_string_truncates(client):
    base = dict(model=MODEL, messages=MSGS, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    text = client.chat.completions.create(**base).choices[0].message.content
    assert len(text) == 20
    stop = text[8:10]
    r = client.chat.completions.create(**base, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[:text.index(stop)]
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(**base, stop=stop, stream=True) if c.choices)
    assert streamed == text[:text.index(stop)]


def test_chat_logprobs(client):
    # seeded: an unseeded draw sometimes samples a special token, which the text skips and the
    # logprobs name, and the joined tokens below would then differ from the text
    r = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=5, logprobs=True, top_logprobs=3,
                                       seed=1, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3 and t.bytes == list(t.token.encode())
        assert t.top_logprobs[0].logprob >= t.logprob - 1e-6  # the best alternative is at least as likely
    chunks = list(client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=5, logprobs=True,
                                                 top_logprobs=1, stream=True, seed=1, extra_body={"ignore_eos": True}))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert len(streamed) == 5 and all(len(t.top_logprobs) == 1 for t in streamed)


def test_completions_prompt_forms(client, tok):
    kw = dict(model=MODEL, temperature=0, extra_body={"ignore_eos": True})
    one = client.completions.create(prompt="Once upon", **kw)
    assert one.object == "text_completion" and one.usage.completion_tokens == 16  # OpenAI's default max_tokens
    ids = tok.encode("Once upon")
    same = client.completions.create(prompt=ids, max_tokens=16, **kw)
    assert same.choices[0].text == one.choices[0].text  # token ids and text are the same prompt
    many = client.completions.create(prompt=["Once upon", "A long"], max_tokens=4, n=2, **kw)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == one.choices[0].text[:4]
    assert many.usage.prompt_tokens == len(ids) + len(tok.encode("A long"))
    assert many.usage.completion_tokens == 16
    nested = client.completions.create(prompt=[ids, tok.encode("A long")], max_tokens=4, **kw)
    assert [c.text for c in nested.choices] == [many.choices[0].text, many.choices[2].text]


def test_completions_stream_and_logprobs(client):
    kw = dict(model=MODEL, prompt=["ab", "cd"], max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(logprobs=2, **kw)
    for c in full.choices:
        lp = c.logprobs
        assert "".join(lp.tokens) == c.text and len(lp.token_logprobs) == 6
        assert lp.text_offset == list(range(6)) and all(len(t) == 2 for t in lp.top_logprobs)
    texts = {0: "", 1: ""}
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.text
    assert texts == {0: full.choices[0].text, 1: full.choices[1].text}
    assert chunks[-1].usage.completion_tokens == 12


def test_prefix_cache_reports_cached_tokens(client):
    long_msgs = [{"role": "system", "content": "You are terse. " * 8}, {"role": "user", "content": "hi"}]
    client.chat.completions.create(model=MODEL, messages=long_msgs, max_tokens=1)
    r = client.chat.completions.create(model=MODEL, messages=long_msgs, max_tokens=1)
    assert r.usage.prompt_tokens > 100
    assert r.usage.prompt_tokens_details.cached_tokens >= 96  # whole 16-token blocks of the shared prefix


def test_metrics_prometheus_text(client, server):
    client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=3)
    r = httpx.get(server + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    line_re = re.compile(r'^(nanoseek:[a-z0-9_]+)(\{[^}]*\})? (-?[0-9.e+-]+|\+Inf|NaN)$')
    for line in r.text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) nanoseek:[a-z0-9_]+ ", line), line
            continue
        m = line_re.match(line)
        assert m, f"not Prometheus text: {line!r}"
        samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    names = {k.split("{")[0] for k in samples}
    for want in ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "kv_cache_blocks_used",
                 "kv_cache_blocks_free", "prefix_cache_hit_rate", "num_preemptions_total", "prompt_tokens_total",
                 "generation_tokens_total", "request_success_total"]:
        assert f"nanoseek:{want}" in names, want
    lab = 'model_name="tiny-llama"'
    assert samples[f"nanoseek:kv_cache_blocks_used{{{lab}}}"] + samples[f"nanoseek:kv_cache_blocks_free{{{lab}}}"] == 128
    assert samples[f"nanoseek:generation_tokens_total{{{lab}}}"] >= 3
    assert sum(v for k, v in samples.items() if k.startswith("nanoseek:request_success_total")) >= 1
    for h in ["time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"]:
        buckets = [(k, v) for k, v in samples.items() if k.startswith(f"nanoseek:{h}_bucket")]
        assert len(buckets) >= 10 and buckets[-1][0].endswith('le="+Inf"}')
        values = [v for _, v in buckets]
        assert values == sorted(values), f"{h} buckets must be cumulative"
        assert values[-1] == samples[f"nanoseek:{h}_count{{{lab}}}"] > 0
        assert samples[f"nanoseek:{h}_sum{{{lab}}}"] > 0


def test_api_key():
    # its own engine: the module's server already drives the shared one (an engine has one driver)
    engine = Engine(tiny_model(seed=0, max_seq_len=256), CharTokenizer(), num_blocks=32)
    with LiveServer(create_app(engine, MODEL, api_key="s3cret")) as url:
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=1)
        assert e.value.body["code"] == "invalid_api_key"
        r = httpx.get(url + "/v1/models")
        assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert good.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=1).usage.completion_tokens == 1
        assert httpx.get(url + "/health").status_code == 200  # probes need no key


def test_an_engine_has_one_driver(tok):
    """A second loop stepping the same engine would take the first one's outputs (its client
    then waits forever): it is refused at once, and the engine is free again after shutdown."""
    llm = LLM(tiny_model(seed=0, max_seq_len=64), tokenizer=tok, num_blocks=16)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    alone = llm.generate("hello", params)[0].outputs[0].token_ids
    served = AsyncLLM(llm.engine)
    with pytest.raises(NanoseekError, match="already driven by another AsyncLLM"):
        AsyncLLM(llm.engine)
    with pytest.raises(NanoseekError, match="already driven by another AsyncLLM"):
        create_app(llm.engine, MODEL)
    with pytest.raises(NanoseekError, match="being served by an AsyncLLM"):
        llm.generate("hello", params)
    served.shutdown()
    assert llm.engine.driver is None and llm.generate("hello", params)[0].outputs[0].token_ids == alone


def scripted_server(tok, output: str, generation_prefix: str = ""):
    prompt = tok.apply_chat_template(MSGS, generation_prefix=generation_prefix)
    engine = Engine(ScriptedModel(tok.encode(output), start=len(prompt)), tok, num_blocks=32)
    return LiveServer(create_app(engine, "scripted"))


def test_reasoning_content_streamed_across_chunks(tok):
    with scripted_server(tok, "<think>Why so?</think>Ok then") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="scripted", messages=MSGS, temperature=0)
        assert r.choices[0].message.content == "Ok then"
        assert r.choices[0].message.model_extra["reasoning_content"] == "Why so?"
        assert r.choices[0].finish_reason == "stop"
        deltas = [c.choices[0].delta for c in client.chat.completions.create(
            model="scripted", messages=MSGS, temperature=0, stream=True)]
        reasoning = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
        content = "".join(d.content or "" for d in deltas)
        assert (reasoning, content) == ("Why so?", "Ok then")
        # one character per token: the tags arrived in pieces and none of them leaked out
        assert sum(1 for d in deltas if d.content or d.model_extra.get("reasoning_content")) > 10
        assert all("<" not in (d.content or "") + (d.model_extra.get("reasoning_content") or "") for d in deltas)


def test_reasoning_when_the_prompt_opens_think(tok):
    with scripted_server(tok, "Hmm.</think>Yes", generation_prefix="<think>\n") as url:
        body = {"model": "scripted", "messages": MSGS, "chat_template_kwargs": {"generation_prefix": "<think>\n"}}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30).json()
        assert r["choices"][0]["message"] == {"role": "assistant", "content": "Yes", "reasoning_content": "Hmm."}
